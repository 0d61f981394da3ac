//! An operator's word: promote, pause, resume, abort.

use chrono::{DateTime, Utc};

use crate::Engine;
use crate::input::Action;
use crate::output::What;
use crate::state::{Phase, RegionStatus, WaveState};

impl Engine {
    pub(crate) fn on_operator(
        &mut self,
        now: DateTime<Utc>,
        action: Action,
        actor: &str,
        reason: String,
    ) {
        if self.state.phase.is_terminal() {
            return;
        }
        match action {
            Action::Promote => self.promote(now, actor, reason),
            Action::Pause if self.state.phase == Phase::Progressing => {
                self.pause(now, actor, reason)
            }
            Action::Resume => {
                if let Phase::Paused { since, .. } = self.state.phase {
                    self.shift_clocks(now - since);
                    for r in self.state.regions.values_mut() {
                        if r.status == RegionStatus::Failed {
                            // The operator chose to carry on from a held failure.
                            r.status = RegionStatus::Active;
                            r.failures = 0;
                        }
                    }
                    self.state.phase = Phase::Progressing;
                    self.record(now, actor, None, What::Resumed, reason);
                }
            }
            Action::Abort if !matches!(self.state.phase, Phase::RollingBack { .. }) => {
                let reason = if reason.is_empty() {
                    "aborted".to_string()
                } else {
                    reason
                };
                self.start_rollback(now, actor, reason);
            }
            Action::Pause | Action::Abort => {}
        }
    }

    /// Passes the current gate: the wave's approval, its bake, or the current step of every
    /// region in progress.
    fn promote(&mut self, now: DateTime<Utc>, actor: &str, reason: String) {
        if self.state.phase != Phase::Progressing {
            return;
        }
        let what = match &mut self.state.wave_state {
            WaveState::Waiting { approved, .. } if !*approved => {
                *approved = true;
                "approved the wave".to_string()
            }
            WaveState::Baking { until } => {
                *until = now;
                "ended the bake".to_string()
            }
            _ => {
                let mut promoted = Vec::new();
                for (name, r) in &mut self.state.regions {
                    if r.status == RegionStatus::Active {
                        r.promote_requested = true;
                        promoted.push(name.clone());
                    }
                }
                format!("promoted {}", promoted.join(", "))
            }
        };
        let reason = if reason.is_empty() {
            what
        } else {
            format!("{what}: {reason}")
        };
        self.record(now, actor, None, What::Promoted, reason);
    }
}
