//! fleet-controller: runs releases with the rollout engine, keeps its state in a store (the
//! embedded one, or etcd shared by controllers that stand in for each other), and serves
//! `fleet.v1` to release tooling and to agents on one gRPC port, plus an admin HTTP port.

mod admin;
mod agent_service;
mod agents;
mod applied;
mod convert;
mod etcd;
mod identity;
mod import;
mod leader;
mod regions;
mod release_service;
mod retention;
mod runtime;
mod standby;
mod status_size;
mod store;
pub mod tls;
mod webhook;

use std::path::Path;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1::agent_service_server::AgentServiceServer;
use fleet_proto::v1::release_service_server::ReleaseServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use etcd::{Credentials, EtcdOptions, Password};
pub use import::{Imported, import_data};
pub use leader::{Campaign, Holder};
pub use runtime::Controller;
pub use standby::advertised;

/// Resolves once `shutdown` has been signalled (or its sender dropped).
pub async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves the controller on `grpc` and `admin` from the store in `data` until `shutdown`, or
/// until a write to the store fails ([`StartOver`]).
pub async fn serve(
    grpc: TcpListener,
    admin: TcpListener,
    data: &Path,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    serve_with(grpc, admin, data, shutdown, Options::default()).await
}

/// How [`serve_with`] serves, where it differs from [`serve`].
pub struct Options {
    /// Mutual TLS on the gRPC listener ([`tls::Reloader`]); plain HTTP/2 without.
    pub tls: Option<tls::Reloader>,
    pub limits: Limits,
    /// Of each service, how many ended releases (with their history) the controller keeps;
    /// older ones are forgotten. 0 keeps every release.
    pub keep_releases: usize,
}

/// `--keep-releases`' default.
pub const KEEP_RELEASES: usize = 100;

impl Default for Options {
    fn default() -> Options {
        Options {
            tls: None,
            limits: Limits::default(),
            keep_releases: KEEP_RELEASES,
        }
    }
}

/// How long the controller bears with its peers. The defaults are the product's; tests
/// shorten them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// An agent's stream must say hello within this once open.
    pub hello_within: Duration,
    /// An agent that sends nothing for this long is let go and its region told unreachable,
    /// as if its connection had dropped (agents report every 500 ms): an agent process that
    /// hangs is not counted present while its connection stays up. (An agent whose
    /// reconcile loop hangs hangs up itself.)
    pub silent_after: Duration,
    /// Every connection is pinged this often, and dropped when a ping goes unanswered as
    /// long: a path that died without a word is noticed in seconds, not after TCP's minutes.
    pub keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            hello_within: Duration::from_secs(10),
            silent_after: Duration::from_secs(15),
            keepalive: fleet_proto::connect::KEEPALIVE,
        }
    }
}

/// [`serve`], as `options` say.
pub async fn serve_with(
    grpc: TcpListener,
    admin: TcpListener,
    data: &Path,
    shutdown: watch::Receiver<bool>,
    options: Options,
) -> anyhow::Result<()> {
    let controller = Controller::open(data, options.keep_releases)?;
    let role = admin::Role::new();
    role.lead(controller.clone());
    let tls_status = options.tls.as_ref().map(tls::Reloader::status);
    admin::spawn(admin, role.clone(), tls_status, shutdown.clone())?;
    let since = tokio::time::Instant::now();
    let served = serve_until_lost(controller.clone(), grpc, &role, shutdown, options).await?;
    let lost = served.lost;
    drop(role);
    // Tasks of closed streams let go of the controller as they notice; the store closes with
    // the last of them, and a controller started next on the same directory can open it.
    // (Not when starting over: the process replaces itself, which closes the file, and the
    // admin endpoints hold the controller until then. Nor when connections were left open
    // after the drain: their tasks never let go, and end with the process.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lost.is_none()
        && served.drained == Drained::All
        && Arc::strong_count(&controller) > 1
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match lost {
        Some(why) => Err(StartOver {
            why,
            served_for: since.elapsed(),
        }
        .into()),
        None => Ok(()),
    }
}

/// One of several controllers that keep their state in etcd and stand in for each other
/// (`leader.rs`). Until it leads it stands by, passing the connections `grpc` accepts to the
/// leader (`standby.rs`); once it leads it says so through `leading` (with its epoch) and
/// serves, until `shutdown` (giving the lead up at once) or until it loses the lead
/// ([`StartOver`]).
pub async fn serve_ha(
    grpc: TcpListener,
    admin: TcpListener,
    ha: Ha,
    shutdown: watch::Receiver<bool>,
    options: Options,
    leading: impl FnOnce(u64),
) -> anyhow::Result<()> {
    let etcd = etcd::Etcd::connect(&ha.etcd)?;
    tracing::info!(name = %ha.campaign.us.name, "standing by");
    let role = admin::Role::new();
    let tls_status = options.tls.as_ref().map(tls::Reloader::status);
    admin::spawn(admin, role.clone(), tls_status, shutdown.clone())?;
    let (led, leads) = tokio::sync::oneshot::channel::<()>();
    let us = ha.campaign.us.clone();
    let passing = tokio::spawn(standby::pass_through(
        grpc,
        role.leader().subscribe(),
        us,
        role.reach().clone(),
        async {
            let _ = leads.await;
        },
    ));
    let mut standing = None;
    let leadership = tokio::select! {
        leadership = leader::campaign(&etcd, &ha.campaign, role.leader(), &mut standing) => leadership,
        _ = signalled(shutdown.clone()) => {
            if let Some(lease) = standing {
                let _ = tokio::time::timeout(Duration::from_secs(2), etcd.revoke(lease)).await;
            }
            return Ok(());
        }
    };
    let _ = led.send(());
    let store = store::EtcdStore::new(etcd, leadership.fence.clone(), leadership.epoch);
    let grpc = passing.await.context("passing connections to the leader")?;
    // A store that cannot be read now (etcd slow, say) is given up on as a lost lead: the
    // process starts over rather than exits.
    let controller = match Controller::open_store(Box::new(store), options.keep_releases) {
        Ok(controller) => controller,
        Err(e) => {
            leadership.resign().await;
            let why = format!("stopped leading: could not read the store: {e:#}");
            let served_for = Duration::ZERO;
            return Err(StartOver { why, served_for }.into());
        }
    };
    role.lead(controller.clone());
    leading(leadership.epoch);
    let led_since = tokio::time::Instant::now();
    let served = serve_until_lost(controller, grpc, &role, shutdown, options).await;
    leadership.resign().await;
    match served?.lost {
        Some(why) => Err(StartOver {
            why: format!("stopped leading: {why}"),
            served_for: led_since.elapsed(),
        }
        .into()),
        None => Ok(()),
    }
}

