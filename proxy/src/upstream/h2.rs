//! HTTP/2 connections to one backend, through hyper's client: requests multiplex on a
//! connection until it carries [`STREAMS_PER_CONNECTION`] of them, then another is opened.
//!
//! One connection for everything held two ways to stall a backend's whole traffic. A backend
//! allows so many streams at once (`SETTINGS_MAX_CONCURRENT_STREAMS`: 100 in Tomcat and
//! Apache, 128 in nginx, 200 in hyper, 250 in Go); long gRPC or SSE streams that fill them
//! left every other request waiting inside hyper until its deadline, counted against the
//! backend, which was then ejected though healthy. And flow control: data a slow client has
//! not taken yet keeps its share of the connection's window, which, smaller than the streams'
//! windows together, let a few slow downloads stop every response on the connection. So a
//! connection carries at most 100 of our streams, the floor of common servers' limits, and its
//! window is as large as 100 streams' windows, so that no stream waits for another's reader.
//! (RFC 9113 §5.1.2, §6.9.) One request at a time opens a connection, the others waiting for
//! a place on it, so that a burst to a backend with none opens one, not one per request; a
//! sweep closes connections beyond the first once they carry no stream.
//!
//! A request waits for another's open at most `connect_timeout`, and then fails as a connect
//! that timed out would (nothing was sent: another backend may take it).
//!
//! Keep-alive pings go out only after [`PING_AFTER`] without a frame from the backend, idle
//! connections included, so that one a NAT or a vanished host dropped without a word is
//! closed within minutes rather than taking every request until the kernel gives up (about
//! 15 minutes). Not more often: gRPC servers answer pings more frequent than every five
//! minutes with `GOAWAY ENHANCE_YOUR_CALM` (grpc-go's and grpc-java's default), which would end
//! the long quiet streams; pings on a connection without streams may still earn an idle one a
//! `GOAWAY` from them, after which the next request opens another.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::backend::Backend;
use super::{Error, pool};
use crate::body::Body;
use crate::lock;

/// Streams of ours on one connection, at most.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// Each stream's receive window: what a backend may send ahead of the client reading it.
const STREAM_WINDOW: u32 = 256 << 10;
/// The connection's receive window: every stream's, so that streams whose data waits for a
/// slow client never use up the window of the others.
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * STREAMS_PER_CONNECTION as u32;
/// A ping after this long without a frame from the backend (a little over gRPC's five
/// minutes); no answer within [`PING_TIMEOUT`] closes the connection.
const PING_AFTER: Duration = Duration::from_secs(330);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<Vec<Connection>>,
    /// Held by the request opening a connection.
    opening: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Connection {
    tx: http2::SendRequest<Body>,
    streams: Arc<AtomicUsize>,
}

