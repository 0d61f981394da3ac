//! The `kubernetes` driver: each wanted version runs as a Deployment of its own
//! (`objects.rs`), applied server-side through kube-rs; a version is ready once its rollout is
//! complete, and its instances are its ready pods' addresses, which the proxies are given.
//!
//! Each round lists the service's Deployments and pods (by label), applies what is missing or
//! changed, and deletes the Deployments of versions no longer wanted. Deployments the driver
//! did not make (no `app.kubernetes.io/managed-by: fleet-agent`) are never touched. Rounds
//! are at most one a second, whatever the agent asks.
//!
//! The workloads outlive the agent: stopping it (or losing it) leaves every Deployment as it
//! is, so the cluster goes on serving while the agent is away (fail-static).

mod objects;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use tokio::time::Instant;

use self::objects::Spec;
pub use self::objects::{MANAGER, check_service, check_version, deployment_name};
use super::{Driver, Running, Want};

/// Least time between two rounds of API calls.
const ROUND_EVERY: Duration = Duration::from_secs(1);
/// A Deployment applied this long ago is applied again, though unchanged, so that a hand edit
/// of the driver's fields does not last.
const APPLY_AGAIN_AFTER: Duration = Duration::from_secs(60);

pub struct KubernetesDriver {
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    namespace: String,
    /// The port the service's containers listen on.
    port: u16,
    want: Want,
    round_every: Duration,
    /// What this driver applied, by Deployment name, and when.
    applied: BTreeMap<String, (Deployment, Instant)>,
    /// The last round's outcome and when it ended.
    last: Option<(Running, Instant)>,
    /// The want changed since the last round.
    changed: bool,
}

impl KubernetesDriver {
    /// Works in `namespace`, or the client's default namespace (the service account's, in a
    /// cluster); the containers listen on `port`.
    pub fn new(client: kube::Client, namespace: Option<String>, port: u16) -> Self {
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        KubernetesDriver {
            deployments: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client, &namespace),
            namespace,
            port,
            want: Want::default(),
            round_every: ROUND_EVERY,
            applied: BTreeMap::new(),
            last: None,
            changed: false,
        }
    }

    /// Sets the least time between rounds (tests make it zero).
    pub fn round_every(mut self, every: Duration) -> Self {
        self.round_every = every;
        self
    }

    async fn round(&mut self) -> Result<Running, String> {
        let want = &self.want;
        check_service(&want.service)?;
        if want.image.is_empty() {
            return Err(format!(
                "service \"{}\" has no image: set `workload.image` in the fleet manifest to run it on Kubernetes",
                want.service
            ));
        }
        let ns = &self.namespace;
        let selector = ListParams::default().labels(&objects::selector(&want.service));
        let listed = self
            .deployments
            .list(&selector)
            .await
            .map_err(|e| format!("listing Deployments in namespace {ns}: {e}"))?;
        let mut listed: BTreeMap<String, Deployment> = listed
            .items
            .into_iter()
            .filter_map(|d| Some((d.metadata.name.clone()?, d)))
            .collect();

        let mut wanted = BTreeMap::new();
        let mut problems = Vec::new();
        for (version, replicas) in &want.versions {
            if let Err(e) = check_version(version) {
                problems.push(e);
                continue;
            }
            let spec = Spec {
                namespace: ns,
                service: &want.service,
                version,
                replicas: *replicas,
                image: want.image.replace("{version}", version),
                port: self.port,
                health_check: &want.health_check,
            };
            let object = objects::deployment(&spec);
            let name = deployment_name(&want.service, version);
            let fresh = self.applied.get(&name).is_some_and(|(applied, at)| {
                *applied == object && at.elapsed() < APPLY_AGAIN_AFTER
            });
            if !fresh || !listed.contains_key(&name) {
                let params = PatchParams::apply(MANAGER).force();
                let now = self
                    .deployments
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .map_err(|e| format!("applying Deployment {name} in namespace {ns}: {e}"))?;
                tracing::info!(deployment = %name, namespace = %ns, replicas, "applied");
                self.applied.insert(name.clone(), (object, Instant::now()));
                // As the API server has it now: judged below with the listed ones.
                listed.insert(name.clone(), now);
            }
            wanted.insert(name, (version.as_str(), *replicas));
        }

        for name in listed.keys().filter(|n| !wanted.contains_key(*n)) {
            match self
                .deployments
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(deployment = %name, namespace = %ns, "deleted: its version is no longer wanted")
                }
                // Gone already: what was wanted.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(format!("deleting Deployment {name} in namespace {ns}: {e}"));
                }
            }
            self.applied.remove(name);
        }

        let pods = self
            .pods
            .list(&selector)
            .await
            .map_err(|e| format!("listing pods in namespace {ns}: {e}"))?
            .items;
        let mut running = Running::default();
        for (name, (version, replicas)) in &wanted {
            let Some(d) = listed.get(name) else {
                continue;
            };
            if let Err(e) = objects::rolled_out(d, *replicas) {
                problems.push(e);
                continue;
            }
            let addresses = objects::ready_addresses(&pods, version, self.port);
            if addresses.len() < *replicas as usize {
                problems.push(format!(
                    "{name}: {} of {replicas} pods ready with an address",
                    addresses.len()
                ));
                continue;
            }
            running.ready.insert((*version).to_owned(), addresses);
        }
        running.detail = problems.join("; ");
        Ok(running)
    }
}

impl Driver for KubernetesDriver {
    fn apply(&mut self, want: &Want) {
        if *want != self.want {
            self.want = want.clone();
            self.changed = true;
        }
    }

    async fn poll(&mut self) -> Running {
        if let Some((running, at)) = &self.last
            && !self.changed
            && at.elapsed() < self.round_every
        {
            return running.clone();
        }
        self.changed = false;
        let running = self.round().await.unwrap_or_else(|detail| {
            tracing::warn!(%detail, "kubernetes round failed");
            // Nothing is reported ready, so the proxies keep the table they have.
            Running {
                ready: BTreeMap::new(),
                detail,
            }
        });
        self.last = Some((running.clone(), Instant::now()));
        running
    }

    async fn shutdown(&mut self) {
        tracing::info!(
            namespace = %self.namespace,
            "Deployments left running: the cluster serves on while the agent is away"
        );
    }
}
