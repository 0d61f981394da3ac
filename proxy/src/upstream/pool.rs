//! Connections to one backend, kept for reuse. HTTP/1: idle connections, newest first; a
//! connection goes back once its response body has been read to the end. HTTP/2: one
//! connection that every request multiplexes on.
//!
//! A pooled connection may have been closed by the backend since it was last used. hyper then
//! hands the request back unsent (`try_send_request`) and it goes out on another connection,
//! so a stale connection costs no request a retry, idempotent or not.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::backend::Backend;
use crate::body::Body;
use crate::lock;

/// Idle HTTP/1 connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a connection whose response has ended may take to accept the next request.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<VecDeque<(Instant, http1::SendRequest<Body>)>>,
    /// Idle HTTP/1 connections kept; more are closed.
    max_idle: usize,
    http2: Mutex<Option<http2::SendRequest<Body>>>,
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
}

impl Pool {
    pub fn new(max_idle: usize) -> Self {
        Pool {
            idle: Mutex::default(),
            max_idle,
            http2: Mutex::default(),
        }
    }

    /// The newest idle connection that is still open. Age is left to [`Pool::sweep`], which
    /// runs every second: no clock is read per request.
    fn take(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        while let Some((_, tx)) = idle.pop_back() {
            if tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    fn put(&self, tx: http1::SendRequest<Body>) {
        let mut idle = lock(&self.idle);
        if idle.len() >= self.max_idle {
            // The oldest goes: the newest are the likeliest to be alive.
            idle.pop_front();
        }
        idle.push_back((Instant::now(), tx));
    }

    /// Closes idle connections that the backend closed or that waited `IDLE_TIMEOUT`.
    pub fn sweep(&self) {
        let now = Instant::now();
        lock(&self.idle)
            .retain(|(since, tx)| !tx.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT);
        let mut http2 = lock(&self.http2);
        if http2.as_ref().is_some_and(|tx| tx.is_closed()) {
            *http2 = None;
        }
    }
}

/// Sends `req` to `backend`, on a pooled connection when one is ready, else on a new one.
pub async fn request(
    backend: &Arc<Backend>,
    req: Request<Body>,
    http2: bool,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    match http2 {
        // Boxed, as HTTP/2 is the rarer protocol to backends and its state is larger.
        true => Box::pin(request_http2(backend, req, connect_timeout)).await,
        false => request_http1(backend, req, connect_timeout).await,
    }
}

async fn request_http1(
    backend: &Arc<Backend>,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    while let Some(mut tx) = backend.pool.take() {
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(UpstreamBody::returning(resp, backend, tx)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(e.into_error().into()),
            },
        }
    }
    // Boxed: connecting is rare next to reuse, and its state would otherwise make every
    // request's future larger, to be copied on every move.
    Box::pin(connect_http1(backend, req, connect_timeout)).await
}

async fn connect_http1(
    backend: &Arc<Backend>,
    req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    let io = connect(backend, connect_timeout).await?;
    let (mut tx, conn) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    let resp = tx.send_request(req).await?;
    Ok(UpstreamBody::returning(resp, backend, tx))
}

async fn request_http2(
    backend: &Arc<Backend>,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    let shared = lock(&backend.pool.http2)
        .clone()
        .filter(|tx| !tx.is_closed());
    if let Some(mut tx) = shared {
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(UpstreamBody::plain)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(e.into_error().into()),
            },
        }
    }
    let io = connect(backend, connect_timeout).await?;
    let (mut tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    // Requests racing here may each open one; the last stays shared, the others end with
    // their streams.
    *lock(&backend.pool.http2) = Some(tx.clone());
    Ok(tx.send_request(req).await?.map(UpstreamBody::plain))
}

async fn connect(backend: &Backend, timeout: Duration) -> Result<TokioIo<TcpStream>, Error> {
    let connecting = async {
        match backend.socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(backend.addr.as_str()).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| Error::ConnectTimeout)?
        .map_err(Error::Connect)?;
    stream.set_nodelay(true).map_err(Error::Connect)?;
    Ok(TokioIo::new(stream))
}

/// A backend's response body. An HTTP/1 connection goes back to its pool when the body has
/// been read to its end; one dropped earlier is closed, as it is mid-response.
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<(Arc<Backend>, http1::SendRequest<Body>)>,
}

impl UpstreamBody {
    fn plain(inner: Incoming) -> Self {
        UpstreamBody { inner, back: None }
    }

    fn returning(
        resp: Response<Incoming>,
        backend: &Arc<Backend>,
        tx: http1::SendRequest<Body>,
    ) -> Response<Self> {
        let (parts, inner) = resp.into_parts();
        let mut body = UpstreamBody {
            inner,
            back: Some((backend.clone(), tx)),
        };
        // No body to read (HEAD, 204, 304, `Content-Length: 0`): done already.
        if hyper::body::Body::is_end_stream(&body.inner) {
            body.release();
        }
        Response::from_parts(parts, body)
    }

    fn release(&mut self) {
        let Some((backend, mut tx)) = self.back.take() else {
            return;
        };
        if tx.is_ready() {
            backend.pool.put(tx);
        } else if !tx.is_closed() {
            // The connection task has not yet seen the end of the exchange.
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_TIMEOUT, tx.ready()).await {
                    backend.pool.put(tx);
                }
            });
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // An error: the connection is not reused.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
