//! The engine under simulated time: hours of rollout in milliseconds.
//!
//! `Sim` is a test-only fake world around the engine: fake agents that apply a desired state
//! two seconds after it is sent, a fake traffic source that turns the applied weights into
//! proxy counters every ten seconds, and webhooks that answer after a second.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use fleet::Manifest;
use fleet::model::Compare;
use fleet_engine::analysis::Outcome;
use fleet_engine::{
    Action, Command, Desired, Engine, Event, Histogram, HistoryEvent, Phase, RegionStats,
    RegionStatus, ReleaseSpec, State, TrackStats, What,
};

const APPLY_DELAY: i64 = 2;
const STATS_EVERY: i64 = 10;
/// What the fake agents say while the new version is not ready.
const NOT_READY: &str = "usw1-a: checkout-v2: 0 of 1 pods ready (ImagePullBackOff)";

fn manifest(example: &str) -> Arc<Manifest> {
    let path = format!(
        "{}/../../deploy/examples/{example}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(path).unwrap();
    Arc::new(fleet::load(&src).unwrap().manifest)
}

fn monday_morning() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T07:00:00Z")
        .unwrap()
        .to_utc()
}

fn spec(emergency: Option<&str>) -> ReleaseSpec {
    ReleaseSpec {
        id: "r1".into(),
        service: "svc".into(),
        from_version: "v1".into(),
        to_version: "v2".into(),
        emergency: emergency.map(str::to_string),
        actor: "alice".into(),
    }
}

struct Sim {
    engine: Engine,
    manifest: Arc<Manifest>,
    start: DateTime<Utc>,
    now: DateTime<Utc>,
    /// Events to deliver, with when.
    pending: Vec<(DateTime<Utc>, Event)>,
    next_stats: DateTime<Utc>,
    /// What each region's fake agent has applied.
    applied: BTreeMap<String, Desired>,
    agents_up: BTreeMap<String, bool>,
    counters: BTreeMap<String, RegionStats>,
    /// Requests per second each region serves; 0 for a region without traffic.
    rps: BTreeMap<String, u64>,
    /// Share of requests the new version fails.
    v2_error_rate: f64,
    /// The share of mirrored copies v2 answers otherwise than v1 did.
    v2_mismatch_rate: f64,
    hooks_ok: bool,
    /// Whether the new version's workloads ever become ready.
    v2_ready: bool,
    history: Vec<HistoryEvent>,
    desired_log: Vec<(String, Desired)>,
}

