//! What the controller's gRPC tests share: a controller on loopback, and test-only fake agents.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub const QUICK: &str = include_str!("../../../deploy/examples/quick.yaml");

/// A controller serving on loopback until dropped.
pub struct Server {
    pub grpc: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start(data: &std::path::Path) -> Server {
        Server::start_with(data, fleet_controller::Limits::default()).await
    }

    /// A controller that bears with its peers as `limits` say.
    pub async fn start_with(data: &std::path::Path, limits: fleet_controller::Limits) -> Server {
        let options = fleet_controller::Options {
            limits,
            ..Default::default()
        };
        Server::start_options(data, options).await
    }

    /// A controller that serves as `options` say.
    pub async fn start_options(
        data: &std::path::Path,
        options: fleet_controller::Options,
    ) -> Server {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", grpc.local_addr().unwrap());
        let (stop, shutdown) = watch::channel(false);
        let data = data.to_path_buf();
        let task = tokio::spawn(async move {
            fleet_controller::serve_with(grpc, admin, &data, shutdown, options).await
        });
        Server {
            grpc: addr,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }

    pub async fn client(&self) -> ReleaseServiceClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ReleaseServiceClient::connect(self.grpc.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("controller did not come up: {e}"),
            }
        }
    }
}

/// What a fake agent saw: every desired state applied, as (release, seq, canary weight).
pub type Applied = Arc<Mutex<Vec<(String, u64, u32)>>>;

/// A test-only agent for one region: applies what it is sent and reports counters every
/// 100 ms (1000 requests a tick), failing `canary_errors` of the canary's requests.
pub fn fake_agent(
    addr: String,
    region: &str,
    canary_errors: f64,
) -> (Applied, tokio::task::JoinHandle<()>) {
    let applied: Applied = Arc::default();
    let seen = applied.clone();
    let region = region.to_string();
    let task = tokio::spawn(async move {
        let mut client = loop {
            if let Ok(c) = AgentServiceClient::connect(addr.clone()).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            region: region.clone(),
            cluster: format!("{}-a", short(&region)),
            agent_version: "test".into(),
            ..Default::default()
        };
        tx.send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        })
        .await
        .unwrap();
        let Ok(response) = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        else {
            return;
        };
        let mut inbound = response.into_inner();
        let mut current: Option<pb::DesiredState> = None;
        let (mut stable, mut canary) = (pb::TrackStats::default(), pb::TrackStats::default());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                message = inbound.next() => {
                    let Some(Ok(pb::ControllerMessage { message: Some(pb::controller_message::Message::Desired(d)) })) = message else { return };
                    let fresh = current.as_ref().is_none_or(|c| c.release_id != d.release_id || c.seq != d.seq);
                    if fresh {
                        let weight = if d.canary.is_some() { d.routes.as_ref().map_or(0, |r| r.canary_weight_bp) } else { 0 };
                        seen.lock().unwrap().push((d.release_id.clone(), d.seq, weight));
                    }
                    current = Some(d);
                }
                _ = tick.tick() => {
                    let Some(d) = &current else { continue };
                    let weight = if d.canary.is_some() { d.routes.as_ref().map_or(0, |r| r.canary_weight_bp) } else { 0 };
                    let to_canary = u64::from(weight) * 1000 / 10_000;
                    canary.requests += to_canary;
                    canary.errors += (to_canary as f64 * canary_errors).round() as u64;
                    stable.requests += 1000 - to_canary;
                    let status = pb::AgentStatus {
                        epoch: d.epoch,
                        applied_seq: d.seq,
                        release_id: d.release_id.clone(),
                        ready: true,
                        stats: Some(pb::TrafficStats { stable: Some(stable.clone()), canary: Some(canary.clone()) }),
                        detail: String::new(),
                        ..Default::default()
                    };
                    if tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Status(status)) }).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (applied, task)
}

