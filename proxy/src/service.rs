//! The per-request path: refuse ambiguous input, route with the table in force, forward,
//! count. Errors become HTTP responses in one place, [`failure`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use fleet_proxy_router::{Decision, Protocol, RequestView, RouteId, TrackId};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::body::{Body, Quiet, Short, Tee, TeeEnd, Watch, boxed, full};
use crate::conn::Conn;
use crate::framing::Verdict;
use crate::grpc::{self, Grpc};
use crate::mirror::Job;
use crate::mirror::compare::{Answering, Pair, Side};
use crate::state::{Active, Shared};
use crate::stats::Source;
use crate::upstream::{Failure, Outgoing, send};

pub(crate) mod headers;
mod tunnel;

use headers::Survey;
pub use headers::X_FLEET_MIRROR;

/// Takes a request: refuses ambiguous input, routes it, and forwards it. The work before
/// the backend is done here, at once; the future holds only what forwarding needs, so that
/// it stays small (it is moved into place for every request).
pub(crate) fn handle(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Forward, Box<Response<Body>>> {
    // The answer is boxed: it is rare, and the result is moved for every request.
    let started = Instant::now();
    // A reverse proxy has no tunnels to open: CONNECT is refused, not forwarded. The
    // connection closes: the raw framing scan reads no further than a CONNECT.
    if req.method() == Method::CONNECT {
        let resp = refuse_and_close(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
        return Err(Box::new(resp));
    }
    let survey = Survey::of(req.headers());
    let settled = survey
        .framing(req.headers(), req.version())
        .and_then(|()| survey.settle_host(&mut req));
    if let Err(reason) = settled {
        shared.stats.global.bad_requests.fetch_add(1, Relaxed);
        return Err(Box::new(bad_request(reason)));
    }
    if req.version() == Version::HTTP_2 {
        survey.join_cookies(req.headers_mut());
        // hyper's HTTP/1 server counts headers itself; its HTTP/2 server only bytes.
        if req.headers().len() > shared.settings.limits.max_headers {
            shared.stats.global.bad_requests.fetch_add(1, Relaxed);
            let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            return Err(Box::new(plain(status, "too many headers")));
        }
    }

    let active = shared.active();
    let Some(decision) = active
        .table
        .decide(&RequestView::of(&req), &mut || rand::random())
    else {
        shared.stats.global.no_route.fetch_add(1, Relaxed);
        return Err(Box::new(plain(StatusCode::NOT_FOUND, "no route")));
    };
    tracing::debug!(
        method = %req.method(),
        path = req.uri().path(),
        route = decision.route.index(),
        track = decision.track.index(),
        "routed"
    );
    let (out, client_upgrade, compared) = outgoing(shared, conn, &active, &decision, &survey, req);
    Ok(Forward {
        started,
        start: active.next_index(decision.track),
        tunnel: client_upgrade,
        conn: conn.forwarding(),
        grpc: survey.grpc,
        active,
        decision,
        out,
        compared,
        recorded: false,
    })
}

/// A routed request on its way to its track's backends.
pub(crate) struct Forward {
    started: Instant,
    active: Arc<Active>,
    decision: Decision,
    /// Where round robin starts.
    start: usize,
    out: Outgoing,
    /// For a request asking to switch protocols: the client's side of the switch, joined to
    /// the backend's once it answers 101.
    tunnel: Option<hyper::upgrade::OnUpgrade>,
    /// The client's connection: a tunnel holds it open, and a request dropped early counts
    /// against it ([`Conn::reset_early`]).
    conn: Arc<Conn>,
    /// A gRPC or gRPC-Web request: its answer's `grpc-status` is counted.
    grpc: Grpc,
    /// A mirrored request whose copy's answer is compared with this one's.
    compared: Option<Arc<Pair>>,
    /// The outcome is counted; until then, dropping it counts the client as gone.
    recorded: bool,
}

/// Counted for a request whose client went away (closed its connection, reset its stream)
/// before the answer, as nginx logs it. Never sent.
const CLIENT_CLOSED: u16 = 499;

impl Forward {
    fn record(&mut self, status: u16, upstream_failed: bool) {
        self.record_after(status, upstream_failed, self.started.elapsed());
    }

    fn record_after(&mut self, status: u16, upstream_failed: bool, took: std::time::Duration) {
        self.recorded = true;
        let (route, track) = (self.decision.route, self.decision.track);
        let counters = self.active.counters(route, track, Source::Primary);
        counters.record(status, upstream_failed, took);
    }
}

impl Drop for Forward {
    /// A request dropped before its answer still counts, with how long its client waited:
    /// cancelled requests are often the slow ones. One dropped soon after it began counts
    /// against its connection too (an HTTP/2 stream reset at once: `conn/resets.rs`).
    fn drop(&mut self) {
        if !self.recorded {
            let waited = self.started.elapsed();
            self.record_after(CLIENT_CLOSED, false, waited);
            self.conn.reset_early(waited);
        }
    }
}

impl Forward {
    /// Sends the request and shapes the response for the client.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` would copy `self` into its state a second time"
    )]
    pub(crate) fn run(
        mut self,
        shared: Arc<Shared>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        // A block, not an `async fn`: the fields are used in place, not copied into the
        // future's locals.
        async move {
            // Sent on by hyper's client, an HTTP/2 backend's request body must learn of a
            // cut of its client's stream (`conn::unread`): here, on the first poll, in the
            // stream's task.
            if self.out.http2 {
                self.out.body = self.out.body.take().map(crate::conn::tie_to_stream);
            }
            let (decision, active) = (&self.decision, &self.active);
            let track = active.table.track(decision.track);
            let sent = send(
                &shared.settings.upstream,
                active.backends(decision.track),
                self.start,
                track.name(),
                &mut self.out,
            )
            .await;
            let mut resp = match sent {
                Ok(resp) => resp,
                Err(f) => {
                    let resp = failure(&f);
                    self.record(resp.status().as_u16(), f.is_upstream());
                    return resp;
                }
            };
            self.record(resp.status().as_u16(), false);
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let grpc_answer = headers::strip_response(resp.headers_mut(), switched);
            if switched && let Some(client) = self.tunnel.take() {
                let conn = self.conn.clone();
                let (idle, send) = (
                    shared.settings.upstream.read_timeout,
                    shared.settings.limits.send_timeout,
                );
                tunnel::spawn(client, hyper::upgrade::on(&mut resp), conn, idle, send);
            }
            let (mut parts, body) = resp.into_parts();
            if let Some(cookie) = self.decision.set_cookie()
                && !sets_cookie_named(&parts.headers, cookie)
                && let Ok(cookie) = HeaderValue::from_str(cookie)
            {
                parts.headers.append(header::SET_COOKIE, cookie);
            }
            let idle = shared.settings.upstream.read_timeout;
            let (route, track) = (self.decision.route, self.decision.track);
            let series = self.active.counters(route, track, Source::Primary);
            // Most requests are not gRPC: they skip the look at the answer.
            let outcome = match self.grpc {
                Grpc::No => None,
                request => {
                    let ended = http_body::Body::is_end_stream(&body);
                    grpc::outcome(request, grpc_answer, &parts, ended, series)
                }
            };
            // A body its backend breaks off or stalls counts against the track, as a 5xx
            // would (a 5xx counts already): its head went out as a success. A gRPC answer
            // that breaks or stalls without its status counts among the gRPC errors instead:
            // its watch, outside the cut, sees the cut as an error.
            let series = series.clone();
            let (watched, failed) = (outcome.is_some(), parts.status.is_server_error());
            let on_cut = move |short: Short<'_>| {
                if let Short::Stalled = short {
                    let stalled = &shared.stats.global.responses_stalled;
                    stalled.fetch_add(1, Relaxed);
                }
                match short {
                    Short::Broken(e) if crate::upstream::Error::is_the_clients(e) => {}
                    _ if failed || watched => {}
                    _ => series.broke(),
                }
            };
            // `Quiet` gives the proxy's error type already: boxed as it is, without a layer
            // to convert its errors.
            let body = Quiet::new(body, idle, on_cut);
            let body = match outcome {
                None => Body::new(body),
                Some(on_trailers) => Body::new(grpc::watch(self.grpc, body, on_trailers)),
            };
            // The copy's answer is compared with this one once it is whole: at once, or once
            // its body has passed.
            let call = self.grpc == Grpc::Native;
            let answering = self
                .compared
                .take()
                .and_then(|pair| Answering::new(Side::Primary, pair, &parts, call));
            let body = match answering {
                None => body,
                Some(answering) => Body::new(Watch::new(body, answering)),
            };
            Response::from_parts(parts, body)
        }
    }
}

