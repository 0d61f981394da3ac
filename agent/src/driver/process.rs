//! The `process` driver: each instance is a local process from the manifest's command, on a
//! port of its own on 127.0.0.1. An instance is ready once its health check answers 2xx; a
//! crashed one is restarted with exponential backoff; unwanted ones get SIGTERM, then SIGKILL
//! five seconds later. With a ledger (`ledger.rs`), the instances are kept in a file, and an
//! agent started after one that died takes over those it left running; an agent that stops
//! leaves them serving for the next, as the Kubernetes driver leaves its Deployments (unless
//! told to stop them on exit).

mod ledger;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{Driver, Running, Want};

const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
const STOP_GRACE: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct ProcessDriver {
    instances: Vec<Instance>,
    want: Want,
    http: reqwest::Client,
    /// Where the instances are kept, and what was last written there.
    ledger: Option<(PathBuf, Vec<ledger::Entry>)>,
    /// Whether the instances stop when the driver shuts down (or is dropped). Without a
    /// ledger they do: no agent could take them over.
    stop_on_exit: bool,
    /// Instances no longer wanted, being stopped (SIGTERM, then SIGKILL after the grace):
    /// waited for at shutdown, as they are in no ledger any more.
    stopping: Vec<tokio::task::JoinHandle<()>>,
}

struct Instance {
    version: String,
    index: u32,
    port: u16,
    child: Option<Child>,
    /// A process an earlier agent started and left running, taken over: its id and start
    /// time. It is no child of this one, so its end is seen by its id going away.
    adopted: Option<(u32, u64)>,
    /// When the kernel started `child`, to name it in the ledger.
    started: Option<u64>,
    /// The command line it was started with.
    command: Vec<String>,
    healthy: bool,
    /// Crashes in a row, for the backoff.
    crashes: u32,
    restart_at: Option<Instant>,
    last_error: Option<String>,
}

impl Default for ProcessDriver {
    fn default() -> Self {
        ProcessDriver {
            instances: Vec::new(),
            want: Want::default(),
            http: crate::http_client(),
            ledger: None,
            stop_on_exit: true,
            stopping: Vec::new(),
        }
    }
}

impl ProcessDriver {
    /// Where a driver's ledger is kept by default: `$XDG_RUNTIME_DIR` (the user's own), else
    /// `fleet-agent-UID` in the temporary directory, made for this user only.
    pub fn ledger_dir() -> std::io::Result<PathBuf> {
        let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        // Not one left by `su` or `sudo`: another user's, it could not be written.
        match runtime
            .filter(|d| d.is_absolute())
            .map(ledger::checked_private)
        {
            Some(Ok(dir)) => Ok(dir),
            _ => ledger::private_dir(&format!("fleet-agent-{}", ledger::euid())),
        }
    }

    /// Takes the ledger `path` for this agent alone ([`ledger::lock`]): hold what it returns
    /// for as long as a driver uses the file.
    pub fn lock_ledger(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
        ledger::lock(path)
    }

    /// A driver that keeps its instances in the file `path`, taking over first those it
    /// names that still run (left by an agent that died without stopping them).
    pub fn with_ledger(path: PathBuf) -> Self {
        let entries = ledger::read(&path);
        let instances = entries.iter().filter(|e| e.alive()).map(|e| {
            tracing::info!(version = %e.version, port = e.port, pid = e.pid, "taking over an instance an earlier agent left running");
            Instance {
                version: e.version.clone(),
                index: e.index,
                port: e.port,
                child: None,
                adopted: Some((e.pid, e.started)),
                started: None,
                command: e.command.clone(),
                healthy: false,
                crashes: 0,
                restart_at: None,
                last_error: None,
            }
        });
        ProcessDriver {
            instances: instances.collect(),
            ledger: Some((path, entries)),
            stop_on_exit: false,
            ..ProcessDriver::default()
        }
    }

    /// The driver, stopping its instances when it shuts down rather than leaving them to the
    /// next agent (`--stop-instances-on-exit`).
    pub fn stopping_on_exit(self) -> Self {
        ProcessDriver {
            stop_on_exit: true,
            ..self
        }
    }

