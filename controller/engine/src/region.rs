//! Region-level transitions: guarding a step with its webhooks, applying it, judging it every
//! interval, moving on, promoting, and failing under the manifest's failure policy.

use chrono::{DateTime, Utc};
use fleet::model::{Analysis, FailurePolicy, HookEvent, Pause, Rollout};
use fleet::steps::{Phase as StepPhase, Step};

use crate::analysis::{self, Outcome};
use crate::output::{Command, What};
use crate::state::{Phase, RegionStatus, WaveState};
use crate::traffic::Target;
use crate::{ENGINE, Engine, delta};

impl Engine {
    /// Starts moving `region` to `step` (the number of steps means the final promotion).
    pub(crate) fn enter_step(&mut self, now: DateTime<Utc>, region: &str, step: usize) {
        let mut away = false;
        if let Some(r) = self.state.regions.get_mut(region) {
            // Reached while its agents are away: said now, as its history said them gone
            // when the release had not reached it.
            away = r.status == RegionStatus::Pending && !r.reachable;
            r.status = RegionStatus::Entering;
            r.step = step;
            r.hooks_passed = 0;
            r.awaiting_hook = None;
            r.promote_requested = false;
        }
        if away {
            let reason = "reached while its agent is unreachable: the region holds at its first \
                          step until its agents are back"
                .to_string();
            self.record(now, ENGINE, Some(region), What::RegionHolding, reason);
        }
        self.try_enter(now, region);
    }

    /// Calls the step's next guarding webhook, or, once all passed, sends its desired state.
    fn try_enter(&mut self, now: DateTime<Utc>, region: &str) -> bool {
        let Some(r) = self.state.regions.get(region) else {
            return false;
        };
        if r.awaiting_hook.is_some() {
            return false;
        }
        let (step, passed) = (r.step, r.hooks_passed);
        if let Some((on, url, timeout)) = self.entry_hooks(region, step).into_iter().nth(passed) {
            let id = self.call_hook(now, on, url, timeout, Some(region), true);
            if let Some(r) = self.state.regions.get_mut(region) {
                r.awaiting_hook = Some(id);
            }
            return true;
        }
        let steps = self.steps_of(region);
        let (target, status) = match steps.get(step) {
            Some(s) => {
                let what = What::StepStarted {
                    step,
                    label: s.label.clone(),
                    weight: s.weight,
                };
                let reason = match s.phase {
                    StepPhase::Mirror => {
                        format!(
                            "{}: requests copied to the new version, no user on it",
                            s.label
                        )
                    }
                    _ => format!("{} of traffic to the new version", s.weight),
                };
                self.record(now, ENGINE, Some(region), what, reason);
                (Target::Step(step), RegionStatus::Active)
            }
            None => {
                let reason = format!("{} becomes the stable version", self.state.spec.to_version);
                self.record(now, ENGINE, Some(region), What::RegionPromoted, reason);
                (Target::Promoted, RegionStatus::Promoting)
            }
        };
        let desired = self.desired(region, target);
        if let Some(r) = self.state.regions.get_mut(region) {
            r.status = status;
            r.desired = Some(desired.clone());
            r.heard = false;
            r.waited_ms = 0;
            r.step_started = None;
            r.hold_until = None;
            r.next_check = None;
            r.passed_in_step = false;
            r.last_outcome = None;
            r.failures = 0;
        }
        self.commands.push_back(Command::Desire {
            region: region.to_string(),
            desired,
        });
        true
    }

    /// The webhooks guarding `step` of `region`, in order.
    fn entry_hooks(
        &self,
        region: &str,
        step: usize,
    ) -> Vec<(HookEvent, String, std::time::Duration)> {
        let steps = self.steps_of(region);
        let hooks_for = |on: HookEvent| {
            self.manifest
                .webhooks
                .iter()
                .filter(move |h| h.on == on)
                .map(move |h| (on, h.url.clone(), h.timeout))
        };
        let mut out: Vec<_> = match steps.get(step) {
            Some(_) => hooks_for(HookEvent::Step).collect(),
            None => hooks_for(HookEvent::PromotionConfirm).collect(),
        };
        let smoke = match self.strategy_of(region).map(|s| &s.rollout) {
            Some(Rollout::BlueGreen { smoke: Some(h), .. }) => Some(h.clone()),
            _ => None,
        };
        if let (Some(h), Some(StepPhase::Switch)) = (smoke, steps.get(step).map(|s| s.phase)) {
            // The smoke test runs against the idle colour, before the switch.
            out.insert(0, (HookEvent::Step, h.url, h.timeout));
        }
        out
    }

