//! Properties of the loader and planner over generated manifests.
//!
//! Manifests are generated as wire values, written out as JSON (which is YAML) and read back
//! through `fleet::load`, so every generated case also exercises the parser and the checks.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, TimeDelta, Utc};
use fleet::plan::{Plan, ReleaseRequest, plan};
use fleet::wire;
use proptest::prelude::*;

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0s".to_string()),
        (1u32..600).prop_map(|s| format!("{s}s")),
        (1u32..12).prop_map(|h| format!("{h}h"))
    ]
}

fn canary() -> impl Strategy<Value = wire::Strategy> {
    let step = (
        0u32..=10_000,
        prop::option::of(prop_oneof![duration(), Just("indefinite".to_string())]),
    );
    prop::collection::vec(step, 1..6).prop_map(|mut steps| {
        steps.sort_by_key(|(bp, _)| *bp);
        let steps = steps
            .into_iter()
            .map(|(bp, pause)| wire::Step {
                weight: f64::from(bp) / 100.0,
                pause: pause.map(wire::Pause::Text),
            })
            .collect();
        wire::Strategy {
            canary: Some(wire::Canary { steps }),
            ..Default::default()
        }
    })
}

fn linear() -> impl Strategy<Value = wire::Strategy> {
    (1u32..=100, 1u32..=100, 1u32..600).prop_map(|(a, b, secs)| wire::Strategy {
        linear: Some(wire::Linear {
            step_weight: f64::from(a.min(b)),
            max_weight: Some(f64::from(a.max(b))),
            interval: format!("{secs}s"),
        }),
        ..Default::default()
    })
}

fn blue_green() -> impl Strategy<Value = wire::Strategy> {
    duration().prop_map(|standby| wire::Strategy {
        blue_green: Some(wire::BlueGreen {
            smoke: None,
            standby: Some(standby),
        }),
        ..Default::default()
    })
}

fn strategy() -> impl Strategy<Value = wire::Strategy> {
    let phases = (any::<bool>(), any::<bool>());
    (prop_oneof![canary(), linear(), blue_green()], phases).prop_map(|(mut s, (mirror, ab))| {
        if mirror {
            s.mirror = Some(wire::Mirror {
                percent: 10.0,
                duration: "5m".into(),
                compare: None,
            });
        }
        if ab {
            s.ab = Some(wire::Ab {
                matches: vec![wire::Match {
                    header: Some(wire::ValueMatch {
                        name: "x-canary".into(),
                        exact: Some("true".into()),
                        prefix: None,
                        regex: None,
                        present: None,
                    }),
                    cookie: None,
                    query: None,
                }],
                duration: "10m".into(),
            });
        }
        s
    })
}

fn window() -> impl Strategy<Value = wire::Window> {
    let days = prop::sample::subsequence(
        vec![
            wire::Day::Mon,
            wire::Day::Tue,
            wire::Day::Wed,
            wire::Day::Thu,
            wire::Day::Fri,
            wire::Day::Sat,
            wire::Day::Sun,
        ],
        1..=7,
    );
    let tz = prop::sample::select(vec![
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
    ]);
    (days, 0u32..24 * 60, 1u32..24 * 60, tz).prop_map(|(days, from, len, tz)| {
        let to = (from + len) % (24 * 60);
        wire::Window {
            days,
            from: format!("{:02}:{:02}", from / 60, from % 60),
            to: format!("{:02}:{:02}", to / 60, to % 60),
            tz: tz.into(),
        }
    })
}

prop_compose! {
    fn manifest()(
        shares in prop::collection::vec(0u32..=100, 1..8),
        cuts in prop::collection::vec(any::<bool>(), 8),
        order in Just((0..8).collect::<Vec<usize>>()).prop_shuffle(),
        default_strategy in strategy(),
        overrides in prop::collection::vec(prop::option::weighted(0.2, strategy()), 16),
        waves_meta in prop::collection::vec((prop::option::of(1u32..4), prop::option::of(duration()), any::<bool>()), 8),
        analysis in prop::option::of((1u64..3600, 1u32..10)),
        windows in prop::collection::vec(window(), 0..3),
        blackout in prop::option::of((0i64..400, 0u64..20)),
    ) -> wire::Manifest {
        let n = shares.len();
        let regions: Vec<wire::Region> = shares.iter().enumerate().map(|(i, share)| wire::Region {
            name: format!("region-{i}"),
            clusters: vec![wire::Cluster { name: format!("cluster-{i}"), agent: None }],
            traffic_share: f64::from(*share),
            strategy: overrides[i].clone(),
        }).collect();
        // Cut the shuffled regions into consecutive, non-empty waves.
        let order: Vec<usize> = order.into_iter().filter(|i| *i < n).collect();
        let mut groups: Vec<Vec<String>> = vec![vec![]];
        for (k, i) in order.iter().enumerate() {
            if k > 0 && cuts[k] {
                groups.push(vec![]);
            }
            groups.last_mut().unwrap().push(format!("region-{i}"));
        }
        let waves = groups.into_iter().enumerate().map(|(w, regions)| {
            let (max_parallel, bake, approval) = waves_meta[w].clone();
            wire::Wave {
                name: format!("wave-{w}"),
                regions,
                max_parallel,
                bake,
                approval: approval.then_some(wire::Approval::Required),
                strategy: overrides[8 + w].clone(),
            }
        }).collect();
        let analysis = analysis.map(|(secs, limit)| wire::Analysis {
            interval: format!("{secs}s"),
            min_requests: Some(100),
            failure_limit: Some(limit),
            gates: vec![wire::Gate::SuccessRate(wire::Min { min: 99.0 })],
        });
        let blackouts = blackout.map(|(start, len)| {
            let from = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + TimeDelta::days(start);
            let to = from + TimeDelta::days(len as i64);
            wire::Blackout { from: from.to_string(), to: Some(to.to_string()), tz: None, reason: None }
        }).into_iter().collect();
        wire::Manifest {
            api_version: "fleet/v1".into(),
            service: wire::Service {
                name: "svc".into(),
                host: None,
                path: None,
                health_check: None,
                workload: wire::Workload { image: Some("img:{version}".into()), command: None, replicas: None, resources: None, run_as_user: None, autoscale: None },
            },
            regions,
            waves,
            strategy: default_strategy,
            analysis,
            windows,
            blackouts,
            webhooks: vec![],
            on_failure: None,
            progress_deadline: None,
        }
    }
}

