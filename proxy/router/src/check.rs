//! From [`TableSpec`] to [`Table`]: every semantic problem reported at once, with its place.

mod rules;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use fleet_yaml::{Diagnostics, Positions, is_token, suggest};
use http::HeaderName;
use regex::Regex;

use crate::rule::Rule;
use crate::spec::{ProtocolSpec, RouteSpec, TableSpec};
use crate::split::{BUCKETS, Split, Sticky};
use crate::table::{HostMatch, Mirror, PathMatch, Protocol, Route, RouteId, Table, Track, TrackId};

/// Compiled regexes are capped so that a hostile `PUT /routes` cannot exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const DEFAULT_MAX_AGE: u64 = 30 * 24 * 3600;

impl Table {
    /// Checks `spec` and builds the table, or reports every problem into `diags`, locating
    /// each through `at` (the positions of the document `spec` was read from).
    pub fn build(spec: TableSpec, at: &Positions, diags: &mut Diagnostics) -> Option<Table> {
        let errors_before = diags.len();
        let mut b = Builder {
            at,
            diags,
            tracks: Vec::new(),
            regexes: HashMap::new(),
        };
        b.tracks(&spec);
        // Sized up front, as is the exact-host map below (by its routes, an upper bound):
        // growing them would touch twice the memory, and memory a process has not used
        // before is what makes its first tables slow.
        let mut routes = Vec::with_capacity(spec.routes.len());
        routes.extend(spec.routes.iter().enumerate().filter_map(|(i, r)| {
            crate::pace::point();
            b.route(i, r)
        }));
        b.duplicates(&spec);
        // Only errors are ever added here, so any new diagnostic means the spec is rejected.
        if b.diags.len() > errors_before {
            return None;
        }
        let tracks = b.tracks;
        let exact_hosts = routes
            .iter()
            .filter(|r| matches!(r.host, HostMatch::Exact(_)))
            .count();
        let mut exact: foldhash::HashMap<String, Vec<RouteId>> =
            foldhash::HashMap::with_capacity_and_hasher(exact_hosts, Default::default());
        let mut suffix: HashMap<String, Vec<RouteId>> = HashMap::new();
        let mut any = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            crate::pace::point();
            match &route.host {
                HostMatch::Exact(h) => exact.entry(h.clone()).or_default().push(RouteId(i)),
                HostMatch::Suffix(s) => suffix.entry(s.clone()).or_default().push(RouteId(i)),
                HostMatch::Any => any.push(RouteId(i)),
            }
        }
        let by_path = |ids: &mut Vec<RouteId>| {
            // Stable sort: among equally specific paths the route written first stays first.
            ids.sort_by_key(|id| std::cmp::Reverse(routes[id.0].path.specificity()));
        };
        exact.values_mut().for_each(by_path);
        let mut suffix: Vec<(String, Vec<RouteId>)> = suffix.into_iter().collect();
        suffix.iter_mut().for_each(|(_, ids)| by_path(ids));
        suffix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        by_path(&mut any);
        Some(Table {
            spec,
            tracks,
            routes,
            exact,
            suffix,
            any,
        })
    }
}

