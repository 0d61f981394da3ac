//! fleet-agent: one per cluster. It dials the controller, receives the desired state of its
//! region, makes the cluster run it through a workload driver, programs the region's proxies
//! once the new instances are ready, and reports back readiness and the proxies' counters.
//!
//! Fail-static: while the controller is away, the agent keeps its last desired state and the
//! proxies keep their last table.

pub mod driver;
pub mod routes;
mod session;
pub mod stats;

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proxy_router::spec::TableSpec;
use tokio::sync::watch;

use driver::{Driver, Want};

const RECONCILE_EVERY: Duration = Duration::from_millis(200);
const PROXY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Config {
    /// The controller's gRPC URL, e.g. `http://127.0.0.1:7070`.
    pub controller: String,
    pub region: String,
    pub cluster: String,
    /// Admin URLs of the region's proxies, e.g. `http://127.0.0.1:9901`.
    pub proxies: Vec<String>,
}

/// An HTTP client. reqwest is built without a default TLS provider (so no C toolchain is
/// needed for aws-lc); ring is installed first, as the proxy uses it.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Runs the agent until `shutdown`, then stops the workloads it started.
pub async fn run<D: Driver>(
    config: Config,
    mut driver: D,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (desired_tx, mut desired_rx) = watch::channel::<Option<pb::DesiredState>>(None);
    let (status_tx, status_rx) = watch::channel(pb::AgentStatus::default());
    tokio::spawn(session::run(
        config.clone(),
        desired_tx,
        status_rx,
        shutdown.clone(),
    ));
    let http = http_client();
    let mut programmed: Option<(TableSpec, BTreeMap<String, u32>)> = None;
    let mut applied: Option<(String, u64)> = None;
    let mut stop = shutdown.clone();
    loop {
        let desired = desired_rx.borrow_and_update().clone();
        let mut status = pb::AgentStatus::default();
        if let Some(d) = &desired {
            let mut want = want_of(d);
            // Versions the proxies still route to keep running until the new table is in.
            if let Some((_, versions)) = &programmed {
                for (v, n) in versions {
                    want.versions.entry(v.clone()).or_insert(*n);
                }
            }
            driver.apply(&want);
            let running = driver.poll().await;
            let table = routes::table(d, &running.ready);
            let mut detail = running.detail.clone();
            if let Some(table) = table {
                if programmed.as_ref().is_none_or(|(t, _)| *t != table) {
                    match program(&http, &config.proxies, &table).await {
                        Ok(()) => {
                            tracing::info!(release = %d.release_id, seq = d.seq, "proxies programmed");
                            programmed = Some((table, want_of(d).versions));
                        }
                        Err(e) => detail = format!("proxies not programmed: {e:#}"),
                    }
                }
                if programmed
                    .as_ref()
                    .is_some_and(|(_, v)| *v == want_of(d).versions)
                {
                    applied = Some((d.release_id.clone(), d.seq));
                }
            }
            let done = applied
                .as_ref()
                .is_some_and(|(r, s)| *r == d.release_id && *s == d.seq);
            status = pb::AgentStatus {
                epoch: d.epoch,
                applied_seq: if done { d.seq } else { 0 },
                release_id: d.release_id.clone(),
                ready: done,
                stats: None,
                detail,
            };
        }
        status.stats = scrape(&http, &config.proxies).await;
        let _ = status_tx.send(status);
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = desired_rx.changed() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    driver.shutdown().await;
    Ok(())
}

fn want_of(d: &pb::DesiredState) -> Want {
    let workload = d.workload.clone().unwrap_or_default();
    let versions = [d.stable.as_ref(), d.canary.as_ref()]
        .into_iter()
        .flatten()
        .map(|t| (t.version.clone(), t.replicas.max(1)))
        .collect();
    Want {
        versions,
        command: workload.command,
        health_check: if workload.health_check.is_empty() {
            "/healthz".into()
        } else {
            workload.health_check
        },
    }
}

/// Puts `table` on every proxy; fails if any refuses it.
async fn program(
    http: &reqwest::Client,
    proxies: &[String],
    table: &TableSpec,
) -> anyhow::Result<()> {
    for proxy in proxies {
        let url = format!("{}/routes", proxy.trim_end_matches('/'));
        let response = http
            .put(&url)
            .timeout(PROXY_TIMEOUT)
            .json(table)
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("{url} answered {status}: {body}");
        }
    }
    Ok(())
}

/// The summed counters of every proxy that answers.
async fn scrape(http: &reqwest::Client, proxies: &[String]) -> Option<pb::TrafficStats> {
    let mut all = Vec::new();
    for proxy in proxies {
        let url = format!("{}/stats", proxy.trim_end_matches('/'));
        let Ok(response) = http.get(&url).timeout(PROXY_TIMEOUT).send().await else {
            continue;
        };
        if let Ok(stats) = response.json::<stats::ProxyStats>().await {
            all.push(stats);
        }
    }
    (!all.is_empty()).then(|| stats::sum(&all))
}
