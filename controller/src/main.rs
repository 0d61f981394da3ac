//! `fleet-controller --listen ADDR --admin ADDR (--data DIR | --etcd URL[,URL] [--advertise ADDR]
//! [--etcd-ca F] [--etcd-cert F --etcd-key F]) [--keep-releases N] [--tls-cert F --tls-key F
//! --client-ca F [--client-crl F]]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

/// The Fleet controller: sequences releases region by region over gRPC to per-cluster agents.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  fleet-controller --listen 127.0.0.1:7070 --admin 127.0.0.1:7071 --data /var/lib/fleet\n  fleet-controller --listen 0.0.0.0:7070 --advertise 10.0.0.7:7070 --etcd https://etcd:2379 --etcd-ca ca.pem"
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
    #[arg(
        long,
        env = "FLEET_DATA",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    data: Option<PathBuf>,
    /// Keep the state in etcd instead (`http://HOST:PORT` or `https://…`, comma-separated for
    /// several members). Several controllers may then run on one etcd: one leads and serves; the
    /// others stand by, pass the connections they take to it, and take over when it stops or
    /// dies.
    #[arg(long, env = "FLEET_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// With an https:// --etcd: PEM CA that signed etcd's certificate (default: the system's
    /// roots).
    #[arg(long, env = "FLEET_ETCD_CA", conflicts_with = "data")]
    etcd_ca: Option<PathBuf>,
    /// With an https:// --etcd: PEM certificate to show an etcd that asks clients for one.
    #[arg(
        long,
        env = "FLEET_ETCD_CERT",
        requires = "etcd_key",
        conflicts_with = "data"
    )]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "FLEET_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// With --etcd: the user to authenticate to etcd as, for an etcd with authentication
    /// enabled; its password is in --etcd-password-file.
    #[arg(long, env = "FLEET_ETCD_USER", conflicts_with = "data")]
    etcd_user: Option<String>,
    /// The password of --etcd-user: a file that holds it (a trailing newline is not part of
    /// it), such as a mounted Secret.
    #[arg(long, env = "FLEET_ETCD_PASSWORD_FILE", conflicts_with = "data")]
    etcd_password_file: Option<PathBuf>,
    /// With --etcd: copy the embedded store of a stopped controller (the directory it was
    /// given as --data) into etcd, under --etcd-prefix, which must hold nothing; then exit.
    /// Releases under way are carried on by the controllers on etcd from the step they were
    /// at.
    #[arg(long, value_name = "DIR", requires = "etcd")]
    import_data: Option<PathBuf>,
    /// With --etcd: the prefix of the controller's keys.
    #[arg(
        long,
        env = "FLEET_ETCD_PREFIX",
        default_value = "/fleet/",
        conflicts_with = "data"
    )]
    etcd_prefix: String,
    /// With --etcd: how soon after the leader dies another takes over (its etcd lease's time
    /// to live; whole seconds, at least 2).
    #[arg(long, env = "FLEET_LEASE_TTL", default_value = "10s", value_parser = fleet::duration, conflicts_with = "data")]
    lease_ttl: Duration,
    /// With --etcd: the address at which the other controllers reach this one's gRPC port,
    /// to pass their connections to it while it leads. Default: --listen, unless that is
    /// 0.0.0.0 or [::].
    #[arg(long, env = "FLEET_CONTROLLER_ADVERTISE", conflicts_with = "data")]
    advertise: Option<String>,
    /// With --etcd: this controller's name, which the others show while it leads. Default:
    /// the host's name and the process id.
    #[arg(long, env = "FLEET_CONTROLLER_NAME", conflicts_with = "data")]
    name: Option<String>,
    /// Of each service, how many ended releases the controller keeps, with their history;
    /// older ones are forgotten. 0 keeps every release.
    #[arg(long, env = "FLEET_KEEP_RELEASES", default_value_t = fleet_controller::KEEP_RELEASES)]
    keep_releases: usize,
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
        // A log line that cannot be written (a full disk) is dropped; told about on stderr, it
        // would panic the task that logged it.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A store file grown past the process's size limit (RLIMIT_FSIZE) fails that write
    // (EFBIG), which the controller handles, rather than ending it with SIGXFSZ mid-write.
    let xfsz = tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    let _ = tokio::signal::unix::signal(xfsz);
    // Webhook calls over https use rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(dir) = &args.import_data {
        return import(dir, &args);
    }
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
    // Every flag is checked before anything listens.
    let ha = (args.data.is_none()).then(|| ha(&args)).transpose()?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin))?;
    let (grpc_addr, admin_addr) = (grpc.local_addr()?, admin.local_addr()?);
    // Tools that start the controller on port 0 read the real addresses from this line.
    say(&format!(
        "fleet-controller listening grpc={grpc_addr} admin={admin_addr} tls={mode}"
    ));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    let options = fleet_controller::Options {
        tls,
        keep_releases: args.keep_releases,
        ..Default::default()
    };
    let bound = [("--listen", grpc_addr), ("--admin", admin_addr)];
    let (served, first_wait, then) = match ha {
        None => {
            let data = args.data.as_deref().context("give --data or --etcd")?;
            let served =
                fleet_controller::serve_with(grpc, admin, data, shutdown.clone(), options).await;
            (
                served,
                Duration::from_secs(1),
                "starting over from the store",
            )
        }
        Some(mut ha) => {
            if args.advertise.is_none() {
                // --listen, as bound: its port may have been 0.
                ha.campaign.us.grpc = grpc_addr.to_string();
            }
            say(&format!(
                "fleet-controller standing by name={:?}",
                ha.campaign.us.name
            ));
            let leading = |epoch| say(&format!("fleet-controller leading epoch={epoch}"));
            let ttl = ha.campaign.ttl;
            let served =
                fleet_controller::serve_ha(grpc, admin, ha, shutdown.clone(), options, leading);
            (served.await, ttl, "starting over as a standby")
        }
    };
    match served {
        Err(e) => match e.downcast::<fleet_controller::StartOver>() {
            Ok(over) => start_over(&over, (first_wait, then), bound, shutdown).await,
            Err(e) => Err(e),
        },
        Ok(()) => Ok(()),
    }
}

