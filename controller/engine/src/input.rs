//! What the engine is told: agent reports, proxy counters, operator commands, webhook results.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A region's agents have applied desired state `seq` and its workloads are `ready`;
    /// if not, `detail` says why, in the agents' words.
    Applied {
        region: String,
        seq: u64,
        ready: bool,
        #[serde(default)]
        detail: String,
    },
    /// A region's agent connected (`true`) or was lost (`false`).
    Reachable { region: String, reachable: bool },
    /// The latest cumulative proxy counters of a region.
    Stats { region: String, stats: RegionStats },
    /// An operator's word.
    Operator {
        action: Action,
        actor: String,
        reason: String,
    },
    /// The outcome of a webhook the engine asked for.
    WebhookDone { id: u64, ok: bool, detail: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Pass the current gate: the approval the release waits on, its bake, or the current step
    /// of every region at a step in force (skipping what is left of its pause and analysis).
    Promote,
    Pause,
    Resume,
    /// Roll every region the release reached back to the stable version.
    Abort,
}

/// Cumulative counters, per track, since `counting_since_unix_ms`. Counters of another start,
/// or a counter that goes down, mean the counting began again; the engine then measures from
/// zero.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RegionStats {
    pub stable: TrackStats,
    pub canary: TrackStats,
    /// Results of the manifest's external (Prometheus) gates, by gate index.
    #[serde(default)]
    pub external: BTreeMap<usize, f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackStats {
    pub requests: u64,
    /// Requests answered 5xx or not at all.
    pub errors: u64,
    pub latency: Histogram,
    /// When these counters began (the controller's start, in ms since the Unix epoch).
    #[serde(default)]
    pub counting_since_unix_ms: u64,
    /// Mirrored copies whose answer the proxies compared with the primary's, and those that
    /// differed.
    #[serde(default)]
    pub compared: u64,
    #[serde(default)]
    pub differed: u64,
}

/// A cumulative latency histogram: `counts[i]` requests took at most `bounds_ms[i]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds_ms: Vec<f64>,
    pub counts: Vec<u64>,
}
