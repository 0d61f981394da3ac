//! The `fleet-proxy` binary: flags, logging, signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Every request allocates a little (header maps, bodies, futures); mimalloc's per-thread
/// free lists make that cheaper than glibc's malloc, and keep idle connections smaller.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The regional data plane of Fleet: routes, splits and mirrors traffic between tracks.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The config file (YAML): listeners, admin address, tracks, routes, limits.
    #[arg(long, env = "FLEET_PROXY_CONFIG")]
    config: PathBuf,
    /// Check the config file, print every problem, and exit: 0 if it is valid, 1 if not.
    #[arg(long)]
    check: bool,
    /// Runtime worker threads. Default: one per CPU.
    #[arg(long, env = "FLEET_PROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk) is dropped; told about on stderr, it
        // would panic the task that logged it.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = args.config.display().to_string();
    let src = match std::fs::read_to_string(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{file}: error: cannot read: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = args.config.parent().map(PathBuf::from).unwrap_or_default();
    let (settings, table) = match fleet_proxy::config::check(&src, &dir) {
        Ok(ok) => ok,
        Err(diags) => {
            for d in &diags {
                eprintln!("{}", d.in_file(&file));
            }
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!("{file}: ok");
        return ExitCode::SUCCESS;
    }
    match serve(settings, table, args.config, args.worker_threads) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    settings: fleet_proxy::config::Settings,
    table: fleet_proxy_router::Table,
    path: PathBuf,
    worker_threads: Option<usize>,
) -> anyhow::Result<()> {
    // One worker: a current-thread runtime, without the work-stealing machinery.
    let mut runtime = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(n) = worker_threads.filter(|n| *n > 1) {
        runtime.worker_threads(n);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let server = fleet_proxy::Server::bind(settings, table, Some(path)).await?;
        // The first SIGTERM or SIGINT drains; a second one ends the drain at once.
        let (first, told) = tokio::sync::oneshot::channel();
        let signals = async move {
            stop_signal(&mut term, &mut int).await;
            let _ = first.send(());
            stop_signal(&mut term, &mut int).await;
        };
        tokio::select! {
            served = server.run(async move { let _ = told.await; }) => served,
            () = signals => anyhow::bail!("a second signal: stopped without finishing the drain"),
        }
    })
}

/// The next SIGTERM or SIGINT.
async fn stop_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
