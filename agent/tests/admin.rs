//! The agent's admin endpoints (`--admin`), from the real binary on 127.0.0.1, against a
//! TEST-ONLY fake controller that holds an agent's stream open and sends nothing; and an
//! agent whose reconcile loop hangs (in a TEST-ONLY driver that never answers), run in this
//! process.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Test-only: takes an agent's stream and keeps it open, saying nothing, until `stop`.
struct Silent {
    stop: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AgentService for Silent {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    async fn session(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let open = WatchStream::new(self.stop.clone()).take_while(|stop| !*stop);
        let nothing = open.filter_map(|_| None::<Result<pb::ControllerMessage, Status>>);
        Ok(Response::new(Box::pin(nothing)))
    }
}

/// The body and status of `GET path`, within 5 s.
async fn get(admin: &str, path: &str) -> (u16, String) {
    let response = fleet_agent::http_client()
        .get(format!("http://{admin}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Polls `GET path` until `check` holds, within 10 s; the last answer.
async fn until(admin: &str, path: &str, check: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = get(admin, path).await;
        if check(code, &body) {
            return (code, body);
        }
        assert!(Instant::now() < deadline, "{path}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample `name` (with its labels) in `metrics`.
fn sample(metrics: &str, name: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
    line[name.len()..].trim().parse().unwrap()
}

#[tokio::test]
async fn the_admin_endpoints_tell_the_loop_alive_and_the_controller_link_as_it_comes_and_goes() {
    // The controller's port is bound before the agent starts but not served until later: the
    // agent's dial waits in its backlog.
    let controller = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", controller.local_addr().unwrap());
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", proxy.local_addr().unwrap());
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .args([
            "--controller",
            &url,
            "--region",
            "us-west",
            "--cluster",
            "usw-a",
        ])
        .args(["--proxy-admin", &proxy, "--admin", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let admin = line
        .strip_prefix("fleet-agent listening admin=")
        .unwrap()
        .to_owned();

    // Alive, the loop going round; not ready while the controller does not answer.
    let (_, metrics) = until(&admin, "/metrics", |_, m| {
        sample(m, "fleet_agent_reconcile_rounds_total") >= 2.0
    })
    .await;
    assert!(sample(&metrics, "fleet_agent_reconcile_last_round_seconds") > 1.7e9);
    assert_eq!(get(&admin, "/healthz").await, (200, "ok\n".into()));
    let (code, body) = get(&admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.starts_with("not connected to the controller: "),
        "{body}"
    );
    assert_eq!(sample(&metrics, "fleet_agent_controller_connected"), 0.0);
    assert!(
        metrics.contains(
            "fleet_agent_info{region=\"us-west\",cluster=\"usw-a\",driver=\"process\",version=\""
        ),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "fleet_agent_desired_seq{release=\"\"}"),
        0.0
    );

    // The controller answers: ready.
    let (stop, stopping) = watch::channel(false);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Silent { stop: stopping }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(controller)),
    );
    until(&admin, "/readyz", |code, _| code == 200).await;
    let (_, metrics) = get(&admin, "/metrics").await;
    assert_eq!(sample(&metrics, "fleet_agent_controller_connected"), 1.0);
    assert_eq!(
        sample(&metrics, "fleet_agent_controller_disconnects_total"),
        0.0
    );

    // It ends the stream and goes: not ready again, saying why, and counted.
    stop.send(true).unwrap();
    server.abort();
    let (_, body) = until(&admin, "/readyz", |code, _| code == 503).await;
    assert!(
        body.starts_with("not connected to the controller: "),
        "{body}"
    );
    let (_, metrics) = get(&admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "fleet_agent_controller_disconnects_total"),
        1.0
    );
    let (code, _) = get(&admin, "/nothing").await;
    assert_eq!(code, 404);
    agent.kill().await.unwrap();
}

/// Test-only: a driver whose every poll hangs, as a reconcile loop stuck in it would.
struct Hanging;

impl fleet_agent::driver::Driver for Hanging {
    fn apply(&mut self, _: &fleet_agent::driver::Want) {}

    async fn poll(&mut self) -> fleet_agent::driver::Running {
        std::future::pending().await
    }

    async fn shutdown(&mut self) {}
}

/// Test-only: a controller that sends each agent one desired state and counts the streams
/// opened and those still open.
#[derive(Clone, Default)]
struct Counting {
    opened: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl AgentService for Counting {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        self.open.fetch_add(1, Ordering::SeqCst);
        let (open, mut inbound) = (self.open.clone(), request.into_inner());
        tokio::spawn(async move {
            while let Some(Ok(_)) = inbound.next().await {}
            open.fetch_sub(1, Ordering::SeqCst);
        });
        let desired = pb::DesiredState {
            epoch: 1,
            seq: 1,
            release_id: "demo-1".into(),
            stable: Some(pb::Track {
                version: "v1".into(),
                replicas: 1,
            }),
            ..Default::default()
        };
        let message = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Desired(desired)),
        };
        let then_nothing = tokio_stream::once(Ok(message)).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(then_nothing)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_loop_hangs_fails_healthz_and_keeps_away_from_the_controller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let controller = Counting::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(controller.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let config = fleet_agent::Config {
        controller: url,
        region: "us-west".into(),
        cluster: "usw-a".into(),
        proxies: fleet_agent::discover::ProxySource::Listed(Vec::new()),
        tls: Default::default(),
        driver: "test".into(),
        hung_after: Duration::from_secs(1),
        stale_after: fleet_agent::STALE_AFTER,
        held_limit: fleet_agent::HELD_LIMIT,
        watches: Default::default(),
    };
    let (_stop, shutdown) = watch::channel(false);
    let agent = tokio::spawn(fleet_agent::run(config, Hanging, Some(admin), shutdown));

    // It connects, takes the desired state, and its loop hangs in the driver: unhealthy, and
    // it leaves the controller, saying why.
    let (_, body) = until(&admin_addr, "/healthz", |code, _| code == 503).await;
    assert!(
        body.starts_with("the reconcile loop has not gone round for "),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while controller.open.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the agent stays connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = get(&admin_addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("the reconcile loop has not gone round"),
        "{body}"
    );
    // And it keeps away while the loop is stuck.
    let kept_away = Instant::now();
    while kept_away.elapsed() < Duration::from_secs(3) {
        assert_eq!(controller.opened.load(Ordering::SeqCst), 1, "dialled again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.abort();
    server.abort();
}