/// Where a value is in the table spec: `routes[3].rules[0].match`. Written out only when a
/// diagnostic needs it, so that checking a large valid table formats nothing.
#[derive(Clone, Copy, Debug)]
enum At<'a> {
    Root(&'static str),
    Field(&'a At<'a>, &'a str),
    Index(&'a At<'a>, usize),
}

impl<'a> At<'a> {
    fn field(&'a self, name: &'a str) -> At<'a> {
        At::Field(self, name)
    }

    fn index(&'a self, i: usize) -> At<'a> {
        At::Index(self, i)
    }
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Root(name) => f.write_str(name),
            At::Field(parent, name) => write!(f, "{parent}.{name}"),
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

struct Builder<'a> {
    at: &'a Positions,
    diags: &'a mut Diagnostics,
    tracks: Vec<Track>,
    /// Each distinct pattern is compiled once per table and shared by every rule using it.
    regexes: HashMap<String, Arc<Regex>>,
}

impl Builder<'_> {
    fn error(&mut self, at: &At<'_>, message: impl Into<String>, help: impl Into<String>) {
        let path = at.to_string();
        self.diags.error(self.at.of(&path), &path, message, help);
    }

    fn tracks(&mut self, spec: &TableSpec) {
        let tracks = At::Root("tracks");
        if spec.tracks.is_empty() {
            self.error(
                &tracks,
                "no tracks",
                "add at least one, as `stable: { backends: [\"10.0.0.1:8080\"] }`",
            );
        }
        for (name, track) in &spec.tracks {
            let path = tracks.field(name);
            if !is_label(name) {
                self.error(
                    &path,
                    format!("bad track name \"{name}\""),
                    "use lowercase letters, digits, `-` and `_`",
                );
            }
            if track.backends.is_empty() {
                self.error(
                    &path.field("backends"),
                    "no backends",
                    "add at least one `host:port`",
                );
            }
            for (i, backend) in track.backends.iter().enumerate() {
                if !is_host_port(backend) {
                    self.error(
                        &path.field("backends").index(i),
                        format!("\"{backend}\" is not a `host:port` address"),
                        "write it as `10.0.0.1:8080` or `svc.local:80`",
                    );
                }
            }
            let protocol = match track.protocol {
                None | Some(ProtocolSpec::Auto) => Protocol::Auto,
                Some(ProtocolSpec::Http1) => Protocol::Http1,
                Some(ProtocolSpec::H2c) => Protocol::H2c,
            };
            self.tracks.push(Track {
                name: name.clone(),
                backends: track.backends.clone(),
                protocol,
            });
        }
    }

    fn track(&mut self, at: &At<'_>, name: &str) -> Option<TrackId> {
        let found = self.tracks.iter().position(|t| t.name == name).map(TrackId);
        if found.is_none() {
            let names: Vec<&str> = self.tracks.iter().map(|t| t.name.as_str()).collect();
            let help = suggest(name, &names);
            self.error(at, format!("unknown track \"{name}\""), help);
        }
        found
    }

    fn route(&mut self, i: usize, spec: &RouteSpec) -> Option<Route> {
        let routes = At::Root("routes");
        let at = routes.index(i);
        let host = self.host(&at, spec.host.as_deref().unwrap_or("*"));
        let path = self.path(&at, spec);
        let rules: Vec<Option<Rule>> = spec
            .rules
            .iter()
            .enumerate()
            .map(|(j, rule)| {
                let rules = at.field("rules");
                let at = rules.index(j);
                let conditions = self.conditions(&at.field("match"), &rule.matches);
                let to = self.track(&at.field("to"), &rule.to);
                Some(Rule {
                    conditions: conditions?,
                    to: to?,
                })
            })
            .collect();
        let split = self.split(&at, spec);
        let sticky = self.sticky(&at, spec);
        let mirror = match &spec.mirror {
            None => Some(None),
            Some(m) => {
                let mirror = at.field("mirror");
                let to = self.track(&mirror.field("to"), &m.to);
                let share = (m.percent * 100.0).round();
                if !(0.0..=100.0).contains(&m.percent) {
                    self.error(
                        &mirror.field("percent"),
                        format!("{} is not a percentage", m.percent),
                        "use a number from 0 to 100",
                    );
                } else if share == 0.0 && m.percent > 0.0 {
                    // Buckets are basis points: a share below half of one would mirror nothing.
                    self.error(
                        &mirror.field("percent"),
                        format!(
                            "{} is below the smallest share mirrored, 0.01 (one request in 10000)",
                            m.percent
                        ),
                        "use 0.01 or more, or 0 to mirror nothing",
                    );
                }
                // In range after the check above, so the cast neither wraps nor saturates.
                to.map(|to| {
                    Some(Mirror {
                        to,
                        share: share.clamp(0.0, f64::from(BUCKETS)) as u32,
                        compare: m.compare,
                    })
                })
            }
        };
        let name = spec.name.clone().unwrap_or_else(|| default_name(spec));
        Some(Route {
            name,
            host: host?,
            path: path?,
            rules: rules.into_iter().collect::<Option<_>>()?,
            split: split?,
            sticky: sticky?,
            mirror: mirror?,
        })
    }

    fn host(&mut self, at: &At<'_>, given: &str) -> Option<HostMatch> {
        let host = given.to_ascii_lowercase();
        if host == "*" {
            return Some(HostMatch::Any);
        }
        let (name, make): (&str, fn(String) -> HostMatch) = match host.strip_prefix("*.") {
            Some(rest) => (rest, |h| HostMatch::Suffix(format!(".{h}"))),
            None => (host.as_str(), HostMatch::Exact),
        };
        let ok = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            self.error(
                &at.field("host"),
                format!("bad host \"{given}\""),
                "write `example.com`, `*.example.com` or `*` (no port)",
            );
            return None;
        }
        Some(make(name.to_string()))
    }

    fn path(&mut self, at: &At<'_>, spec: &RouteSpec) -> Option<PathMatch> {
        let (field, path, make): (&str, &str, fn(String) -> PathMatch) =
            match (&spec.path, &spec.path_prefix) {
                (Some(_), Some(_)) => {
                    self.error(
                        &at.field("path"),
                        "both `path` and `path_prefix`",
                        "keep one: `path` matches exactly, `path_prefix` matches below too",
                    );
                    return None;
                }
                (Some(p), None) => ("path", p, PathMatch::Exact),
                (None, Some(p)) => ("path_prefix", p, PathMatch::Prefix),
                (None, None) => ("path_prefix", "/", PathMatch::Prefix),
            };
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            self.error(
                &at.field(field),
                format!("bad path \"{path}\""),
                "start with `/`, without query or fragment",
            );
            return None;
        }
        // Requests are matched in this form (`crate::path`): a path in another would never be.
        let normal = crate::path::normalize(path);
        if normal != path {
            self.error(
                &at.field(field),
                format!("path \"{path}\" is matched as \"{normal}\""),
                format!("write \"{normal}\""),
            );
            return None;
        }
        Some(make(path.to_string()))
    }

    fn split(&mut self, at: &At<'_>, spec: &RouteSpec) -> Option<Split> {
        let field = at.field("split");
        let mut shares = Vec::new();
        for (name, share) in &spec.split {
            if let Some(id) = self.track(&field.field(name), name) {
                shares.push((name.as_str(), id, *share));
            }
        }
        let sum: u64 = spec.split.values().map(|s| u64::from(*s)).sum();
        if sum != u64::from(BUCKETS) {
            self.error(
                &field,
                format!("shares sum to {sum}, not 10000"),
                "shares are basis points: 10000 is 100%, 500 is 5%",
            );
            return None;
        }
        if shares.len() != spec.split.len() {
            return None;
        }
        // Layout: others in name order from bucket 0, the baseline on top (see `Split`).
        let baseline = shares
            .iter()
            .position(|s| s.0 == "stable")
            .unwrap_or(shares.len() - 1);
        let base = shares.remove(baseline);
        shares.push(base);
        let layout: Vec<(TrackId, u32)> =
            shares.iter().map(|&(_, id, share)| (id, share)).collect();
        Some(Split::new(&layout))
    }

    fn sticky(&mut self, at: &At<'_>, spec: &RouteSpec) -> Option<Option<Sticky>> {
        let Some(s) = &spec.sticky else {
            return Some(None);
        };
        let field = at.field("sticky");
        match (&s.cookie, &s.header) {
            (Some(name), None) => {
                if !is_token(name) {
                    self.error(
                        &field.field("cookie"),
                        format!("bad cookie name \"{name}\""),
                        "use letters, digits, `-` and `_`",
                    );
                    return None;
                }
                let lower = name.to_ascii_lowercase();
                let prefix = ["__host-", "__secure-"]
                    .into_iter()
                    .find(|p| lower.starts_with(p));
                if let Some(prefix) = prefix
                    && s.secure != Some(true)
                {
                    let prefix = &name[..prefix.len()];
                    self.error(
                        &field.field("cookie"),
                        format!("browsers keep a `{prefix}` cookie only if it is `Secure`, so every request would get a new bucket"),
                        "add `secure: true` (the site must be served over HTTPS), or drop the prefix",
                    );
                    return None;
                }
                if s.max_age == Some(0) {
                    self.error(
                        &field.field("max_age"),
                        "max_age 0 makes the cookie expire at once, so no user would stay put",
                        "give the seconds a user keeps their bucket (default 2592000, 30 days)",
                    );
                    return None;
                }
                Some(Some(Sticky::Cookie {
                    name: name.clone(),
                    max_age: s.max_age.unwrap_or(DEFAULT_MAX_AGE),
                    secure: s.secure.unwrap_or(false),
                }))
            }
            (None, Some(name)) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => {
                    if s.max_age.is_some() || s.secure.is_some() {
                        self.error(
                            &field,
                            "`max_age` and `secure` apply to cookies only",
                            "remove them or use `cookie:`",
                        );
                        return None;
                    }
                    Some(Some(Sticky::Header(h)))
                }
                Err(_) => {
                    self.error(
                        &field.field("header"),
                        format!("bad header name \"{name}\""),
                        "use letters, digits and `-`",
                    );
                    None
                }
            },
            _ => {
                self.error(
                    &field,
                    "needs exactly one of `cookie` or `header`",
                    "write `sticky: { cookie: fleet-bucket }` or `sticky: { header: x-user-id }`",
                );
                None
            }
        }
    }

    /// Two routes with the same host and path: the second could never be chosen. Two with the
    /// same name (given, or host and path): their metrics would be one.
    fn duplicates(&mut self, spec: &TableSpec) {
        // Keyed by host, whether the path is exact, and the path; borrowed where they can be.
        type Place<'a> = (Cow<'a, str>, bool, &'a str);
        let mut seen: foldhash::HashMap<Place<'_>, usize> =
            foldhash::HashMap::with_capacity_and_hasher(spec.routes.len(), Default::default());
        let mut names: foldhash::HashMap<Cow<'_, str>, usize> = foldhash::HashMap::default();
        let routes = At::Root("routes");
        for (i, r) in spec.routes.iter().enumerate() {
            crate::pace::point();
            let host = r.host.as_deref().unwrap_or("*");
            let host = match host.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(host.to_ascii_lowercase()),
                false => Cow::Borrowed(host),
            };
            let path = match (&r.path, &r.path_prefix) {
                (Some(p), _) => (true, p.as_str()),
                (None, p) => (false, p.as_deref().unwrap_or("/")),
            };
            if let Some(first) = seen.insert((host, path.0, path.1), i) {
                self.error(
                    &routes.index(i),
                    format!("same host and path as routes[{first}], so it can never be chosen"),
                    "merge the two routes or change host or path",
                );
                // Its name's clash, if any, follows from this one.
                continue;
            }
            // Metrics count by name: two routes of one name would share their series.
            let name = match &r.name {
                Some(name) => Cow::Borrowed(name.as_str()),
                None => Cow::Owned(default_name(r)),
            };
            if let Some(first) = names.insert(name.clone(), i) {
                match r.name {
                    Some(_) => self.error(
                        &routes.index(i).field("name"),
                        format!("name \"{name}\" already used by routes[{first}]"),
                        "route names label metrics; make them unique",
                    ),
                    None => self.error(
                        &routes.index(i),
                        format!("its name in metrics, \"{name}\" (host and path), is routes[{first}]'s too"),
                        "give one of them a `name:` of its own",
                    ),
                }
            }
        }
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn is_host_port(s: &str) -> bool {
    match s.parse::<http::uri::Authority>() {
        Ok(a) => a.port_u16().is_some() && !a.host().is_empty() && !s.contains('@'),
        Err(_) => false,
    }
}

/// The name of a route without one: its host and path, as `*/api`.
fn default_name(spec: &RouteSpec) -> String {
    let host = spec.host.as_deref().unwrap_or("*");
    let path = spec.path.as_deref().or(spec.path_prefix.as_deref());
    format!("{host}{}", path.unwrap_or("/"))
}
