//! `fleet-agent --controller URL --region R --cluster C --driver process|kubernetes --proxy-admin URL...`

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, ValueEnum};
use fleet_agent::Config;
use fleet_agent::discover::ProxySource;
use fleet_agent::driver::kubernetes::KubernetesDriver;
use fleet_agent::driver::process::ProcessDriver;
use fleet_agent::watched::{READ_TIMEOUT, Tally};
use fleet_proto::connect::ClientTls;

/// The Fleet agent for one cluster.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  fleet-agent --controller http://127.0.0.1:7070 --region us-west-1 --cluster usw1-a \\\n    --driver process --proxy-admin http://127.0.0.1:9901"
)]
struct Args {
    /// The controller's gRPC URL.
    #[arg(long, env = "FLEET_CONTROLLER")]
    controller: String,
    /// The region this cluster serves, as the fleet manifest names it.
    #[arg(long, env = "FLEET_REGION", value_parser = name)]
    region: String,
    /// This cluster's agent identity in the manifest (by default the cluster's name).
    #[arg(long, env = "FLEET_CLUSTER", value_parser = name)]
    cluster: String,
    /// How workloads run.
    #[arg(long, value_enum, default_value_t = DriverKind::Process)]
    driver: DriverKind,
    /// Admin URL of a proxy of this region; repeat for several (in the environment: URLs
    /// separated by commas). Or `--proxy-pods`.
    #[arg(
        long = "proxy-admin",
        value_name = "URL",
        required_unless_present = "proxy_pods",
        conflicts_with = "proxy_pods",
        env = "FLEET_PROXY_ADMIN",
        value_delimiter = ','
    )]
    proxies: Vec<String>,
    /// The proxies are the running pods this label selector picks in `--namespace`, watched
    /// through the Kubernetes API (e.g. `app.kubernetes.io/name=fleet-proxy`).
    #[arg(long, value_name = "SELECTOR", env = "FLEET_PROXY_PODS")]
    proxy_pods: Option<String>,
    /// With `--proxy-pods`: the port of the proxies' admin API.
    #[arg(long, env = "FLEET_PROXY_ADMIN_PORT", default_value_t = 9901)]
    proxy_admin_port: u16,
    /// With `--driver kubernetes` or `--proxy-pods`: the namespace of the service's
    /// Deployments and proxies. Default: the kubeconfig context's, or the service account's in
    /// a cluster.
    #[arg(long, env = "FLEET_NAMESPACE")]
    namespace: Option<String>,
    /// With `--driver kubernetes`: the port the service's containers listen on (given to them
    /// as `PORT`); the proxies reach the ready pods there.
    #[arg(long, env = "FLEET_CONTAINER_PORT", default_value_t = 8080)]
    container_port: u16,
    /// For an `https://` controller: PEM CA that signed its certificate. Default: the
    /// system's roots.
    #[arg(long, env = "FLEET_CA")]
    ca: Option<PathBuf>,
    /// For a controller that asks for one (mutual TLS): this agent's PEM certificate.
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With `--driver process`: the file where the agent keeps the instances it runs, so that
    /// an agent started after one that stopped or died without stopping them (SIGTERM, kill
    /// -9, a crash) takes over those still running rather than start others beside them. It
    /// must outlast the agent (not a private /tmp that goes with its service). Default: a
    /// file named after the region and cluster in `$XDG_RUNTIME_DIR`, else in
    /// `fleet-agent-UID` (mode 0700) in the temporary directory. One agent's at a time: a
    /// second started on it is refused (it holds `FILE.lock` while it runs).
    #[arg(long, value_name = "FILE", env = "FLEET_AGENT_INSTANCES_FILE")]
    instances_file: Option<PathBuf>,
    /// With `--driver process`: stop the instances when the agent stops (SIGTERM). By
    /// default they go on serving, kept in `--instances-file` for the next agent to take
    /// over, as the kubernetes driver leaves its Deployments: restarting or upgrading the
    /// agent is no outage, if what stops it signals the agent alone (the instances share its
    /// process group and cgroup: systemd needs `KillMode=mixed`). Without an instances file
    /// they are always stopped.
    #[arg(long, env = "FLEET_AGENT_STOP_INSTANCES_ON_EXIT")]
    stop_instances_on_exit: bool,
    /// Serve `/healthz` (the reconcile loop goes round), `/readyz` (connected to the
    /// controller) and `/metrics` on this address (port 0: any; the address is printed).
    #[arg(long, value_name = "ADDR", env = "FLEET_AGENT_ADMIN")]
    admin: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DriverKind {
    /// Local processes from the manifest's command (the embedded default).
    Process,
    /// A Deployment per version from the manifest's image, through the Kubernetes API (the
    /// kubeconfig, or the service account in a cluster).
    Kubernetes,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let args = Args::parse();
    if matches!(args.driver, DriverKind::Kubernetes)
        && (args.instances_file.is_some() || args.stop_instances_on_exit)
    {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--instances-file and --stop-instances-on-exit are for --driver process: the \
                 kubernetes driver keeps no instances of its own (its Deployments stay as they \
                 are when it stops); leave them out",
            )
            .exit();
    }
    let watches = Tally::default();
    let proxies = match &args.proxy_pods {
        Some(selector) => ProxySource::pods(
            kube_client().await?,
            args.namespace.as_deref(),
            selector.clone(),
            args.proxy_admin_port,
            &watches,
        ),
        None => ProxySource::Listed(args.proxies),
    };
    let config = Config {
        controller: args.controller,
        region: args.region,
        cluster: args.cluster,
        proxies,
        tls: ClientTls {
            ca: args.ca,
            cert: args.tls_cert,
            key: args.tls_key,
        },
        driver: args
            .driver
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned()),
        hung_after: fleet_agent::admin::HUNG_AFTER,
        stale_after: fleet_agent::STALE_AFTER,
        held_limit: fleet_agent::HELD_LIMIT,
        watches: watches.clone(),
    };
    // A TLS file that cannot be read is told now, before the first dial; each dial reads
    // them again, so a renewed certificate is used from the next connection.
    fleet_proto::connect::endpoint(&config.controller, &config.tls)?;
    // The process driver's instances file, held while the agent runs: a second agent on it
    // is refused before it says it listens.
    let file = match (&args.driver, args.instances_file.clone()) {
        (DriverKind::Kubernetes, _) => None,
        (DriverKind::Process, Some(file)) => Some(file),
        (DriverKind::Process, None) => ProcessDriver::ledger_dir()
            .map(|dir| dir.join(instances_file_name(&config)))
            .inspect_err(|e| tracing::warn!(error = %e, "no directory to keep the instances in: an agent started after this one dies will not take them over"))
            .ok(),
    };
    let _lock = file
        .as_deref()
        .map(ProcessDriver::lock_ledger)
        .transpose()?;
    let admin = match args.admin {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --admin {addr}"))?;
            // Tools that start the agent on port 0 read the real address from this line.
            println!("fleet-agent listening admin={}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop.send(true);
    });
    match args.driver {
        DriverKind::Process => {
            let driver = file.map_or_else(ProcessDriver::default, ProcessDriver::with_ledger);
            let driver = match args.stop_instances_on_exit {
                true => driver.stopping_on_exit(),
                false => driver,
            };
            fleet_agent::run(config, driver, admin, shutdown).await
        }
        DriverKind::Kubernetes => {
            let client = kube_client().await?;
            let driver =
                KubernetesDriver::new(client, args.namespace, args.container_port, &watches);
            fleet_agent::run(config, driver, admin, shutdown).await
        }
    }
}

