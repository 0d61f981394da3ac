//! Listeners and connections: accept with a connection limit, optional TLS, HTTP/1.1 and
//! HTTP/2 on the same port, graceful drain on shutdown.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::{Limits, Settings};
use crate::framing::{Scan, Verdicts};
use crate::mirror::Mirror;
use crate::service::{self, Conn};
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
        let (stop_tx, stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let builder = builder(&shared.settings.limits);
        let mut loops = Vec::new();
        let mut slots = Vec::new();
        for (listener, tls) in traffic {
            slots.push(tls.clone());
            let (shared, graceful, stop, builder) = (
                shared.clone(),
                graceful.clone(),
                stop_rx.clone(),
                builder.clone(),
            );
            loops.push(tokio::spawn(accept_loop(
                listener, tls, shared, builder, graceful, stop,
            )));
        }
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
        // The accept loops held the other references; they are done.
        if let Ok(graceful) = Arc::try_unwrap(graceful)
            && tokio::time::timeout(shared.settings.drain_timeout, graceful.shutdown())
                .await
                .is_err()
        {
            tracing::warn!("drain deadline passed with requests still in flight");
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin_loop.await;
        Ok(())
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here rather than across awaits.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut http1 = b.http1();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    // hyper's own limit is 100, parsed on the stack; any explicit limit costs a heap buffer
    // per request, so only set one that differs.
    if limits.max_headers != 100 {
        http1.max_headers(limits.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1_000);
    b
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsSlot>,
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(shared.settings.limits.max_connections));
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared
                .stats
                .global
                .connections_rejected
                .fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        shared
            .stats
            .global
            .connections_accepted
            .fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let verdicts = Verdicts::default();
        let conn = Arc::new(Conn::new(peer, tls.is_some(), verdicts.clone()));
        let (shared, builder, watcher) = (shared.clone(), builder.clone(), graceful.watcher());
        match &tls {
            None => {
                tokio::spawn(serve(
                    stream, conn, verdicts, shared, builder, watcher, permit,
                ));
            }
            Some(slot) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(slot.load_full());
                let handshake_timeout = shared.settings.limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve(tls, conn, verdicts, shared, builder, watcher, permit).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

async fn serve<I>(
    io: I,
    conn: Arc<Conn>,
    verdicts: Verdicts,
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Scan::new(io, shared.settings.limits.max_header_bytes, verdicts);
    let svc = service_fn(move |req| service::handle(shared.clone(), conn.clone(), req));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(permit);
}

async fn admin_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| crate::admin::handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
