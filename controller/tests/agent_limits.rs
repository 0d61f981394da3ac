//! How long the controller bears with agents, over real gRPC on 127.0.0.1 with shortened
//! limits: a stream that never says hello, an agent that goes silent on an open stream, and a
//! path that dies without a word. A region whose agent is let go is told unreachable in the
//! running release, as when its connection drops.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use fleet_controller::Limits;
use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use support::*;

/// Whether us-west's agent is counted present in release `id`.
async fn west_reachable(client: &mut ReleaseServiceClient<Channel>, id: &str) -> bool {
    let release = client
        .get_release(pb::GetReleaseRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    release
        .regions
        .iter()
        .any(|g| g.region == "us-west" && g.reachable)
}

/// Waits until us-west is counted present (`true`) or not in release `id`; how long it took.
async fn west_becomes(
    client: &mut ReleaseServiceClient<Channel>,
    id: &str,
    reachable: bool,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    while west_reachable(client, id).await != reachable {
        assert!(
            start.elapsed() < within,
            "us-west not {} within {within:?}",
            if reachable {
                "reachable"
            } else {
                "unreachable"
            }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn status() -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(pb::agent_message::Message::Status(
            pb::AgentStatus::default(),
        )),
    }
}

#[tokio::test]
async fn a_stream_that_never_says_hello_is_ended_after_hello_within() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        hello_within: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = Server::start_with(dir.path(), limits).await;
    let _ = server.client().await;
    let mut agents = AgentServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    // Open, and nothing said on it.
    let (_tx, rx) = mpsc::channel::<pb::AgentMessage>(1);
    let start = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        agents.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the controller answers a stream without hello");
    let refused = answer.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused:?}");
    assert_eq!(refused.message(), "no hello within 300ms");
    assert!(start.elapsed() >= Duration::from_millis(300));
    server.stop().await;
}

