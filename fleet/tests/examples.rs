//! The example manifests in `deploy/examples`: the valid ones load cleanly, and each invalid
//! one yields exactly the diagnostics in its `.expected` file (regenerate with UPDATE_EXPECT=1).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_manifest_is_valid_without_warnings() {
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 4, "the documented examples");
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap();
        match fleet::load(&src) {
            Ok(loaded) => assert!(
                loaded.warnings.is_empty(),
                "{}: {:?}",
                file.display(),
                loaded.warnings
            ),
            Err(diags) => panic!("{} is invalid: {diags:#?}", file.display()),
        }
    }
}

#[test]
fn every_invalid_manifest_yields_exactly_its_expected_diagnostics() {
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(files.len() >= 7);
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let diags = fleet::load(&src).expect_err(&name);
        assert!(diags.iter().any(|d| d.is_error()), "{name} has no error");
        let rendered: String = diags
            .iter()
            .map(|d| format!("{}\n", d.in_file(&name)))
            .collect();
        expect_test::expect_file![file.with_extension("expected")].assert_eq(&rendered);
    }
}

#[test]
fn a_release_can_override_the_strategy_everywhere_and_a_bad_override_is_explained() {
    let src = std::fs::read_to_string(examples_dir().join("linear-berlin-window.yaml")).unwrap();
    let manifest = fleet::load(&src).unwrap().manifest;
    let blue_green =
        fleet::with_strategy(&manifest, "blue_green: { standby: 10m }", fleet::Rules::Now).unwrap();
    let wave = &blue_green.waves[1];
    let region = blue_green.region("eu-west-1").unwrap();
    assert_eq!(
        blue_green.strategy_for(wave, region).rollout.name(),
        "blue-green"
    );
    let diags = fleet::with_strategy(
        &manifest,
        "canary:\n  steps: [{ weight: 50 }, { weight: 5 }]\n",
        fleet::Rules::Now,
    )
    .unwrap_err();
    let rendered: Vec<String> = diags
        .iter()
        .map(|d| d.in_file("override").to_string())
        .collect();
    assert_eq!(
        rendered,
        [
            "override:2:37: error: canary.steps[1].weight: weight 5% is lower than the previous step's 50%; weights never decrease along the steps; reorder or fix them"
        ]
    );
    let diags = fleet::with_strategy(&manifest, "canery: {}\n", fleet::Rules::Now).unwrap_err();
    assert!(
        diags.iter().any(
            |d| d.message == "unknown field \"canery\"" && d.help == "did you mean \"canary\"?"
        ),
        "{diags:?}"
    );
}

#[test]
fn an_autoscaled_workload_runs_min_instances_unless_an_autoscaler_says_otherwise() {
    let src = std::fs::read_to_string(examples_dir().join("multi-region-canary.yaml")).unwrap();
    let with = |workload: &str| src.replace("    replicas: 3\n", workload);
    let loaded = fleet::load(&with(
        "    resources: { cpu: 250m }\n    autoscale: { min: 2, max: 20 }\n",
    ))
    .unwrap();
    let workload = &loaded.manifest.service.workload;
    let autoscale = workload.autoscale.unwrap();
    assert_eq!(
        (autoscale.min, autoscale.max, autoscale.cpu_percent),
        (2, 20, 70)
    );
    assert_eq!(
        workload.replicas, 2,
        "what the process driver runs, and each track's count"
    );
    let diags = fleet::load(&with("    autoscale: { min: 0, max: 20 }\n")).unwrap_err();
    let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        lines,
        [
            "10:16: error: service.workload.autoscale: autoscaling on CPU needs each instance's \
             CPU request, which is not set; set `resources.cpu` (e.g. 250m): the autoscaler keeps \
             use at cpu_percent of it",
            "10:23: error: service.workload.autoscale.min: min 0: no instance would run; give at \
             least 1, so that every version keeps an instance to serve",
        ]
    );
}

#[test]
fn a_manifest_kept_from_before_a_stricter_rule_still_loads_with_a_warning() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/fleet.yaml");
    let src = std::fs::read_to_string(path).unwrap();
    // Taken before durations in months, or over 30 days, were refused.
    let old = src.replacen("bake: 1s", "bake: 45d", 1) + "progress_deadline: 5M\n";
    let refused = fleet::load(&old).unwrap_err();
    let errors: Vec<String> = (refused.iter())
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let kept = fleet::load_kept(&old).unwrap();
    let warned = |path: &str| kept.warnings.iter().any(|d| d.path == path);
    assert!(warned("waves[0].bake") && warned("progress_deadline"));
    let days = |d: u64| std::time::Duration::from_secs(d * 24 * 3600);
    assert_eq!(kept.manifest.waves[0].bake, days(45));
    assert!(kept.manifest.progress_deadline > days(150));
}
