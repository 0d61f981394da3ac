//! Releases through a whole fleet of real processes on 127.0.0.1: a controller, and per
//! region a fleet-proxy and a fleet-agent whose process driver runs the demo app; users send
//! traffic through every proxy.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fleet_e2e::{RELEASE_TIME, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_release_moves_every_proxy_through_the_manifests_weights_wave_by_wave() {
    let mut world = World::start(&[]).await.unwrap();
    let id = released_step_by_step(&mut world).await;
    // Every cluster's agent connected, each holding the release's last desired state once it
    // has reported it in force.
    let in_force = |agents: &str| {
        ["usw-a", "use-a", "euw-a"].iter().all(|cluster| {
            agents.lines().any(|row| {
                row.contains(cluster)
                    && row.contains("connected")
                    && row.contains("process")
                    && row.contains(&format!("{id} #"))
                    && row.ends_with("in force")
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, agents) = world.fleetctl(&["agents", "--service", "e2e"]).unwrap();
        assert_eq!(code, 0, "{agents}");
        if in_force(&agents) {
            break;
        }
        assert!(Instant::now() < deadline, "{agents}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each agent's own metrics say the same: connected, the last desired state in force.
    let http = fleetctl::local::http_client();
    for region in &world.fleet.regions {
        let url = format!("http://{}/metrics", region.agent);
        let metrics = http.get(&url).send().await.unwrap().text().await.unwrap();
        let value = |name: &str| -> f64 {
            let line = metrics.lines().find(|l| l.starts_with(name)).unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let desired = value(&format!("fleet_agent_desired_seq{{release=\"{id}\"}}"));
        assert!(desired > 0.0, "{metrics}");
        assert_eq!(value("fleet_agent_applied_seq "), desired, "{metrics}");
        assert_eq!(value("fleet_agent_ready "), 1.0, "{metrics}");
        assert_eq!(value("fleet_agent_controller_connected "), 1.0, "{metrics}");
    }
    let history = world.history(&id).await.unwrap();
    let first_step = |region: &str| {
        history
            .iter()
            .position(|e| e.region == region && e.kind == "step_started")
            .unwrap()
    };
    assert!(
        first_step("us-west") < first_step("us-east")
            && first_step("us-east") < first_step("eu-west")
    );
    assert_eq!(
        history
            .iter()
            .filter(|e| e.kind == "region_succeeded")
            .count(),
        3
    );
    assert_eq!(history.last().unwrap().kind, "succeeded");
    assert!(
        history
            .iter()
            .any(|e| e.kind == "analysis" && e.reason.starts_with("pass: canary"))
    );
    let counts = world.traffic.counts.lock().await.clone();
    assert!(
        counts["us-west"].get("v2 200").is_some_and(|n| *n > 0),
        "{counts:?}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_goes_through_its_waves_with_every_link_under_mutual_tls() {
    let mut world = World::start_tls(&[]).await.unwrap();
    assert!(world.fleet.controller.starts_with("https://"));
    let id = world.start_release("v2").await.unwrap();
    // A controller killed mid-release: the agents dial the new one over TLS again.
    let west_started = |r: &fleet_proto::v1::Release| {
        r.regions
            .iter()
            .any(|g| g.region == "us-west" && g.canary_weight_bp > 0)
    };
    world
        .wait_for(&id, RELEASE_TIME, west_started)
        .await
        .unwrap();
    world.fleet.crash_and_restart_controller().await.unwrap();
    assert!(world.fleet.controller.starts_with("https://localhost:"));
    world.succeeded_step_by_step(&id).await;
    // Started as the operator the client's certificate names, whatever the request said.
    let history = world.history(&id).await.unwrap();
    assert_eq!(history[0].kind, "release_started");
    assert_eq!(history[0].actor, "fleetctl");
    let (code, status) = world.fleetctl(&["release", "status", &id]).unwrap();
    assert_eq!(code, 0, "{status}");
    assert!(status.contains("succeeded"), "{status}");
    world.stop().await;
}

/// Releases v2 and checks it as [`World::succeeded_step_by_step`] does; returns the release's id.
async fn released_step_by_step(world: &mut World) -> String {
    let id = world.start_release("v2").await.unwrap();
    world.succeeded_step_by_step(&id).await;
    id
}

/// The release once it has ended, rolled back or otherwise.
async fn rolled_back_or_done(world: &mut World, id: &str) -> fleet_proto::v1::Release {
    let ended =
        |r: &fleet_proto::v1::Release| r.phase != "progressing" && r.phase != "rolling_back";
    world.wait_for(id, RELEASE_TIME, ended).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_five_percent_is_caught_and_rolled_back_before_the_next_wave() {
    let mut world = World::start(&[("FLEET_DEMO_FAULTS", "v2=0.05")])
        .await
        .unwrap();
    // Started and followed as a pipeline would: one command, whose exit code is the outcome.
    let fleetctl =
        world.fleetctl_command(&["release", "start", "e2e", "v2", "--from", "v1", "--watch"]);
    let (code, out) = tokio::task::spawn_blocking(move || fleet_e2e::run(fleetctl))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 1, "rolled back: {out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("started "))
        .unwrap()
        .to_string();
    assert!(out.contains("rolled_back"), "{out}");
    let release = rolled_back_or_done(&mut world, &id).await;
    assert_eq!(release.phase, "rolled_back", "{release:#?}");
    assert!(
        release.reason.contains("us-west failed 2 checks in a row"),
        "{}",
        release.reason
    );
    world
        .wait_for_split("us-west", 0, Duration::from_secs(5))
        .await
        .unwrap();
    let west = world.splits_of("us-west");
    assert_eq!(west.first(), Some(&1000));
    assert_eq!(west.last(), Some(&0), "back to 100% stable: {west:?}");
    assert!(
        world.splits_of("us-east").is_empty(),
        "the next wave never started"
    );
    // Caught within failure_limit (2) checks: the region's last two verdicts failed, back to
    // back, and the rollback followed the second. (A check at 10% may pass by luck: 25
    // requests at 5% have no error a quarter of the time; the region then moves on to 50%.)
    let history = world.history(&id).await.unwrap();
    let verdicts: Vec<_> = history
        .iter()
        .filter(|e| e.region == "us-west" && e.kind == "analysis")
        .collect();
    let last_two = &verdicts[verdicts.len() - 2..];
    assert!(
        last_two.iter().all(|e| e.reason.starts_with("fail")),
        "{last_two:#?}"
    );
    assert!(
        last_two[1].at_ms - last_two[0].at_ms <= 2_500,
        "consecutive checks, one interval apart"
    );
    let rollback = history
        .iter()
        .find(|e| e.kind == "rollback_started")
        .unwrap();
    assert_eq!(rollback.at_ms, last_two[1].at_ms);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_never_starts_is_rolled_back_at_the_progress_deadline_saying_why() {
    const CRASHED: &str = "v2: 0/1 ready (exited with exit status: 1)";
    let manifest = format!("{}progress_deadline: 10s\n", fleet_e2e::MANIFEST);
    let env = [("FLEET_DEMO_FAULTS", "v2=crash")];
    let mut world = World::start_with(&manifest, &env, &["us-west"])
        .await
        .unwrap();
    let id = world.start_release("v2").await.unwrap();
    // While it waits, the status says why, in the agent's words, and until when.
    let waiting = |r: &fleet_proto::v1::Release| {
        r.regions
            .iter()
            .any(|g| g.region == "us-west" && g.deadline_ms > 0 && g.waiting.contains(CRASHED))
    };
    let release = world.wait_for(&id, RELEASE_TIME, waiting).await.unwrap();
    let west = &release.regions[0];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let left = west.deadline_ms - i64::try_from(now.unwrap().as_millis()).unwrap();
    assert!(left <= 10_000, "{left} ms left of a 10 s deadline");
    let (code, status) = world.fleetctl(&["release", "status", &id]).unwrap();
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("us-west is not ready (the agents say: usw-a: "),
        "{status}"
    );
    assert!(status.contains(CRASHED), "{status}");
    let release = rolled_back_or_done(&mut world, &id).await;
    assert_eq!(release.phase, "rolled_back", "{release:#?}");
    let why = "us-west waited 10s (progress_deadline) for step 1/3 to be applied and ready; \
        the agents say: usw-a: ";
    assert!(release.reason.starts_with(why), "{}", release.reason);
    assert!(release.reason.ends_with(CRASHED), "{}", release.reason);
    // No user was ever sent to the version that never came up, and the next wave never began.
    let west = world.splits_of("us-west");
    assert!(west.iter().all(|bp| *bp == 0), "{west:?}");
    assert!(world.splits_of("us-east").is_empty());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_falls_ill_after_its_step_is_in_force_is_rolled_back_at_the_progress_deadline()
 {
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick");
    let faults = format!("v2=sick-while:{}", sick.display());
    // Its first step held half a minute, so that it falls ill there however slow the machine.
    let first = "{ weight: 10, pause: 2s }";
    assert!(fleet_e2e::MANIFEST.contains(first));
    let manifest = fleet_e2e::MANIFEST.replace(first, "{ weight: 10, pause: 30s }");
    let manifest = format!("{manifest}progress_deadline: 6s\n");
    let env = [("FLEET_DEMO_FAULTS", faults.as_str())];
    let mut world = World::start_with(&manifest, &env, &["us-west"])
        .await
        .unwrap();
    let id = world.start_release("v2").await.unwrap();
    // In force at its first step (10%), then its health check fails.
    world
        .wait_for_split("us-west", 1000, RELEASE_TIME)
        .await
        .unwrap();
    std::fs::write(&sick, "").unwrap();
    let release = rolled_back_or_done(&mut world, &id).await;
    assert_eq!(release.phase, "rolled_back", "{release:#?}");
    let why = "us-west waited 6s (progress_deadline) for step 1/3 to be applied and ready; \
        the agents say: usw-a: v2: 0/1 ready (its health check /healthz answered 503 Service \
        Unavailable)";
    assert_eq!(release.reason, why);
    // The step held where it was (no share beyond 10%), and the next wave never began.
    world
        .wait_for_split("us-west", 0, RELEASE_TIME)
        .await
        .unwrap();
    assert_eq!(world.splits_of("us-west"), [1000, 0]);
    assert!(world.splits_of("us-east").is_empty());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_holds_its_region_with_the_proxy_serving_the_last_table_until_it_returns() {
    let mut world = World::start(&[]).await.unwrap();
    let id = world.start_release("v2").await.unwrap();
    let at_fifty = |r: &fleet_proto::v1::Release| {
        r.regions
            .iter()
            .any(|g| g.region == "us-west" && g.canary_weight_bp == 5000)
    };
    world.wait_for(&id, RELEASE_TIME, at_fifty).await.unwrap();
    // The controller has sent 50%; wait until the agent has put it on the proxy.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while world.splits_of("us-west").last() != Some(&5000) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            world.splits_of("us-west")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world
        .fleet
        .stop_one("agent us-west", rustix::process::Signal::KILL)
        .await
        .unwrap();
    let held = world
        .wait_for(&id, Duration::from_secs(10), |r| {
            r.regions
                .iter()
                .any(|g| g.region == "us-west" && !g.reachable)
        })
        .await
        .unwrap();
    assert_eq!(held.phase, "progressing");
    let (code, agents) = world.fleetctl(&["agents", "--service", "e2e"]).unwrap();
    assert_eq!(code, 1, "a cluster without its agent: {agents}");
    let west = agents.lines().find(|l| l.contains("usw-a")).unwrap();
    assert!(west.trim_end().ends_with("none"), "{agents}");
    assert!(
        agents.contains("1 cluster(s) without an agent connected"),
        "{agents}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await; // Long enough to pass two steps, were it not held.
    let still = world.release(&id).await.unwrap();
    let west = still
        .regions
        .iter()
        .find(|g| g.region == "us-west")
        .unwrap();
    assert_eq!(
        (west.canary_weight_bp, west.reachable),
        (5000, false),
        "the region holds"
    );
    assert_eq!(
        world.splits_of("us-west").last(),
        Some(&5000),
        "the proxy keeps the last table"
    );
    let before = world
        .traffic
        .counts
        .lock()
        .await
        .get("us-west")
        .and_then(|c| c.get("v2 200").copied())
        .unwrap_or(0);
    let (cluster, admin) = (
        world.fleet.regions[0].cluster.clone(),
        world.fleet.regions[0].admin,
    );
    world.fleet.regions[0].agent = world
        .fleet
        .start_agent("us-west", &cluster, admin, &[])
        .await
        .unwrap();
    let release = world
        .wait_for(&id, RELEASE_TIME, |r| r.phase != "progressing")
        .await
        .unwrap();
    assert_eq!(release.phase, "succeeded", "{release:#?}");
    let after = world
        .traffic
        .counts
        .lock()
        .await
        .get("us-west")
        .and_then(|c| c.get("v2 200").copied())
        .unwrap_or(0);
    assert!(after > before, "v2 kept serving");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_release_carries_on_from_the_same_step_after_a_restart() {
    let mut world = World::start(&[]).await.unwrap();
    // Followed from the start as a pipeline would, through the controller's crash.
    let (id, watch) = world.release_into_its_second_wave().await.unwrap();
    // A watch told to bear a second without the controller gives up, saying how to go on.
    let impatient = world.fleetctl_command(&["release", "watch", &id, "--reconnect-for", "1s"]);
    let mut impatient = fleet_e2e::Running::start(impatient).unwrap();
    let first = impatient.line(Duration::from_secs(10)).await.unwrap();
    assert!(first.contains("release_started"), "{first}");
    world.fleet.crash_controller().await.unwrap();
    let (code, out) = tokio::task::spawn_blocking(move || impatient.finish())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 3, "not the release's outcome: {out}");
    assert!(
        out.contains(&format!(
            "gave up following {id} after 1s without the controller"
        )) && out.contains(&format!("`fleetctl release watch {id}` follows it again")),
        "{out}"
    );
    world.fleet.restart_controller().await.unwrap();
    world.succeeded_step_by_step(&id).await;
    // The other watch dialled the new controller, printed every event once and in order, and
    // exited 0 for the release's success.
    let out = world.watched_each_event_once(&id, watch).await;
    assert!(out.contains("lost the controller: "), "{out}");
    assert!(out.contains("following the release again"), "{out}");
    world.each_step_once(&id).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indefinite_pause_waits_for_promote_and_pause_resume_and_abort_work_mid_step() {
    const STEERING: &str = include_str!("steering.yaml");
    let mut world = World::start_with(STEERING, &[], &["us-west", "us-east", "eu-west"])
        .await
        .unwrap();
    let id = world.start_release("v2").await.unwrap();
    let west = |r: &fleet_proto::v1::Release| {
        r.regions
            .iter()
            .find(|g| g.region == "us-west")
            .cloned()
            .unwrap()
    };
    world
        .wait_for(&id, RELEASE_TIME, |r| {
            west(r).status == "active" && west(r).canary_weight_bp == 1000
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // Two analysis intervals and more.
    assert_eq!(
        west(&world.release(&id).await.unwrap()).canary_weight_bp,
        1000,
        "it waits for promote"
    );
    let (code, out) = world
        .fleetctl(&["release", "promote", &id, "--reason", "looks good"])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    world
        .wait_for(&id, Duration::from_secs(10), |r| {
            west(r).canary_weight_bp == 5000
        })
        .await
        .unwrap();
    let (code, out) = world.fleetctl(&["release", "pause", &id]).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("paused"), "{out}");
    tokio::time::sleep(Duration::from_secs(6)).await; // Longer than the 4 s step.
    let paused = world.release(&id).await.unwrap();
    assert_eq!(
        (paused.phase.as_str(), west(&paused).canary_weight_bp),
        ("paused", 5000)
    );
    let (code, out) = world.fleetctl(&["release", "resume", &id]).unwrap();
    assert_eq!(code, 0, "{out}");
    let east = |r: &fleet_proto::v1::Release| {
        r.regions
            .iter()
            .find(|g| g.region == "us-east")
            .cloned()
            .unwrap()
    };
    world
        .wait_for(&id, RELEASE_TIME, |r| east(r).canary_weight_bp == 1000)
        .await
        .unwrap();
    let (code, out) = world
        .fleetctl(&["release", "abort", &id, "--reason", "enough"])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let release = world
        .wait_for(&id, Duration::from_secs(20), |r| r.phase == "rolled_back")
        .await
        .unwrap();
    assert_eq!(release.reason, "enough");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Each reached proxy ends on 0% canary (us-east may have been aborted before its agent
    // put 10% on the proxy at all).
    let stable = |splits: Vec<u32>| splits.last().is_none_or(|w| *w == 0);
    while !stable(world.splits_of("us-west")) || !stable(world.splits_of("us-east")) {
        assert!(
            std::time::Instant::now() < deadline,
            "not back to stable: {:?} {:?}",
            world.splits_of("us-west"),
            world.splits_of("us-east")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out) = world.fleetctl(&["release", "history", &id]).unwrap();
    assert_eq!(code, 0);
    for kind in [
        "promoted",
        "paused",
        "resumed",
        "rollback_started",
        "rolled_back",
    ] {
        assert!(out.contains(kind), "history lacks {kind}: {out}");
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_traffic_never_promotes_past_an_analysed_step_and_says_why() {
    let mut world = World::start_with(fleet_e2e::MANIFEST, &[], &["us-east", "eu-west"])
        .await
        .unwrap();
    let id = world.start_release("v2").await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await; // Five analysis intervals.
    let release = world.release(&id).await.unwrap();
    let west = release
        .regions
        .iter()
        .find(|g| g.region == "us-west")
        .unwrap();
    assert_eq!(
        (west.status.as_str(), west.canary_weight_bp),
        ("active", 1000),
        "{release:#?}"
    );
    assert!(
        west.last_verdict
            .starts_with("no verdict: 0 canary requests, fewer than the 20 needed; holding"),
        "{}",
        west.last_verdict
    );
    assert!(world.splits_of("us-east").is_empty(), "the next wave waits");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_loses_the_agents_table_gets_it_back() {
    // us-west's first step waits for a promote that never comes: its table stays as it is.
    const STEERING: &str = include_str!("steering.yaml");
    let mut world = World::start_with(STEERING, &[], &["us-west"])
        .await
        .unwrap();
    world.start_release("v2").await.unwrap();
    world
        .wait_for_split("us-west", 1000, RELEASE_TIME)
        .await
        .unwrap();
    let admin = world.fleet.regions[0].admin;
    let routes = || async move {
        let url = format!("http://{admin}/routes");
        let http = fleetctl::local::http_client();
        let table: serde_json::Value = http.get(url).send().await?.json().await?;
        anyhow::Ok(table)
    };
    let put = routes().await.unwrap();
    let version = put["version"].as_u64().unwrap();
    // The file names no instance of the service; the agent's table does.
    let from_file = |t: &serde_json::Value| t["tracks"]["stable"]["backends"][0] == "127.0.0.1:1";
    assert!(!from_file(&put), "{put}");
    // Its config file edited (a comment is enough): the proxy reads it and puts the file's
    // table in force, as it would after a restart. The agent sees it in `/stats` and puts its
    // own back.
    let file = world.fleet.dir.join("proxy-us-west.yaml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("# edited\n");
    std::fs::write(&file, text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let table = routes().await.unwrap();
        let now = table["version"].as_u64().unwrap();
        if now >= version + 2 && !from_file(&table) {
            assert_eq!(table["routes"], put["routes"]);
            assert_eq!(table["tracks"], put["tracks"]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.stop().await;
}

/// The mirror phase of `e2e/mirror.yaml` with `compare`: every request copied to v2.
async fn mirroring(compare: &str) -> (World, String) {
    let manifest = include_str!("mirror.yaml").replace("COMPARE", compare);
    let mut world = World::start_with(&manifest, &[], &["us-west", "us-east", "eu-west"])
        .await
        .unwrap();
    let id = world.start_release("v2").await.unwrap();
    (world, id)
}

/// us-west's verdicts so far.
async fn verdicts(world: &mut World, id: &str) -> Vec<String> {
    let history = world.history(id).await.unwrap();
    let verdicts = history
        .into_iter()
        .filter(|e| e.region == "us-west" && e.kind == "analysis");
    verdicts.map(|e| e.reason).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_answered_as_users_were_pass_the_mirror_phase_by_their_status() {
    // v2 answers "hello from v2" where v1 said "hello from v1": alike by status.
    let (mut world, id) = mirroring("status").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = verdicts(&mut world, &id).await;
        if let Some(pass) = seen.iter().find(|v| v.starts_with("pass")) {
            assert!(
                pass.contains("mirror_match_rate >= 99 (is 100: ok)"),
                "{pass}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no passing verdict: {seen:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still mirroring: nobody was sent to v2.
    assert!(world.splits_of("us-west").iter().all(|bp| *bp == 0));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_answered_otherwise_are_caught_in_the_mirror_phase_before_anyone_gets_them() {
    // By body, every copy differs from its primary ("hello from v2" against v1's).
    let (mut world, id) = mirroring("body").await;
    let release = rolled_back_or_done(&mut world, &id).await;
    assert_eq!(release.phase, "rolled_back", "{release:#?}");
    assert!(
        release.reason.contains("us-west failed 2 checks in a row")
            && release
                .reason
                .contains("mirror_match_rate >= 99 (is 0: FAILED)"),
        "{}",
        release.reason
    );
    let seen = verdicts(&mut world, &id).await;
    assert!(
        seen.iter()
            .all(|v| v.contains("success_rate >= 99 (is 100: ok)")),
        "nothing failed outright: {seen:#?}"
    );
    // No step after the mirror phase (step 0) was ever applied: no user was sent to v2.
    let history = world.history(&id).await.unwrap();
    let applied: Vec<serde_json::Value> = history
        .iter()
        .filter(|e| e.kind == "step_applied")
        .map(|e| serde_json::from_str(&e.detail_json).unwrap())
        .collect();
    assert!(
        !applied.is_empty() && applied.iter().all(|d| d["step"] == 0),
        "{applied:?}"
    );
    assert!(
        world.splits_of("us-west").iter().all(|bp| *bp == 0),
        "{:?}",
        world.splits_of("us-west")
    );
    assert!(
        world.splits_of("us-east").is_empty(),
        "the next wave never started"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_store_fails_a_write_starts_over_from_it_and_carries_the_release_on() {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let mut world = World::start(&[]).await.unwrap();
    let (id, watch) = world.release_into_its_second_wave().await.unwrap();
    let pid = world.fleet.pid("controller").unwrap();
    let admin = world.fleet.controller_admin().unwrap();
    // Its store's file may grow no further: every write to it fails (EFBIG), as on a full
    // disk, while the process goes on.
    let process = Pid::from_raw(i32::try_from(pid).unwrap());
    let ours = getrlimit(Resource::Fsize);
    let full = Rlimit {
        current: Some(1),
        maximum: ours.maximum,
    };
    prlimit(process, Resource::Fsize, full).unwrap();
    let readyz = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, why) = loop {
        let (status, body) = get(&readyz).await;
        if status != 200 {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "no write failed: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{why}");
    assert!(
        why.contains("starting over: a write to the store failed"),
        "{why}"
    );
    // The disk has room again before the process starts over (a second after its
    // connections closed).
    prlimit(process, Resource::Fsize, ours).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&readyz).await.0 != 200 {
        assert!(Instant::now() < deadline, "it did not serve again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same process (its supervisor saw no crash), on the same addresses, started over
    // once (as its environment since says).
    assert_eq!(world.fleet.pid("controller").unwrap(), pid);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    assert!(vars.contains(&&b"FLEET_CONTROLLER_STARTS_OVER=1"[..]));
    world.succeeded_step_by_step(&id).await;
    world.each_step_once(&id).await;
    world.watched_each_event_once(&id, watch).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_told_to_stop_while_it_waits_to_start_over_stops() {
    let dir = tempfile::tempdir().unwrap();
    // As after five start-overs in a row: it waits 32 s before the next.
    let (mut running, grpc, admin) = data_controller(dir.path(), "5").await;
    full_disk(&running);
    let mut apply = std::process::Command::new(fleet_e2e::bin("fleetctl"));
    let fleet = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/fleet.yaml");
    apply.args(["apply", fleet, "--controller", &format!("http://{grpc}")]);
    apply.args(["--retry-for", "0s"]);
    let (code, out) = tokio::task::spawn_blocking(move || fleet_e2e::run(apply))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(
            "the controller is unavailable: the controller is starting over from its store (a \
             write to the store failed: I/O error: File too large"
        ),
        "{out}"
    );
    // Its connections closed, it waits, not ready; told to stop, it stops at once, cleanly.
    let mut line = String::new();
    while !line.contains("starting over from the store in 32s") {
        line = running.line(Duration::from_secs(10)).await.unwrap();
    }
    let (status, why) = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(status, 503, "{why}");
    let stopped = Instant::now();
    let (code, out) =
        tokio::task::spawn_blocking(move || running.stop_within(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(stopped.elapsed() < Duration::from_secs(3), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_by_a_controller_starting_over_is_made_once_by_fleetctl_trying_again() {
    use rustix::process::{Resource, getrlimit, prlimit};
    let dir = tempfile::tempdir().unwrap();
    // As after two start-overs in a row: it waits 4 s before the next, time enough to give
    // its file room again first, however busy the machine.
    let (mut running, grpc, _admin) = data_controller(dir.path(), "2").await;
    let url = format!("http://{grpc}");
    let fleetctl = |args: &[&str]| {
        let mut command = std::process::Command::new(fleet_e2e::bin("fleetctl"));
        command.args(args).args(["--controller", &url]);
        command
    };
    let fleet = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/fleet.yaml");
    let (code, out) = fleet_e2e::run(fleetctl(&["apply", fleet])).unwrap();
    assert_eq!(code, 0, "{out}");
    // The start's write fails, as on a full disk: the controller starts over from its store.
    let process = full_disk(&running);
    let start = [
        "release",
        "start",
        "e2e",
        "v2",
        "--from",
        "v1",
        "--retry-for",
        "30s",
    ];
    let start = fleet_e2e::Running::start(fleetctl(&start)).unwrap();
    let mut line = String::new();
    while !line.contains("starting over from the store in 4s") {
        line = running.line(Duration::from_secs(10)).await.unwrap();
    }
    // The disk has room again before the process starts over.
    prlimit(Some(process), Resource::Fsize, getrlimit(Resource::Fsize)).unwrap();
    let (code, out) = tokio::task::spawn_blocking(move || start.finish_within(RETRY_FOR))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("trying again for up to 30s (--retry-for)"),
        "{out}"
    );
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("release "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no release in {out}"))
        .to_string();
    // Started once: one release, with one start in its history.
    let (code, list) = fleet_e2e::run(fleetctl(&["release", "list", "--output", "json"])).unwrap();
    assert_eq!(code, 0, "{list}");
    let list: serde_json::Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    let ids: Vec<&str> = (list.as_array().unwrap().iter())
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let history = ["release", "history", &id, "--output", "json"];
    let (code, history) = fleet_e2e::run(fleetctl(&history)).unwrap();
    assert_eq!(code, 0, "{history}");
    let starts = history
        .lines()
        .filter(|l| l.contains("\"kind\":\"release_started\""))
        .count();
    assert_eq!(starts, 1, "{history}");
    fleet_e2e::stop_cleanly(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_pointed_at_a_port_that_is_no_controller_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _grpc, admin) = data_controller(dir.path(), "0").await;
    for url in [format!("http://{admin}"), format!("ftp://{admin}")] {
        let (code, said) = fleet_e2e::run({
            let mut c = std::process::Command::new(fleet_e2e::bin("fleetctl"));
            c.args(["fleets", "--controller", &url, "--retry-for", "0s"]);
            c
        })
        .unwrap();
        assert_ne!(code, 0, "{said}");
        let expected = match url.starts_with("http:") {
            true => fleet_proto::connect::NOT_GRPC.to_string(),
            false => format!("controller URL \"{url}\" is not an http:// or https:// URL"),
        };
        assert!(said.contains(&expected), "{url}: {said}");
        assert!(!said.contains("the controller refused"), "{said}");
    }
    fleet_e2e::stop_cleanly(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_shows_the_fleets_kept_and_what_applying_a_file_would_change() {
    let dir = tempfile::tempdir().unwrap();
    let (running, grpc, _admin) = data_controller(dir.path(), "0").await;
    let url = format!("http://{grpc}");
    // Its exit code, stdout and stderr, each as written.
    let fleetctl = |args: &[&str]| {
        let mut command = std::process::Command::new(fleet_e2e::bin("fleetctl"));
        let out = command
            .args(args)
            .args(["--controller", &url])
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        (
            out.status.code().unwrap(),
            text(&out.stdout),
            text(&out.stderr),
        )
    };
    let fleet = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/fleet.yaml");
    let text = std::fs::read_to_string(fleet).unwrap();
    // Not applied yet: every line added.
    let (code, diff, err) = fleetctl(&["diff", fleet]);
    assert_eq!(code, 1, "{err}");
    assert!(
        diff.starts_with(&format!("--- /dev/null\n+++ {fleet}\n")),
        "{diff}"
    );
    let added = diff.lines().filter(|l| l.starts_with('+')).count();
    assert_eq!(added, text.lines().count() + 1, "{diff}");
    assert!(err.contains("fleet e2e is not applied"), "{err}");
    // Another fleet first: each verb must find its own. (Of other regions: a region is one
    // service's.)
    let other = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/multi-region-canary.yaml"
    );
    assert_eq!(fleetctl(&["apply", other]).0, 0);
    assert_eq!(fleetctl(&["apply", fleet]).0, 0);
    // The same: nothing to say.
    assert_eq!(
        fleetctl(&["diff", fleet]),
        (0, String::new(), String::new())
    );
    // One line changed: that line, with its context.
    let changed = dir.path().join("changed.yaml");
    let bake = "  - { name: first, regions: [us-west], bake: 1s }";
    let slower = bake.replace("1s", "5s");
    std::fs::write(&changed, text.replacen(bake, &slower, 1)).unwrap();
    let (code, diff, err) = fleetctl(&["diff", changed.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(diff.starts_with("--- fleet e2e, applied\n+++ "), "{diff}");
    assert!(diff.contains(&format!("\n-{bake}\n+{slower}\n")), "{diff}");
    let lines = diff.lines().filter(|l| l.starts_with(['-', '+'])).count();
    assert_eq!(lines, 4, "{diff}");
    // A file that does not validate, or a controller not reached: it cannot tell.
    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(
        &invalid,
        text.replace("traffic_share: 10", "traffic_share: 1000"),
    )
    .unwrap();
    let (code, out, err) = fleetctl(&["diff", invalid.to_str().unwrap()]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains("traffic_share") && err.contains("does not validate"),
        "{err}"
    );
    let mut away = std::process::Command::new(fleet_e2e::bin("fleetctl"));
    away.args([
        "diff",
        fleet,
        "--controller",
        "http://127.0.0.1:1",
        "--retry-for",
        "0s",
    ]);
    let away = away.output().unwrap();
    assert_eq!(away.status.code(), Some(3), "could not tell: not reached");
    assert!(away.stdout.is_empty());
    // The fleets kept, one of them, and its manifest as applied, byte for byte.
    let (code, listed, err) = fleetctl(&["fleets"]);
    assert_eq!(code, 0, "{err}");
    let row = (listed.lines())
        .find(|l| l.trim_start().starts_with("e2e "))
        .unwrap_or_default();
    assert!(row.contains("us-west,us-east,eu-west"), "{listed}");
    assert!(row.contains("first → second → last"), "{listed}");
    let (code, shown, err) = fleetctl(&["fleet", "e2e"]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.starts_with("fleet e2e: applied "), "{shown}");
    assert!(shown.contains("waves: first → second → last"), "{shown}");
    assert_eq!(
        fleetctl(&["fleet", "e2e", "--manifest"]),
        (0, text.clone(), String::new())
    );
    let (code, json, err) = fleetctl(&["fleet", "e2e", "--manifest", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["service"], "e2e");
    assert_eq!(json["manifest"].as_str(), Some(text.as_str()));
    let (code, out, err) = fleetctl(&["fleet", "nope"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("no fleet for service \"nope\""), "{err}");
    fleet_e2e::stop_cleanly(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_holds_its_connection_keeps_a_stopping_controller_five_seconds_at_most() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (running, grpc, _admin) = data_controller(dir.path(), "0").await;
    // An HTTP/2 client that says hello, hears the controller's, and then says nothing more:
    // it never closes, nor reads on.
    let mut silent = tokio::net::TcpStream::connect(&grpc).await.unwrap();
    let hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    silent.write_all(hello).await.unwrap();
    let mut settings = [0u8; 9];
    let heard = tokio::time::timeout(Duration::from_secs(10), silent.read_exact(&mut settings));
    heard.await.unwrap().unwrap();
    assert_eq!(settings[3], 4, "not a SETTINGS frame: {settings:?}");
    let stopped = Instant::now();
    let within = Duration::from_secs(9);
    let (code, out) = tokio::task::spawn_blocking(move || running.stop_within(within))
        .await
        .unwrap()
        .unwrap();
    let took = stopped.elapsed();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("connections still open 5s after the stop; leaving them"),
        "{out}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(silent);
}

/// How long a test waits for fleetctl bearing with a controller away: its own default.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// A controller with its store in `dir`, having started over `starts_over` times in a row;
/// ready, that is with its store open. (It says "listening" before it opens the store: a
/// test that fills the disk on that word may fail the opening itself, and the process
/// exits instead of starting over.)
async fn data_controller(
    dir: &std::path::Path,
    starts_over: &str,
) -> (fleet_e2e::Running, String, String) {
    let data = dir.join("data");
    let store = [std::ffi::OsStr::new("--data"), data.as_os_str()];
    let env = [("FLEET_CONTROLLER_STARTS_OVER", starts_over)];
    let (running, grpc, admin) = fleet_e2e::controller_alone(&store, &env).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(&format!("http://{admin}/readyz")).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (running, grpc, admin)
}

/// Lets `running`'s files grow no further: every write to its store fails (EFBIG), as on a
/// full disk, while the process goes on. Its pid.
fn full_disk(running: &fleet_e2e::Running) -> rustix::process::Pid {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let process = Pid::from_raw(i32::try_from(running.pid()).unwrap()).unwrap();
    let full = Rlimit {
        current: Some(1),
        maximum: getrlimit(Resource::Fsize).maximum,
    };
    prlimit(Some(process), Resource::Fsize, full).unwrap();
    process
}

/// Reads `url`: its status and body; 0 while nothing answers.
async fn get(url: &str) -> (u16, String) {
    match fleetctl::local::http_client().get(url).send().await {
        Ok(answer) => (
            answer.status().as_u16(),
            answer.text().await.unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_process_killed_from_outside_is_waited_for_and_told_not_left_a_zombie() {
    use rustix::process::{Pid, Signal, kill_process};
    let mut world = World::start(&[]).await.unwrap();
    let pid = world.fleet.pid("controller").unwrap();
    kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let ended = world.fleet.ended_by_themselves();
        if !ended.is_empty() {
            break ended;
        }
        assert!(Instant::now() < deadline, "never seen to end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ended.len(), 1, "{ended:?}");
    let (name, status) = &ended[0];
    assert_eq!(name, "controller");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(status),
        Some(9)
    );
    // Waited for: no zombie is left under its pid, and the fleet no longer counts it.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(world.fleet.pid("controller").is_err());
    assert!(world.fleet.ended_by_themselves().is_empty());
    world.stop().await;
}
