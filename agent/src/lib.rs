//! fleet-agent: one per cluster. It dials the controller, receives the desired state of its
//! region, makes the cluster run it through a workload driver, programs the region's proxies
//! once the new instances are ready, and reports back readiness and the proxies' counters.
//!
//! Fail-static: while the controller is away, the agent keeps its last desired state and the
//! proxies keep their last table.

pub mod admin;
pub mod discover;
pub mod driver;
mod proxies;
pub mod routes;
mod session;
pub mod stats;
pub mod watched;

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proxy_router::spec::TableSpec;
use tokio::sync::watch;

use driver::{Driver, Want};

const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// As long as the controller waits for a silent agent before it lets it go: an agent that
/// stood still longer may have missed a change ([`Config::stale_after`]).
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// Four times as long as the controller waits for a silent agent: an agent whose predecessor
/// died unseen is let in well before.
pub const HELD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Config {
    /// The controller's gRPC URL, e.g. `http://127.0.0.1:7070`.
    pub controller: String,
    pub region: String,
    pub cluster: String,
    /// Where the region's proxies are.
    pub proxies: discover::ProxySource,
    /// TLS to the controller, for an `https://` URL.
    pub tls: fleet_proto::connect::ClientTls,
    /// The workload driver's name, told to the controller (`process`, `kubernetes`).
    pub driver: String,
    /// The reconcile loop is taken for hung when it has not gone round for this long
    /// ([`admin::HUNG_AFTER`]; tests shorten it): `/healthz` fails, and the agent leaves the
    /// controller until it goes round again.
    pub hung_after: Duration,
    /// A reconcile loop that stood still this long between two rounds (the process stopped,
    /// or starved) may hold a desired state the controller has since replaced: until the
    /// controller's next word it changes nothing, neither its workloads nor its proxies'
    /// table, and it dials the controller again for that word ([`STALE_AFTER`]; tests
    /// shorten it).
    pub stale_after: Duration,
    /// An agent the controller refuses this long in a row because another agent is
    /// connected for its cluster gives up and exits ([`HELD_LIMIT`]; tests shorten it): a
    /// second agent left running would otherwise take the cluster over the moment the first
    /// is restarted.
    pub held_limit: Duration,
    /// The figures of the agent's Kubernetes watches (the driver's, the proxies'), for
    /// `/metrics`: the tally given to them.
    pub watches: watched::Tally,
}

/// Why an HTTP request made with `timeout` got no answer, in a few words.
pub(crate) fn no_answer(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("no answer in {timeout:?}")
    } else if e.is_connect() {
        "no connection taken".into()
    } else {
        e.to_string()
    }
}