fn start() -> impl Strategy<Value = DateTime<Utc>> {
    (1_767_225_600i64..1_830_297_600).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
}

fn load_and_plan(m: &wire::Manifest, start: DateTime<Utc>) -> Plan {
    let text = serde_json::to_string_pretty(m).unwrap();
    let loaded = match fleet::load(&text) {
        Ok(loaded) => loaded,
        Err(diags) => panic!("generated manifest is invalid: {diags:#?}\n{text}"),
    };
    plan(
        &loaded.manifest,
        &ReleaseRequest {
            version: "v2".into(),
            emergency: None,
        },
        start,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_region_lands_in_exactly_one_wave_of_the_plan(m in manifest(), start in start()) {
        let plan = load_and_plan(&m, start);
        let mut planned: Vec<&str> = plan.waves.iter().flat_map(|w| &w.regions).map(|r| r.name.as_str()).collect();
        planned.sort();
        let mut declared: Vec<&str> = m.regions.iter().map(|r| r.name.as_str()).collect();
        declared.sort();
        prop_assert_eq!(planned, declared);
    }

    #[test]
    fn exposure_never_decreases_along_the_plan(m in manifest(), start in start()) {
        let plan = load_and_plan(&m, start);
        let mut steps: Vec<_> = plan.waves.iter().flat_map(|w| &w.regions).flat_map(|r| &r.steps).collect();
        steps.sort_by_key(|s| s.start);
        for pair in steps.windows(2) {
            prop_assert!(pair[1].exposure >= pair[0].exposure, "{} then {}", pair[0].exposure, pair[1].exposure);
        }
        for region in plan.waves.iter().flat_map(|w| &w.regions) {
            prop_assert!(region.steps.windows(2).all(|p| p[0].weight <= p[1].weight), "{}", region.name);
            prop_assert_eq!(region.steps.last().map(|s| s.weight.basis_points()), Some(10_000));
        }
        let total: f64 = m.regions.iter().map(|r| r.traffic_share).sum();
        let last = steps.last().map_or(0.0, |s| s.exposure);
        prop_assert!((last - total).abs() < 1e-6, "ends at {last}, shares sum to {total}");
    }

    #[test]
    fn waves_run_in_order_each_after_the_previous_bake(m in manifest(), start in start()) {
        let plan = load_and_plan(&m, start);
        prop_assert!(plan.waves.first().is_none_or(|w| w.ready == start));
        for pair in plan.waves.windows(2) {
            let bake = TimeDelta::from_std(pair[0].bake).unwrap();
            prop_assert_eq!(pair[1].ready, pair[0].end + bake);
            prop_assert!(pair[1].start >= pair[1].ready);
        }
        prop_assert!(plan.worst_case_exposure <= plan.waves.iter().flat_map(|w| &w.regions).map(|r| r.traffic_share).sum::<f64>() + 1e-9);
    }

    #[test]
    fn waves_start_inside_a_window(m in manifest(), start in start()) {
        let plan = load_and_plan(&m, start);
        let schedule = fleet::load(&serde_json::to_string(&m).unwrap()).unwrap().manifest.schedule;
        for wave in &plan.waves {
            prop_assert_eq!(schedule.next_start(wave.start), Some(wave.start), "wave {}", wave.name);
        }
    }

    #[test]
    fn the_loader_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = fleet::load(&text);
    }

    #[test]
    fn the_loader_never_panics_on_mangled_manifests(m in manifest(), cut in 0usize..4000, insert in "[ :{}\\[\\]\\-#'\"a-z0-9\\n]{0,8}") {
        let mut text = serde_json::to_string_pretty(&m).unwrap();
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.insert_str(at, &insert);
        let _ = fleet::load(&text);
    }
}
