//! An operator's word: promote, pause, resume, abort.

use chrono::{DateTime, Utc};

use crate::Engine;
use crate::input::Action;
use crate::output::What;
use crate::state::{Phase, RegionStatus, WaveState};

impl Engine {
    /// Why `action` would change nothing now, in words an operator can act on; `None` if it
    /// would change something. The API refuses an action so refused rather than answer as if
    /// it were done. Pure.
    pub fn refusal(&self, action: Action) -> Option<String> {
        let verb = format!("{action:?}").to_lowercase();
        let phase = &self.state.phase;
        match (phase, action) {
            (Phase::Succeeded, _) => Some(format!("the release has succeeded: nothing to {verb}")),
            (Phase::RolledBack { reason }, _) => Some(format!(
                "the release has rolled back ({reason}): nothing to {verb}"
            )),
            (Phase::RollingBack { .. }, Action::Abort) => {
                Some("the release is rolling back already".into())
            }
            (Phase::RollingBack { .. }, _) => {
                Some(format!("the release is rolling back: nothing to {verb}"))
            }
            (Phase::Paused { .. }, Action::Pause) => Some("the release is paused already".into()),
            (Phase::Paused { .. }, Action::Promote) => {
                Some("the release is paused: resume it first".into())
            }
            (Phase::Progressing, Action::Resume) => Some("the release is not paused".into()),
            (Phase::Progressing, Action::Promote) => self.nothing_to_promote(),
            _ => None,
        }
    }

    /// The gate a promote passes now, named as a promote meant for it gives it (`--gate`):
    /// `approval:WAVE` or `bake:WAVE`, or `step:REGION=N,…` (step N, counted from 1, of each
    /// region at a step in force). Each names one gate of the release, passed once: a promote
    /// that gives the gate it saw passes that one or nothing, however often it is made.
    /// `None` when a promote would pass nothing. Pure.
    pub fn gate(&self) -> Option<String> {
        if self.state.phase != Phase::Progressing {
            return None;
        }
        let wave = self.manifest.waves.get(self.state.wave);
        let wave = wave.map_or("", |w| w.name.as_str());
        match &self.state.wave_state {
            WaveState::Waiting { .. } if self.awaits_approval() => Some(format!("approval:{wave}")),
            WaveState::Waiting { .. } => None,
            WaveState::Baking { .. } => Some(format!("bake:{wave}")),
            WaveState::Running => {
                let at: Vec<String> = (self.promotable())
                    .map(|name| format!("{name}={}", self.state.regions[name].step + 1))
                    .collect();
                (!at.is_empty()).then(|| format!("step:{}", at.join(",")))
            }
        }
    }

    /// Why a promote meant for `gate` (a name as [`gate_name`] gives it) is refused: the
    /// release waits at another gate (it passed that one already, say), or at none; `None`
    /// if it waits at `gate`. Pure.
    pub fn gate_refusal(&self, gate: &str) -> Option<String> {
        match self.gate() {
            Some(now) if now == gate => None,
            Some(now) => Some(format!(
                "the release waits at gate {now}, not at {gate} (passed already, or not \
                 reached yet): give --gate {now} to pass that one"
            )),
            None => {
                let why = self.refusal(Action::Promote);
                let why = why.unwrap_or_else(|| "no gate to pass".into());
                Some(format!(
                    "the release waits at no gate now, not at {gate}: {why}"
                ))
            }
        }
    }

    /// Why a promote would pass no gate now, if it would not.
    fn nothing_to_promote(&self) -> Option<String> {
        match &self.state.wave_state {
            WaveState::Waiting { .. } if self.awaits_approval() => return None,
            WaveState::Waiting { .. } => {
                let wave = self.manifest.waves.get(self.state.wave);
                let name = wave.map_or("", |w| w.name.as_str());
                return Some(format!(
                    "wave {name} waits for its window or its pre-rollout hook, which a promote does not pass (an emergency release ignores windows)"
                ));
            }
            WaveState::Baking { .. } => return None,
            WaveState::Running => {}
        }
        if self.promotable().next().is_some() {
            return None;
        }
        let entering: Vec<&str> = (self.state.regions.iter())
            .filter(|(name, r)| {
                matches!(r.status, RegionStatus::Entering | RegionStatus::Active)
                    && r.step < self.steps_of(name).len()
                    && !r.promote_requested
            })
            .map(|(name, _)| name.as_str())
            .collect();
        Some(match entering.is_empty() {
            true => "no gate to pass: no wave waits for approval or bakes, and no region waits at a step (one promoted already goes on once its agents are back)".into(),
            false => format!(
                "no gate to pass yet: {} not at a step in force (applied and ready, its webhooks passed); promote once it is (`fleetctl release status` shows where each region is)",
                entering.join(", ")
            ),
        })
    }

    /// The wave waits for an operator's approval.
    fn awaits_approval(&self) -> bool {
        let wave = self.manifest.waves.get(self.state.wave);
        let approved = matches!(
            self.state.wave_state,
            WaveState::Waiting { approved: true, .. }
        );
        wave.is_some_and(|w| w.approval) && !approved
    }

    /// The regions a promote passes the step of: at a step in force (applied and ready), so
    /// that a promote never passes a step before it is in force and seen; not one promoted
    /// already (whose agents are away, say).
    fn promotable(&self) -> impl Iterator<Item = &String> {
        (self.state.regions.iter())
            .filter(|(_, r)| r.promotable())
            .map(|(name, _)| name)
    }

