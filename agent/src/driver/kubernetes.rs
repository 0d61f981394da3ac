//! The `kubernetes` driver: each wanted version runs as a Deployment of its own
//! (`objects.rs`), applied server-side through kube-rs. A version is first ready once its
//! rollout is complete (every replica of its spec ready); from then on, for as long as that
//! Deployment lives, its instances are whichever of its pods are ready, which the proxies are
//! given: a pod evicted, or replaced by a later rollout, is followed to its new address while
//! the rest carry on.
//!
//! Each round lists the service's Deployments, autoscalers and pods (by label), applies what
//! is missing, changed here or changed by hand, and deletes the Deployments of versions no
//! longer wanted, and the autoscalers of Deployments that are no longer autoscaled
//! (`scaling.rs`).
//! A Deployment the driver did not make for that service and version is never changed or
//! deleted: a name taken by one is reported. A failed apply or delete is reported and the
//! rest of the round carries on; a wanted version's Deployment is never deleted for it.
//! Rounds are at most one a second unless the want changed, and one that takes longer than
//! [`ROUND_TIMEOUT`] is given up and reported.
//!
//! The workloads outlive the agent: stopping it (or losing it) leaves every Deployment as it
//! is, so the cluster goes on serving while the agent is away (fail-static).

pub(crate) mod objects;
mod scaling;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use tokio::time::Instant;

use self::objects::Spec;
use self::objects::{MANAGER, check_service, check_version, deployment_name};
use super::{Driver, Running, Want};

/// Least time between two rounds of API calls while the want stays the same.
const ROUND_EVERY: Duration = Duration::from_secs(1);
/// A round of API calls that takes longer is given up (kube-rs sets no read timeout).
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// A Deployment applied this long ago is applied again, though unchanged.
const APPLY_AGAIN_AFTER: Duration = Duration::from_secs(60);

pub struct KubernetesDriver {
    deployments: Api<Deployment>,
    autoscalers: Api<HorizontalPodAutoscaler>,
    pods: Api<Pod>,
    namespace: String,
    /// The port the service's containers listen on.
    port: u16,
    want: Want,
    round_every: Duration,
    /// What this driver applied, by Deployment name: the object, the generation the API
    /// server gave it, and when.
    applied: BTreeMap<String, Applied>,
    /// The autoscalers this driver applied, by name, and when.
    applied_autoscalers: BTreeMap<String, (HorizontalPodAutoscaler, Instant)>,
    /// The Deployments (by name, with their uid) whose rollout has been seen complete.
    complete: BTreeMap<String, String>,
    /// The last round: the want it was made for, its outcome, and when it ended.
    last: Option<(Want, Running, Instant)>,
}

struct Applied {
    object: Deployment,
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
    pub fn new(client: kube::Client, namespace: Option<String>, port: u16) -> Self {
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        KubernetesDriver {
            deployments: Api::namespaced(client.clone(), &namespace),
            autoscalers: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client, &namespace),
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
        let ns = self.namespace.clone();
        let selector = ListParams::default().labels(&objects::selector(&self.want.service));
        let mut listed: BTreeMap<String, Deployment> = self
            .deployments
            .list(&selector)
            .await
            .map_err(|e| format!("listing Deployments in namespace {ns}: {e}"))?
            .items
            .into_iter()
            .filter_map(|d| Some((d.metadata.name.clone()?, d)))
            .collect();
        let mut problems = Vec::new();
        let autoscalers = self.list_autoscalers(&selector, &mut problems).await;
        let want = self.want.clone();
        let mut wanted = Vec::new();
        for (version, replicas) in &want.versions {
            if let Err(e) = check_version(version) {
                problems.push(e);
                continue;
            }
            let name = deployment_name(&want.service, version);
            // A failed apply leaves the Deployment as it was, to be judged as it is.
            if let Err(e) = self
                .apply_one(&want, version, *replicas, &name, &mut listed)
                .await
            {
                problems.push(e);
            } else if let (Some(autoscale), Some(owner)) = (&want.autoscale, listed.get(&name)) {
                let applied =
                    (self.apply_autoscaler(&want, version, autoscale, owner, &autoscalers))
                        .await
                        .map(|()| autoscalers.get(&name));
                match applied {
                    Err(e) => problems.push(e),
                    Ok(listed) => problems.extend(
                        listed.and_then(|a| objects::autoscaler_stuck(a, Timestamp::now())),
                    ),
                }
            }
            wanted.push(Wanted {
                name,
                version,
                replicas: *replicas,
            });
        }
        if !want.keep_others {
            // Every wanted version, applied this round or not: a failed apply must not take
            // a version's Deployment away.
            self.delete_others(&listed, &wanted, &mut problems).await;
        }
        self.delete_autoscalers(&autoscalers, &wanted, &mut problems)
            .await;
        let pods = self
            .pods
            .list(&selector)
            .await
            .map_err(|e| format!("listing pods in namespace {ns}: {e}"))?
            .items;
        Ok(self.judge(&listed, &wanted, &pods, problems))
    }