impl Sim {
    fn new(manifest: Arc<Manifest>, spec: ReleaseSpec, start: DateTime<Utc>) -> Sim {
        let regions: Vec<String> = manifest.regions.iter().map(|r| r.name.clone()).collect();
        Sim {
            engine: Engine::start(manifest.clone(), spec, start),
            manifest,
            start,
            now: start,
            pending: Vec::new(),
            next_stats: start,
            applied: BTreeMap::new(),
            agents_up: regions.iter().map(|r| (r.clone(), true)).collect(),
            counters: regions
                .iter()
                .map(|r| (r.clone(), RegionStats::default()))
                .collect(),
            rps: regions.iter().map(|r| (r.clone(), 100)).collect(),
            v2_error_rate: 0.0,
            v2_mismatch_rate: 0.0,
            hooks_ok: true,
            v2_ready: true,
            history: Vec::new(),
            desired_log: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(command) = self.engine.poll_command() {
            match command {
                Command::Desire { region, desired } => {
                    self.desired_log.push((region.clone(), desired.clone()));
                    if self.agents_up[&region] {
                        let at = self.now + TimeDelta::seconds(APPLY_DELAY);
                        let runs_v2 = [Some(&desired.stable), desired.canary.as_ref()]
                            .contains(&Some(&"v2".to_string()));
                        let ready = self.v2_ready || !runs_v2;
                        let detail = match ready {
                            true => String::new(),
                            false => NOT_READY.to_string(),
                        };
                        self.pending.push((
                            at,
                            Event::Applied {
                                region: region.clone(),
                                // As a real agent: 0 until the desired state is in force.
                                seq: if ready { desired.seq } else { 0 },
                                ready,
                                detail,
                            },
                        ));
                        self.applied.insert(region, desired);
                    }
                }
                Command::CallWebhook { id, wait: true, .. } => {
                    let at = self.now + TimeDelta::seconds(1);
                    let detail = if self.hooks_ok {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    self.pending.push((
                        at,
                        Event::WebhookDone {
                            id,
                            ok: self.hooks_ok,
                            detail: detail.into(),
                        },
                    ));
                }
                Command::CallWebhook { .. } => {}
                Command::Record(event) => self.history.push(event),
            }
        }
    }

    /// Advances simulated time until `done` holds or `limit` has passed; returns whether
    /// `done` held.
    fn run_until(&mut self, limit: TimeDelta, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        let mut turns = 0;
        self.drain();
        while !done(self) {
            turns += 1;
            assert!(turns < 1_000_000, "the simulation is stuck at {}", self.now);
            let next_event = self.pending.iter().map(|(t, _)| *t).min();
            let next = [
                self.engine.poll_timeout(),
                next_event,
                Some(self.next_stats),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(deadline);
            if next > deadline {
                self.now = deadline;
                return done(self);
            }
            self.now = self.now.max(next);
            if self.now >= self.next_stats {
                self.traffic();
                self.next_stats = self.now + TimeDelta::seconds(STATS_EVERY);
            }
            let (due, later): (Vec<_>, Vec<_>) =
                self.pending.drain(..).partition(|(t, _)| *t <= self.now);
            self.pending = later;
            for (_, event) in due {
                self.engine.handle(self.now, event);
                self.drain();
            }
            self.engine.handle_timeout(self.now);
            self.drain();
        }
        true
    }

    /// `region`'s agent comes (`up`) or goes, and the controller tells the engine.
    fn reach(&mut self, region: &str, up: bool) {
        self.agents_up.insert(region.into(), up);
        let (region, reachable) = (region.to_string(), up);
        (self.engine).handle(self.now, Event::Reachable { region, reachable });
        self.drain();
    }

    /// A controller started again from `state`: it resends every desired state, and the
    /// agents that are up connect to it.
    fn restore(&mut self, state: State) {
        self.engine = Engine::restore(self.manifest.clone(), state);
        self.engine.resend();
        self.drain();
        let up: Vec<String> = (self.agents_up.iter())
            .filter(|(_, up)| **up)
            .map(|(region, _)| region.clone())
            .collect();
        for region in up {
            self.reach(&region, true);
        }
    }

    fn run_to_end(&mut self, limit: TimeDelta) -> bool {
        self.run_until(limit, |s| s.engine.state().phase.is_terminal())
    }

    /// Ten seconds of traffic through every region's proxy, split as its agent applied.
    fn traffic(&mut self) {
        for (region, counters) in &mut self.counters {
            if !self.agents_up[region] {
                continue;
            }
            let total = self.rps[region] * STATS_EVERY as u64;
            let applied = self.applied.get(region);
            let weight = applied.map_or(0.0, |d| d.traffic.canary_weight.percent() / 100.0);
            // One request in twenty belongs to the A/B cohort when cohort rules are set.
            let cohort = applied
                .filter(|d| !d.traffic.cohort.is_empty())
                .map_or(0.0, |_| 0.05);
            let mirror = applied
                .and_then(|d| d.traffic.mirror)
                .map_or(0.0, |m| m.percent() / 100.0);
            let canary_version = applied.and_then(|d| d.canary.clone());
            let stable_version = applied.map_or("v1".to_string(), |d| d.stable.clone());
            let canary = (total as f64 * (cohort + (1.0 - cohort) * weight)).round() as u64;
            let mirrored = (total as f64 * mirror).round() as u64;
            let error_rate = |v: &str| if v == "v2" { self.v2_error_rate } else { 0.0 };
            // Mirrored copies are counted with the canary's outcomes; their answers are dropped.
            add(
                &mut counters.canary,
                canary + mirrored,
                error_rate(canary_version.as_deref().unwrap_or("v1")),
            );
            add(
                &mut counters.stable,
                total - canary,
                error_rate(&stable_version),
            );
            // Every copy's answer is compared with the one its user got.
            if canary_version.as_deref() == Some("v2") {
                counters.canary.compared += mirrored;
                counters.canary.differed +=
                    (mirrored as f64 * self.v2_mismatch_rate).round() as u64;
            }
            let stats = counters.clone();
            self.pending.push((
                self.now,
                Event::Stats {
                    region: region.clone(),
                    stats,
                },
            ));
        }
    }

    fn operator(&mut self, action: Action) {
        let event = Event::Operator {
            action,
            actor: "alice".into(),
            reason: String::new(),
        };
        self.engine.handle(self.now, event);
        self.drain();
    }

    /// Runs to the end of the release, giving every promote it waits for a minute later.
    fn run_promoting(&mut self, limit: TimeDelta) -> bool {
        self.run_promoting_until(limit, |s| s.engine.state().phase.is_terminal())
    }

    /// Runs until `done`, giving every promote the release waits for a minute later.
    fn run_promoting_until(&mut self, limit: TimeDelta, done: impl Fn(&Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            let left = deadline - self.now;
            self.run_until(left, |s| done(s) || s.waits_for_promote());
            if done(self) || self.now >= deadline {
                return done(self);
            }
            self.run_until(TimeDelta::minutes(1), |_| false);
            self.operator(Action::Promote);
        }
    }

    /// A region sits at an applied indefinite pause, or a wave waits for approval.
    fn waits_for_promote(&self) -> bool {
        let state = self.engine.state();
        let approval = matches!(
            state.wave_state,
            fleet_engine::WaveState::Waiting {
                approved: false,
                ..
            }
        ) && self.manifest.waves[state.wave].approval;
        approval
            || state.regions.iter().any(|(name, r)| {
                r.status == RegionStatus::Active
                    && r.step_started.is_some()
                    && !r.promote_requested
                    && steps(&self.manifest, name)[r.step].hold == fleet::model::Pause::Indefinite
            })
    }

    /// The history as one line per event, times relative to the start.
    fn history_text(&self) -> String {
        self.history
            .iter()
            .map(|e| {
                let t = e.at - self.start;
                let what = serde_json::to_value(&e.what).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string();
                format!(
                    "+{:02}:{:02}:{:02} {:<15} {:<17} {} [{}]\n",
                    t.num_hours(),
                    t.num_minutes() % 60,
                    t.num_seconds() % 60,
                    e.region.as_deref().unwrap_or("-"),
                    what,
                    e.reason,
                    e.actor
                )
            })
            .collect()
    }

    /// The canary weights each region was sent, in order, in basis points (-1: promoted or
    /// rolled back, no canary).
    fn weights(&self, region: &str) -> Vec<i32> {
        self.desired_log
            .iter()
            .filter(|(r, _)| r == region)
            .map(|(_, d)| {
                if d.canary.is_some() {
                    i32::from(u16::from(d.traffic.canary_weight))
                } else {
                    -1
                }
            })
            .collect()
    }
}

fn steps(manifest: &Manifest, region: &str) -> Vec<fleet::steps::Step> {
    let wave = manifest
        .waves
        .iter()
        .find(|w| w.regions.iter().any(|r| r == region))
        .unwrap();
    fleet::steps::of(manifest.strategy_for(wave, manifest.region(region).unwrap()))
}

fn add(t: &mut TrackStats, requests: u64, error_rate: f64) {
    let errors = (requests as f64 * error_rate).round() as u64;
    t.requests += requests;
    t.errors += errors;
    if t.latency.bounds_ms.is_empty() {
        t.latency = Histogram {
            bounds_ms: vec![5.0, 25.0, 100.0],
            counts: vec![0, 0, 0],
        };
    }
    for c in &mut t.latency.counts {
        *c += requests;
    }
}

fn verdicts(sim: &Sim, region: &str) -> Vec<Outcome> {
    sim.history
        .iter()
        .filter(|e| e.region.as_deref() == Some(region))
        .filter_map(|e| match &e.what {
            What::Analysis { verdict } => Some(verdict.outcome),
            _ => None,
        })
        .collect()
}

fn snapshot(name: &str) -> expect_test::ExpectFile {
    expect_test::expect_file![format!(
        "{}/tests/snapshots/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    )]
}

#[test]
fn a_good_release_goes_through_four_waves_with_their_bakes() {
    let mut sim = four_waves();
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
    for region in [
        "us-west-1",
        "us-east-1",
        "eu-west-1",
        "ap-south-1",
        "ap-northeast-1",
    ] {
        assert_eq!(
            sim.weights(region),
            [500, 2500, 5000, 10_000, -1],
            "{region}"
        );
    }
    // Waves in order: each region's first step after the previous wave's last.
    let first_step = |region: &str| {
        sim.history
            .iter()
            .find(|e| {
                e.region.as_deref() == Some(region) && matches!(e.what, What::StepStarted { .. })
            })
            .unwrap()
            .at
    };
    assert!(first_step("us-west-1") < first_step("us-east-1"));
    assert!(first_step("us-east-1") + TimeDelta::hours(2) <= first_step("eu-west-1"));
    assert_eq!(first_step("ap-south-1"), first_step("ap-northeast-1"));
    snapshot("good-release").assert_eq(&sim.history_text());
}

#[test]
fn a_release_failing_five_percent_is_rolled_back_where_it_reached() {
    let mut sim = four_waves();
    sim.v2_error_rate = 0.05;
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert!(matches!(sim.engine.state().phase, Phase::RolledBack { .. }));
    // Caught in the first region, at its first step, after failure_limit (3) failed checks.
    assert_eq!(
        verdicts(&sim, "us-west-1"),
        [Outcome::Fail, Outcome::Fail, Outcome::Fail]
    );
    assert_eq!(sim.weights("us-west-1"), [500, -1]);
    assert_eq!(sim.applied["us-west-1"].stable, "v1");
    for untouched in ["us-east-1", "eu-west-1", "ap-south-1", "ap-northeast-1"] {
        assert!(
            sim.weights(untouched).is_empty(),
            "{untouched} was never touched"
        );
    }
    snapshot("bad-release").assert_eq(&sim.history_text());
}

#[test]
fn a_region_without_traffic_holds_at_its_first_analysed_step_and_says_why() {
    let mut sim = four_waves();
    sim.rps.insert("us-west-1".into(), 0);
    sim.run_until(TimeDelta::hours(3), |_| false);
    let region = &sim.engine.state().regions["us-west-1"];
    assert_eq!((region.status, region.step), (RegionStatus::Active, 0));
    assert_eq!(sim.weights("us-west-1"), [500]);
    let verdicts = verdicts(&sim, "us-west-1");
    assert!(
        verdicts.len() >= 170 && verdicts.iter().all(|v| *v == Outcome::NoData),
        "{verdicts:?}"
    );
    let last = sim
        .history
        .iter()
        .rev()
        .find(|e| matches!(e.what, What::Analysis { .. }))
        .unwrap();
    assert_eq!(
        last.reason,
        "no verdict: 0 canary requests, fewer than the 200 needed; holding"
    );
}

#[test]
fn an_indefinite_pause_waits_for_promote() {
    let mut sim = four_waves();
    let at_fifty = |s: &Sim| {
        s.engine.state().regions["us-west-1"].step == 2
            && s.engine.state().regions["us-west-1"].step_started.is_some()
    };
    assert!(sim.run_until(TimeDelta::hours(1), at_fifty));
    sim.run_until(TimeDelta::hours(5), |_| false);
    assert_eq!(
        sim.engine.state().regions["us-west-1"].step,
        2,
        "still at 50% after five hours"
    );
    sim.operator(Action::Promote);
    assert!(sim.run_until(
        TimeDelta::minutes(1),
        |s| s.engine.state().regions["us-west-1"].status == RegionStatus::Succeeded
    ));
}

#[test]
fn pause_stops_the_clock_and_resume_restarts_it() {
    let mut sim = at_the_first_step();
    sim.run_until(TimeDelta::minutes(2), |_| false);
    sim.operator(Action::Pause);
    sim.run_until(TimeDelta::hours(2), |_| false);
    assert_eq!(
        sim.engine.state().regions["us-west-1"].step,
        0,
        "a paused release does not move"
    );
    sim.operator(Action::Resume);
    // Three minutes of the five-minute pause are left.
    assert!(!sim.run_until(
        TimeDelta::seconds(170),
        |s| s.engine.state().regions["us-west-1"].step == 1
    ));
    assert!(sim.run_until(
        TimeDelta::seconds(20),
        |s| s.engine.state().regions["us-west-1"].step == 1
    ));
}

#[test]
fn a_paused_release_goes_on_checking_and_rolls_back_a_canary_that_fails() {
    let mut sim = at_the_first_step();
    sim.operator(Action::Pause);
    let paused = sim.history.len();
    // Healthy for an hour: checked every minute all along, never moved on.
    sim.run_until(TimeDelta::hours(1), |_| false);
    let checked: Vec<Outcome> = (sim.history[paused..].iter())
        .filter_map(|e| match &e.what {
            What::Analysis { verdict } => Some(verdict.outcome),
            _ => None,
        })
        .collect();
    assert_eq!(
        checked,
        [Outcome::Pass; 60],
        "one check a minute while paused"
    );
    assert_eq!(
        sim.engine.state().regions["us-west-1"].step,
        0,
        "no step moved"
    );
    assert!(matches!(sim.engine.state().phase, Phase::Paused { .. }));
    // Then the new version fails: caught after failure_limit (3) checks, paused or not, and
    // rolled back under the manifest's on_failure (rollback_all).
    sim.v2_error_rate = 0.05;
    let failing = sim.now - sim.start;
    assert!(sim.run_to_end(TimeDelta::minutes(5)));
    assert!(matches!(sim.engine.state().phase, Phase::RolledBack { .. }));
    assert_eq!(sim.applied["us-west-1"].stable, "v1");
    assert_eq!(sim.weights("us-west-1"), [500, -1]);
    let failures = failures(&sim);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].0 <= failing + TimeDelta::minutes(4),
        "{failures:?}"
    );
    assert!(
        failures[0].1.contains("us-west-1 failed 3 checks in a row"),
        "{failures:?}"
    );
}

#[test]
fn a_step_that_comes_into_force_while_paused_is_checked_at_once_and_holds_until_resumed() {
    let mut sim = four_waves();
    // Paused once the first step is sent, before its agent has applied it.
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        s.engine.state().regions["us-west-1"].status == RegionStatus::Active
    }));
    assert_eq!(sim.engine.state().regions["us-west-1"].step_started, None);
    sim.operator(Action::Pause);
    sim.run_until(TimeDelta::minutes(30), |_| false);
    let r = &sim.engine.state().regions["us-west-1"];
    assert_eq!(r.step, 0, "no step moved");
    assert!(r.step_started.is_some(), "in force while paused");
    assert_eq!(
        verdicts(&sim, "us-west-1").len(),
        29,
        "checked from a minute after"
    );
    // The step's five-minute pause starts at the resume, not when the step came into force
    // (two seconds after the pause began), and the checks go on a minute apart through it.
    sim.operator(Action::Resume);
    let checked = verdicts(&sim, "us-west-1").len();
    assert!(!sim.run_until(
        TimeDelta::seconds(299),
        |s| s.engine.state().regions["us-west-1"].step == 1
    ));
    assert!(verdicts(&sim, "us-west-1").len() >= checked + 4);
    assert!(sim.run_until(
        TimeDelta::seconds(2),
        |s| s.engine.state().regions["us-west-1"].step == 1
    ));
}

