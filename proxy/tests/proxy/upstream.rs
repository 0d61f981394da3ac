use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::{Backend, Mode, Proxy, client, dead_addr, send};

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

#[tokio::test]
async fn a_request_with_a_body_is_not_retried() {
    let alive = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&config(
        &[dead_addr().await, alive.addr],
        "{ eject_after: 1000 }",
    ))
    .await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        statuses.push(send(&c, req).await.unwrap().0.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 502, 502]);
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
