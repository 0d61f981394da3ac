//! Keep-alive connections between requests: parked without buffers, woken by their next
//! request, closed after `idle_timeout`, closed at once by a drain.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Proxy, eventually, h2_frame, stable_proxy, stats};

/// Sends one GET on `s` and reads its whole answer (the test backend's body is its name).
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"stable") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Stops `proxy` (SIGTERM's drain) and asserts it ended within `limit`.
async fn drains_within(proxy: &mut Proxy, limit: Duration) {
    let started = Instant::now();
    proxy.begin_stop().await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took < limit, "the drain took {took:?}");
}

/// The proxy's connection gauges from `/stats`: (open, idle).
async fn connections(proxy: &Proxy) -> (u64, u64) {
    let stats = stats(proxy).await;
    let gauge = |name: &str| stats["proxy"][name].as_u64().unwrap();
    (gauge("connections_open"), gauge("connections_idle"))
}

#[tokio::test]
async fn an_idle_connection_gives_up_its_buffers_and_still_serves_its_next_request() {
    let (proxy, backend) = stable_proxy("").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(get_on(&mut s).await.starts_with("HTTP/1.1 200"));
    // Parked after a second of quiet (the admin requests use connections of their own).
    eventually(Duration::from_secs(5), || async {
        connections(&proxy).await == (1, 1)
    })
    .await;
    for _ in 0..3 {
        assert!(get_on(&mut s).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(backend.hits(), 4);
    assert_eq!(connections(&proxy).await, (1, 0), "busy again, so not idle");
    drop(s);
    eventually(Duration::from_secs(5), || async {
        connections(&proxy).await == (0, 0)
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_connection_idle_for_longer_than_idle_timeout_is_closed() {
    let (proxy, _b) = stable_proxy("limits: { idle_timeout: 300ms }\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    get_on(&mut s).await;
    // One second of quiet before it parks, then the idle timeout.
    let (waited, rest) = closed(&mut s).await;
    assert!(rest.is_empty());
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    proxy.stop().await;
}

/// How long until the proxy closes `s`, and what it sent before; within 5 s.
async fn closed(s: &mut TcpStream) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .unwrap();
    (started.elapsed(), rest)
}

/// An HTTP/2 connection with no request in flight is closed after `idle_timeout` as well,
/// one that never made a request included: else a client that sends the preface and then
/// nothing would hold a place under `max_connections` for good.
#[tokio::test]
async fn an_http2_connection_without_requests_for_longer_than_idle_timeout_is_closed() {
    let (proxy, _b) = stable_proxy("limits: { idle_timeout: 300ms }\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The preface and an empty SETTINGS frame, then silence.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (waited, _) = closed(&mut s).await;
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    proxy.stop().await;
}

/// A request in flight keeps an HTTP/2 connection open past `idle_timeout`, however long
/// it takes, and the connection serves the next one after it.
#[tokio::test]
async fn an_http2_request_longer_than_idle_timeout_is_not_cut() {
    use crate::support::{Backend, Mode, h2_client, send, stable_only};
    use http_body_util::Full;
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(800))).await;
    let proxy = Proxy::start(&stable_only("limits: { idle_timeout: 250ms }\n", slow.addr)).await;
    let c = h2_client();
    for _ in 0..2 {
        let req = http::Request::get(proxy.url("/"))
            .body(Full::default())
            .unwrap();
        let (status, _, body) = send(&c, req).await.expect("answered");
        assert_eq!((status.as_u16(), body.as_str()), (200, "stable"));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_drain_closes_idle_connections_at_once_instead_of_waiting_for_its_deadline() {
    let (mut proxy, _b) = stable_proxy("drain_timeout: 30s\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    get_on(&mut s).await;
    eventually(Duration::from_secs(5), || async {
        connections(&proxy).await == (1, 1)
    })
    .await;
    drains_within(&mut proxy, Duration::from_secs(5)).await;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// A drain does not wait for its deadline on an idle HTTP/2 client that never answers the
/// shutdown PING (one gone without a word): it ends a second after nothing is in flight.
#[tokio::test]
async fn a_drain_does_not_wait_for_an_http2_client_that_never_answers() {
    let (mut proxy, _b) = stable_proxy("drain_timeout: 30s\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // The proxy's SETTINGS: the connection is being served as HTTP/2.
    let mut settings = [0u8; 9];
    s.read_exact(&mut settings).await.unwrap();
    assert_eq!(settings[3], 4, "a SETTINGS frame");
    drains_within(&mut proxy, Duration::from_secs(5)).await;
}

/// An HTTP/2 client that stops reading with a response under way: `send_timeout` resets the
/// stream, and the connection, with nothing in flight and its writes standing still, is
/// closed once idle; a drain does not wait for it either.
#[tokio::test]
async fn an_http2_client_that_stops_reading_is_closed_once_nothing_is_in_flight() {
    for drained in [false, true] {
        let limits = "limits: { idle_timeout: 300ms, send_timeout: 300ms }\ndrain_timeout: 30s\n";
        let (mut proxy, _b) = stable_proxy(limits).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(proxy.addr).await.unwrap();
        let hello = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            // SETTINGS: INITIAL_WINDOW_SIZE as large as it goes; the connection's window too.
            h2_frame(4, 0, 0, b"\0\x04\x7f\xff\xff\xff"),
            h2_frame(8, 0, 0, b"\x7f\xff\0\0"),
            // HEADERS, stream 1, END_STREAM | END_HEADERS: GET http://a/endless.
            h2_frame(1, 5, 1, b"\x82\x86\x04\x08/endless\x01\x01a"),
        ];
        s.write_all(&hello.concat()).await.unwrap();
        // Never read again: the stream is cut once the client has taken nothing for a while.
        eventually(Duration::from_secs(10), || async {
            stats(&proxy).await["proxy"]["responses_unread"].as_u64() == Some(1)
        })
        .await;
        let started = Instant::now();
        if drained {
            proxy.begin_stop().await.unwrap().unwrap();
        } else {
            eventually(Duration::from_secs(10), || async {
                connections(&proxy).await.0 == 0
            })
            .await;
            proxy.stop().await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        drop(s);
    }
}

/// A client closed for being idle that never answers the closing PING is dropped a whole
/// `idle_timeout` later, though it keeps sending frames of its own (PINGs) and asking for
/// nothing: it is not held for good.
#[tokio::test]
async fn an_http2_client_closed_for_idleness_is_dropped_though_it_keeps_pinging() {
    use crate::support::RawH2;
    let (proxy, _b) = stable_proxy("limits: { idle_timeout: 300ms }\n").await;
    let mut client = RawH2::connect(proxy.addr).await;
    eventually(Duration::from_secs(5), || async { client.got_goaway() }).await;
    let started = Instant::now();
    while client.send(&h2_frame(6, 0, 0, &[0; 8])).await && !client.closed() {
        assert!(started.elapsed() < Duration::from_secs(5), "still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.stop().await;
}

/// A drain that begins while an HTTP/2 connection is being closed for idleness does not
/// wait out that close's `idle_timeout`: a client that never answers is dropped a second
/// after, as any other while draining.
#[tokio::test]
async fn a_drain_during_an_idle_close_does_not_wait_for_the_idle_timeout() {
    use crate::support::RawH2;
    let (mut proxy, _b) = stable_proxy("limits: { idle_timeout: 5s }\ndrain_timeout: 30s\n").await;
    let client = RawH2::connect(proxy.addr).await;
    eventually(Duration::from_secs(10), || async { client.got_goaway() }).await;
    drains_within(&mut proxy, Duration::from_secs(3)).await;
    eventually(Duration::from_secs(2), || async { client.closed() }).await;
}
