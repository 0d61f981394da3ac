//! Connections to one backend, kept for reuse. HTTP/1.1: idle connections of fleet-proxy's
//! own client ([`super::h1`]), newest first; a connection goes back once its response body
//! has been read to the end. HTTP/2: connections of hyper's client that requests multiplex on
//! ([`super::h2`]). A request that asks to switch protocols (WebSocket and other upgrades)
//! goes through hyper's HTTP/1.1 client, which hands the connection over to the tunnel; that
//! connection never comes back.
//!
//! A pooled connection may have been closed by the backend since it was last used. One whose
//! close has arrived is passed over when it is taken ([`h1::Conn::looks_open`]), so that
//! such a connection costs no request a retry, idempotent or not.

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::Backend;
use super::{Error, h1};
use crate::body::Body;
use crate::lock;

/// Idle HTTP/1.1 connections are closed after this many sweeps (one a second: 90 s) rather
/// than reused.
const IDLE_SWEEPS: u64 = 90;

#[derive(Debug)]
pub struct Pool {
    /// Idle HTTP/1.1 connections, newest last, each with the sweep it went idle after.
    idle: Mutex<VecDeque<(u64, h1::Conn)>>,
    /// Sweeps so far: the pool's clock, so that no clock is read per request.
    sweeps: AtomicU64,
    /// Idle HTTP/1.1 connections kept; more are closed.
    max_idle: usize,
    /// HTTP/1.1 connections of fleet-proxy's own client open, idle or in use.
    open: Arc<Open>,
    /// How many of them are idle, as of the last change to `idle`.
    idle_len: AtomicUsize,
    pub(super) http2: super::h2::Connections,
}

/// The count of open connections against `max_connections_per_backend`, and the requests
/// waiting for one to come free.
#[derive(Debug)]
struct Open {
    count: AtomicUsize,
    cap: usize,
    waiting: AtomicUsize,
    freed: Notify,
}

impl Open {
    /// Room for one more connection, taken at once if there is any.
    fn slot(self: &Arc<Self>) -> Option<Slot> {
        self.count
            .fetch_update(SeqCst, SeqCst, |n| (n < self.cap).then_some(n + 1))
            .ok()?;
        Some(Slot(self.clone()))
    }

    /// A connection went back to the pool or closed: a request waiting for one may go on.
    fn free(&self) {
        if self.waiting.load(SeqCst) > 0 {
            self.freed.notify_one();
        }
    }
}

/// One open connection's place under the cap; given back when the connection closes.
#[derive(Debug)]
pub(super) struct Slot(Arc<Open>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, SeqCst);
        self.0.free();
    }
}

/// What a request that found no idle connection may use.
pub(super) enum Room {
    /// One came back while it waited.
    Idle(h1::Conn),
    /// A connection of its own may be opened.
    New(Slot),
}

impl Pool {
    pub fn new(max_idle: usize, max_open: usize) -> Self {
        Pool {
            idle: Mutex::default(),
            sweeps: AtomicU64::new(0),
            max_idle,
            open: Arc::new(Open {
                count: AtomicUsize::new(0),
                cap: max_open,
                waiting: AtomicUsize::new(0),
                freed: Notify::new(),
            }),
            idle_len: AtomicUsize::new(0),
            http2: super::h2::Connections::default(),
        }
    }

    /// Whether a request could have a connection at once: an idle one, or room to open one.
    #[inline]
    pub(super) fn has_room(&self) -> bool {
        let open = &self.open;
        open.cap == usize::MAX || open.count.load(Relaxed) < open.cap + self.idle_len.load(Relaxed)
    }

    /// An idle connection, unless requests are waiting for one: they go first.
    #[inline]
    pub(super) fn take_unless_awaited(&self) -> Option<h1::Conn> {
        match self.open.waiting.load(Relaxed) {
            0 => self.take(),
            _ => None,
        }
    }

