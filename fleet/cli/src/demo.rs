//! `fleetctl demo`: a whole fleet on this machine releasing a new version through its waves,
//! with live progress and the numbers behind every decision.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tonic::transport::Channel;

use crate::local::etcd::LocalEtcd;
use crate::local::{Counts, LocalFleet, Setup, Traffic};
use crate::progress;
use crate::release::{actor, connect, request_id, status};
use crate::verbs::Output;

const MANIFEST: &str = include_str!("../../../deploy/examples/demo.yaml");
const REGIONS: [(&str, &str); 3] = [
    ("us-west", "usw-a"),
    ("us-east", "use-a"),
    ("eu-west", "euw-a"),
];
/// With `--ha`, the leading controller is killed once the release is this far: in this wave,
/// at this step of its region or later.
const KILL_AT: (&str, &str, u32) = ("americas", "us-east", 2);
/// With `--ha`, how long the standby may take to lead after the leader is killed (its lease
/// lives [`crate::local::LEASE_TTL`]).
const TAKE_OVER_WITHIN: Duration = Duration::from_secs(30);

/// Simulated users per region, each keeping its sticky cookie.
const USERS: usize = 400;
const WORKERS_PER_REGION: usize = 6;
const PAUSE_BETWEEN_REQUESTS: Duration = Duration::from_millis(4);