    /// The process ids of the running instances, by version.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.instances
            .iter()
            .filter_map(|i| Some((i.version.clone(), i.pid()?)))
            .collect()
    }

    /// Writes the instances to the ledger, if there is one and they changed.
    fn record(&mut self) {
        let Some((path, written)) = &mut self.ledger else {
            return;
        };
        let now: Vec<ledger::Entry> = (self.instances.iter())
            .filter_map(|i| {
                let (pid, started) = match i.adopted {
                    Some(adopted) => adopted,
                    None => (i.pid()?, i.started?),
                };
                let (version, index, port) = (i.version.clone(), i.index, i.port);
                Some(ledger::Entry {
                    version,
                    index,
                    port,
                    pid,
                    started,
                    command: i.command.clone(),
                })
            })
            .collect();
        if now == *written {
            return;
        }
        match ledger::write(path, &now) {
            Ok(()) => *written = now,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the instances file; an agent started after this one would not take them over")
            }
        }
    }

    async fn check(&mut self, i: usize) {
        let now = Instant::now();
        let health = self.want.health_check.clone();
        let instance = &mut self.instances[i];
        if let Some((pid, _)) = instance
            .adopted
            .filter(|(pid, started)| ledger::started(*pid) != Some(*started))
        {
            tracing::warn!(version = %instance.version, port = instance.port, pid, "instance taken over has ended; restarting");
            instance.adopted = None;
            instance.healthy = false;
            instance.crashes += 1;
            instance.last_error = Some("ended (taken over from an earlier agent)".into());
            instance.restart_at = Some(now + backoff(instance.crashes));
        }
        if let Some(child) = &mut instance.child
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(version = %instance.version, port = instance.port, %status, "instance exited; restarting");
            instance.child = None;
            instance.healthy = false;
            instance.crashes += 1;
            instance.last_error = Some(format!("exited with {status}"));
            instance.restart_at = Some(now + backoff(instance.crashes));
        }
        if instance.pid().is_none() {
            if instance.restart_at.is_none_or(|t| t <= now) {
                start(&self.want, instance, self.stop_on_exit);
            }
            return;
        }
        let url = format!("http://127.0.0.1:{}{health}", instance.port);
        let answer = self.http.get(&url).timeout(HEALTH_TIMEOUT).send().await;
        let instance = &mut self.instances[i];
        let was_healthy = instance.healthy;
        instance.healthy = answer.as_ref().is_ok_and(|r| r.status().is_success());
        if instance.healthy {
            instance.crashes = 0;
            instance.last_error = None;
        } else if was_healthy {
            // Fell ill in service (a starting one is simply "starting", or why it exited).
            instance.last_error = Some(match answer {
                Ok(r) => format!("its health check {health} answered {}", r.status()),
                Err(e) => format!(
                    "its health check {health} failed: {}",
                    crate::no_answer(&e, HEALTH_TIMEOUT)
                ),
            });
        }
    }
}

impl Driver for ProcessDriver {
    fn apply(&mut self, want: &Want) {
        self.want = want.clone();
        let wanted = |i: &Instance| match want.versions.get(&i.version) {
            Some(n) => i.index < *n,
            None => want.keep_others,
        };
        let (keep, stop): (Vec<Instance>, Vec<Instance>) = std::mem::take(&mut self.instances)
            .into_iter()
            .partition(wanted);
        self.instances = keep;
        self.stopping.retain(|stop| !stop.is_finished());
        for instance in stop {
            tracing::info!(version = %instance.version, port = instance.port, "instance no longer wanted; stopping");
            if let Some(child) = instance.child {
                self.stopping.push(terminate(child));
            }
            if let Some(adopted) = instance.adopted {
                self.stopping.push(tokio::spawn(stop_adopted(adopted)));
            }
        }
        for (version, replicas) in &want.versions {
            for index in 0..*replicas {
                if self
                    .instances
                    .iter()
                    .any(|i| &i.version == version && i.index == index)
                {
                    continue;
                }
                let Some(port) = free_port() else { continue };
                let mut instance = Instance {
                    version: version.clone(),
                    index,
                    port,
                    child: None,
                    adopted: None,
                    started: None,
                    command: Vec::new(),
                    healthy: false,
                    crashes: 0,
                    restart_at: None,
                    last_error: None,
                };
                start(want, &mut instance, self.stop_on_exit);
                self.instances.push(instance);
            }
        }
        self.record();
    }

