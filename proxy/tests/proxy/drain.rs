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

/// A drain waits for an HTTP/2 client still taking its answer's last bytes, however slowly
/// its window lets them go (its `WINDOW_UPDATE`s are progress), though the answer left the
/// backend and the proxy's hands long before.
#[tokio::test]
async fn a_drain_waits_for_an_http2_client_still_taking_the_end_of_its_answer() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    const LENGTH: usize = 16 * 1024;
    // An HTTP/2 backend whose answer comes in one frame that ends its stream: the proxy hands
    // it on whole, and is done with it, while the client has room for 256 bytes of it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let answer = hyper::service::service_fn(|_| async {
                let body = Full::new(bytes::Bytes::from(vec![b'x'; LENGTH]));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            let http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            tokio::spawn(http2.serve_connection(TokioIo::new(s), answer));
        }
    });
    let yaml = format!(
        "drain_timeout: 30s\ntracks:\n  stable: {{ backends: [\"{backend}\"], protocol: h2c }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
    );
    let mut proxy = Proxy::start(&yaml).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(256)
        .adaptive_window(false)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(proxy.url("/"))
        .body(Full::<bytes::Bytes>::default())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut got = 0;
    let mut stopping = None;
    while let Some(frame) = body.frame().await {
        got += frame.expect("the whole body").into_data().unwrap().len();
        // A quarter in, the drain begins; from then on, 256 bytes each 50 ms.
        if got >= LENGTH / 4 {
            stopping.get_or_insert_with(|| proxy.begin_stop());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(got, LENGTH);
    stopping.unwrap().await.unwrap().unwrap();
    serving.abort();
}
