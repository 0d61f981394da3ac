//! Upgraded connections (WebSocket and the like): the client's and the backend's joined
//! byte for byte once both switched protocols.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::conn::Conn;

/// Joins `client` and `backend`, until either side ends the tunnel, no byte has gone either
/// way for `idle`, or one side has taken none of the bytes waiting for it for `send_timeout`
/// (a client that sends but never reads, as nginx's `send_timeout` on an upgraded
/// connection). The tunnel holds `conn`, and with it the connection's place under
/// `max_connections`, its count in `connections_open` and a drain's wait for it.
pub(crate) fn spawn(
    client: OnUpgrade,
    backend: OnUpgrade,
    conn: Arc<Conn>,
    idle: Duration,
    send_timeout: Duration,
) {
    tokio::spawn(async move {
        let _conn = conn;
        let (Ok(client), Ok(backend)) = (client.await, backend.await) else {
            return;
        };
        let (start, last) = (Instant::now(), AtomicU64::new(0));
        let waits = [AtomicU64::new(NOT_WAITING), AtomicU64::new(NOT_WAITING)];
        let mut client = Watched::new(TokioIo::new(client), start, &last, &waits[0]);
        let mut backend = Watched::new(TokioIo::new(backend), start, &last, &waits[1]);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
        tokio::pin!(copy);
        let at = |ms: u64| start + Duration::from_millis(ms);
        loop {
            // Bytes that went by while this slept move the deadlines on.
            let quiet = at(last.load(Relaxed)) + idle;
            let waiting = waits.iter().map(|w| w.load(Relaxed)).min();
            let stuck = waiting
                .filter(|w| *w != NOT_WAITING)
                .map(|w| at(w) + send_timeout);
            let now = Instant::now();
            if now >= quiet {
                return tracing::debug!("upgraded tunnel quiet for read_timeout: closed");
            }
            if stuck.is_some_and(|stuck| now >= stuck) {
                return tracing::debug!(
                    "upgraded tunnel: a side took nothing for send_timeout: closed"
                );
            }
            // Not waiting yet: looked at again a `send_timeout` on, so that a wait that begins
            // meanwhile is cut within two of them.
            let deadline = stuck.unwrap_or(now + send_timeout).min(quiet);
            tokio::select! {
                ended = &mut copy => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upgraded tunnel ended");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    });
}

/// A side's `waiting` when no write to it is waiting for room.
const NOT_WAITING: u64 = u64::MAX;

/// One side of a tunnel, noting when the last byte went through it, and since when a write
/// to it has waited for room, in milliseconds since the tunnel began.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
    waiting: &'a AtomicU64,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, start: Instant, last: &'a AtomicU64, waiting: &'a AtomicU64) -> Self {
        Watched {
            io,
            start,
            last,
            waiting,
        }
    }

    fn since_start(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NOT_WAITING - 1)
    }

    fn moved(&self) {
        self.last.store(self.since_start(), Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.moved();
                self.waiting.store(NOT_WAITING, Relaxed);
            }
            Poll::Pending if self.waiting.load(Relaxed) == NOT_WAITING => {
                self.waiting.store(self.since_start(), Relaxed);
            }
            _ => {}
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
