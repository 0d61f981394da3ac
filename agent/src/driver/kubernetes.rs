//! The `kubernetes` driver: each wanted version runs as a Deployment of its own
//! (`objects.rs`), applied server-side through kube-rs. A version is first ready once its
//! rollout is complete (every replica of its spec ready); from then on, for as long as that
//! Deployment lives, its instances are whichever of its pods are ready, which the proxies are
//! given: a pod evicted, or replaced by a later rollout, is followed to its new address while
//! the rest carry on.
//!
//! The driver watches the service's Deployments, autoscalers and pods (by label; kube-runtime
//! reflectors, `crate::watched`), so a round reads them without asking the API: it asks only
//! to change something. Its first round waits for their first lists. A round applies what is
//! missing, changed here or changed by hand, and deletes the Deployments of versions no
//! longer wanted, and the autoscalers of Deployments that are no longer autoscaled
//! (`scaling.rs`); each write is waited for, briefly, to come back through the watch, so that
//! the next round does not make it again.
//! A Deployment the driver did not make for that service and version is never changed or
//! deleted: a name taken by one is reported. A failed apply or delete is reported and the
//! rest of the round carries on; a wanted version's Deployment is never deleted for it.
//! Rounds are at most one a second unless the want changed, and one that takes longer than
//! [`ROUND_TIMEOUT`] is given up and reported. A watch that fails is reported, and the
//! objects it last showed are judged.
//!
//! The workloads outlive the agent: stopping it (or losing it) leaves every Deployment as it
//! is, so the cluster goes on serving while the agent is away (fail-static).

pub(crate) mod objects;
mod scaling;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use tokio::time::Instant;

use self::objects::Spec;
use self::objects::{MANAGER, check_service, check_version, deployment_name};
use super::{Driver, Running, Want};
use crate::watched::{Object, Tally, Watched, at_least};

/// Least time between two rounds while the want stays the same.
const ROUND_EVERY: Duration = Duration::from_secs(1);
/// A round that takes longer, waiting for the first lists or for a write, is given up (the
/// client's read timeout, `watched::READ_TIMEOUT`, is longer).
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// A Deployment applied this long ago is applied again, though unchanged.
const APPLY_AGAIN_AFTER: Duration = Duration::from_secs(60);
/// How long a round waits, in all, for its writes to come back through the watches. One
/// that does not is reported; the next round may make it again, to the same effect.
const SEEN_WITHIN: Duration = Duration::from_secs(2);

pub struct KubernetesDriver {
    client: kube::Client,
    deployments: Api<Deployment>,
    autoscalers: Api<HorizontalPodAutoscaler>,
    /// The watches of the service's objects, once a service is wanted.
    watches: Option<Watches>,
    /// Where the watches keep their figures.
    tally: Tally,
    namespace: String,
    /// The port the service's containers listen on.
    port: u16,
    want: Want,
    round_every: Duration,
    /// What this driver applied, by Deployment name: the object, the uid and generation the
    /// API server gave it, and when.
    applied: BTreeMap<String, Applied>,
    /// The autoscalers this driver applied, by name, and when.
    applied_autoscalers: BTreeMap<String, (HorizontalPodAutoscaler, Instant)>,
    /// The Deployments (by name, with their uid) whose rollout has been seen complete.
    complete: BTreeMap<String, String>,
    /// The last round: the want it was made for, its outcome, and when it ended.
    last: Option<(Want, Running, Instant)>,
}

/// One service's objects, watched.
struct Watches {
    service: String,
    deployments: Watched<Deployment>,
    autoscalers: Watched<HorizontalPodAutoscaler>,
    pods: Watched<Pod>,
}

/// What the watches show, by name (pods as a list).
#[derive(Default)]
struct Seen {
    deployments: BTreeMap<String, Deployment>,
    autoscalers: BTreeMap<String, HorizontalPodAutoscaler>,
    pods: Vec<Pod>,
}

struct Applied {
    object: Deployment,
    uid: Option<String>,
    generation: Option<i64>,
    at: Instant,
}