#[test]
fn a_step_that_came_up_during_a_pause_after_waiting_before_it_holds_from_the_resume() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        s.engine.state().regions["us-west-1"]
            .waiting_for()
            .is_some()
    }));
    // Not ready for 15 s, then paused; ready 10 s into the pause.
    sim.run_until(TimeDelta::seconds(15), |_| false);
    sim.operator(Action::Pause);
    sim.run_until(TimeDelta::seconds(10), |_| false);
    let event = Event::Applied {
        region: "us-west-1".into(),
        seq: sim.applied["us-west-1"].seq,
        ready: true,
        detail: String::new(),
    };
    sim.engine.handle(sim.now, event);
    sim.drain();
    sim.run_until(TimeDelta::minutes(10), |_| false);
    let r = &sim.engine.state().regions["us-west-1"];
    assert!(r.step_started.is_some(), "in force while paused");
    assert_eq!(
        r.waiting_for(),
        None,
        "no longer said to wait for its workloads"
    );
    // Its five-minute pause runs from the resume, once: the wait before the pause is not
    // added to it again.
    sim.operator(Action::Resume);
    let next_step = |s: &Sim| s.engine.state().regions["us-west-1"].step == 1;
    assert!(!sim.run_until(TimeDelta::seconds(299), next_step));
    assert!(sim.run_until(TimeDelta::seconds(2), next_step));
}

#[test]
fn abort_mid_step_rolls_back_every_region_reached() {
    let mut sim = at_the_second_waves_second_step();
    sim.operator(Action::Abort);
    assert!(sim.run_to_end(TimeDelta::minutes(1)));
    assert!(matches!(sim.engine.state().phase, Phase::RolledBack { .. }));
    for region in ["us-west-1", "us-east-1"] {
        assert_eq!(sim.applied[region].stable, "v1");
        assert_eq!(sim.applied[region].canary, None);
    }
    assert!(sim.weights("eu-west-1").is_empty());
}

#[test]
fn a_lost_agent_holds_its_region_until_it_returns() {
    let mut sim = at_the_first_step();
    sim.reach("us-west-1", false);
    sim.run_until(TimeDelta::hours(1), |_| false);
    assert_eq!(sim.engine.state().regions["us-west-1"].step, 0);
    sim.reach("us-west-1", true);
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
}

