//! Between the engine's domain types and the fleet.v1 wire types; the only place that does.

use fleet::Manifest;
use fleet::model::Compare;
use fleet_engine::output::StickyKey;
use fleet_engine::{
    Desired, Engine, Histogram, HistoryEvent, Phase, RegionState, RegionStats, TrackStats,
    WaveState,
};
use fleet_proto::v1 as pb;

pub fn desired(epoch: u64, manifest: &Manifest, d: &Desired) -> pb::DesiredState {
    let traffic = &d.traffic;
    pb::DesiredState {
        epoch,
        seq: d.seq,
        release_id: d.release.clone(),
        service: manifest.service.name.clone(),
        stable: Some(pb::Track {
            version: d.stable.clone(),
            replicas: d.replicas,
        }),
        canary: d.canary.as_ref().map(|version| pb::Track {
            version: version.clone(),
            replicas: d.replicas,
        }),
        routes: Some(pb::RouteTable {
            host: manifest.service.host.clone(),
            path_prefix: manifest.service.path.clone(),
            canary_weight_bp: u32::from(u16::from(traffic.canary_weight)),
            cohort: traffic
                .cohort
                .iter()
                .map(|c| pb::CohortRule {
                    on: c.on.clone(),
                    name: c.name.clone(),
                    test: c.test.clone(),
                    value: c.value.clone(),
                })
                .collect(),
            mirror_bp: traffic.mirror.map_or(0, |m| u32::from(u16::from(m))),
            mirror_compare: match traffic.mirror_compare {
                None => pb::MirrorCompare::None,
                Some(Compare::Status) => pb::MirrorCompare::Status,
                Some(Compare::Body) => pb::MirrorCompare::Body,
            }
            .into(),
            sticky: traffic.sticky.as_ref().map(|s| match s {
                StickyKey::Cookie(c) => pb::route_table::Sticky::StickyCookie(c.clone()),
                StickyKey::Header(h) => pb::route_table::Sticky::StickyHeader(h.clone()),
            }),
        }),
        workload: Some(pb::Workload {
            image: manifest.service.workload.image.clone().unwrap_or_default(),
            command: manifest
                .service
                .workload
                .command
                .clone()
                .unwrap_or_default(),
            health_check: manifest.service.health_check.clone(),
            cpu: (manifest.service.workload.resources.cpu.clone()).unwrap_or_default(),
            memory: (manifest.service.workload.resources.memory.clone()).unwrap_or_default(),
            run_as_user: manifest.service.workload.run_as_user.unwrap_or(0),
            autoscale: manifest.service.workload.autoscale.map(|a| pb::Autoscale {
                min: a.min,
                max: a.max,
                cpu_percent: a.cpu_percent,
            }),
        }),
    }
}

/// A release's phase as the API names it.
pub fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Progressing => "progressing",
        Phase::Paused { .. } => "paused",
        Phase::RollingBack { .. } => "rolling_back",
        Phase::Succeeded => "succeeded",
        Phase::RolledBack { .. } => "rolled_back",
    }
}

