//! Clients that stop taking their responses: cut after `limits.send_timeout`, over HTTP/1.1
//! (the connection closes) and HTTP/2 (the stream is reset, the connection goes on); a
//! client that reads on, however slowly and however long, is not, nor is one whose response
//! waits for its backend.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    ChanBody, Proxy, eventually, get, send, stable_h2c_proxy, stable_proxy, stats,
};

const TIMEOUT: Duration = Duration::from_secs(1);
const CONFIG: &str = "limits: { send_timeout: 1s }\n";
/// Two send timeouts.
const READING: Duration = Duration::from_secs(2);
/// Between two reads of a slow client: slow, but far from stopped.
const PACE: Duration = Duration::from_millis(2);

async fn proxy_stat(proxy: &Proxy, name: &str) -> u64 {
    stats(proxy).await["proxy"][name].as_u64().unwrap()
}

/// Waits until the proxy has cut `n` responses; panics if one was cut within the timeout
/// of `asked`.
async fn cut(proxy: &Proxy, n: u64, asked: Instant) {
    eventually(Duration::from_secs(10), || async {
        proxy_stat(proxy, "responses_unread").await == n
    })
    .await;
    assert!(asked.elapsed() >= TIMEOUT, "cut too soon");
}

#[tokio::test]
async fn an_http1_client_that_stops_reading_loses_its_connection_after_send_timeout() {
    let (proxy, _backend) = stable_proxy(CONFIG).await;
    let get_endless = b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut buf = vec![0u8; 256 << 10];

    // Reading slowly for two timeouts: the proxy's writes wait for room again and again,
    // but each time the client takes some. Beside it, a response whose backend is quiet
    // for two timeouts between two pieces (`/drip`): the proxy waits for the backend there.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(get_endless).await.unwrap();
    let reading = async {
        let began = Instant::now();
        while began.elapsed() < READING {
            let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
                .await
                .expect("bytes within 5 s")
                .unwrap();
            assert!(n > 0, "a client still reading was cut");
            tokio::time::sleep(PACE).await;
        }
    };
    let drip = proxy.url("/drip");
    let (_, dripped) = tokio::join!(reading, get(&drip));
    assert_eq!(dripped.unwrap().2, "firstsecond");
    assert_eq!(proxy_stat(&proxy, "responses_unread").await, 0);
    drop(slow);

    // A client that stops reading after the head.
    let asked = Instant::now();
    let mut stopped = TcpStream::connect(proxy.addr).await.unwrap();
    stopped.write_all(get_endless).await.unwrap();
    let n = stopped.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    cut(&proxy, 1, asked).await;
    // What the proxy wrote before the cut is there to read; then the connection ends short
    // of a body that never ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = stopped.read(&mut buf).await
            && n > 0
        {}
    })
    .await;
    assert!(ended.is_ok(), "the connection is still open");
    eventually(Duration::from_secs(5), || async {
        proxy_stat(&proxy, "connections_open").await == 0
    })
    .await;
    proxy.stop().await;
}

/// An HTTP/2 client whose stream windows are one piece of the backend's body (64 KiB).
fn h2_client<B>() -> Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .build_http()
}

fn get_on(proxy: &Proxy, path: &str) -> Request<Full<Bytes>> {
    Request::get(proxy.url(path)).body(Full::default()).unwrap()
}

