//! Checks the analysis section: interval, thresholds, and each gate's range.

use crate::check::Ctx;
use crate::model::{Analysis, Bound, Gate, Quantile};
use crate::wire;

/// Below this many requests per interval, verdicts are noisy; allowed, but warned about.
const MIN_REQUESTS_WARNING: u64 = 100;
const DEFAULT_MIN_REQUESTS: u64 = 100;
const DEFAULT_FAILURE_LIMIT: u32 = 3;

pub(crate) fn check(w: &wire::Analysis, cx: &mut Ctx<'_>) -> Option<Analysis> {
    let interval = cx.positive_duration("analysis.interval", &w.interval);
    let min_requests = w.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
    if min_requests < MIN_REQUESTS_WARNING {
        cx.warning(
            "analysis.min_requests",
            format!("min_requests {min_requests} is below {MIN_REQUESTS_WARNING}: verdicts on so few requests are noise"),
            format!("raise it to {MIN_REQUESTS_WARNING} or more unless the service is very quiet"),
        );
    }
    let failure_limit = w.failure_limit.unwrap_or(DEFAULT_FAILURE_LIMIT);
    if failure_limit == 0 {
        cx.error(
            "analysis.failure_limit",
            "failure_limit must be at least 1",
            "e.g. 3 consecutive failed checks",
        );
    }
    let gates: Vec<Option<Gate>> = w
        .gates
        .iter()
        .enumerate()
        .map(|(i, g)| gate(g, &format!("analysis.gates[{i}]"), cx))
        .collect();
    Some(Analysis {
        interval: interval?,
        min_requests,
        failure_limit: (failure_limit > 0).then_some(failure_limit)?,
        gates: gates.into_iter().collect::<Option<_>>()?,
    })
}

fn gate(w: &wire::Gate, path: &str, cx: &mut Ctx<'_>) -> Option<Gate> {
    let latency = |quantile, max: &wire::Max, key: &str, cx: &mut Ctx<'_>| {
        positive(max.max, &format!("{path}.{key}.max"), "milliseconds", cx)
            .map(|max| Gate::LatencyMs { quantile, max })
    };
    match w {
        wire::Gate::SuccessRate(m) => {
            let at = format!("{path}.success_rate.min");
            percent(m.min, &at, "success rate", cx).map(|min| Gate::SuccessRate { min })
        }
        wire::Gate::MirrorMatchRate(m) => {
            let at = format!("{path}.mirror_match_rate.min");
            percent(m.min, &at, "mirror match rate", cx).map(|min| Gate::MirrorMatchRate { min })
        }
        wire::Gate::LatencyP50Ms(m) => latency(Quantile::P50, m, "latency_p50_ms", cx),
        wire::Gate::LatencyP95Ms(m) => latency(Quantile::P95, m, "latency_p95_ms", cx),
        wire::Gate::LatencyP99Ms(m) => latency(Quantile::P99, m, "latency_p99_ms", cx),
        wire::Gate::CanaryVsStableErrorRatio(m) => positive(
            m.max,
            &format!("{path}.canary_vs_stable_error_ratio.max"),
            "a ratio",
            cx,
        )
        .map(|max| Gate::CanaryVsStableErrorRatio { max }),
        wire::Gate::CanaryVsStableLatencyRatio(m) => positive(
            m.max,
            &format!("{path}.canary_vs_stable_latency_ratio.max"),
            "a ratio",
            cx,
        )
        .map(|max| Gate::CanaryVsStableLatencyRatio { max }),
        wire::Gate::Prometheus(p) => {
            let path = format!("{path}.prometheus");
            let address = cx.url(&format!("{path}.address"), &p.address);
            if p.query.trim().is_empty() {
                cx.error(
                    &format!("{path}.query"),
                    "the query is empty",
                    "write a PromQL query that returns one number",
                );
            }
            let bound = match (p.min, p.max) {
                (Some(min), None) => Some(Bound::Min(min)),
                (None, Some(max)) => Some(Bound::Max(max)),
                _ => {
                    cx.error(
                        &path,
                        "a Prometheus gate needs exactly one of min or max",
                        "e.g. `max: 0.01`",
                    );
                    None
                }
            };
            Some(Gate::Prometheus {
                address: address?,
                query: (!p.query.trim().is_empty()).then(|| p.query.clone())?,
                bound: bound?,
            })
        }
    }
}

fn percent(value: f64, path: &str, what: &str, cx: &mut Ctx<'_>) -> Option<f64> {
    if (0.0..=100.0).contains(&value) {
        return Some(value);
    }
    cx.error(
        path,
        format!("{what} {value} is not a percentage"),
        "give a percent from 0 to 100, e.g. 99.5",
    );
    None
}

fn positive(value: f64, path: &str, unit: &str, cx: &mut Ctx<'_>) -> Option<f64> {
    if value > 0.0 && value.is_finite() {
        return Some(value);
    }
    cx.error(
        path,
        format!("{value} is not above zero"),
        format!("give {unit} above 0"),
    );
    None
}
