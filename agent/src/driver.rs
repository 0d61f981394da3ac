//! Workload drivers: what makes a cluster run the versions it is asked for. `process` runs
//! local processes (the embedded default, for laptops, CI and bare metal); `kubernetes`
//! runs a Deployment per version through the Kubernetes API (kube-rs).

pub mod kubernetes;
pub mod process;

use std::collections::BTreeMap;

/// What should run: each version with its number of instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// The service, as the fleet manifest names it.
    pub service: String,
    pub versions: BTreeMap<String, u32>,
    /// Container image for the Kubernetes driver; `{version}` is replaced. Empty if the
    /// manifest gives none.
    pub image: String,
    /// Program and arguments; `{version}` and `{port}` are replaced.
    pub command: Vec<String>,
    /// Path that answers 2xx when an instance is ready.
    pub health_check: String,
    /// For the Kubernetes driver: each instance's CPU and memory requests (memory also its
    /// limit), as Kubernetes quantities; empty: none.
    pub cpu: String,
    pub memory: String,
    /// For the Kubernetes driver: the pods' user, under the restricted Pod Security profile;
    /// 0: as the image says.
    pub run_as_user: u32,
    /// For the Kubernetes driver: each version scaled by a HorizontalPodAutoscaler instead
    /// of held at its count in `versions` (the process driver runs that count).
    pub autoscale: Option<Autoscale>,
    /// Leave running the versions not in `versions` too: set until the agent has programmed
    /// the proxies since it started, as they may still route to those versions (an agent
    /// restarted after its region moved on).
    pub keep_others: bool,
}

/// A HorizontalPodAutoscaler's bounds, and the average CPU use it keeps, in percent of each
/// instance's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    pub cpu_percent: u32,
}

/// What runs: per version, the addresses of its ready instances, once all of them have been
/// ready (the process driver: all of them now; the kubernetes driver: its rollout complete
/// once, its ready pods since).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Running {
    pub ready: BTreeMap<String, Vec<String>>,
    /// Why something is not ready, for people.
    pub detail: String,
    /// The round could not see the workloads (the Kubernetes API did not answer): what is
    /// ready is not known, and `ready` is empty. A step in force is not taken for one whose
    /// workloads stopped being ready.
    pub unseen: bool,
}

#[allow(async_fn_in_trait)] // Used with concrete drivers only, never as a trait object.
pub trait Driver {
    /// Starts moving towards `want`: starts missing instances, stops unwanted ones. Cheap and
    /// idempotent; call it whenever `want` may have changed.
    fn apply(&mut self, want: &Want);

    /// Checks every instance (health, crashes, restarts due) and reports what is ready.
    async fn poll(&mut self) -> Running;

    /// The agent stops: whatever the driver must do before it exits. Workloads go on
    /// serving unless the driver was told otherwise (fail-static: the agent is no part of the
    /// data path).
    async fn shutdown(&mut self);
}
