//! `/metrics`: the same counters in the Prometheus text exposition format 0.0.4.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{BUCKETS_MS, Counters, Source, Stats};

impl Stats {
    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self, table_version: u64) -> String {
        let mut out = String::new();
        let series = self.snapshot();
        // One counter a series: a family of them, over every series or the mirror's only.
        let family_of = |out: &mut String,
                         name: &str,
                         help: &str,
                         of: fn(&Counters) -> &AtomicU64,
                         mirror_only: bool| {
            head(out, name, "counter", help);
            for ((r, t, s), c) in &series {
                if mirror_only && *s != Source::Mirror {
                    continue;
                }
                fleet_proxy_router::pace::point();
                let _ = writeln!(
                    out,
                    "{name}{{{}}} {}",
                    labels(r, t, *s),
                    of(c).load(Relaxed)
                );
            }
        };
        let family = |out: &mut String, name: &str, help: &str, of: fn(&Counters) -> &AtomicU64| {
            family_of(out, name, help, of, false);
        };
        family(
            &mut out,
            "fleet_proxy_requests_total",
            "Requests finished, by route, track and source.",
            |c| &c.requests,
        );
        head(
            &mut out,
            "fleet_proxy_responses_total",
            "counter",
            "Responses by status class.",
        );
        for ((r, t, s), c) in &series {
            fleet_proxy_router::pace::point();
            for (i, class) in c.classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "fleet_proxy_responses_total{{{},class=\"{}xx\"}} {}",
                    labels(r, t, *s),
                    i + 1,
                    class.load(Relaxed)
                );
            }
        }
        family(
            &mut out,
            "fleet_proxy_upstream_errors_total",
            "Requests that got no response from a backend.",
            |c| &c.errors,
        );
        family(
            &mut out,
            "fleet_proxy_grpc_errors_total",
            "gRPC answers whose grpc-status stands for a server failure (2, 4, 12, 13, 14, 15).",
            |c| &c.grpc_errors,
        );
        family(
            &mut out,
            "fleet_proxy_responses_broken_total",
            "Responses whose body the backend broke off or stalled after their head.",
            |c| &c.broken,
        );
        family_of(
            &mut out,
            "fleet_proxy_mirror_compared_total",
            "Mirrored copies whose answer was compared with the primary's (mirror: compare).",
            |c| &c.compared,
            true,
        );
        family_of(
            &mut out,
            "fleet_proxy_mirror_differed_total",
            "Compared copies whose answer differed from the primary's.",
            |c| &c.differed,
            true,
        );
        head(
            &mut out,
            "fleet_proxy_request_duration_seconds",
            "histogram",
            "Time to response headers.",
        );
        for ((r, t, s), c) in &series {
            fleet_proxy_router::pace::point();
            let l = labels(r, t, *s);
            let mut cumulative = 0;
            for (i, b) in c.latency.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = BUCKETS_MS
                    .get(i)
                    .map_or("+Inf".to_string(), |ms| format!("{}", *ms as f64 / 1000.0));
                let _ = writeln!(
                    out,
                    "fleet_proxy_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "fleet_proxy_request_duration_seconds_sum{{{l}}} {sum}");
            let _ = writeln!(
                out,
                "fleet_proxy_request_duration_seconds_count{{{l}}} {cumulative}"
            );
        }
        let g = &self.global;
        for (name, help, v) in [
            (
                "connections_accepted_total",
                "Client connections accepted.",
                &g.connections_accepted,
            ),
            (
                "connections_rejected_total",
                "Client connections closed at once: over the limit.",
                &g.connections_rejected,
            ),
            (
                "bad_requests_total",
                "Requests rejected as malformed or ambiguous.",
                &g.bad_requests,
            ),
            (
                "no_route_total",
                "Requests that matched no route (404).",
                &g.no_route,
            ),
            (
                "requests_shed_total",
                "Requests answered 503 at once: max_requests were in flight.",
                &g.requests_shed,
            ),
            (
                "mirror_shed_total",
                "Mirrored requests dropped: queue full.",
                &g.mirror_shed,
            ),
            (
                "mirror_skipped_body_too_large_total",
                "Mirrored requests skipped: body over the cap.",
                &g.mirror_skipped_body_too_large,
            ),
            (
                "mirror_skipped_incomplete_total",
                "Mirrored requests skipped: the request body did not reach its end.",
                &g.mirror_skipped_incomplete,
            ),
            (
                "responses_stalled_total",
                "Response bodies cut: nothing from the backend for upstream.read_timeout.",
                &g.responses_stalled,
            ),
            (
                "responses_unread_total",
                "Responses cut: the client took no byte of them for limits.send_timeout.",
                &g.responses_unread,
            ),
            (
                "table_swaps_total",
                "Route tables put in force.",
                &g.table_swaps,
            ),
            (
                "table_rejected_total",
                "Route tables rejected by validation.",
                &g.table_rejected,
            ),
        ] {
            let name = format!("fleet_proxy_{name}");
            head(&mut out, &name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        for (name, help, v) in [
            (
                "connections_open",
                "Client connections open now.",
                g.connections_open.load(Relaxed),
            ),
            (
                "connections_idle",
                "HTTP/1.1 client connections idle between requests, holding no buffers.",
                g.connections_idle.load(Relaxed),
            ),
            (
                "table_version",
                "Version of the route table in force.",
                table_version,
            ),
        ] {
            let name = format!("fleet_proxy_{name}");
            head(&mut out, &name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

fn labels(route: &str, track: &str, source: Source) -> String {
    format!(
        "route=\"{}\",track=\"{}\",source=\"{}\"",
        escape(route),
        escape(track),
        source.as_str()
    )
}

/// A family's `HELP` and `TYPE` lines.
pub(super) fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
