//! Judging one analysis interval from the change in proxy counters: a [`Verdict`] with the
//! numbers behind it. No verdict without data: below `min_requests` the outcome is `NoData`.

use std::collections::BTreeMap;

use fleet::model::{Analysis, Bound, Gate, Quantile};
use serde::{Deserialize, Serialize};

use crate::input::{Histogram, TrackStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// Too few requests, or a gate without its numbers: no verdict, the step holds.
    NoData,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub outcome: Outcome,
    pub canary: Sample,
    pub stable: Sample,
    pub gates: Vec<GateResult>,
}

/// What one track served during the interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub requests: u64,
    pub errors: u64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Percent of the copies compared whose answers matched the primaries'; `None` when
    /// none was compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_rate: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// The gate as written, e.g. `success_rate >= 99`.
    pub gate: String,
    pub value: Option<f64>,
    /// `None` when the value could not be measured.
    pub passed: Option<bool>,
}

impl Verdict {
    /// One line for people: the outcome and the numbers behind it.
    pub fn summary(&self, min_requests: u64) -> String {
        if self.outcome == Outcome::NoData && self.canary.requests < min_requests {
            return format!(
                "no verdict: {} canary requests, fewer than the {min_requests} needed; holding",
                self.canary.requests
            );
        }
        let gates: Vec<String> = self
            .gates
            .iter()
            .map(|g| {
                let value = g
                    .value
                    .map_or("n/a".to_string(), |v| format!("{}", round3(v)));
                let mark = match g.passed {
                    Some(true) => "ok",
                    Some(false) => "FAILED",
                    None => "no data",
                };
                format!("{} (is {value}: {mark})", g.gate)
            })
            .collect();
        let outcome = match self.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::NoData => "no verdict",
        };
        format!(
            "{outcome}: canary {} requests, {} errors; stable {} requests, {} errors; {}",
            self.canary.requests,
            self.canary.errors,
            self.stable.requests,
            self.stable.errors,
            gates.join(", ")
        )
    }
}

/// The counters accumulated between `base` and `now`; all of `now` if the counting began
/// again in between (the controller restarted, or a counter went down).
pub fn delta(now: &TrackStats, base: &TrackStats) -> TrackStats {
    let restarted = now.counting_since_unix_ms != base.counting_since_unix_ms
        || now.requests < base.requests
        || now.errors < base.errors
        || now.compared < base.compared
        || now.differed < base.differed
        || now.latency.bounds_ms != base.latency.bounds_ms
        || now
            .latency
            .counts
            .iter()
            .zip(&base.latency.counts)
            .any(|(n, b)| n < b);
    if restarted {
        return now.clone();
    }
    TrackStats {
        requests: now.requests - base.requests,
        errors: now.errors - base.errors,
        latency: Histogram {
            bounds_ms: now.latency.bounds_ms.clone(),
            counts: now
                .latency
                .counts
                .iter()
                .zip(base.latency.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(n, b)| n - b)
                .collect(),
        },
        counting_since_unix_ms: now.counting_since_unix_ms,
        compared: now.compared - base.compared,
        differed: now.differed - base.differed,
    }
}

/// Judges one interval of `canary` against `stable` (both deltas). `mirror_match_rate` is
/// judged only while the step is `mirroring` (other steps copy nothing, and it is left out),
/// and on no fewer comparisons than `min_requests`.
pub fn judge(
    analysis: &Analysis,
    canary: &TrackStats,
    stable: &TrackStats,
    external: &BTreeMap<usize, f64>,
    mirroring: bool,
) -> Verdict {
    let compared = analysis.min_requests;
    let (c, s) = (sample(canary, compared), sample(stable, compared));
    let gates: Vec<GateResult> = analysis
        .gates
        .iter()
        .enumerate()
        .filter(|(_, gate)| mirroring || !matches!(gate, Gate::MirrorMatchRate { .. }))
        .map(|(i, gate)| evaluate(gate, &c, stable, &s, external.get(&i).copied()))
        .collect();
    let outcome = if c.requests < analysis.min_requests {
        Outcome::NoData
    } else if gates.iter().any(|g| g.passed == Some(false)) {
        Outcome::Fail
    } else if gates.iter().any(|g| g.passed.is_none()) {
        Outcome::NoData
    } else {
        Outcome::Pass
    };
    Verdict {
        outcome,
        canary: c,
        stable: s,
        gates,
    }
}

