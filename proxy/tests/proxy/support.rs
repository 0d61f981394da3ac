//! Real backends and a real proxy on 127.0.0.1:0, and clients to talk to them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How a test backend behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers at once with its name.
    Normal,
    /// Waits this long before answering.
    Slow(Duration),
}

/// A backend that answers with the name of its track in the body and `x-served-by`, and
/// echoes what the proxy added (`x-seen-*`). `/ws` upgrades and echoes bytes; `/endless`
/// sends a body that never ends; gRPC requests
/// get a body and `grpc-status` trailers (0, or the request's `x-grpc-status`).
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// The headers and body of the last plain request it answered (not `/ws`, `/echo`,
    /// `/drip`).
    pub last: Arc<std::sync::Mutex<Option<(http::HeaderMap, Bytes)>>>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Dropping it ends the accept loop and, with it, every connection.
    _stop: oneshot::Sender<()>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &'static str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counter = hits.clone();
        let last = Arc::new(std::sync::Mutex::new(None));
        let seen = last.clone();
        let conns = Arc::new(AtomicUsize::new(0));
        let accepted = conns.clone();
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => break,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (counter, seen) = (counter.clone(), seen.clone());
                served.spawn(async move {
                    let svc = service_fn(move |req| {
                        answer(name, mode, counter.clone(), seen.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
            served.abort_all();
        });
        Backend {
            addr,
            hits,
            last,
            conns,
            _stop: stop,
            task: Some(task),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    name: &'static str,
    mode: Mode,
    hits: Arc<AtomicUsize>,
    last: Arc<std::sync::Mutex<Option<(http::HeaderMap, Bytes)>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    if let Mode::Slow(d) = mode {
        tokio::time::sleep(d).await;
    }
    if req.uri().path() == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap());
    }
    if req.uri().path() == "/echo" {
        // Each request chunk goes back as soon as it arrives: streaming in both directions.
        let (tx, body) = ChanBody::new();
        let mut incoming = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = incoming.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send(data).await.is_err()
                {
                    return;
                }
            }
        });
        return Ok(Response::new(body.boxed()));
    }
    if req.uri().path() == "/endless" {
        return Ok(Response::new(Endless.boxed()));
    }
    if req.uri().path() == "/drip" {
        let (tx, body) = ChanBody::new();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first")).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = tx.send(Bytes::from_static(b"second")).await;
        });
        return Ok(Response::new(body.boxed()));
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut builder = Response::builder().header("x-served-by", name);
    for (seen, header) in [
        ("x-seen-xff", "x-forwarded-for"),
        ("x-seen-proto", "x-forwarded-proto"),
        ("x-seen-mirror", "x-fleet-mirror"),
        ("x-seen-host", "host"),
        ("x-seen-forwarded-host", "x-forwarded-host"),
        ("x-seen-connection", "connection"),
        ("x-seen-secret", "x-secret"),
        ("x-seen-te", "te"),
        ("x-seen-content-length", "content-length"),
    ] {
        if let Some(v) = req.headers().get(header) {
            builder = builder.header(seen, v);
        }
    }
    if let Some(authority) = req.uri().authority() {
        builder = builder.header("x-seen-authority", authority.as_str());
    }
    let version = format!("{:?}", req.version());
    builder = builder.header("x-seen-version", version);
    let headers = req.headers().clone();
    let grpc_status = headers.get("x-grpc-status").cloned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    builder = builder.header("x-seen-body-len", body.len().to_string());
    *last.lock().unwrap() = Some((headers, body));
    if grpc {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(
            "grpc-status",
            grpc_status.unwrap_or(HeaderValue::from_static("0")),
        );
        trailers.insert("grpc-message", name.parse().unwrap());
        let body = Frames(vec![
            http_body::Frame::trailers(trailers),
            http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi")),
        ])
        .boxed();
        return Ok(builder
            .header("content-type", "application/grpc")
            // hyper's HTTP/1.1 server sends only the trailers a response declares.
            .header("trailer", "grpc-status, grpc-message")
            .body(body)
            .unwrap());
    }
    Ok(builder.body(Full::new(Bytes::from(name)).boxed()).unwrap())
}

