//! A local etcd for a fleet whose controllers keep their state in it (`fleetctl demo --ha`,
//! and the tests): Debian's `etcd-server`, one member on 127.0.0.1, its ports the kernel's
//! choice; where it serves clients is read from its log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long etcd may take to serve.
pub const START_WITHIN: Duration = Duration::from_secs(20);

/// One etcd member on 127.0.0.1, killed when dropped.
pub struct LocalEtcd {
    /// `http://127.0.0.1:PORT`, for the controllers' `--etcd`.
    pub url: String,
    child: Child,
}

impl LocalEtcd {
    /// Starts a member with its data and its log (`etcd.log`) in `dir`, and waits until it
    /// serves clients. It leads a process group of its own, so that a Ctrl-C at the terminal
    /// does not end it before the controllers that keep their state in it: whoever starts it
    /// catches the signal and drops it (ending it by its PID) once they have stopped.
    pub fn start(dir: &Path) -> anyhow::Result<LocalEtcd> {
        use std::os::unix::process::CommandExt as _;
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
        let log = dir.join("etcd.log");
        let mut command = Command::new("etcd");
        command.process_group(0);
        command
            .args(["--name", "fleet", "--data-dir"])
            .arg(dir.join("data"))
            .args(one_member("fleet", "http://127.0.0.1:0"));
        let mut child = spawn(command, &log)?;
        match wait_serving(&mut child, &log, START_WITHIN) {
            Ok(addr) => Ok(LocalEtcd {
                url: format!("http://{addr}"),
                child,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The flags of a cluster of one member, `name`, serving clients at `clients` (a URL whose
/// port may be 0) and its peer port on a port of the kernel's choice.
pub fn one_member(name: &str, clients: &str) -> Vec<String> {
    let peer = "http://127.0.0.1:0";
    [
        "--listen-client-urls",
        clients,
        "--advertise-client-urls",
        clients,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("{name}={peer}")])
    .collect()
}

/// Starts `command` (etcd and its flags) with the flags every local etcd has, its log in
/// `log`.
pub fn spawn(mut command: Command, log: &Path) -> anyhow::Result<Child> {
    command
        .args(["--enable-grpc-gateway=false", "--log-outputs", "stderr"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting etcd: is it installed? (Debian: apt install etcd-server)")
}

/// Waits until `child`'s `log` says where it serves clients, and says where; an error if it
/// ends first (a port taken meanwhile, say), or if it has not within `within`. Blocks the
/// thread.
pub fn wait_serving(child: &mut Child, log: &Path, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log)?;
        if let Some(addr) = serving_at(&text) {
            return Ok(addr.to_string());
        }
        if let Some(status) = child.try_wait()? {
            bail!("etcd ended ({status}) before serving: {text}");
        }
        if Instant::now() > deadline {
            bail!("etcd did not serve within {within:?}: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where etcd says it serves clients: in 3.4's words (Debian 12's, run here), or in 3.5's
/// JSON log, as its source writes it (not run here).
fn serving_at(log: &str) -> Option<&str> {
    fn addr(rest: &str) -> Option<&str> {
        rest.split([',', ' ', '"', '\n']).next()
    }
    for said in [
        "serving insecure client requests on ",
        "serving client requests on ",
    ] {
        if let Some(at) = log.find(said) {
            return addr(&log[at + said.len()..]);
        }
    }
    let line = log
        .lines()
        .find(|l| l.contains("serving client traffic insecurely"))?;
    let at = line.find("\"address\":\"")? + "\"address\":\"".len();
    addr(&line[at..])
}