    /// Room for a new connection at once, or, at `max_connections_per_backend`, the first
    /// connection to come back or place to come free by `deadline`, in the order the
    /// requests came.
    pub(super) async fn room(&self, deadline: Instant) -> Result<Room, Error> {
        if self.open.waiting.load(SeqCst) == 0
            && let Some(slot) = self.open.slot()
        {
            return Ok(Room::New(slot));
        }
        let ahead = self.open.waiting.fetch_add(1, SeqCst);
        let _waiting = Waiting(&self.open);
        // With none ahead, a connection may have come back or closed since the look above
        // with no one told (`Open::free` tells only when someone waits): look again. With
        // some ahead, each that comes free is told, to the first in line (tokio's `Notify`
        // wakes waiters in order, and keeps a wake-up that found none for the next).
        let mut look = ahead == 0;
        loop {
            let mut freed = pin!(self.open.freed.notified());
            freed.as_mut().enable();
            if look {
                if let Some(conn) = self.take() {
                    return Ok(Room::Idle(conn));
                }
                if let Some(slot) = self.open.slot() {
                    return Ok(Room::New(slot));
                }
            }
            look = true;
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Error::Saturated);
            }
        }
    }

    /// The newest idle connection that still looks open; the others on the way are closed.
    /// Age is left to [`Pool::sweep`].
    pub(super) fn take(&self) -> Option<h1::Conn> {
        let mut idle = lock(&self.idle);
        let mut taken = None;
        while let Some((_, conn)) = idle.pop_back() {
            if conn.looks_open() {
                taken = Some(conn);
                break;
            }
        }
        self.idle_len.store(idle.len(), Relaxed);
        taken
    }

    #[inline]
    pub(super) fn put(&self, conn: h1::Conn) {
        if self.max_idle == 0 {
            // None kept (`max_idle_per_backend: 0`): dropped, the connection closes and gives
            // its place back.
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() >= self.max_idle {
            // The oldest goes: the newest are the likeliest to be alive.
            idle.pop_front();
        }
        idle.push_back((self.sweeps.load(Relaxed), conn));
        self.idle_len.store(idle.len(), Relaxed);
        drop(idle);
        self.open.free();
    }

    /// Closes idle connections that the backend closed or that waited `IDLE_SWEEPS`; runs
    /// every second.
    pub fn sweep(&self) {
        let now = self.sweeps.fetch_add(1, Relaxed) + 1;
        let mut idle = lock(&self.idle);
        idle.retain(|(since, conn)| now - since < IDLE_SWEEPS && conn.looks_open());
        self.idle_len.store(idle.len(), Relaxed);
        drop(idle);
        self.http2.sweep();
    }
}

/// Takes a request off the count of those waiting for room, however its wait ends.
struct Waiting<'a>(&'a Open);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, SeqCst);
    }
}

/// Sends `req` through hyper's client: over HTTP/2, or over HTTP/1.1 when it asks to switch
/// protocols.
pub async fn request(
    backend: &Arc<Backend>,
    req: Request<Body>,
    http2: bool,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    match http2 {
        true => {
            let resp = super::h2::request(backend, req, connect_timeout).await?;
            Ok(resp.map(|(body, place)| UpstreamBody::Http2(body, place)))
        }
        false => request_upgrade(backend, req, connect_timeout).await,
    }
}

/// On an idle connection if one looks open, else on a new one; hyper drives it from here on.
async fn request_upgrade(
    backend: &Arc<Backend>,
    req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, Error> {
    let io = match backend.pool.take() {
        Some(conn) => conn.into_io(),
        None => connect(backend, connect_timeout).await?,
    };
    let (mut tx, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgraded upstream connection ended");
        }
    });
    Ok(tx.send_request(req).await?.map(UpstreamBody::Hyper))
}

pub(super) async fn connect(backend: &Backend, timeout: Duration) -> Result<TcpStream, Error> {
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
    Ok(stream)
}

/// A backend's response body, from either client.
#[derive(Debug)]
pub enum UpstreamBody {
    Own(h1::ResponseBody),
    Hyper(Incoming),
    /// With the stream's place on its connection, given back when the body goes.
    Http2(Incoming, super::h2::Place),
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.get_mut() {
            UpstreamBody::Own(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Hyper(body) | UpstreamBody::Http2(body, _) => {
                Pin::new(body).poll_frame(cx).map_err(Error::Http)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Own(body) => body.is_end_stream(),
            UpstreamBody::Hyper(body) | UpstreamBody::Http2(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Own(body) => body.size_hint(),
            UpstreamBody::Hyper(body) | UpstreamBody::Http2(body, _) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn at_the_cap_a_request_waits_for_a_place_to_come_free_until_its_deadline() {
        let pool = Arc::new(Pool::new(4, 1));
        let soon = || Instant::now() + Duration::from_secs(5);
        let Ok(Room::New(held)) = pool.room(soon()).await else {
            panic!("no room under the cap");
        };
        // Full: a wait that runs out says so.
        let short = Instant::now() + Duration::from_millis(20);
        assert!(matches!(pool.room(short).await, Err(Error::Saturated)));
        // A waiter goes on once the place is given back.
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { matches!(pool.room(soon()).await, Ok(Room::New(_))) }
        });
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(pool.open.count.load(SeqCst), 0);
        assert_eq!(pool.open.waiting.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn without_a_cap_there_is_always_room() {
        let pool = Pool::new(4, usize::MAX);
        let mut held = Vec::new();
        for _ in 0..1000 {
            let Ok(Room::New(slot)) = pool.room(Instant::now()).await else {
                panic!("no room without a cap");
            };
            held.push(slot);
        }
        assert_eq!(pool.open.count.load(SeqCst), 1000);
        drop(held);
        assert_eq!(pool.open.count.load(SeqCst), 0);
    }
}