/// One test-only agent per region of the quick fleet, stopped when dropped.
pub struct Agents(pub BTreeMap<&'static str, (Applied, tokio::task::JoinHandle<()>)>);

pub fn fake_agents(server: &Server, canary_errors: f64) -> Agents {
    let agents = ["us-west", "us-east", "eu-west"]
        .into_iter()
        .map(|r| (r, fake_agent(server.grpc.clone(), r, canary_errors)))
        .collect();
    Agents(agents)
}

impl std::ops::Index<&str> for Agents {
    type Output = (Applied, tokio::task::JoinHandle<()>);

    fn index(&self, region: &str) -> &Self::Output {
        &self.0[region]
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

pub fn short(region: &str) -> &str {
    match region {
        "us-west" => "usw",
        "us-east" => "use",
        _ => "euw",
    }
}

pub async fn apply_and_start(client: &mut ReleaseServiceClient<Channel>) -> String {
    let applied = client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-1".into(),
            manifest: QUICK.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.fleet.unwrap().waves, ["first", "second", "last"]);
    start_v2(client).await.id
}

/// Starts releasing v2 (from v1) of the fleet applied, as alice: the release, as the start
/// answered it.
pub async fn start_v2(client: &mut ReleaseServiceClient<Channel>) -> pb::Release {
    let start = pb::StartReleaseRequest {
        request_id: "start-1".into(),
        service: "demo".into(),
        version: "v2".into(),
        from_version: "v1".into(),
        actor: "alice".into(),
        ..Default::default()
    };
    client.start_release(start).await.unwrap().into_inner()
}

/// A controller on `data` with the quick fleet applied, and a client of it.
pub async fn quick_applied(data: &std::path::Path) -> (Server, ReleaseServiceClient<Channel>) {
    let server = Server::start(data).await;
    let mut client = server.client().await;
    let apply = pb::ApplyFleetRequest {
        request_id: "apply".into(),
        manifest: QUICK.into(),
    };
    client.apply_fleet(apply).await.unwrap();
    (server, client)
}

/// Starts releasing v3 of the fleet [`apply_and_start`] applied, once v2 has ended: its id.
pub async fn start_v3(client: &mut ReleaseServiceClient<Channel>) -> String {
    let started = client.start_release(pb::StartReleaseRequest {
        request_id: "start-2".into(),
        service: "demo".into(),
        version: "v3".into(),
        ..Default::default()
    });
    started.await.unwrap().into_inner().id
}

pub async fn wait_for(
    client: &mut ReleaseServiceClient<Channel>,
    id: &str,
    within: Duration,
    done: impl Fn(&pb::Release) -> bool,
) -> pb::Release {
    let deadline = Instant::now() + within;
    loop {
        let release = client
            .get_release(pb::GetReleaseRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if done(&release) {
            return release;
        }
        assert!(
            Instant::now() < deadline,
            "timed out; release is {release:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The canary weights a fake agent applied, leaving out the baseline (seq 0) a region gets
/// when a release starts before its wave does.
pub fn weights(applied: &Applied) -> Vec<u32> {
    applied
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, seq, _)| *seq > 0)
        .map(|(_, _, w)| *w)
        .collect()
}

/// Opens the stream of an agent of cluster usw-a in us-west; it stays open while the sender
/// lives.
pub async fn usw_a_says_hello(
    agents: AgentServiceClient<Channel>,
) -> (
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::ControllerMessage>,
) {
    let (tx, inbound) = usw_a_says_hello_as(agents, "").await;
    (tx, inbound.unwrap())
}

/// As [`usw_a_says_hello`], for the agent process `instance`: what the controller answered.
pub async fn usw_a_says_hello_as(
    agents: AgentServiceClient<Channel>,
    instance: &str,
) -> (
    mpsc::Sender<pb::AgentMessage>,
    Result<tonic::Streaming<pb::ControllerMessage>, tonic::Status>,
) {
    says_hello(agents, "us-west", "usw-a", instance).await
}

/// Opens the stream of agent process `instance` of `cluster` in `region`: the sender (the
/// stream stays open while it lives) and what the controller answered.
pub async fn says_hello(
    mut agents: AgentServiceClient<Channel>,
    region: &str,
    cluster: &str,
    instance: &str,
) -> (
    mpsc::Sender<pb::AgentMessage>,
    Result<tonic::Streaming<pb::ControllerMessage>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        region: region.into(),
        cluster: cluster.into(),
        instance: instance.into(),
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    })
    .await
    .unwrap();
    let inbound = agents
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, inbound)
}

/// What a [`freezable_relay`] does with its connections.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    Open,
    /// Passes nothing more either way and keeps both sockets open: a path that died without a
    /// word.
    Frozen,
    /// Closes both sockets.
    Cut,
}

/// A TEST-ONLY TCP relay to `to`, its connections' path as `path` says.
pub async fn freezable_relay(to: String, path: watch::Receiver<Path>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(to.trim_start_matches("http://"))
                .await
                .unwrap();
            let (c_read, c_write) = client.into_split();
            let (s_read, s_write) = server.into_split();
            for (mut from, mut into) in [
                (
                    Box::new(c_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(s_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                ),
                (Box::new(s_read), Box::new(c_write)),
            ] {
                let mut path = path.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0; 16 * 1024];
                    loop {
                        let n = tokio::select! {
                            n = from.read(&mut buf) => n.unwrap_or(0),
                            _ = path.wait_for(|p| *p >= Path::Frozen) => break,
                        };
                        if n == 0 || into.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    // Frozen: hold both ends open, passing nothing, until cut.
                    let _ = path.wait_for(|p| *p == Path::Cut).await;
                    drop((from, into));
                });
            }
        }
    });
    addr
}
