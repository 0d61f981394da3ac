//! Malformed and ambiguous requests, oversized heads, slow clients, too many connections.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Backend, Mode, Proxy, eventually, exchange, get, send, stable_only, stable_proxy, stats,
};

fn statuses(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect()
}

#[tokio::test]
async fn a_malformed_request_gets_400_and_the_connection_closes() {
    let (proxy, _b) = stable_proxy("").await;
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
    ] {
        let (text, closed) = exchange(proxy.addr, raw).await;
        assert_eq!(statuses(&text), ["400"], "{text}");
        assert!(closed);
    }
    // Heads hyper refuses itself are counted too. The count comes as each connection ends.
    eventually(Duration::from_secs(5), || async {
        stats(&proxy).await["proxy"]["bad_requests"] == 3
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_transfer_encoding_other_than_chunked_is_refused_and_the_connection_closes() {
    let (proxy, b) = stable_proxy("").await;
    for te in [
        "gzip",
        "gzip, chunked",
        "chunked, chunked",
        "chunked\r\nTransfer-Encoding: chunked",
    ] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let (text, closed) = exchange(proxy.addr, raw.as_bytes()).await;
        assert_eq!(statuses(&text), ["400"], "{te}: {text}");
        assert!(closed, "{te}");
    }
    assert_eq!(b.hits(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn repeated_or_conflicting_content_lengths_are_refused_and_the_connection_closes() {
    let (proxy, b) = stable_proxy("").await;
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 30",
        "Content-Length: 5\r\ncontent-length: 5",
        // A space before the colon: hyper refuses the head itself (the scan reads a name
        // only when its colon follows it at once).
        "Content-Length : 5\r\nContent-Length: 30",
        "Transfer-Encoding : chunked\r\nContent-Length: 5",
    ] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: a\r\n{lengths}\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let (text, closed) = exchange(proxy.addr, raw.as_bytes()).await;
        assert_eq!(statuses(&text), ["400"], "{lengths}: {text}");
        assert!(closed, "{lengths}");
    }
    assert_eq!(b.hits(), 0);
    proxy.stop().await;
}

/// Regression for hyper issues 3860 and 4123: hyper frames such a request by the chunked
/// coding and drops the Content-Length (so the service never sees both); the proxy reads the
/// raw head, refuses it in either order, and closes, so the smuggled request is never read.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    let (proxy, b) = stable_proxy("").await;
    for (first, second) in [
        ("Content-Length: 40", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked", "Content-Length: 40"),
    ] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: a\r\n{first}\r\n{second}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let (text, closed) = exchange(proxy.addr, raw.as_bytes()).await;
        assert_eq!(statuses(&text), ["400"], "{first} / {second}: {text}");
        assert!(
            text.contains("both content-length and transfer-encoding"),
            "{text}"
        );
        assert!(closed, "{first} / {second}: connection kept open");
    }
    assert_eq!(b.hits(), 0);
    proxy.stop().await;
}

/// The raw scan stops at a head with `Upgrade` (what follows may be another protocol's
/// bytes). So that nothing after it goes unscanned, such a connection closes after its answer
/// unless it became a tunnel: here the backend answers 200 (no switch), and the ambiguous
/// request pipelined behind is never read.
#[tokio::test]
async fn a_request_asking_to_upgrade_that_is_not_switched_closes_its_connection() {
    let (proxy, b) = stable_proxy("").await;
    for upgrade in [
        "Upgrade: websocket\r\nConnection: upgrade",
        "Upgrade: websocket",
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
    ] {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{upgrade}\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let (text, closed) = exchange(proxy.addr, raw.as_bytes()).await;
        assert_eq!(statuses(&text), ["200"], "{upgrade}: {text}");
        assert!(closed, "{upgrade}: connection kept open");
    }
    assert_eq!(b.hits(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn clean_pipelined_requests_after_bodies_are_all_served() {
    let (proxy, b) = stable_proxy("").await;
    let raw = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (text, closed) = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), ["200", "200", "200"], "{text}");
    assert!(closed);
    assert_eq!(b.hits(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_are_refused() {
    let (proxy, b) = stable_proxy("limits: { max_headers: 20, max_header_bytes: 8192 }\n").await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (text, closed) = exchange(proxy.addr, big.as_bytes()).await;
    assert_eq!(statuses(&text), ["431"], "{text}");
    assert!(closed);
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (text, closed) = exchange(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(statuses(&text), ["431"], "{text}");
    assert!(closed);
    // The same limits over HTTP/2: a header list over the bytes, or over the count.
    let h2 = crate::support::h2_client();
    let mut big = http::Request::get(proxy.url("/"));
    big = big.header("x-big", "a".repeat(20_000));
    let mut many = http::Request::get(proxy.url("/"));
    for i in 0..40 {
        many = many.header(format!("x-h{i}"), "v");
    }
    for req in [big, many] {
        let (status, _, _) = send(&h2, req.body(Default::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    assert_eq!(b.hits(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_its_head_too_slowly_is_disconnected() {
    let (proxy, _b) = stable_proxy("limits: { header_read_timeout: 300ms }\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Drip one header line at a time, as slowloris does, until the proxy hangs up.
            if s.write_all(b"X-Drip: 1\r\n").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(100), s.read_to_end(&mut buf)).await {
                Ok(_) => return,
                Err(_) => continue,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "still connected after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let (proxy, _b) = stable_proxy("limits: { max_connections: 2 }\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection was served");
    drop(held);
    proxy.stop().await;
}

/// `max_connections` is one limit for the whole proxy, not one for each listener.
#[tokio::test]
async fn the_connection_limit_is_shared_by_every_listener() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&format!(
        "listen: [127.0.0.1:0, 127.0.0.1:0]\nadmin: 127.0.0.1:0\nlimits: {{ max_connections: 1 }}\n{}",
        stable_only("", stable.addr)
    ))
    .await;
    let mut held = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).await.unwrap() > 0);
    let mut other = TcpStream::connect(proxy.addrs[1]).await.unwrap();
    let _ = other.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut out = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut out))
        .await
        .expect("the second listener served over the limit and kept the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "the second listener served over the limit");
    drop(held);
    proxy.stop().await;
}

type Answer = Option<(http::StatusCode, http::HeaderMap, String)>;

/// A proxy allowed one request in flight, and that one request, waiting on a slow backend.
async fn proxy_at_its_request_limit() -> (Proxy, tokio::task::JoinHandle<Answer>, Backend) {
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(800))).await;
    let yaml = stable_only("limits: { max_requests: 1 }\n", slow.addr);
    let proxy = Proxy::start(&yaml).await;
    let url = proxy.url("/");
    let busy = tokio::spawn(async move { get(&url).await });
    eventually(Duration::from_secs(5), || async { slow.hits() == 1 }).await;
    (proxy, busy, slow)
}

/// The same when the proxy itself refuses the request asking to upgrade (here: shed for
/// overload): the connection closes, and the ambiguous request behind is never read.
#[tokio::test]
async fn a_request_asking_to_upgrade_that_is_shed_closes_its_connection() {
    let (proxy, first, slow) = proxy_at_its_request_limit().await;
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nContent-Length: 40\r\n\r\n";
    let (text, closed) = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), ["503"], "{text}");
    assert!(closed, "connection kept open");
    first.await.unwrap().unwrap();
    assert_eq!(slow.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn requests_over_max_requests_in_flight_get_503_at_once_and_are_counted() {
    let (proxy, first, _slow) = proxy_at_its_request_limit().await;
    let started = Instant::now();
    let (status, _, body) = get(&proxy.url("/")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (503, "overloaded\n"));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shed at once"
    );
    let (status, _, _) = first.await.unwrap().unwrap();
    assert_eq!(status.as_u16(), 200);
    // The permit came back with the first answer.
    assert_eq!(get(&proxy.url("/")).await.unwrap().0.as_u16(), 200);
    assert_eq!(stats(&proxy).await["proxy"]["requests_shed"], 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_shed_request_keeps_the_smuggling_verdicts_in_step_with_the_requests() {
    let (proxy, busy, _slow) = proxy_at_its_request_limit().await;
    // The first is shed; the second is ambiguous and must still be refused as such.
    let (text, closed) = exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&text), ["503", "400"], "{text}");
    assert!(closed);
    busy.await.unwrap().unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_without_one_well_formed_host_is_refused_and_the_connection_closes() {
    let (proxy, b) = stable_proxy("").await;
    for head in [
        "GET / HTTP/1.1\r\n",
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n",
        "GET / HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n",
        "GET / HTTP/1.1\r\nHost: a b/c\r\n",
        "GET / HTTP/1.1\r\nHost: a.example, b.example\r\n",
        "GET / HTTP/1.1\r\nHost: user@a.example\r\n",
        "GET / HTTP/1.1\r\nHost: a.example:1:2\r\n",
        "GET / HTTP/1.1\r\nHost: a.example:abc\r\n",
        "GET http://user:pw@a.example/ HTTP/1.1\r\nHost: a.example\r\n",
        "GET ftp://a.example/ HTTP/1.1\r\nHost: a.example\r\n",
        // An absolute-form target replaces the Host, but HTTP/1.1 still requires a good one.
        "GET http://a.example/ HTTP/1.1\r\n",
        "GET http://a.example/ HTTP/1.1\r\nHost: a b\r\n",
    ] {
        let (text, closed) = exchange(proxy.addr, format!("{head}\r\n").as_bytes()).await;
        assert_eq!(statuses(&text), ["400"], "{head:?}: {text}");
        assert!(closed, "{head:?}");
    }
    assert_eq!(b.hits(), 0);
    // HTTP/1.0 needs no Host, and an empty one is allowed (RFC 9112 §3.2).
    for head in [
        "GET / HTTP/1.0\r\n",
        "GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n",
    ] {
        let (text, _) = exchange(proxy.addr, format!("{head}\r\n").as_bytes()).await;
        assert_eq!(text.get(8..13), Some(" 200 "), "{head:?}: {text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_absolute_form_request_is_routed_and_forwarded_by_the_host_of_its_target() {
    let (stable, canary) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
    );
    let yaml = format!(
        "tracks:\n  stable: {{ backends: [\"{}\"] }}\n  canary: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ host: api.example.com, split: {{ canary: 10000 }} }}\n  - {{ split: {{ stable: 10000 }} }}\n",
        stable.addr, canary.addr
    );
    let proxy = Proxy::start(&yaml).await;
    // The target's host wins over the Host sent, for routing and for the backend alike
    // (RFC 9112 §3.2.2): no backend reads another host than the one routing used.
    let raw = "GET http://api.example.com/p?q=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    let (text, _) = exchange(proxy.addr, raw.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.ends_with("canary"), "{text}");
    let text = text.to_ascii_lowercase();
    assert!(text.contains("x-seen-host: api.example.com\r\n"), "{text}");
    assert!(!text.contains("other.example"), "{text}");
    assert_eq!(stable.hits(), 0);
    // Nor can a client take the host away by naming it in `Connection`.
    let raw = "GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: host, close\r\n\r\n";
    let (text, _) = exchange(proxy.addr, raw.as_bytes()).await;
    assert!(
        text.to_ascii_lowercase()
            .contains("x-seen-host: api.example.com\r\n"),
        "{text}"
    );
    // A reverse proxy opens no tunnels.
    let raw = "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n";
    let (text, closed) = exchange(proxy.addr, raw.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert!(closed);
    assert_eq!((stable.hits(), canary.hits()), (0, 2));
    proxy.stop().await;
}
