//! Support for the end-to-end tests: a local fleet with traffic, and what its proxies did.

/// A real etcd for the tests.
pub mod etcd;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use fleetctl::local::{LocalFleet, Setup, Traffic, bin_dir};
use tonic::transport::Channel;

pub const REGIONS: [(&str, &str); 3] = [
    ("us-west", "usw-a"),
    ("us-east", "use-a"),
    ("eu-west", "euw-a"),
];
pub const MANIFEST: &str = include_str!("../e2e/fleet.yaml");
/// How long a release of [`MANIFEST`] may take.
pub const RELEASE_TIME: Duration = Duration::from_secs(90);

/// A fleet on 127.0.0.1 with users sending traffic, and a watcher of each proxy's table.
pub struct World {
    pub fleet: LocalFleet,
    pub client: ReleaseServiceClient<Channel>,
    pub traffic: Traffic,
    /// The canary share (basis points) each region's proxy served, each change once, in order.
    pub splits: Arc<Mutex<BTreeMap<String, Vec<u32>>>>,
    /// Whether a release was started: the controller knows what runs from then on.
    started: bool,
    _dir: tempfile::TempDir,
}

impl World {
    pub async fn start(env: &[(&str, &str)]) -> anyhow::Result<World> {
        World::start_with(MANIFEST, env, &["us-west", "us-east", "eu-west"]).await
    }

    /// A world whose agents and client reach the controller under mutual TLS, each showing
    /// a certificate `fleetctl certs` made (the client's is operator `fleetctl`'s).
    pub async fn start_tls(env: &[(&str, &str)]) -> anyhow::Result<World> {
        let busy = ["us-west", "us-east", "eu-west"];
        let setup = Setup {
            tls: true,
            etcd: None,
        };
        World::start_in(MANIFEST, env, &busy, setup).await
    }

    /// A world whose controller keeps its state in `etcd`, with a second standing by through
    /// which the agents and the client reach it; with `tls`, under mutual TLS, which the
    /// standby passes through.
    pub async fn start_on_etcd(etcd: &etcd::Etcd, tls: bool) -> anyhow::Result<World> {
        let busy = ["us-west", "us-east", "eu-west"];
        let setup = Setup {
            tls,
            etcd: Some(etcd.url.clone()),
        };
        World::start_in(MANIFEST, &[], &busy, setup).await
    }

    /// A world with its own `manifest`, and traffic through the proxies of `busy` only.
    pub async fn start_with(
        manifest: &str,
        env: &[(&str, &str)],
        busy: &[&str],
    ) -> anyhow::Result<World> {
        World::start_in(manifest, env, busy, Setup::default()).await
    }

