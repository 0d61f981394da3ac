//! A plan as a readable timeline table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use comfy_table::{CellAlignment, Table, presets};
use fleet::plan::{Plan, StepPlan, WavePlan};

const TIME: &str = "%a %d %b %H:%M";

pub fn render(plan: &Plan) -> String {
    let mut out = format!(
        "Release of {} {} planned from {} UTC{}\n\n",
        plan.service,
        plan.version,
        plan.start.format("%a %d %b %Y %H:%M"),
        match &plan.emergency {
            Some(reason) => format!(" (emergency: {reason}; windows and blackouts ignored)"),
            None => String::new(),
        }
    );
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header([
        "WAVE",
        "REGION",
        "STEP",
        "WEIGHT",
        "STARTS (UTC)",
        "HOLDS",
        "EXPOSED",
    ]);
    for (i, wave) in plan.waves.iter().enumerate() {
        let mut wave_cell = format!("{} {}", i + 1, wave.name);
        for row in wave_preamble(wave) {
            table.add_row([
                std::mem::take(&mut wave_cell),
                String::new(),
                row.0,
                "-".into(),
                time(row.1),
                row.2,
                String::new(),
            ]);
        }
        // Parallel regions interleave in time, so that EXPOSED only ever grows down the table.
        let mut rows: Vec<(usize, &StepPlan)> = wave
            .regions
            .iter()
            .enumerate()
            .flat_map(|(r, region)| region.steps.iter().map(move |s| (r, s)))
            .collect();
        rows.sort_by_key(|(_, step)| step.start);
        let batched = wave.regions.iter().any(|r| r.batch > 0);
        let mut previous = None;
        for (r, step) in rows {
            let region = &wave.regions[r];
            let region_cell = match previous == Some(r) {
                true => String::new(),
                false if batched => format!(
                    "{} ({}%) batch {}",
                    region.name,
                    region.traffic_share,
                    region.batch + 1
                ),
                false => format!("{} ({}%)", region.name, region.traffic_share),
            };
            previous = Some(r);
            table.add_row([
                std::mem::take(&mut wave_cell),
                region_cell,
                step.label.clone(),
                step.weight.to_string(),
                time(step.start),
                holds(step),
                percent(step.exposure),
            ]);
        }
        if !wave.bake.is_zero() {
            table.add_row([
                "".into(),
                "".into(),
                "bake".into(),
                "-".into(),
                time(wave.end),
                human(wave.bake),
                "".into(),
            ]);
        }
    }
    for column in [3, 6] {
        if let Some(c) = table.column_mut(column) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    for line in table.lines() {
        out += line.trim_end();
        out.push('\n');
    }
    out.push('\n');
    out += &summary(plan);
    out
}

/// The rows before a wave's first step: its approval and any wait for a window.
fn wave_preamble(wave: &WavePlan) -> Vec<(String, DateTime<Utc>, String)> {
    let mut rows = Vec::new();
    if wave.approval {
        rows.push(("approval".into(), wave.ready, "until approved".into()));
    }
    let wait = (wave.start - wave.ready).to_std().unwrap_or_default();
    if !wait.is_zero() {
        rows.push(("wait for window".into(), wave.ready, human(wait)));
    }
    rows
}

fn summary(plan: &Plan) -> String {
    let mut out = format!(
        "Expected to finish {} UTC, {} after the start",
        plan.finish.format("%a %d %b %Y %H:%M"),
        human(plan.duration)
    );
    out += &match plan.manual_gates {
        0 => ".\n".to_string(),
        1 => ", if its manual gate passes at once.\n".to_string(),
        n => format!(", if its {n} manual gates pass at once.\n"),
    };
    let cohort = match plan.worst_case_includes_cohort {
        true => " plus the A/B cohort",
        false => "",
    };
    out += &match plan.first_gate_can_stop_at {
        Some(at) => format!(
            "Worst-case exposure before the first automated gate can stop it: {} of global users{cohort} (by {} UTC).\n",
            percent(plan.worst_case_exposure),
            at.format(TIME)
        ),
        None => format!(
            "No analysis gates: nothing stops this release automatically; it reaches {} of global users{cohort}.\n",
            percent(plan.worst_case_exposure)
        ),
    };
    out
}

fn holds(step: &StepPlan) -> String {
    match (step.waits_for_promote, step.duration.is_zero()) {
        (true, _) => "until promoted".into(),
        (false, true) => "-".into(),
        (false, false) => human(step.duration),
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format(TIME).to_string()
}

/// A duration to the second (a wait for a window is counted from now, to the nanosecond);
/// one under a second as it is.
fn human(d: Duration) -> String {
    let d = match d < Duration::from_secs(1) {
        true => d,
        false => Duration::from_secs(d.as_secs() + u64::from(d.subsec_millis() >= 500)),
    };
    humantime::format_duration(d).to_string()
}

/// A percentage with at most two decimals and no trailing zeros.
fn percent(p: f64) -> String {
    let s = format!("{p:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet::plan::ReleaseRequest;

    /// Renders the plan of an example manifest, started on a Monday morning before any window.
    fn rendered(example: &str) -> String {
        let path = format!(
            "{}/../../deploy/examples/{example}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let src = std::fs::read_to_string(path).unwrap();
        let manifest = fleet::load(&src).unwrap().manifest;
        let start = DateTime::parse_from_rfc3339("2026-11-23T07:00:00Z")
            .unwrap()
            .to_utc();
        let request = ReleaseRequest {
            version: "v2".into(),
            emergency: None,
        };
        render(&fleet::plan::plan(&manifest, &request, start).unwrap())
    }

    fn snapshot(example: &str) -> expect_test::ExpectFile {
        let path = format!(
            "{}/../../deploy/examples/{example}.plan.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        expect_test::expect_file![path]
    }

    #[test]
    fn multi_region_canary_plan_reads_as_a_timeline() {
        snapshot("multi-region-canary").assert_eq(&rendered("multi-region-canary"));
    }

    #[test]
    fn linear_plan_waits_for_the_berlin_window() {
        snapshot("linear-berlin-window").assert_eq(&rendered("linear-berlin-window"));
    }

    #[test]
    fn blue_green_plan_switches_at_once() {
        snapshot("blue-green").assert_eq(&rendered("blue-green"));
    }

    #[test]
    fn ab_plan_mirrors_then_serves_the_cohort_then_ramps() {
        snapshot("ab-mirror").assert_eq(&rendered("ab-mirror"));
    }

    #[test]
    fn durations_are_shown_to_the_second() {
        let wait = Duration::new(14 * 3600 + 34 * 60 + 39, 861_068_313);
        assert_eq!(human(wait), "14h 34m 40s");
        assert_eq!(human(Duration::from_millis(1_400)), "1s");
        assert_eq!(human(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn percentages_drop_trailing_zeros() {
        assert_eq!(percent(5.0), "5%");
        assert_eq!(percent(1.25), "1.25%");
        assert_eq!(percent(2.5), "2.5%");
    }
}