/// A region whose step passed its check and then lost its agents (or its controller)
/// before the step's pause ended: the new version went bad meanwhile, unseen. Once they are
/// back it is judged on what they report since, and does not move on on the old pass.
#[test]
fn a_pass_from_before_an_outage_moves_no_region_on() {
    for outage in ["agent", "controller"] {
        let mut sim = four_waves();
        // At a step whose check has passed and whose pause has most of its time to run.
        assert!(sim.run_until(TimeDelta::hours(1), |s| {
            let r = &s.engine.state().regions["us-west-1"];
            r.passed_in_step
                && r.hold_until
                    .is_some_and(|t| t - s.now > TimeDelta::minutes(1))
        }));
        let (step, judged) = (
            sim.engine.state().regions["us-west-1"].step,
            verdicts(&sim, "us-west-1").len(),
        );
        let saved = serde_json::to_string(sim.engine.state()).unwrap();
        sim.reach("us-west-1", false);
        sim.v2_error_rate = 0.5;
        // Away past the pause's end.
        sim.run_until(TimeDelta::minutes(30), |_| false);
        match outage {
            "agent" => sim.reach("us-west-1", true),
            _ => {
                sim.agents_up.insert("us-west-1".into(), true);
                sim.restore(serde_json::from_str(&saved).unwrap());
            }
        }
        assert!(sim.run_until(TimeDelta::hours(1), |s| failed(s)
            || s.engine.state().regions["us-west-1"].step != step));
        assert_eq!(
            sim.engine.state().regions["us-west-1"].step,
            step,
            "{outage}: moved on on a pass from before it"
        );
        let after = &verdicts(&sim, "us-west-1")[judged..];
        assert!(
            !after.is_empty() && after.iter().all(|o| *o == Outcome::Fail),
            "{outage}: {after:?}"
        );
    }
}

#[test]
fn a_restored_engine_carries_on_from_the_same_step_and_applies_nothing_twice() {
    let mut sim = at_the_second_waves_second_step();
    // A crash: only the persisted state survives.
    let saved = serde_json::to_string(sim.engine.state()).unwrap();
    let state: State = serde_json::from_str(&saved).unwrap();
    let step_before = state.regions["us-east-1"].step;
    let before = sim.history.len();
    sim.restore(state);
    assert_eq!(sim.engine.state().regions["us-east-1"].step, step_before);
    // Each region's agents back, in words that fit where the release is with it.
    let back: BTreeMap<String, String> = (sim.history[before..].iter())
        .filter(|e| e.what == What::RegionHolding)
        .map(|e| (e.region.clone().unwrap(), e.reason.clone()))
        .collect();
    assert_eq!(back["us-west-1"], "agent is back", "done with: {back:?}");
    assert_eq!(back["us-east-1"], "agent is back; carrying on");
    assert_eq!(
        back["eu-west-1"],
        "agent is back (the release has not reached this region yet)"
    );
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
    // The resent state reused its sequence number: one content per seq, weights unchanged.
    let mut by_seq: BTreeMap<u64, &Desired> = BTreeMap::new();
    for (_, d) in &sim.desired_log {
        assert!(
            by_seq.insert(d.seq, d).is_none_or(|old| old == d),
            "seq {} sent with two contents",
            d.seq
        );
    }
    // 25% sent, then resent by the restored engine and as the region's agents came back.
    assert_eq!(
        sim.weights("us-east-1"),
        [500, 2500, 2500, 2500, 5000, 10_000, -1]
    );
}

#[test]
fn a_restored_engine_moves_no_region_on_until_its_agents_are_back_and_have_reported() {
    let mut sim = at_the_second_waves_second_step();
    let saved = serde_json::to_string(sim.engine.state()).unwrap();
    // Back an hour later, with us-east-1's agents away: its timers are all overdue.
    sim.now += TimeDelta::hours(1);
    sim.pending.clear();
    sim.agents_up.insert("us-east-1".into(), false);
    let judged = verdicts(&sim, "us-east-1").len();
    sim.restore(serde_json::from_str(&saved).unwrap());
    sim.run_until(TimeDelta::hours(1), |_| false);
    let east = &sim.engine.state().regions["us-east-1"];
    assert!(!east.reachable, "unreachable until its agents connect");
    assert_eq!(east.step, 1, "not moved on");
    assert_eq!(verdicts(&sim, "us-east-1").len(), judged, "not judged");
    // They connect: it is judged on what they report, and carries on.
    sim.reach("us-east-1", true);
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
}

#[test]
fn a_check_whose_numbers_did_not_come_within_its_interval_gives_no_verdict() {
    // At the indefinite pause at 50%, judged every minute (3,000 canary requests).
    let mut sim = four_waves();
    assert!(sim.run_until(TimeDelta::hours(1), |s| {
        let r = &s.engine.state().regions["us-west-1"];
        r.step == 2 && r.passed_in_step
    }));
    // Nothing comes for an hour (the controller stopped, say): the checks then due give no
    // verdict on the numbers of an hour ago. The proxies counted on meanwhile.
    let judged = verdicts(&sim, "us-west-1").len();
    sim.now += TimeDelta::hours(1);
    let counters = sim.counters.get_mut("us-west-1").unwrap();
    (counters.canary.requests, counters.canary.errors) = (
        counters.canary.requests + 36_000,
        counters.canary.errors + 3_600,
    );
    sim.engine.handle_timeout(sim.now);
    sim.drain();
    assert_eq!(verdicts(&sim, "us-west-1").len(), judged);
    // And the checks missed meanwhile are not made up one by one: the next is ahead.
    let next = sim.engine.state().regions["us-west-1"].next_check;
    assert!(next > Some(sim.now), "{next:?}");
    // Fresh numbers: judged again, on what came after them, not across the hour.
    assert!(sim.run_until(TimeDelta::minutes(5), |s| {
        verdicts(s, "us-west-1").len() > judged
    }));
    let after: Vec<(u64, Outcome)> = (sim.history.iter())
        .filter_map(|e| match &e.what {
            What::Analysis { verdict } if e.region.as_deref() == Some("us-west-1") => {
                Some((verdict.canary.requests, verdict.outcome))
            }
            _ => None,
        })
        .skip(judged)
        .collect();
    assert!(
        after
            .iter()
            .all(|(n, o)| *n <= 3_000 && *o == Outcome::Pass),
        "{after:?}"
    );
}

#[test]
fn waves_wait_for_their_window_and_their_approval() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(None),
        monday_morning(),
    );
    // The window opens at 10:00 in Berlin, 09:00 UTC.
    assert!(!sim.run_until(TimeDelta::minutes(119), |s| {
        !s.weights("eu-central-1").is_empty()
    }));
    // A promote does not open a window (the first wave needs no approval).
    let refused = sim.engine.refusal(Action::Promote).unwrap();
    assert!(
        refused.contains("waits for its window or its pre-rollout hook"),
        "{refused}"
    );
    assert!(sim.run_until(TimeDelta::minutes(2), |s| {
        !s.weights("eu-central-1").is_empty()
    }));
    assert!(sim.run_until(TimeDelta::hours(2), |s| s.waits_for_promote()));
    assert!(
        sim.weights("eu-west-1").is_empty(),
        "wave two waits for approval"
    );
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(
        sim.weights("eu-west-1"),
        [1000, 2000, 3000, 4000, 5000, 10_000, -1]
    );
}

#[test]
fn an_emergency_release_starts_outside_its_window() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("CVE fix")),
        monday_morning(),
    );
    assert!(sim.run_until(TimeDelta::minutes(1), |s| {
        !s.weights("eu-central-1").is_empty()
    }));
}

#[test]
fn a_failing_webhook_pauses_the_release_until_resumed() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    sim.hooks_ok = false;
    sim.run_until(TimeDelta::minutes(5), |_| false);
    assert!(matches!(sim.engine.state().phase, Phase::Paused { .. }));
    assert!(
        sim.weights("eu-central-1").is_empty(),
        "pre-rollout failed: nothing changed"
    );
    sim.hooks_ok = true;
    sim.operator(Action::Resume);
    assert!(sim.run_until(TimeDelta::minutes(1), |s| {
        !s.weights("eu-central-1").is_empty()
    }));
}