pub fn release(id: &str, started_at_ms: i64, engine: &Engine) -> pb::Release {
    let state = engine.state();
    let phase = phase_name(&state.phase);
    let reason = match &state.phase {
        Phase::Paused { reason, .. }
        | Phase::RollingBack { reason }
        | Phase::RolledBack { reason } => reason.clone(),
        // Why its next wave has not started (an approval, a window), while it waits.
        Phase::Progressing => match state.wave_state {
            WaveState::Waiting { .. } => state.waiting_note.clone().unwrap_or_default(),
            _ => String::new(),
        },
        Phase::Succeeded => String::new(),
    };
    let manifest = engine.manifest();
    // A release that has ended left its last wave as it was; say it ended with it.
    let wave_state = match (&state.phase, &state.wave_state) {
        (Phase::Succeeded, _) => "done",
        (Phase::RolledBack { .. }, _) => "stopped",
        (_, WaveState::Waiting { .. }) => "waiting",
        (_, WaveState::Running) => "running",
        (_, WaveState::Baking { .. }) => "baking",
    };
    let regions = manifest
        .waves
        .iter()
        .flat_map(|w| &w.regions)
        .filter_map(|name| state.regions.get(name).map(|r| (name, r)))
        .map(|(name, r)| {
            let steps = engine.steps_of(name);
            let weight = r
                .desired
                .as_ref()
                .filter(|d| d.canary.is_some())
                .map_or(0, |d| u16::from(d.traffic.canary_weight));
            pb::RegionProgress {
                region: name.clone(),
                status: serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                step: u32::try_from(r.step).unwrap_or(u32::MAX),
                steps: u32::try_from(steps.len()).unwrap_or(u32::MAX),
                step_label: steps
                    .get(r.step)
                    .map(|s| s.label.clone())
                    .unwrap_or_default(),
                canary_weight_bp: u32::from(weight),
                reachable: r.reachable,
                last_verdict: r.last_verdict.clone().unwrap_or_default(),
                hold_until_ms: r.hold_until.map_or(0, |t| t.timestamp_millis()),
                waiting: r
                    .waiting_for()
                    .or_else(|| {
                        let progressing = state.phase == Phase::Progressing;
                        waits_for_operator(r, steps.get(r.step), progressing)
                    })
                    .unwrap_or_default(),
                // The deadline's clock stands still while the release is paused.
                deadline_ms: (r.deadline(manifest.progress_deadline))
                    .filter(|_| state.phase == Phase::Progressing)
                    .map_or(0, |t| t.timestamp_millis()),
                in_force: r.applied(),
            }
        })
        .collect();
    pb::Release {
        id: id.to_string(),
        service: state.spec.service.clone(),
        from_version: state.spec.from_version.clone(),
        to_version: state.spec.to_version.clone(),
        phase: phase.into(),
        reason,
        wave: manifest
            .waves
            .get(state.wave)
            .map(|w| w.name.clone())
            .unwrap_or_default(),
        wave_state: wave_state.into(),
        regions,
        started_at_ms,
        emergency_reason: state.spec.emergency.clone().unwrap_or_default(),
        gate: engine.gate().unwrap_or_default(),
    }
}

pub fn event(id: &str, index: u64, e: &HistoryEvent) -> pb::ReleaseEvent {
    let detail = serde_json::to_value(&e.what).unwrap_or_default();
    let kind = detail["kind"].as_str().unwrap_or_default().to_string();
    pb::ReleaseEvent {
        release_id: id.to_string(),
        index,
        at_ms: e.at.timestamp_millis(),
        actor: e.actor.clone(),
        region: e.region.clone().unwrap_or_default(),
        kind,
        reason: e.reason.clone(),
        detail_json: detail.to_string(),
    }
}

/// The counters of a region, counted since `since_unix_ms`.
pub fn stats(s: &pb::TrafficStats, since_unix_ms: u64) -> RegionStats {
    let track = |t: &Option<pb::TrackStats>| {
        let t = t.clone().unwrap_or_default();
        TrackStats {
            requests: t.requests,
            errors: t.errors,
            latency: Histogram {
                bounds_ms: t.latency_bounds_ms,
                counts: t.latency_counts,
            },
            counting_since_unix_ms: since_unix_ms,
            compared: t.compared,
            differed: t.differed,
        }
    };
    RegionStats {
        stable: track(&s.stable),
        canary: track(&s.canary),
        external: Default::default(),
    }
}

pub fn diagnostic(d: &fleet::Diagnostic) -> pb::Diagnostic {
    pb::Diagnostic {
        severity: format!("{:?}", d.severity).to_lowercase(),
        line: u32::try_from(d.line).unwrap_or(u32::MAX),
        column: u32::try_from(d.column).unwrap_or(u32::MAX),
        path: d.path.clone(),
        message: d.message.clone(),
        help: d.help.clone(),
    }
}