/// An HTTP client. reqwest is built without a default TLS provider (so no C toolchain is
/// needed for aws-lc); ring is installed first, as the proxy uses it.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Runs the agent until `shutdown`, then shuts the driver down (the kubernetes driver leaves
/// its Deployments running; the process driver leaves its processes running for the next
/// agent, unless it has no instances file or is told to stop them). With `admin`, serves
/// the admin endpoints there ([`admin`]).
pub async fn run<D: Driver>(
    config: Config,
    mut driver: D,
    admin: Option<tokio::net::TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (desired_tx, mut desired_rx) = watch::channel::<Option<pb::DesiredState>>(None);
    let (status_tx, status_rx) = watch::channel(pb::AgentStatus::default());
    let observed = std::sync::Arc::new(admin::Observed::new(config.hung_after));
    // Bumped when the loop finds it stood still: the session dials the controller again,
    // which answers a new session with its word (the desired state it holds now).
    let (redial, redial_rx) = watch::channel(0u64);
    if let Some(listener) = admin {
        let view = admin::View {
            observed: observed.clone(),
            desired: desired_rx.clone(),
            status: status_rx.clone(),
            watches: config.watches.clone(),
            labels: [
                ("region", config.region.clone()),
                ("cluster", config.cluster.clone()),
                ("driver", config.driver.clone()),
            ],
        };
        tokio::spawn(admin::serve(listener, view, shutdown.clone()));
    }
    let mut session = tokio::spawn(session::run(
        config.clone(),
        desired_tx,
        status_rx,
        redial_rx,
        observed.clone(),
        shutdown.clone(),
    ));
    let mut source = config.proxies.clone();
    let mut proxies = proxies::Proxies::new(http_client(), Vec::new());
    // Why the proxies could not be looked up, while they cannot.
    let mut unfound: Option<String> = None;
    let mut programmed: Option<(TableSpec, BTreeMap<String, u32>)> = None;
    // A proxy lost the table put on it: put it again, though it has not changed.
    let mut lost = false;
    let mut applied: Option<(String, u64)> = None;
    // The state (release, seq) in force at the last round, if it was.
    let mut in_force_before: Option<(String, u64)> = None;
    let mut stop = shutdown.clone();
    let mut last_round = tokio::time::Instant::now();
    // How long the driver's poll took in the last round: a Kubernetes round may take its
    // 10 s by itself, which is no standing still.
    let mut polling = Duration::ZERO;
    // The loop stood still, and the controller has not spoken since (`Config::stale_after`).
    let mut stale = false;
    // When the controller last spoke (a desired state came).
    let mut word_at = tokio::time::Instant::now();
    // Why the session gave up, if it did.
    let mut gave_up: Option<String> = None;
    loop {
        let now = tokio::time::Instant::now();
        let stood = (now - last_round).saturating_sub(polling);
        // A word that came while it stood still (stopped in its sleep, say) is the latest:
        // nothing stood still since, and no word need be asked for.
        if desired_rx.has_changed().unwrap_or(false) {
            stale = false;
            word_at = now;
        }
        if stood > config.stale_after && word_at < last_round {
            tracing::warn!(
                stood_still_ms = stood.as_millis(),
                "the agent stood still (stopped, or starved): its desired state may be out of date, so it changes nothing until the controller's next word, and dials it again for that word"
            );
            stale = true;
            redial.send_modify(|n| *n += 1);
        }
        last_round = now;
        match source.look().await {
            Some(Ok(found)) => {
                lost |= proxies.set_proxies(found);
                unfound = None;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "the proxies could not be looked up; keeping those known");
                unfound = Some(format!("{e:#}"));
            }
            None => {}
        }
        let desired = desired_rx.borrow_and_update().clone();
        let mut status = pb::AgentStatus::default();
        if let Some(d) = &desired {
            let want = want_for(d, programmed.as_ref().map(|(_, versions)| versions));
            // Stood still, it leaves its workloads alone on a state that may be out of date
            // (another agent may have taken its place meanwhile): the driver is neither
            // told nor polled, which would restart or rewrite them, and the round sees
            // nothing (the step as it was).
            let running = match stale {
                true => driver::Running {
                    unseen: true,
                    ..driver::Running::default()
                },
                false => {
                    driver.apply(&want);
                    let poll_began = tokio::time::Instant::now();
                    let running = driver.poll().await;
                    polling = poll_began.elapsed();
                    running
                }
            };
            let table = routes::table(d, &running.ready);
            let mut details = vec![running.detail.clone()];
            details.extend(unfound.clone());
            let versions = want_of(d).versions;
            let served = programmed.as_ref().map(|(t, _)| t);
            let put = match stale {
                true => {
                    details.push("the agent stood still: it changes nothing, its proxies' table included, until the controller's next word".into());
                    Put::Nothing
                }
                false => to_put(table.as_ref(), served, lost),
            };
            match put {
                Put::Step(step) => match proxies.program(step).await {
                    Ok(()) => {
                        tracing::info!(release = %d.release_id, seq = d.seq, "proxies programmed");
                        programmed = Some((step.clone(), versions.clone()));
                        lost = false;
                    }
                    Err(e) => details.push(format!("proxies not programmed: {e:#}")),
                },
                Put::Served(served) => match proxies.program(served).await {
                    Ok(()) => lost = false,
                    Err(e) => details.push(format!("proxies not programmed: {e:#}")),
                },
                Put::Nothing => {}
            }
            // A round that saw nothing leaves this state as it was (never in force unseen).
            let this = (d.release_id.clone(), d.seq);
            let in_force_now = match running.unseen {
                true => in_force_before.as_ref() == Some(&this),
                false => in_force(programmed.as_ref(), table.as_ref(), &versions),
            };
            in_force_before = in_force_now.then_some(this);
            if in_force_now {
                applied = Some((d.release_id.clone(), d.seq));
            }
            details.extend(proxies.not_running());
            details.extend(proxies.unanswered());
            details.retain(|d| !d.is_empty());
            let detail = details.join("; ");
            // Applied once it has been in force; ready while it is. A step whose workloads
            // stop being ready (a version with no ready instance left, or a proxy's table
            // that cannot be put) is reported applied and not ready, with why: the controller
            // then holds the step and fails it at its progress deadline.
            let done = applied
                .as_ref()
                .is_some_and(|(r, s)| *r == d.release_id && *s == d.seq);
            status = pb::AgentStatus {
                epoch: d.epoch,
                applied_seq: if done { d.seq } else { 0 },
                release_id: d.release_id.clone(),
                ready: done && in_force_now,
                stats: None,
                detail,
                counting_since_unix_ms: 0,
            };
        }
        lost |= proxies.scrape().await;
        status.stats = proxies.stats();
        status.counting_since_unix_ms = proxies.counting_since_unix_ms();
        observed.round();
        let _ = status_tx.send(status);
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            // The controller's word: whatever stood still, the state is its latest.
            _ = desired_rx.changed() => {
                stale = false;
                word_at = tokio::time::Instant::now();
            }
            _ = stop.wait_for(|s| *s) => break,
            // It ends only when it gives up (or at the stop, which the branch above sees).
            ended = &mut session => {
                gave_up = match ended {
                    Ok(Err(why)) => Some(why),
                    Ok(Ok(())) => None,
                    Err(e) => Some(format!("the session with the controller failed: {e}")),
                };
                break;
            }
        }
    }
    driver.shutdown().await;
    match gave_up {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Whether a step is in force: the proxies were put its own table (weights and routes, not
/// only its versions: a step that only moves weights keeps the versions of the one before),
/// and the versions it runs. Pure.
fn in_force(
    programmed: Option<&(TableSpec, BTreeMap<String, u32>)>,
    step: Option<&TableSpec>,
    versions: &BTreeMap<String, u32>,
) -> bool {
    programmed.is_some_and(|(table, v)| step == Some(table) && v == versions)
}

/// What to put on the proxies in a round.
#[derive(Debug, PartialEq)]
enum Put<'s, 'p> {
    Nothing,
    /// The step's table: new, or a proxy lost (or never had) the one put.
    Step(&'s TableSpec),
    /// The table the proxies serve, to one that came (or came back) without it, while
    /// nothing of the step is ready to make a table of: rather than leave it with none.
    Served(&'p TableSpec),
}

/// What to put on the proxies, given the `step`'s table (`None` while nothing of it is
/// ready), the one last put (`served`), and whether a proxy is `lost` (without it). Pure.
fn to_put<'s, 'p>(
    step: Option<&'s TableSpec>,
    served: Option<&'p TableSpec>,
    lost: bool,
) -> Put<'s, 'p> {
    match (step, served) {
        (Some(step), served) if lost || served != Some(step) => Put::Step(step),
        (None, Some(served)) if lost => Put::Served(served),
        _ => Put::Nothing,
    }
}

/// What the driver should run for `d`, given the versions of the table last put on the
/// proxies: those keep running until the new table is in, and before the first table since
/// the start, whatever runs is kept.
fn want_for(d: &pb::DesiredState, programmed: Option<&BTreeMap<String, u32>>) -> Want {
    let mut want = want_of(d);
    match programmed {
        Some(versions) => {
            for (v, n) in versions {
                want.versions.entry(v.clone()).or_insert(*n);
            }
        }
        None => want.keep_others = true,
    }
    want
}

fn want_of(d: &pb::DesiredState) -> Want {
    let workload = d.workload.clone().unwrap_or_default();
    let versions = [d.stable.as_ref(), d.canary.as_ref()]
        .into_iter()
        .flatten()
        .map(|t| (t.version.clone(), t.replicas.max(1)))
        .collect();
    Want {
        service: d.service.clone(),
        versions,
        image: workload.image,
        command: workload.command,
        health_check: if workload.health_check.is_empty() {
            "/healthz".into()
        } else {
            workload.health_check
        },
        cpu: workload.cpu,
        memory: workload.memory,
        run_as_user: workload.run_as_user,
        autoscale: workload.autoscale.map(|a| crate::driver::Autoscale {
            min: a.min,
            max: a.max,
            cpu_percent: a.cpu_percent,
        }),
        keep_others: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(weight: u32) -> TableSpec {
        serde_json::from_value(serde_json::json!({
            "tracks": {"stable": {"backends": ["127.0.0.1:9001"]}},
            "routes": [{"host": "*", "path_prefix": "/", "split": {"stable": weight}}],
        }))
        .unwrap()
    }

    #[test]
    fn a_step_is_in_force_once_its_own_table_is_put_not_only_its_versions() {
        let versions: BTreeMap<String, u32> = [("v1".to_string(), 2)].into();
        let put = (table(10000), versions.clone());
        assert!(in_force(Some(&put), Some(&table(10000)), &versions));
        // The next step moves only weights: same versions, another table, not put yet.
        assert!(!in_force(Some(&put), Some(&table(9000)), &versions));
        assert!(
            !in_force(Some(&put), None, &versions),
            "nothing ready to make it"
        );
        assert!(!in_force(None, Some(&table(10000)), &versions));
    }

    #[test]
    fn a_proxy_without_a_table_gets_the_steps_or_else_the_one_the_others_serve() {
        let (step, served) = (table(9000), table(10000));
        assert_eq!(
            to_put(Some(&step), None, false),
            Put::Step(&step),
            "the first"
        );
        assert_eq!(
            to_put(Some(&step), Some(&served), false),
            Put::Step(&step),
            "new"
        );
        assert_eq!(to_put(Some(&step), Some(&step), false), Put::Nothing);
        assert_eq!(
            to_put(Some(&step), Some(&step), true),
            Put::Step(&step),
            "lost"
        );
        assert_eq!(
            to_put(None, Some(&served), true),
            Put::Served(&served),
            "nothing of the step ready: what the others serve"
        );
        assert_eq!(to_put(None, Some(&served), false), Put::Nothing);
        assert_eq!(to_put(None, None, true), Put::Nothing, "nothing to put");
    }

    #[test]
    fn the_proxies_versions_keep_running_and_before_any_table_everything_does() {
        let d = pb::DesiredState {
            service: "checkout".into(),
            stable: Some(pb::Track {
                version: "v2".into(),
                replicas: 2,
            }),
            workload: Some(pb::Workload {
                image: "registry.example.com/checkout:{version}".into(),
                run_as_user: 65532,
                autoscale: Some(pb::Autoscale {
                    min: 2,
                    max: 9,
                    cpu_percent: 60,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let first = want_for(&d, None);
        assert_eq!(first.run_as_user, 65532);
        let autoscale = crate::driver::Autoscale {
            min: 2,
            max: 9,
            cpu_percent: 60,
        };
        assert_eq!(first.autoscale, Some(autoscale));
        assert!(
            first.keep_others,
            "restarted: the proxies may route anywhere"
        );
        assert_eq!(first.versions, BTreeMap::from([("v2".to_owned(), 2)]));
        assert_eq!(first.service, "checkout");
        assert_eq!(first.image, "registry.example.com/checkout:{version}");

        let routed = BTreeMap::from([("v1".to_owned(), 3), ("v2".to_owned(), 1)]);
        let later = want_for(&d, Some(&routed));
        assert!(!later.keep_others);
        assert_eq!(
            later.versions,
            BTreeMap::from([("v1".to_owned(), 3), ("v2".to_owned(), 2)]),
            "v1 until the table without it is in; v2 as desired"
        );
    }
}
