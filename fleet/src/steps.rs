//! The steps one region goes through under a strategy, in order: what the planner times and
//! what the rollout engine drives, so that the two cannot disagree.

use std::time::Duration;

use serde::Serialize;

use crate::model::{Pause, Rollout, Strategy, Weight};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A copy of traffic goes to the new version; its answers are dropped.
    Mirror,
    /// Requests matching the A/B rules go to the new version.
    Cohort,
    /// A share of traffic goes to the new version.
    Weight,
    /// Blue-green: the idle colour runs the new version, with no traffic yet.
    Deploy,
    /// Blue-green: all traffic moves to the new colour.
    Switch,
    /// After the last step: all traffic on the new version.
    Promote,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub label: String,
    pub phase: Phase,
    /// Share of the region's traffic on the new version.
    pub weight: Weight,
    /// How long the step holds before it may move on.
    pub hold: Pause,
}

impl Step {
    /// Whether analysis judges this step: it sends some traffic to the new version while the
    /// stable one still serves the rest. Such a step never passes without a passing verdict.
    pub fn is_analysed(&self) -> bool {
        match self.phase {
            Phase::Mirror | Phase::Cohort => true,
            Phase::Weight => self.weight > Weight::ZERO && self.weight < Weight::FULL,
            Phase::Deploy | Phase::Switch | Phase::Promote => false,
        }
    }
}

fn step(label: String, phase: Phase, weight: Weight, hold: Pause) -> Step {
    Step {
        label,
        phase,
        weight,
        hold,
    }
}

fn timed(d: Duration) -> Pause {
    if d.is_zero() {
        Pause::None
    } else {
        Pause::For(d)
    }
}

/// The steps of `strategy`, in order; the last one always puts 100% on the new version.
pub fn of(strategy: &Strategy) -> Vec<Step> {
    let mut out = Vec::new();
    if let Some(m) = &strategy.mirror {
        out.push(step(
            format!("mirror {}", m.share),
            Phase::Mirror,
            Weight::ZERO,
            timed(m.duration),
        ));
    }
    if let Some(ab) = &strategy.ab {
        let label = format!(
            "A/B cohort ({} rule{})",
            ab.matches.len(),
            plural(ab.matches.len())
        );
        out.push(step(label, Phase::Cohort, Weight::ZERO, timed(ab.duration)));
    }
    match &strategy.rollout {
        Rollout::Canary { steps } => {
            for (i, s) in steps.iter().enumerate() {
                let label = format!("step {}/{}", i + 1, steps.len());
                out.push(step(label, Phase::Weight, s.weight, s.pause));
            }
        }
        Rollout::Linear {
            step: inc,
            max,
            interval,
        } => {
            let weights = linear_weights(*inc, *max);
            for (i, w) in weights.iter().enumerate() {
                out.push(step(
                    format!("step {}/{}", i + 1, weights.len()),
                    Phase::Weight,
                    *w,
                    timed(*interval),
                ));
            }
        }
        Rollout::BlueGreen { smoke, standby } => {
            let label = match smoke {
                Some(_) => "deploy idle colour, smoke test",
                None => "deploy idle colour",
            };
            out.push(step(label.into(), Phase::Deploy, Weight::ZERO, Pause::None));
            let label = match standby.is_zero() {
                true => "switch".to_string(),
                false => format!(
                    "switch (old colour on standby {})",
                    humantime::format_duration(*standby)
                ),
            };
            out.push(step(label, Phase::Switch, Weight::FULL, Pause::None));
        }
    }
    if out.last().is_none_or(|s| s.weight < Weight::FULL) {
        out.push(step(
            "promote".into(),
            Phase::Promote,
            Weight::FULL,
            Pause::None,
        ));
    }
    out
}

/// `inc`, `2·inc`, … up to and including `max` (the last one clamped to it).
fn linear_weights(inc: Weight, max: Weight) -> Vec<Weight> {
    let (inc, max) = (inc.basis_points().max(1), max.basis_points());
    let mut out: Vec<Weight> = (1..)
        .map(|k: u32| (k * u32::from(inc)).min(u32::from(max)))
        .take_while(|bp| *bp < u32::from(max))
        .filter_map(|bp| u16::try_from(bp).ok().and_then(Weight::from_basis_points))
        .collect();
    out.extend(Weight::from_basis_points(max));
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(v: &[u16]) -> Vec<Weight> {
        v.iter()
            .filter_map(|b| Weight::from_basis_points(*b))
            .collect()
    }

    #[test]
    fn linear_steps_climb_to_the_maximum_and_clamp_the_last() {
        assert_eq!(
            linear_weights(bp(&[1000])[0], bp(&[5000])[0]),
            bp(&[1000, 2000, 3000, 4000, 5000])
        );
        assert_eq!(
            linear_weights(bp(&[3000])[0], bp(&[10_000])[0]),
            bp(&[3000, 6000, 9000, 10_000])
        );
    }
}