#[tokio::test]
async fn an_http2_stream_its_client_gives_no_window_is_reset_and_the_connection_goes_on() {
    let (proxy, _backend) = stable_proxy(CONFIG).await;
    let client = h2_client::<Full<Bytes>>();
    let get = |path: &str| get_on(&proxy, path);

    // Read slowly for two timeouts: each piece read opens the window a little. Beside it,
    // a stream whose backend is quiet for two timeouts between two pieces.
    let slow = client.request(get("/endless")).await.unwrap().into_body();
    let reading = async {
        // Dropped once read: a stream left unread while `/drip` goes on would be cut.
        let mut slow = slow;
        let began = Instant::now();
        while began.elapsed() < READING {
            let frame = tokio::time::timeout(Duration::from_secs(5), slow.frame())
                .await
                .expect("a frame within 5 s");
            assert!(matches!(frame, Some(Ok(_))), "a stream still read was cut");
            tokio::time::sleep(PACE).await;
        }
    };
    let (_, dripped) = tokio::join!(reading, send(&client, get("/drip")));
    assert_eq!(dripped.unwrap().2, "firstsecond");
    assert_eq!(proxy_stat(&proxy, "responses_unread").await, 0);

    // A stream whose body is never read: its window runs out.
    let asked = Instant::now();
    let unread = client.request(get("/endless")).await.unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    cut(&proxy, 1, asked).await;
    let rest = tokio::time::timeout(Duration::from_secs(5), unread.into_body().collect())
        .await
        .expect("the stream ends");
    assert!(rest.is_err(), "reset, not ended as if whole");

    // The connection serves on: one connection all along.
    let (status, _, body) = send(&client, get("/")).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    assert_eq!(proxy_stat(&proxy, "connections_accepted").await, 1);
    proxy.stop().await;
}

/// To an HTTP/2 backend, a request body is sent on by hyper's client, apart from the
/// stream: a cut must reach it, or the client's stream would stay open (no reset) for as
/// long as the client goes on sending.
#[tokio::test]
async fn a_cut_reaches_a_request_body_still_going_to_an_http2_backend() {
    let (proxy, _backend) = stable_h2c_proxy(CONFIG).await;
    let client = h2_client::<ChanBody>();
    let (upload, body) = ChanBody::new();
    let req = Request::post(proxy.url("/echo")).body(body).unwrap();
    // The backend echoes what it gets: more than the client's window, which it never
    // opens. The request body stays open all along.
    upload
        .send(Bytes::from(vec![b'x'; 256 << 10]))
        .await
        .unwrap();
    let asked = Instant::now();
    let echo = client.request(req).await.unwrap();
    assert_eq!(echo.status(), StatusCode::OK);
    cut(&proxy, 1, asked).await;
    let rest = tokio::time::timeout(Duration::from_secs(5), echo.into_body().collect())
        .await
        .expect("the stream is reset while its request body is still open");
    assert!(rest.is_err());
    drop(upload);
    proxy.stop().await;
}

/// Another stream read on the same connection keeps an unread one only so long: bytes
/// taken anywhere on the connection hold its cut off, up to four send timeouts.
#[tokio::test]
async fn a_stream_left_unread_beside_one_being_read_is_cut_after_four_send_timeouts() {
    let (proxy, _backend) = stable_proxy(CONFIG).await;
    let client = h2_client::<Full<Bytes>>();
    let get = |path: &str| get_on(&proxy, path);
    let asked = Instant::now();
    let unread = client.request(get("/endless")).await.unwrap();
    let mut slow = client.request(get("/endless")).await.unwrap().into_body();
    for frames in 0.. {
        // The stats looked at every 50 frames (about a tenth of a second).
        if frames % 50 == 0 && proxy_stat(&proxy, "responses_unread").await > 0 {
            break;
        }
        assert!(asked.elapsed() < 10 * TIMEOUT, "never cut");
        let frame = tokio::time::timeout(Duration::from_secs(5), slow.frame())
            .await
            .expect("a frame within 5 s");
        assert!(
            matches!(frame, Some(Ok(_))),
            "the stream being read was cut"
        );
        tokio::time::sleep(PACE).await;
    }
    // Cut at four timeouts (three, for the margin), not at one.
    assert!(
        asked.elapsed() >= 3 * TIMEOUT,
        "cut after {:?}",
        asked.elapsed()
    );
    let rest = tokio::time::timeout(Duration::from_secs(5), unread.into_body().collect())
        .await
        .expect("the stream ends");
    assert!(rest.is_err());
    assert!(
        matches!(slow.frame().await, Some(Ok(_))),
        "the read one goes on"
    );
    proxy.stop().await;
}