/// What a region in progress waits for that is no fault: its agents' first report on what
/// was sent it (none may be connected), or an operator's promote at an indefinite pause. Pure.
fn waits_for_operator(
    r: &RegionState,
    step: Option<&fleet::steps::Step>,
    progressing: bool,
) -> Option<String> {
    if !r.in_progress() {
        return None;
    }
    if r.desired.is_some() && !r.reachable {
        return Some(
            "not every one of its agents is connected; it holds where it is until they are (`fleetctl agents` shows which)"
                .into(),
        );
    }
    if r.desired.is_some() && !r.heard {
        return Some(
            "its agents have not reported since its desired state was sent (`fleetctl agents` shows which are connected)"
                .into(),
        );
    }
    let indefinite = step.is_some_and(|s| s.hold == fleet::model::Pause::Indefinite);
    (progressing && r.reachable && r.promotable() && indefinite)
        .then(|| "an indefinite pause: `fleetctl release promote` passes it".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_whose_next_wave_waits_says_for_what() {
        let first = "  - name: first\n    regions: [us-west]\n";
        let src = include_str!("../../deploy/examples/quick.yaml")
            .replace(first, &format!("{first}    approval: required\n"));
        let manifest = std::sync::Arc::new(fleet::load(&src).unwrap().manifest);
        let engine = Engine::start(manifest, crate::demo_1(), chrono::Utc::now());
        let r = release("demo-1", 0, &engine);
        assert_eq!(
            (r.phase.as_str(), r.wave_state.as_str(), r.reason.as_str()),
            (
                "progressing",
                "waiting",
                "wave first waits for approval (fleetctl release promote)"
            )
        );
    }

    #[test]
    fn a_region_in_progress_says_what_it_waits_for_that_is_no_fault() {
        let src = include_str!("../../deploy/examples/quick.yaml");
        let manifest = std::sync::Arc::new(fleet::load(src).unwrap().manifest);
        let engine = Engine::start(manifest, crate::demo_1(), chrono::Utc::now());
        let mut r = engine.state().regions["eu-west"].clone();
        assert_eq!(waits_for_operator(&r, None, true), None, "pending");
        let indefinite = fleet::steps::Step {
            label: "50%".into(),
            phase: fleet::steps::Phase::Weight,
            weight: fleet::model::Weight::from_percent(50.0).unwrap(),
            hold: fleet::model::Pause::Indefinite,
        };
        r.status = fleet_engine::RegionStatus::Active;
        r.desired = Some(Desired {
            seq: 3,
            release: "demo-1".into(),
            stable: "v1".into(),
            canary: Some("v2".into()),
            replicas: 1,
            traffic: fleet_engine::Traffic::default(),
        });
        r.reachable = false;
        let said = waits_for_operator(&r, Some(&indefinite), true).unwrap();
        assert!(
            said.starts_with("not every one of its agents is connected"),
            "{said}"
        );
        r.reachable = true;
        let said = waits_for_operator(&r, Some(&indefinite), true).unwrap();
        assert!(said.starts_with("its agents have not reported"), "{said}");
        (r.heard, r.applied_seq, r.ready) = (true, 3, true);
        assert_eq!(
            waits_for_operator(&r, Some(&indefinite), true).as_deref(),
            Some("an indefinite pause: `fleetctl release promote` passes it")
        );
        let timed = fleet::steps::Step {
            hold: fleet::model::Pause::None,
            ..indefinite.clone()
        };
        assert_eq!(waits_for_operator(&r, Some(&timed), true), None);
        assert_eq!(
            waits_for_operator(&r, Some(&indefinite), false),
            None,
            "paused"
        );
        r.promote_requested = true;
        assert_eq!(
            waits_for_operator(&r, Some(&indefinite), true),
            None,
            "promoted"
        );
    }

    #[test]
    fn the_workload_reaches_agents_with_its_resources_user_and_autoscaler() {
        let src = include_str!("../../deploy/examples/multi-region-canary.yaml").replace(
            "    replicas: 3\n",
            "    resources: { cpu: 250m, memory: 256Mi }\n    autoscale: { min: 2, max: 20 }\n",
        );
        let manifest = fleet::load(&src).expect("valid").manifest;
        let d = Desired {
            seq: 1,
            release: "checkout-1".into(),
            stable: "v1".into(),
            canary: Some("v2".into()),
            replicas: manifest.service.workload.replicas,
            traffic: Default::default(),
        };
        let sent = desired(7, &manifest, &d);
        let workload = sent.workload.expect("a workload");
        assert_eq!(
            (workload.cpu.as_str(), workload.memory.as_str()),
            ("250m", "256Mi")
        );
        assert_eq!(workload.run_as_user, 65532);
        let autoscale = pb::Autoscale {
            min: 2,
            max: 20,
            cpu_percent: 70,
        };
        assert_eq!(workload.autoscale, Some(autoscale));
        let tracks = [sent.stable, sent.canary].map(|t| t.map(|t| t.replicas));
        assert_eq!(tracks, [Some(2), Some(2)], "each track starts at min");
    }
}
