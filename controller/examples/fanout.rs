//! Benchmark, not a test: how fast a decision reaches 1,000 agents, and what the controller
//! costs in memory with them connected.
//!
//! Starts `fleet-controller` (the release binary next to this one) on 127.0.0.1:0, connects
//! `AGENTS` simulated agents in this process (each on its own HTTP/2 connection, as real agents
//! are), applies a fleet of 10 regions of 100 clusters in one wave, and starts a release: the
//! engine decides the first step for all 10 regions at once. Each agent notes when the desired
//! state reached it. Then every agent acknowledges, and `Abort` is timed until every agent has
//! its rollback. Prints p50/p99/max latencies and the controller's RSS.
//!
//! cargo build --release -p fleet-controller --examples --bins
//! target/release/examples/fanout

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

const REGIONS: usize = 10;
const CLUSTERS_PER_REGION: usize = 100;

/// When each agent received each desired state: (agent, seq, canary present, instant).
type Seen = Arc<Mutex<Vec<(usize, u64, bool, Instant)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .context("target dir")?
        .join("fleet-controller");
    let data = std::env::temp_dir().join(format!("fleet-fanout-{}", std::process::id()));
    let mut controller = tokio::process::Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut lines = BufReader::new(controller.stdout.take().context("stdout")?).lines();
    let line = lines
        .next_line()
        .await?
        .context("the controller said nothing")?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .context("no grpc address")?
        .to_string();
    let url = format!("http://{grpc}");
    let pid = controller.id().context("pid")?;
    let rss_before = rss_kib(pid);

    let seen: Seen = Arc::default();
    let (ack_tx, _) = tokio::sync::broadcast::channel::<()>(4);
    let agents = REGIONS * CLUSTERS_PER_REGION;
    let mut connected = Vec::new();
    for i in 0..agents {
        connected.push(tokio::spawn(agent(
            url.clone(),
            i,
            seen.clone(),
            ack_tx.subscribe(),
        )));
    }
    for c in connected {
        c.await??;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kib(pid);

    let mut client = ReleaseServiceClient::connect(url.clone()).await?;
    client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply".into(),
            manifest: manifest(),
        })
        .await?;
    let decided = Instant::now();
    let request = pb::StartReleaseRequest {
        request_id: "start".into(),
        service: "bench".into(),
        version: "v2".into(),
        from_version: "v1".into(),
        actor: "bench".into(),
        ..Default::default()
    };
    let release = client.start_release(request).await?.into_inner();
    let first = wait_all(&seen, agents, |canary| canary, Duration::from_secs(30)).await;
    let fanout = latencies(&first, decided);
    // Every agent acknowledges; then abort and time the rollback to every agent.
    let _ = ack_tx.send(());
    tokio::time::sleep(Duration::from_secs(2)).await;
    seen.lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();
    let aborted = Instant::now();
    client
        .abort(pb::OperatorRequest {
            request_id: "abort".into(),
            id: release.id,
            actor: "bench".into(),
            reason: "bench".into(),
            ..Default::default()
        })
        .await?;
    let rolled = wait_all(&seen, agents, |canary| !canary, Duration::from_secs(30)).await;
    let abort = latencies(&rolled, aborted);
    let rss_after = rss_kib(pid);

    println!(
        "agents: {agents} ({REGIONS} regions × {CLUSTERS_PER_REGION} clusters), each on its own gRPC connection"
    );
    println!("decision → desired state at every agent: {fanout}");
    println!("abort → rollback desired state at every agent: {abort}");
    println!(
        "controller RSS: {} MiB idle, {} MiB with the agents connected, {} MiB after the release",
        rss_before / 1024,
        rss_connected / 1024,
        rss_after / 1024
    );
    controller.kill().await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// One simulated agent: says hello, records every desired state, acknowledges when told to.
async fn agent(
    url: String,
    i: usize,
    seen: Seen,
    mut ack: tokio::sync::broadcast::Receiver<()>,
) -> anyhow::Result<()> {
    let mut client = AgentServiceClient::connect(url).await?;
    let (tx, rx) = mpsc::channel(8);
    let hello = pb::Hello {
        region: format!("r{}", i / CLUSTERS_PER_REGION),
        cluster: format!("c{i}"),
        agent_version: "bench".into(),
        instance: format!("bench/{i}"),
        capabilities: vec![],
    };
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    })
    .await?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move {
        let mut last: Option<pb::DesiredState> = None;
        loop {
            tokio::select! {
                m = inbound.next() => {
                    let Some(Ok(pb::ControllerMessage { message: Some(pb::controller_message::Message::Desired(d)) })) = m else { return };
                    if let Ok(mut s) = seen.lock() {
                        s.push((i, d.seq, d.canary.is_some(), Instant::now()));
                    }
                    last = Some(d);
                }
                r = ack.recv() => {
                    if r.is_err() { return; }
                    if let Some(d) = &last {
                        let status = pb::AgentStatus { epoch: d.epoch, applied_seq: d.seq, release_id: d.release_id.clone(), ready: true, stats: None, detail: String::new(), ..Default::default() };
                        let _ = tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Status(status)) }).await;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Per agent, the first time it saw a desired state for which `wanted(canary present)` holds.
async fn wait_all(
    seen: &Seen,
    agents: usize,
    wanted: impl Fn(bool) -> bool,
    within: Duration,
) -> Vec<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let firsts: Vec<Instant> = {
            let s = seen.lock().map(|s| s.clone()).unwrap_or_default();
            let mut by_agent = vec![None; agents];
            for (i, _, canary, at) in s {
                if wanted(canary) && by_agent[i].is_none() {
                    by_agent[i] = Some(at);
                }
            }
            by_agent.into_iter().flatten().collect()
        };
        if firsts.len() == agents || Instant::now() > deadline {
            return firsts;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn latencies(at: &[Instant], from: Instant) -> String {
    let mut ms: Vec<f64> = at
        .iter()
        .map(|t| t.duration_since(from).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| {
        ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        "{} agents, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// 10 regions of 100 clusters, all in one wave.
fn manifest() -> String {
    let mut m = String::from(
        "apiVersion: fleet/v1\nservice:\n  name: bench\n  workload: { command: [\"true\"] }\nregions:\n",
    );
    for r in 0..REGIONS {
        m += &format!("  - name: r{r}\n    traffic_share: 10\n    clusters:\n");
        for c in 0..CLUSTERS_PER_REGION {
            m += &format!("      - {{ name: c{} }}\n", r * CLUSTERS_PER_REGION + c);
        }
    }
    let names: Vec<String> = (0..REGIONS).map(|r| format!("r{r}")).collect();
    m += &format!(
        "waves:\n  - {{ name: all, regions: [{}] }}\n",
        names.join(", ")
    );
    m += "strategy:\n  canary: { steps: [{ weight: 10, pause: 1h }] }\n";
    m
}
