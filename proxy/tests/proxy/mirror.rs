use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use crate::support::{
    Backend, Mode, Proxy, RawBackend, client, dead_addr, eventually, h2_client, send, series, stats,
};

fn config(stable: std::net::SocketAddr, shadow: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "{extra}tracks:\n  stable: {{ backends: [\"{stable}\"] }}\n  shadow: {{ backends: [\"{shadow}\"] }}\nroutes:\n  - {{ name: web, split: {{ stable: 10000 }}, mirror: {{ to: shadow, percent: 100 }} }}\n"
    )
}

/// The shadow track's mirror series, with the proxy-wide counters under `proxy`.
async fn mirror_series(proxy: &Proxy) -> Value {
    let stats = stats(proxy).await;
    let mut found = series(&stats, "shadow", "mirror");
    found["proxy"] = stats["proxy"].clone();
    found
}

#[tokio::test]
async fn a_mirrored_copy_carries_the_body_and_the_mirror_mark_and_is_counted_under_the_mirror_track()
 {
    // Over HTTP/1.1 the copy goes out on the proxy's own client; over HTTP/2 on hyper's.
    for (c, version) in [(client(), "HTTP/1.1"), (h2_client(), "HTTP/2.0")] {
        let (_stable, shadow, proxy) = mirroring("").await;
        let req = Request::post(proxy.url("/orders"))
            .body(Full::new(Bytes::from_static(b"twelve bytes")))
            .unwrap();
        let (status, h, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        assert_eq!(h["x-seen-version"], version);
        assert!(
            h.get("x-seen-mirror").is_none(),
            "the primary is not marked"
        );
        eventually(Duration::from_secs(5), || async {
            mirror_series(&proxy).await["responses"]["2xx"] == 1
        })
        .await;
        assert_eq!(shadow.hits(), 1);
        let (headers, body) = shadow.last.lock().unwrap().clone().unwrap();
        assert_eq!(body, "twelve bytes", "{version}");
        assert_eq!(headers["x-fleet-mirror"], "1", "{version}");
        assert_eq!(headers.get_all("x-fleet-mirror").iter().count(), 1);
        assert_eq!(headers["content-length"], "12", "{version}");
        proxy.stop().await;
    }
}

/// A mirrored gRPC call's outcome is read from its answer's trailers and counted under the
/// mirror track, as the primary's is: a failing shadow does not look healthy.
#[tokio::test]
async fn a_mirrored_grpc_calls_failure_is_counted_from_its_trailers() {
    // Over HTTP/1.1 the copy would be pipelined but for its gRPC; over HTTP/2, hyper's.
    for c in [client(), h2_client()] {
        let (_stable, _shadow, proxy) = mirroring("").await;
        for status in ["14", "0"] {
            let req = Request::post(proxy.url("/svc/Call"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("x-grpc-status", status)
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap();
            assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
        }
        eventually(Duration::from_secs(5), || async {
            let mirrored = mirror_series(&proxy).await;
            mirrored["responses"]["2xx"] == 2 && mirrored["grpc_errors"] != 0
        })
        .await;
        let mirrored = mirror_series(&proxy).await;
        assert_eq!(mirrored["grpc_errors"], 1, "{mirrored}");
        let primary = series(&stats(&proxy).await, "stable", "primary");
        assert_eq!(primary["grpc_errors"], 1, "{primary}");
        proxy.stop().await;
    }
}

/// A mirrored gRPC call's failure counts from a trailers-only head too, and an answer with no
/// status counts as one; an answer the mirror's timeout cuts mid-body counts by its status
/// alone: the proxy ended it, not the shadow.
#[tokio::test]
async fn a_mirrored_grpc_answer_cut_by_the_timeout_counts_by_its_status_alone() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let shadow = RawBackend::start(|head| {
        let grpc = "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n";
        let answer = match head.split(' ').nth(1).unwrap_or_default() {
            "/head-only" => format!("{grpc}grpc-status: 14\r\ncontent-length: 0\r\n\r\n"),
            "/no-status" => format!("{grpc}content-length: 5\r\n\r\n\0\0\0\0\0"),
            // A stream that goes on past the timeout.
            _ => format!("{grpc}transfer-encoding: chunked\r\n\r\n5\r\n\0\0\0\0\0\r\n"),
        };
        (answer.into_bytes(), false)
    })
    .await;
    let extra = "mirror: { timeout: 500ms }\n";
    let proxy = Proxy::start(&config(stable.addr, shadow.addr, extra)).await;
    let c = client();
    for path in ["/head-only", "/no-status", "/stream"] {
        let req = Request::post(proxy.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    }
    // The stream's connection is let go once the timeout cut it.
    eventually(Duration::from_secs(5), || async {
        shadow.closed.load(Ordering::SeqCst) && mirror_series(&proxy).await["grpc_errors"] == 2
    })
    .await;
    let mirrored = mirror_series(&proxy).await;
    assert_eq!(mirrored["responses"]["2xx"], 3, "{mirrored}");
    assert_eq!(mirrored["errors"], 0, "{mirrored}");
    assert_eq!(mirrored["grpc_errors"], 2, "{mirrored}");
    proxy.stop().await;
}

/// A request asking to switch protocols is not copied: a copy cannot become a tunnel, and a
/// shadow that answered it with `101` would be counted as failing.
#[tokio::test]
async fn a_request_asking_to_upgrade_is_not_mirrored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_stable, shadow, proxy) = mirroring("").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    drop(s);
    // A plain request after it is copied; once its copy is counted, the shadow has seen
    // that one only.
    get_n(&proxy, 1).await;
    eventually(Duration::from_secs(5), || async {
        mirror_series(&proxy).await["responses"]["2xx"] == 1
    })
    .await;
    assert_eq!(shadow.hits(), 1);
    proxy.stop().await;
}

/// A proxy mirroring every request from a healthy stable backend to a healthy shadow, with
/// `extra` settings; the backends are returned to be kept alive and looked at.
async fn mirroring(extra: &str) -> (Backend, Backend, Proxy) {
    let (stable, shadow) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    );
    let proxy = Proxy::start(&config(stable.addr, shadow.addr, extra)).await;
    (stable, shadow, proxy)
}