/// The request as the backend gets it: forwarding headers set, hop-by-hop ones gone, and
/// the body teed to the mirror when the decision samples it; and the client's side of a
/// protocol switch, when the request asks for one.
fn outgoing(
    shared: &Arc<Shared>,
    conn: &Conn,
    active: &Arc<Active>,
    decision: &Decision,
    survey: &Survey,
    mut req: Request<Incoming>,
) -> (
    Outgoing,
    Option<hyper::upgrade::OnUpgrade>,
    Option<Arc<Pair>>,
) {
    let protocol = active.table.track(decision.track).protocol();
    // A backend that speaks only HTTP/2 cannot switch an HTTP/1.1 connection: the request
    // goes to it without the `Upgrade`, which a server may ignore (RFC 9110 §7.8).
    let upgrade = survey.wants_upgrade(req.headers(), req.version()) && protocol != Protocol::H2c;
    let auto = protocol == Protocol::Auto;
    let http2 = match protocol {
        _ if upgrade => false,
        Protocol::Auto => req.version() == Version::HTTP_2,
        Protocol::Http1 => false,
        Protocol::H2c => true,
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if parts
        .uri
        .path_and_query()
        .is_some_and(|p| p.as_str().starts_with('?'))
    {
        parts.uri = with_root_path(&parts.uri);
    }
    headers::forwarded(&mut parts.headers, survey, conn, upgrade);
    // A body that has ended already (most GETs) is not boxed: there is nothing to send.
    let body = (!http_body::Body::is_end_stream(&body)).then(|| boxed(body));
    let retryable = idempotent(&parts.method) && body.is_none() && !upgrade;
    // A request that asks to switch protocols is not copied: a copy cannot be a tunnel.
    let (body, compared) = match decision.mirror {
        Some(to) if !upgrade => mirrored(shared, active, decision.route, to, http2, &parts, body),
        _ => (body, None),
    };
    let out = Outgoing {
        parts,
        body,
        http2,
        auto,
        retryable,
        upgrade,
        marked: false,
    };
    (out, client_upgrade, compared)
}

/// Offers a copy of the request to the mirror track: at once when it has no body, else once
/// its body has been read (a tee, up to the cap). The primary never waits for the mirror.
/// When the route compares the answers, the primary's side of the pair comes back with the
/// body.
fn mirrored(
    shared: &Arc<Shared>,
    active: &Arc<Active>,
    route: RouteId,
    to: TrackId,
    http2: bool,
    parts: &http::request::Parts,
    body: Option<Body>,
) -> (Option<Body>, Option<Arc<Pair>>) {
    let mirror_protocol = active.table.track(to).protocol();
    let auto = mirror_protocol == Protocol::Auto;
    let mirror_http2 = mirror_protocol == Protocol::H2c || (http2 && auto);
    let cap = shared.settings.mirror.max_body_bytes;
    if body
        .as_ref()
        .is_some_and(|b| http_body::Body::size_hint(b).lower() > cap as u64)
    {
        // Known to be too large (Content-Length): do not even copy it, nor compare.
        let skipped = &shared.stats.global.mirror_skipped_body_too_large;
        skipped.fetch_add(1, Relaxed);
        return (body, None);
    }
    let compare = active.table.route(route).mirror_compare();
    let pair = compare.map(|c| {
        let differences = shared.stats.differences.clone();
        Arc::new(Pair::new(c, active.clone(), route, to, parts, differences))
    });
    let job = {
        let (active, parts, pair) = (active.clone(), clone_parts(parts), pair.clone());
        move |body| Job {
            active,
            route,
            track: to,
            parts,
            body,
            http2: mirror_http2,
            auto,
            pair,
        }
    };
    let Some(body) = body else {
        shared.mirror.offer(shared, job(bytes::Bytes::new()));
        return (None, pair);
    };
    let shared = shared.clone();
    let tee = Tee::new(cap, move |end| match end {
        TeeEnd::Complete(bytes) => shared.mirror.offer(&shared, job(bytes)),
        TeeEnd::TooLarge => {
            let skipped = &shared.stats.global.mirror_skipped_body_too_large;
            skipped.fetch_add(1, Relaxed);
        }
        TeeEnd::Incomplete => {
            let skipped = &shared.stats.global.mirror_skipped_incomplete;
            skipped.fetch_add(1, Relaxed);
        }
    });
    (Some(boxed(Watch::new(body, tee))), pair)
}

/// `uri` with the `/` an absolute-form target may leave out before its query
/// (`http://a.test?x=1`), which the origin form sent on may not (RFC 9112 §3.2.1).
fn with_root_path(uri: &http::Uri) -> http::Uri {
    let mut parts = uri.clone().into_parts();
    let query = uri.path_and_query().map_or("", |p| p.as_str());
    parts.path_and_query = http::uri::PathAndQuery::try_from(format!("/{query}")).ok();
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The one place where an upstream failure becomes a response.
pub fn failure(f: &Failure) -> Response<Body> {
    match f {
        Failure::NoHealthyBackend(_) | Failure::Saturated(_) => {
            plain(StatusCode::SERVICE_UNAVAILABLE, &f.to_string())
        }
        Failure::Timeout => plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
        // As nginx answers it: no backend took the connection in time.
        Failure::Upstream(crate::upstream::Error::ConnectTimeout) => {
            plain(StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out")
        }
        Failure::Upstream(_) => plain(StatusCode::BAD_GATEWAY, "upstream failed"),
        Failure::ClientBody(crate::upstream::Error::ClientTooSlow) => {
            plain(StatusCode::REQUEST_TIMEOUT, "request body too slow")
        }
        Failure::ClientBody(_) => plain(StatusCode::BAD_REQUEST, "request body failed"),
    }
}

pub fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{text}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The raw bytes' verdict on an HTTP/1 request, taken when hyper hands the request over (before
/// anything can refuse it otherwise), so that verdicts and requests stay in step.
pub(crate) fn refused_by_scan(
    shared: &Shared,
    conn: &Conn,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    if req.version() == Version::HTTP_2 {
        return None;
    }
    let Some(Verdict::Refuse(reason)) = conn.seen.next() else {
        return None;
    };
    shared.stats.global.bad_requests.fetch_add(1, Relaxed);
    Some(bad_request(reason))
}

/// 400 and close: after a request we could not frame, nothing else on the connection is safe.
fn bad_request(reason: &str) -> Response<Body> {
    refuse_and_close(StatusCode::BAD_REQUEST, reason)
}

fn refuse_and_close(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = plain(status, reason);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Whether the backend's answer sets the cookie `ours` (`name=value; …`) would set: the
/// backend's choice stands (browsers keep the last of two), and the user keeps the bucket
/// it picked, as they would a cookie that came with the request.
fn sets_cookie_named(headers: &http::HeaderMap, ours: &str) -> bool {
    let name = ours.split('=').next().unwrap_or_default().as_bytes();
    headers.get_all(header::SET_COOKIE).iter().any(|set| {
        let set = set.as_bytes();
        let named = set.split(|b| *b == b'=').next().unwrap_or_default();
        named.trim_ascii() == name
    })
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}
