//! One client connection, from its first byte to its close: HTTP/2 or HTTP/1.1, plain or
//! TLS, drained on shutdown.
//!
//! Between two requests an HTTP/1.1 connection holds no buffers. hyper keeps an 8 KiB read
//! and an 8 KiB write buffer for as long as its connection object lives, so once a
//! connection is idle (nothing half read, nothing unwritten, no request being answered) the
//! connection object is taken apart and the socket alone waits for the next bytes, as nginx
//! does with its keep-alive connections; a new hyper connection takes over when they come.
//! 10,000 idle connections then cost a few KiB each instead of 16.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::{Service, ServiceBuilder};

use crate::body::{Body, BoxError};
use crate::config::Limits;
use crate::framing::{Scan, Seen};
use crate::server::stopped;
use crate::state::Shared;
use crate::stats::Gauge;

mod resets;
mod shed;
mod unread;
mod vigil;

pub use shed::Admissions;
use shed::ShedLayer;
pub(crate) use unread::tie_to_stream;
use unread::{Pulls, Streams};
use vigil::{Finding, Sight, Vigil};

/// What an open connection holds until it closes, however it ends: its place under
/// `max_connections`, its count in `connections_open`, and a drain's wait for it. A
/// connection upgraded to a tunnel (WebSocket) keeps them there: it is still open.
pub struct Lease {
    shared: Arc<Shared>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _drain: watch::Receiver<bool>,
}

impl Lease {
    pub fn new(
        shared: &Arc<Shared>,
        permit: tokio::sync::OwnedSemaphorePermit,
        drain: watch::Receiver<bool>,
    ) -> Self {
        shared.stats.global.connections_open.fetch_add(1, Relaxed);
        Lease {
            shared: shared.clone(),
            _permit: permit,
            _drain: drain,
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared
            .stats
            .global
            .connections_open
            .fetch_sub(1, Relaxed);
    }
}

/// What the proxy knows about the client connection a request came on.
#[derive(Debug)]
pub struct Conn {
    /// The client's IP address, as `X-Forwarded-For` names it.
    pub(crate) peer_ip: HeaderValue,
    pub(crate) tls: bool,
    /// What the raw bytes showed: each HTTP/1 request head's verdict, and idleness.
    pub(crate) seen: Arc<Seen>,
    /// Requests taken and not yet answered to the last byte of their response body.
    in_flight: AtomicUsize,
    /// Requests taken since the connection began.
    requests: AtomicU64,
    /// Requests routed and sent on; those of them dropped before their answer soon after
    /// they began (on HTTP/2, streams the client reset), and the signal that there are too
    /// many of those (see [`resets`]).
    forwarded: AtomicU64,
    resets: AtomicU64,
    too_many_resets: tokio::sync::Notify,
    /// Held for as long as the connection is: by its serving task, and by its tunnel once
    /// it is upgraded. `None` for a `Conn` made outside the accept loop (in tests).
    _lease: Option<Lease>,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        // An IPv4 client of a dual-stack listener as itself, not as `::ffff:a.b.c.d`.
        let ip = peer.ip().to_canonical().to_string();
        Conn {
            peer_ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            tls,
            seen: Arc::default(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            too_many_resets: tokio::sync::Notify::const_new(),
            _lease: None,
        }
    }

    /// A connection accepted under `lease`, which it holds until it closes.
    pub fn leased(peer: SocketAddr, tls: bool, lease: Lease) -> Self {
        Conn {
            _lease: Some(lease),
            ..Conn::new(peer, tls)
        }
    }

    /// Counts a request routed on this connection and about to be sent on: the connection,
    /// for the request to hold.
    pub(crate) fn forwarding(self: &Arc<Self>) -> Arc<Self> {
        self.forwarded.fetch_add(1, Relaxed);
        self.clone()
    }

    /// A forwarded request was dropped before its answer, `waited` after it began.
    pub(crate) fn reset_early(&self, waited: Duration) {
        if waited >= resets::PREMATURE {
            return;
        }
        let resets = self.resets.fetch_add(1, Relaxed) + 1;
        if resets::too_many(resets, self.forwarded.load(Relaxed)) {
            self.too_many_resets.notify_one();
        }
    }

