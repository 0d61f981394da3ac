//! The rollout engine: one release as a deterministic state machine. No I/O, no clock.
//!
//! Sans-IO in the manner of quinn-proto: the caller feeds events with [`Engine::handle`] and
//! timer expiries with [`Engine::handle_timeout`], passing the time each time; it drains
//! [`Engine::poll_command`] and sleeps until [`Engine::poll_timeout`]. The whole state is
//! [`State`], plain serializable data: persist it before acting on the commands, and
//! [`Engine::restore`] it after a crash to carry on from the same step.

pub mod analysis;
pub mod input;
pub mod output;
pub mod state;

mod operator;
mod region;
mod traffic;
mod wave;

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use fleet::Manifest;
use fleet::model::HookEvent;

pub use input::{Action, Event, Histogram, RegionStats, TrackStats};
pub use operator::gate_name;
pub use output::{Command, Desired, HistoryEvent, Traffic, What};
pub use state::{Phase, RegionState, RegionStatus, ReleaseSpec, State, WaveState};

/// The actor name of the engine's own decisions.
pub const ENGINE: &str = "engine";

/// Bounds the work one call may do, so that a bug cannot spin forever.
const MAX_TRANSITIONS_PER_CALL: usize = 10_000;

pub struct Engine {
    manifest: Arc<Manifest>,
    state: State,
    commands: VecDeque<Command>,
}

impl Engine {
    /// Starts releasing `spec` at `now`.
    pub fn start(manifest: Arc<Manifest>, spec: ReleaseSpec, now: DateTime<Utc>) -> Engine {
        let regions = manifest
            .regions
            .iter()
            .map(|r| (r.name.clone(), RegionState::new()))
            .collect();
        let actor = spec.actor.clone();
        let reason = match &spec.emergency {
            Some(why) => format!(
                "{} → {} (emergency: {why})",
                spec.from_version, spec.to_version
            ),
            None => format!("{} → {}", spec.from_version, spec.to_version),
        };
        let mut engine = Engine {
            manifest,
            state: State {
                spec,
                phase: Phase::Progressing,
                wave: 0,
                wave_state: WaveState::Waiting {
                    approved: false,
                    opens_at: None,
                },
                regions,
                seq: 0,
                hook_id: 0,
                pre_rollout_passed: 0,
                pre_rollout_awaiting: None,
                waiting_note: None,
            },
            commands: VecDeque::new(),
        };
        engine.record(now, &actor, None, What::ReleaseStarted, reason);
        engine.advance(now);
        engine
    }

    /// Carries on from a persisted state. No command is pending; call [`Engine::resend`] to
    /// give every region its desired state again (agents apply a sequence number once).
    ///
    /// A region waiting for its step starts its `progress_deadline` again once its agents
    /// report to this controller: while it was down nobody heard them, and a region is never
    /// failed for the controller's own absence, nor for agents that never come back. Every
    /// region is unreachable until its agents connect to this controller (a
    /// [`Event::Reachable`]), and neither judged nor moved on until they report; a step
    /// analysed moves on only after a check passes on numbers they report since (their
    /// coming back forgets the pass from before).
    pub fn restore(manifest: Arc<Manifest>, mut state: State) -> Engine {
        for r in state.regions.values_mut() {
            r.heard = false;
            r.reachable = false;
            r.waited_ms = 0;
        }
        Engine {
            manifest,
            state,
            commands: VecDeque::new(),
        }
    }

    /// Queues the current desired state of every region the release has reached.
    pub fn resend(&mut self) {
        let desired: Vec<Command> = self
            .state
            .regions
            .iter()
            .filter_map(|(name, r)| {
                r.desired.clone().map(|desired| Command::Desire {
                    region: name.clone(),
                    desired,
                })
            })
            .collect();
        self.commands.extend(desired);
    }

    pub fn handle(&mut self, now: DateTime<Utc>, event: Event) {
        // An ended release hears nothing more: a hook's late answer, say, must not take it up
        // again.
        if self.state.phase.is_terminal() {
            return;
        }
        match event {
            Event::Applied {
                region,
                seq,
                ready,
                detail,
            } => self.on_applied(&region, seq, ready, detail),
            Event::Reachable { region, reachable } => self.on_reachable(now, &region, reachable),
            Event::Stats { region, stats } => {
                if let Some(r) = self.state.regions.get_mut(&region) {
                    r.latest = Some(stats);
                    r.latest_at = Some(now);
                }
            }
            Event::Operator {
                action,
                actor,
                reason,
            } => self.on_operator(now, action, &actor, reason),
            Event::WebhookDone { id, ok, detail } => self.on_webhook(now, id, ok, detail),
        }
        self.advance(now);
    }