#[test]
fn a_step_applied_before_its_regions_first_numbers_judges_only_what_came_after() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    // The proxies' counters since the agents began counting: an earlier release's canary
    // failed half its requests. And the step is applied before the first report of them.
    let earlier = TrackStats {
        requests: 100_000,
        errors: 50_000,
        counting_since_unix_ms: 1,
        ..Default::default()
    };
    for counters in sim.counters.values_mut() {
        counters.canary = earlier.clone();
        counters.stable.counting_since_unix_ms = 1;
    }
    sim.next_stats = sim.start + TimeDelta::seconds(APPLY_DELAY + 1);
    sim.run_until(TimeDelta::minutes(10), |_| false);
    let judged = verdicts(&sim, "eu-central-1");
    assert_eq!(judged[..3], [Outcome::Pass; 3], "{judged:?}");
    assert!(!judged.contains(&Outcome::Fail), "{judged:?}");
}

#[test]
fn a_webhook_failing_while_paused_keeps_the_pause_from_when_it_began() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    sim.hooks_ok = false;
    sim.drain();
    // Paused by an operator while the pre-rollout hook is under way; it fails after that.
    sim.operator(Action::Pause);
    let began = sim.now;
    sim.run_until(TimeDelta::minutes(5), |_| false);
    let Phase::Paused { since, reason, .. } = &sim.engine.state().phase else {
        panic!("{:?}", sim.engine.state().phase);
    };
    assert!(reason.contains("a webhook failed"), "{reason}");
    assert_eq!(*since, began, "the clocks stood still from the first pause");
}

#[test]
fn rollback_region_policy_rolls_back_only_the_failed_region() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    sim.v2_error_rate = 0.05;
    sim.run_until(TimeDelta::hours(1), |s| {
        matches!(s.engine.state().phase, Phase::Paused { .. })
    });
    sim.run_until(TimeDelta::minutes(1), |_| false);
    let state = sim.engine.state();
    assert!(
        matches!(&state.phase, Phase::Paused { reason, .. } if reason.contains("eu-central-1 rolls back"))
    );
    assert_eq!(
        state.regions["eu-central-1"].status,
        RegionStatus::RolledBack
    );
    assert_eq!(sim.applied["eu-central-1"].stable, "v1");
}

#[test]
fn blue_green_switches_at_once_after_its_smoke_test() {
    let mut sim = Sim::new(manifest("blue-green"), spec(None), monday_morning());
    assert!(sim.run_to_end(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
    assert_eq!(sim.weights("ap-southeast-2"), [0, 10_000, -1]);
    let hooks: Vec<&str> = sim
        .history
        .iter()
        .filter(|e| {
            e.region.as_deref() == Some("ap-southeast-2")
                && matches!(e.what, What::WebhookCalled { .. })
        })
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(
        hooks,
        [
            "http://smoke-tests.internal.example.com/run?suite=search",
            "https://release-bot.example.com/confirm"
        ]
    );
}

#[test]
fn mirror_then_cohort_then_weights() {
    let mut sim = Sim::new(manifest("ab-mirror"), spec(None), monday_morning());
    assert!(sim.run_to_end(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
    let sent: Vec<_> = sim
        .desired_log
        .iter()
        .filter(|(r, _)| r == "ca-central-1")
        .map(|(_, d)| d.clone())
        .collect();
    assert_eq!(sent[0].traffic.mirror.map(u16::from), Some(1000));
    assert_eq!(sent[0].traffic.mirror_compare, Some(Compare::Status));
    assert!(sent[0].traffic.cohort.is_empty());
    assert_eq!(sent[1].traffic.mirror, None);
    assert_eq!(sent[1].traffic.cohort.len(), 2);
    assert_eq!(u16::from(sent[2].traffic.canary_weight), 1000);
    assert_eq!(
        sent[2].traffic.cohort.len(),
        2,
        "the cohort stays on the new version during the ramp"
    );
}

#[test]
fn a_new_version_that_answers_mirrored_requests_otherwise_is_caught_before_anyone_gets_it() {
    let mut sim = Sim::new(manifest("ab-mirror"), spec(None), monday_morning());
    // No request fails; 3% of the copies get another answer than the stable one gave.
    sim.v2_mismatch_rate = 0.03;
    assert!(sim.run_to_end(TimeDelta::days(1)));
    assert!(matches!(sim.engine.state().phase, Phase::RolledBack { .. }));
    // Only the mirror phase was ever sent: no user was served by v2.
    let sent: Vec<_> = sim.desired_log.iter().map(|(_, d)| d).collect();
    assert!(
        sent.iter()
            .all(|d| d.traffic.cohort.is_empty() && u16::from(d.traffic.canary_weight) == 0),
        "{sent:?}"
    );
    let said = |text: &str| sim.history.iter().any(|e| e.reason.contains(text));
    assert!(said(
        "mirror 10%: requests copied to the new version, no user on it"
    ));
    let failed = sim
        .history
        .iter()
        .find(|e| e.reason.contains("mirror_match_rate >= 99 (is 97: FAILED)"));
    assert!(failed.is_some(), "{:#?}", sim.history);
}

#[test]
fn proxies_are_asked_to_compare_only_when_the_manifest_says_so_or_its_gate_needs_it() {
    // The mirror phase's `compare` as written, and whether the gate is there.
    let asked = |compare: Option<Compare>, gate: bool| {
        let mut manifest = (*manifest("ab-mirror")).clone();
        manifest.strategy.mirror.as_mut().unwrap().compare = compare;
        let gates = &mut manifest.analysis.as_mut().unwrap().gates;
        gates.retain(|g| gate || !matches!(g, fleet::model::Gate::MirrorMatchRate { .. }));
        let mut sim = Sim::new(Arc::new(manifest), spec(None), monday_morning());
        sim.run_until(TimeDelta::minutes(1), |s| !s.desired_log.is_empty());
        sim.desired_log[0].1.traffic.mirror_compare
    };
    assert_eq!(
        asked(None, false),
        None,
        "not asked: older proxies refuse it"
    );
    assert_eq!(asked(None, true), Some(Compare::Status));
    assert_eq!(asked(Some(Compare::Body), true), Some(Compare::Body));
    assert_eq!(asked(Some(Compare::Status), false), Some(Compare::Status));
}

/// A release of the four-wave example (`multi-region-canary`), on a Monday morning.
fn four_waves() -> Sim {
    Sim::new(
        manifest("multi-region-canary"),
        spec(None),
        monday_morning(),
    )
}

/// A release of the four-wave example, its first region's first step applied.
fn at_the_first_step() -> Sim {
    let mut sim = four_waves();
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        s.engine.state().regions["us-west-1"].step_started.is_some()
    }));
    sim
}

/// A release of the four-wave example, its second wave's region (us-east-1) at its second
/// step.
fn at_the_second_waves_second_step() -> Sim {
    let mut sim = four_waves();
    assert!(sim.run_promoting_until(TimeDelta::hours(3), |s| {
        s.engine.state().regions["us-east-1"].step == 1
    }));
    sim
}

/// Whether a region has failed.
fn failed(s: &Sim) -> bool {
    !failures(s).is_empty()
}

/// The history's `region_failed` lines: when, and why.
fn failures(sim: &Sim) -> Vec<(TimeDelta, String)> {
    let failed = sim.history.iter().filter(|e| e.what == What::RegionFailed);
    failed
        .map(|e| (e.at - sim.start, e.reason.clone()))
        .collect()
}

/// How long after a state is sent the fake agents report on it.
const ANSWERED: TimeDelta = TimeDelta::seconds(APPLY_DELAY);

const DEADLINE_FAILURE: &str = "us-west-1 waited 10m (progress_deadline) for step 1/4 to be \
    applied and ready; the agents say: usw1-a: checkout-v2: 0 of 1 pods ready (ImagePullBackOff)";

#[test]
fn a_new_version_that_never_becomes_ready_fails_its_region_at_the_progress_deadline() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    assert!(sim.run_to_end(TimeDelta::days(1)));
    assert!(matches!(sim.engine.state().phase, Phase::RolledBack { .. }));
    // The default deadline, counted from the agent's first report on the step (it answers two
    // seconds after the step is sent); the failure policy (rollback_all) does the rest, and
    // the rollback, which runs v1 only, is applied.
    assert_eq!(
        failures(&sim),
        [(
            ANSWERED + TimeDelta::minutes(10),
            DEADLINE_FAILURE.to_string()
        )]
    );
    assert_eq!(sim.weights("us-west-1"), [500, -1]);
    assert_eq!(sim.applied["us-west-1"].stable, "v1");
    assert!(sim.weights("us-east-1").is_empty());
}