    /// Applies `version`'s Deployment, `name`, unless it stands as last applied. `listed`
    /// gets the object as the API server has it after the apply.
    async fn apply_one(
        &mut self,
        want: &Want,
        version: &str,
        replicas: u32,
        name: &str,
        listed: &mut BTreeMap<String, Deployment>,
    ) -> Result<(), String> {
        let ns = &self.namespace;
        let object = objects::deployment(&Spec {
            namespace: ns,
            service: &want.service,
            version,
            replicas,
            image: want.image.replace("{version}", version),
            port: self.port,
            health_check: &want.health_check,
            cpu: &want.cpu,
            memory: &want.memory,
            run_as_user: want.run_as_user,
            autoscale: want.autoscale,
        });
        let standing = match (self.applied.get(name), listed.get(name)) {
            (Some(applied), Some(now)) => {
                applied.object == object
                    && applied.generation == now.metadata.generation
                    && applied.at.elapsed() < APPLY_AGAIN_AFTER
            }
            _ => false,
        };
        if standing {
            return Ok(());
        }
        if !listed.contains_key(name) {
            let fix = "rename or delete it, or run the service in another namespace";
            name_free(&self.deployments, name, (&want.service, version), ns, fix).await?;
        }
        if want.autoscale.is_some()
            && let Some(handover) = listed.get(name).and_then(objects::replicas_handover)
        {
            self.hand_replicas_over(name, &handover).await?;
        }
        let params = PatchParams::apply(MANAGER).force();
        let now = self
            .deployments
            .patch(name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| format!("applying Deployment {name} in namespace {ns}: {e}"))?;
        tracing::info!(deployment = %name, namespace = %ns, replicas, "applied");
        self.applied.insert(
            name.to_owned(),
            Applied {
                object,
                generation: now.metadata.generation,
                at: Instant::now(),
            },
        );
        listed.insert(name.to_owned(), now);
        Ok(())
    }

    /// Deletes the listed Deployments of no version in `wanted`.
    async fn delete_others(
        &mut self,
        listed: &BTreeMap<String, Deployment>,
        wanted: &[Wanted<'_>],
        problems: &mut Vec<String>,
    ) {
        let ns = &self.namespace;
        for name in listed
            .keys()
            .filter(|n| wanted.iter().all(|w| w.name != **n))
        {
            if let Err(e) = delete(&self.deployments, name, ns).await {
                problems.push(e);
                continue;
            }
            self.applied.remove(name);
            self.complete.remove(name);
        }
    }

    /// The ready versions and their instances, and what keeps the others from being ready.
    fn judge(
        &mut self,
        listed: &BTreeMap<String, Deployment>,
        wanted: &[Wanted<'_>],
        pods: &[Pod],
        mut problems: Vec<String>,
    ) -> Running {
        // A Deployment made again (deleted by hand) has another uid: it must roll out anew.
        self.complete.retain(|name, uid| {
            listed
                .get(name)
                .is_some_and(|d| d.metadata.uid.as_ref() == Some(uid))
        });
        let mut running = Running::default();
        for w in wanted {
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

/// Deletes `name`; one gone already (404) is what was wanted.
async fn delete<K>(api: &Api<K>, name: &str, ns: &str) -> Result<(), String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(%kind, %name, namespace = %ns, "deleted: no longer wanted");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(format!("deleting {kind} {name} in namespace {ns}: {e}")),
    }
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
            // Nothing is reported ready, so the proxies keep the table they have.
            Running {
                ready: BTreeMap::new(),
                detail,
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
