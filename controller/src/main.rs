//! `fleet-controller --listen ADDR --admin ADDR --data DIR [--tls-cert F --tls-key F --client-ca F [--client-crl F]]`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

/// The Fleet controller: sequences releases region by region over gRPC to per-cluster agents.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  fleet-controller --listen 127.0.0.1:7070 --admin 127.0.0.1:7071 --data /var/lib/fleet"
)]
struct Args {
    /// gRPC address for tooling (ReleaseService) and agents (AgentService).
    #[arg(
        long,
        env = "FLEET_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    listen: SocketAddr,
    /// Admin HTTP address: /healthz, /readyz, /metrics.
    #[arg(long, env = "FLEET_CONTROLLER_ADMIN", default_value = "127.0.0.1:7071")]
    admin: SocketAddr,
    /// Directory of the embedded store; created if missing.
    #[arg(long, env = "FLEET_DATA")]
    data: PathBuf,
    /// PEM certificate (chain) of the gRPC listener, which then speaks mutual TLS only.
    #[arg(long, env = "FLEET_SERVER_TLS_CERT", requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "FLEET_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose certificates clients must show: agents and release tooling.
    #[arg(long, env = "FLEET_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// PEM revocation lists of `--client-ca`: client certificates they list are refused.
    #[arg(long, env = "FLEET_CLIENT_CRL", requires = "client_ca")]
    client_crl: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Webhook calls over https use rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key, &args.client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(fleet_controller::tls::Reloader::new(
            fleet_controller::tls::Files {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                client_crl: args.client_crl.clone(),
            },
        )?),
        _ => None,
    };
    let mode = if tls.is_some() { "mutual" } else { "off" };
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin))?;
    // Tools that start the controller on port 0 read the real addresses from this line.
    println!(
        "fleet-controller listening grpc={} admin={} tls={mode}",
        grpc.local_addr()?,
        admin.local_addr()?
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    let options = fleet_controller::Options {
        tls,
        ..Default::default()
    };
    fleet_controller::serve_with(grpc, admin, &args.data, shutdown, options).await
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
