use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::{
    Backend, Mode, Proxy, RawBackend, client, dead_addr, eventually, get, put, send, series,
    stable_h2c_proxy, stable_proxy, stats,
};

fn config(backends: &[std::net::SocketAddr], upstream: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "upstream: {upstream}\ntracks:\n  stable: {{ backends: [{}] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_another_backend_when_connect_fails() {
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[dead_addr().await, alive.addr],
        "{ eject_after: 1000 }",
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        let (status, _, body) = send(
            &c,
            Request::get(proxy.url("/")).body(Full::default()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    }
    proxy.stop().await;
}

/// A refused connection sent nothing: any request goes on to the next backend, a POST with
/// its body included (the body is taken only once a connection is had).
#[tokio::test]
async fn any_request_is_retried_on_another_backend_when_connect_fails() {
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[dead_addr().await, alive.addr],
        "{ eject_after: 1000 }",
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        let req = Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from_static(b"twelve bytes")))
            .unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        let (_, got) = alive.last.lock().unwrap().clone().unwrap();
        assert_eq!(got, "twelve bytes");
    }
    assert_eq!(alive.hits(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn a_get_reset_before_its_answer_is_retried_and_a_post_is_not() {
    // Takes every request, then hangs up without a word.
    let hangs_up = RawBackend::start(|_| (Vec::new(), true)).await;
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[hangs_up.addr, alive.addr],
        "{ eject_after: 1000 }",
    ))
    .await;
    let c = client();
    let mut statuses = Vec::new();
    // Round robin: two of the four GETs and two of each four POSTs go first to the one that
    // hangs up. A POST without a body is not retried either: the backend may have acted on it.
    for i in 0..12 {
        let req = match i {
            0..4 => Request::get(proxy.url("/")).body(Full::default()),
            4..8 => Request::post(proxy.url("/")).body(Full::new(Bytes::from_static(b"x"))),
            _ => Request::post(proxy.url("/")).body(Full::default()),
        };
        let (status, _, body) = send(&c, req.unwrap()).await.unwrap();
        if i < 4 {
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "stable"),
                "GET {i}"
            );
        }
        statuses.push(status.as_u16());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 200, 200, 200, 502, 502, 502, 502],
        "half the POSTs met the reset"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_get_to_a_backend_slower_than_the_per_try_timeout_is_retried_on_another() {
    let slow = Backend::start("slow", Mode::Slow(Duration::from_secs(5))).await;
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[slow.addr, alive.addr],
        "{ per_try_timeout: 200ms, eject_after: 1000 }",
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        let started = std::time::Instant::now();
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "did not wait for the slow backend"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn consecutive_failures_eject_a_backend_and_with_none_left_the_answer_is_503_with_a_reason() {
    let proxy = Proxy::start(&config(
        &[dead_addr().await],
        "{ eject_after: 2, eject_for: 1m, retries: 0 }",
    ))
    .await;
    let c = client();
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (status, _, body) = send(
            &c,
            Request::get(proxy.url("/")).body(Full::default()).unwrap(),
        )
        .await
        .unwrap();
        answers.push((status.as_u16(), body));
    }
    assert_eq!(answers[0].0, 502);
    assert_eq!(answers[1].0, 502);
    assert_eq!(
        answers[2],
        (503, "no healthy backend for track stable\n".to_string())
    );
    assert_eq!(answers[3].0, 503);
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_slower_than_the_request_timeout_gets_504() {
    let slow = Backend::start("stable", Mode::Slow(Duration::from_secs(5))).await;
    let proxy = Proxy::start(&config(
        &[slow.addr],
        "{ request_timeout: 200ms, retries: 0 }",
    ))
    .await;
    let req = Request::post(proxy.url("/"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let (status, _, _) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    proxy.stop().await;
}

/// `retries` extra tries, no more: five backends that hang up, `retries: 3`, four tries.
#[tokio::test]
async fn a_failing_request_is_tried_retries_plus_one_times() {
    let mut hang_ups = Vec::new();
    for _ in 0..5 {
        hang_ups.push(RawBackend::start(|_| (Vec::new(), true)).await);
    }
    let addrs: Vec<_> = hang_ups.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config(&addrs, "{ retries: 3, eject_after: 1000 }")).await;
    let (status, _, _) = get(&proxy.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let tries: usize = hang_ups
        .iter()
        .map(|b| b.conns.load(Ordering::SeqCst))
        .sum();
    assert_eq!(tries, 4);
    proxy.stop().await;
}

/// The request timeout bounds all the tries together: four backends slower than the per-try
/// timeout would take 4 × 300 ms; the request ends at its 500 ms.
#[tokio::test]
async fn the_request_timeout_bounds_every_try_together() {
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(Backend::start("slow", Mode::Slow(Duration::from_secs(5))).await);
    }
    let addrs: Vec<_> = slow.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config(
        &addrs,
        "{ request_timeout: 500ms, per_try_timeout: 300ms, retries: 3, eject_after: 1000 }",
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _, _) = get(&proxy.url("/")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1100),
        "{took:?}"
    );
    let tried: usize = slow.iter().map(Backend::hits).sum();
    assert_eq!(tried, 2, "a second try at 300 ms, cut at 500 ms; no third");
    proxy.stop().await;
}

/// Ejection ends: after `eject_for` the backend is tried again.
#[tokio::test]
async fn an_ejected_backend_is_tried_again_after_eject_for() {
    let hangs_up = RawBackend::start(|_| (Vec::new(), true)).await;
    let proxy = Proxy::start(&config(
        &[hangs_up.addr],
        "{ retries: 0, eject_after: 1, eject_for: 300ms }",
    ))
    .await;
    let status = || async { get(&proxy.url("/")).await.unwrap().0 };
    assert_eq!(status().await, StatusCode::BAD_GATEWAY);
    assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE, "ejected");
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(5), || async {
        status().await == StatusCode::BAD_GATEWAY
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hangs_up.conns.load(Ordering::SeqCst), 2);
    proxy.stop().await;
}