    /// Moves every region of the current wave on as far as `now` allows.
    pub(crate) fn advance_regions(&mut self, now: DateTime<Utc>) -> bool {
        if self.state.wave_state != WaveState::Running {
            return false;
        }
        let names = self
            .manifest
            .waves
            .get(self.state.wave)
            .map(|w| w.regions.clone())
            .unwrap_or_default();
        let mut changed = false;
        for name in &names {
            changed |= self.advance_region(now, name);
            if self.state.phase != crate::Phase::Progressing {
                return true;
            }
        }
        changed
    }

    fn advance_region(&mut self, now: DateTime<Utc>, name: &str) -> bool {
        if let Some(changed) = self.watch_deadline(now, name) {
            return changed;
        }
        let Some(r) = self.state.regions.get(name) else {
            return false;
        };
        match r.status {
            RegionStatus::Entering => self.try_enter(now, name),
            RegionStatus::Promoting if r.applied() => {
                if let Some(r) = self.state.regions.get_mut(name) {
                    r.status = RegionStatus::Succeeded;
                }
                let reason = format!("100% of traffic on {}", self.state.spec.to_version);
                self.record(now, ENGINE, Some(name), What::RegionSucceeded, reason);
                true
            }
            RegionStatus::Active if r.applied() => self.advance_active(now, name),
            _ => false,
        }
    }

    /// Keeps the clock of a region that waits for its desired state to be applied and ready,
    /// and fails the region once it has waited `progress_deadline`. While it waits, its
    /// step's pause and analysis stand still. The deadline's clock runs only while the
    /// region's agents are connected and have reported since the state was sent (agents that
    /// are lost, or never answer, hold the region; when they are back and have reported on
    /// the state sent anew, the clock starts again) and stops with the release (see
    /// [`Engine::shift_clocks`]). `Some(changed)` ends the region's turn.
    fn watch_deadline(&mut self, now: DateTime<Utc>, name: &str) -> Option<bool> {
        let deadline = self.manifest.progress_deadline;
        let r = self.state.regions.get_mut(name)?;
        if r.applied() {
            // In force: a later wait (its workloads stop being ready) starts from nothing.
            r.waited_ms = 0;
        }
        let waiting = r.in_progress() && r.status != RegionStatus::Entering;
        let waiting = waiting && r.reachable && r.heard && !r.applied();
        match (waiting, r.waiting_since) {
            (false, None) => return None,
            (false, Some(since)) => {
                // Ready again, or no longer heard: the step's pause and analysis resume where
                // they stopped (a lost region's clocks then run, as they always have).
                r.end_wait(now, since);
                return None;
            }
            (true, None) => {
                r.waiting_since = Some(now);
                return Some(true);
            }
            (true, Some(_)) => {}
        };
        if r.deadline(deadline).is_none_or(|due| now < due) {
            return None;
        }
        let (step, why) = (r.step, r.waiting_for().unwrap_or_default());
        let what = match self.step(name, step) {
            Some(step) => step.label,
            None => "the promotion".to_string(),
        };
        let reason = format!(
            "{name} waited {} (progress_deadline) for {what} to be applied and ready; {why}",
            crate::wave::humanize(deadline)
        );
        self.fail_region(now, name, reason);
        Some(true)
    }

    /// A region whose current step is applied: start its clock, judge it, move it on.
    fn advance_active(&mut self, now: DateTime<Utc>, name: &str) -> bool {
        let Some(step) = self.current_step(name) else {
            return false;
        };
        match self.judge_step(now, name, &step) {
            Judged::Ends(changed) => changed,
            Judged::GoesOn(changed) => self.move_on(now, name, &step) || changed,
        }
    }

