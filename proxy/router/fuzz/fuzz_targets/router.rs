//! Routing any request through a table with every kind of rule never panics.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

const TABLE: &str = r#"
tracks:
  stable: { backends: ["127.0.0.1:1"] }
  canary: { backends: ["127.0.0.1:2"] }
routes:
  - host: "*.example.com"
    path_prefix: /api
    rules:
      - { match: { header: { name: x-a, regex: "a+b" } }, to: canary }
      - { match: { cookie: { name: c, exact: v } }, to: canary }
      - { match: { query: { name: q, prefix: x } }, to: canary }
      - { match: { method: [POST] }, to: canary }
    split: { stable: 9500, canary: 500 }
    sticky: { cookie: fleet-bucket }
  - { host: shop.example.com, path: /x, split: { stable: 10000 }, mirror: { to: canary, percent: 50 } }
  - { split: { stable: 5000, canary: 5000 }, sticky: { header: x-user } }
"#;

/// Built once: the target is routing, not building.
static TABLE_BUILT: LazyLock<fleet_proxy_router::Table> =
    LazyLock::new(|| fleet_proxy_router::load(TABLE).expect("the fuzz table is valid"));

fuzz_target!(|data: &[u8]| {
    let table = &*TABLE_BUILT;
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\n');
    let (host, path, query, cookie, header) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("/"),
        parts.next(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(cookie) {
        headers.append(http::header::COOKIE, v);
    }
    if let Ok(v) = http::HeaderValue::from_str(header) {
        headers.append("x-user", v.clone());
        headers.append("x-a", v);
    }
    let view = fleet_proxy_router::RequestView {
        method: &http::Method::GET,
        host,
        path,
        query,
        headers: &headers,
    };
    let mut n = data.len() as u64;
    let _ = table.decide(&view, &mut || {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
        n
    });
});
