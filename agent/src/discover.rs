//! Where the region's proxies are: the admin URLs given (`--proxy-admin`), or the pods a label
//! selector picks in the agent's namespace (`--proxy-pods`), watched, so that proxies scaled
//! out, rescheduled or replaced are found as the API tells of them, without editing the
//! agent's settings.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;

use crate::driver::kubernetes::objects::any_pod_address;
use crate::watched::{Tally, Watched};

/// A proxy the agent puts tables on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proxy {
    /// Its admin URL, e.g. `http://10.2.0.2:9901`.
    pub admin: String,
    /// Whether its process may run: a proxy given by URL is taken as running; a pod while its
    /// proxy container may ([`proxy_runs`]; ready or not: a proxy not ready may still hold a
    /// table and serve the connections it has). One that does not run holds no table and
    /// serves nothing, so no step waits for it.
    pub running: bool,
}

impl Proxy {
    /// A proxy given by its admin URL, taken as running.
    pub fn listed(admin: &str) -> Self {
        Proxy {
            admin: admin.to_owned(),
            running: true,
        }
    }
}

/// How long the first look waits for the pods' first list (later looks take it when it
/// comes).
pub const FIRST_LOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the proxies are.
#[derive(Clone, Debug)]
pub enum ProxySource {
    /// These admin URLs, e.g. `http://127.0.0.1:9901`.
    Listed(Vec<String>),
    /// The running pods `selector` picks, their admin API on `port`.
    Pods {
        pods: Box<Api<Pod>>,
        selector: String,
        port: u16,
        /// Where the watch keeps its figures (as `proxy-pods`).
        tally: Tally,
        /// The pods, watched from the first look on.
        watched: Option<Arc<Watched<Pod>>>,
        /// What the last look found and told.
        told: Option<Result<Vec<Proxy>, String>>,
    },
}

impl ProxySource {
    /// The pods `selector` picks in `namespace` (default: the client's).
    pub fn pods(
        client: kube::Client,
        namespace: Option<&str>,
        selector: String,
        port: u16,
        tally: &Tally,
    ) -> Self {
        let pods = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::default_namespaced(client),
        };
        ProxySource::Pods {
            pods: Box::new(pods),
            selector,
            port,
            tally: tally.clone(),
            watched: None,
            told: None,
        }
    }

    /// The proxies, when they changed: the listed ones at the first call, the pods' whenever
    /// they come, go, or start or stop running (or a deleted one's grace period ends); `None`
    /// when nothing changed. The first look waits for the pods' first list, up to
    /// [`FIRST_LOOK_TIMEOUT`]. A watch not yet listed (refused, unanswered), or that shows no
    /// pod in phase Running with an address, is an error (told once, until it changes), and
    /// the proxies known stay as they are. A watch that fails after its first list is logged
    /// (`watched`), and what it last showed goes on being used, as the driver does.
    pub async fn look(&mut self) -> Option<anyhow::Result<Vec<Proxy>>> {
        match self {
            ProxySource::Listed(urls) => {
                let urls = std::mem::take(urls);
                (!urls.is_empty()).then(|| Ok(urls.iter().map(|u| Proxy::listed(u)).collect()))
            }
            ProxySource::Pods {
                pods,
                selector,
                port,
                tally,
                watched,
                told,
            } => {
                let watched = watched.get_or_insert_with(|| {
                    let what = format!("the proxies' pods ({selector})");
                    let pods = Api::clone(pods);
                    Arc::new(Watched::start(pods, selector, what, tally, "proxy-pods"))
                });
                if told.is_none() {
                    // Not answered in time: told as such below.
                    let _ = tokio::time::timeout(FIRST_LOOK_TIMEOUT, watched.first_list()).await;
                }
                let found = watched.objects().and_then(|listed| {
                    let found = proxies(listed.iter().map(|p| &**p), *port, Timestamp::now());
                    match found.is_empty() {
                        true => Err(format!(
                            "no running pod matches the proxies' selector {selector}"
                        )),
                        false => Ok(found),
                    }
                });
                if told.as_ref() == Some(&found) {
                    return None;
                }
                *told = Some(found.clone());
                Some(found.map_err(anyhow::Error::msg))
            }
        }
    }
}

