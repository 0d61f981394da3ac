//! Release- and wave-level transitions: pre-rollout hooks, approvals, windows, starting
//! regions up to `max_parallel`, bakes, success, and rolling back.

use chrono::{DateTime, Utc};
use fleet::model::HookEvent;

use crate::output::{Command, What};
use crate::state::{Phase, RegionStatus, WaveState};
use crate::traffic::Target;
use crate::{ENGINE, Engine, delta};

impl Engine {
    /// Moves the current wave on as far as `now` allows; true if anything changed.
    pub(crate) fn advance_wave(&mut self, now: DateTime<Utc>) -> bool {
        let Some(wave) = self.manifest.waves.get(self.state.wave).cloned() else {
            return false;
        };
        match self.state.wave_state.clone() {
            WaveState::Waiting { approved, .. } => {
                let waiting = What::WaveWaiting {
                    wave: wave.name.clone(),
                };
                if self.state.wave == 0 && !self.pre_rollout_passed(now) {
                    return false;
                }
                if wave.approval && !approved {
                    let note = format!(
                        "wave {} waits for approval (fleetctl release promote)",
                        wave.name
                    );
                    self.note_waiting(now, waiting, note);
                    return false;
                }
                if self.state.spec.emergency.is_none() {
                    let opens = self.manifest.schedule.next_start(now);
                    if opens != Some(now) {
                        self.state.wave_state = WaveState::Waiting {
                            approved,
                            opens_at: opens,
                        };
                        let note = match opens {
                            Some(t) => format!(
                                "wave {} waits for its window, which opens at {t}",
                                wave.name
                            ),
                            None => format!("wave {} has no window left to start in", wave.name),
                        };
                        self.note_waiting(now, waiting, note);
                        return false;
                    }
                }
                self.state.wave_state = WaveState::Running;
                self.state.waiting_note = None;
                let reason = format!("regions {}", wave.regions.join(", "));
                self.record(
                    now,
                    ENGINE,
                    None,
                    What::WaveStarted {
                        wave: wave.name.clone(),
                    },
                    reason,
                );
                true
            }
            WaveState::Running => {
                let in_progress = |e: &Engine| {
                    wave.regions
                        .iter()
                        .filter(|r| e.state.regions.get(*r).is_some_and(|s| s.in_progress()))
                        .count()
                };
                let limit = wave.max_parallel.unwrap_or(wave.regions.len());
                let mut changed = false;
                for name in &wave.regions {
                    let pending = self
                        .state
                        .regions
                        .get(name)
                        .is_some_and(|r| r.status == RegionStatus::Pending);
                    if pending && in_progress(self) < limit {
                        self.enter_step(now, name, 0);
                        changed = true;
                    }
                }
                let finished = wave.regions.iter().all(|r| {
                    self.state.regions.get(r).is_some_and(|s| {
                        matches!(s.status, RegionStatus::Succeeded | RegionStatus::RolledBack)
                    })
                });
                if !finished {
                    return changed;
                }
                let rolled_back: Vec<&str> = (self.state.regions.iter())
                    .filter(|(_, r)| r.status == RegionStatus::RolledBack)
                    .map(|(name, _)| name.as_str())
                    .collect();
                if !rolled_back.is_empty() {
                    // A release is in force everywhere or nowhere: the service has one version.
                    // Going on, or ending as succeeded, would leave regions on the old version
                    // under a release that says the new one is live, and the next release would
                    // start from a version they never ran.
                    let reason = format!(
                        "{} rolled back under on_failure: rollback_region, so {} cannot be live in \
                         every region: rolled back everywhere at the end of wave {} (start a new \
                         release once the cause is fixed)",
                        rolled_back.join(", "),
                        self.state.spec.to_version,
                        wave.name
                    );
                    self.start_rollback(now, ENGINE, reason);
                    return true;
                }
                if self.state.wave + 1 == self.manifest.waves.len() {
                    self.state.phase = Phase::Succeeded;
                    let reason = format!("{} is live in every region", self.state.spec.to_version);
                    self.record(now, ENGINE, None, What::Succeeded, reason);
                    self.fire_hooks(now, HookEvent::PostRollout);
                } else {
                    let until = now + delta(wave.bake);
                    self.state.wave_state = WaveState::Baking { until };
                    let reason = format!("for {}", humanize(wave.bake));
                    self.record(
                        now,
                        ENGINE,
                        None,
                        What::WaveBaking {
                            wave: wave.name.clone(),
                            until,
                        },
                        reason,
                    );
                }
                true
            }
            WaveState::Baking { until } if now >= until => {
                self.state.wave += 1;
                self.state.wave_state = WaveState::Waiting {
                    approved: false,
                    opens_at: None,
                };
                true
            }
            WaveState::Baking { .. } => false,
        }
    }

