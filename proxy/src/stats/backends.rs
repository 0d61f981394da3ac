//! Each backend's passive health (ejections and trials) in `/stats` and `/metrics`: read from
//! the backends of the table in force when asked, not counted per request.

use std::fmt::Write;

use serde_json::{Value, json};

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

/// A family's values of one backend, each with its `outcome` label (empty: none).
type Values = fn(&Health) -> Vec<(&'static str, u64)>;

/// The `fleet_proxy_backend_*` families, labelled `backend`.
pub fn prometheus(backends: &[(String, Health)], out: &mut String) {
    let families: [(&str, &str, &str, Values); 3] = [
        (
            "fleet_proxy_backend_ejected",
            "gauge",
            "1 while the backend is ejected after consecutive failures.",
            |h| vec![("", u64::from(h.ejected))],
        ),
        (
            "fleet_proxy_backend_ejections_total",
            "counter",
            "Times the backend was ejected after consecutive failures.",
            |h| vec![("", h.ejections)],
        ),
        (
            "fleet_proxy_backend_trials_total",
            "counter",
            "Requests let through to the backend while ejected, as its track had no other: passed (answered, ending the ejection) or failed.",
            |h| vec![("passed", h.trials_passed), ("failed", h.trials_failed)],
        ),
    ];
    for (name, kind, help, values) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (addr, health) in backends {
            let addr = super::prometheus::escape(addr);
            for (outcome, v) in values(health) {
                let _ = match outcome {
                    "" => writeln!(out, "{name}{{backend=\"{addr}\"}} {v}"),
                    _ => writeln!(
                        out,
                        "{name}{{backend=\"{addr}\",outcome=\"{outcome}\"}} {v}"
                    ),
                };
            }
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
