//! `mirror: { compare }`: each copy's answer compared with its primary's, counted under the
//! mirror series as `compared` and `differed`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::support::{Proxy, RawBackend, client, dead_addr, eventually, get, send, series, stats};

/// An answer with a `content-length` body.
fn sized(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The same answer, its body chunked in two pieces.
fn chunked(status: &str, body: &str) -> Vec<u8> {
    let (a, b) = body.split_at(body.len() / 2);
    format!(
        "HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    )
    .into_bytes()
}

/// The request line's path, without its query.
fn path(head: &str) -> &str {
    let target = head.split(' ').nth(1).unwrap_or_default();
    target.split('?').next().unwrap_or_default()
}

/// What `answer` says for the request's path; to a HEAD, the head alone.
fn answer(head: &str, answer: impl Fn(&str) -> Vec<u8>) -> Vec<u8> {
    let mut bytes = answer(path(head));
    if head.starts_with("HEAD ")
        && let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n")
    {
        bytes.truncate(end + 4);
    }
    bytes
}

/// A primary and a shadow that answer each path as their functions say, and a proxy that
/// mirrors every request with `mirror` (`compare`, and any other of the route's mirror
/// fields) and the proxy-wide settings in `extra`.
async fn comparing<P, S>(
    mirror: &str,
    extra: &str,
    primary: P,
    shadow: S,
) -> (RawBackend, RawBackend, Proxy)
where
    P: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    S: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    let primary = RawBackend::start(move |head| (answer(head, &primary), false)).await;
    let shadow = RawBackend::start(move |head| (answer(head, &shadow), false)).await;
    let proxy = Proxy::start(&config(primary.addr, shadow.addr, mirror, extra)).await;
    (primary, shadow, proxy)
}

fn config(stable: SocketAddr, shadow: SocketAddr, mirror: &str, extra: &str) -> String {
    format!(
        "{extra}tracks:\n  stable: {{ backends: [\"{stable}\"] }}\n  shadow: {{ backends: [\"{shadow}\"] }}\nroutes:\n  - {{ name: web, split: {{ stable: 10000 }}, mirror: {{ to: shadow, percent: 100{mirror} }} }}\n"
    )
}

/// Sends a GET for each path, one after the other; each gets its primary's answer.
async fn get_each(proxy: &Proxy, paths: &[&str]) {
    let c = client();
    for p in paths {
        let req = Request::get(proxy.url(p)).body(Full::default()).unwrap();
        let (status, _, _) = send(&c, req).await.unwrap();
        assert_ne!(status, StatusCode::BAD_GATEWAY, "{p}");
    }
}

/// The shadow's mirror series once `n` copies have been counted, and a moment more for the
/// comparisons of their answers: the second side to answer compares.
async fn counted(proxy: &Proxy, n: u64) -> Value {
    eventually(Duration::from_secs(10), || async {
        let s = series(&stats(proxy).await, "shadow", "mirror");
        s["requests"].as_u64() == Some(n) && s["compared"].as_u64() >= Some(n)
    })
    .await;
    series(&stats(proxy).await, "shadow", "mirror")
}

/// The shadow's mirror series once `n` copies have been sent, whatever became of them.
async fn sent(proxy: &Proxy, n: u64) -> Value {
    eventually(Duration::from_secs(10), || async {
        series(&stats(proxy).await, "shadow", "mirror")["requests"].as_u64() == Some(n)
    })
    .await;
    series(&stats(proxy).await, "shadow", "mirror")
}

/// The differences the proxy keeps, oldest first.
async fn differences(proxy: &Proxy) -> Vec<Value> {
    let (status, _, body) = get(&proxy.admin_url("/mirror/differences")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let json: Value = serde_json::from_str(&body).unwrap();
    json["differences"].as_array().unwrap().clone()
}

/// A mirror series' copies compared, and those that differed.
fn verdicts(s: &Value) -> (u64, u64) {
    (
        s["compared"].as_u64().unwrap(),
        s["differed"].as_u64().unwrap(),
    )
}

/// The two ways copies go out: pipelined in batches, and each on its own connection (as
/// copies over HTTP/2, with large bodies, and gRPC calls do).
const SENDING: [&str; 2] = [
    "mirror: { batch_window: 50ms }\n",
    "mirror: { pipeline: false }\n",
];

#[tokio::test]
async fn compared_by_status_copies_answered_with_another_status_are_counted_as_differing() {
    for sending in SENDING {
        let (_primary, _shadow, proxy) = comparing(
            ", compare: status",
            sending,
            |path| match path {
                "/gone" => sized("200 OK", "here"),
                _ => sized("200 OK", "v1"),
            },
            // Another body, the same status: alike when statuses alone are compared.
            |path| match path {
                "/gone" => sized("404 Not Found", "gone"),
                _ => sized("200 OK", "v2 says more"),
            },
        )
        .await;
        let gone = "/gone?token=s3cr3t";
        get_each(&proxy, &["/a", gone, "/b", gone, "/c"]).await;
        let s = counted(&proxy, 5).await;
        assert_eq!(verdicts(&s), (5, 2), "{sending}");
        let (_, _, metrics) = get(&proxy.admin_url("/metrics")).await.unwrap();
        let line =
            r#"fleet_proxy_mirror_differed_total{route="web",track="shadow",source="mirror"} 2"#;
        assert!(metrics.contains(line), "{metrics}");
        assert!(
            !metrics.contains(r#"fleet_proxy_mirror_compared_total{route="web",track="stable""#),
            "primary series have no comparisons"
        );
        // Which requests: the two to /gone, with both answers; no query kept.
        let found = differences(&proxy).await;
        assert!(!found.iter().any(|d| d.to_string().contains("s3cr3t")));
        assert_eq!(found.len(), 2, "{found:?}");
        for d in &found {
            assert_eq!(
                (&d["route"], &d["track"], &d["method"], &d["path"]),
                (
                    &json!("web"),
                    &json!("shadow"),
                    &json!("GET"),
                    &json!("/gone")
                )
            );
            assert_eq!(
                (&d["primary"]["status"], &d["copy"]["status"]),
                (&json!(200), &json!(404))
            );
            assert_eq!(d["bodies_differ"], Value::Null, "not compared");
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn compared_by_body_the_bytes_are_compared_whatever_their_framing() {
    for sending in SENDING {
        let (_primary, _shadow, proxy) = comparing(
            ", compare: body",
            sending,
            |path| match path {
                "/status" => sized("200 OK", "fine"),
                "/empty" => sized("204 No Content", ""),
                _ => sized("200 OK", "hello, world"),
            },
            |path| match path {
                // The same bytes in chunks: alike.
                "/same" => chunked("200 OK", "hello, world"),
                "/differs" => chunked("200 OK", "hello, World"),
                "/status" => sized("500 Internal Server Error", "fine"),
                "/empty" => sized("204 No Content", ""),
                // Shorter: the same start is not the same body.
                _ => sized("200 OK", "hello"),
            },
        )
        .await;
        get_each(
            &proxy,
            &["/same", "/differs", "/status", "/empty", "/short"],
        )
        .await;
        // To a HEAD, both answer without a body: alike, though their GETs' bodies differ.
        let req = Request::head(proxy.url("/differs"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&client(), req).await.unwrap().0, StatusCode::OK);
        let s = counted(&proxy, 6).await;
        assert_eq!(verdicts(&s), (6, 3), "{sending}");
        // In the order compared: copies sent each on its own may be answered in any order.
        let mut bodies: Vec<(String, bool)> = differences(&proxy)
            .await
            .iter()
            .map(|d| (d["path"].to_string(), d["bodies_differ"].as_bool().unwrap()))
            .collect();
        bodies.sort();
        let expected = [("/differs", true), ("/short", true), ("/status", false)];
        assert_eq!(
            bodies,
            expected.map(|(p, b)| (format!("\"{p}\""), b)),
            "{sending}"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_posts_copy_is_compared_once_its_body_has_gone_both_ways() {
    let echo = |_: &str| sized("201 Created", "made");
    for sending in SENDING {
        let (_primary, _shadow, proxy) = comparing(", compare: body", sending, echo, echo).await;
        let c = client();
        for _ in 0..3 {
            let req = Request::builder()
                .method(Method::POST)
                .uri(proxy.url("/orders"))
                .body(Full::new(Bytes::from_static(b"twelve bytes")))
                .unwrap();
            assert_eq!(send(&c, req).await.unwrap().0, StatusCode::CREATED);
        }
        let s = counted(&proxy, 3).await;
        assert_eq!(verdicts(&s), (3, 0), "{sending}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn copies_without_an_answer_on_either_side_are_not_compared() {
    // The shadow refuses connections: its copies are errors, and nothing is compared.
    let primary = RawBackend::start(|_| (sized("200 OK", "ok"), false)).await;
    let dead = dead_addr().await;
    let proxy = Proxy::start(&config(primary.addr, dead, ", compare: body", "")).await;
    get_each(&proxy, &["/a", "/b"]).await;
    let s = sent(&proxy, 2).await;
    assert_eq!(s["errors"], 2);
    assert_eq!(verdicts(&s), (0, 0));
    proxy.stop().await;

    // The primary's backend is down: the client gets 502 from the proxy, which is no answer to
    // compare; the shadow answers.
    let shadow = RawBackend::start(|_| (sized("200 OK", "ok"), false)).await;
    let proxy = Proxy::start(&config(dead, shadow.addr, ", compare: status", "")).await;
    let c = client();
    for _ in 0..2 {
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        let (status, _, _) = send(&c, req).await.unwrap();
        assert!(status.is_server_error(), "{status}");
    }
    let s = sent(&proxy, 2).await;
    assert_eq!(verdicts(&s), (0, 0));
    proxy.stop().await;
}

#[tokio::test]
async fn without_compare_nothing_is_compared() {
    let answer = |_: &str| sized("200 OK", "ok");
    let (_primary, _shadow, proxy) =
        comparing("", "", answer, |_| sized("404 Not Found", "")).await;
    get_each(&proxy, &["/a", "/b"]).await;
    let s = sent(&proxy, 2).await;
    assert_eq!(verdicts(&s), (0, 0));
    proxy.stop().await;
}

/// A gRPC answer over HTTP/1.1: a message, then `grpc-status` in the trailers; or, with no
/// message, the status in the head (a trailers-only answer).
fn grpc_answer(status: &str, message: bool) -> Vec<u8> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n";
    match message {
        true => format!(
            "{head}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: {status}\r\n\r\n"
        ),
        false => format!("{head}grpc-status: {status}\r\ncontent-length: 0\r\n\r\n"),
    }
    .into_bytes()
}

#[tokio::test]
async fn grpc_calls_are_compared_by_their_grpc_status_too() {
    // Every answer is HTTP 200; the shadow fails some calls with INTERNAL (13), in the trailers
    // or in the head.
    let (_primary, _shadow, proxy) = comparing(
        ", compare: status",
        "",
        |path| grpc_answer("0", path != "/only-head"),
        |path| match path {
            "/fails" => grpc_answer("13", true),
            "/only-head" => grpc_answer("5", false),
            _ => grpc_answer("0", true),
        },
    )
    .await;
    let c = client();
    for path in ["/ok", "/fails", "/only-head", "/ok"] {
        let req = Request::post(proxy.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK, "{path}");
    }
    let s = counted(&proxy, 4).await;
    assert_eq!(verdicts(&s), (4, 2));
    let mut found: Vec<(Value, Value, Value)> = differences(&proxy)
        .await
        .iter()
        .map(|d| {
            let grpc = |side: &str| d[side]["grpc_status"].clone();
            (d["method"].clone(), grpc("primary"), grpc("copy"))
        })
        .collect();
    found.sort_by_key(|f| f.2.to_string());
    assert_eq!(
        found,
        [
            (json!("POST"), json!("0"), json!("13")),
            (json!("POST"), json!("0"), json!("5")),
        ]
    );
    proxy.stop().await;
}
