//! fleet-proxy's own HTTP/1.1 client against backends that answer by hand: every way a
//! response can be framed, connections kept or given up as the backend says, and answers
//! that are wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;

use crate::support::{ChanBody, Proxy, RawBackend, client, send, stable_only};

/// The path of a request head.
fn path(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or_default()
}

/// A proxy whose one track, `stable`, is the backend at `addr`, spoken to over HTTP/1.1
/// whatever the client speaks.
async fn http1_proxy(addr: std::net::SocketAddr) -> Proxy {
    Proxy::start(&format!(
        "tracks:\n  stable: {{ backends: [\"{addr}\"], protocol: http1 }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
    ))
    .await
}

fn answer(bytes: &str) -> (Vec<u8>, bool) {
    (bytes.as_bytes().to_vec(), false)
}

#[tokio::test]
async fn every_framing_of_a_response_reaches_the_client_whole_on_reused_connections() {
    let backend = RawBackend::start(|head| match path(head) {
        "/length" if head.starts_with("HEAD") => {
            answer("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        }
        "/length" => answer("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        "/chunked" => answer(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nx-t: 1\r\n\r\n",
        ),
        "/interim" => answer(
            "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        ),
        "/no-content" => answer("HTTP/1.1 204 No Content\r\n\r\n"),
        "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec(), true),
        other => panic!("unexpected path {other}"),
    })
    .await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    let c = client();
    for (method, path, status, body) in [
        (Method::GET, "/length", StatusCode::OK, "hello"),
        (Method::GET, "/chunked", StatusCode::OK, "hello"),
        (Method::GET, "/interim", StatusCode::OK, "hello"),
        (Method::GET, "/no-content", StatusCode::NO_CONTENT, ""),
        (Method::HEAD, "/length", StatusCode::OK, ""),
        (Method::GET, "/until-close", StatusCode::OK, "hello"),
        (Method::GET, "/length", StatusCode::OK, "hello"),
    ] {
        let req = Request::builder().method(&method).uri(proxy.url(path));
        let (got, headers, text) = send(&c, req.body(Full::default()).unwrap()).await.unwrap();
        assert_eq!((got, text.as_str()), (status, body), "{method} {path}");
        if method == Method::HEAD {
            assert_eq!(headers["content-length"], "5", "HEAD keeps the length");
        }
    }
    assert_eq!(
        backend.conns(),
        2,
        "one connection for everything up to the body delimited by its close, then another"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_connection_the_backend_will_close_is_not_reused() {
    let backend = RawBackend::start(|head| match path(head) {
        "/close" => answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"),
        _ => answer("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let proxy = Proxy::start(&stable_only("upstream: { retries: 0 }\n", backend.addr)).await;
    let c = client();
    for path in ["/close", "/close", "/http10", "/http10"] {
        let req = Request::get(proxy.url(path)).body(Full::default()).unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "{path}");
    }
    assert_eq!(backend.conns(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn a_connection_the_backend_closed_after_answering_is_passed_over() {
    // Each connection answers once, as keep-alive, and is closed by the backend right after.
    let backend = RawBackend::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            true,
        )
    })
    .await;
    let proxy = Proxy::start(&stable_only("upstream: { retries: 0 }\n", backend.addr)).await;
    let c = client();
    for i in 0..10 {
        // Without a body, even a POST goes out on the own client.
        let method = if i % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let req = Request::builder().method(method).uri(proxy.url("/"));
        let (status, _, body) = send(&c, req.body(Full::default()).unwrap()).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(backend.conns(), 10);
    proxy.stop().await;
}

#[tokio::test]
async fn a_wrong_response_head_is_a_502() {
    let backend = RawBackend::start(|head| match path(head) {
        "/garbage" => answer("SMTP ready\r\n\r\n"),
        "/lengths" => answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"),
        "/switch" => answer("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"),
        _ => (Vec::new(), true),
    })
    .await;
    let proxy = Proxy::start(&stable_only(
        "upstream: { retries: 0, eject_after: 1000 }\n",
        backend.addr,
    ))
    .await;
    for path in ["/garbage", "/lengths", "/switch", "/hang-up"] {
        let req = Request::get(proxy.url(path)).body(Full::default()).unwrap();
        let (status, _, _) = send(&client(), req).await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_answer_that_comes_before_the_request_body_has_ended_reaches_the_client() {
    let backend = RawBackend::start(|_| {
        answer("HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo long")
    })
    .await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    let (tx, body) = ChanBody::new();
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<ChanBody>();
    let req = Request::post(proxy.url("/upload")).body(body).unwrap();
    let sending = tokio::spawn(async move { client.request(req).await });
    tx.send(Bytes::from_static(b"the first of many pieces"))
        .await
        .unwrap();
    // The request body is still open: the answer comes anyway.
    let resp = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("answered before the body ended")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"too long");
    drop(tx);
    proxy.stop().await;
}

/// A backend that stops in the middle of a body does not hold its client for good: after
/// `upstream.read_timeout` without a byte the response is cut (the client sees a broken body,
/// not a short one taken as whole), and counted.
#[tokio::test]
async fn a_response_body_that_stalls_for_read_timeout_is_cut() {
    let backend =
        RawBackend::start(|_| answer("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")).await;
    let config = stable_only("upstream: { read_timeout: 300ms }\n", backend.addr);
    let proxy = Proxy::start(&config).await;
    // Before the request: the proxy's timer cannot start earlier than this.
    let started = std::time::Instant::now();
    let resp = client()
        .request(Request::get(proxy.url("/")).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    let body = body.expect("cut within 5 s");
    assert!(body.is_err(), "a short body read as whole: {body:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let stats = crate::support::stats(&proxy).await;
    assert_eq!(stats["proxy"]["responses_stalled"], 1, "{stats}");
    // A failure of the track's, though its head said 200.
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(
        (
            stable["responses"]["2xx"].as_u64(),
            stable["broken"].as_u64()
        ),
        (Some(1), Some(1))
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_response_body_the_backend_breaks_off_counts_as_broken() {
    let backend = RawBackend::start(|head| match path(head) {
        "/short" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            true,
        ),
        "/short-503" => (
            b"HTTP/1.1 503 No\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            true,
        ),
        _ => answer("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole"),
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    for (path, whole) in [
        ("/short", false),
        ("/", true),
        ("/short", false),
        ("/short-503", false),
    ] {
        let asked = client()
            .request(Request::get(proxy.url(path)).body(Full::default()).unwrap())
            .await;
        // The client sees a broken body, or, when the break comes before hyper wrote the
        // head, a connection closed without an answer; never a short body taken as whole.
        let got_whole = match asked {
            Ok(resp) => resp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        assert_eq!(got_whole, whole, "{path}");
    }
    let stats = crate::support::stats(&proxy).await;
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(stable["responses"]["2xx"], 3, "{stats}");
    // A 5xx counts as an error already: its broken body is not counted twice.
    assert_eq!(stable["responses"]["5xx"], 1, "{stats}");
    assert_eq!(stable["broken"], 2, "{stats}");
    assert_eq!(stats["proxy"]["responses_stalled"], 0, "{stats}");
    let (_, _, metrics) = crate::support::get(&proxy.admin_url("/metrics"))
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "fleet_proxy_responses_broken_total{route=\"*/\",track=\"stable\",source=\"primary\"} 2"
        ),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_responses_hop_by_hop_headers_and_those_its_connection_names_stay_with_the_backend() {
    let backend = RawBackend::start(|_| {
        answer(concat!(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-hop\r\nx-hop: secret\r\n",
            "keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\n",
            "proxy-authenticate: Basic realm=backend\r\nupgrade: h2c\r\n",
            "x-end: kept\r\ncontent-length: 5\r\n\r\nhello",
        ))
    })
    .await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    for c in [client(), crate::support::h2_client()] {
        let (status, headers, body) = send(
            &c,
            Request::get(proxy.url("/")).body(Full::default()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
        assert_eq!(headers["x-end"], "kept", "end-to-end headers pass");
        for hop in [
            "x-hop",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "upgrade",
        ] {
            assert!(
                !headers.contains_key(hop),
                "{hop} reached the client: {headers:?}"
            );
        }
        let connection = headers.get("connection").map(|v| v.to_str().unwrap());
        assert!(
            !connection.is_some_and(|v| v.contains("x-hop")),
            "the backend's Connection reached the client: {connection:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn trailer_fields_no_trailer_may_carry_are_dropped_and_the_rest_reach_an_http2_client() {
    let backend = RawBackend::start(|_| {
        answer(concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n0\r\n",
            "grpc-status: 0\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n",
            "connection: close\r\nkeep-alive: timeout=5\r\nhost: elsewhere\r\ntrailer: x\r\n",
            "te: trailers\r\nupgrade: h2c\r\nx-checksum: abc\r\n\r\n",
        ))
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    for c in [client(), crate::support::h2_client()] {
        let req = Request::get(proxy.url("/"))
            .header("te", "trailers")
            .body(Full::default())
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let version = resp.version();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(collected.to_bytes(), "hello", "{version:?}");
        if version == http::Version::HTTP_2 {
            let mut names: Vec<&str> = trailers.keys().map(|n| n.as_str()).collect();
            names.sort();
            assert_eq!(names, ["grpc-status", "x-checksum"]);
        }
    }
    proxy.stop().await;
}

/// A gRPC answer is an HTTP 200 whatever its outcome: a `grpc-status` for a server's
/// failure, in the head (trailers-only) or the trailers, or none at all, is counted in
/// `grpc_errors`. Not counted: a client's mistake, success, a non-200 (counted by its class),
/// gRPC-Web, an answer that is not gRPC, and any answer to a request that is not gRPC.
#[tokio::test]
async fn grpc_failures_are_counted_from_the_head_or_the_trailers() {
    let grpc = "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n";
    let with_trailers = |status: &str| {
        format!(
            "{grpc}transfer-encoding: chunked\r\n\r\n5\r\n\0\0\0\0\0\r\n0\r\ngrpc-status: {status}\r\n\r\n"
        )
    };
    let head_only = |content_type: &str, status: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ngrpc-status: 14\r\ncontent-length: 0\r\n\r\n"
        )
    };
    // (path, answer, counted)
    let answers: Vec<(&str, String, bool)> = vec![
        (
            "/unavailable",
            head_only("application/grpc", "200 OK"),
            true,
        ),
        (
            "/upper-case",
            head_only("Application/GRPC+proto", "200 OK"),
            true,
        ),
        ("/internal", with_trailers("13"), true),
        (
            "/no-status",
            format!("{grpc}content-length: 5\r\n\r\n\0\0\0\0\0"),
            true,
        ),
        // No body to read: no status either.
        ("/empty", format!("{grpc}content-length: 0\r\n\r\n"), true),
        ("/not-found", with_trailers("5"), false),
        ("/ok", with_trailers(" 0 "), false),
        (
            "/busy",
            head_only("application/grpc", "503 Service Unavailable"),
            false,
        ),
        (
            "/grpc-web",
            head_only("application/grpc-web", "200 OK"),
            false,
        ),
        ("/plain", head_only("text/plain", "200 OK"), false),
        (
            "/plain-request",
            head_only("application/grpc", "200 OK"),
            false,
        ),
    ];
    let counted = answers.iter().filter(|a| a.2).count();
    let paths: Vec<&str> = answers.iter().map(|(p, ..)| *p).collect();
    let backend = RawBackend::start(move |head| {
        let (_, answer, _) = answers.iter().find(|(p, ..)| *p == path(head)).unwrap();
        (answer.as_bytes().to_vec(), false)
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    let c = crate::support::h2_client();
    for p in paths {
        let content_type = match p {
            "/plain-request" => "text/plain",
            _ => "application/grpc",
        };
        let req = Request::post(proxy.url(p))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let stats = crate::support::stats(&proxy).await;
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(stable["grpc_errors"], counted, "{stats}");
    assert_eq!(stable["responses"]["2xx"], 10, "{stats}");
    assert_eq!(stable["responses"]["5xx"], 1, "{stats}");
    proxy.stop().await;
}

/// A gRPC answer whose backend stalls mid-body is cut at `read_timeout` and counts as a gRPC
/// failure (no status came), not as a broken body: counted once.
#[tokio::test]
async fn a_stalled_grpc_answer_counts_as_a_grpc_failure_once() {
    let backend = RawBackend::start(|_| {
        answer("HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n5\r\n\0\0\0\0\0\r\n")
    })
    .await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ read_timeout: 300ms }}\ntracks:\n  stable: {{ backends: [\"{}\"], protocol: http1 }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        backend.addr
    ))
    .await;
    let req = Request::post(proxy.url("/call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = crate::support::h2_client().request(req).await.unwrap();
    assert!(resp.into_body().collect().await.is_err(), "cut");
    let stats = crate::support::stats(&proxy).await;
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(
        (stable["grpc_errors"].as_u64(), stable["broken"].as_u64()),
        (Some(1), Some(0)),
        "{stats}"
    );
    assert_eq!(stats["proxy"]["responses_stalled"], 1, "{stats}");
    proxy.stop().await;
}

/// gRPC-Web's status is in the head of a trailers-only answer, or in the body's last
/// message, flagged as trailers; an answer without one counts as a failure too.
#[tokio::test]
async fn grpc_web_failures_are_counted_from_the_head_or_the_trailers_message() {
    let message = |flags: u8, payload: &str| {
        let mut m = vec![flags];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload.as_bytes());
        m
    };
    let head = |content_type: &str| {
        format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ngrpc-status: 14\r\ncontent-length: 0\r\n\r\n")
            .into_bytes()
    };
    let sized = |body: Vec<u8>| {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend(body);
        a
    };
    // The trailers message cut across two chunks.
    let trailers = message(0x80, "grpc-message: x\r\ngrpc-status: 14\r\n");
    let mut chunked =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in [&trailers[..3], &trailers[3..]] {
        chunked.extend(format!("{:x}\r\n", piece.len()).into_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    // (path, answer, counted)
    let answers: Vec<(&str, Vec<u8>, bool)> = vec![
        ("/head", head("application/grpc-web+proto"), true),
        (
            "/message",
            sized([message(0, "hi"), message(0x80, "grpc-status:13\r\n")].concat()),
            true,
        ),
        ("/chunked", chunked, true),
        ("/no-status", sized(message(0, "hi")), true),
        ("/empty", sized(Vec::new()), true),
        ("/ok", sized(message(0x80, "grpc-status: 0\r\n")), false),
        // To a `grpc-web-text` request, only a trailers-only head is read: its body is base64.
        ("/text-head", head("application/grpc-web-text"), true),
        (
            "/text-body",
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web-text\r\ncontent-length: 4\r\n\r\ngAAA"
                .to_vec(),
            false,
        ),
        // Not the request's kind of gRPC.
        ("/text", head("application/grpc-web-text"), false),
        // Not the request's kind of gRPC.
        ("/native", head("application/grpc"), false),
    ];
    let counted = answers.iter().filter(|a| a.2).count();
    let paths: Vec<&str> = answers.iter().map(|(p, ..)| *p).collect();
    let backend = RawBackend::start(move |head| {
        let (_, answer, _) = answers.iter().find(|(p, ..)| *p == path(head)).unwrap();
        (answer.clone(), false)
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    let c = crate::support::client();
    for p in &paths {
        let content_type = match p.starts_with("/text-") {
            true => "application/grpc-web-text",
            false => "application/grpc-web+proto",
        };
        let req = Request::post(proxy.url(p))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{p}");
        resp.into_body().collect().await.unwrap();
    }
    let stats = crate::support::stats(&proxy).await;
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(stable["grpc_errors"], counted, "{stats}");
    assert_eq!(stable["responses"]["2xx"], paths.len(), "{stats}");
    proxy.stop().await;
}

#[tokio::test]
async fn declared_trailers_reach_an_http1_client_that_accepts_them() {
    let backend = RawBackend::start(|_| {
        answer(concat!(
            "HTTP/1.1 200 OK\r\ntrailer: x-checksum, x-status\r\ntransfer-encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n0\r\n",
            "x-checksum: abc\r\nx-status: done\r\n\r\n",
        ))
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    // An HTTP/1.1 server sends the trailers its response declares in `Trailer`, to a client
    // that said it takes them (`TE: trailers`): the proxy keeps that declaration.
    let req = Request::get(proxy.url("/"))
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.headers()["trailer"], "x-checksum, x-status");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(trailers["x-status"], "done");
    assert_eq!(collected.to_bytes(), "hello");
    proxy.stop().await;
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on_and_the_request_is_answered_over_http1() {
    let Http1Only { backend, heads, .. } = http1_only_backend().await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    // What `curl --http2 http://…` sends. Passed on, a backend that takes it would have
    // given the client an HTTP/2 connection of its own, past routing and the proxy's headers.
    let (answer, _) = crate::support::exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(!head.contains("upgrade"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_upgrade_to_a_track_that_speaks_only_http2_goes_on_without_it_and_ejects_nothing() {
    let (proxy, _b) = crate::support::stable_h2c_proxy("upstream: { eject_after: 1 }\n").await;
    // An HTTP/2 backend cannot switch an HTTP/1.1 connection: sent as HTTP/1.1 it failed,
    // and each such request counted toward ejecting it for everyone.
    for _ in 0..3 {
        let (answer, _) = crate::support::exchange(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
        let answer = answer.to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-seen-version: http/2.0"), "{answer}");
    }
    proxy.stop().await;
}

/// A backend that speaks HTTP/1.1 only and, like nginx without `http2` on its listener,
/// answers the HTTP/2 preface with a 400 and a close; `prefaces` counts those, `heads` keeps
/// the request heads it got. `/fail` gets the connection closed without an answer.
struct Http1Only {
    backend: RawBackend,
    prefaces: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn http1_only_backend() -> Http1Only {
    http1_backend_refusing_with(
        "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    )
    .await
}

/// As [`http1_only_backend`], but it answers the preface with `refusal` (nothing: it closes
/// without a word, as Python's websockets does).
async fn http1_backend_refusing_with(refusal: &'static str) -> Http1Only {
    let prefaces = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (counted, kept) = (prefaces.clone(), heads.clone());
    let backend = RawBackend::start(move |head| {
        if head.starts_with("PRI * HTTP/2.0") {
            counted.fetch_add(1, Ordering::SeqCst);
            return (refusal.as_bytes().to_vec(), true);
        }
        kept.lock().unwrap().push(head.to_string());
        if path(head) == "/fail" {
            return (Vec::new(), true);
        }
        answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nh1")
    })
    .await;
    Http1Only {
        backend,
        prefaces,
        heads,
    }
}

#[tokio::test]
async fn http2_clients_reach_a_backend_that_speaks_only_http1_under_protocol_auto() {
    let Http1Only {
        backend, prefaces, ..
    } = http1_only_backend().await;
    // `protocol` unset is `auto`. With `eject_after: 1`, one failure counted against the
    // backend would eject it, the only one.
    let proxy = Proxy::start(&stable_only(
        "upstream: { eject_after: 1, retries: 0 }\n",
        backend.addr,
    ))
    .await;
    let h2 = crate::support::h2_client();
    // First a request with a body, which could not be sent twice.
    let post = || {
        Request::post(proxy.url("/post"))
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap()
    };
    let (status, _, body) = send(&h2, post()).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "h1"));
    for i in 0..3 {
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        let (status, _, body) = send(&h2, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "h1"), "GET {i}");
    }
    let (status, _, body) = send(&client(), post()).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "h1"));
    // The backend was asked once, on a connection of its own; everything else went over
    // one pooled HTTP/1.1 connection.
    assert_eq!(backend.conns(), 2);
    assert_eq!(prefaces.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn requests_arriving_together_ask_a_backend_about_http2_once() {
    // One that refuses with a status line, and one that closes without a word: those that
    // come while the second one's try finds out over HTTP/1.1 take it to speak that too.
    for refusal in [
        "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        "",
    ] {
        eight_together_ask_once(http1_backend_refusing_with(refusal).await).await;
    }
}

async fn eight_together_ask_once(backend: Http1Only) {
    let Http1Only {
        backend, prefaces, ..
    } = backend;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    let h2 = crate::support::h2_client();
    let mut together = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (h2, url) = (h2.clone(), proxy.url("/post"));
        together.spawn(async move {
            let req = Request::post(url)
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap();
            send(&h2, req).await.unwrap()
        });
    }
    while let Some(done) = together.join_next().await {
        let (status, _, body) = done.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "h1"));
    }
    assert_eq!(prefaces.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_failed_http1_try_keeps_a_backend_known_to_speak_no_http2() {
    let Http1Only {
        backend, prefaces, ..
    } = http1_only_backend().await;
    let proxy = Proxy::start(&stable_only(
        "upstream: { retries: 0, eject_after: 100 }\n",
        backend.addr,
    ))
    .await;
    let h2 = crate::support::h2_client();
    let get = |p: &str| Request::get(proxy.url(p)).body(Full::default()).unwrap();
    assert_eq!(send(&h2, get("/")).await.unwrap().0, StatusCode::OK);
    assert_eq!(
        send(&h2, get("/fail")).await.unwrap().0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(send(&h2, get("/")).await.unwrap().0, StatusCode::OK);
    // The failure was over HTTP/1.1: it says nothing of HTTP/2, which is not asked again.
    assert_eq!(prefaces.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn cookie_crumbs_of_an_http2_request_reach_an_http1_backend_as_one_cookie() {
    let Http1Only { backend, heads, .. } = http1_only_backend().await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    let h2 = crate::support::h2_client();
    // 101 crumbs: over the default of 100 headers, were each counted as one.
    let mut req = Request::get(proxy.url("/"));
    for i in 0..101 {
        req = req.header("cookie", format!("c{i}=1"));
    }
    let (status, _, _) = send(&h2, req.body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let head = heads.lock().unwrap().last().cloned().unwrap();
    let cookies: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("cookie:"))
        .collect();
    assert_eq!(cookies.len(), 1, "{head}");
    let all: Vec<String> = (0..101).map(|i| format!("c{i}=1")).collect();
    assert!(cookies[0].ends_with(&all.join("; ")), "{head}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_http2_request_without_authority_or_host_is_refused() {
    let Http1Only { backend, heads, .. } = http1_only_backend().await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    // `:method GET`, `:scheme http`, `:path /` (HPACK static indices 2, 6, 4), and no
    // `:authority`.
    let status = raw_h2_status(proxy.addr, &[0x82, 0x86, 0x84]).await;
    assert_eq!(status, 0x8c, "not :status 400");
    assert!(heads.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn an_http2_host_is_compared_with_authority_after_normalization() {
    let Http1Only { backend, heads, .. } = http1_only_backend().await;
    let proxy = Proxy::start(&stable_only("", backend.addr)).await;
    // RFC 9113 §8.3.1: an intermediary compares them after scheme-based normalization, so
    // case and the scheme's default port make no difference; another host or port does.
    for (host, status) in [
        (&b"A.TEST:80"[..], 0x88),
        (b"a.test", 0x88),
        (b"a.test:8080", 0x8c),
        (b"b.test", 0x8c),
    ] {
        // `:method GET`, `:scheme http`, `:path /`, then `:authority: a.test` and `host`
        // as literals without indexing, named by static indices 1 and 38.
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 6];
        block.extend_from_slice(b"a.test");
        block.extend_from_slice(&[0x0f, 38 - 15, u8::try_from(host.len()).unwrap()]);
        block.extend_from_slice(host);
        let got = raw_h2_status(proxy.addr, &block).await;
        assert_eq!(got, status, "host {:?}", String::from_utf8_lossy(host));
    }
    assert_eq!(
        heads.lock().unwrap().len(),
        2,
        "only the two agreeing requests passed"
    );
    proxy.stop().await;
}

/// Sends one HTTP/2 request, its header block `block` hand-encoded (no client at hand sends
/// what these tests need), on a connection of its own; the first byte of the answer's header
/// block, which is `:status` as an HPACK static index (0x88 for 200, 0x8c for 400).
async fn raw_h2_status(addr: std::net::SocketAddr, block: &[u8]) -> u8 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    // HEADERS on stream 1, END_STREAM | END_HEADERS.
    let len = u8::try_from(block.len()).unwrap();
    out.extend_from_slice(&[0, 0, len, 1, 5, 0, 0, 0, 1]);
    out.extend_from_slice(block);
    s.write_all(&out).await.unwrap();
    // Frames until the answer's HEADERS on stream 1.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before an answer");
            got.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while got.len() >= at + 9 {
                let len = usize::from(got[at]) << 16
                    | usize::from(got[at + 1]) << 8
                    | usize::from(got[at + 2]);
                if got.len() < at + 9 + len {
                    break;
                }
                if got[at + 3] == 1 && got[at + 5..at + 9] == [0, 0, 0, 1] {
                    return got[at + 9];
                }
                at += 9 + len;
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_backend_that_closes_on_the_question_gets_http1_and_is_asked_again_only_if_that_fails() {
    // Closes on the preface without a word, as some HTTP/1.1 servers do (Python's
    // websockets); `/fail` is closed on too, as by a server in trouble.
    let prefaces = Arc::new(AtomicUsize::new(0));
    let counted = prefaces.clone();
    let backend = RawBackend::start(move |head| {
        if head.starts_with("PRI * HTTP/2.0") {
            counted.fetch_add(1, Ordering::SeqCst);
            return (Vec::new(), true);
        }
        match path(head) == "/fail" {
            true => (Vec::new(), true),
            false => answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nh1"),
        }
    })
    .await;
    let proxy = Proxy::start(&stable_only(
        "upstream: { retries: 0, eject_after: 100 }\n",
        backend.addr,
    ))
    .await;
    let h2 = crate::support::h2_client();
    let get = |p: &str| Request::get(proxy.url(p)).body(Full::default()).unwrap();
    // Closed on as well: the try fails, and nothing is learnt, so it is asked again.
    for asked in 1..=2 {
        assert_eq!(
            send(&h2, get("/fail")).await.unwrap().0,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(prefaces.load(Ordering::SeqCst), asked);
    }
    // Answered over HTTP/1.1: taken to speak only that, and not asked again.
    for _ in 0..3 {
        let (status, _, body) = send(&h2, get("/")).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "h1"));
    }
    assert_eq!(prefaces.load(Ordering::SeqCst), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn an_http1_0_answer_reaches_the_client_as_http1_1_and_an_unknown_coding_as_502() {
    let backend = RawBackend::start(|head| match path(head) {
        "/old" => {
            answer("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok")
        }
        "/gzip" => answer(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nhe\r\n0\r\n\r\n",
        ),
        other => panic!("unexpected path {other}"),
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    // Answered in the client's HTTP/1.1, with the connection kept: an HTTP/1.0 status line
    // would have the client close after every answer.
    let (raw, closed) = crate::support::exchange(
        proxy.addr,
        b"GET /old HTTP/1.1\r\nhost: a\r\n\r\nGET /old HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(closed, "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{raw}");
    // A body under a coding nobody would undo or announce is refused, not passed on bare.
    let (status, _, _) = send(
        &client(),
        Request::get(proxy.url("/gzip"))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    proxy.stop().await;
}

#[tokio::test]
async fn an_http1_0_request_without_host_reaches_the_backend_with_one() {
    let backend = RawBackend::start(|head| {
        let host = (head.lines())
            .find_map(|l| l.strip_prefix("host: "))
            .unwrap_or("none");
        let body = format!("host={host}");
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        ((head + &body).into_bytes(), false)
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    // What HAProxy's default health check sends.
    let (raw, _) = crate::support::exchange(proxy.addr, b"OPTIONS / HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 200 OK\r\n"), "{raw}");
    assert!(raw.ends_with(&format!("host={}", backend.addr)), "{raw}");
    // A request with a host keeps it.
    let (raw, _) = crate::support::exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.ends_with("host=app.test"), "{raw}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_sticky_cookie_the_backend_sets_itself_is_not_set_over() {
    let backend = RawBackend::start(|head| match path(head) {
        "/login" => answer(
            "HTTP/1.1 200 OK\r\nset-cookie: other=1\r\nset-cookie: fleet-bucket=user-42; Path=/\r\ncontent-length: 0\r\n\r\n",
        ),
        _ => answer("HTTP/1.1 200 OK\r\nset-cookie: fleet-bucketeer=1\r\ncontent-length: 0\r\n\r\n"),
    })
    .await;
    let proxy = Proxy::start(&format!(
        "tracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }}, sticky: {{ cookie: fleet-bucket }} }}\n",
        backend.addr
    ))
    .await;
    let cookies = |h: &http::HeaderMap| -> Vec<String> {
        let all = h.get_all("set-cookie").iter();
        all.map(|v| v.to_str().unwrap().to_string()).collect()
    };
    let get = |path: &str| Request::get(proxy.url(path)).body(Full::default()).unwrap();
    // The backend pins the user itself: its cookie stands, and no second one follows it.
    let (_, headers, _) = send(&client(), get("/login")).await.unwrap();
    assert_eq!(
        cookies(&headers),
        ["other=1", "fleet-bucket=user-42; Path=/"]
    );
    // A cookie whose name only begins the same is another cookie.
    let (_, headers, _) = send(&client(), get("/")).await.unwrap();
    let set = cookies(&headers);
    assert_eq!(set.len(), 2, "{set:?}");
    assert!(set[1].starts_with("fleet-bucket="), "{set:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_answer_sent_before_the_backend_stops_taking_the_body_reaches_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that refuses a body at its head: `413` and close, its rest unread, so the
    // kernel resets the connection under the proxy's writes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = "HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 9\r\n\r\ntoo large";
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let proxy = http1_proxy(addr).await;
    let body = Bytes::from(vec![b'x'; 8 << 20]);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let req = Request::post(proxy.url("/upload"))
            .body(Full::new(body.clone()))
            .unwrap();
        let status = send(&client(), req).await.map(|(s, _, _)| s.as_u16());
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(Some(413), 20)].into(), "{statuses:?}");
    proxy.stop().await;
}

/// `max_idle_per_backend: 0` keeps no connection for reuse: each request opens its own.
#[tokio::test]
async fn with_max_idle_per_backend_0_no_connection_is_reused() {
    for (max_idle, conns) in [(0, 3), (1, 1)] {
        let extra = format!("upstream: {{ max_idle_per_backend: {max_idle} }}\n");
        let (proxy, stable) = crate::support::stable_proxy(&extra).await;
        for _ in 0..3 {
            let (status, _, _) = crate::support::get(&proxy.url("/")).await.unwrap();
            assert_eq!(status, http::StatusCode::OK);
        }
        assert_eq!(stable.conns(), conns, "max_idle_per_backend: {max_idle}");
        proxy.stop().await;
    }
}

/// A backend that answers with the request head it read (the request line and the fields).
async fn head_echo() -> RawBackend {
    RawBackend::start(|head| {
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len()) + head;
        (head.into_bytes(), false)
    })
    .await
}

/// An absolute-form target without a path before its query goes on with one (`GET /?x=1`,
/// not `GET ?x=1`, which backends refuse), and `Expect: 100-continue` is met by the proxy (the
/// client gets its `100 Continue`) and not sent on, as nginx does.
#[tokio::test]
async fn the_target_goes_on_in_origin_form_and_expect_is_met_by_the_proxy() {
    let backend = head_echo().await;
    let proxy = http1_proxy(backend.addr).await;
    let (raw, _) = crate::support::exchange(
        proxy.addr,
        b"GET http://a.test?x=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.contains("\r\n\r\nGET /?x=1 HTTP/1.1\r\n"), "{raw}");
    let (raw, _) = crate::support::exchange(
        proxy.addr,
        b"POST /u HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{raw}"
    );
    assert!(raw.contains("\r\n\r\nPOST /u HTTP/1.1\r\n"), "{raw}");
    assert!(!raw.to_ascii_lowercase().contains("\r\nexpect:"), "{raw}");
    proxy.stop().await;
}

/// A status line's own reason reaches an HTTP/1.1 client (`419 Page Expired`), as nginx
/// passes it, not hyper's `<none>` for a code without a usual one.
#[tokio::test]
async fn a_backends_own_reason_phrase_reaches_the_client() {
    let backend = RawBackend::start(|head| match path(head) {
        "/419" => answer("HTTP/1.1 419 Page Expired\r\ncontent-length: 0\r\n\r\n"),
        _ => answer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
    })
    .await;
    let proxy = http1_proxy(backend.addr).await;
    for (path, line) in [
        ("/419", "HTTP/1.1 419 Page Expired\r\n"),
        ("/", "HTTP/1.1 200 OK\r\n"),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let (raw, _) = crate::support::exchange(proxy.addr, req.as_bytes()).await;
        assert!(raw.starts_with(line), "{raw}");
    }
    proxy.stop().await;
}

/// An answer the proxy refuses (here, 101 header fields) is that endpoint's: one 502, the
/// request not sent again, and the backend not counted as failing, so that its other paths
/// are still served (nginx's `invalid_header` is neither retried nor counted either).
#[tokio::test]
async fn an_answer_the_proxy_refuses_is_not_asked_again_and_ejects_nothing() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = asked.clone();
    let backend = RawBackend::start(move |head| match path(head) {
        "/big" => {
            counted.fetch_add(1, Ordering::SeqCst);
            let fields: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
            (
                format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n").into_bytes(),
                false,
            )
        }
        _ => answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ eject_after: 2 }}\ntracks:\n  stable: {{ backends: [\"{}\"], protocol: http1 }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        backend.addr
    ))
    .await;
    for _ in 0..2 {
        let (status, _, _) = crate::support::get(&proxy.url("/big")).await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 2, "each asked once");
    let (status, _, body) = crate::support::get(&proxy.url("/ok")).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    proxy.stop().await;
}

/// Unlike a refused answer, bytes that are not HTTP at all (another service on the port) are
/// the backend failing: the request is asked again of the next backend, and the backend is
/// ejected after `eject_after` of them.
#[tokio::test]
async fn a_backend_that_does_not_speak_http_is_asked_no_more_and_ejected() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = asked.clone();
    let garbled = RawBackend::start(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        (b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(), true)
    })
    .await;
    let good = crate::support::Backend::start("stable", crate::support::Mode::Normal).await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ eject_after: 2 }}\ntracks:\n  stable: {{ backends: [\"{}\", \"{}\"], protocol: http1 }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        garbled.addr, good.addr
    ))
    .await;
    for _ in 0..10 {
        let (status, _, body) = crate::support::get(&proxy.url("/")).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    }
    assert_eq!(asked.load(Ordering::SeqCst), 2, "ejected after two");
    proxy.stop().await;
}