#[tokio::test]
async fn an_agent_silent_on_an_open_stream_is_let_go_and_its_region_told_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let silent_after = Duration::from_secs(2);
    let limits = Limits {
        silent_after,
        ..Limits::default()
    };
    let server = Server::start_with(dir.path(), limits).await;
    let mut client = server.client().await;
    let id = apply_and_start(&mut client).await;
    let agents = AgentServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let (tx, mut inbound) = usw_a_says_hello(agents).await;
    // Reporting every 100 ms, it stays: for twice as long as it may be silent.
    let talking = tokio::spawn({
        let tx = tx.clone();
        async move {
            loop {
                if tx.send(status()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    west_becomes(&mut client, &id, true, Duration::from_secs(5)).await;
    let stayed = Instant::now();
    while stayed.elapsed() < silent_after * 2 {
        assert!(
            west_reachable(&mut client, &id).await,
            "let go while talking"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then silent, its stream still open (a hung agent): let go, and the region unreachable.
    talking.abort();
    let took = west_becomes(&mut client, &id, false, Duration::from_secs(10)).await;
    assert!(took >= silent_after / 2, "let go after {took:?}");
    // Its stream is ended, so that a live agent dials again.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the agent's stream stays open");
    drop(tx);
    server.stop().await;
}

#[tokio::test]
async fn the_controller_lets_go_an_agent_whose_path_died_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    // Pings every second, each given as long (the test's own client is pinged too: a busy
    // machine answers late, not never); silence alone would take a minute.
    let keepalive = Duration::from_secs(1);
    let limits = Limits {
        keepalive,
        silent_after: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = Server::start_with(dir.path(), limits).await;
    let mut client = server.client().await;
    let id = apply_and_start(&mut client).await;
    let (path, paths) = watch::channel(Path::Open);
    let relay = freezable_relay(server.grpc.clone(), paths).await;
    // The agent's own pings are off: only the controller's can tell.
    let agents = AgentServiceClient::connect(relay).await.unwrap();
    let (tx, _inbound) = usw_a_says_hello(agents).await;
    west_becomes(&mut client, &id, true, Duration::from_secs(5)).await;
    tokio::time::sleep(keepalive * 4).await;
    assert!(
        west_reachable(&mut client, &id).await,
        "let go while its pings are answered"
    );

    path.send(Path::Frozen).unwrap();
    west_becomes(&mut client, &id, false, Duration::from_secs(10)).await;
    drop(tx);
    path.send(Path::Cut).unwrap();
    server.stop().await;
}

/// A controller on `data` releasing the quick fleet, with no agent connected: it, a client
/// of its releases, the release's id and a client of its agent service.
async fn released(
    data: &std::path::Path,
) -> (
    Server,
    ReleaseServiceClient<Channel>,
    String,
    AgentServiceClient<Channel>,
) {
    let server = Server::start(data).await;
    let mut client = server.client().await;
    let id = apply_and_start(&mut client).await;
    let agents = AgentServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    (server, client, id, agents)
}

/// The next desired state on `inbound`, within 5 s.
async fn desired_on(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> pb::DesiredState {
    let next = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await;
    match next
        .expect("no word in 5 s")
        .unwrap()
        .and_then(|m| m.message)
    {
        Some(pb::controller_message::Message::Desired(d)) => d,
        other => panic!("not a desired state: {other:?}"),
    }
}

#[tokio::test]
async fn a_second_agent_for_a_connected_cluster_is_refused_and_the_first_may_dial_again() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, id, agents) = released(dir.path()).await;
    let (first_tx, first) = usw_a_says_hello_as(agents.clone(), "node-a/7/aa").await;
    let mut first = first.unwrap();
    assert_eq!(desired_on(&mut first).await.release_id, id);

    // Another agent for usw-a (a copy started by mistake): refused, naming the one connected.
    let (_second_tx, second) = usw_a_says_hello_as(agents.clone(), "node-b/9/bb").await;
    let refused = second.expect_err("a second agent for usw-a was taken");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    let said = refused.message();
    let named =
        "cluster usw-a of region us-west has an agent connected already (instance \"node-a/7/aa\"";
    assert!(said.starts_with(named), "{said}");
    assert!(
        said.contains("stop one, or give each its own --cluster"),
        "{said}"
    );
    // The first is still the one the controller speaks to.
    assert!(west_reachable(&mut client, &id).await);

    // The first dials again (its loop stood still, say): its new stream replaces the old one,
    // which ends, rather than being refused for the old one.
    let (again_tx, again) = usw_a_says_hello_as(agents.clone(), "node-a/7/aa").await;
    let mut again = again.expect("the same agent dialling again was refused");
    assert_eq!(desired_on(&mut again).await.release_id, id);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = first.message().await {}
    });
    assert!(ended.await.is_ok(), "the replaced stream stays open");
    drop(first_tx);
    let stayed = Instant::now();
    while stayed.elapsed() < Duration::from_millis(500) {
        let reachable = west_reachable(&mut client, &id).await;
        assert!(reachable, "the old stream's end took the new one's cluster");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Once it is gone, another agent may take the cluster.
    drop(again_tx);
    west_becomes(&mut client, &id, false, Duration::from_secs(5)).await;
    let (_other_tx, other) = usw_a_says_hello_as(agents.clone(), "node-b/9/bb").await;
    let mut other = other.expect("refused after the first was gone");
    assert_eq!(desired_on(&mut other).await.release_id, id);
    // An agent from before instances were said cannot be told from a redial: it is taken.
    let (_old_tx, old) = usw_a_says_hello_as(agents, "").await;
    assert_eq!(desired_on(&mut old.expect("refused")).await.release_id, id);
    server.stop().await;
}

#[tokio::test]
async fn an_agent_of_a_cluster_no_manifest_names_is_sent_nothing_until_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, id, agents) = released(dir.path()).await;
    // usw-z: in us-west, but no cluster of the fleet's (one renamed, say).
    let (_stray_tx, stray) = says_hello(agents.clone(), "us-west", "usw-z", "node-z/1/zz").await;
    let mut stray = stray.expect("refused");
    let (_tx, mut west) = usw_a_says_hello(agents).await;
    assert_eq!(desired_on(&mut west).await.release_id, id);
    let sent = tokio::time::timeout(Duration::from_secs(1), stray.message()).await;
    assert!(sent.is_err(), "the stray was sent {sent:?}");
    let listed = client
        .list_agents(pb::ListAgentsRequest {
            service: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    let found = listed.iter().find(|a| a.cluster == "usw-z");
    assert!(found.is_some_and(|a| a.unnamed), "{listed:?}");

    // The fleet names it: it is sent its region's desired state at once.
    let renamed = QUICK.replace("[{ name: usw-a }]", "[{ name: usw-a }, { name: usw-z }]");
    let applied = client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-2".into(),
            manifest: renamed,
        })
        .await
        .unwrap()
        .into_inner();
    // A cluster added under the release takes none away: nothing to warn of.
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert_eq!(desired_on(&mut stray).await.release_id, id);
    server.stop().await;
}

#[tokio::test]
async fn a_superseded_release_rolls_back_the_agents_only_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, id, agents) = released(dir.path()).await;
    let (_tx, mut west) = usw_a_says_hello(agents).await;
    let step = desired_on(&mut west).await;
    assert!(step.release_id == id && step.canary.is_some(), "{step:?}");
    // The fleet renames the cluster; the release under way still names usw-a.
    let renamed = QUICK.replace("[{ name: usw-a }]", "[{ name: usw-b }]");
    let apply = pb::ApplyFleetRequest {
        request_id: "apply-2".into(),
        manifest: renamed.clone(),
    };
    // Applied, with a warning that points at the clusters and says what becomes of usw-a.
    let warnings = client
        .apply_fleet(apply)
        .await
        .unwrap()
        .into_inner()
        .warnings;
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    assert_eq!(
        (w.severity.as_str(), w.path.as_str()),
        ("warning", "regions[0].clusters")
    );
    let line = renamed.lines().nth(w.line as usize - 1).unwrap_or_default();
    assert!(line.contains("usw-b"), "line {}: {line}", w.line);
    assert_eq!(
        w.message,
        format!(
            "cluster usw-a of region us-west is named no longer, but release {id}, under way, steers it"
        )
    );
    assert!(
        w.help
            .starts_with(&format!("{id} goes on with the clusters it started with"))
    );
    let start = pb::StartReleaseRequest {
        request_id: "start-2".into(),
        service: "demo".into(),
        version: "v3".into(),
        supersede: true,
        ..Default::default()
    };
    client.start_release(start).await.unwrap();
    // The superseded release's rollback reaches the agent it named, though it has ended.
    let rollback = desired_on(&mut west).await;
    assert!(
        rollback.release_id == id && rollback.canary.is_none(),
        "{rollback:?}"
    );
    server.stop().await;
}

