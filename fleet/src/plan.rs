//! The planner: from a manifest, a release request and a start time to the timeline a release
//! is expected to follow, with the share of global users exposed after every step.
//!
//! Expectations, not promises: manual gates (approvals, indefinite pauses) are assumed to be
//! passed at once and counted in [`Plan::manual_gates`]; analysis is assumed to pass at its
//! first check, so an analysed step lasts at least one analysis interval. Windows
//! and blackouts delay wave starts unless the release is an emergency. A wave's bake is the
//! wait before the next wave, so the last wave has none.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Serialize, Serializer};

use crate::model::{Manifest, Pause, Weight};
use crate::steps;

pub use crate::steps::Phase;

/// What an operator asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseRequest {
    pub version: String,
    /// Why windows and blackouts are overridden; `None` for an ordinary release.
    pub emergency: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub service: String,
    pub version: String,
    pub start: DateTime<Utc>,
    pub emergency: Option<String>,
    pub waves: Vec<WavePlan>,
    /// When the last step of the last wave is expected to finish.
    pub finish: DateTime<Utc>,
    #[serde(rename = "duration_secs", serialize_with = "secs")]
    pub duration: Duration,
    /// Approvals and indefinite pauses, each assumed to be passed at once.
    pub manual_gates: usize,
    /// The share of global users on the new version, in percent, by the time the first
    /// automated gate can stop the release; the whole plan's peak when nothing can.
    pub worst_case_exposure: f64,
    /// When that first stop can happen: `failure_limit` failed checks after the new version
    /// first receives traffic (mirrored, cohort or weighted). `None` without analysis gates.
    pub first_gate_can_stop_at: Option<DateTime<Utc>>,
    /// An A/B cohort (of unknown size, on top of `worst_case_exposure`) is on the new version
    /// by then.
    pub worst_case_includes_cohort: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WavePlan {
    pub name: String,
    pub approval: bool,
    /// When the previous wave's bake ends (the release's start for the first wave).
    pub ready: DateTime<Utc>,
    /// When the wave starts: `ready`, moved into a window and out of blackouts.
    pub start: DateTime<Utc>,
    /// When its last region finishes its last step.
    pub end: DateTime<Utc>,
    #[serde(rename = "bake_secs", serialize_with = "secs")]
    pub bake: Duration,
    pub regions: Vec<RegionPlan>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionPlan {
    pub name: String,
    pub traffic_share: f64,
    pub strategy: &'static str,
    /// Regions of a wave progress in batches of `max_parallel`; 0 is the first batch.
    pub batch: usize,
    pub steps: Vec<StepPlan>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepPlan {
    pub label: String,
    pub phase: Phase,
    /// Share of the region's traffic on the new version, in basis points.
    pub weight: Weight,
    pub start: DateTime<Utc>,
    #[serde(rename = "duration_secs", serialize_with = "secs")]
    pub duration: Duration,
    /// The step holds until an operator promotes it.
    pub waits_for_promote: bool,
    /// Percent of global users on the new version once this step is set, over all regions.
    pub exposure: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("wave \"{wave}\" can start in no window within three years of {after}")]
    NoWindow { wave: String, after: DateTime<Utc> },
}

/// Plans `request` for `manifest` starting at `start`.
pub fn plan(
    manifest: &Manifest,
    request: &ReleaseRequest,
    start: DateTime<Utc>,
) -> Result<Plan, PlanError> {
    let mut waves = Vec::new();
    let mut ready = start;
    let mut manual_gates = 0;
    for (i, wave) in manifest.waves.iter().enumerate() {
        let wave_start = match request.emergency {
            Some(_) => Some(ready),
            None => manifest.schedule.next_start(ready),
        }
        .ok_or_else(|| PlanError::NoWindow {
            wave: wave.name.clone(),
            after: ready,
        })?;
        manual_gates += usize::from(wave.approval);
        let parallel = wave.max_parallel.unwrap_or(wave.regions.len()).max(1);
        let mut regions = Vec::new();
        let mut batch_start = wave_start;
        for (batch, names) in wave.regions.chunks(parallel).enumerate() {
            let mut batch_end = batch_start;
            for region in names.iter().filter_map(|n| manifest.region(n)) {
                let strategy = manifest.strategy_for(wave, region);
                let mut t = batch_start;
                let steps: Vec<StepPlan> = steps::of(strategy)
                    .into_iter()
                    .map(|s| {
                        let duration = expected_hold(manifest, &s);
                        let step = StepPlan {
                            waits_for_promote: s.hold == Pause::Indefinite,
                            label: s.label,
                            phase: s.phase,
                            weight: s.weight,
                            start: t,
                            duration,
                            exposure: 0.0,
                        };
                        t += delta(duration);
                        step
                    })
                    .collect();
                manual_gates += steps.iter().filter(|s| s.waits_for_promote).count();
                batch_end = batch_end.max(t);
                regions.push(RegionPlan {
                    name: region.name.clone(),
                    traffic_share: region.traffic_share,
                    strategy: strategy.rollout.name(),
                    batch,
                    steps,
                });
            }
            batch_start = batch_end;
        }
        let last = i + 1 == manifest.waves.len();
        let bake = if last { Duration::ZERO } else { wave.bake };
        waves.push(WavePlan {
            name: wave.name.clone(),
            approval: wave.approval,
            ready,
            start: wave_start,
            end: batch_start,
            bake,
            regions,
        });
        ready = batch_start + delta(bake);
    }
    fill_exposure(&mut waves);
    let finish = waves.last().map_or(start, |w| w.end);
    let (worst_case_exposure, first_gate_can_stop_at, worst_case_includes_cohort) =
        first_stop(manifest, &waves);
    Ok(Plan {
        service: manifest.service.name.clone(),
        version: request.version.clone(),
        start,
        emergency: request.emergency.clone(),
        waves,
        finish,
        duration: (finish - start).to_std().unwrap_or_default(),
        manual_gates,
        worst_case_exposure,
        first_gate_can_stop_at,
        worst_case_includes_cohort,
    })
}

/// How long a step is expected to hold: its pause, and at least one analysis interval when
/// gates judge it (an indefinite pause is assumed to be promoted at once).
fn expected_hold(manifest: &Manifest, step: &steps::Step) -> Duration {
    let pause = match step.hold {
        Pause::For(d) => d,
        Pause::None | Pause::Indefinite => Duration::ZERO,
    };
    let analysis = manifest.analysis.as_ref().filter(|a| !a.gates.is_empty());
    match analysis {
        Some(a) if step.is_analysed() && step.hold != Pause::Indefinite => pause.max(a.interval),
        _ => pause,
    }
}

/// Walks every step in time order (ties in plan order) keeping each region's current weight,
/// and records the global exposure after each.
fn fill_exposure(waves: &mut [WavePlan]) {
    let mut order: Vec<(DateTime<Utc>, usize, usize, usize, usize)> = Vec::new();
    for (w, wave) in waves.iter().enumerate() {
        for (r, region) in wave.regions.iter().enumerate() {
            for (s, step) in region.steps.iter().enumerate() {
                order.push((step.start, order.len(), w, r, s));
            }
        }
    }
    order.sort();
    let mut current: Vec<Vec<f64>> = waves.iter().map(|w| vec![0.0; w.regions.len()]).collect();
    let mut total = 0.0;
    for (_, _, w, r, s) in order {
        let region = &mut waves[w].regions[r];
        let now = region.traffic_share * region.steps[s].weight.percent() / 100.0;
        total += now - current[w][r];
        current[w][r] = now;
        region.steps[s].exposure = round4(total);
    }
}

/// The exposure by the time the first automated gate can stop the release, that time, and
/// whether an A/B cohort is exposed by then.
fn first_stop(manifest: &Manifest, waves: &[WavePlan]) -> (f64, Option<DateTime<Utc>>, bool) {
    let steps = || waves.iter().flat_map(|w| &w.regions).flat_map(|r| &r.steps);
    let peak = steps().map(|s| s.exposure).fold(0.0, f64::max);
    let any_cohort = steps().any(|s| s.phase == Phase::Cohort);
    let analysis = manifest.analysis.as_ref().filter(|a| !a.gates.is_empty());
    let first_traffic = steps()
        .filter(|s| s.weight > Weight::ZERO || matches!(s.phase, Phase::Mirror | Phase::Cohort))
        .map(|s| s.start)
        .min();
    let (Some(analysis), Some(first)) = (analysis, first_traffic) else {
        return (peak, None, any_cohort);
    };
    let stop = first + delta(analysis.interval * analysis.failure_limit);
    let reached = || steps().filter(|s| s.start <= stop);
    let exposure = reached().map(|s| s.exposure).fold(0.0, f64::max);
    let cohort = reached().any(|s| s.phase == Phase::Cohort);
    (exposure, Some(stop), cohort)
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}
