// Also included by the controller's own tests of its etcd store (`include!`, hence no inner
// doc comment here).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A real etcd (Debian's `etcd-server`) for the tests of controllers that keep their state
/// in it: one member on 127.0.0.1, its ports the kernel's choice, its data in a temporary
/// directory; killed when dropped.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`, for `--etcd`.
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> anyhow::Result<Etcd> {
        // In memory where the machine has it: a disk busy with the build beside the tests
        // would stall etcd's syncs past the tests' short leases.
        let shm = std::path::Path::new("/dev/shm");
        let dir = match shm.is_dir() {
            true => tempfile::tempdir_in(shm)?,
            false => tempfile::tempdir()?,
        };
        let log = dir.path().join("etcd.log");
        let any = "http://127.0.0.1:0";
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", any, "--advertise-client-urls", any])
            .args([
                "--listen-peer-urls",
                any,
                "--initial-advertise-peer-urls",
                any,
            ])
            .args(["--initial-cluster", "test=http://127.0.0.1:0"])
            .args(["--enable-grpc-gateway=false", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting etcd: is Debian's etcd-server installed? (.ci/run installs it)")?;
        let mut etcd = Etcd {
            url: String::new(),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log)?;
            if let Some(addr) = serving_at(&text) {
                etcd.url = format!("http://{addr}");
                return Ok(etcd);
            }
            if let Some(status) = etcd.child.try_wait()? {
                bail!("etcd ended ({status}) before serving: {text}");
            }
            if Instant::now() > deadline {
                bail!("etcd did not serve within 20s: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where etcd says it serves clients: in 3.4's words (Debian 12's, run here), or in 3.5's
/// JSON log, as its source writes it (not run here).
fn serving_at(log: &str) -> Option<&str> {
    fn addr(rest: &str) -> Option<&str> {
        rest.split([',', ' ', '"', '\n']).next()
    }
    if let Some(at) = log.find("serving insecure client requests on ") {
        return addr(&log[at + "serving insecure client requests on ".len()..]);
    }
    let line = log
        .lines()
        .find(|l| l.contains("serving client traffic insecurely"))?;
    let at = line.find("\"address\":\"")? + "\"address\":\"".len();
    addr(&line[at..])
}

impl Etcd {
    /// Stops it answering (SIGSTOP) while its connections stay open, as a member that hangs.
    pub fn freeze(&self) {
        let pid = self.child.id().to_string();
        let stopped = Command::new("kill").args(["-STOP", &pid]).status();
        assert!(stopped.is_ok_and(|s| s.success()), "kill -STOP {pid}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
