//! Releases and events for people (tables, lines) and for tools (JSON).

use chrono::DateTime;
use comfy_table::{Table, presets};
use fleet_proto::v1 as pb;
use serde_json::{Value, json};

pub fn release_json(r: &pb::Release) -> Value {
    json!({
        "id": r.id, "service": r.service, "from_version": r.from_version, "to_version": r.to_version,
        "phase": r.phase, "reason": r.reason, "wave": r.wave, "wave_state": r.wave_state,
        "started_at_ms": r.started_at_ms, "emergency_reason": r.emergency_reason, "gate": r.gate,
        "regions": r.regions.iter().map(|g| json!({
            "region": g.region, "status": g.status, "step": g.step, "steps": g.steps,
            "step_label": g.step_label, "canary_weight_bp": g.canary_weight_bp,
            "reachable": g.reachable, "last_verdict": g.last_verdict, "hold_until_ms": g.hold_until_ms,
            "waiting": g.waiting, "deadline_ms": g.deadline_ms, "in_force": g.in_force,
        })).collect::<Vec<_>>(),
    })
}

pub fn event_json(e: &pb::ReleaseEvent) -> Value {
    let detail: Value = serde_json::from_str(&e.detail_json).unwrap_or(Value::Null);
    json!({
        "release_id": e.release_id, "index": e.index, "at_ms": e.at_ms, "actor": e.actor,
        "region": e.region, "kind": e.kind, "reason": e.reason, "detail": detail,
    })
}

pub fn fleet_json(f: &pb::Fleet) -> Value {
    json!({ "service": f.service, "regions": f.regions, "waves": f.waves, "applied_at_ms": f.applied_at_ms })
}

/// The controller's diagnostics of a manifest, for scripts.
pub fn diagnostics_json(diagnostics: &[pb::Diagnostic]) -> Value {
    (diagnostics.iter())
        .map(|d| {
            json!({
                "severity": d.severity, "line": d.line, "column": d.column, "path": d.path,
                "message": d.message, "help": d.help,
            })
        })
        .collect()
}

/// `fleet_json`, with the manifest as applied.
pub fn fleet_json_with_manifest(f: &pb::Fleet) -> Value {
    let mut v = fleet_json(f);
    v["manifest"] = json!(f.manifest);
    v
}

pub fn fleet_list(fleets: &[pb::Fleet], now_ms: i64) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(["SERVICE", "REGIONS", "WAVES", "APPLIED"]);
    for f in fleets {
        table.add_row([
            f.service.clone(),
            f.regions.join(","),
            f.waves.join(" → "),
            format!("{} ago", age(now_ms, f.applied_at_ms)),
        ]);
    }
    format!("{table}\n")
}

pub fn fleet_status(f: &pb::Fleet, now_ms: i64) -> String {
    format!(
        "fleet {}: applied {} ago\nregions: {}\nwaves: {}\n",
        f.service,
        age(now_ms, f.applied_at_ms),
        f.regions.join(", "),
        f.waves.join(" → ")
    )
}

/// How long before `now_ms` `at_ms` was, in its two largest units: "1h 2m", "3days 4h".
pub fn age(now_ms: i64, at_ms: i64) -> String {
    let secs = u64::try_from((now_ms - at_ms) / 1000).unwrap_or(0);
    let full = humantime::format_duration(std::time::Duration::from_secs(secs)).to_string();
    full.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

pub fn event_line(e: &pb::ReleaseEvent) -> String {
    let at = DateTime::from_timestamp_millis(e.at_ms)
        .map(|t| t.format("%H:%M:%S").to_string())
        .unwrap_or_default();
    let region = if e.region.is_empty() {
        "-"
    } else {
        e.region.as_str()
    };
    format!(
        "{at}  {region:<14} {:<18} {}  [{}]",
        e.kind, e.reason, e.actor
    )
}

pub fn release_list(releases: &[pb::Release]) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(["ID", "SERVICE", "FROM", "TO", "PHASE", "WAVE"]);
    for r in releases {
        table.add_row([
            &r.id,
            &r.service,
            &r.from_version,
            &r.to_version,
            &r.phase,
            &r.wave,
        ]);
    }
    lines(&table)
}