/// A wanted version's Deployment: its name, version and replicas.
struct Wanted<'a> {
    name: String,
    version: &'a str,
    replicas: u32,
}

impl KubernetesDriver {
    /// Works in `namespace`, or the client's default namespace (the service account's, in a
    /// cluster); the containers listen on `port`.
    pub fn new(client: kube::Client, namespace: Option<String>, port: u16, tally: &Tally) -> Self {
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        KubernetesDriver {
            deployments: Api::namespaced(client.clone(), &namespace),
            autoscalers: Api::namespaced(client.clone(), &namespace),
            client,
            watches: None,
            tally: tally.clone(),
            namespace,
            port,
            want: Want::default(),
            round_every: ROUND_EVERY,
            applied: BTreeMap::new(),
            applied_autoscalers: BTreeMap::new(),
            complete: BTreeMap::new(),
            last: None,
        }
    }

    /// Sets the least time between rounds (tests make it zero).
    pub fn round_every(mut self, every: Duration) -> Self {
        self.round_every = every;
        self
    }

    async fn round(&mut self) -> Result<Running, String> {
        check_service(&self.want.service)?;
        if self.want.image.is_empty() {
            return Err(format!(
                "service \"{}\" has no image: set `workload.image` in the fleet manifest to run it on Kubernetes",
                self.want.service
            ));
        }
        let watches = self.watch_service();
        watches.deployments.first_list().await;
        watches.autoscalers.first_list().await;
        watches.pods.first_list().await;
        let seen = self.seen()?;
        let want = self.want.clone();
        let mut problems = self.watch_trouble();
        let mut wanted = Vec::new();
        for (version, replicas) in &want.versions {
            match check_version(version) {
                Ok(()) => wanted.push(Wanted {
                    name: deployment_name(&want.service, version),
                    version,
                    replicas: *replicas,
                }),
                Err(e) => problems.push(e),
            }
        }
        let answered = self.write(&want, &wanted, &seen, &mut problems).await;
        // The writes, as the watches show them now, or as the API answered them when the
        // watch has not shown them yet.
        let mut seen = self.seen()?;
        for (name, d) in answered {
            if !seen
                .deployments
                .get(&name)
                .is_some_and(|now| at_least(now, &d))
            {
                seen.deployments.insert(name, d);
            }
        }
        Ok(self.judge(&seen, &wanted, problems))
    }

    /// The watches of the wanted service: started, or started again when it is another.
    fn watch_service(&mut self) -> &Watches {
        let (service, ns) = (&self.want.service, &self.namespace);
        if self.watches.as_ref().is_none_or(|w| w.service != *service) {
            let selector = objects::selector(service);
            let (c, t) = (&self.client, &self.tally);
            self.watches = Some(Watches {
                service: service.clone(),
                deployments: watch(c, ns, &selector, "Deployments", (t, "deployments")),
                autoscalers: watch(
                    c,
                    ns,
                    &selector,
                    "HorizontalPodAutoscalers",
                    (t, "autoscalers"),
                ),
                pods: watch(c, ns, &selector, "pods", (t, "pods")),
            });
        }
        self.watched()
    }

    fn watched(&self) -> &Watches {
        #[allow(clippy::expect_used)] // Made by `watch_service` before any use.
        self.watches.as_ref().expect("the service is watched")
    }

    /// What the watches show now; why not, until their first lists came through.
    /// Autoscalers that cannot be listed (an agent whose Role predates autoscaling, a cluster
    /// without autoscaling/v2) keep nothing else from running: taken as none
    /// ([`Self::watch_trouble`] tells it when the manifest autoscales).
    fn seen(&self) -> Result<Seen, String> {
        let w = self.watched();
        Ok(Seen {
            deployments: by_name(w.deployments.objects()?),
            autoscalers: w.autoscalers.objects().map(by_name).unwrap_or_default(),
            pods: w.pods.objects()?.iter().map(|p| Pod::clone(p)).collect(),
        })
    }

