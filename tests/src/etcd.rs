// Also included by the controller's own tests of its etcd store (`include!`, hence no inner
// doc comment here).

use std::process::{Child, Command};
use std::time::Instant;

use anyhow::Context as _;
use fleetctl::local::etcd::{START_WITHIN, one_member, spawn, wait_serving};

/// A real etcd (Debian's `etcd-server`) for the tests of controllers that keep their state
/// in it: one member on 127.0.0.1, its ports the kernel's choice, its data in a temporary
/// directory; killed when dropped.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`, for `--etcd`.
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// An etcd's TLS: its certificate and key, and the CA whose client certificates it takes
/// (it asks every client for one).
pub struct Tls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

impl Etcd {
    pub fn start() -> anyhow::Result<Etcd> {
        Etcd::start_with(None, &[])
    }

    /// An etcd that serves clients over TLS only (`https://`), as `tls` says.
    pub fn start_tls(tls: &Tls) -> anyhow::Result<Etcd> {
        Etcd::start_with(Some(tls), &[])
    }

    /// An etcd started with the flags `args` as well.
    pub fn start_args(args: &[&str]) -> anyhow::Result<Etcd> {
        Etcd::start_with(None, args)
    }

    fn start_with(tls: Option<&Tls>, args: &[&str]) -> anyhow::Result<Etcd> {
        let dir = scratch_dir()?;
        let log = dir.path().join("etcd.log");
        let clients = ["https://127.0.0.1:0", "http://127.0.0.1:0"];
        let clients = clients[usize::from(tls.is_none())];
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            command.arg("--cert-file").arg(&tls.cert);
            command.arg("--key-file").arg(&tls.key);
            command.arg("--trusted-ca-file").arg(&tls.client_ca);
            command.arg("--client-cert-auth");
        }
        command
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(one_member("test", clients))
            .args(args);
        let mut etcd = Etcd {
            url: String::new(),
            child: spawn(command, &log)?,
            _dir: dir,
        };
        let addr = wait_serving(&mut etcd.child, &log, START_WITHIN)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        etcd.url = format!("{scheme}://{addr}");
        Ok(etcd)
    }
}

/// A temporary directory for etcd's data, in memory where the machine has it: a disk busy
/// with the build beside the tests would stall etcd's syncs past the tests' short leases.
fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    Ok(match shm.is_dir() {
        true => tempfile::tempdir_in(shm)?,
        false => tempfile::tempdir()?,
    })
}

impl Etcd {
    /// Stops it answering (SIGSTOP) while its connections stay open, as a member that hangs.
    pub fn freeze(&self) {
        let pid = self.child.id().to_string();
        let stopped = Command::new("kill").args(["-STOP", &pid]).status();
        assert!(stopped.is_ok_and(|s| s.success()), "kill -STOP {pid}");
    }

    /// Lets it answer again (SIGCONT) after [`Etcd::freeze`]: it answers what waited at once.
    pub fn thaw(&self) {
        let pid = self.child.id().to_string();
        let continued = Command::new("kill").args(["-CONT", &pid]).status();
        assert!(continued.is_ok_and(|s| s.success()), "kill -CONT {pid}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Several etcd members on 127.0.0.1 in one cluster, each with its data in memory where the
/// machine has it; killed when dropped. Peers must be told each other's addresses before any
/// starts, so each member's ports are the kernel's choice of a free one, bound and let go just
/// before etcd binds them.
pub struct Cluster {
    /// Each member's client URL, `http://127.0.0.1:PORT`.
    pub urls: Vec<String>,
    members: Vec<Option<Child>>,
    logs: Vec<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster of `n` members, each serving once the cluster has its quorum. Started again
    /// on other ports, once, if a member ends before serving (a port taken meanwhile).
    pub fn start(n: usize) -> anyhow::Result<Cluster> {
        Cluster::start_once(n).or_else(|_| Cluster::start_once(n))
    }

    fn start_once(n: usize) -> anyhow::Result<Cluster> {
        let dir = scratch_dir()?;
        let free: Vec<std::net::TcpListener> = (0..2 * n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let url = |l: &std::net::TcpListener| -> anyhow::Result<String> {
            Ok(format!("http://{}", l.local_addr()?))
        };
        let peers: Vec<String> = free[..n].iter().map(url).collect::<Result<_, _>>()?;
        let urls: Vec<String> = free[n..].iter().map(url).collect::<Result<_, _>>()?;
        drop(free);
        let initial: Vec<String> = (peers.iter().enumerate())
            .map(|(i, peer)| format!("m{i}={peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut logs = Vec::new();
        for i in 0..n {
            let log = dir.path().join(format!("m{i}.log"));
            let mut command = Command::new("etcd");
            command
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &urls[i],
                    "--advertise-client-urls",
                    &urls[i],
                ])
                .args(["--listen-peer-urls", &peers[i]])
                .args(["--initial-advertise-peer-urls", &peers[i]])
                .args([
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                ])
                // Elections in a quarter of a second rather than a second.
                .args(["--heartbeat-interval", "25", "--election-timeout", "250"]);
            members.push(Some(spawn(command, &log)?));
            logs.push(log);
        }
        let mut cluster = Cluster {
            urls,
            members,
            logs,
            _dir: dir,
        };
        // Each waits out the ones before: together, they serve within the time one has.
        let started = Instant::now();
        for (member, log) in cluster.members.iter_mut().zip(&cluster.logs) {
            if let Some(child) = member {
                let left = START_WITHIN.saturating_sub(started.elapsed());
                wait_serving(child, log, left)?;
            }
        }
        Ok(cluster)
    }

    /// The member that leads the cluster now, as the members' logs say: the last to say it
    /// became leader.
    pub fn leader(&self) -> anyhow::Result<usize> {
        let mut last = None;
        for (i, log) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log)?;
            for line in text.lines() {
                let Some((_, after)) = line.split_once("became leader at term ") else {
                    continue;
                };
                let digits = after.split(|c: char| !c.is_ascii_digit()).next();
                let term: u64 = digits.unwrap_or_default().parse()?;
                if last.is_none_or(|(t, _)| term > t) {
                    last = Some((term, i));
                }
            }
        }
        last.map(|(_, i)| i).context("no member says it leads")
    }

    /// Stops member `i` with SIGTERM, as a rolling restart does (it hands its lead over),
    /// and waits for it to end.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.members[i].take() {
            let pid = child.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills member `i` (SIGKILL), as a node lost.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