pub fn release_status(r: &pb::Release) -> String {
    let mut out = format!(
        "release {}: {} {} → {}, {}",
        r.id, r.service, r.from_version, r.to_version, r.phase
    );
    if !r.reason.is_empty() {
        out += &format!(" ({})", r.reason);
    }
    out += &format!("\nwave {} ({})\n", r.wave, r.wave_state);
    if !r.gate.is_empty() {
        out += &format!(
            "gate {}: `fleetctl release promote {} --gate {}` passes it, and no other\n",
            r.gate, r.id, r.gate
        );
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(["REGION", "STATUS", "STEP", "CANARY", "LAST VERDICT"]);
    for g in &r.regions {
        let step = if g.steps == 0 {
            String::new()
        } else {
            let at = format!("{}/{}", (g.step + 1).min(g.steps), g.steps);
            // A canary's own count ("step 1/4", after a mirror phase) would be a second count
            // beside the region's; the share is in CANARY. Other labels say what the step is.
            match g.step_label.starts_with("step ") {
                true => at,
                false => format!("{at} {}", g.step_label),
            }
        };
        let status = match (g.reachable, g.deadline_ms) {
            (false, _) => format!("{} (unreachable)", g.status),
            (true, 0) => g.status.clone(),
            (true, _) => format!("{} (not ready)", g.status),
        };
        // The share sent; until it is in force the proxies serve the one before.
        let canary = match (g.canary_weight_bp, g.in_force, g.status.as_str()) {
            (1.., false, "entering" | "active" | "promoting") => {
                format!("{} (sent)", percent(g.canary_weight_bp))
            }
            _ => percent(g.canary_weight_bp),
        };
        table.add_row([
            g.region.clone(),
            status,
            step,
            canary,
            g.last_verdict.clone(),
        ]);
    }
    out += &lines(&table);
    for g in r.regions.iter().filter(|g| g.deadline_ms > 0) {
        let at = DateTime::from_timestamp_millis(g.deadline_ms)
            .map(|t| t.format("%H:%M:%S UTC").to_string())
            .unwrap_or_default();
        out += &format!(
            "{} is not ready ({}); it fails at {at} unless ready by then\n",
            g.region, g.waiting
        );
    }
    // A pause holds the steps, not the checks of a step in force: say what stays exposed
    // meanwhile, and whether it is checked.
    if r.phase == "paused" {
        for g in r.regions.iter().filter(|g| g.canary_weight_bp > 0) {
            let checked = match g.status.as_str() {
                "active" if g.in_force => {
                    "its checks go on (a failure is acted on as on_failure says)"
                }
                "failed" => "held after its failure, unchecked",
                _ => "unchecked until its step is in force (applied and ready)",
            };
            out += &format!(
                "{} keeps {} of its traffic on {} while paused: {checked}; its steps wait for \
                 resume\n",
                g.region,
                percent(g.canary_weight_bp),
                r.to_version
            );
        }
    }
    let rolling_back = |g: &&pb::RegionProgress| g.status == "rolling_back";
    // What else a region waits for: its agents' first report, an operator's promote.
    for g in (r.regions.iter())
        .filter(|g| g.deadline_ms == 0 && !g.waiting.is_empty() && !rolling_back(g))
    {
        out += &format!("{} waits: {}\n", g.region, g.waiting);
    }
    for g in r
        .regions
        .iter()
        .filter(rolling_back)
        .filter(|g| !g.waiting.is_empty())
    {
        out += &format!(
            "{} is rolling back, not yet in force ({})\n",
            g.region, g.waiting
        );
    }
    out
}

pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "region": a.region, "cluster": a.cluster, "connected": a.connected,
        "agent_version": a.agent_version, "driver": a.driver,
        "connected_at_ms": a.connected_at_ms, "reported_at_ms": a.reported_at_ms,
        "release_id": a.release_id, "applied_seq": a.applied_seq, "ready": a.ready,
        "detail": a.detail, "unnamed": a.unnamed,
    })
}

/// The agents as a table, their times told as ages at `now_ms`.
pub fn agent_list(agents: &[pb::Agent], now_ms: i64) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header([
        "REGION", "CLUSTER", "AGENT", "VERSION", "DRIVER", "REPORTED", "STATE",
    ]);
    let age = |at_ms: i64| age(now_ms, at_ms);
    for a in agents {
        if !a.connected {
            table.add_row([&a.region, &a.cluster, "none", "", "", "", ""]);
            continue;
        }
        let reported = match a.reported_at_ms {
            0 => "never".to_string(),
            at => format!("{} ago", age(at)),
        };
        // With what the agent says, in force or not (an autoscaler that cannot scale).
        let (state, then) = match (a.release_id.as_str(), a.ready) {
            ("", _) => ("no desired state".to_string(), None),
            (release, true) => (format!("{release} #{} in force", a.applied_seq), Some("; ")),
            (release, false) => (format!("{release}: not in force"), Some(": ")),
        };
        let state = match (then, a.detail.as_str()) {
            (Some(then), detail) if !detail.is_empty() => format!("{state}{then}{detail}"),
            _ => state,
        };
        let state = match a.unnamed {
            true => format!("no manifest names it: sent nothing; holds {state}"),
            false => state,
        };
        table.add_row([
            a.region.as_str(),
            &a.cluster,
            &format!("connected {}", age(a.connected_at_ms)),
            &a.agent_version,
            &a.driver,
            &reported,
            &state,
        ]);
    }
    lines(&table)
}