#[test]
fn the_progress_deadline_stops_while_the_release_is_paused_or_the_agent_is_lost() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    sim.run_until(TimeDelta::minutes(4), failed);
    sim.operator(Action::Pause);
    assert!(!sim.run_until(TimeDelta::hours(2), failed), "paused");
    sim.operator(Action::Resume);
    assert!(
        !sim.run_until(TimeDelta::minutes(5), failed),
        "9 of 10 minutes"
    );
    // Lost, the region holds: no failure while the agent cannot be heard.
    sim.reach("us-west-1", false);
    assert!(!sim.run_until(TimeDelta::hours(2), failed), "lost");
    // Back, it is sent the step again and, once it has reported on it, has what is left of
    // the deadline: it had waited 8m58s (from 2 s to 4 min, and 5 min after the resume).
    sim.reach("us-west-1", true);
    let back = sim.now - sim.start;
    assert!(sim.run_until(TimeDelta::minutes(2), failed));
    assert_eq!(
        failures(&sim),
        [(
            back + ANSWERED + TimeDelta::seconds(62),
            DEADLINE_FAILURE.to_string()
        )]
    );
}

#[test]
fn agents_lost_during_a_pause_do_not_count_the_pause_as_waiting() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    sim.run_until(TimeDelta::minutes(4), failed);
    sim.operator(Action::Pause);
    // Paused overnight, the agent lost and back in the night.
    sim.run_until(TimeDelta::hours(3), failed);
    sim.reach("us-west-1", false);
    sim.run_until(TimeDelta::hours(3), failed);
    sim.reach("us-west-1", true);
    sim.run_until(TimeDelta::hours(3), failed);
    sim.operator(Action::Resume);
    // 3m58s were waited before the pause: 6m02s are left once the agent has reported.
    assert!(
        !sim.run_until(TimeDelta::minutes(6), failed),
        "the pause was counted"
    );
    assert!(sim.run_until(TimeDelta::seconds(10), failed));
}

#[test]
fn agents_that_come_and_go_do_not_hold_a_step_that_never_comes_up_for_ever() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    // The region's agent restarts every 90 s, a crash loop: lost for 30 s, then back.
    let mut turns = 0;
    while !failed(&sim) {
        turns += 1;
        assert!(
            turns < 20,
            "never failed: the deadline starts over each time"
        );
        sim.run_until(TimeDelta::seconds(60), failed);
        for up in [false, true] {
            sim.reach("us-west-1", up);
            sim.run_until(TimeDelta::seconds(30), failed);
        }
    }
    // Ten minutes of waiting while heard (88 s a turn), in the seventh turn.
    assert_eq!(turns, 7);
    assert_eq!(failures(&sim)[0].1, DEADLINE_FAILURE);
}

#[test]
fn a_step_whose_workloads_stop_being_ready_fails_if_they_stay_so_past_the_deadline() {
    let mut sim = at_the_first_step();
    // The fake agent of us-west-1 says what it has applied, and how ready that is.
    let report = |sim: &mut Sim, ready: bool, detail: &str| {
        let event = Event::Applied {
            region: "us-west-1".into(),
            seq: sim.applied["us-west-1"].seq,
            ready,
            detail: detail.into(),
        };
        sim.engine.handle(sim.now, event);
        sim.drain();
    };
    // Unready for nine minutes, then ready again: the step carries on. Meanwhile its pause
    // and analysis stood still (the simulation stops with "stuck" if the engine asks to be
    // woken at a time already past).
    let crashing = "usw1-a: checkout-v2: 0 of 1 pods ready (CrashLoopBackOff)";
    report(&mut sim, false, crashing);
    assert!(!sim.run_until(TimeDelta::minutes(9), failed));
    report(&mut sim, true, "");
    let next_step = |s: &Sim| s.engine.state().regions["us-west-1"].step == 1;
    assert!(
        !sim.run_until(TimeDelta::seconds(295), next_step),
        "the five-minute pause had not begun to run out"
    );
    assert!(sim.run_until(TimeDelta::seconds(10), next_step));
    // At the next step, unready for good: failed ten minutes later.
    sim.run_until(TimeDelta::seconds(5), |_| false);
    let at = sim.now - sim.start;
    report(&mut sim, false, "");
    assert!(sim.run_until(TimeDelta::minutes(11), failed));
    let reason = "us-west-1 waited 10m (progress_deadline) for step 2/4 to be applied and \
        ready; applied, but its workloads are not ready";
    assert_eq!(
        failures(&sim),
        [(at + TimeDelta::minutes(10), reason.to_string())]
    );
}

#[test]
fn a_restored_engine_gives_a_waiting_region_the_whole_deadline_again() {
    let mut sim = four_waves();
    sim.v2_ready = false;
    assert!(!sim.run_until(TimeDelta::minutes(8), failed));
    // A crash, and a controller back an hour later: only the persisted state survives, and
    // nothing was heard meanwhile.
    let saved = serde_json::to_string(sim.engine.state()).unwrap();
    sim.now += TimeDelta::hours(1);
    sim.pending.clear();
    sim.restore(serde_json::from_str(&saved).unwrap());
    let back = sim.now - sim.start;
    assert!(!sim.run_until(TimeDelta::seconds(601), failed));
    assert!(sim.run_until(TimeDelta::minutes(1), failed));
    assert_eq!(
        failures(&sim)[0].0,
        back + ANSWERED + TimeDelta::minutes(10)
    );
}

#[test]
fn a_region_whose_agents_never_answer_holds_rather_than_fails() {
    let mut sim = four_waves();
    // Agents gone before the release began: the engine was never told, yet hears nothing.
    sim.agents_up.insert("us-west-1".into(), false);
    sim.run_until(TimeDelta::hours(2), |_| false);
    assert!(failures(&sim).is_empty());
    assert_eq!(sim.engine.state().phase, Phase::Progressing);
    assert_eq!(sim.weights("us-west-1"), [500], "sent, never applied");
}