/// How many times in a row the controller started over soon after it began to serve.
const STARTS_OVER: &str = "FLEET_CONTROLLER_STARTS_OVER";

/// After losing the lead, or a write to its store, the process replaces itself with a fresh
/// one (same pid, flags and environment, and the addresses it listened on) that stands by or
/// opens the store again: nothing of its term lingers, and its supervisor sees no crash to
/// back off from. It backs off itself: it waits `first_wait` (a lease's time to live, or a
/// second) first, twice as long each time in a row that it served for less than ten minutes
/// (up to 32 times), so that a failure that comes back at once (a write etcd always refuses)
/// does not pass the lead round every second. Told to stop meanwhile, it stops.
async fn start_over(
    over: &fleet_controller::StartOver,
    (first_wait, then): (Duration, &str),
    bound: [(&str, SocketAddr); 2],
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let before = std::env::var(STARTS_OVER).ok().and_then(|n| n.parse().ok());
    let (wait, in_a_row) = backoff(first_wait, before.unwrap_or(0), over.served_for);
    let after = humantime::format_duration(wait);
    tracing::warn!("{over}; {then} in {after}");
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
    }
    // Not current_exe(): after the binary was replaced on disk, that names a deleted file.
    let failed = std::process::Command::new("/proc/self/exe")
        .arg0(std::env::args_os().next().unwrap_or_default())
        .args(listening_on(std::env::args_os().skip(1), bound))
        .env(STARTS_OVER, in_a_row.to_string())
        .exec();
    Err(failed).context("could not start over")
}

/// `args` with the addresses `bound` instead of their `--listen` and `--admin`: a port given
/// as 0 would be another one after starting over.
fn listening_on(
    args: impl Iterator<Item = std::ffi::OsString>,
    bound: [(&str, SocketAddr); 2],
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let ours = |flag: &&str| text == *flag || text.starts_with(&format!("{flag}="));
        match bound.map(|(flag, _)| flag).into_iter().find(ours) {
            Some(flag) if text == flag => drop(args.next()),
            Some(_) => {}
            None => out.push(arg),
        }
    }
    for (flag, addr) in bound {
        out.extend([flag.into(), addr.to_string().into()]);
    }
    out
}

/// How long to wait before starting over, having served for `served_for` after `before`
/// starts over in a row that each came within ten minutes of serving; and the count to go on
/// with.
fn backoff(first_wait: Duration, before: u32, served_for: Duration) -> (Duration, u32) {
    let in_a_row = if served_for < Duration::from_secs(600) {
        before + 1
    } else {
        0
    };
    (
        first_wait * 2u32.pow(in_a_row.saturating_sub(1).min(5)),
        in_a_row,
    )
}