/// What the controller logged, for a test to read: its tracing output, kept.
#[derive(Clone, Default)]
struct Logged(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    /// Waits up to 5 s for a line saying `what`: that line.
    async fn line(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            if let Some(line) = text.lines().find(|l| l.contains(what)) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "never logged {what:?}:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn an_agent_before_any_manifest_is_no_warning_and_one_no_manifest_names_after_is() {
    // The test's own thread runs the controller's tasks: a default subscriber sees them.
    let logged = Logged::default();
    let writer = logged.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = AgentServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    // A fleet coming up, its agents first.
    let (_tx, _first) = usw_a_says_hello(agents.clone()).await;
    let line = logged.line("before any manifest was applied").await;
    assert!(line.contains("INFO") && line.contains("usw-a"), "{line}");
    client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-1".into(),
            manifest: QUICK.into(),
        })
        .await
        .unwrap();
    // Then one the fleet does not name (misnamed, or renamed away).
    let (_stray_tx, stray) = says_hello(agents, "us-west", "usw-z", "node-z/1/zz").await;
    let _stray = stray.expect("refused");
    let line = logged.line("no manifest names").await;
    assert!(line.contains("WARN") && line.contains("usw-z"), "{line}");
    let text = String::from_utf8_lossy(&logged.0.lock().unwrap()).into_owned();
    assert_eq!(text.matches("no manifest names").count(), 1, "{text}");
    server.stop().await;
}
