//! A whole fleet on this machine, as processes on 127.0.0.1: a controller, and per region a
//! fleet-proxy and a fleet-agent (whose process driver runs the service). Used by
//! `fleetctl demo` and by the end-to-end tests.
//!
//! Every process binds port 0 and says where it listens; logs go to files in the work
//! directory. [`LocalFleet::stop`] ends every process it started, by PID: SIGTERM first (so
//! agents stop the instances they started), SIGKILL after a grace period.

pub mod etcd;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_proto::connect::ClientTls;
use fleet_proto::names;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::certs::Authority;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(8);

pub struct LocalFleet {
    pub dir: PathBuf,
    bin: PathBuf,
    /// Started processes, in start order.
    children: Vec<(String, Child)>,
    /// The process group of every process ever started; each leads its own, and an agent's
    /// service instances join its group, so they can be ended even after the agent was killed.
    groups: Vec<u32>,
    /// The controller's gRPC URL.
    pub controller: String,
    /// Where it listens, for a restart on the same port.
    controller_addr: Option<SocketAddr>,
    /// Its admin endpoints.
    controller_admin: Option<SocketAddr>,
    pub regions: Vec<LocalRegion>,
    /// Under mutual TLS: the certificates, in `<dir>/certs`.
    tls: Option<LocalTls>,
    /// The etcd the controllers keep their state in, if not the embedded store.
    etcd: Option<String>,
    /// On etcd: a second controller, standing by for the first.
    standby: Option<Standby>,
}

/// How a local fleet is set up, where it differs from the default (plain gRPC, the
/// embedded store).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Every connection to the controller under mutual TLS, each client showing a
    /// certificate of its own (see [`LocalFleet::client_tls`]).
    pub tls: bool,
    /// The controller keeps its state in the etcd at this URL, and a second controller
    /// stands by for it, through which every client of the fleet reaches it (as through a
    /// Kubernetes Service): [`LocalFleet::standby_leads`].
    pub etcd: Option<String>,
}

/// A controller standing by for the one that leads.
struct Standby {
    /// Its admin endpoints.
    admin: SocketAddr,
    leads: Leads,
}

/// Resolves once a controller on etcd says it leads.
type Leads = tokio::task::JoinHandle<anyhow::Result<()>>;

/// How soon a standby controller of a local fleet takes over from a dead leader.
pub const LEASE_TTL: &str = "3s";

/// A local fleet's certificates under mutual TLS, made by `fleetctl certs`' [`Authority`]:
/// the controller's for `localhost` and 127.0.0.1, one operator's (`fleetctl`) for the
/// release API, and one per agent.
struct LocalTls {
    authority: Authority,
}

/// The operator the local fleet's own client (the demo, the tests) acts as under TLS.
const LOCAL_OPERATOR: &str = "fleetctl";

impl LocalTls {
    fn make(dir: &Path) -> anyhow::Result<LocalTls> {
        let authority = Authority {
            dir: dir.join("certs"),
            days: Some(2),
        };
        authority.ca()?;
        let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
        authority.server("controller", &["localhost".into()], &localhost)?;
        authority.client(&names::operator(LOCAL_OPERATOR))?;
        Ok(LocalTls { authority })
    }

    /// What a client showing `name`'s certificate gives to connect.
    fn client(&self, name: &str) -> ClientTls {
        let ([ca, _], [cert, key]) = (self.authority.files("ca"), self.authority.files(name));
        ClientTls {
            ca: Some(ca),
            cert: Some(cert),
            key: Some(key),
        }
    }

    /// The agent of `cluster` in `region`'s, made the first time it is asked for.
    fn agent(&self, region: &str, cluster: &str) -> anyhow::Result<ClientTls> {
        let name = names::agent(region, cluster);
        let [cert, _] = self.authority.files(&name);
        if !cert.exists() {
            self.authority.client(&name)?;
        }
        Ok(self.client(&name))
    }
}

pub struct LocalRegion {
    pub name: String,
    pub cluster: String,
    pub traffic: SocketAddr,
    /// The proxy's admin API.
    pub admin: SocketAddr,
    /// The agent's admin endpoints, as it was started.
    pub agent: SocketAddr,
}