/// Run a whole fleet on this machine and release v1 → v2 through its waves.
///
/// Starts a controller, and for each of three regions a fleet-proxy and a fleet-agent whose
/// process driver runs the demo app; sends traffic from many users through every proxy;
/// releases v2 and follows it live. Exits 0 if the release ended as expected: succeeded, or
/// with --bad (a v2 that fails 5% of requests) or --crash (a v2 that never starts) rolled back.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  fleetctl demo\n  fleetctl demo --bad\n  fleetctl demo --crash\n  fleetctl demo --tls\n  fleetctl demo --ha\n  fleetctl demo --keep"
)]
pub struct Demo {
    /// Release a v2 that fails 5% of its requests, and watch it caught and rolled back.
    #[arg(long, conflicts_with = "crash")]
    bad: bool,
    /// Release a v2 that crashes as it starts, and watch it rolled back at the manifest's
    /// progress deadline (30 s) with the agents' words for why.
    #[arg(long)]
    crash: bool,
    /// Leave the fleet running after the release, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Run the fleet under mutual TLS: a CA and certificates made as `fleetctl certs` makes
    /// them (in the fleet's directory), the controller asking every agent and client for its
    /// certificate.
    #[arg(long)]
    tls: bool,
    /// Keep the controllers' state in a local etcd (Debian's etcd-server) with a second
    /// controller standing by, through which every agent and client reaches the leader; kill
    /// the leading controller in the middle of the second wave, and watch the standby take
    /// over and carry the release on from the same step.
    #[arg(long, conflicts_with_all = ["bad", "crash"])]
    ha: bool,
    /// Where the fleet keeps its data and logs. Default: a new temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl Demo {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let dir = match &self.dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("fleet-demo-{}", std::process::id())),
        };
        let bin = std::env::current_exe()?
            .parent()
            .context("fleetctl's directory")?
            .to_path_buf();
        let faults: &[(&str, &str)] = match (self.bad, self.crash) {
            (true, _) => &[("FLEET_DEMO_FAULTS", "v2=0.05")],
            (_, true) => &[("FLEET_DEMO_FAULTS", "v2=crash")],
            _ => &[],
        };
        println!("starting a local fleet in {} (logs there)", dir.display());
        let starting = async {
            let etcd = match self.ha {
                true => {
                    let at = dir.join("etcd");
                    Some(tokio::task::spawn_blocking(move || LocalEtcd::start(&at)).await??)
                }
                false => None,
            };
            let setup = Setup {
                tls: self.tls,
                etcd: etcd.as_ref().map(|e| e.url.clone()),
            };
            let fleet = LocalFleet::start_with(&dir, &bin, &REGIONS, faults, setup).await?;
            anyhow::Ok((etcd, fleet))
        };
        // A signal while starting drops what has started, which ends it (every process leads
        // a group of its own, out of the terminal's reach).
        let (etcd, mut fleet) = tokio::select! {
            started = starting => started?,
            why = stop_signal() => {
                println!("\n{why} while starting; stopping what had started");
                return Ok(ExitCode::from(130));
            }
        };
        let result = tokio::select! {
            // First: with --keep, the release has ended and a signal only ends the wait.
            biased;
            r = self.release(&mut fleet) => r,
            why = stop_signal() => {
                println!("\n{why}; stopping everything the demo started");
                Ok(ExitCode::from(130))
            }
        };
        let _ = fleet.stop().await;
        // Only now: the controllers keep their state in it until they stop.
        drop(etcd);
        result
    }

    async fn release(&self, fleet: &mut LocalFleet) -> anyhow::Result<ExitCode> {
        for r in &fleet.regions {
            println!(
                "region {:<8} proxy http://{}  admin http://{}  agent http://{}",
                r.name, r.traffic, r.admin, r.agent
            );
        }
        if let Some(standby) = fleet.standby_admin() {
            println!(
                "controllers on etcd: one leads, one stands by (admin http://{standby}); every \
                 agent and client dials the standby, which passes its connections to the leader"
            );
        }
        let tls = fleet.client_tls();
        let flags = tls.args();
        let admin =
            (fleet.controller_admin()).map_or(String::new(), |a| format!("  admin http://{a}"));
        match flags.is_empty() {
            true => println!(
                "controller {}{admin}  (fleetctl release … --controller {})",
                fleet.controller, fleet.controller
            ),
            false => {
                let flags: Vec<_> = flags.iter().map(|f| f.to_string_lossy()).collect();
                let (url, flags) = (&fleet.controller, flags.join(" "));
                println!("controller {url}{admin} under mutual TLS: fleetctl {flags}");
            }
        }
        let mut client = connect(&fleet.controller, &tls).await?;
        client
            .apply_fleet(pb::ApplyFleetRequest {
                request_id: request_id(),
                manifest: MANIFEST.into(),
            })
            .await
            .map_err(status)?;
        let version = "v2";
        println!(
            "releasing {version}{} through 3 waves; {USERS} users per region send traffic\n",
            match (self.bad, self.crash) {
                (true, _) => ", which fails 5% of requests,",
                (_, true) => ", which crashes as it starts,",
                _ => "",
            }
        );
        let release = client
            .start_release(pb::StartReleaseRequest {
                request_id: request_id(),
                service: "demo".into(),
                version: version.into(),
                from_version: "v1".into(),
                actor: actor(),
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        // Users come once every region serves v1.
        fleet.wait_until_serving(Duration::from_secs(60)).await?;
        let traffic = Traffic::start(fleet, USERS, WORKERS_PER_REGION, PAUSE_BETWEEN_REQUESTS);
        let took_over = self.follow(fleet, &mut client, &release.id).await?;
        if let Some(Ok(_)) = &took_over
            && fleet.standby_leads(Duration::from_secs(5)).await.is_ok()
        {
            // The standby is the fleet's controller now, and the one killed is gone: with
            // --keep, not told as a process that ended by itself.
            let _ = fleet
                .ended("controller, deposed", Duration::from_secs(1))
                .await;
        }
        // Told first: with the takeover failed, nothing may answer what follows.
        let mut ok = true;
        match &took_over {
            Some(Ok(took)) => println!(
                "\nthe standby led {:.1} s after the leader was killed, and carried the release on",
                took.as_secs_f64()
            ),
            Some(Err(e)) => {
                println!("\n{e:#}");
                ok = false;
            }
            None => {}
        }
        let end = client
            .get_release(pb::GetReleaseRequest {
                id: release.id.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        print_traffic(&traffic.counts).await;
        let expected = if self.bad || self.crash {
            "rolled_back"
        } else {
            "succeeded"
        };
        ok &= end.phase == expected;
        println!(
            "\nrelease {} {}: {}",
            end.id,
            end.phase,
            if ok { "as expected" } else { "NOT as expected" }
        );
        if self.keep {
            println!(
                "the fleet keeps running; Ctrl-C stops it (controller at {})",
                fleet.controller
            );
            keep_until_stopped(fleet).await;
        }
        traffic.stop();
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }
}

/// What came first while following a release with `--ha`.
enum First {
    /// The leader was killed, and the standby led (after how long), or not.
    Killed(anyhow::Result<Duration>),
    /// The release ended (the watch's outcome).
    Ended(anyhow::Result<ExitCode>),
}

impl Demo {
    /// Follows the release live until it ends; with `--ha`, kills the leader on the way, and
    /// says how the takeover went.
    async fn follow(
        &self,
        fleet: &LocalFleet,
        client: &mut ReleaseServiceClient<Channel>,
        id: &str,
    ) -> anyhow::Result<Option<anyhow::Result<Duration>>> {
        let mut observer = client.clone();
        let watched = progress::watch(client, id, Output::Table, progress::RECONNECT_FOR);
        let mut watched = std::pin::pin!(watched);
        if !self.ha {
            watched.await?;
            return Ok(None);
        }
        let first = tokio::select! {
            took = kill_the_leader_mid_release(fleet, &mut observer, id) => First::Killed(took),
            ended = &mut watched => First::Ended(ended),
        };
        match first {
            First::Killed(Ok(took)) => {
                watched.await?;
                Ok(Some(Ok(took)))
            }
            // A takeover that failed leaves nothing to follow: the watch would wait minutes.
            First::Killed(Err(e)) => Ok(Some(Err(e))),
            First::Ended(ended) => {
                ended?;
                let e = anyhow::anyhow!("the leader was not killed: the release ended first");
                Ok(Some(Err(e)))
            }
        }
    }
}

/// Kills the leading controller once the release is [`KILL_AT`], then waits for the standby
/// to lead: how long it took.
async fn kill_the_leader_mid_release(
    fleet: &LocalFleet,
    client: &mut ReleaseServiceClient<Channel>,
    id: &str,
) -> anyhow::Result<Duration> {
    let (wave, region, step) = KILL_AT;
    loop {
        let request = pb::GetReleaseRequest { id: id.into() };
        // A call that fails (the controller busy, say) is made again a moment later.
        if let Ok(release) = client.get_release(request).await {
            let release = release.into_inner();
            let far = (release.regions.iter()).any(|g| g.region == region && g.step >= step);
            if release.wave == wave && far {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let admin = fleet
        .standby_admin()
        .context("the leader was not killed: none stands by")?;
    let leads = || async { crate::local::leads(admin).await == Some(true) };
    anyhow::ensure!(
        !leads().await,
        "the leader was not killed: the controller standing by leads already"
    );
    fleet.signal("controller", rustix::process::Signal::KILL)?;
    let killed = Instant::now();
    println!(
        "\n>>> killed the leading controller (SIGKILL) in wave {wave}; the standby takes over \
         once the leader's lease in etcd runs out ({})\n",
        crate::local::LEASE_TTL
    );
    while !leads().await {
        anyhow::ensure!(
            killed.elapsed() < TAKE_OVER_WITHIN,
            "the standby did not lead within {TAKE_OVER_WITHIN:?} of the leader's death (the \
             controllers' logs are in the fleet's directory)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = killed.elapsed();
    println!(
        "\n>>> the standby leads, {:.1} s after the leader was killed; the release carries on \
         from the same step\n",
        took.as_secs_f64()
    );
    Ok(took)
}

async fn print_traffic(counts: &Counts) {
    println!("\ntraffic seen by the simulated users (version status: requests):");
    for (region, by) in counts.lock().await.iter() {
        let parts: Vec<String> = by.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("  {region:<8} {}", parts.join(", "));
    }
}

/// Keeps `fleet` running until a stop signal, saying of each of its processes that ends
/// meanwhile (one an operator killed, say) that it did, and how.
async fn keep_until_stopped(fleet: &mut LocalFleet) {
    let stopped = stop_signal();
    tokio::pin!(stopped);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            why = &mut stopped => {
                println!("\n{why}; stopping everything the demo started");
                return;
            }
            _ = every.tick() => {
                for (name, status) in fleet.ended_by_themselves() {
                    println!("the {name} ended ({status}); the rest of the fleet keeps running");
                }
            }
        }
    }
}

/// Ctrl-C, SIGTERM, or SIGHUP (the terminal closed): each stops what the demo started.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
        _ = hangup.recv() => "the terminal closed",
    }
}