/// The proxies of the pods in phase Running with an address, each running while its proxy
/// runs ([`proxy_runs`]). Not only the ready ones: a proxy is ready only once it has a table.
/// A pod being deleted is kept while its proxy runs, until its grace period ends (`now` past
/// its `deletionTimestamp`, and [`GONE_AFTER`]): it serves on while the Service lets it go,
/// then drains on its table; after, the kubelet has ended it, or cannot be reached to say so
/// (a node lost). Sorted. Pure.
pub fn proxies<'p>(
    pods: impl IntoIterator<Item = &'p Pod>,
    port: u16,
    now: Timestamp,
) -> Vec<Proxy> {
    let mut found: Vec<Proxy> = pods
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let running = proxy_runs(p, port);
            if let Some(deleted) = &p.metadata.deletion_timestamp {
                let over = deleted.0.checked_add(GONE_AFTER).unwrap_or(deleted.0) <= now;
                if over || !running {
                    return None;
                }
            }
            Some(Proxy {
                admin: format!("http://{}", any_pod_address(p, port)?),
                running,
            })
        })
        .collect();
    found.sort();
    found
}

/// How long after its `deletionTimestamp` (the end of its grace period) a pod being deleted is
/// taken as ended: the kubelet's last word may take as long to come.
const GONE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the kubelet says a container is waiting when its process has not started (or has
/// ended and not started again; it says so only of a container it is to start); a waiting
/// container with another reason, or none (a state the kubelet could not read), may still run.
const NOT_STARTED: [&str; 16] = [
    "ContainerCreating",
    "PodInitializing",
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "ImageInspectError",
    "InvalidImageName",
    "RegistryUnavailable",
    "SignatureValidationFailed",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "PreCreateHookError",
    "PreStartHookError",
    "PostStartHookError",
];

/// Whether the proxy of `pod` may be running: its container (the one declaring the admin
/// `port`, a native sidecar among them, or any of its regular containers, if none declares it)
/// is running, or waiting for a reason that does not say it has not started. One that has
/// ended, or has not started, holds no table. Pure.
pub fn proxy_runs(pod: &Pod, port: u16) -> bool {
    let declares =
        |c: &&Container| (c.ports.iter().flatten()).any(|p| p.container_port == i32::from(port));
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| &s.containers);
    // Native sidecars: init containers that run beside the others for the pod's life.
    let sidecars = (spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten()))
    .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let proxy = containers.chain(sidecars).find(declares);
    let status = pod.status.as_ref();
    let statuses = status
        .into_iter()
        .flat_map(|s| s.container_statuses.iter().flatten());
    match proxy {
        Some(proxy) => {
            let sidecars = status
                .into_iter()
                .flat_map(|s| s.init_container_statuses.iter());
            (statuses.chain(sidecars.flatten()))
                .filter(|c| c.name == proxy.name)
                .any(may_run)
        }
        None => statuses.into_iter().any(may_run),
    }
}

