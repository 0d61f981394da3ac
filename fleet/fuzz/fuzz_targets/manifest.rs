//! Any text given to the manifest loader yields a manifest or diagnostics, never a panic;
//! any manifest it accepts can be planned.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(loaded) = fleet::load(text) {
        let request = fleet::plan::ReleaseRequest { version: "v2".into(), emergency: None };
        let start = chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap_or_default();
        let _ = fleet::plan::plan(&loaded.manifest, &request, start);
    }
});