#[test]
fn resumed_after_a_held_deadline_failure_a_region_has_the_whole_deadline_again() {
    let mut sim = Sim::new(manifest("blue-green"), spec(None), monday_morning());
    sim.v2_ready = false;
    let failed_times = |n: usize| move |s: &Sim| failures(s).len() >= n;
    assert!(sim.run_until(TimeDelta::hours(1), failed_times(1)));
    let first = failures(&sim)[0].0;
    // on_failure: hold pauses the release; an operator resumes it an hour later.
    assert!(matches!(sim.engine.state().phase, Phase::Paused { .. }));
    sim.run_until(TimeDelta::hours(1), |_| false);
    sim.operator(Action::Resume);
    let resumed = sim.now - sim.start;
    assert_eq!(resumed, first + TimeDelta::hours(1));
    assert!(!sim.run_until(TimeDelta::seconds(599), failed_times(2)));
    assert!(sim.run_until(TimeDelta::seconds(1), failed_times(2)));
    assert_eq!(failures(&sim)[1].0, resumed + TimeDelta::minutes(10));
}

#[test]
fn resumed_after_a_held_analysis_failure_a_region_is_judged_on_what_came_after() {
    let mut held = (*manifest("multi-region-canary")).clone();
    held.on_failure = fleet::model::FailurePolicy::Hold;
    let mut sim = Sim::new(Arc::new(held), spec(None), monday_morning());
    sim.v2_error_rate = 0.05;
    assert!(sim.run_until(TimeDelta::hours(1), failed));
    assert_eq!(
        sim.engine.state().regions["us-west-1"].status,
        RegionStatus::Failed
    );
    // Its agents gone and back while held: they are not told it carries on.
    sim.reach("us-west-1", false);
    sim.reach("us-west-1", true);
    let said = sim.history.last().unwrap();
    assert_eq!(said.what, What::RegionHolding);
    assert_eq!(
        said.reason,
        "agent is back; the region stays held after its failure (resume or abort)"
    );
    // Held for an hour, the new version failing all along; then mended, and resumed.
    sim.run_until(TimeDelta::hours(1), |_| false);
    sim.v2_error_rate = 0.0;
    sim.run_until(TimeDelta::seconds(30), |_| false);
    let before = verdicts(&sim, "us-west-1").len();
    sim.operator(Action::Resume);
    sim.run_until(TimeDelta::minutes(3), |_| false);
    let after = &verdicts(&sim, "us-west-1")[before..];
    assert!(!after.is_empty(), "checked again after the resume");
    assert!(
        after.iter().all(|o| *o == Outcome::Pass),
        "judged on the hour held: {after:?}"
    );
}

#[test]
fn each_gate_a_promote_passes_has_a_name_that_a_stale_promote_is_refused_by() {
    let mut approved = (*manifest("multi-region-canary")).clone();
    approved.waves[1].approval = true;
    let mut sim = Sim::new(Arc::new(approved), spec(None), monday_morning());
    let gate = |s: &Sim| s.engine.gate();
    assert!(sim.run_until(TimeDelta::minutes(10), |s| gate(s).is_some()));
    assert_eq!(gate(&sim).as_deref(), Some("step:us-west-1=1"));
    let refused = sim.engine.gate_refusal("bake:canary-region").unwrap();
    assert!(
        refused
            .starts_with("the release waits at gate step:us-west-1=1, not at bake:canary-region"),
        "{refused}"
    );
    assert_eq!(sim.engine.gate_refusal("step:us-west-1=1"), None);
    // The wave's bake, then the next wave's approval.
    let baking = |s: &Sim| gate(s).as_deref() == Some("bake:canary-region");
    assert!(sim.run_promoting_until(TimeDelta::hours(3), baking));
    let stale = sim.engine.gate_refusal("step:us-west-1=1").unwrap();
    assert!(
        stale.contains("waits at gate bake:canary-region"),
        "{stale}"
    );
    sim.operator(Action::Promote);
    let approval = |s: &Sim| gate(s).as_deref() == Some("approval:americas");
    assert!(sim.run_until(TimeDelta::minutes(1), approval));
    sim.operator(Action::Promote);
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        gate(s).as_deref() == Some("step:us-east-1=1")
    }));
    // Paused: no gate, and a promote of one is refused saying why.
    sim.operator(Action::Pause);
    assert_eq!(gate(&sim), None);
    let paused = sim.engine.gate_refusal("step:us-east-1=1").unwrap();
    assert_eq!(
        paused,
        "the release waits at no gate now, not at step:us-east-1=1: the release is paused: resume it first"
    );
}

#[test]
fn a_region_reached_while_its_agents_are_away_says_so_and_holds_until_they_are_back() {
    let mut sim = four_waves();
    sim.reach("us-east-1", false);
    let reached = |s: &Sim| s.engine.state().regions["us-east-1"].status != RegionStatus::Pending;
    assert!(sim.run_promoting_until(TimeDelta::hours(3), reached));
    let said: Vec<&str> = (sim.history.iter())
        .filter(|e| e.region.as_deref() == Some("us-east-1") && e.what == What::RegionHolding)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(
        said,
        [
            "agent unreachable (the release has not reached this region yet)",
            "reached while its agent is unreachable: the region holds at its first step until its agents are back",
        ]
    );
    // It holds for an hour, never failed; then its agents are back, and it carries on.
    sim.run_until(TimeDelta::hours(1), |_| false);
    assert!(failures(&sim).is_empty());
    assert_eq!(sim.engine.state().regions["us-east-1"].step, 0);
    sim.reach("us-east-1", true);
    assert!(sim.run_promoting(TimeDelta::days(1)));
    assert_eq!(sim.engine.state().phase, Phase::Succeeded);
}

#[test]
fn a_failure_held_during_an_operators_pause_adds_its_reason_to_the_operators() {
    let mut held = (*manifest("multi-region-canary")).clone();
    held.on_failure = fleet::model::FailurePolicy::Hold;
    let mut sim = Sim::new(Arc::new(held), spec(None), monday_morning());
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        s.engine.state().regions["us-west-1"].step_started.is_some()
    }));
    let event = Event::Operator {
        action: Action::Pause,
        actor: "alice".into(),
        reason: "hold at 5% over lunch".into(),
    };
    sim.engine.handle(sim.now, event);
    sim.drain();
    let since = sim.now;
    sim.v2_error_rate = 0.05;
    assert!(sim.run_until(TimeDelta::minutes(5), failed));
    // One pause, alice's, from when she paused, saying both why.
    let Phase::Paused {
        by,
        reason,
        since: from,
    } = &sim.engine.state().phase
    else {
        panic!("{:?}", sim.engine.state().phase);
    };
    assert_eq!((by.as_str(), *from), ("alice", since));
    assert!(
        reason.starts_with("hold at 5% over lunch; and by engine: us-west-1 failed 3 checks")
            && reason.ends_with("holding everything for an operator"),
        "{reason}"
    );
}