    fn sight(&self) -> Sight {
        let answering = self.in_flight.load(Relaxed) > 0;
        Sight {
            requests: self.requests.load(Relaxed),
            idle: !answering && self.seen.idle_io(),
            awaiting_head: !answering && !self.seen.between_messages(),
            write_blocked: self.seen.write_blocked(),
            writes: self.seen.writes(),
        }
    }
}

/// A socket that can wait for bytes without reading them.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Socket for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Only called after a read came back empty, so rustls holds no plaintext: new bytes
        // can only come from the socket.
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// The start of every HTTP/2 connection with prior knowledge (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a connection until it closes, or until `drain` turns true and it has finished what
/// it started. `alpn_h2`: TLS negotiated HTTP/2; otherwise the first bytes tell.
pub async fn serve<S: Socket>(
    mut io: S,
    conn: Arc<Conn>,
    alpn_h2: bool,
    shared: &Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    let limits = &shared.settings.limits;
    // Every client shows its first bytes within `header_read_timeout`, one that chose HTTP/2
    // by ALPN too (it still sends the preface): else a client that finishes the handshake and
    // sends nothing would hold its place for two idle timeouts, and a drain to its deadline.
    let sniffing = tokio::time::timeout(limits.header_read_timeout, sniff(&mut io));
    let (preface, read) = tokio::select! {
        // Draining: a connection that has sent nothing yet is closed at once.
        _ = stopped(&mut drain) => return,
        sniffed = sniffing => match sniffed {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(e)) => {
                return tracing::debug!(error = %e, "connection failed before a request");
            }
            Err(_) => return tracing::debug!("no request before header_read_timeout"),
        },
    };
    let h2 = alpn_h2 || preface;
    let io = Scan::new(io, read, limits.max_header_bytes, conn.seen.clone());
    let served = match h2 {
        // Boxed: an HTTP/2 connection's state is large, and most connections are HTTP/1.
        true => Box::pin(serve_http2(io, &conn, shared, &mut drain)).await,
        false => serve_http1(io, &conn, shared, &mut drain).await,
    };
    if let Err(e) = served {
        // A head hyper could not parse (too large and too many headers included) was
        // answered 400 or 431 by hyper itself: counted here with the service's refusals.
        if e.is_parse() {
            shared.stats.global.bad_requests.fetch_add(1, Relaxed);
        }
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Reads until the bytes are, or cannot be, the HTTP/2 preface; returns them.
async fn sniff<S: Socket>(io: &mut S) -> io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            break;
        }
    }
    Ok((buf[..n] == *H2_PREFACE, Bytes::copy_from_slice(&buf[..n])))
}

/// The request path as a tower stack: load shedding over a limit of requests in flight
/// across the proxy, then the proxy itself ([`crate::service::handle`]).
fn stack(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = BoxError, Future: Send + 'static>
+ Clone
+ Send
+ 'static {
    let (s, c) = (shared.clone(), conn.clone());
    ServiceBuilder::new()
        .layer(ShedLayer::new(shared.admissions.clone()))
        .service_fn(move |req| {
            // Boxed, once: the forwarding future is the largest part of a request's state.
            let handled = crate::service::handle(&s, &c, req).map(|f| Box::pin(f.run(s.clone())));
            async move {
                Ok::<_, Infallible>(match handled {
                    Ok(forwarding) => forwarding.await,
                    Err(answered) => *answered,
                })
            }
        })
}

/// hyper's service for `conn`: each request goes through the stack and is counted in flight
/// on the connection until its response body is done.
fn hyper_service(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let (shared, conn, stack) = (shared.clone(), conn.clone(), stack(shared, conn));
    service_fn(move |req| {
        // Counted now, when hyper hands the request over, not when the future first runs.
        conn.in_flight.fetch_add(1, Relaxed);
        conn.requests.fetch_add(1, Relaxed);
        let guard = InFlight(conn.clone());
        let version = req.version();
        // Every HTTP/1 request takes its verdict here, whatever happens to it next.
        let handling = match crate::service::refused_by_scan(&shared, &conn, &req) {
            Some(refused) => Err(refused),
            None => {
                // The stack is ready at once (load shedding answers at the call, never by
                // waiting), so it is asked here and called, without a `Oneshot` to carry
                // the request until the first poll.
                let mut stack = stack.clone();
                let mut cx = Context::from_waker(Waker::noop());
                match stack.poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => Ok(stack.call(req)),
                    _ => Err(overloaded(&shared)),
                }
            }
        };
        let shared = shared.clone();
        async move {
            // An HTTP/2 response's body tells its stream's task when the client has no
            // room for it (see `unread`: taken at once, on the future's first poll).
            let pulls = match version {
                http::Version::HTTP_2 => Pulls::of_this_stream().map(|p| (p, 0)),
                _ => None,
            };
            let mut resp = match handling {
                Err(refused) => refused,
                // The proxy itself never fails (`Infallible`): the stack's one error is
                // `Overloaded`, from the shedding layer.
                Ok(handling) => handling.await.unwrap_or_else(|_| overloaded(&shared)),
            };
            // The raw scan reads no further than a head asking to switch protocols: unless
            // the connection becomes a tunnel, it closes after this answer, whoever gave it
            // (hyper would frame a request behind it with two equal lengths, or a length and
            // chunked, quietly).
            // (`guard` holds the connection.)
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS && guard.0.seen.stopped_at_upgrade()
            {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp.map(|body| Tracked {
                body,
                pulls,
                _guard: guard,
            }))
        }
    })
}