    /// Why the watches failed lately; the autoscalers' only when the manifest autoscales.
    fn watch_trouble(&self) -> Vec<String> {
        let w = self.watched();
        let autoscalers = match self.want.autoscale {
            Some(_) => (w.autoscalers.trouble()).or_else(|| w.autoscalers.objects().err()),
            None => None,
        };
        [w.deployments.trouble(), w.pods.trouble(), autoscalers]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Applies what `wanted` lacks or has changed, and deletes what it no longer has,
    /// telling `problems` what failed; the Deployments as their applies answered. Waits, up
    /// to [`SEEN_WITHIN`] in all, for each write to come back through the watches.
    async fn write(
        &mut self,
        want: &Want,
        wanted: &[Wanted<'_>],
        seen: &Seen,
        problems: &mut Vec<String>,
    ) -> BTreeMap<String, Deployment> {
        let deadline = Instant::now() + SEEN_WITHIN;
        let mut answered = BTreeMap::new();
        for w in wanted {
            // A failed apply leaves the Deployment as it was, to be judged as it is.
            let listed = seen.deployments.get(&w.name);
            match self.apply_one(want, w, listed, deadline, problems).await {
                Err(e) => problems.push(e),
                Ok(answer) => {
                    let owner = answer.as_ref().or(listed);
                    if let (Some(autoscale), Some(owner)) = (&want.autoscale, owner) {
                        let version = w.version;
                        let listed = &seen.autoscalers;
                        let applied = self
                            .apply_autoscaler(want, version, autoscale, owner, listed, deadline);
                        problems.extend(applied.await.err());
                    }
                    answered.extend(answer.map(|d| (w.name.clone(), d)));
                }
            }
        }
        if !want.keep_others {
            // Every wanted version, applied this round or not: a failed apply must not take
            // a version's Deployment away.
            self.delete_others(&seen.deployments, wanted, problems, deadline)
                .await;
        }
        self.delete_autoscalers(&seen.autoscalers, wanted, problems, deadline)
            .await;
        answered
    }

    /// Applies `w`'s Deployment, unless it stands as last applied (`listed`: as the watch
    /// shows it). `None` if it stood; else the object as the API answered, `problems` told
    /// if the watch did not show it by `deadline`.
    async fn apply_one(
        &mut self,
        want: &Want,
        w: &Wanted<'_>,
        listed: Option<&Deployment>,
        deadline: Instant,
        problems: &mut Vec<String>,
    ) -> Result<Option<Deployment>, String> {
        let (ns, name, version) = (&self.namespace, &w.name, w.version);
        let object = objects::deployment(&Spec {
            namespace: ns,
            service: &want.service,
            version,
            replicas: w.replicas,
            image: want.image.replace("{version}", version),
            port: self.port,
            health_check: &want.health_check,
            cpu: &want.cpu,
            memory: &want.memory,
            run_as_user: want.run_as_user,
            autoscale: want.autoscale,
        });
        // As applied, unless edited since (a later generation) or made anew (another uid); a
        // watch behind shows an earlier generation, which is no reason to apply again.
        let standing = match (self.applied.get(name), listed) {
            (Some(applied), Some(now)) => {
                applied.object == object
                    && applied.uid == now.metadata.uid
                    && now.metadata.generation <= applied.generation
                    && applied.at.elapsed() < APPLY_AGAIN_AFTER
            }
            _ => false,
        };
        if standing {
            return Ok(None);
        }
        if listed.is_none() {
            let fix = "rename or delete it, or run the service in another namespace";
            name_free(&self.deployments, name, (&want.service, version), ns, fix).await?;
        }
        if want.autoscale.is_some()
            && let Some(handover) = listed.and_then(objects::replicas_handover)
        {
            self.hand_replicas_over(name, &handover).await?;
        }
        let params = PatchParams::apply(MANAGER).force();
        let now = self
            .deployments
            .patch(name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| format!("applying Deployment {name} in namespace {ns}: {e}"))?;
        tracing::info!(deployment = %name, namespace = %ns, replicas = w.replicas, "applied");
        let shown = written(&self.watched().deployments, deadline, &now, name).await;
        problems.extend(shown.err());
        self.applied.insert(
            name.to_owned(),
            Applied {
                object,
                uid: now.metadata.uid.clone(),
                generation: now.metadata.generation,
                at: Instant::now(),
            },
        );
        Ok(Some(now))
    }

    /// Deletes the listed Deployments of no version in `wanted`.
    async fn delete_others(
        &mut self,
        listed: &BTreeMap<String, Deployment>,
        wanted: &[Wanted<'_>],
        problems: &mut Vec<String>,
        deadline: Instant,
    ) {
        let ns = &self.namespace;
        let unwanted = listed.iter().filter(|(n, d)| {
            wanted.iter().all(|w| w.name != **n) && d.metadata.deletion_timestamp.is_none()
        });
        for (name, d) in unwanted {
            let watched = &self.watched().deployments;
            let uid = d.metadata.uid.as_deref();
            let at = (name.as_str(), uid);
            if !delete(&self.deployments, watched, at, (ns, deadline), problems).await {
                continue;
            }
            self.applied.remove(name);
            self.complete.remove(name);
        }
    }

    /// The ready versions and their instances, and what keeps the others from being ready.
    fn judge(&mut self, seen: &Seen, wanted: &[Wanted<'_>], mut problems: Vec<String>) -> Running {
        let (listed, pods) = (&seen.deployments, &seen.pods[..]);
        // A Deployment made again (deleted by hand) has another uid: it must roll out anew.
        self.complete.retain(|name, uid| {
            listed
                .get(name)
                .is_some_and(|d| d.metadata.uid.as_ref() == Some(uid))
        });
        let mut running = Running::default();
        for w in wanted {
            if self.want.autoscale.is_some() {
                let autoscaler = seen.autoscalers.get(&w.name);
                problems.extend(
                    autoscaler.and_then(|a| objects::autoscaler_stuck(a, Timestamp::now())),
                );
            }
            let Some(d) = listed.get(&w.name) else {
                continue;
            };
            let replicas = objects::wanted_replicas(d, self.want.autoscale.as_ref(), w.replicas);
            let rollout = objects::rolled_out(d, replicas);
            if rollout.is_ok()
                && let Some(uid) = &d.metadata.uid
            {
                self.complete.insert(w.name.clone(), uid.clone());
            }
            let addresses = objects::ready_addresses(pods, w.version, self.port);
            let trouble = objects::pod_trouble(pods, w.version)
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            if self.complete.contains_key(&w.name) && !addresses.is_empty() {
                // Rolled out once: it serves with whichever of its pods are ready now, through
                // evictions and later rollouts of a new spec alike, as a Service would; a
                // rollout under way, or stuck, is still told.
                if let Err(e) = rollout {
                    problems.push(format!(
                        "{e}{trouble}; serving with its {} ready pods",
                        addresses.len()
                    ));
                }
                running.ready.insert(w.version.to_owned(), addresses);
                continue;
            }
            let why = match (rollout, &d.metadata.uid) {
                (Err(e), _) => e,
                (Ok(()), None) => {
                    format!("{}: no uid, so its rollout is never taken as done", w.name)
                }
                (Ok(()), Some(_)) => format!("{}: no pod ready with an address", w.name),
            };
            problems.push(format!("{why}{trouble}"));
        }
        running.detail = problems.join("; ");
        running
    }
}

/// Checks that `name` is free for the driver's object of `service` and `version`: none of
/// that kind has it, or the driver's does. `fix` says what to do when another's has it.
async fn name_free<K>(
    api: &Api<K>,
    name: &str,
    (service, version): (&str, &str),
    ns: &str,
    fix: &str,
) -> Result<(), String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let found = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading {kind} {name} in namespace {ns}: {e}"))?;
    match found {
        Some(theirs) if !objects::is_ours(&theirs, service, version) => Err(format!(
            "{kind} {name} in namespace {ns} is not fleet-agent's for {service} {version}: {fix}"
        )),
        _ => Ok(()),
    }
}

/// Deletes `name`, only while it is the object of `uid` the watch showed (a precondition:
/// one made anew under the name since is left alone), and waits, until `deadline`, for
/// `watched` to show it gone or going. False, telling `problems` why, if it could not be
/// deleted; a delete the watch did not show in time is told too. One gone already (404), or
/// made anew (409), is left to the next round, as the watch shows it.
async fn delete<K: Object>(
    api: &Api<K>,
    watched: &Watched<K>,
    (name, uid): (&str, Option<&str>),
    (ns, deadline): (&str, Instant),
    problems: &mut Vec<String>,
) -> bool {
    let kind = K::kind(&());
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => tracing::info!(%kind, %name, namespace = %ns, "deleted: no longer wanted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
            tracing::debug!(%kind, %name, code = e.code, "not deleted: gone, or made anew");
            return true;
        }
        Err(e) => {
            problems.push(format!("deleting {kind} {name} in namespace {ns}: {e}"));
            return false;
        }
    }
    let gone = |listed: &[Arc<K>]| {
        !listed.iter().any(|o| {
            let meta = o.meta();
            meta.name.as_deref() == Some(name) && meta.deletion_timestamp.is_none()
        })
    };
    if !watched.shows(deadline, gone).await {
        problems.push(not_shown(watched, name));
    }
    true
}

/// Waits, until `deadline`, for `watched` to show a write's `answered` object (`name`), or a
/// later version of it ([`at_least`]); why not, if it did not.
async fn written<K: Object>(
    watched: &Watched<K>,
    deadline: Instant,
    answered: &K,
    name: &str,
) -> Result<(), String> {
    let shown = |listed: &[Arc<K>]| listed.iter().any(|o| at_least(&**o, answered));
    match watched.shows(deadline, shown).await {
        true => Ok(()),
        false => Err(not_shown(watched, name)),
    }
}

/// A write the watch has not shown in time. Pure.
fn not_shown<K: Object>(watched: &Watched<K>, name: &str) -> String {
    format!(
        "the watch of {} has not shown the change to {name} within {SEEN_WITHIN:?}",
        watched.what()
    )
}

/// The objects of kind `K` (which `kinds` names) in namespace `ns` that `selector` picks,
/// watched, with their figures in `tally` under `name`.
fn watch<K>(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    kinds: &str,
    (tally, name): (&Tally, &'static str),
) -> Watched<K>
where
    K: Object + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let what = format!("{kinds} in namespace {ns}");
    Watched::start(
        Api::namespaced(client.clone(), ns),
        selector,
        what,
        tally,
        name,
    )
}

/// Objects by name.
fn by_name<K: kube::Resource + Clone>(objects: Vec<Arc<K>>) -> BTreeMap<String, K> {
    objects
        .into_iter()
        .filter_map(|o| Some((o.meta().name.clone()?, K::clone(&o))))
        .collect()
}

impl Driver for KubernetesDriver {
    fn apply(&mut self, want: &Want) {
        self.want.clone_from(want);
    }

    async fn poll(&mut self) -> Running {
        if let Some((want, running, at)) = &self.last
            && *want == self.want
            && at.elapsed() < self.round_every
        {
            return running.clone();
        }
        let round = tokio::time::timeout(ROUND_TIMEOUT, self.round())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the Kubernetes API did not answer within {ROUND_TIMEOUT:?} (namespace {})",
                    self.namespace
                ))
            });
        let running = round.unwrap_or_else(|detail| {
            tracing::warn!(%detail, "kubernetes round failed");
            // Nothing is reported ready, so the proxies keep the table they have; nor taken
            // for not ready, as nothing was seen.
            Running {
                ready: BTreeMap::new(),
                detail,
                unseen: true,
            }
        });
        self.last = Some((self.want.clone(), running.clone(), Instant::now()));
        running
    }

    async fn shutdown(&mut self) {
        tracing::info!(
            namespace = %self.namespace,
            "Deployments left running: the cluster serves on while the agent is away"
        );
    }
}