    /// Checks the regions with traffic on the new version while the release is paused: the
    /// steps stand still, but a failing canary is caught and rolled back (or held) under the
    /// manifest's `on_failure`, as Argo Rollouts goes on with its analysis while paused.
    pub(crate) fn judge_while_paused(&mut self, now: DateTime<Utc>) -> bool {
        let mut changed = false;
        let stopped = self.clocks_stopped(now);
        for name in self.judged_while_paused() {
            if let Some(r) = self.state.regions.get_mut(&name)
                && let Some(since) = r.waiting_since
            {
                // In force again during the pause: its wait ended when the clocks stopped (the
                // resume moves the step's clocks on by the pause, not by this wait again).
                r.end_wait(stopped.max(since), since);
                r.waited_ms = 0;
                changed = true;
            }
            let Some(step) = self.current_step(&name) else {
                continue;
            };
            changed |= match self.judge_step(now, &name, &step) {
                Judged::Ends(changed) | Judged::GoesOn(changed) => changed,
            };
            if !matches!(self.state.phase, Phase::Paused { .. }) {
                return true;
            }
        }
        changed
    }

    /// The regions [`Engine::judge_while_paused`] checks: those of the running wave at a step
    /// in force.
    pub(crate) fn judged_while_paused(&self) -> Vec<String> {
        if self.state.wave_state != WaveState::Running {
            return Vec::new();
        }
        let wave = self.manifest.waves.get(self.state.wave);
        (wave.map(|w| w.regions.iter()).into_iter().flatten())
            .filter(|name| {
                (self.state.regions.get(*name))
                    .is_some_and(|r| r.status == RegionStatus::Active && r.applied())
            })
            .cloned()
            .collect()
    }

    /// Starts the clock of `name`'s step once it is in force, and makes its check if one is
    /// due. While the release is paused a step that comes into force starts its pause from
    /// when the release's clocks stopped, so that a resume starts it anew; its checks start
    /// at once.
    fn judge_step(&mut self, now: DateTime<Utc>, name: &str, step: &Step) -> Judged {
        let analysis = self.analysis();
        let judged = step.is_analysed() && analysis.is_some();
        let clock = self.clocks_stopped(now);
        let Some(r) = self.state.regions.get_mut(name) else {
            return Judged::Ends(false);
        };
        if r.step_started.is_none() {
            r.step_started = Some(clock);
            r.hold_until = match step.hold {
                Pause::For(d) => Some(clock + delta(d)),
                Pause::None | Pause::Indefinite => None,
            };
            r.baseline = r.latest.clone();
            r.next_check = analysis
                .as_ref()
                .filter(|_| judged)
                .map(|a| now + delta(a.interval));
            let (index, weight) = (r.step, step.weight);
            self.record(
                now,
                ENGINE,
                Some(name),
                What::StepApplied {
                    step: index,
                    weight,
                },
                "applied and ready".into(),
            );
            return Judged::Ends(true);
        }
        let (Some(a), Some(due)) = (&analysis, r.next_check) else {
            return Judged::GoesOn(false);
        };
        if now < due {
            return Judged::GoesOn(false);
        }
        // Checks missed (the controller stopped) are not made up one by one.
        let next = due + delta(a.interval);
        r.next_check = Some(if next > now {
            next
        } else {
            now + delta(a.interval)
        });
        // No verdict this interval on numbers that are not fresh: from a region that cannot
        // be reached or whose agents have not reported since (a controller that was down, or
        // stopped), or that came before the interval began.
        let fresh = r.latest_at.is_some_and(|at| now - at <= delta(a.interval));
        if !r.reachable || !r.heard || !fresh {
            // Nor is the next judged across the gap: it takes the first fresh numbers for its
            // baseline, and the one after judges from there.
            r.baseline = None;
            return Judged::Ends(false);
        }
        // Judged against the numbers of when the step began; with none then (the step was
        // applied before the region's first report of them), against these, next time: the
        // counters run since the agents began counting, earlier releases' traffic and all, so
        // they are no measure of this step's.
        let Some(latest) = r.latest.clone() else {
            return Judged::Ends(true);
        };
        let Some(base) = r.baseline.replace(latest.clone()) else {
            return Judged::Ends(true);
        };
        let canary = analysis::delta(&latest.canary, &base.canary);
        let stable = analysis::delta(&latest.stable, &base.stable);
        let mirroring = step.phase == StepPhase::Mirror;
        let verdict = analysis::judge(a, &canary, &stable, &latest.external, mirroring);
        r.last_outcome = Some(verdict.outcome);
        match verdict.outcome {
            Outcome::Pass => {
                r.passed_in_step = true;
                r.failures = 0;
            }
            Outcome::Fail => r.failures += 1,
            Outcome::NoData => {}
        }
        let failures = r.failures;
        let summary = verdict.summary(a.min_requests);
        r.last_verdict = Some(summary.clone());
        self.record(
            now,
            ENGINE,
            Some(name),
            What::Analysis { verdict },
            summary.clone(),
        );
        if failures >= a.failure_limit {
            let reason = format!("{name} failed {failures} checks in a row; last: {summary}");
            self.fail_region(now, name, reason);
            return Judged::Ends(true);
        }
        Judged::GoesOn(true)
    }