/// 503, counted as shed.
fn overloaded(shared: &Shared) -> Response<Body> {
    shared.stats.global.requests_shed.fetch_add(1, Relaxed);
    crate::service::plain(StatusCode::SERVICE_UNAVAILABLE, "overloaded")
}

struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A response body that keeps its request counted in flight until hyper is done with it.
pub struct Tracked {
    body: Body,
    /// HTTP/2: its stream's [`Pulls`], and the number of the last piece handed on.
    pulls: Option<(Arc<Pulls>, u64)>,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some((pulls, pieces)) = &mut this.pulls else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        pulls.asked();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.data_ref().is_some_and(|d| !d.is_empty())
        {
            *pieces += 1;
            pulls.gave(*pieces);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    // No timer: the header-read timeout is the connection's own (see `vigil`), which
    // costs a timer per connection rather than one per request. Heads and bodies are
    // written from one buffer: for the small responses of most APIs one copy costs less
    // than gathering the pieces (about 1% of a request's instructions).
    b.header_read_timeout(None)
        .writev(false)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    // hyper's own limit is 100, parsed on the stack; any explicit limit costs a heap buffer
    // per request, so only set one that differs.
    if limits.max_headers != 100 {
        b.max_headers(limits.max_headers);
    }
    b
}

/// How long an HTTP/1.1 connection stays idle before it gives up its buffers (up to half as
/// long again: see `vigil`). Shorter costs CPU on connections that are merely between two
/// quick requests (a new hyper connection per request is about a fifth more work); longer
/// keeps memory that idle clients do not need.
const PARK_AFTER: Duration = Duration::from_secs(1);

async fn serve_http1<S: Socket>(
    mut io: Scan<S>,
    conn: &Arc<Conn>,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
) -> Result<(), hyper::Error> {
    loop {
        // Boxed: while the connection is parked, its task keeps no room for hyper's
        // connection, the service and the timer that serving needs.
        io = match Box::pin(serve_until_idle(io, conn, shared, drain)).await? {
            Some(io) => io,
            None => return Ok(()),
        };
        // Idle: hyper's buffers are gone; the socket waits alone.
        let readable = poll_fn(|cx| io.get_ref().poll_readable(cx));
        let _idle = Gauge::up(&shared.stats.global.connections_idle);
        tokio::select! {
            _ = stopped(drain) => return Ok(()),
            ready = tokio::time::timeout(shared.settings.limits.idle_timeout, readable) => {
                match ready {
                    Ok(Ok(())) => {}
                    // Idle too long, or the socket failed: close.
                    _ => return Ok(()),
                }
            }
        }
    }
}

/// Serves `io` with hyper until the connection ends (`None`), is too slow with a request
/// head (`None`), or is idle long enough to park: then the socket comes back, with the bytes
/// hyper read and did not use put back into it.
async fn serve_until_idle<S: Socket>(
    io: Scan<S>,
    conn: &Arc<Conn>,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
) -> Result<Option<Scan<S>>, hyper::Error> {
    let limits = &shared.settings.limits;
    let mut http = http1_builder(limits)
        .serve_connection(TokioIo::new(io), hyper_service(shared, conn))
        .with_upgrades();
    let mut drained = false;
    let mut vigil = Vigil::new(PARK_AFTER, limits.header_read_timeout, limits.send_timeout);
    let mut tick = pin!(tokio::time::sleep(vigil.period()));
    let paused = poll_fn(|cx| {
        // Looked at whenever the connection wakes, without a waker of its own: an awake
        // connection notices a drain at once, an idle one at its next tick.
        if !drained && draining(drain) {
            drained = true;
            Pin::new(&mut http).graceful_shutdown();
        }
        if let Poll::Ready(done) = Pin::new(&mut http).poll(cx) {
            return Poll::Ready(Err(done));
        }
        while tick.as_mut().poll(cx).is_ready() {
            match vigil.look(conn.sight()) {
                // A draining connection closes after its request rather than parking.
                Finding::Carry => {}
                Finding::Park if drained => {}
                found => return Poll::Ready(Ok(found)),
            }
            tick.as_mut()
                .reset(tokio::time::Instant::now() + vigil.period());
        }
        Poll::Pending
    })
    .await;
    match paused {
        Err(done) => done.map(|()| None),
        Ok(Finding::Park) => Ok(http.into_parts().map(|parts| {
            let mut io = parts.io.into_inner();
            io.unread(parts.read_buf);
            io
        })),
        Ok(Finding::Unread) => {
            shared.stats.global.responses_unread.fetch_add(1, Relaxed);
            tracing::debug!("the client took nothing of its response within send_timeout");
            Ok(None)
        }
        // The only other finding that ends serving.
        Ok(_) => {
            tracing::debug!("no request head within header_read_timeout");
            Ok(None)
        }
    }
}

/// Whether a drain has begun (or nobody can begin one any more). Cheaper than polling
/// [`stopped`], which registers a waker every time.
fn draining(drain: &watch::Receiver<bool>) -> bool {
    match drain.has_changed() {
        Ok(false) => false,
        Ok(true) => *drain.borrow(),
        Err(_) => true,
    }
}

async fn serve_http2<S: Socket>(
    io: Scan<S>,
    conn: &Arc<Conn>,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
) -> Result<(), hyper::Error> {
    let limits = &shared.settings.limits;
    let mut builder = http2::Builder::new(Streams::new(shared.clone(), conn.seen.clone()));
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1_000);
    let service = hyper_service(shared, conn);
    let mut http = pin!(builder.serve_connection(TokioIo::new(io), service));
    // Closed (GOAWAY, then the end once streams are done) on a drain, or once a whole
    // `idle_timeout` has gone by with no request in flight at either end of it and none
    // begun in between: one to two of them after the last request ended, one after the
    // preface of a client that never asks anything.
    let idle = limits.idle_timeout;
    let mut seen = conn.requests.load(Relaxed);
    let mut quiet = true;
    let mut draining = loop {
        tokio::select! {
            done = http.as_mut() => return done,
            _ = stopped(drain) => break true,
            () = conn.too_many_resets.notified() => return closed_for_resets(conn),
            () = tokio::time::sleep(idle) => {
                let now = conn.requests.load(Relaxed);
                let none_in_flight = conn.in_flight.load(Relaxed) == 0;
                if quiet && none_in_flight && now == seen {
                    break false;
                }
                (quiet, seen) = (none_in_flight, now);
            }
        }
    };
    http.as_mut().graceful_shutdown();
    // hyper's graceful close waits for the client to answer a PING, and serves streams begun
    // before it does, to the last byte h2 holds for them. A client that never answers (gone
    // without a word: a NAT's timeout, a host that went down, one that stopped reading) is
    // dropped once a wait passes with nothing in flight and no byte moving: none of those
    // waiting for the client taken and, when draining, none from the client either (a
    // `WINDOW_UPDATE` for an answer's last bytes is one; idle, a client that sends a frame
    // now and then and asks for nothing would be held for good). The wait is a whole
    // `idle_timeout`, or a second once draining, so that a drain ends with its last request
    // rather than at its deadline.
    let (mut reads, mut writes) = (conn.seen.reads(), conn.seen.writes());
    loop {
        let wait = match draining {
            true => DRAIN_PING_WAIT,
            false => idle,
        };
        tokio::select! {
            done = tokio::time::timeout(wait, http.as_mut()) => if let Ok(done) = done {
                return done;
            },
            () = conn.too_many_resets.notified() => return closed_for_resets(conn),
            _ = stopped(drain), if !draining => {
                draining = true;
                continue;
            }
        }
        let (r, w) = (conn.seen.reads(), conn.seen.writes());
        // A write that did not wait, as the GOAWAY's, is not the client's doing.
        let moving = (draining && r != reads) || (w != writes && conn.seen.write_blocked());
        (reads, writes) = (r, w);
        if conn.in_flight.load(Relaxed) == 0 && !moving {
            return Ok(());
        }
    }
}

/// Logged as an HTTP/2 connection is dropped for [`resets::too_many`]: at once, its other
/// streams with it (hyper offers no `GOAWAY` with `ENHANCE_YOUR_CALM`, and a graceful one
/// would go on taking streams until the client answered its `PING`).
fn closed_for_resets(conn: &Conn) -> Result<(), hyper::Error> {
    let (resets, ip) = (conn.resets.load(Relaxed), &conn.peer_ip);
    tracing::warn!(
        ?ip,
        resets,
        "closing an HTTP/2 connection whose client resets its streams before their answers"
    );
    Ok(())
}

/// How long a draining HTTP/2 connection with nothing in flight waits for the client's answer
/// to the shutdown PING: many round trips of any client still there.
const DRAIN_PING_WAIT: Duration = Duration::from_secs(1);