impl LocalFleet {
    /// Starts a controller and, for each `(region, cluster)`, a proxy and an agent. `env` is
    /// given to the agents (and so to the service instances they start).
    pub async fn start(
        dir: &Path,
        bin: &Path,
        regions: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<LocalFleet> {
        LocalFleet::start_with(dir, bin, regions, env, Setup::default()).await
    }

    /// As [`LocalFleet::start`], set up as `setup` says.
    pub async fn start_with(
        dir: &Path,
        bin: &Path,
        regions: &[(&str, &str)],
        env: &[(&str, &str)],
        setup: Setup,
    ) -> anyhow::Result<LocalFleet> {
        for name in [
            "fleet-controller",
            "fleet-agent",
            "fleet-proxy",
            "fleet-demo-app",
        ] {
            if !bin.join(name).is_file() {
                bail!(
                    "{name} is not in {}; build every binary first: cargo build --release --workspace --bins",
                    bin.display()
                );
            }
        }
        std::fs::create_dir_all(dir)?;
        let tls = setup.tls.then(|| LocalTls::make(dir)).transpose()?;
        let mut fleet = LocalFleet {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            children: Vec::new(),
            groups: Vec::new(),
            controller: String::new(),
            controller_addr: None,
            controller_admin: None,
            regions: Vec::new(),
            tls,
            etcd: setup.etcd,
            standby: None,
        };
        match fleet.start_all(regions, env).await {
            Ok(()) => Ok(fleet),
            Err(e) => {
                let _ = fleet.stop().await;
                Err(e)
            }
        }
    }

    async fn start_all(
        &mut self,
        regions: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        self.start_controller().await?;
        if self.etcd.is_some() {
            self.start_standby().await?;
        }
        for (region, cluster) in regions {
            let (traffic, admin) = self.start_proxy(region).await?;
            let agent = self.start_agent(region, cluster, admin, env).await?;
            self.regions.push(LocalRegion {
                name: region.to_string(),
                cluster: cluster.to_string(),
                traffic,
                admin,
                agent,
            });
        }
        Ok(())
    }

    async fn start_controller(&mut self) -> anyhow::Result<()> {
        self.spawn_controller("127.0.0.1:0").await
    }

    /// Kills the controller with SIGKILL and starts a new one on the same address and data
    /// directory, as after a crash; the agents reconnect to it.
    pub async fn crash_and_restart_controller(&mut self) -> anyhow::Result<()> {
        self.crash_controller().await?;
        self.restart_controller().await
    }

    /// Kills the controller with SIGKILL, as a crash would.
    pub async fn crash_controller(&mut self) -> anyhow::Result<()> {
        self.stop_one("controller", rustix::process::Signal::KILL)
            .await
    }

    /// Starts a controller on the last one's address and data directory.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        let addr = self
            .controller_addr
            .context("no controller has listened yet")?
            .to_string();
        self.spawn_controller(&addr).await
    }

    /// Waits, up to `within`, for the controller standing by to lead (after the leader was
    /// stopped); it is then this fleet's `controller`, and the old one, if it still runs,
    /// `controller, deposed`.
    pub async fn standby_leads(&mut self, within: Duration) -> anyhow::Result<()> {
        let standby = self.standby.take().context("no controller stands by")?;
        tokio::time::timeout(within, standby.leads)
            .await
            .with_context(|| format!("the standby did not take over within {within:?}"))???;
        // The old leader, if it still runs (paused, cut off), goes by another name now.
        for (name, _) in &mut self.children {
            if name == "controller" {
                *name = "controller, deposed".into();
            }
        }
        let leader = (self.children.iter_mut()).find(|(name, _)| name == "controller standby");
        let (name, _) = leader.context("the standby was stopped")?;
        *name = "controller".into();
        self.controller_admin = Some(standby.admin);
        Ok(())
    }

    /// The admin endpoints of the controller last started to lead or serve.
    pub fn controller_admin(&self) -> Option<SocketAddr> {
        self.controller_admin
    }

    /// The admin endpoints of the controller standing by, if one does.
    pub fn standby_admin(&self) -> Option<SocketAddr> {
        self.standby.as_ref().map(|s| s.admin)
    }