/// Whether a container, as its status says, may be running. Pure.
fn may_run(c: &ContainerStatus) -> bool {
    let Some(state) = &c.state else {
        return true;
    };
    if state.running.is_some() {
        return true;
    }
    if state.terminated.is_some() {
        return false;
    }
    let reason = state.waiting.as_ref().and_then(|w| w.reason.as_deref());
    !reason.is_some_and(|r| NOT_STARTED.contains(&r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// The time the test looks at the pods.
    const NOW: i64 = 1_800_000_000;

    /// A pod whose container runs, and, if `deleting`, being deleted with its grace period
    /// ending `deleting` seconds from [`NOW`].
    fn pod(phase: &str, ip: Option<&str>, deleting: Option<i64>) -> Pod {
        let running = status("proxy", serde_json::json!({"running": {}}));
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "status": { "phase": phase, "podIP": ip, "containerStatuses": [running] },
        }))
        .unwrap();
        if let Some(after) = deleting {
            let at = Timestamp::from_second(NOW + after).unwrap();
            pod.metadata.deletion_timestamp = Some(Time(at));
        }
        pod
    }

    fn in_state(mut pod: Pod, state: serde_json::Value) -> Pod {
        let statuses = pod.status.as_mut().unwrap().container_statuses.as_mut();
        statuses.unwrap()[0].state = serde_json::from_value(state).unwrap();
        pod
    }

    /// The status of container `name`, in `state`.
    fn status(name: &str, state: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": false,
                           "restartCount": 0, "state": state})
    }

    /// A proxy pod at `ip` whose `proxy` container (declaring the admin port) is in `state`,
    /// beside a sidecar that runs.
    fn with_sidecar(ip: &str, state: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [
                { "name": "mesh", "ports": [{ "containerPort": 15001 }] },
                { "name": "proxy", "ports": [{ "containerPort": 8080 }, { "containerPort": 9901 }] },
            ] },
            "status": { "phase": "Running", "podIP": ip, "containerStatuses": [
                status("mesh", serde_json::json!({"running": {}})),
                status("proxy", state),
            ] },
        }))
        .unwrap()
    }

    /// A proxy pod at `ip` whose proxy is a native sidecar (an init container that runs on,
    /// declaring the admin port) in `state`, beside the service's container, which runs.
    fn native_sidecar(ip: &str, state: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": {
                "initContainers": [
                    { "name": "setup" },
                    { "name": "proxy", "restartPolicy": "Always",
                      "ports": [{ "containerPort": 9901 }] },
                ],
                "containers": [{ "name": "shop", "ports": [{ "containerPort": 8080 }] }],
            },
            "status": {
                "phase": "Running", "podIP": ip,
                "initContainerStatuses": [
                    status("setup", serde_json::json!({"terminated": {"exitCode": 0}})),
                    status("proxy", state),
                ],
                "containerStatuses": [status("shop", serde_json::json!({"running": {}}))],
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_proxy_that_is_a_native_sidecar_runs_while_it_does_not_while_the_service_does() {
        let crashing = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        assert!(!proxy_runs(&native_sidecar("10.0.0.1", crashing), 9901));
        let running = serde_json::json!({"running": {}});
        assert!(proxy_runs(&native_sidecar("10.0.0.1", running), 9901));
        // An init container that runs to its end is no sidecar, whatever it declares.
        let mut pod = native_sidecar("10.0.0.1", serde_json::json!({"running": {}}));
        let spec = pod.spec.as_mut().unwrap();
        spec.init_containers.as_mut().unwrap()[1].restart_policy = None;
        let status = pod.status.as_mut().unwrap();
        status.init_container_statuses.as_mut().unwrap()[1].state =
            serde_json::from_value(serde_json::json!({"terminated": {"exitCode": 0}})).unwrap();
        assert!(
            proxy_runs(&pod, 9901),
            "the pod's own containers are looked at"
        );
        let status = pod.status.as_mut().unwrap();
        status.container_statuses.as_mut().unwrap()[0].state =
            serde_json::from_value(serde_json::json!({"terminated": {"exitCode": 1}})).unwrap();
        assert!(!proxy_runs(&pod, 9901));
    }

    #[test]
    fn the_proxies_are_the_running_pods_with_an_address_running_while_their_proxy_may() {
        let waiting = |reason: &str| serde_json::json!({"waiting": {"reason": reason}});
        let deleting = |ip: &str, after: i64| pod("Running", Some(ip), Some(after));
        let ended = serde_json::json!({"terminated": {"exitCode": 0}});
        let pods = [
            pod("Running", Some("10.0.0.9"), None),
            pod("Running", Some("fd00::7"), None),
            // Being deleted, its proxy still running: it drains on its table.
            deleting("10.0.0.8", 30),
            // Being deleted, its proxy ended, or not started again: gone.
            in_state(deleting("10.0.0.6", 30), ended),
            in_state(deleting("10.0.1.6", 30), waiting("CrashLoopBackOff")),
            // Its grace period over, its status as last told (a node lost): gone.
            deleting("10.0.1.8", -10),
            pod("Pending", Some("10.0.0.7"), None),
            pod("Running", None, None),
            pod("Running", Some("10.0.0.1"), None),
            // The kubelet could not read its state: it may run.
            in_state(
                pod("Running", Some("10.0.1.1"), None),
                serde_json::Value::Null,
            ),
            with_sidecar("10.0.0.2", waiting("CrashLoopBackOff")),
            with_sidecar("10.0.0.3", serde_json::json!({"running": {}})),
            // Waiting, the kubelet not knowing why: it may run.
            with_sidecar("10.0.0.4", serde_json::json!({"waiting": {}})),
            with_sidecar("10.0.0.5", waiting("ContainerCreating")),
        ];
        let now = Timestamp::from_second(NOW).unwrap();
        let found: Vec<_> = proxies(&pods, 9901, now)
            .into_iter()
            .map(|p| (p.admin, p.running))
            .collect();
        assert_eq!(
            found,
            [
                ("http://10.0.0.1:9901".into(), true),
                ("http://10.0.0.2:9901".into(), false),
                ("http://10.0.0.3:9901".into(), true),
                ("http://10.0.0.4:9901".into(), true),
                ("http://10.0.0.5:9901".into(), false),
                ("http://10.0.0.8:9901".into(), true),
                ("http://10.0.0.9:9901".into(), true),
                ("http://10.0.1.1:9901".into(), true),
                ("http://[fd00::7]:9901".into(), true),
            ]
        );
    }

    #[tokio::test]
    async fn listed_proxies_are_told_once_and_taken_as_running() {
        let mut source = ProxySource::Listed(vec!["http://127.0.0.1:9901".into()]);
        assert_eq!(
            source.look().await.unwrap().unwrap(),
            [Proxy::listed("http://127.0.0.1:9901")]
        );
        assert!(source.look().await.is_none());
    }
}