    pub fn handle_timeout(&mut self, now: DateTime<Utc>) {
        self.advance(now);
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When the engine next needs [`Engine::handle_timeout`], if anything is timed.
    pub fn poll_timeout(&self) -> Option<DateTime<Utc>> {
        match self.state.phase {
            Phase::Progressing => {}
            // The steps stand still; the checks go on.
            Phase::Paused { .. } => {
                let regions = self.judged_while_paused().into_iter();
                return (regions.filter_map(|name| self.state.regions.get(&name)?.next_check))
                    .min();
            }
            _ => return None,
        }
        let wave = match &self.state.wave_state {
            WaveState::Waiting { opens_at, .. } => *opens_at,
            WaveState::Baking { until } => Some(*until),
            WaveState::Running => None,
        };
        let progress_deadline = self.manifest.progress_deadline;
        let regions = self
            .state
            .regions
            .values()
            .filter(|r| r.status == RegionStatus::Active && r.applied())
            .flat_map(|r| [r.hold_until, r.next_check]);
        let deadlines = self.state.regions.values().filter(|r| r.in_progress());
        let deadlines = deadlines.map(|r| r.deadline(progress_deadline));
        regions.chain(deadlines).chain([wave]).flatten().min()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs every transition that `now` allows.
    fn advance(&mut self, now: DateTime<Utc>) {
        for _ in 0..MAX_TRANSITIONS_PER_CALL {
            let changed = match self.state.phase {
                // A region rolled back by the `rollback_region` policy, the release resumed
                // before its rollback was in force, finishes while the others progress.
                Phase::Progressing => {
                    self.finish_rollback(now) || self.advance_wave(now) || self.advance_regions(now)
                }
                // A region rolled back by the `rollback_region` policy finishes while paused;
                // the regions with the new version's traffic are checked on.
                Phase::Paused { .. } => self.finish_rollback(now) || self.judge_while_paused(now),
                Phase::RollingBack { .. } => self.finish_rollback(now),
                Phase::Succeeded | Phase::RolledBack { .. } => false,
            };
            if !changed {
                return;
            }
        }
    }

    fn record(
        &mut self,
        at: DateTime<Utc>,
        actor: &str,
        region: Option<&str>,
        what: What,
        reason: String,
    ) {
        self.commands.push_back(Command::Record(HistoryEvent {
            at,
            actor: actor.to_string(),
            region: region.map(str::to_string),
            what,
            reason,
        }));
    }

    /// Records `note` unless it is the wait already recorded.
    fn note_waiting(&mut self, now: DateTime<Utc>, what: What, note: String) {
        if self.state.waiting_note.as_deref() != Some(note.as_str()) {
            self.state.waiting_note = Some(note.clone());
            self.record(now, ENGINE, None, what, note);
        }
    }

    /// Asks for a webhook call and returns its id.
    fn call_hook(
        &mut self,
        now: DateTime<Utc>,
        on: HookEvent,
        url: String,
        timeout: std::time::Duration,
        region: Option<&str>,
        wait: bool,
    ) -> u64 {
        self.state.hook_id += 1;
        let id = self.state.hook_id;
        self.record(now, ENGINE, region, What::WebhookCalled { on }, url.clone());
        self.commands.push_back(Command::CallWebhook {
            id,
            on,
            url,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            region: region.map(str::to_string),
            wait,
        });
        id
    }

    /// Calls every hook for `on` without waiting for the outcome.
    fn fire_hooks(&mut self, now: DateTime<Utc>, on: HookEvent) {
        let hooks: Vec<_> = self
            .manifest
            .webhooks
            .iter()
            .filter(|h| h.on == on)
            .cloned()
            .collect();
        for hook in hooks {
            self.call_hook(now, on, hook.url, hook.timeout, None, false);
        }
    }

    /// Pauses the release, or adds why when it is paused already (an operator's pause, and a
    /// webhook or a check failed meanwhile): one pause, in the first pauser's name, with every
    /// reason, from when it first was, so that a resume moves the clocks on by the whole
    /// pause.
    fn pause(&mut self, now: DateTime<Utc>, by: &str, reason: String) {
        let (since, by_first, why) = match &self.state.phase {
            Phase::Paused {
                since,
                by: first,
                reason: before,
            } => (
                *since,
                first.clone(),
                format!("{before}; and by {by}: {reason}"),
            ),
            _ => (now, by.to_string(), reason.clone()),
        };
        self.state.phase = Phase::Paused {
            by: by_first,
            reason: why,
            since,
        };
        self.record(now, by, None, What::Paused, reason);
    }
}

fn delta(d: std::time::Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}
