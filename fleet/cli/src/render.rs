//! Releases and events for people (tables, lines) and for tools (JSON).

use chrono::DateTime;
use comfy_table::{Table, presets};
use fleet_proto::v1 as pb;
use serde_json::{Value, json};

pub fn release_json(r: &pb::Release) -> Value {
    json!({
        "id": r.id, "service": r.service, "from_version": r.from_version, "to_version": r.to_version,
        "phase": r.phase, "reason": r.reason, "wave": r.wave, "wave_state": r.wave_state,
        "started_at_ms": r.started_at_ms, "emergency_reason": r.emergency_reason,
        "regions": r.regions.iter().map(|g| json!({
            "region": g.region, "status": g.status, "step": g.step, "steps": g.steps,
            "step_label": g.step_label, "canary_weight_bp": g.canary_weight_bp,
            "reachable": g.reachable, "last_verdict": g.last_verdict, "hold_until_ms": g.hold_until_ms,
            "waiting": g.waiting, "deadline_ms": g.deadline_ms,
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
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(["REGION", "STATUS", "STEP", "CANARY", "LAST VERDICT"]);
    for g in &r.regions {
        let step = if g.steps == 0 {
            String::new()
        } else {
            format!("{}/{} {}", (g.step + 1).min(g.steps), g.steps, g.step_label)
        };
        let status = match (g.reachable, g.deadline_ms) {
            (false, _) => format!("{} (unreachable)", g.status),
            (true, 0) => g.status.clone(),
            (true, _) => format!("{} (not ready)", g.status),
        };
        table.add_row([
            g.region.clone(),
            status,
            step,
            percent(g.canary_weight_bp),
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
    let rolling_back = |g: &&pb::RegionProgress| g.status == "rolling_back";
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
