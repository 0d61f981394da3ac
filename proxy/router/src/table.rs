//! The checked table and the one function the data plane calls: [`Table::decide`].

use std::borrow::Cow;

use http::{HeaderMap, Method, header};

use crate::rule::Rule;
use crate::spec::{Compare, TableSpec};
use crate::split::{Bucketing, Split, Sticky, random_bucket};

/// A track's index in its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub(crate) usize);

/// A route's index in its table (its position in `routes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub(crate) usize);

impl TrackId {
    pub fn index(self) -> usize {
        self.0
    }
}

impl RouteId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// How to speak to a track's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 when the client spoke HTTP/2, HTTP/1.1 otherwise.
    Auto,
    Http1,
    /// HTTP/2 with prior knowledge, in clear text.
    H2c,
}

#[derive(Clone, Debug)]
pub struct Track {
    pub(crate) name: String,
    pub(crate) backends: Vec<String>,
    pub(crate) protocol: Protocol,
}

impl Track {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port` of each backend, in configured order.
    pub fn backends(&self) -> &[String] {
        &self.backends
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

#[derive(Clone, Debug)]
pub(crate) enum HostMatch {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name that ends with it.
    Suffix(String),
    Any,
}

#[derive(Clone, Debug)]
pub(crate) enum PathMatch {
    Exact(String),
    /// Segment-wise: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => match path.strip_prefix(p.as_str()) {
                None => false,
                Some(rest) => rest.is_empty() || p.ends_with('/') || rest.starts_with('/'),
            },
        }
    }

    /// Orders routes of one host: exact paths first, then longer prefixes.
    pub(crate) fn specificity(&self) -> (bool, usize) {
        match self {
            PathMatch::Exact(p) => (true, p.len()),
            PathMatch::Prefix(p) => (false, p.len()),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Mirror {
    pub(crate) to: TrackId,
    /// Basis points of requests mirrored.
    pub(crate) share: u32,
    pub(crate) compare: Option<Compare>,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub(crate) name: String,
    pub(crate) host: HostMatch,
    pub(crate) path: PathMatch,
    pub(crate) rules: Vec<Rule>,
    pub(crate) split: Split,
    pub(crate) sticky: Option<Sticky>,
    pub(crate) mirror: Option<Mirror>,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn split(&self) -> &Split {
        &self.split
    }

    /// Every track this route may send a request to: its rules' and its split's (a share of
    /// 0 included), each once or more.
    pub fn serves(&self) -> impl Iterator<Item = TrackId> + '_ {
        let rules = self.rules.iter().map(|r| r.to);
        rules.chain(self.split.shares().map(|(track, _)| track))
    }

    /// The track copies of its requests go to, if it mirrors.
    pub fn mirror_to(&self) -> Option<TrackId> {
        self.mirror.as_ref().map(|m| m.to)
    }

    /// What of a copy's answer is compared with the primary's, if anything.
    pub fn mirror_compare(&self) -> Option<Compare> {
        self.mirror.as_ref().and_then(|m| m.compare)
    }
}

/// The routing table: one immutable value, valid by construction (see [`Table::build`]).
///
/// Route selection, in order of precedence:
/// 1. host: an exact host beats the longest matching `*.suffix`, which beats `*`; a host
///    with no route for the path falls back to the next less specific host;
/// 2. path: an exact `path` beats any `path_prefix`; a longer prefix beats a shorter one;
/// 3. otherwise the route written first wins.
#[derive(Clone, Debug)]
pub struct Table {
    pub(crate) spec: TableSpec,
    pub(crate) tracks: Vec<Track>,
    pub(crate) routes: Vec<Route>,
    /// Route ids per exact host, each list sorted by path specificity then order.
    /// Hashed with foldhash: the keys come from the table, so a client choosing the host it
    /// sends cannot make lookups collide; SipHash would only cost more.
    pub(crate) exact: foldhash::HashMap<String, Vec<RouteId>>,
    /// `(".suffix", routes)`, longest suffix first.
    pub(crate) suffix: Vec<(String, Vec<RouteId>)>,
    pub(crate) any: Vec<RouteId>,
}

/// A large table is freed a few routes at a time (see [`crate::pace`]).
impl Drop for Table {
    fn drop(&mut self) {
        crate::pace::release(std::mem::take(&mut self.spec.routes));
        crate::pace::release(std::mem::take(&mut self.routes));
        crate::pace::release(std::mem::take(&mut self.suffix));
        for entry in self.exact.drain() {
            drop(entry);
            crate::pace::point();
        }
    }
}

/// The parts of a request that routing looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Host without port; compared case-insensitively.
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// Host from the URI (HTTP/2 `:authority`, absolute-form) or else the `Host` header.
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
            .unwrap_or("");
        RequestView {
            method: req.method(),
            host: strip_port(host),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// The host without its port, and without the trailing dot of a fully qualified name
/// (`shop.example.com.` is `shop.example.com`).
pub(crate) fn strip_port(host: &str) -> &str {
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        // A port is what follows the last `:`; found from the end, without a UTF-8 searcher.
        match memchr::memrchr(b':', host.as_bytes()) {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// Why a request went where it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The rule at this index matched.
    Rule(usize),
    /// No rule matched; the split put the request's bucket on the track.
    Split { bucket: u32, bucketing: Bucketing },
}

/// Where one request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub route: RouteId,
    pub track: TrackId,
    pub cause: Cause,
    /// A copy of the request goes to this track too.
    pub mirror: Option<TrackId>,
}

impl Decision {
    /// The `Set-Cookie` value to add to the response, when the proxy assigned a bucket.
    pub fn set_cookie(&self) -> Option<&str> {
        match &self.cause {
            Cause::Split {
                bucketing: Bucketing::Assigned { set_cookie },
                ..
            } => Some(set_cookie),
            _ => None,
        }
    }
}

impl Table {
    /// The route that serves the request, if any (see the precedence on [`Table`]).
    pub fn select(&self, req: &RequestView<'_>) -> Option<RouteId> {
        let host: Cow<'_, str> = match req.host.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(req.host.to_ascii_lowercase()),
            false => Cow::Borrowed(req.host),
        };
        let path = crate::path::normalize(req.path);
        let first_for_path = |ids: &[RouteId]| {
            ids.iter()
                .copied()
                .find(|id| self.routes[id.0].path.matches(&path))
        };
        self.exact
            .get(host.as_ref())
            .and_then(|ids| first_for_path(ids))
            .or_else(|| {
                self.suffix
                    .iter()
                    .filter(|(suffix, _)| {
                        host.ends_with(suffix.as_str()) && host.len() > suffix.len()
                    })
                    .find_map(|(_, ids)| first_for_path(ids))
            })
            .or_else(|| first_for_path(&self.any))
    }

    /// Routes the request: route, then rules in order, then the split; and the mirror
    /// sample. `random` supplies randomness and is called only when needed (no sticky key,
    /// mirror sampling), which keeps this function pure and testable.
    pub fn decide(
        &self,
        req: &RequestView<'_>,
        random: &mut dyn FnMut() -> u64,
    ) -> Option<Decision> {
        let route_id = self.select(req)?;
        let route = &self.routes[route_id.0];
        let (track, cause) = match route.rules.iter().position(|r| r.matches(req)) {
            Some(i) => (route.rules[i].to(), Cause::Rule(i)),
            None => {
                let (bucket, bucketing) = match (&route.sticky, route.split.single()) {
                    (Some(sticky), _) => sticky.bucket(req.headers, random),
                    // One track takes every bucket: no need to draw one.
                    (None, Some(_)) => (0, Bucketing::Random),
                    (None, None) => (random_bucket(random), Bucketing::Random),
                };
                (
                    route.split.track_for(bucket),
                    Cause::Split { bucket, bucketing },
                )
            }
        };
        let mirror = route
            .mirror
            .as_ref()
            .filter(|m| m.share > 0 && random_bucket(random) < m.share)
            .map(|m| m.to);
        Some(Decision {
            route: route_id,
            track,
            cause,
            mirror,
        })
    }

    pub fn track(&self, id: TrackId) -> &Track {
        &self.tracks[id.0]
    }

    pub fn tracks(&self) -> impl ExactSizeIterator<Item = (TrackId, &Track)> {
        self.tracks.iter().enumerate().map(|(i, t)| (TrackId(i), t))
    }

    pub fn track_id(&self, name: &str) -> Option<TrackId> {
        self.tracks.iter().position(|t| t.name == name).map(TrackId)
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0]
    }

    pub fn routes(&self) -> impl ExactSizeIterator<Item = (RouteId, &Route)> {
        self.routes.iter().enumerate().map(|(i, r)| (RouteId(i), r))
    }

    /// The table as written, for `GET /routes`.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }
}