/// Sends `n` GETs one after the other; each must succeed.
async fn get_n(proxy: &Proxy, n: usize) {
    let c = client();
    for _ in 0..n {
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test]
async fn copies_due_within_the_batch_window_are_held_and_then_go_out_together() {
    let (_stable, shadow, proxy) = mirroring("mirror: { batch_window: 1s }\n").await;
    let window = Duration::from_secs(1);
    let first = Instant::now();
    get_n(&proxy, 5).await;
    // The primaries did not wait for the window; their copies did.
    let hits = shadow.hits();
    let answered = first.elapsed();
    assert!(
        answered < window * 9 / 10,
        "five requests took {answered:?}"
    );
    assert_eq!(hits, 0, "a copy went out before the window closed");
    eventually(Duration::from_secs(10), || async { shadow.hits() == 5 }).await;
    assert!(first.elapsed() >= window);
    eventually(Duration::from_secs(5), || async {
        mirror_series(&proxy).await["responses"]["2xx"] == 5
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_batch_that_fills_every_place_goes_at_once() {
    let extra = "mirror: { concurrency: 2, batch_window: 1s }\n";
    let (_stable, shadow, proxy) = mirroring(extra).await;
    let window = Duration::from_secs(1);
    let first = Instant::now();
    get_n(&proxy, 3).await;
    // The second copy took the last place: those two went without waiting for the window;
    // the third waits for a place, then for a window of its own.
    eventually(Duration::from_secs(10), || async { shadow.hits() >= 2 }).await;
    let two = first.elapsed();
    assert!(two < window * 9 / 10, "the first two copies took {two:?}");
    eventually(Duration::from_secs(10), || async { shadow.hits() == 3 }).await;
    assert!(first.elapsed() >= window);
    proxy.stop().await;
}

/// The primary's latency with a mirror that is broken in `shadow` mode stays that of a
/// healthy proxy: far below the mirror's 5 s, and every request succeeds. Copies sent each
/// at once or gathered in batches (`batching` goes after `mirror: {`).
async fn primary_is_unaffected(shadow_addr: std::net::SocketAddr, batching: &str) -> Value {
    let stable = Backend::start("stable", Mode::Normal).await;
    let extra = format!("mirror: {{ {batching}queue: 4, concurrency: 2, timeout: 10s }}\n");
    let proxy = Proxy::start(&config(stable.addr, shadow_addr, &extra)).await;
    let c = client();
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let started = Instant::now();
        let req = Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a primary request took {slowest:?}"
    );
    let series = mirror_series(&proxy).await;
    proxy.stop().await;
    series
}

#[tokio::test]
async fn a_mirror_that_sleeps_five_seconds_leaves_the_primary_untouched_and_is_shed() {
    for batching in ["", "batch_window: 0s, "] {
        let shadow = Backend::start("shadow", Mode::Slow(Duration::from_secs(5))).await;
        let series = primary_is_unaffected(shadow.addr, batching).await;
        // Two in flight, four queued: the rest of the 200 copies were shed.
        assert!(
            series["proxy"]["mirror_shed"].as_u64().unwrap() >= 190,
            "{batching}{series}"
        );
    }
}

#[tokio::test]
async fn a_mirror_that_refuses_connections_leaves_the_primary_untouched_and_counts_errors() {
    for batching in ["", "batch_window: 0s, "] {
        let series = primary_is_unaffected(dead_addr().await, batching).await;
        let counted =
            series["errors"].as_u64().unwrap() + series["proxy"]["mirror_shed"].as_u64().unwrap();
        assert!(counted > 0, "{batching}{series}");
        assert_eq!(series["responses"]["2xx"], 0);
    }
}

#[tokio::test]
async fn a_body_over_the_mirror_cap_is_not_mirrored_and_is_counted() {
    let (_stable, shadow, proxy) = mirroring("mirror: { max_body_bytes: 1024 }\n").await;
    let req = Request::post(proxy.url("/"))
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    let (status, h, _) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["x-seen-body-len"], "4096");
    // Without a Content-Length the body is teed until it passes the cap, then dropped.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let chunk = "y".repeat(2048);
    let head =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let request = format!("{head}800\r\n{chunk}\r\n800\r\n{chunk}\r\n0\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut raw, request.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut answer)
        .await
        .unwrap();
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-seen-body-len: 4096"),
        "{answer}"
    );
    eventually(Duration::from_secs(5), || async {
        mirror_series(&proxy).await["proxy"]["mirror_skipped_body_too_large"] == 2
    })
    .await;
    assert_eq!(shadow.hits(), 0);
    proxy.stop().await;
}

/// The shadow as a hand-written backend (`answer` as for [`RawBackend`]), every request
/// mirrored, copies gathered for a second; returns the primary's backend too, to keep alive.
async fn mirroring_to_raw<F>(answer: F) -> (Backend, RawBackend, Proxy)
where
    F: Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
{
    let stable = Backend::start("stable", Mode::Normal).await;
    let shadow = RawBackend::start(answer).await;
    let extra = "mirror: { batch_window: 1s }\n";
    let proxy = Proxy::start(&config(stable.addr, shadow.addr, extra)).await;
    (stable, shadow, proxy)
}

/// The mirror's count of answers by class and of errors, once `n` copies are counted.
async fn counted(proxy: &Proxy, n: u64) -> (u64, u64) {
    eventually(Duration::from_secs(10), || async {
        mirror_series(proxy).await["requests"].as_u64() == Some(n)
    })
    .await;
    let series = mirror_series(proxy).await;
    let ok = series["responses"]["2xx"].as_u64().unwrap();
    (ok, series["errors"].as_u64().unwrap())
}

#[tokio::test]
async fn the_copies_of_a_batch_go_pipelined_on_one_connection_and_every_framing_is_read() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (_stable, shadow, proxy) = mirroring_to_raw(move |head| {
        let line = head.lines().next().unwrap_or_default().to_string();
        log.lock().unwrap().push(line.clone());
        let bytes: &[u8] = match line.as_str() {
            "HEAD /length HTTP/1.1" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            "GET /length HTTP/1.1" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "GET /chunked HTTP/1.1" => {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\nx-t: 1\r\n\r\n"
            }
            "GET /interim HTTP/1.1" => {
                b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            }
            "POST /body HTTP/1.1" => b"HTTP/1.1 201 Created\r\nCONTENT-LENGTH: 0\r\n\r\n",
            _ => b"HTTP/1.1 204 No Content\r\n\r\n",
        };
        (bytes.to_vec(), false)
    })
    .await;
    let c = client();
    let sent = [
        (Method::GET, "/length"),
        (Method::HEAD, "/length"),
        (Method::GET, "/chunked"),
        (Method::GET, "/interim"),
        (Method::POST, "/body"),
        (Method::GET, "/none"),
    ];
    for (method, path) in &sent {
        let body = match *method == Method::POST {
            true => Full::new(Bytes::from_static(b"abc")),
            false => Full::default(),
        };
        let req = Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .body(body)
            .unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(counted(&proxy, 6).await, (6, 0));
    assert_eq!(shadow.conns(), 1, "one connection carried the batch");
    let expected: Vec<_> = sent
        .iter()
        .map(|(m, p)| format!("{m} {p} HTTP/1.1"))
        .collect();
    assert_eq!(*seen.lock().unwrap(), expected, "in the order sent");
    // The connection went back to the pool and carries the next batch.
    get_n(&proxy, 2).await;
    assert_eq!(counted(&proxy, 8).await, (8, 0));
    assert_eq!(shadow.conns(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn copies_a_shadow_closed_the_connection_before_processing_are_sent_again() {
    // Each answer says the connection ends with it: the copies behind it were not processed
    // (RFC 9112, section 9.6), so each goes again, on a new connection.
    let (_stable, shadow, proxy) = mirroring_to_raw(|_| {
        let bytes = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        (bytes.to_vec(), true)
    })
    .await;
    get_n(&proxy, 5).await;
    assert_eq!(counted(&proxy, 5).await, (5, 0));
    assert_eq!(shadow.conns(), 5);
    proxy.stop().await;
}

#[tokio::test]
async fn copies_behind_a_connection_that_broke_are_counted_as_errors() {
    // The second answer ends the connection without saying so: what became of the copies
    // behind it is unknown, and they are not sent again.
    let answered = Arc::new(AtomicUsize::new(0));
    let (_stable, shadow, proxy) = mirroring_to_raw(move |_| {
        let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
            n == 2,
        )
    })
    .await;
    get_n(&proxy, 5).await;
    assert_eq!(counted(&proxy, 5).await, (2, 3));
    assert_eq!(shadow.conns(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn copies_a_shadow_never_answers_fail_at_the_mirror_timeout() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let shadow = RawBackend::start(|_| (Vec::new(), false)).await;
    let extra = "mirror: { batch_window: 100ms, timeout: 300ms }\n";
    let proxy = Proxy::start(&config(stable.addr, shadow.addr, extra)).await;
    let first = Instant::now();
    get_n(&proxy, 3).await;
    assert_eq!(counted(&proxy, 3).await, (0, 3));
    assert!(first.elapsed() >= Duration::from_millis(300));
    proxy.stop().await;
}

#[tokio::test]
async fn a_shadow_streaming_an_endless_answer_is_cut_at_the_mirror_timeout_and_counted_by_its_head()
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A shadow that answers each copy with a body it never ends, as fast as the proxy reads.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shadow = listener.local_addr().unwrap();
    let stream_one = |mut stream: tokio::net::TcpStream| async move {
        let mut buf = [0; 4096];
        let _ = stream.read(&mut buf).await;
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n";
        stream.write_all(head).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    };
    let streaming = tokio::spawn(async move {
        let (first, _) = listener.accept().await.unwrap();
        stream_one(first).await;
        let (second, _) = listener.accept().await.unwrap();
        stream_one(second).await;
    });
    let stable = Backend::start("stable", Mode::Normal).await;
    // One failure would eject the shadow: the cut must not count as its failure.
    let extra = "upstream: { eject_after: 1, eject_for: 1m }\nmirror: { batch_window: 0s, timeout: 300ms }\n";
    let proxy = Proxy::start(&config(stable.addr, shadow, extra)).await;
    get_n(&proxy, 1).await;
    // The status came, then the body never ended: the proxy cut it, and the copy counts by
    // its head, as a primary request does.
    assert_eq!(counted(&proxy, 1).await, (1, 0));
    get_n(&proxy, 1).await;
    assert_eq!(
        counted(&proxy, 2).await,
        (2, 0),
        "the shadow was not ejected"
    );
    // The proxy let go of both connections: the shadow's writes fail and it stops.
    tokio::time::timeout(Duration::from_secs(10), streaming)
        .await
        .expect("the proxy kept reading past its timeout")
        .unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn copies_behind_an_answer_framed_two_ways_are_not_sent_again() {
    // The second answer carries both Content-Length and chunked coding: it is read by its
    // coding, but the connection is not trusted after it, and nothing said the shadow stopped
    // processing what followed.
    let answered = Arc::new(AtomicUsize::new(0));
    let (_stable, shadow, proxy) = mirroring_to_raw(move |_| {
        let bytes: &[u8] = match answered.fetch_add(1, Ordering::SeqCst) {
            1 => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            }
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        };
        (bytes.to_vec(), false)
    })
    .await;
    get_n(&proxy, 5).await;
    assert_eq!(counted(&proxy, 5).await, (2, 3));
    assert_eq!(shadow.conns(), 1, "not sent again");
    proxy.stop().await;
}

#[tokio::test]
async fn with_pipelining_off_each_copy_of_a_batch_has_a_connection_of_its_own() {
    let (_stable, shadow, proxy) =
        mirroring("mirror: { batch_window: 1s, pipeline: false }\n").await;
    get_n(&proxy, 4).await;
    eventually(Duration::from_secs(10), || async {
        mirror_series(&proxy).await["responses"]["2xx"] == 4
    })
    .await;
    assert_eq!(shadow.conns(), 4, "sent together, each on its own");
    proxy.stop().await;
}

#[tokio::test]
async fn a_batch_of_forty_with_answers_larger_than_the_socket_buffers_beside_a_copy_too_large_to_pipeline()
 {
    // Forty copies of 16 KiB, each answered with 256 KiB: 10 MiB of answers, more than the
    // sockets hold, read as they come and dropped. A copy of 20 KiB is too large to pipeline
    // and goes on a connection of its own.
    let answer = {
        let mut bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 262144\r\n\r\n".to_vec();
        bytes.resize(bytes.len() + 262_144, b'a');
        bytes
    };
    let (_stable, shadow, proxy) = mirroring_to_raw(move |_| (answer.clone(), false)).await;
    let c = client();
    for n in 0..41 {
        let size = if n == 20 { 20 * 1024 } else { 16 * 1024 };
        let req = Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(counted(&proxy, 41).await, (41, 0));
    assert_eq!(shadow.conns(), 2, "one pipeline and one copy on its own");
    proxy.stop().await;
}

/// A copy whose request body never reached its end is not sent, and is counted: here the
/// primary's backend refuses connections, so its body is never read. A bodiless request
/// is copied up front, and still goes.
#[tokio::test]
async fn a_copy_whose_body_never_reached_its_end_is_counted_as_skipped() {
    let shadow = Backend::start("shadow", Mode::Normal).await;
    let proxy = Proxy::start(&config(dead_addr().await, shadow.addr, "")).await;
    let post = Request::post(proxy.url("/orders"))
        .body(Full::new(Bytes::from_static(b"twelve bytes")))
        .unwrap();
    let (status, _, _) = send(&client(), post).await.unwrap();
    assert!(status.is_server_error(), "{status}");
    eventually(Duration::from_secs(5), || async {
        mirror_series(&proxy).await["proxy"]["mirror_skipped_incomplete"] == 1
    })
    .await;
    let get = Request::get(proxy.url("/")).body(Full::default()).unwrap();
    send(&client(), get).await.unwrap();
    eventually(Duration::from_secs(5), || async { shadow.hits() == 1 }).await;
    proxy.stop().await;
}
