//! The checked manifest. A [`Manifest`] only comes out of [`crate::load`], so every value here
//! has passed validation: names are unique, every region is in exactly one wave, weights are
//! in range and never decrease, durations and time zones parsed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::schedule::{Blackout, Schedule, Window};
pub use crate::wire::{Compare, FailurePolicy, HookEvent};

#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub service: Service,
    pub regions: Vec<Region>,
    pub waves: Vec<Wave>,
    /// The strategy regions use unless their wave or they themselves override it.
    pub strategy: Strategy,
    pub analysis: Option<Analysis>,
    pub schedule: Schedule,
    pub webhooks: Vec<Webhook>,
    pub on_failure: FailurePolicy,
    /// How long a region may wait for a step to be applied and ready before it fails.
    pub progress_deadline: Duration,
}

/// A region that has not applied a step and made it ready by then fails.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

impl Manifest {
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The strategy `region` runs in `wave`: the region's override, else the wave's, else the
    /// manifest's.
    pub fn strategy_for<'a>(&'a self, wave: &'a Wave, region: &'a Region) -> &'a Strategy {
        region
            .strategy
            .as_ref()
            .or(wave.strategy.as_ref())
            .unwrap_or(&self.strategy)
    }

    /// Analysis gates, or none when the manifest has no analysis or an empty gate list.
    pub fn gates(&self) -> &[Gate] {
        self.analysis.as_ref().map_or(&[], |a| &a.gates)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub host: String,
    pub path: String,
    pub health_check: String,
    pub workload: Workload,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub replicas: u32,
    pub resources: Resources,
    /// The Kubernetes pods' user, under the restricted profile; `None`: as the image says.
    pub run_as_user: Option<u32>,
    /// Kubernetes: instances scaled on CPU between bounds instead of a fixed `replicas`
    /// (which is then `min`).
    pub autoscale: Option<Autoscale>,
}

/// A HorizontalPodAutoscaler's bounds and CPU target, per version and cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    pub cpu_percent: u32,
}

/// The CPU use an autoscaler keeps unless the manifest says otherwise.
pub const DEFAULT_CPU_PERCENT: u32 = 70;

pub use crate::wire::Resources;

#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub name: String,
    pub clusters: Vec<Cluster>,
    /// Percent of global traffic.
    pub traffic_share: f64,
    pub strategy: Option<Strategy>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub agent: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Wave {
    pub name: String,
    /// Names of regions in the manifest, each in no other wave.
    pub regions: Vec<String>,
    /// At least 1; `None` is all of the wave's regions at once.
    pub max_parallel: Option<usize>,
    pub bake: Duration,
    pub approval: bool,
    pub strategy: Option<Strategy>,
}

/// A share of traffic in basis points, 0..=10000 (100.00%).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(into = "u16", try_from = "u16")]
pub struct Weight(u16);

impl TryFrom<u16> for Weight {
    type Error = WeightError;

    fn try_from(bp: u16) -> Result<Weight, WeightError> {
        Weight::from_basis_points(bp).ok_or(WeightError::OutOfRange)
    }
}

impl From<Weight> for u16 {
    fn from(w: Weight) -> u16 {
        w.0
    }
}

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(10_000);

    pub fn from_basis_points(bp: u16) -> Option<Weight> {
        (bp <= 10_000).then_some(Weight(bp))
    }

    /// A percentage with at most two decimals, 0 to 100.
    pub fn from_percent(percent: f64) -> Result<Weight, WeightError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(WeightError::OutOfRange);
        }
        let bp = (percent * 100.0).round();
        if (bp - percent * 100.0).abs() > 1e-6 {
            return Err(WeightError::TooPrecise);
        }
        // In 0..=10000 by the range check above, so the cast is exact.
        Ok(Weight(bp as u16))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        match frac {
            0 => write!(f, "{whole}%"),
            f2 if f2 % 10 == 0 => write!(f, "{whole}.{}%", f2 / 10),
            f2 => write!(f, "{whole}.{f2:02}%"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("must be between 0 and 100")]
    OutOfRange,
    #[error("has more than two decimals")]
    TooPrecise,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    pub rollout: Rollout,
    /// Cohort phase, before any weight.
    pub ab: Option<AbPhase>,
    /// Shadow phase, before anything else.
    pub mirror: Option<MirrorPhase>,
    pub sticky: Option<Sticky>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Rollout {
    /// Explicit steps with non-decreasing weights.
    Canary { steps: Vec<Step> },
    /// `step` every `interval` until `max`; `step <= max`.
    Linear {
        step: Weight,
        max: Weight,
        interval: Duration,
    },
    BlueGreen {
        smoke: Option<Hook>,
        standby: Duration,
    },
}

impl Rollout {
    pub fn name(&self) -> &'static str {
        match self {
            Rollout::Canary { .. } => "canary",
            Rollout::Linear { .. } => "linear",
            Rollout::BlueGreen { .. } => "blue-green",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub weight: Weight,
    pub pause: Pause,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// Move on once the weight is set (and analysis allows it).
    None,
    For(Duration),
    /// Wait for an operator's promote.
    Indefinite,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hook {
    pub url: String,
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AbPhase {
    /// A request matching any of these goes to the new version.
    pub matches: Vec<Match>,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Match {
    pub on: MatchOn,
    pub name: String,
    pub test: ValueTest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchOn {
    Header,
    Cookie,
    Query,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueTest {
    Exact(String),
    Prefix(String),
    /// A regex that compiles.
    Regex(String),
    Present(bool),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MirrorPhase {
    pub share: Weight,
    pub duration: Duration,
    /// What of the copies' answers is compared with the primaries', when written.
    pub compare: Option<Compare>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sticky {
    Cookie(String),
    Header(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub interval: Duration,
    pub min_requests: u64,
    /// At least 1.
    pub failure_limit: u32,
    pub gates: Vec<Gate>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Gate {
    /// Percent of non-5xx responses, 0 to 100.
    SuccessRate {
        min: f64,
    },
    LatencyMs {
        quantile: Quantile,
        max: f64,
    },
    CanaryVsStableErrorRatio {
        max: f64,
    },
    CanaryVsStableLatencyRatio {
        max: f64,
    },
    /// Percent of mirrored copies answered as the primary was, 0 to 100; judged only while
    /// the step mirrors.
    MirrorMatchRate {
        min: f64,
    },
    Prometheus {
        address: String,
        query: String,
        bound: Bound,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantile {
    P50,
    P95,
    P99,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    Min(f64),
    Max(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub on: HookEvent,
    pub url: String,
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_accept_two_decimals_and_no_more() {
        assert_eq!(Weight::from_percent(0.01).map(Weight::basis_points), Ok(1));
        assert_eq!(
            Weight::from_percent(12.5).map(Weight::basis_points),
            Ok(1250)
        );
        assert_eq!(Weight::from_percent(100.0), Ok(Weight::FULL));
        assert_eq!(Weight::from_percent(0.005), Err(WeightError::TooPrecise));
        assert_eq!(Weight::from_percent(100.5), Err(WeightError::OutOfRange));
        assert_eq!(Weight::from_percent(-1.0), Err(WeightError::OutOfRange));
    }

    #[test]
    fn weights_print_as_short_percentages() {
        let shown: Vec<String> = [500, 1250, 1, 10_000]
            .into_iter()
            .filter_map(Weight::from_basis_points)
            .map(|w| w.to_string())
            .collect();
        assert_eq!(shown, ["5%", "12.5%", "0.01%", "100%"]);
    }
}
