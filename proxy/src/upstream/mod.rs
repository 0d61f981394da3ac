//! Backends: round robin over healthy ones, retries, passive ejection. The connections
//! themselves are in [`pool`].

mod backend;
mod h1;
mod h2;
mod pool;
mod probe;
mod upload;

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use http::{Request, Response, Uri, Version};

use backend::Trial;
pub use backend::{Backend, Health};
pub use h1::Answers;
pub use pool::UpstreamBody;

use crate::body::Body;
use crate::config::Upstream;

/// Why no response came from any backend; each maps to one status in `service::failure`.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no healthy backend for track {0}")]
    NoHealthyBackend(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream failed: {0}")]
    Upstream(#[source] Error),
    /// The client's request body failed (an upload given up, a stream reset) or was still
    /// arriving at the deadline, before the backend answered: no fault of the backend's.
    #[error("the request body failed: {0}")]
    ClientBody(#[source] Error),
    /// Every backend tried had `max_connections_per_backend` in use until the deadline.
    #[error("every connection to track {0} is in use")]
    Saturated(String),
}

impl Failure {
    /// The backend side failed, as opposed to the client.
    pub fn is_upstream(&self) -> bool {
        !matches!(self, Failure::ClientBody(_))
    }
}

/// Why one try at one backend failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("backend connection failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("backend closed the connection before the response ended")]
    Closed,
    #[error("bad response from backend: {0}")]
    Protocol(&'static str),
    /// An answer received and refused for what it says ([`h1::Bad::Refused`]): the endpoint's,
    /// not the backend failing.
    #[error("response refused: {0}")]
    Refused(&'static str),
    #[error("request body failed: {0}")]
    Body(#[source] crate::body::BoxError),
    #[error("no response head before the try's deadline")]
    TimedOut,
    /// The deadline came while the request body was still arriving from the client.
    #[error("the request body was still arriving at the deadline")]
    ClientTooSlow,
    /// At `max_connections_per_backend`, none came free before the try's deadline: the
    /// backend is busy, not failing.
    #[error("every connection to the backend is in use")]
    Saturated,
}

impl From<h1::Bad> for Error {
    fn from(bad: h1::Bad) -> Self {
        match bad {
            h1::Bad::Garbled(why) => Error::Protocol(why),
            h1::Bad::Refused(why) => Error::Refused(why),
        }
    }
}

impl Error {
    /// Whether a response body's error is the client's request body failing (our HTTP/1.1
    /// client reports it through the response it streams beside), not the backend's doing.
    pub fn is_the_clients(e: &crate::body::BoxError) -> bool {
        matches!(e.downcast_ref::<Error>(), Some(Error::Body(_)))
    }
}

/// A request to send, kept as parts so that a retry can rebuild it.
pub struct Outgoing {
    pub parts: http::request::Parts,
    pub body: Option<Body>,
    pub http2: bool,
    /// HTTP/2 only because the client spoke it (`protocol: auto`): a backend that speaks
    /// only HTTP/1.1 gets that instead.
    pub auto: bool,
    /// Idempotent and without a body: may be sent again after a failure before the response.
    pub retryable: bool,
    /// Asks to switch protocols (`Upgrade`): it goes through hyper's client, which hands the
    /// connection over to the tunnel.
    pub upgrade: bool,
    /// A mirrored copy: it goes out with `x-fleet-mirror: 1`, added as the request is
    /// written rather than to `parts`, whose header map has no room left for it (making
    /// room rehashes the map: a thousand instructions per copy).
    pub marked: bool,
}

/// Sends the request to the track's backends, round robin from `start`, skipping ejected
/// ones; retries when `retryable`, or when a try sent nothing (no connection could be had)
/// and the request is still whole; never once response headers arrived.
pub async fn send(
    cfg: &Upstream,
    backends: &[Arc<Backend>],
    start: usize,
    track: &str,
    out: &mut Outgoing,
) -> Result<Response<UpstreamBody>, Failure> {
    // The clock is read once for the first try: the request timeout and the per-try timeout
    // both count from here.
    let now = Instant::now();
    let deadline = now + cfg.request_timeout;
    let tries = cfg.retries.saturating_add(1);
    let mut failure = None;
    for attempt in 0..tries {
        let had_body = out.body.is_some();
        let from = start + attempt as usize;
        let (backend, mut trial) = match pick(backends, from) {
            Some(backend) => (backend, None),
            None => match pick_trial(backends, from, cfg) {
                Some((backend, trial)) => (backend, Some(trial)),
                // A try before may have ejected the last one, or been its trial: its failure
                // is the answer.
                None => {
                    return Err(
                        failure.unwrap_or_else(|| Failure::NoHealthyBackend(track.to_string()))
                    );
                }
            },
        };
        // Without retries, a try has the whole request timeout. Its length from its start is
        // what an upload that moves has again from its last move.
        let at = if attempt == 0 { now } else { Instant::now() };
        let this_try = match out.retryable && cfg.retries > 0 {
            true => deadline.min(at + cfg.per_try_timeout),
            false => deadline,
        };
        let span = this_try.saturating_duration_since(at);
        let http2 = match out.http2 && out.auto {
            false => Ok(Some(out.http2)),
            // Boxed, as below: asking is rare.
            true => Box::pin(http2_for(backend, cfg, this_try)).await,
        };
        // It closed on the question without a word: this try goes over HTTP/1.1, and if it
        // is answered, the backend is taken to speak only that.
        let silent = matches!(http2, Ok(None));
        let http2 = http2.map(|spoken| spoken.unwrap_or(false));
        let over_http2 = matches!(http2, Ok(true));
        let sent = match http2 {
            Err(e) => Err(e),
            // HTTP/1.1 goes out on fleet-proxy's own client, but for switching protocols; the
            // rest on hyper's. (CONNECT never comes here: the service refuses it.)
            Ok(false) if !out.upgrade => h1::request(
                backend,
                &out.parts,
                out.marked,
                &mut out.body,
                cfg.connect_timeout,
                (this_try, deadline, span),
            )
            .await
            .map(|resp| resp.map(UpstreamBody::Own)),
            Ok(http2) => {
                // The headers are moved, not copied, into a try no other can follow: the
                // last, or one that takes a body it cannot give back.
                let last = attempt + 1 == tries || (!out.retryable && out.body.is_some());
                let (req, upload) = build(out, backend, http2, last)?;
                let sending = pool::request(backend, req, http2, cfg.connect_timeout);
                // Boxed: rare, and its state would make every request's future larger.
                let sent =
                    Box::pin(moving_deadline(sending, this_try, span, upload.as_deref())).await;
                // hyper reports the body's failure as its own, and a deadline falls on
                // whichever side was slow: what the body saw tells them apart.
                sent.map_err(|e| match upload {
                    Some(seen) if seen.failed() => Error::Body(e.into()),
                    // The backend had all the client had sent, and asked for more.
                    Some(seen) if matches!(e, Error::TimedOut) && seen.waits_for_the_client() => {
                        Error::ClientTooSlow
                    }
                    _ => e,
                })
            }
        };
        let e = match sent {
            Ok(resp) => {
                if silent {
                    backend.heard_http2(false);
                }
                if backend.answered(resp.status(), cfg)
                    && let Some(trial) = trial.take()
                {
                    trial.passed();
                }
                return Ok(resp);
            }
            Err(e) => e,
        };
        // Nothing went out: no connection was had (refused, timed out, none free).
        let unsent = matches!(
            e,
            Error::Connect(_) | Error::ConnectTimeout | Error::Saturated
        ) && (out.body.is_some() || !had_body)
            && !out.upgrade;
        match e {
            e @ (Error::Body(_) | Error::ClientTooSlow) => return Err(Failure::ClientBody(e)),
            // Busy, not failing: no count towards ejection; the next try goes elsewhere.
            Error::Saturated => failure = Some(Failure::Saturated(track.to_string())),
            Error::TimedOut => {
                backend.failed(cfg);
                failure = Some(Failure::Timeout);
            }
            // An answer received and refused (a head over the limits, an unknown coding,
            // lengths that differ) is the endpoint's, not the backend failing: asking again
            // would run its handler again for the same answer, and counting it would eject a
            // backend that serves every other path. One 502, as nginx (`invalid_header` is
            // neither retried nor counted by default).
            e @ Error::Refused(_) => {
                tracing::debug!(backend = %backend.addr, error = %e, attempt, "upstream answer refused");
                return Err(Failure::Upstream(e));
            }
            e => {
                tracing::debug!(backend = %backend.addr, error = %e, attempt, "upstream try failed");
                if out.auto && (over_http2 || silent) {
                    // It may have stopped speaking HTTP/2: ask again next time.
                    backend.forget_http2();
                }
                backend.failed(cfg);
                failure = Some(Failure::Upstream(e));
            }
        }
        // No time for another try: the last one's failure is the answer (a reset or a bad
        // answer after an upload that ran past the deadline is the backend's `502`).
        if Instant::now() >= deadline {
            return Err(failure.unwrap_or(Failure::Timeout));
        }
        if !out.retryable && !unsent {
            break;
        }
    }
    Err(failure.unwrap_or_else(|| Failure::NoHealthyBackend(track.to_string())))
}

/// Whether a try under `protocol: auto`, for a client speaking HTTP/2, goes over HTTP/2: if
/// the backend speaks it, asked once ([`probe::http2`]). `None`: it closed on the question.
async fn http2_for(
    backend: &Backend,
    cfg: &Upstream,
    this_try: Instant,
) -> Result<Option<bool>, Error> {
    if let Some(known) = backend.speaks_http2() {
        return Ok(Some(known));
    }
    // One asks; those that waited take its answer, or ask in turn if it could not get one.
    let asking = tokio::time::timeout_at(this_try, backend.asking_http2.lock());
    let _asking = asking.await.map_err(|_| Error::TimedOut)?;
    if let Some(known) = backend.speaks_http2() {
        return Ok(Some(known));
    }
    let spoken = probe::http2(backend, cfg.connect_timeout, this_try).await?;
    match spoken {
        Some(spoken) => backend.heard_http2(spoken),
        // Those that come while this try finds out take it to speak HTTP/1.1 too, rather
        // than ask again each.
        None => backend.heard_silence(),
    }
    Ok(spoken)
}

/// The first healthy backend, round robin from `start`; past one at its cap on connections
/// to the next that has room, if any, rather than wait.
pub fn pick(backends: &[Arc<Backend>], start: usize) -> Option<&Arc<Backend>> {
    let mut healthy = (0..backends.len())
        .map(|i| &backends[(start + i) % backends.len()])
        .filter(|b| b.healthy());
    let first = healthy.next()?;
    if first.pool.has_room() {
        return Some(first);
    }
    Some(healthy.find(|b| b.pool.has_room()).unwrap_or(first))
}

/// When [`pick`] finds none: an ejected backend's trial request, if one is due
/// ([`Backend::trial`]), round robin from `start`.
fn pick_trial<'a>(
    backends: &'a [Arc<Backend>],
    start: usize,
    cfg: &Upstream,
) -> Option<(&'a Arc<Backend>, Trial<'a>)> {
    (0..backends.len())
        .map(|i| &backends[(start + i) % backends.len()])
        .find_map(|b| Some((b, b.trial(cfg)?)))
}

/// Sends mirrored copies, each with its whole body, to one backend pipelined on one
/// connection ([`h1::pipeline`]). The backend's passive health counts each answer as
/// [`send`] does, and a connection that failed once. With `digests`, each answer's body is
/// digested.
pub async fn pipeline(
    cfg: &Upstream,
    backend: &Backend,
    copies: &[(&http::request::Parts, &[u8])],
    deadline: Instant,
    digests: bool,
) -> Answers {
    let connect = cfg.connect_timeout;
    let answers = h1::pipeline(backend, copies, true, connect, deadline, digests).await;
    let whole = answers.statuses.iter().map(|(status, ..)| status);
    let cut = answers.cut.iter().map(|(status, _)| status);
    for status in whole.chain(cut) {
        backend.answered(*status, cfg);
    }
    if let Some(e) = &answers.failed {
        tracing::debug!(backend = %backend.addr, error = %e, "mirrored copies failed");
        // An answer still coming at the deadline is the mirror's cut, as on a connection
        // of its own, not the backend's failure.
        let cut = answers.cut.is_some() && matches!(e, Error::TimedOut);
        if !matches!(e, Error::Saturated | Error::Refused(_)) && !cut {
            backend.failed(cfg);
        }
    }
    answers
}

/// `sending`, unless `deadline` comes first; an upload that moved since (the sender took more
/// of the body) has the try's time again from its last move, as on fleet-proxy's own client.
async fn moving_deadline<T>(
    sending: impl Future<Output = Result<T, Error>>,
    deadline: Instant,
    span: Duration,
    upload: Option<&upload::Seen>,
) -> Result<T, Error> {
    let mut sending = std::pin::pin!(sending);
    let mut deadline = deadline;
    loop {
        match tokio::time::timeout_at(deadline, sending.as_mut()).await {
            Ok(sent) => return sent,
            Err(_) => match upload.and_then(upload::Seen::moved) {
                Some(moved) if moved + span > deadline => deadline = moved + span,
                _ => return Err(Error::TimedOut),
            },
        }
    }
}

/// The `:authority` an HTTP/2 backend gets: the host routing used, as an HTTP/1.1 backend
/// reads it in `Host` (`settle_host` made the two agree). The backend's own address only
/// when there is none, as for a request without one from an HTTP/1.0 client.
fn authority(parts: &http::request::Parts, backend: &Backend) -> Option<http::uri::Authority> {
    let host = || {
        let host = parts.headers.get(http::header::HOST)?;
        http::uri::Authority::try_from(host.as_bytes()).ok()
    };
    (parts.uri.authority().cloned())
        .or_else(host)
        .or_else(|| backend.authority.clone())
}

/// The request for one try; the last try takes the headers instead of copying them. With a
/// body comes what its sending shows of the client ([`upload::Seen`]).
fn build(
    out: &mut Outgoing,
    backend: &Backend,
    http2: bool,
    last: bool,
) -> Result<(Request<Body>, Option<Arc<upload::Seen>>), Failure> {
    let path = out
        .parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = match http2 {
        // HTTP/1.1 sends the origin form; the backend reads the host from `Host`.
        false => Uri::from(path),
        // HTTP/2 sends `:scheme` and `:authority`, taken from an absolute URI.
        true => {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = authority(&out.parts, backend);
            uri.path_and_query = Some(path);
            Uri::from_parts(uri).map_err(|_| Failure::NoHealthyBackend(backend.addr.clone()))?
        }
    };
    let (body, seen) = match out.body.take() {
        Some(body) => {
            let (upload, seen) = upload::Upload::new(body);
            (Body::new(upload), Some(seen))
        }
        None => (crate::body::empty(), None),
    };
    let mut req = Request::new(body);
    *req.method_mut() = out.parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = match last {
        true => std::mem::take(&mut out.parts.headers),
        false => out.parts.headers.clone(),
    };
    if http2 {
        req.headers_mut().remove(http::header::HOST);
    }
    if out.marked {
        let mark = http::HeaderValue::from_static("1");
        req.headers_mut()
            .insert(crate::service::X_FLEET_MIRROR, mark);
    }
    Ok((req, seen))
}
