//! fleet-proxy's own HTTP/1.1 client, for every exchange with an HTTP/1.1 backend but one
//! that asks to switch protocols: hyper's client does those (it hands the connection over to
//! the tunnel), and HTTP/2, in [`super::pool`].
//!
//! Why not hyper's client here too: it runs each backend connection as a task of its own and
//! hands every request and every response across channels between that task and the
//! request's. Here the request's own task writes the head, reads the answer (parsed by
//! httparse, as hyper does) and streams the body; the connection goes back to the pool when
//! the body has been read to its end. `benches/README.md` has what this saves.

mod chunked;
mod head;
mod pipeline;
mod pump;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Body as _, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use self::chunked::{Chunked, Step};
use self::head::{Added, Framing};
use self::pump::Pump;
use super::Error;
use super::backend::Backend;
use super::pool::{Room, Slot};
use crate::body::Body;

pub use self::head::Bad;
pub use self::pipeline::{Answers, pipeline};

/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;
/// How late an exchange on a reused connection may time out (see [`request`]).
const DEADLINE_SLACK: Duration = Duration::from_millis(16);

/// One connection to a backend, between exchanges or in one.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The request head being written, kept to reuse its allocation.
    out: Vec<u8>,
    /// The deadline of the exchange under way. One timer for the connection's life, moved
    /// later for each exchange: tokio does that with one atomic write, where a timer of its
    /// own would enter and leave the timer wheel on every request.
    timer: Pin<Box<Sleep>>,
    /// Its place under `max_connections_per_backend`, given back as it closes.
    _slot: Slot,
}