    /// The command that starts a controller listening on `listen`, on this fleet's store.
    fn controller_command(&self, listen: &str) -> anyhow::Result<Command> {
        let n = self.children.len();
        let mut command = self.command("fleet-controller", &format!("controller-{n}"))?;
        command.args(["--listen", listen, "--admin", "127.0.0.1:0"]);
        match &self.etcd {
            Some(url) => {
                let name = format!("controller-{n}");
                let flags = ["--etcd", url, "--lease-ttl", LEASE_TTL, "--name", &name];
                command.args(flags);
            }
            None => {
                command.arg("--data").arg(self.dir.join("controller"));
            }
        }
        if let Some(tls) = &self.tls {
            let [cert, key] = tls.authority.files("controller");
            let [ca, _] = tls.authority.files("ca");
            let flags = [
                ("--tls-cert", cert),
                ("--tls-key", key),
                ("--client-ca", ca),
            ];
            for (flag, path) in flags {
                command.arg(flag).arg(path);
            }
        }
        Ok(command)
    }

    async fn spawn_controller(&mut self, listen: &str) -> anyhow::Result<()> {
        let (child, grpc, admin, leads) = self.spawn_controller_process(listen).await?;
        if let Some(leads) = leads {
            tokio::time::timeout(START_TIMEOUT, leads)
                .await
                .context("the first controller did not lead in time")???;
        }
        self.controller_addr = Some(grpc);
        self.controller_admin = Some(admin);
        self.controller = self.url(grpc);
        self.started(("controller".into(), child));
        Ok(())
    }

    /// Starts a controller that stands by for the leader; every client of this fleet dials
    /// it from now on, and reaches the leader through it until it leads itself.
    async fn start_standby(&mut self) -> anyhow::Result<()> {
        let (child, grpc, admin, leads) = self.spawn_controller_process("127.0.0.1:0").await?;
        let leads = leads.context("only controllers on etcd stand by")?;
        self.controller = self.url(grpc);
        self.standby = Some(Standby { admin, leads });
        self.started(("controller standby".into(), child));
        Ok(())
    }

