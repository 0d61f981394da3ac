//! The process driver with real processes (the demo app) on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_agent::driver::process::ProcessDriver;
use fleet_agent::driver::{Driver, Running, Want};

fn want(versions: &[(&str, u32)]) -> Want {
    Want {
        versions: versions
            .iter()
            .map(|(v, n)| (v.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
        command: ["--port", "{port}", "--version", "{version}"].iter().fold(
            vec![env!("CARGO_BIN_EXE_fleet-demo-app").to_string()],
            |mut c, a| {
                c.push(a.to_string());
                c
            },
        ),
        health_check: "/healthz".into(),
        ..Want::default()
    }
}

async fn until_ready(driver: &mut ProcessDriver, check: impl Fn(&Running) -> bool) -> Running {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = driver.poll().await;
        if check(&running) {
            return running;
        }
        assert!(Instant::now() < deadline, "not ready in time: {running:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn version_at(addr: &str) -> String {
    let http = fleet_agent::http_client();
    http.get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn instances_become_ready_are_replaced_and_come_back_after_a_crash() {
    let mut driver = ProcessDriver::default();
    driver.apply(&want(&[("v1", 2)]));
    let running = until_ready(&mut driver, |r| {
        r.ready.get("v1").is_some_and(|b| b.len() == 2)
    })
    .await;
    let v1 = running.ready["v1"].clone();
    assert_eq!(version_at(&v1[0]).await, "hello from v1\n");

    // A canary beside the stable one.
    driver.apply(&want(&[("v1", 2), ("v2", 1)]));
    let running = until_ready(&mut driver, |r| r.ready.contains_key("v2")).await;
    assert_eq!(version_at(&running.ready["v2"][0]).await, "hello from v2\n");
    assert_eq!(
        running.ready["v1"], v1,
        "the stable instances were left alone"
    );

    // Not wanted, but kept while others may be (the agent has yet to program the proxies).
    driver.apply(&Want {
        keep_others: true,
        ..want(&[("v2", 1)])
    });
    assert_eq!(
        driver.pids().iter().filter(|(v, _)| v == "v1").count(),
        2,
        "kept"
    );

    // v1 is no longer wanted: it is stopped, v2 keeps running.
    driver.apply(&want(&[("v2", 1)]));
    let running = until_ready(&mut driver, |r| !r.ready.contains_key("v1")).await;
    let v2 = running.ready["v2"][0].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let http = fleet_agent::http_client();
    while http
        .get(format!("http://{}/healthz", v1[0]))
        .send()
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "v1 still answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Kill v2's process: the driver notices and starts it again on the same port.
    let (_, pid) = driver.pids().into_iter().find(|(v, _)| v == "v2").unwrap();
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    until_ready(&mut driver, |r| !r.ready.contains_key("v2")).await;
    let running = until_ready(&mut driver, |r| r.ready.contains_key("v2")).await;
    assert_eq!(running.ready["v2"], [v2]);
    driver.shutdown().await;
}

#[tokio::test]
async fn a_command_that_cannot_start_says_why() {
    let mut driver = ProcessDriver::default();
    let mut w = want(&[("v1", 1)]);
    w.command = vec!["/no/such/program".into()];
    driver.apply(&w);
    let running = driver.poll().await;
    assert!(running.ready.is_empty());
    assert!(
        running.detail.contains("cannot start /no/such/program"),
        "{}",
        running.detail
    );
    driver.shutdown().await;
}

#[tokio::test]
async fn an_instance_that_falls_ill_in_service_is_not_ready_saying_why_until_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick");
    let mut driver = ProcessDriver::default();
    let mut w = want(&[("v1", 1)]);
    w.command
        .extend(["--sick-while".into(), sick.display().to_string()]);
    driver.apply(&w);
    let ready = until_ready(&mut driver, |r| r.ready.contains_key("v1")).await;
    std::fs::write(&sick, "").unwrap();
    let ill = until_ready(&mut driver, |r| !r.ready.contains_key("v1")).await;
    assert_eq!(
        ill.detail,
        "v1: 0/1 ready (its health check /healthz answered 503 Service Unavailable)"
    );
    std::fs::remove_file(&sick).unwrap();
    let well = until_ready(&mut driver, |r| r.ready.contains_key("v1")).await;
    assert_eq!(well.ready, ready.ready, "the same instance, not restarted");
    assert_eq!(well.detail, "");
    driver.shutdown().await;
}

#[tokio::test]
async fn an_agent_started_after_one_that_died_takes_over_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    let two_ready = |r: &Running| r.ready.get("v1").is_some_and(|b| b.len() == 2);
    let mut first = ProcessDriver::with_ledger(file.clone());
    first.apply(&want(&[("v1", 2)]));
    let mut ready = until_ready(&mut first, two_ready).await.ready;
    let mut pids = first.pids();
    // It dies without stopping them (kill -9 runs no destructor). Should the test fail, they
    // are killed as it ends.
    std::mem::forget(first);
    let _cleanup = KillOnDrop(pids.iter().map(|(_, pid)| *pid).collect());

    // The next takes them over, on their ports, before its first table (it keeps the rest).
    let mut second = ProcessDriver::with_ledger(file.clone()).stopping_on_exit();
    second.apply(&Want {
        keep_others: true,
        ..want(&[("v1", 2)])
    });
    let mut taken = until_ready(&mut second, two_ready).await.ready;
    ready.values_mut().for_each(|b| b.sort());
    taken.values_mut().for_each(|b| b.sort());
    assert_eq!(taken, ready, "the same instances");
    let mut now = second.pids();
    pids.sort();
    now.sort();
    assert_eq!(now, pids, "no other started");

    // No longer wanted: stopped, though they are no children of this one.
    second.apply(&want(&[("v2", 1)]));
    until_ready(&mut second, |r| r.ready.contains_key("v2")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, pid) in &pids {
        while !gone(*pid) {
            assert!(Instant::now() < deadline, "instance {pid} still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    second.shutdown().await;
    assert!(!file.exists(), "stopped, they are kept nowhere");
}

#[tokio::test]
async fn an_agent_that_stops_leaves_its_instances_serving_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    let two_ready = |r: &Running| r.ready.get("v1").is_some_and(|b| b.len() == 2);
    let mut first = ProcessDriver::with_ledger(file.clone());
    first.apply(&want(&[("v1", 2)]));
    let ready = until_ready(&mut first, two_ready).await.ready;
    let mut pids = first.pids();
    let _cleanup = KillOnDrop(pids.iter().map(|(_, pid)| *pid).collect());
    // A clean stop (SIGTERM): they go on serving, kept in the file.
    first.shutdown().await;
    drop(first);
    for addr in &ready["v1"] {
        assert_eq!(version_at(addr).await, "hello from v1\n", "{addr}");
    }
    assert!(file.exists(), "kept nowhere");

    // The next takes them over; told to stop them on exit, it does, and keeps nothing.
    let mut second = ProcessDriver::with_ledger(file.clone()).stopping_on_exit();
    second.apply(&want(&[("v1", 2)]));
    until_ready(&mut second, two_ready).await;
    let mut now = second.pids();
    pids.sort();
    now.sort();
    assert_eq!(now, pids, "not the same instances");
    second.shutdown().await;
    for (_, pid) in &pids {
        assert!(gone(*pid), "{pid} runs");
    }
    assert!(!file.exists(), "stopped, they are kept nowhere");
}

/// A fleet-agent binary with the process driver keeping its instances in `file`, dialling
/// `controller`; its stdout piped, its stderr to nowhere (unread, a pipe could fill up).
fn agent_on(file: &std::path::Path, controller: &str) -> tokio::process::Child {
    agent_with(file, controller, &[], std::process::Stdio::null())
}

/// [`agent_on`], with `more` flags, its stderr to `stderr`.
fn agent_with(
    file: &std::path::Path,
    controller: &str,
    more: &[&str],
    stderr: std::process::Stdio,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .args([
            "--controller",
            controller,
            "--region",
            "us-west",
            "--cluster",
            "usw-a",
        ])
        .args([
            "--proxy-admin",
            "http://127.0.0.1:9",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(more)
        .arg("--instances-file")
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits, up to 10 s, for `agent` to say it listens: its admin address.
async fn listening(agent: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncBufReadExt;
    let stdout = agent.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    let line = line
        .expect("not listening in 10 s")
        .unwrap()
        .unwrap_or_default();
    let admin = line.strip_prefix("fleet-agent listening admin=");
    admin.unwrap_or_else(|| panic!("{line}")).to_string()
}

#[tokio::test]
async fn a_second_agent_on_one_instances_file_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    // A controller that takes connections into its backlog and never answers.
    let controller = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let controller = format!("http://{}", controller.local_addr().unwrap());
    let mut first = agent_on(&file, &controller);
    listening(&mut first).await;

    let second = agent_with(&file, &controller, &[], std::process::Stdio::piped());
    let second = second.wait_with_output();
    let second = tokio::time::timeout(Duration::from_secs(10), second).await;
    let second = second.expect("the second agent still runs").unwrap();
    assert_eq!(second.status.code(), Some(1));
    let said = String::from_utf8_lossy(&second.stderr);
    let named = format!(
        "another fleet-agent keeps its instances in {}",
        file.display()
    );
    assert!(said.contains(&named), "{said}");
    assert!(second.stdout.is_empty(), "it said it listens");

    // The first dies (kill -9): the file is free for the next.
    first.kill().await.unwrap();
    let mut third = agent_on(&file, &controller);
    listening(&mut third).await;
    third.kill().await.unwrap();
}

/// TEST-ONLY: a controller that tells every agent to run v1 (one instance of the demo app)
/// and listens to nothing it says: its URL.
async fn controller_wanting_v1() -> String {
    use fleet_proto::v1 as pb;
    use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
    struct WantsV1;
    #[tonic::async_trait]
    impl AgentService for WantsV1 {
        type SessionStream = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<pb::ControllerMessage, tonic::Status>>
                    + Send,
            >,
        >;
        async fn session(
            &self,
            request: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
            let w = want(&[("v1", 1)]);
            let desired = pb::DesiredState {
                epoch: 1,
                seq: 1,
                release_id: "demo-1".into(),
                service: "demo".into(),
                stable: Some(pb::Track {
                    version: "v1".into(),
                    replicas: 1,
                }),
                routes: Some(pb::RouteTable::default()),
                workload: Some(pb::Workload {
                    command: w.command,
                    health_check: w.health_check,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let message = pb::controller_message::Message::Desired(desired);
            // What the agent says is read and dropped; the stream stays open after the word.
            let mut inbound = request.into_inner();
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            let said = Ok(pb::ControllerMessage {
                message: Some(message),
            });
            let stream =
                tokio_stream::StreamExt::chain(tokio_stream::once(said), tokio_stream::pending());
            Ok(tonic::Response::new(Box::pin(stream)))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder().add_service(AgentServiceServer::new(WantsV1));
    tokio::spawn(server.serve_with_incoming(incoming));
    url
}

/// The instances `file` keeps: each one's process id and port.
fn kept(file: &std::path::Path) -> Vec<(u32, u16)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let ledger: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    (ledger["instances"].as_array().into_iter().flatten())
        .map(|i| {
            (
                i["pid"].as_u64().unwrap() as u32,
                i["port"].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

/// Sends SIGTERM to `agent` and waits, up to 15 s, for it to exit 0.
async fn terminate(mut agent: tokio::process::Child) {
    let pid = rustix::process::Pid::from_raw(agent.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), agent.wait()).await;
    assert!(
        ended
            .expect("still runs 15 s after SIGTERM")
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn the_agent_binary_stopped_by_sigterm_leaves_its_instances_unless_told_to_stop_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    let controller = controller_wanting_v1().await;
    let agent = agent_on(&file, &controller);
    let first = running(&file).await;
    let _cleanup = KillOnDrop(first.iter().map(|(pid, _)| *pid).collect());
    let addr = format!("127.0.0.1:{}", first[0].1);
    until_answers(&addr, "/healthz").await;
    terminate(agent).await;
    assert_eq!(
        version_at(&addr).await,
        "hello from v1\n",
        "stopped with the agent"
    );
    assert_eq!(kept(&file), first, "no longer kept");

    // Told to stop them on exit, the next takes them over and stops them as it stops.
    let stopping = ["--stop-instances-on-exit"];
    let mut agent = agent_with(&file, &controller, &stopping, std::process::Stdio::null());
    let admin = listening(&mut agent).await;
    until_answers(&admin, "/readyz").await;
    assert_eq!(kept(&file), first, "not taken over");
    terminate(agent).await;
    assert!(gone(first[0].0), "the instance runs");
    assert!(!file.exists(), "still kept");
}

#[tokio::test]
async fn the_process_drivers_flags_are_refused_with_the_kubernetes_driver() {
    let dir = tempfile::tempdir().unwrap();
    let more = ["--driver", "kubernetes", "--stop-instances-on-exit"];
    let refused = agent_with(
        &dir.path().join("i.json"),
        "http://127.0.0.1:1",
        &more,
        std::process::Stdio::piped(),
    );
    let out = tokio::time::timeout(Duration::from_secs(10), refused.wait_with_output()).await;
    let out = out.expect("still runs").unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--instances-file and --stop-instances-on-exit are for --driver process"),
        "{said}"
    );
}

/// Waits, up to 20 s, for `file` to keep an instance: what it keeps.
async fn running(file: &std::path::Path) -> Vec<(u32, u16)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = kept(file);
        if !found.is_empty() {
            return found;
        }
        assert!(Instant::now() < deadline, "no instance kept in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, up to 20 s, for `path` at `addr` to answer 2xx.
async fn until_answers(addr: &str, path: &str) {
    let http = fleet_agent::http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = |r: Result<reqwest::Response, _>| r.is_ok_and(|r| r.status().is_success());
    while !ok(http.get(format!("http://{addr}{path}")).send().await) {
        assert!(Instant::now() < deadline, "{addr}{path} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether process `pid` has ended (gone, or a zombie not yet reaped).
fn gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    stat.is_err() || stat.is_ok_and(|s| s.contains(") Z "))
}

/// TEST-ONLY: kills the processes `0` names as it is dropped (they are the test's own).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let pid = i32::try_from(*pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}