impl Conn {
    fn new(io: TcpStream, slot: Slot, deadline: Instant) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            _slot: slot,
        }
    }

    /// Quiet and open, as far as can be told without waiting: the backend sent nothing since
    /// the last exchange, not even the end of the stream. A close that arrives just after is
    /// found by the exchange itself, as with hyper's client.
    pub fn looks_open(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // The readiness the I/O driver last saw; only when it says readable is a read made.
        match self
            .io
            .poll_read_ready(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.io.try_read(&mut [0; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// An idle connection of the backend's pool, its exchange due by `deadline`.
    #[inline]
    fn reused(backend: &Backend, deadline: Instant) -> Option<Conn> {
        Some(backend.pool.take_unless_awaited()?.due(deadline))
    }

    /// Its next exchange due by `deadline`. The timer is moved only when the deadline is past
    /// it or well before it: a busy connection leaves its timer alone for most requests, at
    /// the cost of timing out up to `DEADLINE_SLACK` late.
    #[inline]
    fn due(mut self, deadline: Instant) -> Conn {
        let set = self.timer.deadline();
        if deadline > set || deadline + DEADLINE_SLACK < set {
            self.timer.as_mut().reset(deadline + DEADLINE_SLACK);
        }
        self
    }

    /// A new connection to the backend, its exchange due by `deadline`; or, at the cap on
    /// connections, the first to come back to the pool. Time spent waiting for room is the
    /// proxy's, not the backend's: the exchange gets it back, up to `limit` (the request's
    /// own deadline), so that a backend that is merely busy is not timed out and ejected.
    async fn connect(
        backend: &Backend,
        connect_timeout: Duration,
        deadline: Instant,
        limit: Instant,
    ) -> Result<Conn, Error> {
        let asked = Instant::now();
        let room = backend.pool.room(deadline).await?;
        let deadline = (deadline + asked.elapsed()).min(limit);
        let slot = match room {
            Room::Idle(conn) => return Ok(conn.due(deadline)),
            Room::New(slot) => slot,
        };
        let connecting = super::pool::connect(backend, connect_timeout);
        let io = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| Error::TimedOut)??;
        Ok(Conn::new(io, slot, deadline))
    }

    pub fn into_io(self) -> TcpStream {
        self.io
    }

    /// Writes the request head and reads up to the end of the final response head. A body
    /// is pumped as the response is read (see [`Pump`]); what is left of it when the head
    /// has come is returned, for the response body to go on with.
    async fn exchange(
        &mut self,
        parts: &http::request::Parts,
        backend: &str,
        marked: bool,
        body: Option<Body>,
        span: Duration,
    ) -> Result<(head::Head, Option<Box<Pump>>), Error> {
        let body = body.filter(|b| !b.is_end_stream());
        // Only a request with a body looks at its framing headers.
        let added = match &body {
            None => Added::Nothing,
            Some(_) if parts.headers.contains_key(http::header::CONTENT_LENGTH) => Added::Nothing,
            Some(b) => match b.size_hint().exact() {
                Some(n) => Added::ContentLength(n),
                None => Added::Chunked,
            },
        };
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        head::encode_request(&mut out, parts, backend, marked, added);
        let mut pump = match body {
            None => {
                let mut at = 0;
                std::future::poll_fn(|cx| {
                    self.poll_timed(cx, |c, cx| {
                        pump::poll_write_all(&mut c.io, cx, &out, &mut at)
                    })
                })
                .await?;
                self.out = out;
                None
            }
            // Boxed: requests with a body are the fewer, and the response body carries what
            // is left of the pump, moved several times on its way to the client.
            Some(body) => Some(Box::new(Pump::new(out, body, added == Added::Chunked))),
        };
        let (mut failed, mut write_error) = (false, None);
        let mut head = std::future::poll_fn(|cx| {
            let pumped = self.poll_pump(&mut pump, Some(span), cx);
            let head = self.poll_timed(cx, |c, cx| c.poll_head(&parts.method, cx));
            match (head, pumped) {
                // The client's body failed: nothing more to send or wait for.
                (_, Err(e @ Error::Body(_))) => Poll::Ready(Err(e)),
                // The backend stopped taking the request, and may have answered first (a
                // `413` before closing): the answer is read on for, until the connection
                // says no more.
                (Poll::Pending, Err(e)) => {
                    (failed, write_error) = (true, Some(e));
                    Poll::Pending
                }
                // The backend answered, then stopped taking the request: its answer stands.
                (head, Err(_)) => {
                    failed = true;
                    head
                }
                (head, Ok(())) => head,
            }
        })
        .await
        // No answer after all: the write's failure is the exchange's.
        .map_err(|e| write_error.take().unwrap_or(e))
        .map_err(|e| match e {
            // The deadline came while the client was still sending, and the backend had
            // said nothing yet: the client's doing, not the backend's.
            Error::TimedOut
                if self.buf.is_empty()
                    && pump.as_ref().is_some_and(|p| p.waits_for_the_client()) =>
            {
                Error::ClientTooSlow
            }
            e => e,
        })?;
        // An answer that came before the whole request went out: the backend may not have
        // read the rest, which it would take for the next request. Not reused.
        head.keep_alive &= !failed && pump.is_none();
        Ok((head, pump))
    }

    /// `poll`, unless the exchange's deadline has passed. The timer is looked at only when
    /// `poll` would wait.
    fn poll_timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Self, &mut Context<'_>) -> Poll<Result<T, Error>>,
    ) -> Poll<Result<T, Error>> {
        match poll(self, cx) {
            Poll::Pending if self.timer.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(Error::TimedOut))
            }
            polled => polled,
        }
    }

    /// Moves the request along, if it is still being sent; done with it once written, or
    /// once writing failed. With `span`, an upload that moves (the socket took more of it:
    /// the client sent, the backend read) moves the exchange's deadline to `span` from now:
    /// a long upload is not cut for its length, only for standing still.
    fn poll_pump(
        &mut self,
        pump: &mut Option<Box<Pump>>,
        span: Option<Duration>,
        cx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let Some(p) = pump else { return Ok(()) };
        let written = p.written();
        let polled = p.poll(&mut self.io, cx);
        if let Some(span) = span
            && p.written() != written
        {
            let deadline = Instant::now() + span;
            if deadline > self.timer.deadline() {
                self.timer.as_mut().reset(deadline + DEADLINE_SLACK);
            }
        }
        if polled.is_ready()
            && let Some(done) = pump.take()
        {
            self.out = done.into_buf();
        }
        match polled {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn poll_head(
        &mut self,
        method: &http::Method,
        cx: &mut Context<'_>,
    ) -> Poll<Result<head::Head, Error>> {
        loop {
            if let Some(head) = head::parse_response(&mut self.buf, method, head::Fields::Keep)? {
                return Poll::Ready(Ok(head));
            }
            if ready!(self.poll_read(cx)).map_err(Error::Io)? == 0 {
                return Poll::Ready(Err(Error::Closed));
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// Sends a request to `backend` on a pooled connection, or on a new one; fails with
/// [`Error::TimedOut`] if the response head has not come by `deadline`. The body is taken
/// only once there is a connection: when none could be had, nothing was sent, and the
/// request may go to another backend whole.
pub async fn request(
    backend: &Arc<Backend>,
    parts: &http::request::Parts,
    marked: bool,
    body: &mut Option<Body>,
    connect_timeout: Duration,
    (deadline, limit, span): (Instant, Instant, Duration),
) -> Result<Response<ResponseBody>, Error> {
    let mut conn = match Conn::reused(backend, deadline) {
        Some(conn) => conn,
        // Boxed: connecting is rare next to reuse.
        None => Box::pin(Conn::connect(backend, connect_timeout, deadline, limit)).await?,
    };
    let (head, pump) = conn
        .exchange(parts, &backend.addr, marked, body.take(), span)
        .await?;
    let mut body = ResponseBody {
        conn: Some(conn),
        pump,
        backend: backend.clone(),
        left: Left::of(head.framing),
        keep_alive: head.keep_alive,
    };
    if head.framing == Framing::Empty {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    // Answered in HTTP/1.1 whatever the backend spoke: hyper writes the client's version
    // from it, and an HTTP/1.0 status line would have an HTTP/1.1 client close after each
    // answer while the proxy keeps both connections.
    *resp.version_mut() = http::Version::HTTP_11;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        resp.extensions_mut().insert(*reason);
    }
    Ok(resp)
}

/// What is left of a response body.
#[derive(Debug)]
enum Left {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Left {
    fn of(framing: Framing) -> Left {
        match framing {
            Framing::Empty => Left::Length(0),
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(Chunked::default()),
            Framing::UntilClose => Left::UntilClose,
        }
    }
}

/// A response body read off its connection as the client takes it. The connection goes back
/// to the pool at the body's end; dropped before that, it is closed, being mid-response.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once the body has ended (or failed).
    conn: Option<Conn>,
    /// The rest of the request body, while it is still being sent. A response that came
    /// before its request went out whole is never kept alive (see `exchange`), so the pump
    /// has no say in whether the connection is reused.
    pump: Option<Box<Pump>>,
    backend: Arc<Backend>,
    left: Left,
    keep_alive: bool,
}

impl ResponseBody {
    /// The response has ended: the connection goes back to the pool if it can carry another
    /// exchange (the request went out whole, the backend keeps it open, nothing more came).
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.backend.pool.put(conn);
        }
    }

    /// The next step from bytes already read.
    fn step(&mut self) -> Result<Step, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::End);
        };
        let buf = &mut conn.buf;
        match &mut self.left {
            Left::Length(0) => Ok(Step::End),
            Left::Length(_) | Left::UntilClose if buf.is_empty() => Ok(Step::More),
            Left::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(Step::Data(buf.split_to(n).freeze()))
            }
            Left::UntilClose => Ok(Step::Data(buf.split().freeze())),
            Left::Chunked(chunked) => chunked.step(buf).map_err(Error::Protocol),
        }
    }

    fn ended(&self) -> bool {
        match &self.left {
            Left::Length(left) => *left == 0,
            Left::Chunked(chunked) => chunked.is_end(),
            Left::UntilClose => false,
        }
    }
}

