//! Each backend's passive health (ejections and trials) in `/stats` and `/metrics`: read from
//! the backends of the table in force when asked, not counted per request.

use std::fmt::Write;

use serde_json::{Value, json};

use super::prometheus::{escape, head};
use crate::upstream::Health;

/// `/stats`' `backends`: one entry per address, in address order.
pub fn json(backends: &[(String, Health)]) -> Value {
    let list: Vec<Value> = backends
        .iter()
        .map(|(addr, h)| {
            json!({
                "backend": addr,
                "ejected": h.ejected,
                "ejections": h.ejections,
                "trials": { "passed": h.trials_passed, "failed": h.trials_failed },
            })
        })
        .collect();
    Value::Array(list)
}

/// The `fleet_proxy_backend_*` families, labelled `backend`.
pub fn prometheus(backends: &[(String, Health)], out: &mut String) {
    let backends: Vec<(String, &Health)> = (backends.iter())
        .map(|(addr, h)| (escape(addr), h))
        .collect();
    let name = "fleet_proxy_backend_ejected";
    head(
        out,
        name,
        "gauge",
        "1 while the backend is ejected after consecutive failures.",
    );
    for (addr, h) in &backends {
        let _ = writeln!(out, "{name}{{backend=\"{addr}\"}} {}", u8::from(h.ejected));
    }
    let name = "fleet_proxy_backend_ejections_total";
    head(
        out,
        name,
        "counter",
        "Times the backend was ejected after consecutive failures.",
    );
    for (addr, h) in &backends {
        let _ = writeln!(out, "{name}{{backend=\"{addr}\"}} {}", h.ejections);
    }
    let name = "fleet_proxy_backend_trials_total";
    let help = "Requests let through to the backend while ejected, as its track had no other: passed (answered, ending the ejection) or failed.";
    head(out, name, "counter", help);
    for (addr, h) in &backends {
        for (outcome, v) in [("passed", h.trials_passed), ("failed", h.trials_failed)] {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{addr}\",outcome=\"{outcome}\"}} {v}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_is_one_entry_and_one_series_per_family() {
        let ejected = Health {
            ejected: true,
            ejections: 2,
            trials_passed: 1,
            trials_failed: 3,
        };
        let backends = [("127.0.0.1:9002".to_string(), ejected)];
        assert_eq!(
            json(&backends),
            json!([{
                "backend": "127.0.0.1:9002", "ejected": true, "ejections": 2,
                "trials": { "passed": 1, "failed": 3 },
            }])
        );
        let mut out = String::new();
        prometheus(&backends, &mut out);
        let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            series,
            [
                "fleet_proxy_backend_ejected{backend=\"127.0.0.1:9002\"} 1",
                "fleet_proxy_backend_ejections_total{backend=\"127.0.0.1:9002\"} 2",
                "fleet_proxy_backend_trials_total{backend=\"127.0.0.1:9002\",outcome=\"passed\"} 1",
                "fleet_proxy_backend_trials_total{backend=\"127.0.0.1:9002\",outcome=\"failed\"} 3",
            ]
        );
    }
}