/// How serving ended.
struct Served {
    /// Why the store was lost, if it was.
    lost: Option<String>,
    drained: Drained,
}

/// Whether every connection closed within [`DRAIN`] of the stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    All,
    LeftOpen,
}

/// Serves `controller` on `grpc` until `shutdown`, or until its store is lost (takes no more
/// writes): then its readiness fails, saying why, and its connections get [`DRAIN`] to close.
async fn serve_until_lost(
    controller: Arc<Controller>,
    grpc: TcpListener,
    role: &Arc<admin::Role>,
    shutdown: watch::Receiver<bool>,
    options: Options,
) -> anyhow::Result<Served> {
    let lost = controller.store.lost().clone();
    let (stop, stopping) = watch::channel(false);
    let role = role.clone();
    let why = tokio::spawn(async move {
        let why = tokio::select! {
            why = lost.wait() => Some(why),
            _ = signalled(shutdown) => None,
        };
        if let Some(why) = &why {
            tracing::error!("{why}; the controller stops serving, to start over");
            role.start_over(why.clone());
        }
        let _ = stop.send(true);
        why
    });
    let drained = run(controller, grpc, stopping, options).await;
    why.abort();
    let lost = why.await.ok().flatten();
    Ok(Served {
        lost,
        drained: drained?,
    })
}

/// Why the controller stopped serving before it was told to: it can no longer trust what it
/// holds (it lost the lead, or a write to its store failed), and the process should start
/// over from what its store has.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct StartOver {
    pub why: String,
    /// How long it served.
    pub served_for: Duration,
}

/// Checks `options` (URLs, TLS flags and files) before anything listens.
pub fn check_etcd(options: &EtcdOptions) -> anyhow::Result<()> {
    etcd::endpoints(options).map(drop)
}

/// Where [`serve_ha`] keeps its state and how it decides who leads.
#[derive(Clone, Debug)]
pub struct Ha {
    pub etcd: etcd::EtcdOptions,
    pub campaign: leader::Campaign,
}

/// Serves `controller` on `grpc` until `shutdown`; then waits up to [`DRAIN`] for the
/// connections to close.
async fn run(
    controller: Arc<Controller>,
    grpc: TcpListener,
    shutdown: watch::Receiver<bool>,
    options: Options,
) -> anyhow::Result<Drained> {
    let Options { tls, limits, .. } = options;
    let drain = shutdown.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ReleaseServiceServer<release_service::Releases>>()
        .await;
    health
        .set_serving::<AgentServiceServer<agent_service::Agents>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleet_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tokio::spawn(controller.clone().run_timers(signalled(shutdown.clone())));
    // Open streams would hold a graceful shutdown forever: end them as it starts.
    let closing = controller.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signalled(stop).await;
        closing.disconnect_agents();
    });
    let releases = release_service::Releases {
        controller: controller.clone(),
        shutdown: shutdown.clone(),
    };
    let mutual = tls.is_some();
    let agents = agent_service::Agents {
        controller: Arc::clone(&controller),
        mutual,
        shutdown: shutdown.clone(),
        limits,
    };
    // An agent whose path died without a word is let go in seconds: it is told gone, and its
    // region unreachable, rather than counted present for TCP's minutes of retries.
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
        .layer(tower::util::MapResponseLayer::new(status_size::bounded))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ReleaseServiceServer::with_interceptor(
            releases,
            identity::release_api_gate(mutual),
        ))
        .add_service(AgentServiceServer::new(agents));
    let stopped = signalled(shutdown.clone());
    let served = async move {
        match tls {
            Some(tls) => {
                let incoming = tls.incoming(grpc, shutdown.clone());
                (router.serve_with_incoming_shutdown(incoming, stopped)).await
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
                (router.serve_with_incoming_shutdown(incoming, stopped)).await
            }
        }
    };
    // Once stopping, connections get DRAIN to close (a client that stopped reading a stream,
    // say, would hold them open for ever); those left are dropped with the process.
    tokio::select! {
        served = served => {
            served?;
            Ok(Drained::All)
        }
        () = async {
            signalled(drain).await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!("connections still open {DRAIN:?} after the stop; leaving them");
            Ok(Drained::LeftOpen)
        }
    }
}

/// How long a stopping controller waits for its connections to close.
const DRAIN: Duration = Duration::from_secs(5);

/// Test-only: release demo-1 of service demo, v1 to v2.
#[cfg(test)]
fn demo_1() -> fleet_engine::ReleaseSpec {
    fleet_engine::ReleaseSpec {
        id: "demo-1".into(),
        service: "demo".into(),
        from_version: "v1".into(),
        to_version: "v2".into(),
        emergency: None,
        actor: "test".into(),
    }
}
