use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::{Backend, Mode, Proxy, client, eventually, get, send, stable_only};

#[tokio::test]
async fn on_shutdown_readiness_fails_new_connections_are_refused_and_in_flight_requests_finish() {
    let slow = Backend::start("stable", Mode::Slow(Duration::from_millis(800))).await;
    let yaml = stable_only("drain_timeout: 10s\n", slow.addr);
    let mut proxy = Proxy::start(&yaml).await;
    let url = proxy.url("/");
    let in_flight = tokio::spawn(async move {
        send(&client(), Request::get(url).body(Full::default()).unwrap()).await
    });
    eventually(Duration::from_secs(5), || async { slow.hits() == 1 }).await;
    let stopped = proxy.begin_stop();
    let ready = proxy.admin_url("/readyz");
    eventually(Duration::from_secs(5), || async {
        get(&ready).await.map(|r| r.0) == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    let addr = proxy.addr;
    eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let (status, _, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    stopped.await.unwrap().unwrap();
}