fn evaluate(
    gate: &Gate,
    c: &Sample,
    stable: &TrackStats,
    s: &Sample,
    external: Option<f64>,
) -> GateResult {
    let (label, value, min, max) = match gate {
        Gate::SuccessRate { min } => (
            format!("success_rate >= {min}"),
            c.success_rate,
            Some(*min),
            None,
        ),
        Gate::LatencyMs { quantile, max } => {
            let (name, v) = match quantile {
                Quantile::P50 => ("latency_p50_ms", c.p50_ms),
                Quantile::P95 => ("latency_p95_ms", c.p95_ms),
                Quantile::P99 => ("latency_p99_ms", c.p99_ms),
            };
            (format!("{name} <= {max}"), v, None, Some(*max))
        }
        Gate::CanaryVsStableErrorRatio { max } => {
            let ratio = (stable.requests > 0).then(|| {
                // Floor the stable rate at half an error, so a stable track without errors
                // still gives a finite ratio that any canary error exceeds.
                let stable_rate = (stable.errors as f64).max(0.5) / stable.requests as f64;
                rate(c.errors, c.requests) / stable_rate
            });
            (
                format!("canary_vs_stable_error_ratio <= {max}"),
                ratio,
                None,
                Some(*max),
            )
        }
        Gate::MirrorMatchRate { min } => (
            format!("mirror_match_rate >= {min}"),
            c.match_rate,
            Some(*min),
            None,
        ),
        Gate::CanaryVsStableLatencyRatio { max } => {
            let ratio = match (c.p99_ms, s.p99_ms) {
                (Some(cp), Some(sp)) if sp > 0.0 => Some(cp / sp),
                _ => None,
            };
            (
                format!("canary_vs_stable_latency_ratio <= {max}"),
                ratio,
                None,
                Some(*max),
            )
        }
        Gate::Prometheus { query, bound, .. } => match bound {
            Bound::Min(m) => (
                format!("prometheus `{query}` >= {m}"),
                external,
                Some(*m),
                None,
            ),
            Bound::Max(m) => (
                format!("prometheus `{query}` <= {m}"),
                external,
                None,
                Some(*m),
            ),
        },
    };
    let passed = value.map(|v| min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m));
    GateResult {
        gate: label,
        value,
        passed,
    }
}

/// `t` summed up; its match rate only on at least `min_compared` comparisons (and one).
fn sample(t: &TrackStats, min_compared: u64) -> Sample {
    let any = t.requests > 0;
    Sample {
        requests: t.requests,
        errors: t.errors,
        success_rate: any.then(|| 100.0 * (1.0 - rate(t.errors, t.requests))),
        p50_ms: quantile(&t.latency, t.requests, 0.50),
        p95_ms: quantile(&t.latency, t.requests, 0.95),
        p99_ms: quantile(&t.latency, t.requests, 0.99),
        match_rate: (t.compared >= min_compared.max(1))
            .then(|| 100.0 * (1.0 - rate(t.differed.min(t.compared), t.compared))),
    }
}

