//! The releases under way, as Prometheus gauges for dashboards and alerts: each release's
//! phase, and each region's status, step, share of traffic on the new version, reachability,
//! and, while it waits for a step, when it will fail (`progress_deadline`). Releases that
//! ended are left out (the caller gives only those under way), so the series come and go with
//! releases and do not pile up; the count by phase (`fleet_controller_releases`) counts every
//! release the controller keeps (`--keep-releases`).

use std::fmt::Write;

use fleet_proto::admin::escape;
use fleet_proto::v1 as pb;

use super::head;

/// Writes the gauges of `running`, the releases under way.
pub fn write(out: &mut String, running: &[pb::Release]) {
    let info = "fleet_controller_release_info";
    head(
        out,
        info,
        "gauge",
        "A release under way (1), with what it releases and its phase.",
    );
    for r in running {
        let _ = writeln!(
            out,
            "{info}{{release=\"{}\",service=\"{}\",from=\"{}\",to=\"{}\",phase=\"{}\"}} 1",
            escape(&r.id),
            escape(&r.service),
            escape(&r.from_version),
            escape(&r.to_version),
            r.phase
        );
    }
    let rows: Vec<(String, &pb::RegionProgress)> = running
        .iter()
        .flat_map(|r| r.regions.iter().map(move |g| (labels(r, g), g)))
        .collect();
    let regions = || rows.iter().map(|(labels, g)| (labels, *g));
    let status = "fleet_controller_region_status";
    head(
        out,
        status,
        "gauge",
        "A region's status in a release under way (1).",
    );
    for (labels, g) in regions() {
        let _ = writeln!(out, "{status}{{{labels},status=\"{}\"}} 1", g.status);
    }
    let step = "fleet_controller_region_step";
    let help = "The step a region is at, from 1 (0 before the release reaches it); above the \
                steps it has once promoting.";
    head(out, step, "gauge", help);
    for (labels, g) in regions() {
        let at = if g.status == "pending" { 0 } else { g.step + 1 };
        let _ = writeln!(out, "{step}{{{labels}}} {at}");
    }
    let share = "fleet_controller_region_canary_percent";
    let help = "Share of a region's traffic on the new version, in percent.";
    head(out, share, "gauge", help);
    for (labels, g) in regions() {
        // Promoting, the new version becomes the stable one: all of the traffic.
        let percent = match g.status.as_str() {
            "promoting" | "succeeded" => 100.0,
            _ => f64::from(g.canary_weight_bp) / 100.0,
        };
        let _ = writeln!(out, "{share}{{{labels}}} {percent}");
    }
    let reachable = "fleet_controller_region_reachable";
    let help = "1 while every cluster of a region has its agent connected.";
    head(out, reachable, "gauge", help);
    for (labels, g) in regions() {
        let _ = writeln!(out, "{reachable}{{{labels}}} {}", u8::from(g.reachable));
    }
    let deadline = "fleet_controller_region_deadline_seconds";
    let help = "When a region waiting for its step fails unless the step is applied and ready by \
                then (Unix time); only while it waits.";
    head(out, deadline, "gauge", help);
    for (labels, g) in regions().filter(|(_, g)| g.deadline_ms > 0) {
        let at = g.deadline_ms as f64 / 1000.0;
        let _ = writeln!(out, "{deadline}{{{labels}}} {at}");
    }
}

fn labels(r: &pb::Release, g: &pb::RegionProgress) -> String {
    format!(
        "release=\"{}\",service=\"{}\",region=\"{}\"",
        escape(&r.id),
        escape(&r.service),
        escape(&g.region)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use fleet_engine::{Engine, Event, ReleaseSpec};

    use super::*;

    #[test]
    fn a_waiting_region_shows_its_step_share_and_deadline() {
        let manifest = fleet::load(include_str!("../../../tests/e2e/fleet.yaml"))
            .expect("valid")
            .manifest;
        let spec = ReleaseSpec {
            id: "e2e-1".into(),
            service: "e2e".into(),
            from_version: "v1".into(),
            to_version: "v\"2".into(),
            emergency: None,
            actor: "alice".into(),
        };
        let t0 = Utc
            .with_ymd_and_hms(2026, 12, 6, 9, 0, 0)
            .single()
            .expect("a time");
        let mut engine = Engine::start(Arc::new(manifest), spec, t0);
        engine.handle_timeout(t0);
        let seq = engine.state().regions["us-west"]
            .desired
            .as_ref()
            .map(|d| d.seq);
        let applied = Event::Applied {
            region: "us-west".into(),
            seq: seq.expect("sent"),
            ready: false,
            detail: "usw-a: v2: 0/1 ready (starting)".into(),
        };
        engine.handle(t0, applied);
        let release = crate::convert::release("e2e-1", 0, &engine);
        let mut out = String::new();
        write(&mut out, std::slice::from_ref(&release));
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        let west = r#"release="e2e-1",service="e2e",region="us-west""#;
        let east = r#"release="e2e-1",service="e2e",region="us-east""#;
        let deadline = (t0.timestamp() + 600) as f64;
        for sample in [
            r#"fleet_controller_release_info{release="e2e-1",service="e2e",from="v1",to="v\"2",phase="progressing"} 1"#.to_string(),
            format!(r#"fleet_controller_region_status{{{west},status="active"}} 1"#),
            format!(r#"fleet_controller_region_status{{{east},status="pending"}} 1"#),
            format!("fleet_controller_region_step{{{west}}} 1"),
            format!("fleet_controller_region_canary_percent{{{west}}} 10"),
            format!("fleet_controller_region_canary_percent{{{east}}} 0"),
            format!("fleet_controller_region_step{{{east}}} 0"),
            format!("fleet_controller_region_reachable{{{west}}} 1"),
            format!("fleet_controller_region_deadline_seconds{{{west}}} {deadline}"),
        ] {
            assert!(samples.contains(&sample.as_str()), "{sample}\nnot in\n{out}");
        }
        assert_eq!(
            samples.iter().filter(|s| s.contains("deadline")).count(),
            1,
            "only the waiting region has a deadline"
        );
    }
}