impl ResponseBody {
    /// Moves the rest of the request along. Only a failure of the client's body fails the
    /// response (the backend would wait for the rest); when the backend stops taking the
    /// request, what it answers may still come.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        match conn.poll_pump(&mut self.pump, None, cx) {
            Err(e @ Error::Body(_)) => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "backend stopped taking the request body");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// The next frame, reading as needed; `None` at the end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
        self.poll_pump(cx)?;
        loop {
            let frame = match self.step()? {
                Step::Data(data) => Frame::data(data),
                Step::Trailers(trailers) => Frame::trailers(trailers),
                Step::End => {
                    self.finish();
                    return Poll::Ready(Ok(None));
                }
                Step::More => {
                    let Some(conn) = self.conn.as_mut() else {
                        return Poll::Ready(Ok(None));
                    };
                    match ready!(conn.poll_read(cx)).map_err(Error::Io)? {
                        0 if matches!(self.left, Left::UntilClose) => {
                            self.conn = None;
                            return Poll::Ready(Ok(None));
                        }
                        0 => return Poll::Ready(Err(Error::Closed)),
                        _ => continue,
                    }
                }
            };
            // The last bytes: the connection is free before the client has them.
            if self.ended() || frame.is_trailers() {
                self.finish();
            }
            return Poll::Ready(Ok(Some(frame)));
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = ready!(self.poll_next(cx));
        // A body that failed leaves its connection mid-response: closed, never reused.
        if polled.is_err() {
            self.conn = None;
        }
        Poll::Ready(polled.transpose())
    }

    fn is_end_stream(&self) -> bool {
        // The connection goes (back to the pool, or closed) as the last byte is taken.
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.left, &self.conn) {
            (Left::Length(left), Some(_)) => SizeHint::with_exact(*left),
            (_, None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