/// A body fed through a channel, one data frame per message; it ends when the sender is
/// dropped.
pub struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl ChanBody {
    pub fn new() -> (tokio::sync::mpsc::Sender<Bytes>, ChanBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (tx, ChanBody(rx))
    }
}

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|d| d.map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// A body that never ends: 64 KiB pieces of `x` for as long as it is read.
struct Endless;

static PIECE: [u8; 65_536] = [b'x'; 65_536];

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let piece = http_body::Frame::data(Bytes::from_static(&PIECE));
        std::task::Poll::Ready(Some(Ok(piece)))
    }
}

/// A body made of ready frames, popped from the end.
struct Frames(Vec<http_body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop().map(Ok))
    }
}

/// A backend that speaks HTTP/1.1 by hand, for answers no well-behaved server gives.
/// `answer` gets each request head and returns the bytes to send back, and whether to close
/// the connection after them. Request bodies framed by Content-Length are read and dropped.
pub struct RawBackend {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Set once the proxy has closed one of its connections.
    pub closed: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RawBackend {
    pub async fn start<F>(answer: F) -> RawBackend
    where
        F: Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, answer) = (Arc::new(AtomicUsize::new(0)), Arc::new(answer));
        let closed = Arc::new(AtomicBool::new(false));
        let (counted, noted) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (answer, noted) = (answer.clone(), noted.clone());
                served.spawn(async move {
                    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                    loop {
                        // Every request whose head and body are in.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..end + 4]).into_owned();
                            let length = head
                                .lines()
                                .filter_map(|l| l.split_once(':'))
                                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                                .map_or(0, |(_, v)| v.trim().parse::<usize>().unwrap());
                            if seen.len() < end + 4 + length {
                                break;
                            }
                            seen.drain(..end + 4 + length);
                            let (bytes, close) = answer(&head);
                            if stream.write_all(&bytes).await.is_err() || close {
                                return;
                            }
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return noted.store(true, Ordering::SeqCst),
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            conns: accepted,
            closed,
            _task: AbortOnDrop(task),
        }
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

/// An address nothing listens on: connections to it are refused.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A running proxy; dropped or `stop`ped, it drains and ends.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Every traffic listener's address, `addr` first.
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Proxy {
    /// Starts a proxy from YAML; `listen` and `admin` are added on 127.0.0.1:0.
    pub async fn start(yaml: &str) -> Proxy {
        Proxy::start_in(yaml, Path::new("."), None).await
    }

    pub async fn start_in(yaml: &str, dir: &Path, watch: Option<&Path>) -> Proxy {
        let src = if yaml.contains("listen:") {
            yaml.to_string()
        } else {
            format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{yaml}")
        };
        let (settings, table) = match fleet_proxy::config::check(&src, dir) {
            Ok(ok) => ok,
            Err(d) => panic!(
                "{}",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        };
        let server = fleet_proxy::Server::bind(settings, table, watch.map(Path::to_path_buf))
            .await
            .unwrap();
        let addrs = server.traffic_addrs();
        let addr = addrs[0];
        let admin = server.admin_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let proxy = Proxy {
            addr,
            addrs,
            admin,
            stop: Some(stop),
            task: Some(task),
        };
        let admin_url = format!("http://{}/readyz", proxy.admin);
        eventually(Duration::from_secs(5), || async {
            get(&admin_url).await.map(|r| r.0) == Some(StatusCode::OK)
        })
        .await;
        proxy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Signals shutdown; the returned future ends when the proxy has drained.
    pub fn begin_stop(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("proxy already stopped")
    }

    pub async fn stop(mut self) {
        self.begin_stop().await.unwrap().unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Status, headers and body of a request, or `None` if it failed.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Option<(StatusCode, http::HeaderMap, String)> {
    let resp = client.request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

pub async fn get(url: &str) -> Option<(StatusCode, http::HeaderMap, String)> {
    send(&client(), Request::get(url).body(Full::default()).unwrap()).await
}

pub async fn put(url: &str, body: &str) -> (StatusCode, String) {
    let req = Request::put(url)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (s, _, b) = send(&client(), req).await.expect("admin answers");
    (s, b)
}

/// The proxy's `/stats`.
pub async fn stats(proxy: &Proxy) -> serde_json::Value {
    let (_, _, body) = get(&proxy.admin_url("/stats")).await.unwrap();
    serde_json::from_str(&body).unwrap()
}

/// The series of `track` from `source` (`primary` or `mirror`) in `stats`, over all routes;
/// `Null` if there is none.
pub fn series(stats: &serde_json::Value, track: &str, source: &str) -> serde_json::Value {
    stats["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["track"] == track && s["source"] == source)
        .cloned()
        .unwrap_or_default()
}

/// Polls `cond` until it holds; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A table that sends every request to one `stable` track at `stable`, after the config
/// lines in `extra`.
pub fn stable_only(extra: &str, stable: SocketAddr) -> String {
    stable_track(extra, stable, "")
}

fn stable_track(extra: &str, stable: SocketAddr, options: &str) -> String {
    format!(
        "{extra}tracks:\n  stable: {{ backends: [\"{stable}\"]{options} }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
    )
}

/// A proxy in front of one ordinary `stable` backend, with the config lines in `extra`.
pub async fn stable_proxy(extra: &str) -> (Proxy, Backend) {
    let stable = Backend::start("stable", Mode::Normal).await;
    (Proxy::start(&stable_only(extra, stable.addr)).await, stable)
}

/// Likewise, the backend spoken to over HTTP/2 whatever the client speaks (`protocol: h2c`).
pub async fn stable_h2c_proxy(extra: &str) -> (Proxy, Backend) {
    let stable = Backend::start("stable", Mode::Normal).await;
    let config = stable_track(extra, stable.addr, ", protocol: h2c");
    (Proxy::start(&config).await, stable)
}

/// The tracks section for these backends.
pub fn tracks(stable: SocketAddr, canary: SocketAddr, shadow: SocketAddr) -> String {
    format!(
        "tracks:\n  stable: {{ backends: [\"{stable}\"] }}\n  canary: {{ backends: [\"{canary}\"] }}\n  shadow: {{ backends: [\"{shadow}\"] }}\n"
    )
}

/// Writes `raw` to `addr` and reads until the proxy closes the connection (or 5 s pass):
/// what came back, and whether it closed.
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// An HTTP/2 frame as a raw client writes it.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HTTP/2 client by hand, for clients no library would be: it sends the preface and an
/// empty SETTINGS, then only what the test writes; it answers nothing (no SETTINGS ack, no
/// PING answer). What it receives is read and dropped, noting a GOAWAY and the close.
pub struct RawH2 {
    pub to: tokio::net::tcp::OwnedWriteHalf,
    goaway: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    _reader: AbortOnDrop,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from, mut to) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        to.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        to.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
        let (goaway, closed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (saw_goaway, saw_close) = (goaway.clone(), closed.clone());
        let reader = tokio::spawn(async move {
            let mut head = [0u8; 9];
            while from.read_exact(&mut head).await.is_ok() {
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; len];
                if from.read_exact(&mut payload).await.is_err() {
                    break;
                }
                if head[3] == 7 {
                    saw_goaway.store(true, Ordering::SeqCst);
                }
            }
            saw_close.store(true, Ordering::SeqCst);
        });
        RawH2 {
            to,
            goaway,
            closed,
            _reader: AbortOnDrop(reader),
        }
    }

    pub fn got_goaway(&self) -> bool {
        self.goaway.load(Ordering::SeqCst)
    }

    /// The proxy closed the connection.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Writes `bytes`; false once the connection is closed.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        !self.closed() && self.to.write_all(bytes).await.is_ok()
    }
}