/// `fleet-agent-REGION-CLUSTER.instances.json`: the cluster's agent's, whichever controller it
/// is pointed at (a URL changed from http:// to https:// must not leave the instances behind;
/// a second agent for the cluster is refused by the file's lock).
fn instances_file_name(config: &Config) -> String {
    let (region, cluster) = (&config.region, &config.cluster);
    format!("fleet-agent-{region}-{cluster}.instances.json")
}

/// A client of the Kubernetes API, for the kubernetes driver and the proxies' discovery. A
/// read that waits longer than [`READ_TIMEOUT`] from its request fails (kube-rs sets no such
/// limit by default, as its watches are long), so that a request on a connection that died
/// unseen is tried again.
async fn kube_client() -> anyhow::Result<kube::Client> {
    let settings = "connecting to the Kubernetes API (kubeconfig or in-cluster service account)";
    let mut config = kube::Config::infer().await.context(settings)?;
    config.read_timeout = Some(READ_TIMEOUT);
    // Counted from each request, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    kube::Client::try_from(config).context(settings)
}

/// A name as the manifest gives regions, clusters and agents: the controller refuses others.
fn name(s: &str) -> Result<String, String> {
    match fleet_yaml::is_dns_label(s) {
        true => Ok(s.to_string()),
        false => Err(
            "not a name as the manifest gives them: at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
                .into(),
        ),
    }
}