    async fn poll(&mut self) -> Running {
        for i in 0..self.instances.len() {
            self.check(i).await;
        }
        self.record();
        let mut running = Running::default();
        let mut waiting = Vec::new();
        for (version, replicas) in &self.want.versions {
            let of_version: Vec<&Instance> = self
                .instances
                .iter()
                .filter(|i| &i.version == version)
                .collect();
            let healthy: Vec<String> = of_version
                .iter()
                .filter(|i| i.healthy)
                .map(|i| format!("127.0.0.1:{}", i.port))
                .collect();
            if healthy.len() == *replicas as usize {
                running.ready.insert(version.clone(), healthy);
            } else {
                let why = of_version
                    .iter()
                    .find_map(|i| i.last_error.clone())
                    .unwrap_or_else(|| "starting".into());
                waiting.push(format!(
                    "{version}: {}/{replicas} ready ({why})",
                    healthy.len()
                ));
            }
        }
        running.detail = waiting.join("; ");
        running
    }

    async fn shutdown(&mut self) {
        // Those being stopped are stopped, whatever becomes of the others.
        for stop in std::mem::take(&mut self.stopping) {
            let _ = stop.await;
        }
        if !self.stop_on_exit {
            // Fail-static: the instances serve on, kept in the ledger for the next agent.
            self.record();
            tracing::info!(
                instances = self.instances.len(),
                "leaving the instances serving for the next agent to take over"
            );
            return;
        }
        for instance in std::mem::take(&mut self.instances) {
            if let Some(adopted) = instance.adopted {
                stop_adopted(adopted).await;
            }
            if let Some(mut child) = instance.child {
                if let Some(pid) = child
                    .id()
                    .and_then(|p| i32::try_from(p).ok())
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                if tokio::time::timeout(STOP_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
        self.record();
    }
}

impl Instance {
    /// The id of its process, while it has one.
    fn pid(&self) -> Option<u32> {
        match (&self.child, self.adopted) {
            (Some(child), _) => child.id(),
            (None, Some((pid, _))) => Some(pid),
            (None, None) => None,
        }
    }
}

/// SIGTERM to a process taken over, then SIGKILL if it is still the same process after the
/// grace period.
async fn stop_adopted((pid, started): (u32, u64)) {
    let Some(id) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let same = || ledger::started(pid) == Some(started);
    if !same() {
        return;
    }
    let _ = rustix::process::kill_process(id, rustix::process::Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    while same() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if same() {
        let _ = rustix::process::kill_process(id, rustix::process::Signal::KILL);
    }
}

/// Starts `instance`'s process from `want`'s command; killed when its handle is dropped if
/// `kill_on_drop`.
fn start(want: &Want, instance: &mut Instance, kill_on_drop: bool) {
    let replace = |arg: &String| {
        arg.replace("{version}", &instance.version)
            .replace("{port}", &instance.port.to_string())
    };
    let argv: Vec<String> = want.command.iter().map(replace).collect();
    let Some((program, args)) = argv.split_first() else {
        instance.last_error = Some("the workload has no command".into());
        return;
    };
    let spawned = Command::new(program)
        .args(args)
        .env("PORT", instance.port.to_string())
        .env("FLEET_VERSION", &instance.version)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(kill_on_drop)
        .spawn();
    match spawned {
        Ok(child) => {
            tracing::info!(version = %instance.version, port = instance.port, pid = child.id(), "instance started");
            instance.started = child.id().and_then(ledger::started);
            instance.command = argv.clone();
            instance.child = Some(child);
            instance.last_error = None;
        }
        Err(e) => {
            instance.last_error = Some(format!("cannot start {program}: {e}"));
            instance.crashes += 1;
            instance.restart_at = Some(Instant::now() + backoff(instance.crashes));
        }
    }
}

/// SIGTERM now, SIGKILL if the process is still there after the grace period: the task that
/// waits.
fn terminate(mut child: Child) -> tokio::task::JoinHandle<()> {
    if let Some(pid) = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    tokio::spawn(async move {
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    })
}

fn backoff(crashes: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << crashes.min(10))).min(MAX_BACKOFF)
}

/// A port nobody listens on now. Another process could take it before the instance binds
/// it; the instance then fails its health check and is restarted on its next try.
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}
