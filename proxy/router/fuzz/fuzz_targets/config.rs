//! The table loader (YAML or JSON text → checked table) never panics, and a table it accepts
//! serializes to JSON that it accepts again, as `GET /routes` then `PUT /routes` would.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = fleet_proxy_router::load(src) {
        let json = serde_json::to_string(table.spec()).expect("a spec always serializes");
        assert!(
            fleet_proxy_router::load(&json).is_ok(),
            "round trip failed: {json}"
        );
    }
});