    /// Moves `name` on to its next step once its pause has passed and its analysis allows, or
    /// an operator promoted it.
    fn move_on(&mut self, now: DateTime<Utc>, name: &str, step: &Step) -> bool {
        let judged = step.is_analysed() && self.analysis().is_some();
        let Some(r) = self.state.regions.get_mut(name) else {
            return false;
        };
        let paused_enough = match (step.hold, r.hold_until) {
            (Pause::Indefinite, _) => false,
            (_, Some(until)) => now >= until,
            (_, None) => true,
        };
        let mut changed = false;
        if paused_enough && r.hold_until.is_some() {
            // The pause has passed: its timer must not fire again.
            r.hold_until = None;
            changed = true;
        }
        // Moved on only with its agents there to be told, and heard since the controller
        // (re)started.
        if !(r.reachable && r.heard) {
            return changed;
        }
        let judged_enough = !judged || (r.passed_in_step && r.last_outcome == Some(Outcome::Pass));
        if r.promote_requested || (paused_enough && judged_enough) {
            let next = r.step + 1;
            self.enter_step(now, name, next);
            return true;
        }
        changed
    }

    /// The step `name` is entering or at.
    fn current_step(&self, name: &str) -> Option<Step> {
        (self.state.regions.get(name)).and_then(|r| self.step(name, r.step))
    }

    /// The manifest's analysis, if it has gates to judge.
    pub(crate) fn analysis(&self) -> Option<Analysis> {
        (self.manifest.analysis.clone()).filter(|a| !a.gates.is_empty())
    }

    /// When the release's clocks stopped: the start of its pause, or `now`.
    pub(crate) fn clocks_stopped(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match &self.state.phase {
            Phase::Paused { since, .. } => (*since).min(now),
            _ => now,
        }
    }

    /// Applies the manifest's failure policy to a region that failed its analysis.
    pub(crate) fn fail_region(&mut self, now: DateTime<Utc>, name: &str, reason: String) {
        if let Some(r) = self.state.regions.get_mut(name) {
            // A failure ends the wait: resumed from a hold, the region has the whole deadline.
            r.waiting_since = None;
            r.waited_ms = 0;
        }
        self.record(now, ENGINE, Some(name), What::RegionFailed, reason.clone());
        match self.manifest.on_failure {
            FailurePolicy::RollbackAll => self.start_rollback(now, ENGINE, reason),
            FailurePolicy::RollbackRegion => {
                self.roll_back_region(name);
                self.fire_hooks(now, HookEvent::Rollback);
                self.pause(
                    now,
                    ENGINE,
                    format!("{reason}; {name} rolls back, the other regions hold"),
                );
            }
            FailurePolicy::Hold => {
                if let Some(r) = self.state.regions.get_mut(name) {
                    r.status = RegionStatus::Failed;
                }
                self.pause(
                    now,
                    ENGINE,
                    format!("{reason}; holding everything for an operator"),
                );
            }
        }
    }

    pub(crate) fn on_applied(&mut self, region: &str, seq: u64, ready: bool, detail: String) {
        let Some(r) = self.state.regions.get_mut(region) else {
            return;
        };
        // Heard, whatever the seq: an agent working on a desired state reports seq 0 until
        // it is in force, and a region at its second step or later has applied a higher one
        // before. Its words on why it is not ready count as well.
        r.heard = true;
        r.not_ready = (!ready && !detail.is_empty()).then_some(detail);
        if seq >= r.applied_seq {
            r.applied_seq = seq;
            r.ready = ready;
        }
    }

