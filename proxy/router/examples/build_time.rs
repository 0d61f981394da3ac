//! How long a large table takes: reading its JSON text, and building the checked table.
//!
//!     cargo run --release -p fleet-proxy-router --example build_time [ROUTES]

use std::time::Instant;

use fleet_proxy_router::{Positions, Table, TableSpec, load};

/// The allocator fleet-proxy runs with, so that the times are the proxy's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let routes: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let json = serde_json::json!({
        "tracks": {
            "stable": { "backends": ["127.0.0.1:9001"] },
            "canary": { "backends": ["127.0.0.1:9002"] },
        },
        "routes": (0..routes).map(|i| serde_json::json!({
            "host": format!("svc{i}.example.com"),
            "path_prefix": format!("/p{}", i % 50),
            "rules": [
                { "match": { "header": { "name": "x-canary", "exact": "true" } }, "to": "canary" },
                { "match": { "cookie": { "name": "ab", "regex": "version-[bc]" } }, "to": "canary" },
            ],
            "split": { "stable": 9500, "canary": 500 },
            "sticky": { "cookie": "fleet-bucket" },
        })).collect::<Vec<_>>(),
    });
    let text = json.to_string();
    let spec: TableSpec = match serde_json::from_value(json) {
        Ok(spec) => spec,
        Err(e) => return eprintln!("bad spec: {e}"),
    };
    // The first of five, which also pays for memory the process has not used before, and the
    // best of five.
    let (mut build, mut read, mut first, mut ok) = (f64::MAX, f64::MAX, None, true);
    for _ in 0..5 {
        let (spec, mut diags) = (spec.clone(), fleet_yaml::Diagnostics::default());
        let started = Instant::now();
        let built = Table::build(spec, &Positions::default(), &mut diags);
        build = build.min(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let loaded = load(&text);
        read = read.min(started.elapsed().as_secs_f64() * 1e3);
        first.get_or_insert((build, read));
        // Dropping a table is not part of building one.
        ok &= built.is_some() && loaded.is_ok();
    }
    let (first_build, first_read) = first.unwrap_or_default();
    println!(
        "{routes} routes, {} KiB of JSON: Table::build {build:.1} ms (first {first_build:.1}); load (read, check, build) {read:.1} ms (first {first_read:.1}); ok: {ok}",
        text.len() / 1024,
    );
}