#[test]
fn a_rollback_that_is_not_yet_in_force_says_why_and_has_no_deadline() {
    let mut sim = at_the_first_step();
    // The step's own trouble, said before the abort, is not said of the rollback.
    let step = Event::Applied {
        region: "us-west-1".into(),
        seq: sim.applied["us-west-1"].seq,
        ready: false,
        detail: "usw1-a: checkout-v2: 0 of 3 ready (CrashLoopBackOff)".into(),
    };
    sim.engine.handle(sim.now, step);
    sim.drain();
    sim.operator(Action::Abort);
    let region = &sim.engine.state().regions["us-west-1"];
    assert_eq!(region.status, RegionStatus::RollingBack);
    // Until its agents have reported on the rollback, that is what it waits for; and for
    // them to connect, while they are not.
    let seq = region.desired.as_ref().unwrap().seq;
    let waiting = |s: &Sim| s.engine.state().regions["us-west-1"].waiting_for();
    let unheard = "its agents have not reported on it yet: it is put in force as they come";
    let said = waiting(&sim).unwrap_or_default();
    assert!(said.starts_with(unheard), "{said}");
    sim.reach("us-west-1", false);
    let gone = "not every cluster's agent is connected: it is put in force as they come";
    let said = waiting(&sim).unwrap_or_default();
    assert!(said.starts_with(gone), "{said}");
    sim.reach("us-west-1", true);
    sim.pending.clear();
    let event = Event::Applied {
        region: "us-west-1".into(),
        seq,
        ready: false,
        detail: "usw1-a: checkout-v1: 0 of 3 ready (ImagePullBackOff)".into(),
    };
    sim.engine.handle(sim.now, event);
    sim.drain();
    sim.run_until(TimeDelta::hours(1), |_| false);
    assert_eq!(
        waiting(&sim).as_deref(),
        Some("the agents say: usw1-a: checkout-v1: 0 of 3 ready (ImagePullBackOff)")
    );
    let region = &sim.engine.state().regions["us-west-1"];
    assert_eq!(region.deadline(std::time::Duration::ZERO), None);
    assert!(failures(&sim).is_empty());
}

#[test]
fn a_promote_passes_no_step_before_it_is_in_force_and_is_refused_saying_why() {
    let mut sim = four_waves();
    let region = |s: &Sim| s.engine.state().regions["us-west-1"].clone();
    // The first region has been sent its first step; its agents have not applied it yet.
    assert!(sim.run_until(TimeDelta::minutes(10), |s| {
        region(s).status == RegionStatus::Active && !region(s).applied()
    }));
    let refused = sim.engine.refusal(Action::Promote).unwrap();
    assert!(
        refused.starts_with("no gate to pass yet: us-west-1 not at a step in force"),
        "{refused}"
    );
    let step = region(&sim).step;
    sim.operator(Action::Promote);
    assert!(!region(&sim).promote_requested, "not passed unseen");
    // In force: a promote passes it.
    assert!(sim.run_until(TimeDelta::minutes(1), |s| region(s).applied()));
    assert_eq!(sim.engine.refusal(Action::Promote), None);
    sim.operator(Action::Promote);
    assert!(region(&sim).step > step, "passed once in force");
}

#[test]
fn an_operator_action_that_would_change_nothing_is_refused_saying_why() {
    let mut sim = at_the_first_step();
    assert_eq!(
        sim.engine.refusal(Action::Resume).as_deref(),
        Some("the release is not paused")
    );
    assert_eq!(sim.engine.refusal(Action::Pause), None);
    sim.operator(Action::Pause);
    assert_eq!(
        sim.engine.refusal(Action::Pause).as_deref(),
        Some("the release is paused already")
    );
    assert_eq!(
        sim.engine.refusal(Action::Promote).as_deref(),
        Some("the release is paused: resume it first")
    );
    assert_eq!(sim.engine.refusal(Action::Abort), None);
    sim.operator(Action::Abort);
    assert_eq!(
        sim.engine.refusal(Action::Abort).as_deref(),
        Some("the release is rolling back already")
    );
    assert!(sim.run_to_end(TimeDelta::minutes(1)));
    assert_eq!(
        sim.engine.refusal(Action::Abort).as_deref(),
        Some("the release has rolled back (aborted): nothing to abort")
    );
}

#[test]
fn a_superseded_release_ends_at_once_its_regions_sent_back_to_the_stable_version() {
    let mut sim = at_the_first_step();
    sim.engine.supersede(sim.now, "bob", "demo-2 (v3)");
    sim.drain();
    let phase = sim.engine.state().phase.clone();
    let reason = "superseded by demo-2 (v3), which goes on from v1 in every region";
    assert_eq!(
        phase,
        Phase::RolledBack {
            reason: reason.into()
        }
    );
    assert_eq!(sim.applied["us-west-1"].stable, "v1");
    assert_eq!(sim.applied["us-west-1"].canary, None);
    let told: Vec<(&str, &str)> = (sim.history.iter())
        .filter(|e| matches!(e.what, What::RollbackStarted | What::RolledBack))
        .map(|e| (e.actor.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        told,
        [("bob", "superseded by demo-2 (v3)"), ("bob", reason)]
    );
    // A rollback under way (its agents gone, say) ends as well.
    let mut sim = at_the_first_step();
    sim.agents_up.insert("us-west-1".into(), false);
    sim.operator(Action::Abort);
    sim.engine.supersede(sim.now, "bob", "demo-2 (v3)");
    assert!(sim.engine.state().phase.is_terminal());
}

#[test]
fn an_ended_release_hears_nothing_more_not_a_late_webhook_answer() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    sim.hooks_ok = false;
    sim.drain();
    assert!(
        sim.engine.state().pre_rollout_awaiting.is_some(),
        "its pre-rollout hook called"
    );
    sim.engine.supersede(sim.now, "bob", "demo-2 (v3)");
    let ended = sim.engine.state().phase.clone();
    assert!(ended.is_terminal());
    // The hook's failure comes after: the release is not taken up again.
    sim.run_until(TimeDelta::minutes(1), |_| false);
    assert_eq!(sim.engine.state().phase, ended);
}

#[test]
fn a_region_rolled_back_by_its_policy_finishes_after_the_release_is_resumed() {
    let mut sim = Sim::new(
        manifest("linear-berlin-window"),
        spec(Some("test")),
        monday_morning(),
    );
    sim.v2_error_rate = 0.05;
    assert!(sim.run_until(TimeDelta::hours(1), |s| {
        matches!(s.engine.state().phase, Phase::Paused { .. })
    }));
    // Resumed at once, before the agents have applied the rollback.
    assert_eq!(
        sim.engine.state().regions["eu-central-1"].status,
        RegionStatus::RollingBack
    );
    sim.operator(Action::Resume);
    assert!(sim.run_until(TimeDelta::minutes(1), |s| {
        s.engine.state().regions["eu-central-1"].status == RegionStatus::RolledBack
    }));
    // Its wave has ended with no region on v2: the release goes no further and does not
    // succeed (it did, and the next release started from v2, which no region ran).
    assert!(sim.run_to_end(TimeDelta::hours(3)));
    let Phase::RolledBack { reason } = &sim.engine.state().phase else {
        panic!("{:?}", sim.engine.state().phase);
    };
    assert!(
        reason.starts_with("eu-central-1 rolled back under on_failure: rollback_region, so v2 cannot be live in every region"),
        "{reason}"
    );
    assert!(
        sim.weights("eu-west-1").is_empty(),
        "the next wave never began"
    );
    assert_eq!(sim.applied["eu-central-1"].stable, "v1");
}

#[test]
fn a_later_step_that_never_comes_into_force_fails_its_region_at_the_progress_deadline() {
    // The first step in force; the second never (its agents report seq 0, not ready, saying
    // why, as real agents do), though an earlier seq was applied.
    let mut sim = at_the_first_step();
    sim.v2_ready = false;
    assert!(sim.run_until(TimeDelta::days(1), failed));
    let (_, why) = failures(&sim).remove(0);
    assert!(
        why.starts_with("us-west-1 waited 10m (progress_deadline) for step 2/4 to be applied and ready; the agents say: "),
        "{why}"
    );
}
