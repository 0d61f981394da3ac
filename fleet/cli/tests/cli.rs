//! `fleetctl` as a user runs it: exit codes, where diagnostics go, output formats, help.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

fn fleetctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_exits_zero_for_valid_manifests() {
    let out = fleetctl(&[
        "validate",
        "deploy/examples/multi-region-canary.yaml",
        "deploy/examples/linear-berlin-window.yaml",
        "deploy/examples/blue-green.yaml",
        "deploy/examples/ab-mirror.yaml",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("multi-region-canary.yaml: valid"));
}

#[test]
fn validate_exits_one_with_every_diagnostic_on_stderr() {
    let out = fleetctl(&[
        "validate",
        "deploy/examples/multi-region-canary.yaml",
        "deploy/examples/invalid/waves.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let errors = stderr.lines().filter(|l| l.contains(": error: ")).count();
    assert_eq!(errors, 10, "{stderr}");
    assert!(stderr.contains(
        "deploy/examples/invalid/waves.yaml:24:15: error: waves[1].regions[0]: unknown region \"us-est-1\"; did you mean \"us-east-1\"?"
    ));
}

#[test]
fn apply_of_an_invalid_file_says_what_validate_says_and_calls_no_controller() {
    let file = "deploy/examples/invalid/waves.yaml";
    let validated = fleetctl(&["validate", file]);
    // No controller listens on port 1: the file is refused before any call.
    let applied = fleetctl(&["apply", file, "--controller", "http://127.0.0.1:1"]);
    assert_eq!(applied.status.code(), Some(1));
    let stderr = text(&applied.stderr);
    let diagnostics = |s: &str| s.lines().filter(|l| l.starts_with(file)).count();
    assert_eq!(
        diagnostics(&stderr),
        diagnostics(&text(&validated.stderr)),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}: invalid: 10 error(s); nothing applied")),
        "{stderr}"
    );
    assert!(!stderr.contains("fleetctl:"), "no call was made: {stderr}");
}

#[test]
fn validate_exits_two_on_usage_errors() {
    assert_eq!(fleetctl(&["validate"]).status.code(), Some(2));
    assert_eq!(
        fleetctl(&["validate", "no/such/file.yaml"]).status.code(),
        Some(2)
    );
    assert_eq!(
        fleetctl(&["validate", "--frobnicate", "x.yaml"])
            .status
            .code(),
        Some(2)
    );
    // A file that cannot be read does not keep the others from being checked.
    let quick = "deploy/examples/quick.yaml";
    let out = fleetctl(&["validate", "no/such/file.yaml", quick]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no/such/file.yaml"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), format!("{quick}: valid\n"));
}

#[test]
fn plan_prints_json_that_tools_can_read() {
    let out = fleetctl(&[
        "plan",
        "deploy/examples/linear-berlin-window.yaml",
        "--start",
        "2026-11-23T07:00:00Z",
        "--version",
        "v2",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["version"], "v2");
    // The Berlin window opens at 10:00 local, 09:00 UTC.
    assert_eq!(plan["waves"][0]["start"], "2026-11-23T09:00:00Z");
    assert_eq!(plan["waves"][1]["regions"][0]["steps"][0]["weight"], 1000);
}

#[test]
fn an_emergency_plan_ignores_windows_and_says_why() {
    let out = fleetctl(&[
        "plan",
        "deploy/examples/linear-berlin-window.yaml",
        "--start",
        "2026-12-25T03:00:00Z",
        "--emergency",
        "CVE fix",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("(emergency: CVE fix; windows and blackouts ignored)"),
        "{stdout}"
    );
    assert!(!stdout.contains("wait for window"), "{stdout}");
}

#[test]
fn plan_refuses_a_version_the_controller_would_refuse() {
    let quick = "deploy/examples/quick.yaml";
    for (given, said) in [
        ("", "version is empty"),
        ("v 2", "\"v 2\" is not a version"),
    ] {
        let out = fleetctl(&["plan", quick, "--version", given]);
        assert_eq!(out.status.code(), Some(2), "{given:?}");
        let err = text(&out.stderr);
        assert!(err.contains(said), "{err}");
    }
}

#[test]
fn plan_of_an_invalid_manifest_exits_one() {
    let out = fleetctl(&["plan", "deploy/examples/invalid/steps.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("steps.yaml:27:19: error:"));
}

#[test]
fn schema_is_a_json_schema_of_the_manifest() {
    let out = fleetctl(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        schema["$schema"]
            .as_str()
            .unwrap()
            .contains("json-schema.org")
    );
    for field in [
        "apiVersion",
        "service",
        "regions",
        "waves",
        "strategy",
        "analysis",
        "windows",
        "blackouts",
        "webhooks",
        "on_failure",
        "progress_deadline",
    ] {
        assert!(schema["properties"].get(field).is_some(), "{field}");
    }
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn every_verb_explains_itself_with_an_example() {
    for verb in ["validate", "plan", "schema"] {
        let out = fleetctl(&[verb, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        let help = text(&out.stdout);
        assert!(help.contains("Example"), "{verb}: {help}");
        assert!(help.contains(&format!("fleetctl {verb}")), "{verb}: {help}");
    }
}

#[test]
fn certs_are_made_once_named_as_the_controller_checks_and_keys_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fleetctl-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let before_ca = fleetctl(&["certs", "operator", "alice", "--dir", d]);
    assert_eq!(before_ca.status.code(), Some(2));
    assert!(
        text(&before_ca.stderr).contains("make a CA first with `fleetctl certs ca --dir"),
        "{}",
        text(&before_ca.stderr)
    );
    assert!(fleetctl(&["certs", "ca", "--dir", d]).status.success());
    let agent = [
        "certs",
        "agent",
        "--region",
        "us-west",
        "--cluster",
        "usw1-a",
        "--dir",
        d,
    ];
    let made = fleetctl(&agent);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let key = dir.join("usw1-a.us-west.agent.fleet.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only its owner reads a private key");
    let pem = std::fs::read(dir.join("usw1-a.us-west.agent.fleet.pem")).unwrap();
    let again = fleetctl(&agent);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("exists already: nothing was written"));
    assert_eq!(
        std::fs::read(dir.join("usw1-a.us-west.agent.fleet.pem")).unwrap(),
        pem
    );
    for (args, said) in [
        (
            &[
                "certs",
                "agent",
                "--region",
                "US-West",
                "--cluster",
                "a",
                "--dir",
                d,
            ][..],
            "--region \"US-West\" is not a name the controller accepts",
        ),
        (
            &["certs", "viewer", "a.b", "--dir", d],
            "NAME \"a.b\" is not a name",
        ),
        (
            &["certs", "controller", "--dir", d],
            "give --dns NAME or --ip ADDRESS",
        ),
        (&["certs", "ca", "--days", "0", "--dir", d], "--days 0"),
        (
            &["certs", "ca", "--days", "99999999", "--dir", d],
            "give from 1 to 3650",
        ),
        (
            &["certs", "controller", "--dns", "10.0.0.1", "--dir", d],
            "is not a DNS name: give lowercase names",
        ),
        (
            &["certs", "controller", "--dns", "a b.example", "--dir", d],
            "is not a DNS name",
        ),
    ] {
        let out = fleetctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(said),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_duration_that_does_not_read_as_one_says_how_to_write_it() {
    let out = fleetctl(&["release", "watch", "checkout-1", "--reconnect-for", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid value 'soon' for '--reconnect-for <DURATION>'")
            && err.contains("write a number and a unit, e.g. 30s, 5m, 1h30m"),
        "{err}"
    );
    // Read as the manifest reads durations: not five months, which it refuses for that.
    for (given, said) in [
        (
            "5M",
            "\"5M\" is in \"M\", which is months or years; write minutes as m (5m)",
        ),
        ("1y", "\"1y\" is in \"y\""),
        ("100000h", "\"100000h\" is longer than 30 days"),
    ] {
        let out = fleetctl(&["release", "list", "--retry-for", given]);
        assert_eq!(out.status.code(), Some(2), "{given}");
        let err = text(&out.stderr);
        assert!(err.contains("'--retry-for <DURATION>': "), "{err}");
        assert!(err.contains(said), "{err}");
    }
}

#[test]
fn output_that_cannot_be_written_is_told_in_a_line_not_a_panic() {
    let run = |args: &[&str], stdout: std::process::Stdio| {
        let mut fleetctl = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        let fleetctl = fleetctl.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        fleetctl.args(args).stdout(stdout).output().unwrap()
    };
    // The reader has gone (`| head`): ended quietly, as by SIGPIPE, whether the verb prints
    // (`schema`) or writes (`plan`).
    for args in [&["schema"][..], &["plan", "deploy/examples/quick.yaml"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let gone = run(args, writer.into());
        assert_eq!(
            gone.status.code(),
            Some(141),
            "{args:?}: {}",
            text(&gone.stderr)
        );
        assert_eq!(text(&gone.stderr), "", "{args:?}");
    }
    // A full disk: told.
    let full = std::fs::File::create("/dev/full").unwrap();
    let full = run(&["schema"], full.into());
    assert_eq!(full.status.code(), Some(1));
    assert_eq!(
        text(&full.stderr),
        "fleetctl: cannot write its output: No space left on device (os error 28)\n"
    );
}

#[test]
fn an_emergency_without_its_reason_and_a_manifest_too_large_to_send_are_refused_at_once() {
    for verb in [
        &["plan", "deploy/examples/quick.yaml"][..],
        &["release", "start", "demo", "v2"],
    ] {
        let out = fleetctl(&[verb, &["--emergency", " "]].concat());
        assert_eq!(out.status.code(), Some(2), "{verb:?}");
        assert!(
            text(&out.stderr).contains("an emergency needs its reason"),
            "{verb:?}: {}",
            text(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("large.yaml");
    std::fs::write(&large, "#".repeat(1024 * 1024 + 1)).unwrap();
    let large = large.to_str().unwrap();
    // Told before any controller is dialled (none listens here).
    let out = fleetctl(&["apply", large, "--controller", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(
            "is 1048577 bytes: a controller takes a manifest of at most 1048576 bytes (1 MiB)"
        ),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_change_given_up_on_before_the_controller_was_reached_is_said_not_made() {
    // A port nothing listens on: every dial is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    for retry_for in ["0s", "1s"] {
        let out = fleetctl(&[
            "release",
            "pause",
            "demo-1",
            "--retry-for",
            retry_for,
            "--controller",
            &url,
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "not reached: {stderr}");
        assert!(
            stderr.contains("the change was not made: the controller was not reached"),
            "{stderr}"
        );
        assert!(!stderr.contains("may or may not"), "{stderr}");
    }
}

#[test]
fn a_watch_bears_with_a_controller_that_is_down_for_its_reconnect_for_and_says_so() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let started = std::time::Instant::now();
    let out = fleetctl(&[
        "release",
        "watch",
        "demo-1",
        "--reconnect-for",
        "1s",
        "--controller",
        &url,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // Not the 30 s of --retry-for's default.
    assert!(started.elapsed() < Duration::from_secs(10), "{stderr}");
    assert!(stderr.contains("s (--reconnect-for 1s)"), "{stderr}");
    assert!(!stderr.contains("--retry-for"), "{stderr}");
}

#[test]
fn a_call_given_up_on_says_how_many_tries_it_made_in_how_long() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = fleetctl(&["release", "list", "--retry-for", "1s", "--controller", &url]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not reached: {stderr}");
    // Tries at 0, 0.25 and 0.75 s (the next would come after the second); a busy machine
    // may make that two tries, at 0 and 0.25 s.
    let said = (stderr.split("gave up after ").nth(1))
        .and_then(|rest| rest.split_once("s (--retry-for 1s)"))
        .and_then(|(said, _)| said.split_once(" tries in "))
        .map(|(tries, took)| (tries.parse::<u32>().unwrap(), took.parse::<f64>().unwrap()));
    let waited = |tries| if tries == 3 { 0.75 } else { 0.25 };
    assert!(
        said.is_some_and(|(tries, took)| (2..=3).contains(&tries)
            && took >= waited(tries)
            && took < 3.0),
        "{stderr}"
    );
}

#[test]
fn an_empty_gate_is_refused_before_any_call() {
    // No controller listens on port 1: refused before any call.
    for gate in ["", "  "] {
        let out = fleetctl(&[
            "release",
            "promote",
            "demo-1",
            "--gate",
            gate,
            "--controller",
            "http://127.0.0.1:1",
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("an empty gate names none") && !stderr.contains("controller"),
            "{stderr}"
        );
    }
}
