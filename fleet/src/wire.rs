//! The manifest as written: plain serde types, the single source of truth for the syntax.
//!
//! The JSON Schema (`fleetctl schema`) is derived from these types and the structural checker
//! walks documents against that same schema, so the documented syntax, the editor schema and
//! what the loader accepts cannot drift apart. Values are checked and turned into domain types
//! in `check`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A fleet manifest: one service, the regions it runs in, and how a release moves through them.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Fleet manifest")]
pub struct Manifest {
    /// Always `fleet/v1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub service: Service,
    /// Every region the service runs in, each with its clusters and its share of global traffic.
    pub regions: Vec<Region>,
    /// The order in which a release reaches regions; every region is in exactly one wave.
    pub waves: Vec<Wave>,
    /// How a release moves traffic in each region; waves and regions may override it.
    pub strategy: Strategy,
    /// How a step is judged from live traffic. Without it, steps advance on time alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// Waves start only inside one of these windows. None: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// Dates on which no wave starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blackouts: Vec<Blackout>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
    /// What a failed region does to the rest of the release. Default: `rollback_all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<FailurePolicy>,
    /// How long a region may take to apply a step and have its workloads ready (and, once
    /// ready, to be ready again after they stop being so) before it counts as failed under
    /// `on_failure`. Default: `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// A DNS label: lowercase letters, digits and `-`.
    pub name: String,
    /// The host the regional proxy serves: exact, `*.suffix`, or `*`. Default: `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path prefix the regional proxy serves. Default: `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path that answers 2xx when an instance is ready. Default: `/healthz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    pub workload: Workload,
}

/// What each track runs: an image for Kubernetes, a command for local processes, or both.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Container image; `{version}` is replaced by the release's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Program and arguments for the process driver; `{version}` and `{port}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Instances per track and cluster. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// What each instance needs, for the Kubernetes driver: the pods' requests (memory is
    /// also their limit). The process driver ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// For the Kubernetes driver: the user (uid) the pods run as, under the restricted Pod
    /// Security profile (not root, no privilege escalation, no capabilities, the runtime's
    /// seccomp profile). Default: as the image says, with no security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    /// For the Kubernetes driver: instead of a fixed `replicas`, each version's instances
    /// are scaled by a HorizontalPodAutoscaler on CPU, between `min` and `max`. Needs
    /// `resources.cpu`; the process driver runs `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest instances per version and cluster (at least 1).
    pub min: u32,
    /// Most instances per version and cluster.
    pub max: u32,
    /// The average CPU use to keep, in percent of `resources.cpu`. Default: 70.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
}

/// An instance's CPU and memory, as Kubernetes quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU: cores (`1`, `0.5`) or millicores (`250m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory in bytes, with a suffix (`256Mi`, `1Gi`, `500M`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub clusters: Vec<Cluster>,
    /// Percent of global traffic this region serves (0-100), for exposure estimates.
    pub traffic_share: f64,
    /// Replaces the strategy for this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// The identity the cluster's fleet-agent presents. Default: the cluster's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    pub regions: Vec<String>,
    /// How many of the wave's regions progress at once. Default: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel: Option<u32>,
    /// How long to watch after the wave's last step before the next wave starts, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<String>,
    /// `required`: an operator approves before the wave starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Replaces the strategy for this wave's regions (a region's own override wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    Required,
    None,
}

/// Exactly one of `canary`, `linear` or `blue_green`, optionally preceded by a `mirror` phase
/// and an `ab` cohort phase.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear: Option<Linear>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreen>,
    /// Before any weight: send a matched cohort (A/B) to the new version for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<Ab>,
    /// Before any user sees the new version: copy a share of traffic to it, responses dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Keeps each user on one side across steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Percent of the region's traffic on the new version, 0-100, in steps of 0.01.
    pub weight: f64,
    /// How long to hold this step: a duration (`10m`), or `indefinite` (or `{}`) to wait for
    /// `fleetctl release promote`. None: move on as soon as the weight is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Pause {
    /// A duration such as `5m`, or `indefinite`.
    Text(String),
    /// `{}`: indefinite.
    Indefinite(Empty),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Flagger-style: add `step_weight` every `interval` up to `max_weight`, then promote.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    pub step_weight: f64,
    /// Default: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<f64>,
    pub interval: String,
}

