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

/// Joins `client` and `backend`, until either side ends the tunnel or no byte has gone
/// either way for `idle`. The tunnel holds `conn`, and with it the connection's place under
/// `max_connections`, its count in `connections_open` and a drain's wait for it.
pub(crate) fn spawn(client: OnUpgrade, backend: OnUpgrade, conn: Arc<Conn>, idle: Duration) {
    tokio::spawn(async move {
        let _conn = conn;
        let (Ok(client), Ok(backend)) = (client.await, backend.await) else {
            return;
        };
        let (start, last) = (Instant::now(), AtomicU64::new(0));
        let mut client = Watched::new(TokioIo::new(client), start, &last);
        let mut backend = Watched::new(TokioIo::new(backend), start, &last);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
        tokio::pin!(copy);
        loop {
            // Bytes that went by while this slept move the deadline on.
            let deadline = start + Duration::from_millis(last.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return tracing::debug!("upgraded tunnel quiet for read_timeout: closed");
            }
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

/// One side of a tunnel, noting when the last byte went through it, in milliseconds since
/// the tunnel began.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, start: Instant, last: &'a AtomicU64) -> Self {
        Watched { io, start, last }
    }

    fn moved(&self) {
        let since = self.start.elapsed().as_millis();
        self.last
            .store(u64::try_from(since).unwrap_or(u64::MAX), Relaxed);
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
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
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
