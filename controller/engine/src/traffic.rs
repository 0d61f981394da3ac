//! What each step means for a region's workloads and traffic.

use fleet::model::{Compare, Gate, Strategy, Weight};
use fleet::steps::{self, Phase as StepPhase, Step};

use crate::Engine;
use crate::output::{CohortRule, Desired, StickyKey, Traffic};

/// Which versions a desired state runs.
pub(crate) enum Target {
    /// Step `n` of the region's strategy: stable on the old version, canary on the new.
    Step(usize),
    /// After the last step: the new version is the stable one.
    Promoted,
    /// The old version alone.
    RolledBack,
}

impl Engine {
    pub(crate) fn strategy_of(&self, region: &str) -> Option<&Strategy> {
        let wave = self
            .manifest
            .waves
            .iter()
            .find(|w| w.regions.iter().any(|r| r == region))?;
        let region = self.manifest.region(region)?;
        Some(self.manifest.strategy_for(wave, region))
    }

    /// The steps `region` goes through in this release.
    pub fn steps_of(&self, region: &str) -> Vec<Step> {
        self.strategy_of(region).map(steps::of).unwrap_or_default()
    }

    pub(crate) fn step(&self, region: &str, index: usize) -> Option<Step> {
        self.steps_of(region).into_iter().nth(index)
    }

    /// The next desired state for `region`, with a new sequence number.
    pub(crate) fn desired(&mut self, region: &str, target: Target) -> Desired {
        self.state.seq += 1;
        let spec = &self.state.spec;
        let strategy = self.strategy_of(region);
        let sticky = strategy
            .and_then(|s| s.sticky.as_ref())
            .map(StickyKey::from);
        let (stable, canary, traffic) = match target {
            Target::Step(i) => {
                let step = self.step(region, i);
                let phase = step.as_ref().map(|s| s.phase);
                let weighted = matches!(
                    phase,
                    Some(StepPhase::Weight | StepPhase::Switch | StepPhase::Promote)
                );
                let cohort = match (strategy.and_then(|s| s.ab.as_ref()), phase) {
                    (
                        Some(ab),
                        Some(StepPhase::Cohort | StepPhase::Weight | StepPhase::Promote),
                    ) => ab.matches.iter().map(CohortRule::from).collect(),
                    _ => Vec::new(),
                };
                let mirror = match (strategy.and_then(|s| s.mirror.as_ref()), phase) {
                    (Some(m), Some(StepPhase::Mirror)) => Some(m),
                    _ => None,
                };
                // Compared as the manifest says, or by status for its gate: otherwise not, as
                // proxies older than comparisons refuse a table that asks for them.
                let gated = self.manifest.analysis.as_ref().is_some_and(|a| {
                    a.gates
                        .iter()
                        .any(|g| matches!(g, Gate::MirrorMatchRate { .. }))
                });
                let compare = mirror.and_then(|m| m.compare.or(gated.then_some(Compare::Status)));
                let traffic = Traffic {
                    canary_weight: step.filter(|_| weighted).map_or(Weight::ZERO, |s| s.weight),
                    cohort,
                    mirror: mirror.map(|m| m.share),
                    mirror_compare: compare,
                    sticky,
                };
                (
                    spec.from_version.clone(),
                    Some(spec.to_version.clone()),
                    traffic,
                )
            }
            Target::Promoted => (
                spec.to_version.clone(),
                None,
                Traffic {
                    sticky,
                    ..Traffic::default()
                },
            ),
            Target::RolledBack => (
                spec.from_version.clone(),
                None,
                Traffic {
                    sticky,
                    ..Traffic::default()
                },
            ),
        };
        Desired {
            seq: self.state.seq,
            release: spec.id.clone(),
            stable,
            canary,
            replicas: self.manifest.service.workload.replicas,
            traffic,
        }
    }
}