pub fn percent(bp: u32) -> String {
    let s = format!("{:.2}", f64::from(bp) / 100.0);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

fn lines(table: &Table) -> String {
    table
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `table` without the one-space margin each of its lines begins with (expect-test
    /// takes a margin common to every line for its own indentation).
    fn without_margin(table: &str) -> String {
        (table.lines())
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect()
    }

    #[test]
    fn a_region_that_waits_says_for_what_under_the_table() {
        let region = |name: &str, status: &str, waiting: &str, deadline_ms| pb::RegionProgress {
            region: name.into(),
            status: status.into(),
            waiting: waiting.into(),
            deadline_ms,
            ..Default::default()
        };
        let release = pb::Release {
            id: "demo-1".into(),
            regions: vec![
                region(
                    "us-west",
                    "active",
                    "an indefinite pause: `fleetctl release promote` passes it",
                    0,
                ),
                region(
                    "us-east",
                    "active",
                    "the agents say: crashed",
                    1_800_000_000_000,
                ),
                region(
                    "eu-west",
                    "rolling_back",
                    "the agents have not applied it yet",
                    0,
                ),
                region("ap-south", "pending", "", 0),
            ],
            ..Default::default()
        };
        let out = release_status(&release);
        let told: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with(' '))
            .skip_while(|l| !l.contains(" is not ready") && !l.contains(" waits: "))
            .collect();
        assert_eq!(
            told,
            [
                "us-east is not ready (the agents say: crashed); it fails at 08:00:00 UTC unless ready by then",
                "us-west waits: an indefinite pause: `fleetctl release promote` passes it",
                "eu-west is rolling back, not yet in force (the agents have not applied it yet)",
            ],
            "{out}"
        );
    }

    #[test]
    fn a_canary_share_sent_but_not_in_force_is_marked_sent() {
        let region = |name: &str, in_force| pb::RegionProgress {
            region: name.into(),
            status: "active".into(),
            canary_weight_bp: 5000,
            in_force,
            reachable: true,
            ..Default::default()
        };
        let release = pb::Release {
            id: "demo-1".into(),
            regions: vec![region("us-west", true), region("us-east", false)],
            ..Default::default()
        };
        let out = release_status(&release);
        let cells = |name: &str| {
            let row = out
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap();
            row.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(cells("us-west"), "50%", "{out}");
        assert_eq!(cells("us-east"), "50% (sent)", "{out}");
    }

    #[test]
    fn an_applys_warnings_are_in_its_json() {
        let warning = pb::Diagnostic {
            severity: "warning".into(),
            line: 12,
            column: 15,
            path: "regions[0].clusters".into(),
            message: "cluster usw-a of region us-west is named no longer".into(),
            help: "…".into(),
        };
        let json = diagnostics_json(&[warning]);
        assert_eq!(json[0]["path"], "regions[0].clusters");
        assert_eq!(
            (json[0]["line"].as_u64(), json[0]["column"].as_u64()),
            (Some(12), Some(15))
        );
        assert_eq!(diagnostics_json(&[]), json!([]));
    }

    #[test]
    fn a_step_is_counted_once() {
        let region = |name: &str, step, steps, label: &str| pb::RegionProgress {
            region: name.into(),
            status: "active".into(),
            step,
            steps,
            step_label: label.into(),
            reachable: true,
            in_force: true,
            ..Default::default()
        };
        let release = pb::Release {
            regions: vec![
                region("us-west", 0, 3, "step 1/3"),
                // After a mirror phase, the canary's first step is the region's second: one
                // count.
                region("us-east", 1, 4, "step 1/3"),
                region("eu-west", 1, 2, "switch"),
            ],
            ..Default::default()
        };
        let out = release_status(&release);
        let step = |name: &str| {
            let row = out
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap();
            let cells: Vec<&str> = row.split_whitespace().skip(2).collect();
            cells[..cells.len() - 1].join(" ")
        };
        assert_eq!(step("us-west"), "1/3", "{out}");
        assert_eq!(step("us-east"), "2/4", "{out}");
        assert_eq!(step("eu-west"), "2/2 switch", "{out}");
    }

    #[test]
    fn a_release_at_a_gate_names_it_and_the_promote_that_passes_it_alone() {
        let mut release = pb::Release {
            id: "demo-1".into(),
            gate: "step:us-west=2".into(),
            ..Default::default()
        };
        let gate = |r: &pb::Release| {
            (release_status(r).lines())
                .filter(|l| l.starts_with("gate "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            gate(&release),
            [
                "gate step:us-west=2: `fleetctl release promote demo-1 --gate step:us-west=2` passes it, and no other"
            ]
        );
        assert_eq!(release_json(&release)["gate"], "step:us-west=2");
        release.gate.clear();
        assert!(gate(&release).is_empty());
    }

    #[test]
    fn a_paused_release_says_which_regions_stay_exposed_and_checked() {
        let region = |name: &str, canary_weight_bp| pb::RegionProgress {
            region: name.into(),
            status: "active".into(),
            canary_weight_bp,
            in_force: true,
            ..Default::default()
        };
        let mut release = pb::Release {
            id: "demo-6".into(),
            to_version: "v6".into(),
            phase: "paused".into(),
            reason: "paused by alice: hold at 10%".into(),
            regions: vec![region("us-west", 1000), region("us-east", 0)],
            ..Default::default()
        };
        let mut held = region("eu-west", 500);
        held.status = "failed".into();
        let mut starting = region("ap-south", 500);
        starting.waiting = "applied, but its workloads are not ready".into();
        starting.in_force = false;
        let exposed = |r: &pb::Release| {
            (release_status(r).lines())
                .filter(|l| l.contains("while paused"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            exposed(&release),
            [
                "us-west keeps 10% of its traffic on v6 while paused: its checks go on (a failure is acted on as on_failure says); its steps wait for resume"
            ]
        );
        release.regions = vec![held, starting];
        assert_eq!(
            exposed(&release),
            [
                "eu-west keeps 5% of its traffic on v6 while paused: held after its failure, unchecked; its steps wait for resume",
                "ap-south keeps 5% of its traffic on v6 while paused: unchecked until its step is in force (applied and ready); its steps wait for resume",
            ]
        );
        release.phase = "progressing".into();
        assert!(exposed(&release).is_empty());
    }

    #[test]
    fn agents_are_shown_with_their_ages_and_what_they_last_said() {
        let now = 1_800_000_000_000;
        let agent = |cluster: &str, ready: bool, detail: &str| pb::Agent {
            region: "us-west".into(),
            cluster: cluster.into(),
            connected: true,
            agent_version: "0.1.0".into(),
            driver: "kubernetes".into(),
            connected_at_ms: now - 3_723_000,
            reported_at_ms: now - 1_000,
            release_id: "checkout-4".into(),
            applied_seq: 2,
            ready,
            detail: detail.into(),
            unnamed: false,
        };
        let agents = [
            agent("usw-a", true, ""),
            agent("usw-b", false, "v2: 1/3 ready"),
            agent("usw-c", true, "autoscaler checkout-v2 cannot scale"),
            pb::Agent {
                region: "eu-west".into(),
                cluster: "euw-a".into(),
                ..Default::default()
            },
            pb::Agent {
                unnamed: true,
                ..agent("usw-old", true, "")
            },
        ];
        expect_test::expect![[r#"
            REGION   CLUSTER  AGENT            VERSION  DRIVER      REPORTED  STATE
            us-west  usw-a    connected 1h 2m  0.1.0    kubernetes  1s ago    checkout-4 #2 in force
            us-west  usw-b    connected 1h 2m  0.1.0    kubernetes  1s ago    checkout-4: not in force: v2: 1/3 ready
            us-west  usw-c    connected 1h 2m  0.1.0    kubernetes  1s ago    checkout-4 #2 in force; autoscaler checkout-v2 cannot scale
            eu-west  euw-a    none
            us-west  usw-old  connected 1h 2m  0.1.0    kubernetes  1s ago    no manifest names it: sent nothing; holds checkout-4 #2 in force
        "#]]
        .assert_eq(&without_margin(&agent_list(&agents, now)));
    }
}
