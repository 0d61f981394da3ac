//! Autoscaled versions: each Deployment with a HorizontalPodAutoscaler of its own name,
//! applied server-side as the Deployment is, and deleted once its version is no longer
//! autoscaled or no longer wanted. The Deployment then leaves its replica count to the
//! autoscaler; a count that was the driver's is first handed over (`replicas_handover`), so
//! that no version drops to one pod on the way.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Patch, PatchParams};
use tokio::time::Instant;

use super::objects::{self, HANDOVER, MANAGER};
use super::{APPLY_AGAIN_AFTER, KubernetesDriver, Wanted, delete, name_free, written};
use crate::driver::{Autoscale, Want};

impl KubernetesDriver {
    /// Applies `version`'s autoscaler for its Deployment `owner`, unless it stands as last
    /// applied.
    pub(super) async fn apply_autoscaler(
        &mut self,
        want: &Want,
        version: &str,
        autoscale: &Autoscale,
        owner: &Deployment,
        listed: &BTreeMap<String, HorizontalPodAutoscaler>,
        deadline: Instant,
    ) -> Result<(), String> {
        let ns = &self.namespace;
        let object = objects::autoscaler(ns, (&want.service, version), autoscale, owner);
        let name = objects::deployment_name(&want.service, version);
        let standing = self.applied_autoscalers.get(&name).is_some_and(|(o, at)| {
            *o == object && listed.contains_key(&name) && at.elapsed() < APPLY_AGAIN_AFTER
        });
        if standing {
            return Ok(());
        }
        if !listed.contains_key(&name) {
            let fix =
                "delete it (the agent makes its own), or run the service in another namespace";
            name_free(&self.autoscalers, &name, (&want.service, version), ns, fix).await?;
        }
        let params = PatchParams::apply(MANAGER).force();
        let now = self
            .autoscalers
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| {
                format!("applying HorizontalPodAutoscaler {name} in namespace {ns}: {e}")
            })?;
        tracing::info!(autoscaler = %name, namespace = %ns, min = autoscale.min, max = autoscale.max, "applied");
        let shown = written(&self.watched().autoscalers, deadline, &now, &name).await;
        self.applied_autoscalers
            .insert(name, (object, Instant::now()));
        shown
    }

    /// Keeps Deployment `name`'s replica count under [`HANDOVER`] before the driver's apply
    /// lets go of it.
    pub(super) async fn hand_replicas_over(
        &self,
        name: &str,
        handover: &serde_json::Value,
    ) -> Result<(), String> {
        let params = PatchParams::apply(HANDOVER).force();
        self.deployments
            .patch(name, &params, &Patch::Apply(handover))
            .await
            .map_err(|e| {
                let ns = &self.namespace;
                format!("handing Deployment {name}'s replicas over to its autoscaler in namespace {ns}: {e}")
            })?;
        tracing::info!(deployment = %name, "replica count handed over to its autoscaler");
        Ok(())
    }

    /// Deletes the listed autoscalers of versions that are not autoscaled: wanted ones, when
    /// the manifest no longer autoscales (else they would fight the count the Deployment
    /// sets), and others unless they are kept running.
    pub(super) async fn delete_autoscalers(
        &mut self,
        listed: &BTreeMap<String, HorizontalPodAutoscaler>,
        wanted: &[Wanted<'_>],
        problems: &mut Vec<String>,
        deadline: Instant,
    ) {
        let ns = &self.namespace;
        let autoscaled = self.want.autoscale.is_some();
        let keep_others = self.want.keep_others;
        let going = |a: &HorizontalPodAutoscaler| a.metadata.deletion_timestamp.is_some();
        for (name, a) in listed.iter().filter(|(_, a)| !going(a)) {
            let is_wanted = wanted.iter().any(|w| w.name == *name);
            if (is_wanted && autoscaled) || (!is_wanted && keep_others) {
                continue;
            }
            let watched = &self.watched().autoscalers;
            let uid = a.metadata.uid.as_deref();
            let at = (name.as_str(), uid);
            if !delete(&self.autoscalers, watched, at, (ns, deadline), problems).await {
                continue;
            }
            self.applied_autoscalers.remove(name);
        }
    }
}
