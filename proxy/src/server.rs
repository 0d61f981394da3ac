//! Listeners: accept with a connection limit, optional TLS, graceful drain on shutdown.
//! Each connection is then [`crate::conn`]'s.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use fleet_proxy_router::Table;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Settings;
use crate::conn::{self, Conn};
use crate::mirror::Mirror;
use crate::state::Shared;

/// A traffic listener's TLS config, swapped whole when certificates are reloaded.
pub type TlsSlot = Arc<ArcSwap<ServerConfig>>;

/// A bound proxy, not yet serving: tests read its addresses before `run`.
pub struct Server {
    shared: Arc<Shared>,
    traffic: Vec<(TcpListener, Option<TlsSlot>)>,
    admin: TcpListener,
    config_path: Option<PathBuf>,
}

impl Server {
    /// Binds every listener. `config_path`, when given, is watched for changes.
    pub async fn bind(
        settings: Settings,
        table: Table,
        config_path: Option<PathBuf>,
    ) -> anyhow::Result<Server> {
        let mut traffic = Vec::new();
        for l in &settings.listeners {
            let listener = TcpListener::bind(l.addr)
                .await
                .with_context(|| format!("binding {}", l.addr))?;
            let tls = match l.tls.is_empty() {
                true => None,
                false => Some(Arc::new(ArcSwap::new(crate::tls::server_config(&l.tls)?))),
            };
            traffic.push((listener, tls));
        }
        let admin = TcpListener::bind(settings.admin)
            .await
            .with_context(|| format!("binding admin {}", settings.admin))?;
        let shared = Shared::new(settings, table);
        Ok(Server {
            shared,
            traffic,
            admin,
            config_path,
        })
    }

    pub fn traffic_addrs(&self) -> Vec<SocketAddr> {
        self.traffic
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Serves until `shutdown` completes, then drains: readiness turns 503, listeners stop
    /// accepting, in-flight requests get up to `drain_timeout` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let slots_addrs = self.traffic_addrs();
        let admin_addr = self.admin.local_addr().context("admin address")?;
        let Server {
            shared,
            traffic,
            admin,
            config_path,
        } = self;
        Mirror::start(&shared);
        // `stop` ends the accept loops and the file watcher; `drain` then tells every
        // connection to finish what it started, and is closed once they all have.
        let (stop_tx, stop_rx) = watch::channel(false);
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut loops = Vec::new();
        let mut slots = Vec::new();
        // One limit for every listener: `max_connections` is the proxy's.
        let limit = Arc::new(Semaphore::new(shared.settings.limits.max_connections));
        for (listener, tls) in traffic {
            slots.push(tls.clone());
            let (shared, stop, drain) = (shared.clone(), stop_rx.clone(), drain_rx.clone());
            loops.push(tokio::spawn(accept_loop(
                listener,
                tls,
                shared,
                limit.clone(),
                (stop, drain),
            )));
        }
        drop(drain_rx);
        tokio::spawn(sweep_backends(shared.clone(), stop_rx.clone()));
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let admin_loop = tokio::spawn(admin_loop(admin, shared.clone(), admin_stop_rx));
        if let Some(path) = config_path {
            let hangups = crate::reload::hangups();
            tokio::spawn(crate::reload::watch(
                shared.clone(),
                path,
                slots,
                hangups,
                stop_rx.clone(),
            ));
        }
        let addrs: Vec<String> = slots_addrs.iter().map(ToString::to_string).collect();
        tracing::info!(traffic = addrs.join(","), admin = %admin_addr, "serving");
        shutdown.await;
        tracing::info!("draining");
        shared.draining.store(true, Relaxed);
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        let _ = drain_tx.send(true);
        let started = std::time::Instant::now();
        let drained = tokio::time::timeout(shared.settings.drain_timeout, drain_tx.closed());
        match drained.await {
            Ok(()) => tracing::info!(took = ?started.elapsed(), "drained: every connection closed"),
            Err(_) => tracing::warn!("drain deadline passed with requests still in flight"),
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin_loop.await;
        Ok(())
    }
}

/// How often idle upstream connections and forgotten backends are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Also gives freed memory back to the system after many connections stop being served at
/// once (see `memory.rs`): this task runs on a thread that serves traffic, whose heap held them.
async fn sweep_backends(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut release = crate::memory::Release::default();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {
                shared.sweep_backends();
                let global = &shared.stats.global;
                let open = global.connections_open.load(Relaxed);
                let parked = global.connections_idle.load(Relaxed);
                if release.observe(open, parked) {
                    let started = std::time::Instant::now();
                    fleet_proxy_alloc::release_free();
                    tracing::debug!(took = ?started.elapsed(), "freed memory given back");
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here rather than across awaits.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsSlot>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    (mut stop, drain): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let global = &shared.stats.global;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            global.connections_rejected.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        global.connections_accepted.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let lease = conn::Lease::new(&shared, permit, drain.clone());
        let conn = Arc::new(Conn::leased(peer, tls.is_some(), lease));
        let (shared, drain) = (shared.clone(), drain.clone());
        match &tls {
            None => {
                tokio::spawn(async move {
                    conn::serve(stream, conn, false, &shared, drain).await;
                });
            }
            Some(slot) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(slot.load_full());
                let handshake_timeout = shared.settings.limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                            conn::serve(tls, conn, h2, &shared, drain).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Admin connections open at once; more are closed as they come. Its clients are an agent, a
/// scraper and an operator or two; the limit bounds what a flood of large `PUT /routes`
/// bodies can hold in memory.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

async fn admin_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    // Whether the last connection was refused: one warning per flood, not one per connection.
    let mut refusing = false;
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if !std::mem::replace(&mut refusing, true) {
                tracing::warn!("admin connections refused: {MAX_ADMIN_CONNECTIONS} already open");
            }
            drop(stream);
            continue;
        };
        refusing = false;
        let shared = shared.clone();
        tokio::spawn(async move {
            let head_timeout = shared.settings.limits.header_read_timeout;
            let svc = service_fn(move |req| crate::admin::handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}