    /// A controller process listening on `listen`: it, its gRPC and admin addresses and, on
    /// etcd, what resolves once it leads.
    async fn spawn_controller_process(
        &mut self,
        listen: &str,
    ) -> anyhow::Result<(Child, SocketAddr, SocketAddr, Option<Leads>)> {
        let mut child = (self.controller_command(listen)?)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting fleet-controller")?;
        let stdout = child.stdout.take().context("controller stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .context("the controller did not start in time")??
            .context("the controller ended at once")?;
        let addr = |key| field(&line, key).and_then(|a| a.parse::<SocketAddr>().ok());
        let (Some(grpc), Some(admin)) = (addr("grpc="), addr("admin=")) else {
            bail!("the controller did not say where it listens: {line}");
        };
        let leads = self.etcd.is_some().then(|| {
            tokio::spawn(async move {
                while let Some(line) = lines.next_line().await? {
                    if line.contains("leading") {
                        return Ok(());
                    }
                }
                bail!("the controller ended before it led")
            })
        });
        Ok((child, grpc, admin, leads))
    }

    /// The URL a client dials the controller listening at `grpc` by.
    fn url(&self, grpc: SocketAddr) -> String {
        match &self.tls {
            // A name its certificate is for, as a user would dial it.
            Some(_) => format!("https://localhost:{}", grpc.port()),
            None => format!("http://{grpc}"),
        }
    }

    async fn start_proxy(&mut self, region: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        let config = self.dir.join(format!("proxy-{region}.yaml"));
        // Until its agent programs it, the proxy knows no backend: requests get a 502/503.
        std::fs::write(
            &config,
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntracks:\n  stable: { backends: [\"127.0.0.1:1\"] }\nroutes:\n  - split: { stable: 10000 }\n",
        )?;
        let mut child = Command::new(self.bin.join("fleet-proxy"))
            .process_group(0)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting fleet-proxy")?;
        let stderr = child.stderr.take().context("proxy stderr")?;
        let log = self.dir.join(format!("proxy-{region}.log"));
        let line = first_line_with_logged(BufReader::new(stderr), "serving", log).await?;
        let traffic = field(&line, "traffic=").and_then(|a| a.split(',').next()?.parse().ok());
        let admin = field(&line, "admin=").and_then(|a| a.parse().ok());
        self.started((format!("proxy {region}"), child));
        match (traffic, admin) {
            (Some(t), Some(a)) => Ok((t, a)),
            _ => bail!("fleet-proxy for {region} did not say where it listens: {line}"),
        }
    }

    /// Starts the agent of `region`, its proxy's admin API at `admin`; also used to bring one
    /// back after it was stopped. Where the agent serves its own admin endpoints.
    pub async fn start_agent(
        &mut self,
        region: &str,
        cluster: &str,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<SocketAddr> {
        // The service's command names fleet-demo-app: find it next to the other binaries.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin.clone()];
        paths.extend(std::env::split_paths(&path));
        let mut command = self.command("fleet-agent", &format!("agent-{region}"))?;
        command
            .args([
                "--controller",
                &self.controller,
                "--region",
                region,
                "--cluster",
                cluster,
            ])
            .args([
                "--driver",
                "process",
                "--proxy-admin",
                &format!("http://{admin}"),
                "--admin",
                "127.0.0.1:0",
            ])
            .env("PATH", std::env::join_paths(paths)?);
        // Its instances are kept in the fleet's directory: an agent started again in its
        // place takes over those still running.
        let instances = self
            .dir
            .join(format!("agent-{region}-{cluster}.instances.json"));
        command.arg("--instances-file").arg(instances);
        if let Some(tls) = &self.tls {
            command.args(tls.agent(region, cluster)?.args());
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .context("starting fleet-agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        self.started((format!("agent {region}"), child));
        let line = first_line_with(BufReader::new(stdout), "listening admin=").await?;
        field(&line, "admin=")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the agent of {region} did not say where it listens: {line}"))
    }

    /// What the fleet's own client (the demo, the tests) gives to reach the controller: under
    /// TLS, an operator's certificate (`fleetctl.operator.fleet`); else nothing.
    pub fn client_tls(&self) -> ClientTls {
        match &self.tls {
            Some(tls) => tls.client(&names::operator(LOCAL_OPERATOR)),
            None => ClientTls::default(),
        }
    }

    /// Waits until every region's proxy answers `GET /` with a 2xx.
    pub async fn wait_until_serving(&self, within: Duration) -> anyhow::Result<()> {
        let http = http_client();
        let deadline = tokio::time::Instant::now() + within;
        for r in &self.regions {
            let url = format!("http://{}/", r.traffic);
            loop {
                let answer = http.get(&url).timeout(Duration::from_secs(1)).send().await;
                if answer.is_ok_and(|a| a.status().is_success()) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "region {} does not serve yet (see the logs in {})",
                        r.name,
                        self.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Processes still alive in the groups this fleet started: none, once `stop` is done.
    pub fn leftovers(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // `pid (comm) state ppid pgrp …`; zombies are already dead.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let mut fields = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or_default()
                    .split_whitespace();
                let state = fields.next();
                let pgrp = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
                state != Some("Z") && pgrp.is_some_and(|g| self.groups.contains(&g))
            })
            .collect()
    }

    fn started(&mut self, (name, child): (String, Child)) {
        self.groups.extend(child.id());
        self.children.push((name, child));
    }

    /// Takes out of the fleet each started process that has ended by itself (killed from
    /// outside, say), with its exit status: waited for, so that it leaves no zombie that
    /// `kill -0` would still find.
    pub fn ended_by_themselves(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut ended = Vec::new();
        self.children
            .retain_mut(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    ended.push((name.clone(), status));
                    false
                }
                _ => true,
            });
        ended
    }

    /// Stops one started process by name (`controller`, `agent us-west`, …) with `signal`.
    pub async fn stop_one(
        &mut self,
        name: &str,
        signal: rustix::process::Signal,
    ) -> anyhow::Result<()> {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        let (_, mut child) = self.children.remove(index);
        send(&child, signal);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        Ok(())
    }

    /// The process id of one started process, by name.
    pub fn pid(&self, name: &str) -> anyhow::Result<u32> {
        let (_, child) = (self.children.iter())
            .find(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        child.id().with_context(|| format!("{name} has ended"))
    }

    /// Sends `signal` to one started process by name, leaving it in the fleet.
    pub fn signal(&self, name: &str, signal: rustix::process::Signal) -> anyhow::Result<()> {
        let (_, child) = (self.children.iter())
            .find(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        send(child, signal);
        Ok(())
    }

    /// Waits up to `within` for one started process to end by itself: its exit status. It
    /// is no longer the fleet's.
    pub async fn ended(
        &mut self,
        name: &str,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let index = (self.children.iter())
            .position(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        let (_, mut child) = self.children.remove(index);
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.kill().await;
                bail!("{name} did not end within {within:?}")
            }
        }
    }

    /// Ends every process this fleet started: agents first (they leave their instances
    /// serving, as they would for the next agent), then the proxies and the controller, and
    /// last whatever is left in their process groups (the instances).
    /// Returns what did not stop cleanly on SIGTERM: each process that failed, or that was
    /// killed after `STOP_GRACE`.
    pub async fn stop(&mut self) -> Vec<String> {
        let mut children = std::mem::take(&mut self.children);
        children.sort_by_key(|(name, _)| !name.starts_with("agent"));
        for (_, child) in &children {
            send(child, rustix::process::Signal::TERM);
        }
        let mut unclean = Vec::new();
        for (name, mut child) in children {
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(status) => unclean.push(format!("{name}: {status:?}")),
                Err(_) => {
                    tracing_free_warn(&name);
                    let _ = child.kill().await;
                    unclean.push(format!("{name}: killed after {STOP_GRACE:?}"));
                }
            }
        }
        // Whatever is left in their groups: the agents' instances.
        kill_groups(&self.groups);
        unclean
    }

    fn command(&self, binary: &str, log: &str) -> anyhow::Result<Command> {
        // Appended to: a process started again in another's place (an agent) shares its log
        // with what the first left running (its instances, which write to it too).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{log}.log")))?;
        let mut command = Command::new(self.bin.join(binary));
        // The local fleet speaks plain gRPC: TLS settings in the user's environment (for
        // fleetctl against a real controller) are not its own.
        for var in [
            "FLEET_CA",
            "FLEET_TLS_CERT",
            "FLEET_TLS_KEY",
            "FLEET_SERVER_TLS_CERT",
            "FLEET_SERVER_TLS_KEY",
            "FLEET_CLIENT_CA",
            "FLEET_CLIENT_CRL",
        ] {
            command.env_remove(var);
        }
        command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        Ok(command)
    }
}

/// Answers seen, by region, then by `version status` (`v2 200`, `- error`).
pub type Counts = Arc<tokio::sync::Mutex<BTreeMap<String, BTreeMap<String, u64>>>>;

/// Simulated users sending requests through every region's proxy, each user keeping the
/// sticky cookie it was given. Stops when [`Traffic::stop`] is called or it is dropped.
pub struct Traffic {
    pub counts: Counts,
    stop: Arc<AtomicBool>,
}

impl Traffic {
    pub fn start(fleet: &LocalFleet, users: usize, workers: usize, pause: Duration) -> Traffic {
        let regions: Vec<&str> = fleet.regions.iter().map(|r| r.name.as_str()).collect();
        Traffic::start_in(fleet, &regions, users, workers, pause)
    }

    /// Traffic through the proxies of `regions` only.
    pub fn start_in(
        fleet: &LocalFleet,
        regions: &[&str],
        users: usize,
        workers: usize,
        pause: Duration,
    ) -> Traffic {
        let traffic = Traffic {
            counts: Counts::default(),
            stop: Arc::default(),
        };
        for r in fleet
            .regions
            .iter()
            .filter(|r| regions.contains(&r.name.as_str()))
        {
            for worker in 0..workers {
                let user = User {
                    region: r.name.clone(),
                    proxy: r.traffic,
                    first: worker,
                    step: workers,
                    users,
                    pause,
                };
                tokio::spawn(user.run(traffic.counts.clone(), traffic.stop.clone()));
            }
        }
        traffic
    }

    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One worker, playing users `first`, `first + step`, … in turn.
struct User {
    region: String,
    proxy: SocketAddr,
    first: usize,
    step: usize,
    users: usize,
    pause: Duration,
}

impl User {
    async fn run(self, counts: Counts, stop: Arc<AtomicBool>) {
        let http = http_client();
        let mut cookies: BTreeMap<usize, String> = BTreeMap::new();
        let mut user = self.first;
        while !stop.load(Relaxed) {
            user = (user + self.step) % self.users.max(1);
            let mut request = http
                .get(format!("http://{}/", self.proxy))
                .timeout(Duration::from_secs(5));
            if let Some(c) = cookies.get(&user) {
                request = request.header("cookie", c.as_str());
            }
            let key = match request.send().await {
                Ok(response) => {
                    if let Some(set) = response
                        .headers()
                        .get("set-cookie")
                        .and_then(|v| v.to_str().ok())
                    {
                        cookies.insert(user, set.split(';').next().unwrap_or_default().to_string());
                    }
                    let version = response
                        .headers()
                        .get("x-version")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    format!("{version} {}", response.status().as_u16())
                }
                Err(_) => "- error".to_string(),
            };
            *counts
                .lock()
                .await
                .entry(self.region.clone())
                .or_default()
                .entry(key)
                .or_default() += 1;
            tokio::time::sleep(self.pause).await;
        }
    }
}

/// The directory of the workspace's binaries, for a program one directory below it: a test
/// in `target/<profile>/deps`, an example in `target/<profile>/examples`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let below = exe.parent().context("the program's directory")?;
    Ok(below
        .parent()
        .context("the target directory")?
        .to_path_buf())
}

/// An HTTP client for talking to the fleet. reqwest is built without a default TLS provider
/// (no C toolchain for aws-lc); install ring first, as every part of Fleet does.
/// Whether the controller whose admin endpoints are at `admin` says it leads (`Some(true)`)
/// or stands by (`Some(false)`); `None` if it cannot be read.
pub async fn leads(admin: SocketAddr) -> Option<bool> {
    let answer = http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await;
    let metrics = answer.ok()?.text().await.ok()?;
    // The sample's own line: its HELP text says "1 while this controller leads".
    let sample = metrics
        .lines()
        .find_map(|line| line.strip_prefix("fleet_controller_leading "))?;
    Some(sample == "1")
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

impl Drop for LocalFleet {
    /// A fleet dropped without `stop` (a failed test): end every process group at once.
    fn drop(&mut self) {
        kill_groups(&self.groups);
    }
}

fn kill_groups(groups: &[u32]) {
    let pids = groups
        .iter()
        .filter_map(|p| i32::try_from(*p).ok())
        .filter_map(rustix::process::Pid::from_raw);
    for pid in pids {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

fn send(child: &Child, signal: rustix::process::Signal) {
    if let Some(pid) = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

fn tracing_free_warn(name: &str) {
    eprintln!("fleetctl: {name} did not stop in time; killing it");
}

/// The first line of `reader` that contains `needle`.
async fn first_line_with(
    reader: impl tokio::io::AsyncBufRead + Unpin,
    needle: &str,
) -> anyhow::Result<String> {
    let mut lines = reader.lines();
    tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(line);
            }
        }
        bail!("the process ended before saying \"{needle}\"")
    })
    .await
    .context("the process did not start in time")?
}

/// Like [`first_line_with`], and copies every line to `log`, also after the match.
async fn first_line_with_logged(
    reader: impl tokio::io::AsyncBufRead + Unpin + Send + 'static,
    needle: &str,
    log: PathBuf,
) -> anyhow::Result<String> {
    let (found_tx, found_rx) = tokio::sync::oneshot::channel();
    let needle = needle.to_string();
    tokio::spawn(async move {
        let Ok(mut file) = tokio::fs::File::create(&log).await else {
            return;
        };
        let mut lines = reader.lines();
        let mut found = Some(found_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            if line.contains(&needle)
                && let Some(tx) = found.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    tokio::time::timeout(START_TIMEOUT, found_rx)
        .await
        .context("the process did not start in time")?
        .context("the process ended before it was ready")
}

/// The value after `key` in a log line, up to the next space.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    Some(
        line[start..]
            .split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fields_are_read_from_log_lines() {
        let line = "2026-11-23T10:00:00Z  INFO fleet_proxy::server: serving traffic=127.0.0.1:4000 admin=127.0.0.1:4001";
        assert_eq!(field(line, "traffic=").as_deref(), Some("127.0.0.1:4000"));
        assert_eq!(field(line, "admin=").as_deref(), Some("127.0.0.1:4001"));
        assert_eq!(field(line, "nope="), None);
    }
}