/// A track's only backend, once ejected, takes one request at a time every `trial_every` (its
/// track's requests would all get 503 anyway); the first such trial it answers ends the
/// ejection, long before `eject_for`. (A backend restarted in a second by its agent.)
#[tokio::test]
async fn a_tracks_only_backend_ejected_is_back_at_the_first_trial_it_answers() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let failing = Arc::new(AtomicBool::new(true));
    let fails = failing.clone();
    let backend = RawBackend::start(move |_| match fails.load(Ordering::SeqCst) {
        true => (Vec::new(), true),
        false => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            false,
        ),
    })
    .await;
    let proxy = Proxy::start(&config(
        &[backend.addr],
        "{ retries: 0, eject_after: 1, eject_for: 1m, trial_every: 1s }",
    ))
    .await;
    let answer = || async {
        let (status, _, body) = get(&proxy.url("/")).await.unwrap();
        (status.as_u16(), body)
    };
    assert_eq!(answer().await.0, 502);
    let ejected = (503, "no healthy backend for track stable\n".to_string());
    assert_eq!(answer().await, ejected);
    // Still failing: a trial goes through a second after the ejection, fails (502), and the
    // backend stays out (the next trial is a second away: the checks below fit in it).
    let (mut seen, deadline) = (
        Vec::new(),
        std::time::Instant::now() + Duration::from_secs(5),
    );
    while backend.conns.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no trial: {seen:?}");
        seen.push(answer().await.0);
    }
    assert_eq!(seen.last(), Some(&502), "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|s| *s == 503), "{seen:?}");
    assert_eq!(answer().await, ejected, "a failed trial ends nothing");
    let health = |ejected: bool, passed: u32| {
        serde_json::json!([{
            "backend": backend.addr.to_string(), "ejected": ejected, "ejections": 1,
            "trials": { "passed": passed, "failed": 1 },
        }])
    };
    assert_eq!(stats(&proxy).await["backends"], health(true, 0));
    // It recovers: the next trial is answered, and it is back in at once.
    failing.store(false, Ordering::SeqCst);
    let recovered = std::time::Instant::now();
    eventually(Duration::from_secs(5), || async { answer().await.0 == 200 }).await;
    assert!(recovered.elapsed() < Duration::from_secs(5));
    for _ in 0..20 {
        assert_eq!(answer().await, (200, "ok".to_string()));
    }
    assert_eq!(stats(&proxy).await["backends"], health(false, 1));
    let (_, _, metrics) = get(&proxy.admin_url("/metrics")).await.unwrap();
    for line in [
        format!(
            "fleet_proxy_backend_ejected{{backend=\"{}\"}} 0",
            backend.addr
        ),
        format!(
            "fleet_proxy_backend_ejections_total{{backend=\"{}\"}} 1",
            backend.addr
        ),
        format!(
            "fleet_proxy_backend_trials_total{{backend=\"{}\",outcome=\"passed\"}} 1",
            backend.addr
        ),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    proxy.stop().await;
}

/// Trials are for a track with no backend left: while another is healthy, the ejected one
/// gets nothing for `eject_for`.
#[tokio::test]
async fn an_ejected_backend_beside_a_healthy_one_gets_no_trial() {
    let hangs_up = RawBackend::start(|_| (Vec::new(), true)).await;
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[hangs_up.addr, alive.addr],
        "{ retries: 0, eject_after: 1, eject_for: 1m, trial_every: 0s }",
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(get(&proxy.url("/")).await.unwrap().0.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        39,
        "{statuses:?}"
    );
    assert_eq!(hangs_up.conns.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

/// With `retries: 0` there is no other try to make room for: the one try has the whole
/// request timeout, not the per-try timeout.
#[tokio::test]
async fn without_retries_a_try_has_the_whole_request_timeout() {
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(400))).await;
    let proxy = Proxy::start(&config(
        &[slow.addr],
        "{ request_timeout: 5s, per_try_timeout: 100ms, retries: 0 }",
    ))
    .await;
    let (status, _, body) = get(&proxy.url("/")).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    proxy.stop().await;
}

/// A client slower with its body than the request timeout is the client's doing: 408, and
/// the backend waiting for the rest is not counted as failing (else a few slow uploads would
/// eject every backend of a track). Over HTTP/1.1, on the proxy's own client; over HTTP/2,
/// on hyper's.
#[tokio::test]
async fn a_request_body_still_arriving_at_the_deadline_gets_408_and_ejects_no_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream =
        "upstream: { request_timeout: 300ms, retries: 0, eject_after: 1, eject_for: 1m }\n";
    for (proxy, _backend) in [
        stable_proxy(upstream).await,
        stable_h2c_proxy(upstream).await,
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
            .await
            .unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(read.is_ok(), "no answer");
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        // Not ejected: the next request is served.
        let (status, _, body) = get(&proxy.url("/")).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        proxy.stop().await;
    }
}