/// A stream's place on its connection, given back as the response body goes.
#[derive(Debug)]
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Connections {
    /// A place on a connection with room: the first one open that has it.
    fn place(&self) -> Option<(http2::SendRequest<Body>, Place)> {
        let conns = lock(&self.open);
        let conn = conns
            .iter()
            .find(|c| !c.tx.is_closed() && c.streams.load(Relaxed) < STREAMS_PER_CONNECTION)?;
        conn.streams.fetch_add(1, Relaxed);
        Some((conn.tx.clone(), Place(conn.streams.clone())))
    }

    /// Forgets connections that closed (the backend's GOAWAY, an error), and closes those
    /// beyond the first that carry no stream: a burst's extra connections do not stay.
    pub fn sweep(&self) {
        let mut first = true;
        lock(&self.open).retain(|c| {
            let keep = !c.tx.is_closed() && (first || c.streams.load(Relaxed) > 0);
            first &= !keep;
            keep
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

/// Sends `req` on a connection with room, opening one if none has it.
pub async fn request(
    backend: &Arc<Backend>,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<(Incoming, Place)>, Error> {
    let conns = &backend.pool.http2;
    loop {
        let (mut tx, place) = match conns.place() {
            Some(found) => found,
            None => {
                let waiting = tokio::time::timeout(connect_timeout, conns.opening.lock());
                let opening = waiting.await.map_err(|_| Error::ConnectTimeout)?;
                // Another request may have opened one while this one waited to.
                match conns.place() {
                    Some(found) => found,
                    None => {
                        let (mut tx, place) = open(backend, connect_timeout).await?;
                        // Others may go on it as this request waits for its answer.
                        drop(opening);
                        return Ok(tx.send_request(req).await?.map(|body| (body, place)));
                    }
                }
            }
        };
        // A connection found closing as the request goes on it hands the request back: the
        // next one is tried, or a new one.
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(|body| (body, place))),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(e.into_error().into()),
            },
        }
    }
}

/// A new connection to `backend`, kept for others too, with a place on it taken.
async fn open(
    backend: &Arc<Backend>,
    connect_timeout: Duration,
) -> Result<(http2::SendRequest<Body>, Place), Error> {
    let io = TokioIo::new(pool::connect(backend, connect_timeout).await?);
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(PING_AFTER)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    let streams = Arc::new(AtomicUsize::new(1));
    let place = Place(streams.clone());
    let shared = Connection {
        tx: tx.clone(),
        streams,
    };
    lock(&backend.pool.http2.open).push(shared);
    Ok((tx, place))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_with_every_place_taken_is_passed_over() {
        // A connection whose task is never driven: its sender stays open.
        let (client, _server) = tokio::io::duplex(64);
        let handshake = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, Body>(TokioIo::new(client));
        let (tx, _conn) = handshake.await.unwrap();
        let conns = Connections::default();
        let streams = Arc::new(AtomicUsize::new(0));
        lock(&conns.open).push(Connection {
            tx,
            streams: streams.clone(),
        });
        let mut held: Vec<Place> = (0..STREAMS_PER_CONNECTION)
            .map(|_| conns.place().unwrap().1)
            .collect();
        assert_eq!(streams.load(Relaxed), STREAMS_PER_CONNECTION);
        assert!(
            conns.place().is_none(),
            "full: another connection is needed"
        );
        held.pop();
        assert!(conns.place().is_some(), "a place came free");
        drop(held);
        assert_eq!(streams.load(Relaxed), 0);
        assert_eq!(conns.len(), 1);
    }

    #[tokio::test]
    async fn a_request_waits_for_another_requests_open_at_most_the_connect_timeout() {
        let cfg = crate::config::Upstream {
            connect_timeout: Duration::from_millis(50),
            ..crate::config::Upstream::for_tests()
        };
        let backend = Arc::new(Backend::new("127.0.0.1:1", &cfg));
        // Another request is opening a connection, and takes its time.
        let opener = backend.pool.http2.opening.lock().await;
        let started = tokio::time::Instant::now();
        let req = Request::new(crate::body::empty());
        let waited = request(&backend, req, cfg.connect_timeout).await;
        assert!(matches!(waited, Err(Error::ConnectTimeout)), "{waited:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(opener);
    }

    #[tokio::test]
    async fn a_sweep_keeps_the_first_connection_and_those_carrying_streams() {
        let conns = Connections::default();
        let mut ends = Vec::new();
        for streams in [0, 0, 3, 0] {
            let (client, server) = tokio::io::duplex(64);
            let handshake = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, Body>(TokioIo::new(client));
            let (tx, conn) = handshake.await.unwrap();
            ends.push((server, conn));
            let streams = Arc::new(AtomicUsize::new(streams));
            lock(&conns.open).push(Connection { tx, streams });
        }
        conns.sweep();
        let left: Vec<usize> = lock(&conns.open)
            .iter()
            .map(|c| c.streams.load(Relaxed))
            .collect();
        assert_eq!(left, [0, 3]);
    }
}