/// Deploy the idle colour, smoke-test it, switch all traffic at once, keep the old colour ready.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlueGreen {
    /// Called before the switch; a non-2xx answer or a timeout halts the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<Hook>,
    /// How long the old colour stays running after the switch, for an instant rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub url: String,
    /// Default: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ab {
    /// Requests matching any of these go to the new version.
    #[serde(rename = "match")]
    pub matches: Vec<Match>,
    /// How long the cohort phase lasts before the weighted ramp, e.g. `30m`.
    pub duration: String,
}

/// Exactly one of `header`, `cookie` or `query`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<ValueMatch>,
}

/// A name and exactly one of `exact`, `prefix`, `regex` or `present`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Percent of requests copied to the new version (0-100].
    pub percent: f64,
    /// How long the mirror phase lasts, e.g. `10m`.
    pub duration: String,
    /// What of each copy's answer is compared with the answer users got (for the
    /// `mirror_match_rate` gate): `status` (and a gRPC call's `grpc-status`) or `body` (also
    /// the body's bytes). Default: `status` with that gate, otherwise nothing compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Compare>,
}

/// What of a mirrored copy's answer is compared with its primary's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The status, and a gRPC call's `grpc-status`.
    Status,
    /// The status and the body's bytes.
    Body,
}

/// Exactly one of `cookie` or `header`: the value that keeps a user on one side.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// How often a step is judged, e.g. `1m`.
    pub interval: String,
    /// Below this many requests in an interval there is no verdict and the step holds.
    /// Default: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Consecutive failed checks that fail the region. Default: 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_limit: Option<u32>,
    #[serde(default)]
    pub gates: Vec<Gate>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Gate {
    /// Percent of non-5xx responses from the new version.
    SuccessRate(Min),
    LatencyP50Ms(Max),
    LatencyP95Ms(Max),
    LatencyP99Ms(Max),
    /// The new version's error rate divided by the stable one's.
    CanaryVsStableErrorRatio(Max),
    /// The new version's p99 latency divided by the stable one's.
    CanaryVsStableLatencyRatio(Max),
    /// Percent of the copies mirrored to the new version answered as the stable one
    /// answered the same requests; judged in the mirror phase only.
    MirrorMatchRate(Min),
    /// An external Prometheus query whose scalar result is compared with `min` or `max`.
    Prometheus(PrometheusGate),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Min {
    pub min: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Max {
    pub max: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrometheusGate {
    /// Base URL of the Prometheus server, e.g. `http://prometheus:9090`.
    pub address: String,
    pub query: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// A weekly window, in a time zone: waves start only inside one.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// The days on which the window opens.
    pub days: Vec<Day>,
    /// Local opening time, `HH:MM`.
    pub from: String,
    /// Local closing time, `HH:MM`; earlier than `from` means the next day.
    pub to: String,
    /// An IANA time zone such as `Europe/Berlin`.
    pub tz: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Dates on which no wave starts, from `from` to `to` inclusive.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Blackout {
    /// First date, `YYYY-MM-DD`.
    pub from: String,
    /// Last date, inclusive. Default: `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Default: `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub on: HookEvent,
    pub url: String,
    /// Default: 10s. A timeout halts the release like a non-2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HookEvent {
    PreRollout,
    Step,
    PromotionConfirm,
    PostRollout,
    Rollback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Roll every region the release reached back to stable.
    #[default]
    RollbackAll,
    /// Roll back the failed region; the others hold where they are.
    RollbackRegion,
    /// Hold everything where it is for an operator to decide.
    Hold,
}