    async fn start_in(
        manifest: &str,
        env: &[(&str, &str)],
        busy: &[&str],
        setup: Setup,
    ) -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let fleet = LocalFleet::start_with(dir.path(), &bin_dir()?, &REGIONS, env, setup).await?;
        let channel = fleet_proto::connect::channel(&fleet.controller, &fleet.client_tls()).await?;
        let mut client = ReleaseServiceClient::new(channel);
        let request = pb::ApplyFleetRequest {
            request_id: "apply".into(),
            manifest: manifest.into(),
        };
        client.apply_fleet(request).await?;
        let traffic = Traffic::start_in(&fleet, busy, 200, 3, Duration::from_millis(10));
        let splits: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
        for r in &fleet.regions {
            tokio::spawn(watch_split(
                r.name.clone(),
                format!("http://{}/routes", r.admin),
                splits.clone(),
            ));
        }
        Ok(World {
            fleet,
            client,
            traffic,
            splits,
            started: false,
            _dir: dir,
        })
    }

    /// Starts releasing `version`, from v1 for the first release (after it, the controller
    /// knows what runs, and refuses a `from_version` that is not it).
    pub async fn start_release(&mut self, version: &str) -> anyhow::Result<String> {
        let request = pb::StartReleaseRequest {
            request_id: format!("start-{version}"),
            service: "e2e".into(),
            version: version.into(),
            from_version: if self.started { "" } else { "v1" }.into(),
            actor: "e2e".into(),
            ..Default::default()
        };
        let id = self.client.start_release(request).await?.into_inner().id;
        self.started = true;
        Ok(id)
    }

    pub async fn release(&mut self, id: &str) -> anyhow::Result<pb::Release> {
        Ok(self
            .client
            .get_release(pb::GetReleaseRequest { id: id.into() })
            .await?
            .into_inner())
    }

    /// Polls the release until `done` holds, for at most `within`.
    pub async fn wait_for(
        &mut self,
        id: &str,
        within: Duration,
        done: impl Fn(&pb::Release) -> bool,
    ) -> anyhow::Result<pb::Release> {
        let deadline = Instant::now() + within;
        loop {
            let release = self.release(id).await?;
            if done(&release) {
                return Ok(release);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out waiting; release is {release:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn history(&mut self, id: &str) -> anyhow::Result<Vec<pb::ReleaseEvent>> {
        Ok(self
            .client
            .history(pb::HistoryRequest { id: id.into() })
            .await?
            .into_inner()
            .events)
    }

    /// The canary shares a region's proxy served since the release started, each change once,
    /// in order; the table it had before (no canary) is left out.
    pub fn splits_of(&self, region: &str) -> Vec<u32> {
        let seen = self
            .splits
            .lock()
            .map(|s| s.get(region).cloned().unwrap_or_default())
            .unwrap_or_default();
        match seen.split_first() {
            Some((0, rest)) => rest.to_vec(),
            _ => seen,
        }
    }

    /// Waits until `region`'s proxy was last seen serving `canary` basis points to the canary.
    pub async fn wait_for_split(
        &self,
        region: &str,
        canary: u32,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.splits_of(region).last() != Some(&canary) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{region} serves {:?}, not {canary}",
                self.splits_of(region)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The version of the table a region's proxy serves: how many tables it was given.
    pub async fn table_version(&self, region: &str) -> anyhow::Result<u64> {
        let r = self
            .fleet
            .regions
            .iter()
            .find(|r| r.name == region)
            .context("no such region")?;
        let url = format!("http://{}/routes", r.admin);
        let table: serde_json::Value = fleetctl::local::http_client()
            .get(url)
            .send()
            .await?
            .json()
            .await?;
        table["version"]
            .as_u64()
            .context("no version in GET /routes")
    }

    /// Runs `fleetctl ARGS --controller URL` (with the client's certificate under TLS) and
    /// returns its exit code and output.
    pub fn fleetctl(&self, args: &[&str]) -> anyhow::Result<(i32, String)> {
        run(self.fleetctl_command(args))
    }

    /// `fleetctl ARGS` against this world's controller, to run (say, off the test's threads
    /// with [`run`], for a command that follows a release to its end).
    pub fn fleetctl_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(bin("fleetctl"));
        command
            .args(args)
            .args(["--controller", &self.fleet.controller]);
        command.args(self.fleet.client_tls().args());
        command
    }

    /// Starts a release of v2, followed from the start by `fleetctl release watch --output
    /// json` as a pipeline would, and waits until its second wave (us-east) has begun: the
    /// release's id, and the watch's exit code and output to come.
    pub async fn release_into_its_second_wave(&mut self) -> anyhow::Result<(String, Watch)> {
        let id = self.start_release("v2").await?;
        let watch = self.fleetctl_command(&["release", "watch", &id, "--output", "json"]);
        let watch = Running::start(watch)?;
        let pid = watch.child.id();
        let ended = tokio::task::spawn_blocking(move || watch.finish_within(RELEASE_TIME * 3));
        let watch = Watch {
            pid,
            ended: Some(ended),
        };
        let east_started = |r: &pb::Release| {
            r.regions
                .iter()
                .any(|g| g.region == "us-east" && g.canary_weight_bp > 0)
        };
        self.wait_for(&id, RELEASE_TIME, east_started).await?;
        Ok((id, watch))
    }

    /// Checks that `watch`, from [`World::release_into_its_second_wave`], exited 0 for the
    /// success of release `id`, having printed each of its events once and in order.
    #[allow(clippy::unwrap_used)] // Assertions, for the tests.
    pub async fn watched_each_event_once(&mut self, id: &str, watch: Watch) -> String {
        let (code, out) = watch.ended().await.unwrap();
        assert_eq!(code, 0, "{out}");
        let printed: Vec<u64> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        let told = self.history(id).await.unwrap().len() as u64;
        assert_eq!(printed, (0..told).collect::<Vec<_>>(), "{out}");
        out
    }

    /// Waits for release `id` to end, and checks that it succeeded with every proxy taken
    /// through each step of the manifest, then to 0 once v2 is the stable version.
    #[allow(clippy::unwrap_used)] // Assertions, for the tests.
    pub async fn succeeded_step_by_step(&mut self, id: &str) {
        let release = self
            .wait_for(id, RELEASE_TIME, |r| r.phase != "progressing")
            .await
            .unwrap();
        assert_eq!(release.phase, "succeeded", "{release:#?}");
        for region in ["us-west", "us-east", "eu-west"] {
            self.wait_for_split(region, 0, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(self.splits_of(region), [1000, 5000, 10_000, 0], "{region}");
        }
    }

    /// Checks that release `id` (of v2, succeeded) started each step once and that each
    /// proxy applied each table once, whatever happened to the controller meanwhile.
    #[allow(clippy::unwrap_used)] // Assertions, for the tests.
    pub async fn each_step_once(&mut self, id: &str) {
        for region in ["us-west", "us-east", "eu-west"] {
            // The start-up table, the baseline of regions whose wave comes later, one per
            // step and the promotion: none applied twice.
            let baseline = u64::from(region != "us-west");
            assert_eq!(
                self.table_version(region).await.unwrap(),
                5 + baseline,
                "{region}"
            );
        }
        let history = self.history(id).await.unwrap();
        let mut steps: Vec<(String, String)> = history
            .iter()
            .filter(|e| e.kind == "step_started")
            .map(|e| (e.region.clone(), e.detail_json.clone()))
            .collect();
        let total = steps.len();
        steps.dedup();
        assert_eq!(steps.len(), total, "no step started twice");
        assert_eq!(total, 9);
    }

    /// Stops every process the world started, and checks that each stopped cleanly, in
    /// time, and that none is left, service instances of killed agents included.
    pub async fn stop(mut self) {
        self.traffic.stop();
        let unclean = self.fleet.stop().await;
        assert_eq!(
            unclean,
            Vec::<String>::new(),
            "did not stop cleanly on SIGTERM"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.fleet.leftovers().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            self.fleet.leftovers(),
            Vec::<u32>::new(),
            "processes left behind"
        );
    }
}

/// Records each change of the canary share a proxy serves.
async fn watch_split(region: String, url: String, splits: Arc<Mutex<BTreeMap<String, Vec<u32>>>>) {
    let http = fleetctl::local::http_client();
    loop {
        if let Ok(response) = http.get(&url).timeout(Duration::from_secs(1)).send().await
            && let Ok(table) = response.json::<serde_json::Value>().await
        {
            let canary = table["routes"][0]["split"]["canary"].as_u64().unwrap_or(0) as u32;
            if let Ok(mut splits) = splits.lock() {
                let seen = splits.entry(region.clone()).or_default();
                if seen.last() != Some(&canary) {
                    seen.push(canary);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `fleetctl release watch` running beside a test: its exit code and output to come. A
/// test that ends (or fails) before it does kills it, rather than leave the test's runtime
/// waiting for it to give up.
pub struct Watch {
    pid: u32,
    ended: Option<tokio::task::JoinHandle<anyhow::Result<(i32, String)>>>,
}

impl Watch {
    /// Its exit code and output, once it has ended.
    pub async fn ended(mut self) -> anyhow::Result<(i32, String)> {
        let ended = self.ended.take().context("awaited once")?;
        ended.await?
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Its waiter has not reaped it yet (it would have finished), so the pid is its own.
        let running = self
            .ended
            .as_ref()
            .is_some_and(|ended| !ended.is_finished());
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let (true, Some(pid)) = (running, pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A binary of the workspace, as built for these tests.
#[allow(clippy::unwrap_used)] // Tests only: a missing target directory is a broken build.
pub fn bin(name: &str) -> std::path::PathBuf {
    bin_dir().unwrap().join(name)
}

/// A controller of its own on 127.0.0.1 port 0, its store as `store` says (`--data DIR`, or
/// `--etcd URL …`), with the environment variables `env`, its log read line by line (on
/// stdout): it, once it has said where it listens, and its gRPC and admin addresses.
pub async fn controller_alone(
    store: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> anyhow::Result<(Running, String, String)> {
    let mut command = std::process::Command::new("sh");
    command.args(["-c", "exec \"$0\" \"$@\" 2>&1"]);
    command.arg(bin("fleet-controller"));
    command.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    command.args(store).env("NO_COLOR", "1");
    command.envs(env.iter().copied());
    let mut running = Running::start(command)?;
    let mut line = String::new();
    while !line.contains("listening") {
        line = running.line(Duration::from_secs(10)).await?;
    }
    let addr = |key: &str| {
        let after = line.split(key).nth(1).context("no address in the line")?;
        Ok::<_, anyhow::Error>(after.split(' ').next().unwrap_or_default().to_string())
    };
    let (grpc, admin) = (addr("grpc=")?, addr("admin=")?);
    Ok((running, grpc, admin))
}

/// Stops `running` (a controller `controller_alone` started, say) with SIGTERM, and checks
/// that it exits 0 within 15 s.
#[allow(clippy::unwrap_used)] // Tests only.
pub async fn stop_cleanly(running: Running) {
    let within = Duration::from_secs(15);
    let stopped = tokio::task::spawn_blocking(move || running.stop_within(within)).await;
    let (code, out) = stopped.unwrap().unwrap();
    assert_eq!(code, 0, "{out}");
}

/// Runs `command` to its end, within 2 minutes (it is killed then, and that is an error);
/// its exit code and its output, stdout then stderr. Blocking: off a test's async threads,
/// run it with `spawn_blocking`.
pub fn run(command: std::process::Command) -> anyhow::Result<(i32, String)> {
    Running::start(command)?.finish()
}

/// A command running beside the test, its stdout read line by line as it writes; killed if
/// it is dropped still running (a test that failed before it stopped it).
pub struct Running {
    /// The command, to say which one did not end.
    command: String,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Taken as it finishes.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    pub fn start(mut command: std::process::Command) -> anyhow::Result<Running> {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        // Read both pipes as the command writes, so that it never waits on a full one.
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                    if line
                        .and_then(|l| tx.send(l).map_err(std::io::Error::other))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        let stderr = read_all(child.stderr.take());
        Ok(Running {
            command: format!("{command:?}"),
            child,
            lines,
            stderr: Some(stderr),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line of its stdout, within `within`.
    pub async fn line(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Ok(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    anyhow::bail!("its stdout ended")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) if Instant::now() > deadline => {
                    anyhow::bail!("no line within {within:?}")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Waits for its end, within 2 minutes (it is killed then, and that is an error): its
    /// exit code and the output not yet read, stdout then stderr. Blocking, as [`run`].
    pub fn finish(self) -> anyhow::Result<(i32, String)> {
        self.finish_within(Duration::from_secs(120))
    }

    /// [`Running::finish`], within `within`.
    pub fn finish_within(mut self, within: Duration) -> anyhow::Result<(i32, String)> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("{} did not end within {within:?}", self.command);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut text: String = self.lines.iter().map(|l| l + "\n").collect();
        let stderr = self.stderr.take().map(std::thread::JoinHandle::join);
        text += &stderr.and_then(Result::ok).unwrap_or_default();
        Ok((status.code().unwrap_or(-1), text))
    }

    /// Sends it SIGTERM, then [`Running::finish_within`]. Blocking, as that is.
    pub fn stop_within(self, within: Duration) -> anyhow::Result<(i32, String)> {
        let pid = i32::try_from(self.pid())?;
        let pid = rustix::process::Pid::from_raw(pid).context("pid 0")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        self.finish_within(within)
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn read_all(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}