/// Prints `line` on stdout, for tools that start the controller; nothing if they stopped
/// reading.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// The etcd store and the campaign, from `--etcd` and the flags that go with it.
fn ha(args: &Args) -> anyhow::Result<fleet_controller::Ha> {
    let grpc = args.listen;
    let ttl = args.lease_ttl;
    if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
        anyhow::bail!(
            "--lease-ttl {}: etcd leases last whole seconds, at least 2; give 2s or more, such as 10s",
            humantime::format_duration(ttl)
        );
    }
    let advertise = match &args.advertise {
        Some(advertise) => fleet_controller::advertised(advertise)?,
        None if grpc.ip().is_unspecified() => anyhow::bail!(
            "--listen {grpc} with --etcd: give --advertise HOST:PORT, the address at which the \
             other controllers reach this one's gRPC port (in Kubernetes, $(POD_IP):{})",
            grpc.port()
        ),
        None => grpc.to_string(),
    };
    let name = args.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{} (pid {})", host.trim(), std::process::id())
    });
    Ok(fleet_controller::Ha {
        etcd: etcd_options(args)?,
        campaign: fleet_controller::Campaign {
            us: fleet_controller::Holder {
                name,
                grpc: advertise,
            },
            ttl,
        },
    })
}

/// The etcd store's settings, from `--etcd` and the flags that go with it, checked.
fn etcd_options(args: &Args) -> anyhow::Result<fleet_controller::EtcdOptions> {
    let etcd = fleet_controller::EtcdOptions {
        endpoints: args.etcd.clone(),
        prefix: args.etcd_prefix.clone(),
        tls: fleet_proto::connect::ClientTls {
            ca: args.etcd_ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
        },
        user: etcd_user(args)?,
    };
    fleet_controller::check_etcd(&etcd)?;
    Ok(etcd)
}

/// `--import-data DIR`: copies the embedded store in `dir` into etcd, and says what it copied.
fn import(dir: &std::path::Path, args: &Args) -> anyhow::Result<()> {
    let options = etcd_options(args)?;
    let i = fleet_controller::import_data(dir, &options)?;
    say(&format!(
        "imported {} into etcd under {}: {} fleets, {} releases with {} history events, {} \
         desired states, {} answers ({} keys in {} transactions)",
        dir.display(),
        options.prefix,
        i.fleets,
        i.releases,
        i.events,
        i.desired,
        i.answers,
        i.keys,
        i.transactions
    ));
    Ok(())
}

/// `--etcd-user` with its password from `--etcd-password-file`; both or neither.
fn etcd_user(args: &Args) -> anyhow::Result<Option<fleet_controller::Credentials>> {
    let (user, file) = match (&args.etcd_user, &args.etcd_password_file) {
        (None, None) => return Ok(None),
        (Some(user), Some(file)) => (user, file),
        (Some(_), None) => anyhow::bail!(
            "--etcd-user without --etcd-password-file: give the file that holds its password"
        ),
        (None, Some(_)) => anyhow::bail!(
            "--etcd-password-file without --etcd-user: give the user whose password it holds"
        ),
    };
    // Read now, so that a file that cannot work is told at start; and again each time etcd is
    // authenticated to, so that a password renewed in the file is used.
    let password = fleet_controller::Password::File(file.clone());
    password.read(user)?;
    Ok(Some(fleet_controller::Credentials {
        user: user.clone(),
        password,
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_over_listens_where_the_process_listened() {
        let args = "--data d --listen 127.0.0.1:0 --admin=127.0.0.1:0 --name x";
        let args = args.split(' ').map(std::ffi::OsString::from);
        let grpc: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let admin: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let once = listening_on(args, [("--listen", grpc), ("--admin", admin)]);
        let want = "--data d --name x --listen 127.0.0.1:4000 --admin 127.0.0.1:4001";
        assert_eq!(once.join(" ".as_ref()), want);
        // Again and again: the flags do not pile up.
        let twice = listening_on(once.into_iter(), [("--listen", grpc), ("--admin", admin)]);
        assert_eq!(twice.join(" ".as_ref()), want);
    }

    #[test]
    fn starting_over_again_and_again_soon_after_leading_waits_longer_each_time() {
        let ttl = Duration::from_secs(10);
        let (soon, long) = (Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(backoff(ttl, 0, soon), (ttl, 1));
        assert_eq!(backoff(ttl, 1, soon), (ttl * 2, 2));
        assert_eq!(backoff(ttl, 3, soon), (ttl * 8, 4));
        assert_eq!(backoff(ttl, 40, soon).0, ttl * 32, "at most");
        assert_eq!(
            backoff(ttl, 40, long),
            (ttl, 0),
            "after a long term, from the start"
        );
    }
}
