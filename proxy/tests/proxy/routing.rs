use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{Backend, Mode, Proxy, client, send, tracks};

const ROUTES: &str = r#"
routes:
  - path_prefix: /
    rules:
      - { match: { header: { name: x-canary, exact: "true" } }, to: canary }
      - { match: { header: { name: x-build, prefix: rc- } }, to: canary }
      - { match: { header: { name: x-tenant, regex: "t[0-9]+" } }, to: canary }
      - { match: { header: { name: x-debug, present: true } }, to: shadow }
      - { match: { cookie: { name: ab-test-group, exact: version-b } }, to: canary }
      - { match: { cookie: { name: beta, regex: "yes|y" } }, to: canary }
      - { match: { query: { name: track, exact: canary } }, to: canary }
      - { match: { method: [DELETE] }, to: shadow }
    split: { stable: 10000 }
  - { host: "*.example.com", split: { canary: 10000 } }
  - { host: api.example.com, path: /exact, split: { shadow: 10000 } }
"#;

/// Method, path, headers, and the track that must answer.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[tokio::test]
async fn every_kind_of_rule_sends_the_request_to_its_track() {
    let (stable, canary, shadow) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    );
    let proxy = Proxy::start(&format!(
        "{}{ROUTES}",
        tracks(stable.addr, canary.addr, shadow.addr)
    ))
    .await;
    let cases: &[Case] = &[
        ("GET", "/", &[], "stable"),
        ("GET", "/", &[("x-canary", "true")], "canary"),
        ("GET", "/", &[("x-canary", "false")], "stable"),
        ("GET", "/", &[("x-build", "rc-3")], "canary"),
        ("GET", "/", &[("x-tenant", "t7")], "canary"),
        ("GET", "/", &[("x-debug", "")], "shadow"),
        (
            "GET",
            "/",
            &[("cookie", "a=b; ab-test-group=version-b")],
            "canary",
        ),
        (
            "GET",
            "/",
            &[("cookie", "a=b"), ("cookie", "beta=y")],
            "canary",
        ),
        ("GET", "/?track=canary", &[], "canary"),
        ("DELETE", "/x", &[], "shadow"),
        ("GET", "/", &[("host", "www.example.com")], "canary"),
        ("GET", "/exact", &[("host", "api.example.com")], "shadow"),
        ("GET", "/exact/no", &[("host", "api.example.com")], "canary"),
    ];
    let c = client();
    for (method, path, headers, want) in cases {
        let mut req = Request::builder().method(*method).uri(proxy.url(path));
        for (k, v) in *headers {
            req = req.header(*k, *v);
        }
        let (status, h, body) = send(&c, req.body(Full::<Bytes>::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (200, *want),
            "{method} {path} {headers:?}"
        );
        assert_eq!(h["x-served-by"], *want);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_without_a_sticky_cookie_gets_one_and_keeps_its_track() {
    let (stable, canary, shadow) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    );
    let routes = "routes:\n  - { split: { stable: 5000, canary: 5000 }, sticky: { cookie: fleet-bucket, max_age: 600 } }\n";
    let proxy = Proxy::start(&format!(
        "{}{routes}",
        tracks(stable.addr, canary.addr, shadow.addr)
    ))
    .await;
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let (_, h, first) = send(
            &c,
            Request::get(proxy.url("/")).body(Full::default()).unwrap(),
        )
        .await
        .unwrap();
        let set_cookie = h["set-cookie"].to_str().unwrap().to_string();
        assert!(
            set_cookie.contains("Max-Age=600") && set_cookie.contains("HttpOnly"),
            "{set_cookie}"
        );
        let pair = set_cookie.split(';').next().unwrap().to_string();
        for _ in 0..3 {
            let req = Request::get(proxy.url("/"))
                .header("cookie", &pair)
                .body(Full::default())
                .unwrap();
            let (_, h, again) = send(&c, req).await.unwrap();
            assert_eq!(again, first, "a user with {pair} changed tracks");
            assert!(h.get("set-cookie").is_none());
        }
        seen.insert(first);
    }
    // 40 random users over a 50/50 split: both tracks serve someone (fails with p ≈ 2e-12).
    assert_eq!(seen.len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxy_adds_forwarding_headers_and_drops_hop_by_hop_ones() {
    let (stable, canary, shadow) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    );
    let routes = "routes:\n  - { split: { stable: 10000 } }\n";
    let proxy = Proxy::start(&format!(
        "{}{routes}",
        tracks(stable.addr, canary.addr, shadow.addr)
    ))
    .await;
    let req = Request::get(proxy.url("/"))
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-host", "evil.test")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("host", "shop.test")
        .body(Full::default())
        .unwrap();
    let (_, h, _) = send(&client(), req).await.unwrap();
    assert_eq!(h["x-seen-xff"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-seen-proto"], "http");
    assert_eq!(h["x-seen-host"], "shop.test");
    assert_eq!(h["x-seen-forwarded-host"], "shop.test");
    assert!(h.get("x-seen-connection").is_none());
    assert!(h.get("x-seen-secret").is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_no_route_matches_gets_404() {
    let (stable, canary, shadow) = (
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    );
    let routes = "routes:\n  - { host: only.test, split: { stable: 10000 } }\n";
    let proxy = Proxy::start(&format!(
        "{}{routes}",
        tracks(stable.addr, canary.addr, shadow.addr)
    ))
    .await;
    let (status, _, body) = send(
        &client(),
        Request::get(proxy.url("/")).body(Full::default()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (404, "no route\n"));
    proxy.stop().await;
}
