use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::support::{
    Backend, Mode, Proxy, client, eventually, exchange, get, put, send, series, stable_proxy,
    stats, tracks,
};

async fn three() -> (Backend, Backend, Backend) {
    (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    )
}

fn table_json(b: &(Backend, Backend, Backend), split: &str) -> String {
    format!(
        r#"{{"tracks": {{"stable": {{"backends": ["{}"]}}, "canary": {{"backends": ["{}"]}}, "shadow": {{"backends": ["{}"]}}}},
            "routes": [{{"split": {split}}}]}}"#,
        b.0.addr, b.1.addr, b.2.addr
    )
}

/// One connection to the proxy, HTTP/1.1 or HTTP/2 (prior knowledge), and no pool behind it.
enum OneConnection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl OneConnection {
    async fn open(addr: std::net::SocketAddr, http2: bool) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        if http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Self::Http2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self::Http1(sender)
        }
    }

    async fn get(&mut self, path: &str) -> Result<(StatusCode, String), hyper::Error> {
        let resp = match self {
            Self::Http1(s) => {
                s.ready().await?;
                let req = Request::get(path).header("host", "proxy");
                s.send_request(req.body(Full::default()).unwrap()).await?
            }
            Self::Http2(s) => {
                let req = Request::get(format!("http://proxy{path}"));
                s.send_request(req.body(Full::default()).unwrap()).await?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

#[tokio::test]
async fn put_routes_replaces_the_table_and_get_routes_shows_it_with_its_version() {
    let b = three().await;
    let proxy = Proxy::start(&format!(
        "{}routes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        tracks(b.0.addr, b.1.addr, b.2.addr)
    ))
    .await;
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "stable");
    let (status, body) = put(
        &proxy.admin_url("/routes"),
        &table_json(&b, r#"{"canary": 10000}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The new version, and how long the table took to build and to come into force.
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["version"], 2);
    let (build, total) = (answer["build_ms"].as_f64(), answer["total_ms"].as_f64());
    assert!(
        matches!((build, total), (Some(b), Some(t)) if 0.0 <= b && b <= t),
        "{answer}"
    );
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "canary");
    let (_, _, routes) = get(&proxy.admin_url("/routes")).await.unwrap();
    let routes: Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes["version"], 2);
    assert_eq!(routes["routes"][0]["split"]["canary"], 10000);
    // What GET returns, PUT takes back: with its version it is a compare-and-swap.
    let (status, _) = put(&proxy.admin_url("/routes"), &routes.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = put(&proxy.admin_url("/routes"), &routes.to_string()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_table_gets_400_with_every_diagnostic_and_the_old_table_stays() {
    let b = three().await;
    let proxy = Proxy::start(&format!(
        "{}routes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        tracks(b.0.addr, b.1.addr, b.2.addr)
    ))
    .await;
    let bad = r#"{"tracks": {"stable": {"backends": ["127.0.0.1:1"]}},
 "routes": [{"split": {"stable": 9000, "canery": 1000}, "stiky": {"cookie": "b"}}]}"#;
    let (status, body) = put(&proxy.admin_url("/routes"), bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let errors: Value = serde_json::from_str(&body).unwrap();
    let errors: Vec<String> = errors["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}:{} {} {}",
                e["line"],
                e["column"],
                e["path"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect();
    // Structural and semantic problems come back together, in source order.
    assert_eq!(
        errors,
        [
            r#"2:50 routes[0].split.canery unknown track "canery""#,
            r#"2:57 routes[0].stiky unknown field "stiky""#
        ]
    );
    assert!(body.contains("did you mean"), "{body}");
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "stable");
    let (_, _, routes) = get(&proxy.admin_url("/routes")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&routes).unwrap()["version"],
        1
    );
    proxy.stop().await;
}

/// A few hundred bytes of YAML aliases of aliases would build a billion nodes: refused with
/// a diagnostic, and the proxy goes on serving.
#[tokio::test]
async fn a_table_of_aliases_that_would_expand_without_end_gets_400() {
    let (proxy, _b) = crate::support::stable_proxy("").await;
    let mut bomb = String::from("a0: &a0 [x]\n");
    for i in 1..=9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let (status, body) = put(&proxy.admin_url("/routes"), &bomb).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("anchors and aliases copy more than"),
        "{body}"
    );
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "stable");
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_table_it_started_with() {
    let stable = Backend::start("stable", Mode::Slow(Duration::from_millis(500))).await;
    let canary = Backend::start("canary", Mode::Normal).await;
    let proxy = Proxy::start(&format!(
        "tracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ name: old, split: {{ stable: 10000 }} }}\n",
        stable.addr
    ))
    .await;
    let url = proxy.url("/");
    let in_flight = tokio::spawn(async move { get(&url).await });
    eventually(Duration::from_secs(5), || async { stable.hits() == 1 }).await;
    // The new table has neither the route nor the track that request is on.
    let new = format!(
        r#"{{"tracks": {{"canary": {{"backends": ["{}"]}}}}, "routes": [{{"name": "new", "split": {{"canary": 10000}}}}]}}"#,
        canary.addr
    );
    assert_eq!(
        put(&proxy.admin_url("/routes"), &new).await.0,
        StatusCode::OK
    );
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "canary");
    let (status, _, body) = in_flight.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
    // Counted under the route and track of the table it started with.
    let old = series(&stats(&proxy).await, "stable", "primary");
    assert_eq!(
        (&old["route"], &old["responses"]["2xx"]),
        (&Value::from("old"), &Value::from(1))
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_thousand_table_swaps_under_load_fail_no_request() {
    let b = three().await;
    let proxy = Proxy::start(&format!(
        "{}routes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        tracks(b.0.addr, b.1.addr, b.2.addr)
    ))
    .await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (done, ok, failed) = (done.clone(), ok.clone(), failed.clone());
        // Each worker keeps one connection, HTTP/1.1 or HTTP/2, across every swap: a reset
        // would fail its next request, and there is no pool to open another.
        let mut conn = OneConnection::open(proxy.addr, i % 2 == 1).await;
        load.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                match conn.get("/").await {
                    Ok((s, body))
                        if s == StatusCode::OK && (body == "stable" || body == "canary") =>
                    {
                        ok.fetch_add(1, Ordering::SeqCst)
                    }
                    other => {
                        // The connection is gone or broken: nothing more to learn from it.
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
            }
        }));
    }
    let (stable, canary) = (
        table_json(&b, r#"{"stable": 10000}"#),
        table_json(&b, r#"{"stable": 5000, "canary": 5000}"#),
    );
    let c = client();
    for i in 0..1000 {
        let body = if i % 2 == 0 { &canary } else { &stable };
        let req = Request::put(proxy.admin_url("/routes"))
            .body(Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    }
    done.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert_eq!(
        stats(&proxy).await["proxy"]["connections_accepted"],
        4,
        "every worker's one connection lived through the swaps"
    );
    assert!(
        ok.load(Ordering::SeqCst) > 100,
        "too little load: {}",
        ok.load(Ordering::SeqCst)
    );
    let (_, _, routes) = get(&proxy.admin_url("/routes")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&routes).unwrap()["version"],
        1001
    );
    proxy.stop().await;
}

#[tokio::test]
async fn stats_and_metrics_count_requests_per_route_and_track() {
    let b = three().await;
    let routes = "routes:\n  - name: web\n    rules: [ { match: { header: { name: x-canary, present: true } }, to: canary } ]\n    split: { stable: 10000 }\n";
    let proxy = Proxy::start(&format!("{}{routes}", tracks(b.0.addr, b.1.addr, b.2.addr))).await;
    let c = client();
    for i in 0..5 {
        let mut req = Request::get(proxy.url("/"));
        if i < 2 {
            req = req.header("x-canary", "1");
        }
        send(&c, req.body(Full::default()).unwrap()).await.unwrap();
    }
    let (_, _, stats) = get(&proxy.admin_url("/stats")).await.unwrap();
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let series = |track: &str| {
        stats["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["route"] == "web" && s["track"] == track && s["source"] == "primary")
            .unwrap()
            .clone()
    };
    // Only what the route can reach has a series: its two tracks, as primary; not `shadow`,
    // which it never uses, and no mirror series, for it mirrors nothing.
    let mut reached: Vec<String> = stats["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["route"] == "web")
        .map(|s| {
            format!(
                "{}/{}",
                s["track"].as_str().unwrap(),
                s["source"].as_str().unwrap()
            )
        })
        .collect();
    reached.sort();
    assert_eq!(reached, ["canary/primary", "stable/primary"]);
    assert_eq!(series("stable")["requests"], 3);
    assert_eq!(series("stable")["responses"]["2xx"], 3);
    assert_eq!(series("canary")["requests"], 2);
    assert_eq!(
        series("canary")["latency"]["cumulative"]
            .as_array()
            .unwrap()
            .last()
            .unwrap(),
        2
    );
    let (_, _, metrics) = get(&proxy.admin_url("/metrics")).await.unwrap();
    assert!(
        metrics.contains(
            "fleet_proxy_requests_total{route=\"web\",track=\"stable\",source=\"primary\"} 3"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("fleet_proxy_request_duration_seconds_count{route=\"web\",track=\"canary\",source=\"primary\"} 2"));
    proxy.stop().await;
}

/// A route name a scraper must read back: quotes, backslashes and a line break escaped as
/// the text format says; a histogram whose buckets climb to its count.
#[tokio::test]
async fn metrics_escape_label_values_and_each_histogram_adds_up() {
    let b = three().await;
    let routes = "routes:\n  - name: \"we\\\"ird\\\\name\\nx\"\n    split: { stable: 10000 }\n";
    let proxy = Proxy::start(&format!("{}{routes}", tracks(b.0.addr, b.1.addr, b.2.addr))).await;
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/")).await.unwrap().0, StatusCode::OK);
    }
    let (_, _, metrics) = get(&proxy.admin_url("/metrics")).await.unwrap();
    for line in metrics.lines() {
        assert!(
            line.starts_with("# ") || line.starts_with("fleet_proxy_"),
            "{line:?}"
        );
    }
    let l = r#"route="we\"ird\\name\nx",track="stable",source="primary""#;
    for line in [
        format!("fleet_proxy_requests_total{{{l}}} 3"),
        format!("fleet_proxy_responses_total{{{l},class=\"2xx\"}} 3"),
        format!("fleet_proxy_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
        format!("fleet_proxy_request_duration_seconds_count{{{l}}} 3"),
    ] {
        assert!(
            metrics.lines().any(|m| m == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let bucket = format!("fleet_proxy_request_duration_seconds_bucket{{{l},le=");
    let buckets: Vec<u64> = metrics
        .lines()
        .filter(|m| m.starts_with(&bucket))
        .map(|m| m.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        buckets.len() > 1 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );
    // /stats tells the same, with the name as written.
    let stats = crate::support::stats(&proxy).await;
    let named = stats["series"].as_array().unwrap().iter().find(|s| {
        s["route"] == "we\"ird\\name\nx" && s["track"] == "stable" && s["source"] == "primary"
    });
    assert_eq!(named.unwrap()["requests"], 3, "{stats}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_edited_config_file_is_reloaded_and_a_broken_one_is_not() {
    let b = three().await;
    let dir = std::env::temp_dir().join(format!("fleet-proxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.yaml");
    let config = |split: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwatch_interval: 20ms\n{}routes:\n  - {{ split: {split} }}\n",
            tracks(b.0.addr, b.1.addr, b.2.addr)
        )
    };
    std::fs::write(&file, config("{ stable: 10000 }")).unwrap();
    let proxy = Proxy::start_in(&config("{ stable: 10000 }"), &dir, Some(&file)).await;
    std::fs::write(&file, config("{ canary: 10000 }")).unwrap();
    eventually(Duration::from_secs(5), || async {
        get(&proxy.url("/")).await.unwrap().2 == "canary"
    })
    .await;
    std::fs::write(&file, config("{ canary: 10 }")).unwrap();
    eventually(Duration::from_secs(5), || async {
        let (_, _, m) = get(&proxy.admin_url("/metrics")).await.unwrap();
        m.contains("fleet_proxy_table_rejected_total 1")
    })
    .await;
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "canary");
    // A file that cannot be read is counted too.
    std::fs::remove_file(&file).unwrap();
    eventually(Duration::from_secs(5), || async {
        let (_, _, m) = get(&proxy.admin_url("/metrics")).await.unwrap();
        m.contains("fleet_proxy_table_rejected_total 2")
    })
    .await;
    assert_eq!(get(&proxy.url("/")).await.unwrap().2, "canary");
    proxy.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn admin_connections_over_the_limit_are_closed_and_traffic_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn healthz(admin: std::net::SocketAddr) -> Option<(TcpStream, usize)> {
        let mut s = TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .ok()?
            .unwrap_or(0);
        Some((s, n))
    }

    let (proxy, _stable) = stable_proxy("").await;
    let limit = fleet_proxy::server::MAX_ADMIN_CONNECTIONS;
    let mut held = Vec::new();
    for _ in 0..limit {
        let (s, n) = healthz(proxy.admin).await.unwrap();
        assert!(n > 0, "an admin connection under the limit was not served");
        held.push(s);
    }
    let (_, n) = healthz(proxy.admin).await.unwrap();
    assert_eq!(n, 0, "admin connection {} was served", limit + 1);
    // Traffic has its own listener and limit.
    let (status, headers, _) = get(&proxy.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "stable");
    // One held connection closes: its place is free again.
    drop(held.pop());
    eventually(Duration::from_secs(10), || async {
        matches!(healthz(proxy.admin).await, Some((_, n)) if n > 0)
    })
    .await;
    drop(held);
    proxy.stop().await;
}

#[tokio::test]
async fn a_put_body_that_trickles_gets_408_and_frees_its_connection() {
    let (proxy, _stable) = stable_proxy("limits: { header_read_timeout: 300ms }\n").await;
    let before = get(&proxy.admin_url("/routes")).await.unwrap().2;
    let trickle = b"PUT /routes HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{";
    let (answer, closed) = exchange(proxy.admin, trickle).await;
    assert!(closed, "no answer within 5 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("limits.header_read_timeout"), "{answer}");
    // The table in force is untouched.
    assert_eq!(get(&proxy.admin_url("/routes")).await.unwrap().2, before);
    proxy.stop().await;
}

#[tokio::test]
async fn a_put_body_that_is_not_utf8_or_not_framed_gets_400_and_the_table_stays() {
    let (proxy, _stable) = stable_proxy("").await;
    let before = get(&proxy.admin_url("/routes")).await.unwrap().2;
    let (status, body) = put(&proxy.admin_url("/routes"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an empty table: {body}");
    let req = Request::put(proxy.admin_url("/routes"))
        .body(Full::new(Bytes::from_static(
            b"{\n  \"tr\xc3\xa4cks\": \xff}",
        )))
        .unwrap();
    let (status, _, body) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let errors: Value = serde_json::from_str(&body).unwrap();
    let error = &errors["errors"][0];
    assert_eq!(
        (&error["line"], &error["column"]),
        (&2.into(), &13.into()),
        "{body}"
    );
    assert_eq!(error["message"], "byte 0xff is not UTF-8");
    assert_eq!(error["help"], "send the table as UTF-8 JSON or YAML");
    let req = Request::put(proxy.admin_url("/routes"))
        .body(Full::new(Bytes::from_static(b"{\"a\": \"\xe2\x82")))
        .unwrap();
    let (status, _, body) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("the body ends in the middle of a character"),
        "{body}"
    );
    let raw = b"PUT /routes HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let (answer, _) = exchange(proxy.admin, raw).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("could not read the body"), "{answer}");
    assert_eq!(get(&proxy.admin_url("/routes")).await.unwrap().2, before);
    assert_eq!(stats(&proxy).await["proxy"]["table_rejected"], 3);
    proxy.stop().await;
}

#[tokio::test]
async fn a_table_declared_over_the_size_limit_is_refused_at_once() {
    // A header-read timeout far longer than the test may take: the refusal must not wait
    // for a body that is never sent.
    let (proxy, _b) = stable_proxy("limits: { header_read_timeout: 60s }\n").await;
    let raw = "PUT /routes HTTP/1.1\r\nHost: a\r\nContent-Length: 40000000\r\n\r\n{";
    let started = std::time::Instant::now();
    let (text, _) = exchange(proxy.admin, raw.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.contains("length limit exceeded"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn head_is_answered_like_get_and_a_wrong_method_is_told_which_are_allowed() {
    let (proxy, _backend) = stable_proxy("").await;
    let client = client();
    let ask = |method: &str, path: &str| {
        let req = Request::builder()
            .method(method)
            .uri(proxy.admin_url(path))
            .body(Full::default())
            .unwrap();
        send(&client, req)
    };
    for path in ["/healthz", "/readyz", "/stats", "/mirror/differences"] {
        let (status, headers, body) = ask("HEAD", path).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""), "HEAD {path}");
        let (_, got, full) = ask("GET", path).await.unwrap();
        assert_eq!(
            headers.get("content-type"),
            got.get("content-type"),
            "{path}"
        );
        assert!(!full.is_empty(), "GET {path}");
    }
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/routes", "GET, HEAD, PUT"),
        ("PUT", "/stats", "GET, HEAD"),
        ("DELETE", "/mirror/differences", "GET, HEAD"),
    ] {
        let (status, headers, _) = ask(method, path).await.unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(headers["allow"], allow, "{method} {path}");
    }
    proxy.stop().await;
}