    pub(crate) fn on_reachable(&mut self, now: DateTime<Utc>, region: &str, reachable: bool) {
        // A pause stops the clocks from its start (a resume moves them on by the pause).
        let stopped = self.clocks_stopped(now);
        let Some(r) = self.state.regions.get_mut(region) else {
            return;
        };
        if r.reachable == reachable {
            return;
        }
        r.reachable = reachable;
        r.heard = false;
        // A pass from before the gap moves nothing on: what the new version did while nobody
        // heard its agents was never judged. The step needs a check on numbers that came
        // after they were back (a baseline, then a verdict).
        r.passed_in_step = false;
        if let Some(since) = r.waiting_since.filter(|_| !reachable && r.in_progress()) {
            // Lost while it waited: what it waited counts on once its agents are back.
            let waited = (stopped - since).max(chrono::TimeDelta::zero());
            r.shift_step_clocks(waited);
            r.waited_ms += waited.num_milliseconds();
            r.waiting_since = None;
        }
        let desired = r.desired.clone();
        let said = reachability_said(r.status, reachable);
        if reachable {
            // The agent may have missed changes: give it the whole desired state again.
            if let Some(desired) = desired {
                self.commands.push_back(Command::Desire {
                    region: region.to_string(),
                    desired,
                });
            }
        }
        self.record(now, ENGINE, Some(region), What::RegionHolding, said.into());
    }

    pub(crate) fn on_webhook(&mut self, now: DateTime<Utc>, id: u64, ok: bool, detail: String) {
        let region = self
            .state
            .regions
            .iter()
            .find(|(_, r)| r.awaiting_hook == Some(id))
            .map(|(name, _)| name.clone());
        let release_level = self.state.pre_rollout_awaiting == Some(id);
        if region.is_none() && !release_level {
            return; // A hook nobody waits for (post-rollout, rollback) or one from before a restart.
        }
        let on = match &region {
            Some(name) => self.state.regions.get(name).and_then(|r| {
                let hooks = self.entry_hooks(name, r.step);
                hooks.get(r.hooks_passed).map(|h| h.0)
            }),
            None => Some(HookEvent::PreRollout),
        }
        .unwrap_or(HookEvent::Step);
        match &region {
            Some(name) => {
                if let Some(r) = self.state.regions.get_mut(name) {
                    r.awaiting_hook = None;
                    r.hooks_passed += usize::from(ok);
                }
            }
            None => {
                self.state.pre_rollout_awaiting = None;
                self.state.pre_rollout_passed += usize::from(ok);
            }
        }
        if !ok {
            self.record(
                now,
                ENGINE,
                region.as_deref(),
                What::WebhookFailed { on },
                detail.clone(),
            );
            let reason = format!("a webhook failed ({detail}); resume to call it again, or abort");
            self.pause(now, ENGINE, reason);
        }
    }

    /// Moves the clocks that stood still while the release was paused on by how long it was
    /// paused: steps' pauses, waits for a step to come into force, a wave's bake. Checks went
    /// on through the pause and keep their times and baselines.
    pub(crate) fn shift_clocks(&mut self, paused: chrono::TimeDelta) {
        for r in self.state.regions.values_mut() {
            r.shift_hold(paused);
            r.waiting_since = r.waiting_since.map(|t| t + paused);
        }
        if let WaveState::Baking { until } = &mut self.state.wave_state {
            *until += paused;
        }
    }
}

/// What [`Engine::judge_step`] leaves of a region's turn.
enum Judged {
    /// The turn ends here (its clock started, no fresh numbers, a first baseline, a failure);
    /// whether anything changed.
    Ends(bool),
    /// The step may move on; whether a check was made.
    GoesOn(bool),
}

/// What the history says when a region's agents come back (`reachable`) or go, by where the
/// release is with the region: only a region on its way moves on, or holds.
fn reachability_said(status: RegionStatus, reachable: bool) -> &'static str {
    use RegionStatus::*;
    match (status, reachable) {
        (Pending, true) => "agent is back (the release has not reached this region yet)",
        (Pending, false) => "agent unreachable (the release has not reached this region yet)",
        (Failed, true) => {
            "agent is back; the region stays held after its failure (resume or abort)"
        }
        (Succeeded | RolledBack, true) => "agent is back",
        (Succeeded | RolledBack, false) => "agent unreachable",
        (_, true) => "agent is back; carrying on",
        (_, false) => "agent unreachable; the region holds where it is",
    }
}
