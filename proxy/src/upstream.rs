//! Backends: pooled clients, round robin over healthy backends, retries, passive ejection.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::Upstream;

/// Process start, the origin of the millisecond clock that ejections use.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One backend address and its passive health, shared by every table that names it.
#[derive(Debug)]
pub struct Backend {
    pub addr: String,
    /// `addr` parsed once; `None` only for an address the table check would have refused.
    authority: Option<http::uri::Authority>,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
}

impl Backend {
    pub fn new(addr: &str) -> Self {
        Backend {
            addr: addr.to_string(),
            authority: addr.parse().ok(),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    pub fn healthy(&self) -> bool {
        self.ejected_until_ms.load(Relaxed) <= now_ms()
    }

    fn succeeded(&self) {
        self.failures.store(0, Relaxed);
    }

    fn failed(&self, cfg: &Upstream) {
        if self.failures.fetch_add(1, Relaxed) + 1 >= cfg.eject_after {
            self.failures.store(0, Relaxed);
            let until = now_ms()
                .saturating_add(u64::try_from(cfg.eject_for.as_millis()).unwrap_or(u64::MAX));
            self.ejected_until_ms.store(until, Relaxed);
            tracing::warn!(backend = %self.addr, "backend ejected after consecutive failures");
        }
    }
}

pub struct Clients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
    pub cfg: Upstream,
}

impl Clients {
    pub fn new(cfg: &Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let http1 = builder.clone().build(connector.clone());
        let http2 = builder.http2_only(true).build(connector);
        Clients {
            http1,
            http2,
            cfg: cfg.clone(),
        }
    }
}

/// Why no response came from any backend; each maps to one status in `service::failure`.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no healthy backend for track {0}")]
    NoHealthyBackend(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream failed: {0}")]
    Upstream(#[source] hyper_util::client::legacy::Error),
}

/// A request to send, kept as parts so that a retry can rebuild it.
pub struct Outgoing {
    pub parts: http::request::Parts,
    pub body: Option<Body>,
    pub http2: bool,
    /// Idempotent and without a body: may be sent again after a failure before the response.
    pub retryable: bool,
}

/// Sends the request to the track's backends, round robin from `start`, skipping ejected
/// ones; retries only when `retryable`, and never once response headers arrived.
pub async fn send(
    clients: &Clients,
    backends: &[Arc<Backend>],
    start: usize,
    track: &str,
    mut out: Outgoing,
) -> Result<Response<Incoming>, Failure> {
    let cfg = &clients.cfg;
    let deadline = Instant::now() + cfg.request_timeout;
    let tries = if out.retryable { cfg.retries + 1 } else { 1 };
    let mut last = None;
    for attempt in 0..tries {
        let healthy = (0..backends.len())
            .map(|i| &backends[(start + attempt as usize + i) % backends.len()])
            .find(|b| b.healthy());
        let Some(backend) = healthy else {
            return Err(Failure::NoHealthyBackend(track.to_string()));
        };
        let req = build(&mut out, backend, attempt + 1 == tries)?;
        let client = if out.http2 {
            &clients.http2
        } else {
            &clients.http1
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = if out.retryable {
            left.min(cfg.per_try_timeout)
        } else {
            left
        };
        match tokio::time::timeout(limit, client.request(req)).await {
            Ok(Ok(resp)) => {
                match resp.status().as_u16() {
                    502..=504 => backend.failed(cfg),
                    _ => backend.succeeded(),
                }
                return Ok(resp);
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = %backend.addr, error = %e, attempt, "upstream try failed");
                backend.failed(cfg);
                last = Some(Failure::Upstream(e));
            }
            Err(_) => {
                backend.failed(cfg);
                last = Some(Failure::Timeout);
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure::Timeout);
        }
    }
    Err(last.unwrap_or_else(|| Failure::NoHealthyBackend(track.to_string())))
}

/// The request for one try; the last try takes the headers instead of copying them.
fn build(out: &mut Outgoing, backend: &Backend, last: bool) -> Result<Request<Body>, Failure> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = backend.authority.clone();
    uri.path_and_query = Some(
        out.parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri).map_err(|_| Failure::NoHealthyBackend(backend.addr.clone()))?;
    let body = match out.body.take() {
        Some(body) => body,
        None => crate::body::empty(),
    };
    let mut req = Request::new(body);
    *req.method_mut() = out.parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if out.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = match last {
        true => std::mem::take(&mut out.parts.headers),
        false => out.parts.headers.clone(),
    };
    if out.http2 {
        req.headers_mut().remove(http::header::HOST);
    }
    Ok(req)
}
