//! The Kubernetes objects of the `kubernetes` driver, made and judged without I/O: a
//! Deployment per version (with, when the manifest autoscales, a HorizontalPodAutoscaler of
//! the same name), named and labelled so that the driver finds its own again, and the
//! addresses of a version's ready pods.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Lifecycle, LifecycleHandler,
    Pod, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, SleepAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

/// The recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/common-labels).
pub const NAME: &str = "app.kubernetes.io/name";
pub const VERSION: &str = "app.kubernetes.io/version";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`] and the field manager of every apply.
pub const MANAGER: &str = "fleet-agent";
/// The field manager that keeps a Deployment's replica count while it passes from
/// [`MANAGER`] to its autoscaler (see [`replicas_handover`]).
pub const HANDOVER: &str = "fleet-agent-handover";

/// How long a pod being stopped goes on serving before its SIGTERM: time for the agent to
/// see it go and take it out of the proxies' tables (a round a second, then a `PUT`).
pub const STOP_AFTER_SECONDS: i64 = 5;

/// Longest name of a label value, and of a Deployment here (a DNS label, as tools that
/// make names from it expect; its pods' names, longer by a hash, are cut by Kubernetes).
const MAX_NAME: usize = 63;

/// The label selector of everything the driver made for `service`.
pub fn selector(service: &str) -> String {
    format!("{MANAGED_BY}={MANAGER},{NAME}={service}")
}

/// What the driver runs one version with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    pub replicas: u32,
    /// The image with `{version}` replaced.
    pub image: String,
    pub port: u16,
    pub health_check: &'a str,
    /// Each pod's CPU and memory requests (memory also its limit); empty: none.
    pub cpu: &'a str,
    pub memory: &'a str,
    /// The pods' user, under the restricted Pod Security profile; 0: as the image says.
    pub run_as_user: u32,
    /// Scaled by a HorizontalPodAutoscaler: the Deployment leaves its replica count alone.
    pub autoscale: Option<crate::driver::Autoscale>,
}

/// Checks that `service` can name Kubernetes objects (a DNS-1123 label).
pub fn check_service(service: &str) -> Result<(), String> {
    fleet_yaml::is_dns_label(service)
        .then_some(())
        .ok_or_else(|| {
            format!(
                "service \"{service}\" cannot name Kubernetes objects: rename it in the fleet \
             manifest with lowercase letters, digits and '-' (at most {MAX_NAME}, a letter or \
             digit at each end)"
            )
        })
}

/// Checks that `version` can be a label value, which is how the driver finds its pods.
pub fn check_version(version: &str) -> Result<(), String> {
    fleet_yaml::is_version(version)
        .then_some(())
        .ok_or_else(|| {
            format!(
                "version \"{version}\" cannot be a Kubernetes label value: release a version of \
             letters, digits, '-', '_' and '.' (at most {MAX_NAME}, a letter or digit at each end)"
            )
        })
}

/// The Deployment's name: `service-version`, the version lowercased with anything but
/// letters, digits and '-' made '-'. A version so changed, or a name too long, gets a hash of
/// the version too, so that `1.2` and `1-2` never share a Deployment.
pub fn deployment_name(service: &str, version: &str) -> String {
    let slug: String = version
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    let plain = format!("{service}-{slug}");
    if slug == version && plain.len() <= MAX_NAME {
        return plain;
    }
    let hash = format!(
        "{:08x}",
        xxhash_rust::xxh64::xxh64(version.as_bytes(), 0) as u32
    );
    let mut name = plain;
    name.truncate(MAX_NAME - hash.len() - 1);
    let name = name.trim_end_matches('-');
    format!("{name}-{hash}")
}

fn labels(service: &str, version: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_owned(), service.to_owned()),
        (VERSION.to_owned(), version.to_owned()),
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
    ])
}

/// The Deployment that runs `spec`, as the driver applies it (server-side: only the fields
/// set here are the driver's; whatever else the cluster adds stays).
pub fn deployment(spec: &Spec<'_>) -> Deployment {
    let labels = labels(spec.service, spec.version);
    // All three, so that no other tool's pods (Helm charts set the first two too) are ever
    // taken for the driver's: a selector cannot change once made.
    let selected = labels.clone();
    let container = Container {
        name: spec.service.to_owned(),
        image: Some(spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(spec.port),
            ..ContainerPort::default()
        }]),
        env: Some(vec![
            EnvVar {
                name: "PORT".into(),
                value: Some(spec.port.to_string()),
                ..EnvVar::default()
            },
            EnvVar {
                name: "FLEET_VERSION".into(),
                value: Some(spec.version.to_owned()),
                ..EnvVar::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(spec.health_check.to_owned()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        resources: resources(spec),
        security_context: (spec.run_as_user > 0).then(|| SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: STOP_AFTER_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(spec.service, spec.version)),
            namespace: Some(spec.namespace.to_owned()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            // Autoscaled, the count is the autoscaler's: an apply that set it would undo it.
            replicas: (spec.autoscale.is_none())
                .then(|| i32::try_from(spec.replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(selected),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: restricted(spec.run_as_user),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The autoscaler of `service` `version`'s Deployment `owner` (as the API server has it, with
/// its uid), of the same name, keeping the pods' average CPU use at `cpu_percent` of their
/// request between `min` and `max` pods. It is the Deployment's dependent, so the cluster's garbage
/// collector deletes it with the Deployment, whoever deletes that.
pub fn autoscaler(
    namespace: &str,
    (service, version): (&str, &str),
    autoscale: &crate::driver::Autoscale,
    owner: &Deployment,
) -> HorizontalPodAutoscaler {
    let name = deployment_name(service, version);
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let owner = owner.metadata.uid.clone().map(|uid| OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.clone(),
        uid,
        ..OwnerReference::default()
    });
    HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(service, version)),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(count(autoscale.min)),
            max_replicas: count(autoscale.max),
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(count(autoscale.cpu_percent)),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        status: None,
    }
}

/// When `d`'s replica count is still the driver's own (applied by [`MANAGER`]) but is to
/// become its autoscaler's: the apply, under [`HANDOVER`], that keeps the count as it is.
/// Without it, the next apply (which no longer sets the count) would leave the field to no
/// one, and Kubernetes would scale the Deployment to its default, one pod, until the
/// autoscaler raised it again: the ownership transfer Kubernetes documents for this case.
pub fn replicas_handover(d: &Deployment) -> Option<serde_json::Value> {
    let owned = d.metadata.managed_fields.iter().flatten().any(|f| {
        f.manager.as_deref() == Some(MANAGER)
            && f.operation.as_deref() == Some("Apply")
            && f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0["f:spec"].get("f:replicas").is_some())
    });
    let replicas = d.spec.as_ref()?.replicas?;
    owned.then(|| {
        serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": d.metadata.name },
            "spec": { "replicas": replicas },
        })
    })
}

/// How long an autoscaler's condition must have stood before it is told: a new version's
/// autoscaler has no metrics for its new pods for a minute or so, which is no fault.
const SETTLED_FOR_SECONDS: i64 = 120;

/// Why autoscaler `hpa` cannot scale at `now`, as its conditions say (`AbleToScale` or
/// `ScalingActive` false for two minutes or more: no metrics server, a container without a
/// CPU request, …), if it cannot. A backoff or scaling turned off is not a fault. Its version
/// still runs, at the count it has.
pub fn autoscaler_stuck(hpa: &HorizontalPodAutoscaler, now: Timestamp) -> Option<String> {
    let conditions = hpa.status.as_ref()?.conditions.as_ref()?;
    let stuck = conditions.iter().find(|c| {
        let reason = c.reason.as_deref().unwrap_or_default();
        let settled = (c.last_transition_time.as_ref())
            .is_none_or(|t| now.as_second() - t.0.as_second() >= SETTLED_FOR_SECONDS);
        matches!(c.type_.as_str(), "AbleToScale" | "ScalingActive")
            && c.status == "False"
            && settled
            && !reason.starts_with("Backoff")
            && reason != "ScalingDisabled"
    })?;
    let name = hpa.metadata.name.as_deref().unwrap_or_default();
    let reason = stuck.reason.as_deref().unwrap_or("no reason given");
    let message = stuck.message.as_deref().unwrap_or_default();
    // Nothing serves the metrics API (rather than, say, a container without a CPU request).
    let hint = match message.contains("metrics API") || message.contains("metrics.k8s.io") {
        true => " (does the cluster run a metrics server?)",
        false => "",
    };
    Some(format!(
        "autoscaler {name} cannot scale, {reason}: {message}{hint}"
    ))
}

/// Whether `object` (a Deployment, an autoscaler) was made by the driver for `service` and
/// `version`.
pub fn is_ours(object: &impl kube::Resource, service: &str, version: &str) -> bool {
    let labels = object.meta().labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(MANAGED_BY) == Some(MANAGER)
        && label(NAME) == Some(service)
        && label(VERSION) == Some(version)
}

/// What the restricted Pod Security profile asks of a pod, running as `user`; nothing for 0
/// (the image's user, whatever it is).
fn restricted(user: u32) -> Option<PodSecurityContext> {
    (user > 0).then(|| PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(i64::from(user)),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    })
}

/// The container's requests and limits: CPU and memory requested as given, memory also the
/// limit (a pod over it is stopped rather than starving its node); none when nothing is
/// given.
fn resources(spec: &Spec<'_>) -> Option<ResourceRequirements> {
    let quantity = |v: &str| (!v.is_empty()).then(|| Quantity(v.to_owned()));
    let requests: BTreeMap<String, Quantity> = [("cpu", spec.cpu), ("memory", spec.memory)]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), quantity(v)?)))
        .collect();
    if requests.is_empty() {
        return None;
    }
    let limits = quantity(spec.memory).map(|m| BTreeMap::from([("memory".to_owned(), m)]));
    Some(ResourceRequirements {
        requests: Some(requests),
        limits,
        ..ResourceRequirements::default()
    })
}

/// How many instances of `d` a rollout must have ready: `fixed`, or, autoscaled, as many as
/// its autoscaler set and at least `min` (a Deployment made without a count has one until
/// its autoscaler acts, or for good if the autoscaler could not be applied).
pub fn wanted_replicas(
    d: &Deployment,
    autoscale: Option<&crate::driver::Autoscale>,
    fixed: u32,
) -> u32 {
    let Some(autoscale) = autoscale else {
        return fixed;
    };
    let set = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    u32::try_from(set).unwrap_or(0).max(autoscale.min)
}

/// Whether `d` has rolled out `replicas` instances of its current spec, all ready, and no
/// others left over; if not, what it lacks, for people, with the cluster's own reason when
/// it gave one (a deadline passed, pods it could not create).
pub fn rolled_out(d: &Deployment, replicas: u32) -> Result<(), String> {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let Some(status) = &d.status else {
        return Err(format!("{name}: no status yet"));
    };
    let stuck = status.conditions.iter().flatten().find(|c| {
        (c.type_ == "Progressing" && c.status == "False")
            || (c.type_ == "ReplicaFailure" && c.status == "True")
    });
    if let Some(c) = stuck {
        return Err(format!(
            "{name}: {}: {}",
            c.reason.as_deref().unwrap_or(&c.type_),
            c.message.as_deref().unwrap_or_default()
        ));
    }
    let want = i64::from(replicas);
    let seen = status.observed_generation.unwrap_or(0);
    if seen < d.metadata.generation.unwrap_or(0) {
        return Err(format!(
            "{name}: its latest spec is not yet seen by the cluster"
        ));
    }
    let count = |n: Option<i32>| i64::from(n.unwrap_or(0));
    let (updated, ready, total) = (
        count(status.updated_replicas),
        count(status.ready_replicas),
        count(status.replicas),
    );
    if updated < want || ready < want {
        return Err(format!(
            "{name}: {ready} of {want} ready, {updated} of {want} updated"
        ));
    }
    if total > want {
        return Err(format!(
            "{name}: {} old instances still running",
            total - want
        ));
    }
    Ok(())
}

/// Why `version`'s pods are not ready, when one of them says: unschedulable, or a container
/// waiting for a reason other than being made (an image that cannot be pulled, a crash loop).
pub fn pod_trouble(pods: &[Pod], version: &str) -> Option<String> {
    pods.iter()
        .filter(|p| has_version(p, version))
        .find_map(|p| {
            let name = p.metadata.name.as_deref().unwrap_or_default();
            let status = p.status.as_ref()?;
            let unschedulable = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False");
            if let Some(c) = unschedulable {
                let why = c
                    .message
                    .as_deref()
                    .or(c.reason.as_deref())
                    .unwrap_or("unschedulable");
                return Some(format!("pod {name}: not scheduled: {why}"));
            }
            status.container_statuses.iter().flatten().find_map(|c| {
                let waiting = c.state.as_ref()?.waiting.as_ref()?;
                let reason = waiting.reason.as_deref()?;
                if matches!(reason, "ContainerCreating" | "PodInitializing") {
                    return None;
                }
                let message = waiting
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                Some(format!(
                    "pod {name}: container {} waiting: {reason}{message}",
                    c.name
                ))
            })
        })
}

fn has_version(p: &Pod, version: &str) -> bool {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(VERSION))
        .is_some_and(|v| v == version)
}

/// Where `pod` serves `port`: its address, unless it is being deleted or has none yet.
pub fn pod_address(pod: &Pod, port: u16) -> Option<SocketAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    any_pod_address(pod, port)
}

/// Where `pod` serves `port`, being deleted or not; `None` while it has no address yet.
pub fn any_pod_address(pod: &Pod, port: u16) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// Whether `pod` says it is ready (its `Ready` condition true).
fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    (conditions.into_iter().flatten()).any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The addresses (`ip:port`) of `version`'s pods that are ready and not being deleted,
/// sorted.
pub fn ready_addresses(pods: &[Pod], version: &str, port: u16) -> Vec<String> {
    let mut out: Vec<String> = pods
        .iter()
        .filter(|p| has_version(p, version))
        .filter(|p| is_ready(p))
        .filter_map(|p| Some(pod_address(p, port)?.to_string()))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;
