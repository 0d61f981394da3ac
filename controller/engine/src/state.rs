//! The engine's whole state: plain data, serializable, so that the controller can put it on
//! disk before it acts on the commands that came with it, and restore it after a crash.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::analysis::Outcome;
use crate::input::RegionStats;
use crate::output::Desired;

/// What was asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub id: String,
    pub service: String,
    /// The version serving today, to roll back to.
    pub from_version: String,
    pub to_version: String,
    /// Why windows and blackouts are overridden, for an emergency release.
    pub emergency: Option<String>,
    /// Who started it.
    pub actor: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub spec: ReleaseSpec,
    pub phase: Phase,
    /// Index of the current wave.
    pub wave: usize,
    pub wave_state: WaveState,
    pub regions: BTreeMap<String, RegionState>,
    /// The last sequence number given to a desired state; each new one is larger.
    pub seq: u64,
    /// The last webhook call id.
    pub hook_id: u64,
    /// Pre-rollout hooks passed, and the one awaited.
    pub pre_rollout_passed: usize,
    pub pre_rollout_awaiting: Option<u64>,
    /// The last waiting reason recorded, so that a wait is recorded once.
    pub waiting_note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    /// Held for an operator: by a pause, a failed webhook, or a failure policy that holds.
    Paused {
        by: String,
        reason: String,
        since: DateTime<Utc>,
    },
    RollingBack {
        reason: String,
    },
    Succeeded,
    RolledBack {
        reason: String,
    },
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WaveState {
    /// Before the wave starts: its approval, a window.
    Waiting {
        approved: bool,
        opens_at: Option<DateTime<Utc>>,
    },
    Running,
    Baking {
        until: DateTime<Utc>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionStatus {
    Pending,
    /// Waiting for the webhooks that guard `step`.
    Entering,
    /// At `step`, once its desired state is applied.
    Active,
    /// All traffic moving to the new version as the stable one.
    Promoting,
    Succeeded,
    /// Failed its analysis and held there (failure policy `hold`).
    Failed,
    RollingBack,
    RolledBack,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionState {
    pub status: RegionStatus,
    /// The step the region is entering or at; the number of steps means the final promotion.
    pub step: usize,
    pub hooks_passed: usize,
    pub awaiting_hook: Option<u64>,
    /// The desired state last sent.
    pub desired: Option<Desired>,
    pub applied_seq: u64,
    pub ready: bool,
    pub reachable: bool,
    /// When the current step's desired state was applied.
    pub step_started: Option<DateTime<Utc>>,
    /// Until when the current step's timed pause holds; cleared once it has passed.
    pub hold_until: Option<DateTime<Utc>>,
    pub next_check: Option<DateTime<Utc>>,
    pub failures: u32,
    pub last_outcome: Option<Outcome>,
    /// The last verdict in words, with its numbers.
    pub last_verdict: Option<String>,
    pub passed_in_step: bool,
    pub promote_requested: bool,
    pub baseline: Option<RegionStats>,
    pub latest: Option<RegionStats>,
    /// When `latest` came: a verdict rests only on numbers that came within its interval.
    #[serde(default)]
    pub latest_at: Option<DateTime<Utc>>,
    /// Since when the region has been waiting for its desired state to be applied and ready:
    /// from when its agents first reported after it was sent, or when ready workloads stopped
    /// being ready. The manifest's `progress_deadline` counts from here.
    #[serde(default)]
    pub waiting_since: Option<DateTime<Utc>>,
    /// How long, in ms, the region waited for its desired state before `waiting_since`, in
    /// waits its agents cut short by being lost or not heard: it counts towards the deadline
    /// once they are back, so that agents that come and go (a crash loop, a flapping link)
    /// do not hold a step that never comes up for ever. Nothing once the state is in force,
    /// or sent anew.
    #[serde(default)]
    pub waited_ms: i64,
    /// The region's agents have reported since its desired state was last sent, since they
    /// were last found or lost, and since the controller started.
    #[serde(default)]
    pub heard: bool,
    /// Why the agents say the region is not ready, in their words.
    #[serde(default)]
    pub not_ready: Option<String>,
}

impl RegionState {
    pub(crate) fn new() -> Self {
        RegionState {
            status: RegionStatus::Pending,
            step: 0,
            hooks_passed: 0,
            awaiting_hook: None,
            desired: None,
            applied_seq: 0,
            ready: false,
            reachable: true,
            step_started: None,
            hold_until: None,
            next_check: None,
            failures: 0,
            last_outcome: None,
            last_verdict: None,
            passed_in_step: false,
            promote_requested: false,
            baseline: None,
            latest: None,
            latest_at: None,
            waiting_since: None,
            waited_ms: 0,
            heard: false,
            not_ready: None,
        }
    }

    /// The desired state last sent has been applied and its workloads are ready.
    pub fn applied(&self) -> bool {
        self.ready && self.seq_applied()
    }

    /// The agents have applied the desired state last sent, ready or not.
    fn seq_applied(&self) -> bool {
        (self.desired.as_ref()).is_some_and(|d| self.applied_seq >= d.seq)
    }

    /// At a step in force (applied and ready), not promoted yet: a promote passes its step.
    pub fn promotable(&self) -> bool {
        self.status == RegionStatus::Active && self.applied() && !self.promote_requested
    }

    /// The release has changed this region at some point.
    pub fn reached(&self) -> bool {
        self.status != RegionStatus::Pending
    }

    /// Moves the current step's clocks on by `stopped`, and has its analysis judge only what
    /// comes after.
    pub(crate) fn shift_step_clocks(&mut self, stopped: chrono::TimeDelta) {
        self.shift_hold(stopped);
        self.next_check = self.next_check.map(|t| t + stopped);
        self.baseline = self.latest.clone().or(self.baseline.take());
    }

    /// Ends a wait for the step to come into force that began at `since` and ended at `at`:
    /// the step's clocks move on by it.
    pub(crate) fn end_wait(&mut self, at: DateTime<Utc>, since: DateTime<Utc>) {
        self.shift_step_clocks(at - since);
        self.waiting_since = None;
    }

    /// Moves the current step's start and the end of its timed pause on by `stopped`.
    pub(crate) fn shift_hold(&mut self, stopped: chrono::TimeDelta) {
        self.step_started = self.step_started.map(|t| t + stopped);
        self.hold_until = self.hold_until.map(|t| t + stopped);
    }

    /// While the region waits for its desired state to be applied and ready (a step, or a
    /// rollback, which has no deadline, once its agents have reported on it): why, in words.
    pub fn waiting_for(&self) -> Option<String> {
        if self.status == RegionStatus::RollingBack && !(self.reachable && self.heard) {
            let why = match self.reachable {
                false => "not every cluster's agent is connected",
                true => "its agents have not reported on it yet",
            };
            return Some(format!(
                "{why}: it is put in force as they come (`fleetctl agents` shows which are connected)"
            ));
        }
        let rolling_back = self.status == RegionStatus::RollingBack
            && self.reachable
            && self.heard
            && !self.applied();
        if !rolling_back {
            self.waiting()?;
        }
        Some(match (&self.not_ready, self.seq_applied()) {
            (Some(detail), _) => format!("the agents say: {detail}"),
            (None, true) => "applied, but its workloads are not ready".to_string(),
            (None, false) => "the agents have not applied it yet".to_string(),
        })
    }

    /// When the region fails for not having applied its desired state, if it is waiting.
    pub fn deadline(&self, progress_deadline: std::time::Duration) -> Option<DateTime<Utc>> {
        let deadline = chrono::TimeDelta::from_std(progress_deadline).ok()?;
        let left = deadline - chrono::TimeDelta::milliseconds(self.waited_ms);
        self.waiting()?.checked_add_signed(left)
    }

    /// Since when the region, moving forward, has waited for its desired state.
    fn waiting(&self) -> Option<DateTime<Utc>> {
        self.waiting_since.filter(|_| self.in_progress())
    }

    /// The region is being moved forward by the release.
    pub fn in_progress(&self) -> bool {
        matches!(
            self.status,
            RegionStatus::Entering | RegionStatus::Active | RegionStatus::Promoting
        )
    }
}
