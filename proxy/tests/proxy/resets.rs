//! HTTP/2 clients that reset their streams before the answer ("rapid reset",
//! CVE-2023-44487: each reset drops a backend exchange half done).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::support::{Backend, Mode, Proxy, RawH2, eventually, h2_client, h2_frame, send};

/// A proxy whose `/slow` route answers after 30 s (track canary) and whose other paths at
/// once (track stable), or with 404 without `others`.
async fn slow_route_proxy(extra: &str, others: bool) -> (Proxy, Backend, Backend) {
    let rest = match others {
        true => "  - { split: { stable: 10000 } }\n",
        false => "",
    };
    let slow = Backend::start("canary", Mode::Slow(Duration::from_secs(30))).await;
    let stable = Backend::start("stable", Mode::Normal).await;
    let proxy = Proxy::start(&format!(
        "{extra}tracks:\n  stable: {{ backends: [\"{}\"] }}\n  canary: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ path_prefix: /slow, split: {{ canary: 10000 }} }}\n{rest}",
        stable.addr, slow.addr
    ))
    .await;
    (proxy, slow, stable)
}

fn get(proxy: &Proxy, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(proxy.url(path))
        .body(Full::default())
        .unwrap()
}

/// Other clients are served.
async fn others_served(proxy: &Proxy) {
    let (status, _, body) = send(&h2_client(), get(proxy, "/")).await.expect("served");
    assert_eq!((status.as_u16(), body.as_str()), (200, "stable"));
}

/// A client that resets each stream once the backend has it has its connection closed once
/// it has made 100 such resets; requests the proxy answers itself (404s between them) do not
/// put that off.
#[tokio::test]
async fn an_http2_client_that_resets_its_streams_before_their_answers_is_cut_off() {
    for diluted in [false, true] {
        let (proxy, slow, _stable) = slow_route_proxy("", !diluted).await;
        resets_until_closed(&proxy, &slow, diluted).await;
        if !diluted {
            others_served(&proxy).await;
        }
        proxy.stop().await;
    }
}

async fn resets_until_closed(proxy: &Proxy, slow: &Backend, diluted: bool) {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let served = tokio::spawn(conn);
    let mut resets = 0;
    'resets: while !served.is_finished() && resets < 150 {
        let Ok(()) = std::future::poll_fn(|cx| sender.poll_ready(cx)).await else {
            break;
        };
        if diluted {
            for _ in 0..2 {
                // An error: the connection closed after the last reset.
                let Ok(resp) = sender.send_request(get(proxy, "/")).await else {
                    break 'resets;
                };
                assert_eq!(resp.status(), 404);
            }
        }
        let answer = sender.send_request(get(proxy, "/slow"));
        // Sent on to the backend, then reset: the response future dropped.
        let hits = slow.hits();
        tokio::select! {
            a = answer => {
                // The connection closed under the request: no answer, no further request.
                assert!(a.is_err(), "answered: {a:?}");
                break;
            }
            () = eventually(Duration::from_secs(5), || async { slow.hits() > hits }) => {}
        }
        resets += 1;
    }
    assert!(
        (100..=101).contains(&resets),
        "the connection was closed after {resets} resets"
    );
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the connection closed")
        .unwrap()
        .ok();
}

/// Streams a client gives up on after a while (a deadline of seconds) are no attack: 150 of
/// them, reset 1.5 s in, leave the connection open, and a stream beside them gets its answer.
#[tokio::test]
async fn streams_reset_after_a_while_do_not_close_the_connection() {
    let (proxy, slow, _stable) = slow_route_proxy("", true).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let served = tokio::spawn(conn);
    let given_up: Vec<_> = (0..150)
        .map(|_| {
            let mut sender = sender.clone();
            let req = get(&proxy, "/slow");
            tokio::spawn(async move {
                let answer = sender.send_request(req);
                assert!(
                    tokio::time::timeout(Duration::from_millis(1500), answer)
                        .await
                        .is_err(),
                    "answered before the deadline"
                );
            })
        })
        .collect();
    eventually(Duration::from_secs(5), || async { slow.hits() == 150 }).await;
    for task in given_up {
        task.await.unwrap();
    }
    let mut sender = sender;
    let resp = sender
        .send_request(get(&proxy, "/"))
        .await
        .expect("answered");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"stable");
    assert!(!served.is_finished());
    proxy.stop().await;
}

/// HEADERS with END_STREAM and END_HEADERS: `GET http://a/slow`.
fn get_slow(stream: u32) -> Vec<u8> {
    h2_frame(1, 5, stream, b"\x82\x86\x04\x05/slow\x01\x01a")
}

/// RST_STREAM, CANCEL.
fn cancel(stream: u32) -> Vec<u8> {
    h2_frame(3, 0, stream, &8u32.to_be_bytes())
}

/// A client past its connection's graceful close (sent when it idled), which never answers
/// the closing PING and so may still open streams, is held to the same rule.
#[tokio::test]
async fn resets_after_the_graceful_close_began_are_held_to_the_rule_too() {
    // Idle for a second, it is closed gracefully: GOAWAY, and a PING it never answers.
    let (proxy, slow, _stable) = slow_route_proxy("limits: { idle_timeout: 1s }\n", true).await;
    let mut client = RawH2::connect(proxy.addr).await;
    eventually(Duration::from_secs(5), || async { client.got_goaway() }).await;
    // One stream left waiting throughout: the connection is never without a request in
    // flight, so only the reset rule can close it.
    assert!(client.send(&get_slow(1)).await);
    eventually(Duration::from_secs(5), || async { slow.hits() == 1 }).await;
    let mut resets = 0;
    for stream in (3..300).step_by(2) {
        let hits = slow.hits();
        if !client.send(&get_slow(stream)).await {
            break;
        }
        eventually(Duration::from_secs(5), || async {
            slow.hits() > hits || client.closed()
        })
        .await;
        if !client.send(&cancel(stream)).await {
            break;
        }
        resets += 1;
    }
    assert!(
        (100..=101).contains(&resets),
        "the connection was closed after {resets} resets"
    );
    eventually(Duration::from_secs(5), || async { client.closed() }).await;
    others_served(&proxy).await;
    proxy.stop().await;
}
