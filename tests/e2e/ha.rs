//! Controllers that keep their state in a real etcd and stand in for each other: a whole
//! fleet of real processes on 127.0.0.1, as in `release.rs`, with a second controller
//! standing by, through which the agents and clients reach the leader.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fleet_e2e::World;
use fleet_e2e::etcd::Etcd;

/// Reads `url`: its status and body.
async fn get(url: String) -> (u16, String) {
    let response = fleetctl::local::http_client()
        .get(url)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies_and_carries_the_release_on_from_the_same_step() {
    let etcd = Etcd::start().unwrap();
    let mut world = World::start_on_etcd(&etcd, true).await.unwrap();
    // Every client of the fleet dials the standby, which passes its connections to the
    // leader (TLS and all: the leader checks each client's certificate): ready, saying so,
    // once it has asked etcd who leads.
    let admin = world.fleet.standby_admin().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get(format!("http://{admin}/readyz")).await;
        if status == 200 {
            assert!(
                body.contains("standing by: controller-0 leads, at 127.0.0.1:"),
                "{body}"
            );
            assert!(body.contains("connections pass to it"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fleetctl::local::leads(admin).await,
        Some(false),
        "stands by"
    );

    let (id, watch) = world.release_into_its_second_wave().await.unwrap();
    let killed = Instant::now();
    world.fleet.crash_controller().await.unwrap();
    // A call made meanwhile, through the standby, is made again until the standby leads.
    let status = ["release", "status", &id, "--retry-for", "30s"];
    let meanwhile = world.fleetctl_command(&status);
    let meanwhile = fleet_e2e::Running::start(meanwhile).unwrap();
    // The lease lives 3 s; the standby tries for the lead three times as often.
    let within = Duration::from_secs(10);
    world.fleet.standby_leads(within).await.unwrap();
    let took = killed.elapsed();
    println!("the standby led {took:?} after the leader was killed");
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease ran out: {took:?}"
    );
    let (status, _) = get(format!("http://{admin}/readyz")).await;
    assert_eq!(status, 200);
    assert_eq!(fleetctl::local::leads(admin).await, Some(true), "leads");
    let (code, said) =
        tokio::task::spawn_blocking(move || meanwhile.finish_within(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(code, 0, "{said}");
    assert!(said.contains(&format!("release {id}: ")), "{said}");
    assert!(said.contains("trying again for up to 30s"), "{said}");

    world.succeeded_step_by_step(&id).await;
    world.each_step_once(&id).await;
    world.watched_each_event_once(&id, watch).await;
    // The new leader numbers releases on from the old one's.
    let next = world.start_release("v3").await.unwrap();
    let number = |id: &str| id.rsplit('-').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(number(&next), number(&id) + 1, "{next} after {id}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_steps_down_when_it_wakes_and_the_standby_carries_on() {
    let etcd = Etcd::start().unwrap();
    let mut world = World::start_on_etcd(&etcd, false).await.unwrap();
    let (id, watch) = world.release_into_its_second_wave().await.unwrap();
    // Paused (as by a long stall, or cut off from etcd) for longer than its lease: the
    // standby takes over while the old leader still believes it leads.
    let stop = rustix::process::Signal::STOP;
    world.fleet.signal("controller", stop).unwrap();
    world
        .fleet
        .standby_leads(Duration::from_secs(10))
        .await
        .unwrap();
    // Awake again, it finds out, changes nothing, and starts over as a standby: the same
    // process (its supervisor sees no crash), which says so in its log.
    let (old, cont) = ("controller, deposed", rustix::process::Signal::CONT);
    world.fleet.signal(old, cont).unwrap();
    let log = world.fleet.dir.join("controller-0.log");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let over = text.find("starting over as a standby");
        if let Some(at) = over
            && text[at..].contains("standing by")
        {
            assert!(text.contains("stopped leading: "), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = world.fleet.ended(old, Duration::from_secs(2)).await;
    assert!(
        ended.is_err(),
        "it went on, and was stopped here: {ended:?}"
    );
    world.succeeded_step_by_step(&id).await;
    world.each_step_once(&id).await;
    world.watched_each_event_once(&id, watch).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_moved_from_its_data_directory_into_etcd_serves_what_it_kept() {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let on_data = [OsStr::new("--data"), data.as_os_str()];
    let (running, grpc, _) = fleet_e2e::controller_alone(&on_data, &[]).await.unwrap();
    let fleetctl = |grpc: &str, args: &[&str]| {
        let mut command = std::process::Command::new(fleet_e2e::bin("fleetctl"));
        command
            .args(args)
            .args(["--controller", &format!("http://{grpc}")]);
        let (code, out) = fleet_e2e::run(command).unwrap();
        assert_eq!(code, 0, "{args:?}: {out}");
        out
    };
    let fleet = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/fleet.yaml");
    fleetctl(&grpc, &["apply", fleet]);
    let started = fleetctl(&grpc, &["release", "start", "e2e", "v2", "--from", "v1"]);
    assert!(started.starts_with("release e2e-1: "), "{started}");
    fleetctl(
        &grpc,
        &["release", "pause", "e2e-1", "--reason", "before the move"],
    );
    let history = ["release", "history", "e2e-1", "--output", "json"];
    let before = fleetctl(&grpc, &history);
    fleet_e2e::stop_cleanly(running).await;

    let etcd = Etcd::start().unwrap();
    let on_etcd = ["--etcd", &etcd.url, "--etcd-prefix", "/moved/"];
    let import = |dir: &std::path::Path| {
        let mut command = std::process::Command::new(fleet_e2e::bin("fleet-controller"));
        command.args(on_etcd).arg("--import-data").arg(dir);
        fleet_e2e::run(command).unwrap()
    };
    let (code, said) = import(&data);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("imported") && said.contains("1 fleets, 1 releases with"),
        "{said}"
    );
    let on_etcd: Vec<&OsStr> = on_etcd.iter().map(OsStr::new).collect();
    let (running, grpc, _) = fleet_e2e::controller_alone(&on_etcd, &[]).await.unwrap();
    // Every event as it was, and the release as it was left: paused, to be resumed.
    assert_eq!(fleetctl(&grpc, &history), before);
    let resumed = fleetctl(&grpc, &["release", "resume", "e2e-1"]);
    assert!(resumed.starts_with("release e2e-1: "), "{resumed}");
    // Releases are numbered on.
    let next = ["release", "start", "e2e", "v3", "--supersede"];
    let next = fleetctl(&grpc, &next);
    assert!(next.starts_with("release e2e-2: "), "{next}");
    // Not twice: the prefix holds the first copy, and more.
    let (code, said) = import(&data);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("etcd already holds"), "{said}");
    let (code, said) = import(&dir.path().join("elsewhere"));
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("there is no store here"), "{said}");
    fleet_e2e::stop_cleanly(running).await;
}

#[test]
fn bad_etcd_flags_are_told_before_anything_listens() {
    let cases = [
        (
            &["--lease-ttl", "500ms"][..],
            "etcd leases last whole seconds, at least 2",
        ),
        (&["--listen", "0.0.0.0:0"], "give --advertise HOST:PORT"),
        (
            &["--advertise", "nope"],
            "--advertise \"nope\": write HOST:PORT",
        ),
        (
            &["--etcd-ca", "ca.pem"],
            "is not https://: write it as https://",
        ),
        (
            &["--etcd-user", "fleet"],
            "give the file that holds its password",
        ),
        (
            &[
                "--etcd-user",
                "fleet",
                "--etcd-password-file",
                "/nonexistent/pw",
            ],
            "--etcd-password-file /nonexistent/pw: cannot read it",
        ),
    ];
    for (flags, told) in cases {
        let mut command = std::process::Command::new(fleet_e2e::bin("fleet-controller"));
        command.args(["--etcd", "http://127.0.0.1:1", "--admin", "127.0.0.1:0"]);
        command.args(flags).env("RUST_BACKTRACE", "0");
        let running = fleet_e2e::Running::start(command).unwrap();
        let (code, out) = running.finish_within(Duration::from_secs(10)).unwrap();
        assert_eq!(code, 1, "{flags:?}: {out}");
        assert!(out.contains(told), "{flags:?}: {out}");
        assert!(!out.contains("listening"), "{flags:?}: {out}");
    }
    // And a flag of the etcd store without it.
    let mut command = std::process::Command::new(fleet_e2e::bin("fleet-controller"));
    command.args([
        "--data",
        "/nonexistent/fleet",
        "--advertise",
        "10.0.0.7:7070",
    ]);
    let running = fleet_e2e::Running::start(command).unwrap();
    let (code, out) = running.finish_within(Duration::from_secs(10)).unwrap();
    assert_eq!(code, 2, "{out}");
    let told = "the argument '--data <DATA>' cannot be used with '--advertise <ADVERTISE>'";
    assert!(out.contains(told), "{out}");
}