    /// Ends the release for another of its service, started in its place (`by` names it):
    /// rolled back at once. Every region it reached is sent back to the stable version (a
    /// rollback under way has sent it already), and is the new release's from then on: the
    /// agents report on that one, so this one would never hear its own rollback applied.
    pub fn supersede(&mut self, now: DateTime<Utc>, actor: &str, by: &str) {
        if self.state.phase.is_terminal() {
            return;
        }
        if !matches!(self.state.phase, Phase::RollingBack { .. }) {
            self.start_rollback(now, actor, format!("superseded by {by}"));
        }
        for r in self.state.regions.values_mut() {
            if r.status == RegionStatus::RollingBack {
                r.status = RegionStatus::RolledBack;
            }
        }
        let reason = format!(
            "superseded by {by}, which goes on from {} in every region",
            self.state.spec.from_version
        );
        self.state.phase = Phase::RolledBack {
            reason: reason.clone(),
        };
        self.record(now, actor, None, What::RolledBack, reason);
    }

    pub(crate) fn on_operator(
        &mut self,
        now: DateTime<Utc>,
        action: Action,
        actor: &str,
        reason: String,
    ) {
        // An ended release hears no operator: `Engine::handle` drops every event to it.
        match action {
            Action::Promote => self.promote(now, actor, reason),
            Action::Pause if self.state.phase == Phase::Progressing => {
                self.pause(now, actor, reason)
            }
            Action::Resume => {
                if let Phase::Paused { since, .. } = self.state.phase {
                    self.shift_clocks(now - since);
                    let interval = self.analysis().map(|a| crate::delta(a.interval));
                    for r in self.state.regions.values_mut() {
                        if r.status == RegionStatus::Failed {
                            // The operator chose to carry on from a held failure. Unchecked
                            // while held, it is judged on what comes after the resume, not on
                            // the whole hold's numbers at its next check.
                            r.status = RegionStatus::Active;
                            r.failures = 0;
                            r.baseline = r.latest.clone();
                            if let (Some(interval), Some(_)) = (interval, r.next_check) {
                                r.next_check = Some(now + interval);
                            }
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
        let awaits_approval = self.awaits_approval();
        let Some(gate) = self.gate() else {
            return;
        };
        let what = match &mut self.state.wave_state {
            WaveState::Waiting { approved, .. } if awaits_approval => {
                *approved = true;
                "approved the wave".to_string()
            }
            WaveState::Waiting { .. } => return,
            WaveState::Baking { until } => {
                *until = now;
                "ended the bake".to_string()
            }
            _ => {
                let promoted: Vec<String> = self.promotable().cloned().collect();
                if promoted.is_empty() {
                    return;
                }
                for name in &promoted {
                    if let Some(r) = self.state.regions.get_mut(name) {
                        r.promote_requested = true;
                    }
                }
                format!("promoted {}", promoted.join(", "))
            }
        };
        let what = format!("{what} (gate {gate})");
        let reason = if reason.is_empty() {
            what
        } else {
            format!("{what}: {reason}")
        };
        self.record(now, actor, None, What::Promoted { gate }, reason);
    }
}

/// `given` as [`Engine::gate`] names a gate (the regions of a step gate in name order), or
/// why it names none. Pure.
pub fn gate_name(given: &str) -> Result<String, String> {
    let why = || {
        format!(
            "{given:?} is not a gate's name: a gate is approval:WAVE, bake:WAVE or \
             step:REGION=N,… (N counted from 1), as `fleetctl release status` names it"
        )
    };
    let (kind, rest) = given.split_once(':').ok_or_else(why)?;
    let is_name = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    match kind {
        "approval" | "bake" if is_name(rest) => Ok(given.to_string()),
        "step" => {
            let mut at: Vec<(&str, u32)> = Vec::new();
            for part in rest.split(',') {
                let (region, n) = part.split_once('=').ok_or_else(why)?;
                // As the engine writes a number: digits, no sign, no leading zero.
                let digits = n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0');
                let n = (n.parse::<u32>().ok()).filter(|_| digits).ok_or_else(why)?;
                if !is_name(region) || at.iter().any(|(r, _)| *r == region) {
                    return Err(why());
                }
                at.push((region, n));
            }
            at.sort();
            let at: Vec<String> = at.iter().map(|(r, n)| format!("{r}={n}")).collect();
            Ok(format!("step:{}", at.join(",")))
        }
        _ => Err(why()),
    }
}

#[cfg(test)]
mod tests {
    use super::gate_name;

    #[test]
    fn a_gate_is_read_in_the_form_the_engine_names_it() {
        for (given, read) in [
            ("approval:americas", "approval:americas"),
            ("bake:first", "bake:first"),
            ("step:us-west=2", "step:us-west=2"),
            // The regions of a step gate in any order.
            ("step:us-east=1,eu-west=1", "step:eu-west=1,us-east=1"),
        ] {
            assert_eq!(gate_name(given).as_deref(), Ok(read), "{given}");
        }
        for given in [
            "",
            "   ",
            "garbage text",
            "step:us-west=0",
            "step:us-west=x",
            "step:us-west=01",
            "step:us-west=+1",
            "step:us-west",
            "step:",
            "step:us-west=1,us-west=2",
            "STEP:US-WEST=2",
            "bake:",
            "approval:two words",
        ] {
            let why = gate_name(given).unwrap_err();
            assert!(
                why.ends_with(
                    "is not a gate's name: a gate is approval:WAVE, bake:WAVE or step:REGION=N,… \
                     (N counted from 1), as `fleetctl release status` names it"
                ),
                "{given}: {why}"
            );
        }
    }
}
