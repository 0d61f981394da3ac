//! Clients that stop taking their responses: cut after `limits.send_timeout`, over HTTP/1.1
//! (the connection closes) and HTTP/2 (the stream is reset, the connection goes on); a
//! client that reads on, however slowly and however long, is not.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Proxy, eventually, send, stable_proxy, stats};

const CONFIG: &str = "limits: { send_timeout: 500ms }\n";
/// Three send timeouts.
const READING: Duration = Duration::from_millis(1_500);
/// Between two reads of a slow client: slow, but far from stopped.
const PACE: Duration = Duration::from_millis(2);

async fn proxy_stat(proxy: &Proxy, name: &str) -> u64 {
    stats(proxy).await["proxy"][name].as_u64().unwrap()
}

/// Waits until the proxy has cut `n` responses; panics if one is cut before `after`.
async fn cut(proxy: &Proxy, n: u64, after: Instant) {
    eventually(Duration::from_secs(10), || async {
        proxy_stat(proxy, "responses_unread").await == n
    })
    .await;
    assert!(
        after.elapsed() >= Duration::from_millis(500),
        "cut too soon"
    );
}

#[tokio::test]
async fn an_http1_client_that_stops_reading_loses_its_connection_after_send_timeout() {
    let (proxy, _backend) = stable_proxy(CONFIG).await;
    let get = b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut buf = vec![0u8; 65_536];

    // Reading slowly for three timeouts: the proxy's writes wait for room again and again,
    // but each time the client takes some.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(get).await.unwrap();
    let began = Instant::now();
    while began.elapsed() < READING {
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
            .await
            .expect("bytes within 5 s")
            .unwrap();
        assert!(n > 0, "a client still reading was cut");
        tokio::time::sleep(PACE).await;
    }
    assert_eq!(proxy_stat(&proxy, "responses_unread").await, 0);
    drop(slow);

    // A client that stops reading after the head.
    let mut stopped = TcpStream::connect(proxy.addr).await.unwrap();
    stopped.write_all(get).await.unwrap();
    let n = stopped.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    cut(&proxy, 1, Instant::now()).await;
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

#[tokio::test]
async fn an_http2_stream_its_client_gives_no_window_is_reset_and_the_connection_goes_on() {
    let (proxy, _backend) = stable_proxy(CONFIG).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .build_http();
    let get = |path: &str| {
        Request::get(proxy.url(path))
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // Read slowly for three timeouts: each piece read opens the window a little. Beside it,
    // a stream whose backend is quiet for four timeouts between two pieces (`/drip`): the
    // proxy waits for the backend there, not for the client.
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
    let unread = client.request(get("/endless")).await.unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    cut(&proxy, 1, Instant::now()).await;
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