#[tokio::test]
async fn an_upload_longer_than_the_timeouts_that_keeps_moving_is_not_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = "upstream: { request_timeout: 1s }\n";
    for (proxy, _backend) in [
        stable_proxy(upstream).await,
        stable_h2c_proxy(upstream).await,
    ] {
        // Eight pieces 300 ms apart, 2.4 s in all, more than twice the timeout; each piece
        // moves the upload. (A request with a body is never retried, so `per_try_timeout`
        // does not apply to it.)
        for method in ["POST"] {
            let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            let head = format!("{method} / HTTP/1.1\r\nHost: a\r\nContent-Length: 800\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..8 {
                s.write_all(&[b'x'; 100]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut out = Vec::new();
            let head = async {
                while !out.windows(4).any(|w| w == b"\r\n\r\n") {
                    if s.read_buf(&mut out).await.unwrap() == 0 {
                        break;
                    }
                }
            };
            let read = tokio::time::timeout(Duration::from_secs(5), head).await;
            let text = String::from_utf8_lossy(&out);
            assert!(read.is_ok(), "no answer");
            assert!(text.starts_with("HTTP/1.1 200"), "{method}: {text}");
            assert!(text.contains("x-seen-body-len: 800"), "{method}: {text}");
        }
        proxy.stop().await;
    }
}

/// The other way round: an HTTP/2 backend that stops taking the body (its window stays
/// shut) is the one failing, though the client has more to send: 504, and it counts
/// towards the backend's ejection.
#[tokio::test]
async fn an_http2_backend_that_stops_taking_the_body_is_counted_as_failing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 16 << 20;
    // Reads nothing of the body: it sleeps first.
    let backend = Backend::start("stable", Mode::Slow(Duration::from_secs(30))).await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ request_timeout: 500ms, retries: 0, eject_after: 1, eject_for: 1m }}\ntracks:\n  stable: {{ backends: [\"{}\"], protocol: h2c }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        backend.addr
    ))
    .await;
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {LEN}\r\n\r\n");
    let writer = tokio::spawn(async move {
        w.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..LEN / chunk.len() {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), r.read_buf(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(read.is_ok(), "no answer");
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    writer.abort();
    // Ejected: the next request finds no backend to go to.
    let (status, _, _) = get(&proxy.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.stop().await;
}

#[tokio::test]
async fn one_upstream_connection_serves_requests_one_after_another() {
    let backend = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(&[backend.addr], "{}")).await;
    let c = client();
    for i in 0..20 {
        let req = match i % 2 {
            0 => Request::get(proxy.url("/")).body(Full::default()),
            _ => Request::post(proxy.url("/")).body(Full::new(Bytes::from_static(b"body"))),
        };
        let (status, _, body) = send(&c, req.unwrap()).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    }
    assert_eq!(backend.hits(), 20);
    assert_eq!(
        backend.conns(),
        1,
        "every request after the first reuses the connection"
    );
    proxy.stop().await;
}

/// The statuses of `n` GETs sent at once.
async fn gets_at_once(proxy: &Proxy, n: usize) -> Vec<StatusCode> {
    let c = client();
    let all: Vec<_> = (0..n)
        .map(|_| {
            let c = c.clone();
            let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
            tokio::spawn(async move { send(&c, req).await.unwrap().0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for status in all {
        statuses.push(status.await.unwrap());
    }
    statuses
}

#[tokio::test]
async fn at_max_connections_per_backend_requests_wait_for_a_connection_and_then_get_503() {
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(300))).await;
    let proxy = Proxy::start(&config(
        &[slow.addr],
        "{ max_connections_per_backend: 2, request_timeout: 5s, per_try_timeout: 5s, eject_after: 1 }",
    ))
    .await;
    // Six at once over two connections: three rounds, all answered.
    let c = client();
    assert_eq!(gets_at_once(&proxy, 6).await, [StatusCode::OK; 6]);
    assert_eq!(slow.hits(), 6);
    assert_eq!(slow.conns(), 2);
    // Waiting past its deadline: 503, and the backend, busy rather than failing, stays in.
    // The one connection is held by a body still on its way (`/drip` holds back its second
    // piece for 2 s), which no try deadline bounds.
    let fast = Backend::start("stable", Mode::Normal).await;
    let tight = Proxy::start(&config(
        &[fast.addr],
        "{ max_connections_per_backend: 1, request_timeout: 100ms, retries: 0, eject_after: 1 }",
    ))
    .await;
    let drip = Request::get(tight.url("/drip"))
        .body(Full::default())
        .unwrap();
    let mut held = c.request(drip).await.unwrap().into_body();
    assert_eq!(
        held.frame().await.unwrap().unwrap().into_data().unwrap(),
        "first"
    );
    for _ in 0..2 {
        let req = Request::get(tight.url("/")).body(Full::default()).unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "every connection to track stable is in use\n");
    }
    // Once the body has ended the connection is free again.
    while held.frame().await.is_some() {}
    let req = Request::get(tight.url("/")).body(Full::default()).unwrap();
    assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    assert_eq!(fast.conns(), 1);
    proxy.stop().await;
    tight.stop().await;
}

#[tokio::test]
async fn a_request_that_waited_for_a_connection_gets_the_wait_back_for_its_exchange() {
    // Three at once over one connection, each answered in 500 ms, each try due in 700 ms:
    // the second waits 500 ms and then needs 500 more. Counted from the try's start, it
    // timed out, and with `eject_after: 1` took the backend out for everyone.
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(500))).await;
    let proxy = Proxy::start(&config(
        &[slow.addr],
        "{ max_connections_per_backend: 1, per_try_timeout: 700ms, request_timeout: 5s, eject_after: 1 }",
    ))
    .await;
    assert_eq!(gets_at_once(&proxy, 3).await, [StatusCode::OK; 3]);
    assert_eq!(slow.conns(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn round_robin_passes_over_a_backend_at_its_cap_to_one_with_room() {
    let (a, b) = (
        Backend::start("a", Mode::Normal).await,
        Backend::start("b", Mode::Normal).await,
    );
    let proxy = Proxy::start(&config(
        &[a.addr, b.addr],
        "{ max_connections_per_backend: 1 }",
    ))
    .await;
    let c = client();
    // One of them has its one connection held by a body still on its way.
    let drip = Request::get(proxy.url("/drip"))
        .body(Full::default())
        .unwrap();
    let mut held = c.request(drip).await.unwrap().into_body();
    let held_by = if a.hits() == 1 { "a" } else { "b" };
    assert_eq!(
        held.frame().await.unwrap().unwrap().into_data().unwrap(),
        "first"
    );
    // Every request goes to the other at once, where half would have waited out a try.
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        let (status, headers, _) = send(&c, req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_ne!(headers["x-served-by"], held_by);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    drop(held);
    proxy.stop().await;
}

/// A backend that answers one request per connection, as keep-alive, and then closes it: the
/// connection the proxy pooled is dead by the time the next request comes.
async fn one_shot_backend() -> RawBackend {
    RawBackend::start(|_| (STABLE.to_vec(), true)).await
}

const STABLE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nstable";

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_reused_so_even_a_post_succeeds() {
    let backend = one_shot_backend().await;
    let (addr, conns) = (backend.addr, backend.conns.clone());
    let proxy = Proxy::start(&config(&[addr], "{ retries: 0, eject_after: 1000 }")).await;
    let c = client();
    for _ in 0..10 {
        let req = Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 10);
    proxy.stop().await;
}

#[tokio::test]
async fn pooled_connections_to_a_backend_no_table_names_are_closed() {
    // A keep-alive backend that notes when the proxy closes its connection.
    let backend = RawBackend::start(|_| (STABLE.to_vec(), false)).await;
    let (old, closed) = (backend.addr, backend.closed.clone());
    let new = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(&[old], "{}")).await;
    let (status, _, body) = send(
        &client(),
        Request::get(proxy.url("/")).body(Full::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    assert!(!closed.load(Ordering::SeqCst), "kept for the next request");
    let table = format!(
        r#"{{"tracks": {{"stable": {{"backends": ["{}"]}}}}, "routes": [{{"split": {{"stable": 10000}}}}]}}"#,
        new.addr
    );
    assert_eq!(
        put(&proxy.admin_url("/routes"), &table).await.0,
        StatusCode::OK
    );
    eventually(Duration::from_secs(5), || async {
        closed.load(Ordering::SeqCst)
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_that_never_accepts_fails_at_the_connect_timeout_not_the_request_timeout() {
    // A listener whose one-place accept queue is full: the kernel drops further connection
    // attempts, so a connect to it hangs until the caller gives up.
    let stuck = tokio::net::TcpSocket::new_v4().unwrap();
    stuck.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = stuck.listen(0).unwrap();
    let addr = stuck.local_addr().unwrap();
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    let proxy = Proxy::start(&config(
        &[addr],
        "{ connect_timeout: 200ms, request_timeout: 10s, retries: 0 }",
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _, body) = send(
        &client(),
        Request::get(proxy.url("/")).body(Full::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream connect timed out\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_reused_connection_times_out_at_its_own_request_deadline() {
    // `/slow` is never answered; anything else is, and the connection stays open.
    let backend = RawBackend::start(|head| match head.starts_with("GET /slow") {
        true => (Vec::new(), false),
        false => (STABLE.to_vec(), false),
    })
    .await;
    let (addr, conns) = (backend.addr, backend.conns.clone());
    let proxy = Proxy::start(&config(
        &[addr],
        "{ request_timeout: 300ms, retries: 0, eject_after: 1000 }",
    ))
    .await;
    let c = client();
    let get = |path: &str| Request::get(proxy.url(path)).body(Full::default()).unwrap();
    // Each slow request follows a fast one on the same connection: once at once, once after
    // the fast one's deadline has passed while the connection sat idle.
    for idle in [Duration::ZERO, Duration::from_millis(500)] {
        let (status, _, _) = send(&c, get("/fast")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(idle).await;
        let started = std::time::Instant::now();
        let (status, _, _) = send(&c, get("/slow")).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "after idling {idle:?}");
        assert!(
            waited >= Duration::from_millis(290) && waited < Duration::from_secs(3),
            "timed out after {waited:?}, idling {idle:?} before"
        );
    }
    // The slow requests went on the connections the fast ones had used.
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    proxy.stop().await;
}

/// The stable track's primary series from `/stats`.
async fn stable_series(proxy: &Proxy) -> serde_json::Value {
    series(&stats(proxy).await, "stable", "primary")
}

/// A request body (for tests) that sends `abc` and then fails when told to, as a client
/// that gives up on its upload.
struct Abandoned {
    first: Option<Bytes>,
    give_up: tokio::sync::oneshot::Receiver<()>,
}

impl http_body::Body for Abandoned {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        std::pin::Pin::new(&mut self.give_up)
            .poll(cx)
            .map(|_| Some(Err(std::io::Error::other("the client gave up"))))
    }
}

#[tokio::test]
async fn a_client_that_abandons_its_upload_is_not_counted_against_the_backend() {
    // Over HTTP/2 the client resets the stream and the connection lives on. Both of the
    // proxy's clients: its own (http1) and hyper's (h2c). The proxy either sees the body fail
    // (400) or is dropped by the server first (counted as 499, client closed): 4xx either way.
    for protocol in ["http1", "h2c"] {
        let backend = Backend::start("stable", Mode::Normal).await;
        let proxy = Proxy::start(&format!(
            "upstream: {{ eject_after: 2, eject_for: 1m, retries: 0 }}\ntracks:\n  stable: {{ backends: [\"{}\"], protocol: {protocol} }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
            backend.addr
        ))
        .await;
        let c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Abandoned>();
        for i in 1..=3 {
            let (give_up, told) = tokio::sync::oneshot::channel();
            let req = Request::post(proxy.url("/upload"))
                .body(Abandoned {
                    first: Some(Bytes::from_static(b"abc")),
                    give_up: told,
                })
                .unwrap();
            let sent = tokio::spawn(c.request(req));
            eventually(Duration::from_secs(5), || async { backend.hits() == i }).await;
            give_up.send(()).unwrap();
            let _ = sent.await;
            eventually(Duration::from_secs(5), || async {
                stable_series(&proxy).await["requests"] == i
            })
            .await;
        }
        // The backend was not at fault: it stays in, and nothing counts as its failure.
        let (status, _, body) = get(&proxy.url("/")).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "stable"),
            "{protocol}"
        );
        let series = stable_series(&proxy).await;
        assert_eq!(series["errors"], 0, "{protocol}: {series}");
        assert_eq!(series["responses"]["5xx"], 0, "{protocol}: {series}");
        assert_eq!(series["responses"]["4xx"], 3, "{protocol}: {series}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_request_whose_client_leaves_before_the_answer_is_counted_as_client_closed() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("stable", Mode::Slow(Duration::from_secs(5))).await;
    let proxy = Proxy::start(&config(&[backend.addr], "{ retries: 0 }")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async { backend.hits() == 1 }).await;
    drop(s);
    // Counted at once, as a 4xx (499) with its wait, long before the backend would answer.
    eventually(Duration::from_secs(2), || async {
        stable_series(&proxy).await["requests"] == 1
    })
    .await;
    let series = stable_series(&proxy).await;
    assert_eq!(series["responses"]["4xx"], 1, "{series}");
    assert_eq!(series["errors"], 0, "{series}");
    proxy.stop().await;
}

/// An HTTP/2 (prior knowledge) backend that allows `streams` at once, as servers do (100 in
/// Tomcat and Apache): `/hold` answers its head and then never ends its body, `/big` sends
/// 64 MiB, `/` answers `ok`. Counts the connections it accepted and the bytes of `/big` the
/// connection took.
struct H2Backend {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn h2_backend_of(streams: u32) -> H2Backend {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (accepted, counted) = (conns.clone(), sent.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let counted = counted.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let counted = counted.clone();
                async move {
                    let body = match req.uri().path() {
                        "/big" => {
                            let (tx, body) = crate::support::ChanBody::new();
                            tokio::spawn(async move {
                                let piece = Bytes::from(vec![b'x'; 64 << 10]);
                                for _ in 0..1024 {
                                    if tx.send(piece.clone()).await.is_err() {
                                        return;
                                    }
                                    counted.fetch_add(piece.len(), Ordering::SeqCst);
                                }
                            });
                            body.boxed()
                        }
                        "/hold" => {
                            let (tx, body) = crate::support::ChanBody::new();
                            tokio::spawn(async move {
                                let _tx = tx;
                                std::future::pending::<()>().await;
                            });
                            body.boxed()
                        }
                        _ => Full::new(Bytes::from_static(b"ok"))
                            .map_err(|e| match e {})
                            .boxed(),
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    H2Backend { addr, conns, sent }
}

#[tokio::test]
async fn an_http2_backend_whose_streams_are_all_taken_gets_another_connection_not_an_ejection() {
    let backend = h2_backend_of(100).await;
    let proxy = h2c_proxy(backend.addr).await;
    // 100 long streams (server-sent events, gRPC streams) take every stream the backend
    // allows on one connection.
    let h2 = crate::support::h2_client();
    let asked: Vec<_> = (0..100)
        .map(|_| {
            let req = Request::get(proxy.url("/hold"))
                .body(Full::default())
                .unwrap();
            tokio::spawn(h2.request(req))
        })
        .collect();
    let mut held = Vec::new();
    for answer in asked {
        let resp = answer.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp);
    }
    // The next requests go at once, on a second connection; none waits its deadline out and
    // gets the backend ejected.
    for _ in 0..3 {
        answers_ok_at_once(&proxy).await;
    }
    assert_eq!(backend.conns.load(Ordering::SeqCst), 2);
    drop(held);
    proxy.stop().await;
}

/// `GET /` through `proxy` is answered `ok` within a second.
async fn answers_ok_at_once(proxy: &Proxy) {
    let started = std::time::Instant::now();
    let (status, _, body) = send(
        &client(),
        Request::get(proxy.url("/")).body(Full::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A proxy whose one track is `addr` over h2c; one failure ejects it.
async fn h2c_proxy(addr: std::net::SocketAddr) -> Proxy {
    Proxy::start(&format!(
        "upstream: {{ eject_after: 1 }}\ntracks:\n  stable: {{ backends: [\"{addr}\"], protocol: h2c }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
    ))
    .await
}

#[tokio::test]
async fn clients_slow_to_read_big_answers_do_not_hold_up_others_on_the_backend_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = h2_backend_of(100).await;
    let proxy = h2c_proxy(backend.addr).await;
    // Twelve clients ask for 64 MiB each and stop reading after the first bytes.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 1024];
        assert!(c.read(&mut first).await.unwrap() > 0);
        stalled.push(c);
    }
    // Until everything between them and the backend is full: the bytes sent stop growing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut last = usize::MAX;
    loop {
        let now = backend.sent.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still sending: {now}");
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What they have not read holds their streams' windows, not the connection's: another
    // answer on the same connection comes at once.
    answers_ok_at_once(&proxy).await;
    assert_eq!(backend.conns.load(Ordering::SeqCst), 1);
    drop(stalled);
    proxy.stop().await;
}