fn rate(errors: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does; past the last bound, the last bound.
fn quantile(h: &Histogram, total: u64, q: f64) -> Option<f64> {
    if total == 0 || h.bounds_ms.is_empty() {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (bound, count) in h.bounds_ms.iter().zip(&h.counts) {
        if *count as f64 >= rank {
            let width = (*count - lower.1) as f64;
            let into = if width > 0.0 {
                (rank - lower.1 as f64) / width
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * into);
        }
        lower = (*bound, *count);
    }
    h.bounds_ms.last().copied()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn track(requests: u64, errors: u64, fast_share: f64) -> TrackStats {
        let fast = (requests as f64 * fast_share) as u64;
        TrackStats {
            requests,
            errors,
            latency: Histogram {
                bounds_ms: vec![10.0, 100.0, 1000.0],
                counts: vec![fast, requests, requests],
            },
            counting_since_unix_ms: 0,
            compared: 0,
            differed: 0,
        }
    }

    fn analysis(gates: Vec<Gate>) -> Analysis {
        Analysis {
            interval: Duration::from_secs(60),
            min_requests: 100,
            failure_limit: 3,
            gates,
        }
    }

    #[test]
    fn too_few_requests_give_no_verdict_even_when_every_gate_passes() {
        let a = analysis(vec![Gate::SuccessRate { min: 99.0 }]);
        let v = judge(
            &a,
            &track(99, 0, 1.0),
            &track(1000, 0, 1.0),
            &BTreeMap::new(),
            false,
        );
        assert_eq!(v.outcome, Outcome::NoData);
        assert!(
            v.summary(100)
                .contains("99 canary requests, fewer than the 100 needed")
        );
    }

    #[test]
    fn a_canary_failing_five_percent_fails_success_rate_and_error_ratio() {
        let a = analysis(vec![
            Gate::SuccessRate { min: 99.0 },
            Gate::CanaryVsStableErrorRatio { max: 1.5 },
        ]);
        let v = judge(
            &a,
            &track(1000, 50, 1.0),
            &track(1000, 0, 1.0),
            &BTreeMap::new(),
            false,
        );
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(v.gates[0].value, Some(95.0));
        assert_eq!(v.gates[1].value, Some(100.0)); // 5% over a floor of 0.05%
        assert_eq!(v.gates[1].passed, Some(false));
    }

    #[test]
    fn a_healthy_canary_passes() {
        let a = analysis(vec![
            Gate::SuccessRate { min: 99.0 },
            Gate::LatencyMs {
                quantile: Quantile::P99,
                max: 500.0,
            },
            Gate::CanaryVsStableErrorRatio { max: 1.5 },
            Gate::CanaryVsStableLatencyRatio { max: 1.25 },
        ]);
        let v = judge(
            &a,
            &track(500, 0, 0.9),
            &track(5000, 1, 0.9),
            &BTreeMap::new(),
            false,
        );
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.summary(100));
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let h = Histogram {
            bounds_ms: vec![10.0, 20.0],
            counts: vec![50, 100],
        };
        assert_eq!(quantile(&h, 100, 0.5), Some(10.0));
        assert_eq!(quantile(&h, 100, 0.75), Some(15.0));
        assert_eq!(quantile(&h, 200, 0.99), Some(20.0)); // past the last bound
    }

    #[test]
    fn a_counter_that_goes_down_means_the_proxy_restarted() {
        let d = delta(&track(10, 1, 1.0), &track(500, 5, 1.0));
        assert_eq!((d.requests, d.errors), (10, 1));
        let d = delta(&track(600, 7, 1.0), &track(500, 5, 1.0));
        assert_eq!(
            (d.requests, d.errors, d.latency.counts),
            (100, 2, vec![100, 100, 100])
        );
        // Counted from another start (the controller restarted): all of `now`, even where
        // no counter went down.
        let restarted = TrackStats {
            counting_since_unix_ms: 7,
            ..track(600, 7, 1.0)
        };
        let d = delta(&restarted, &track(500, 5, 1.0));
        assert_eq!((d.requests, d.errors), (600, 7));
    }

    #[test]
    fn an_external_gate_without_its_value_gives_no_verdict() {
        let a = analysis(vec![Gate::Prometheus {
            address: "http://p:9090".into(),
            query: "up".into(),
            bound: Bound::Min(1.0),
        }]);
        let v = judge(
            &a,
            &track(500, 0, 1.0),
            &track(500, 0, 1.0),
            &BTreeMap::new(),
            false,
        );
        assert_eq!(v.outcome, Outcome::NoData);
        let v = judge(
            &a,
            &track(500, 0, 1.0),
            &track(500, 0, 1.0),
            &BTreeMap::from([(0, 0.0)]),
            false,
        );
        assert_eq!(v.outcome, Outcome::Fail);
    }

    #[test]
    fn the_mirror_match_rate_is_judged_while_the_step_mirrors_and_only_then() {
        let a = analysis(vec![
            Gate::SuccessRate { min: 99.0 },
            Gate::MirrorMatchRate { min: 99.0 },
        ]);
        let compared = |compared, differed| TrackStats {
            compared,
            differed,
            ..track(1000, 0, 1.0)
        };
        let stable = track(10_000, 0, 1.0);
        let judged = |canary: &TrackStats, mirroring| {
            judge(&a, canary, &stable, &BTreeMap::new(), mirroring)
        };
        // 2% of the copies answered otherwise: fails, though none failed outright.
        let v = judged(&compared(1000, 20), true);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary(100));
        assert_eq!(v.gates[1].value, Some(98.0));
        assert!(
            v.summary(100)
                .contains("mirror_match_rate >= 99 (is 98: FAILED)")
        );
        let v = judged(&compared(1000, 5), true);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.summary(100));
        // Nothing compared (a proxy that does not compare): no verdict, never a pass.
        let v = judged(&compared(0, 0), true);
        assert_eq!(v.outcome, Outcome::NoData);
        // Fewer comparisons than `min_requests` (100): no verdict either, though all differ.
        let v = judged(&compared(99, 99), true);
        assert_eq!(v.outcome, Outcome::NoData, "{}", v.summary(100));
        // A step that does not mirror is judged without it.
        let v = judged(&compared(0, 0), false);
        assert_eq!(v.outcome, Outcome::Pass);
        assert_eq!(v.gates.len(), 1);
    }

    #[test]
    fn comparisons_are_taken_as_differences_between_readings_too() {
        let at = |compared, differed| TrackStats {
            compared,
            differed,
            ..track(600, 7, 1.0)
        };
        let d = delta(&at(300, 4), &at(100, 1));
        assert_eq!((d.compared, d.differed), (200, 3));
        // Fewer than before: the proxies' counts began again.
        let d = delta(&at(50, 1), &at(100, 1));
        assert_eq!((d.compared, d.differed), (50, 1));
    }
}