    /// Calls the pre-rollout hooks one by one; true once all have passed.
    fn pre_rollout_passed(&mut self, now: DateTime<Utc>) -> bool {
        let hooks: Vec<_> = self
            .manifest
            .webhooks
            .iter()
            .filter(|h| h.on == HookEvent::PreRollout)
            .cloned()
            .collect();
        match hooks.get(self.state.pre_rollout_passed) {
            None => true,
            Some(_) if self.state.pre_rollout_awaiting.is_some() => false,
            Some(hook) => {
                let id = self.call_hook(
                    now,
                    HookEvent::PreRollout,
                    hook.url.clone(),
                    hook.timeout,
                    None,
                    true,
                );
                self.state.pre_rollout_awaiting = Some(id);
                false
            }
        }
    }

    /// Rolls every region the release reached back to the stable version.
    pub(crate) fn start_rollback(&mut self, now: DateTime<Utc>, actor: &str, reason: String) {
        self.state.phase = Phase::RollingBack {
            reason: reason.clone(),
        };
        self.record(now, actor, None, What::RollbackStarted, reason);
        let reached: Vec<String> = self
            .state
            .regions
            .iter()
            .filter(|(_, r)| r.reached() && r.status != RegionStatus::RolledBack)
            .map(|(name, _)| name.clone())
            .collect();
        for name in reached {
            self.roll_back_region(&name);
        }
        self.fire_hooks(now, HookEvent::Rollback);
    }

    /// Sends `region` its rollback desired state.
    pub(crate) fn roll_back_region(&mut self, name: &str) {
        let desired = self.desired(name, Target::RolledBack);
        if let Some(r) = self.state.regions.get_mut(name) {
            r.status = RegionStatus::RollingBack;
            r.desired = Some(desired.clone());
            r.awaiting_hook = None;
            r.next_check = None;
            // What the agents said of the step is not said of the rollback.
            r.heard = false;
            r.not_ready = None;
        }
        self.commands.push_back(Command::Desire {
            region: name.to_string(),
            desired,
        });
    }

    /// Marks applied rollbacks; true if anything changed.
    pub(crate) fn finish_rollback(&mut self, now: DateTime<Utc>) -> bool {
        let done: Vec<String> = self
            .state
            .regions
            .iter()
            .filter(|(_, r)| r.status == RegionStatus::RollingBack && r.applied())
            .map(|(name, _)| name.clone())
            .collect();
        for name in &done {
            if let Some(r) = self.state.regions.get_mut(name) {
                r.status = RegionStatus::RolledBack;
            }
            let reason = format!("100% of traffic on {}", self.state.spec.from_version);
            self.record(now, ENGINE, Some(name), What::RegionRolledBack, reason);
        }
        let rolling = self
            .state
            .regions
            .values()
            .any(|r| r.status == RegionStatus::RollingBack);
        if let (false, Phase::RollingBack { reason }) = (rolling, &self.state.phase) {
            let reason = reason.clone();
            self.state.phase = Phase::RolledBack {
                reason: reason.clone(),
            };
            self.record(now, ENGINE, None, What::RolledBack, reason);
            return true;
        }
        !done.is_empty()
    }
}

pub(crate) fn humanize(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}
