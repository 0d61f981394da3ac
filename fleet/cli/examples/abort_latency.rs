//! Benchmark, not a test: from `release abort` to every region's proxy serving 100% stable,
//! with 10 regions of real processes on 127.0.0.1 (controller, and per region a fleet-proxy and
//! a fleet-agent running the demo app).
//!
//! Each trial starts a release, waits until every proxy splits 50/50, calls Abort, and polls
//! every proxy's `GET /routes` every millisecond until it routes nothing to the canary.
//!
//! cargo build --release --workspace --bins --examples
//! target/release/examples/abort_latency

use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use fleetctl::local::LocalFleet;

const REGIONS: usize = 10;
const TRIALS: usize = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = fleetctl::local::bin_dir()?;
    let names: Vec<(String, String)> = (0..REGIONS)
        .map(|r| (format!("r{r}"), format!("c{r}")))
        .collect();
    let regions: Vec<(&str, &str)> = names
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    let dir = std::env::temp_dir().join(format!("fleet-abort-{}", std::process::id()));
    let mut fleet = LocalFleet::start(&dir, &bin, &regions, &[]).await?;
    let result = trials(&fleet).await;
    fleet.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut ms = result?;
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "abort → proxy serving 100% stable, {REGIONS} regions × {TRIALS} trials: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    );
    Ok(())
}

async fn trials(fleet: &LocalFleet) -> anyhow::Result<Vec<f64>> {
    let mut client = ReleaseServiceClient::connect(fleet.controller.clone()).await?;
    client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply".into(),
            manifest: manifest(),
        })
        .await?;
    let http = fleetctl::local::http_client();
    let mut samples = Vec::new();
    for trial in 0..TRIALS {
        let version = format!("v{}", trial + 2);
        let request = pb::StartReleaseRequest {
            request_id: format!("start-{trial}"),
            service: "bench".into(),
            version,
            from_version: "v1".into(),
            actor: "bench".into(),
            ..Default::default()
        };
        let id = client.start_release(request).await?.into_inner().id;
        for r in &fleet.regions {
            wait_for_split(
                &http,
                &format!("http://{}/routes", r.admin),
                |c| c == 5000,
                Duration::from_secs(60),
            )
            .await?;
        }
        let aborted = Instant::now();
        let abort = pb::OperatorRequest {
            request_id: format!("abort-{trial}"),
            id,
            actor: "bench".into(),
            reason: "bench".into(),
            ..Default::default()
        };
        let release = client.abort(abort).await?.into_inner().id;
        let waits = fleet.regions.iter().map(|r| {
            let http = http.clone();
            let url = format!("http://{}/routes", r.admin);
            async move {
                wait_for_split(&http, &url, |c| c == 0, Duration::from_secs(30)).await?;
                anyhow::Ok(aborted.elapsed().as_secs_f64() * 1000.0)
            }
        });
        let mut tasks = Vec::new();
        for w in waits {
            tasks.push(tokio::spawn(w));
        }
        for t in tasks {
            samples.push(t.await??);
        }
        // The next release may start once every agent has acknowledged the rollback.
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get_release(pb::GetReleaseRequest {
                id: release.clone(),
            })
            .await?
            .into_inner()
            .phase
            != "rolled_back"
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "release {release} did not finish rolling back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(samples)
}

/// Polls a proxy's table every millisecond until its canary share satisfies `done`.
async fn wait_for_split(
    http: &reqwest::Client,
    url: &str,
    done: impl Fn(u64) -> bool,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let table: serde_json::Value = http.get(url).send().await?.json().await?;
        if done(table["routes"][0]["split"]["canary"].as_u64().unwrap_or(0)) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{url} never got there: {table}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// 10 regions in one wave; a 50% step that holds an hour, so only an abort ends it.
fn manifest() -> String {
    let mut m = String::from(
        "apiVersion: fleet/v1\nservice:\n  name: bench\n  workload: { command: [\"fleet-demo-app\", \"--port\", \"{port}\", \"--version\", \"{version}\"] }\nregions:\n",
    );
    for r in 0..REGIONS {
        m += &format!("  - {{ name: r{r}, traffic_share: 10, clusters: [{{ name: c{r} }}] }}\n");
    }
    let names: Vec<String> = (0..REGIONS).map(|r| format!("r{r}")).collect();
    m += &format!(
        "waves:\n  - {{ name: all, regions: [{}] }}\n",
        names.join(", ")
    );
    m += "strategy:\n  canary: { steps: [{ weight: 50, pause: 1h }] }\n";
    m
}
