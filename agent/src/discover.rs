//! Where the region's proxies are: the admin URLs given (`--proxy-admin`), or the pods a label
//! selector picks in the agent's namespace (`--proxy-pods`), watched, so that proxies scaled
//! out, rescheduled or replaced are found as the API tells of them, without editing the
//! agent's settings.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::driver::kubernetes::objects::{pod_address, runs};
use crate::watched::Watched;

/// A proxy the agent puts tables on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proxy {
    /// Its admin URL, e.g. `http://10.2.0.2:9901`.
    pub admin: String,
    /// Whether its process runs: a proxy given by URL is taken as running; a pod runs while
    /// one of its containers does (ready or not: a proxy not ready may still hold a table and
    /// serve the connections it has). One that does not run holds no table and serves
    /// nothing, so no step waits for it.
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
    ) -> Self {
        let pods = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::default_namespaced(client),
        };
        ProxySource::Pods {
            pods: Box::new(pods),
            selector,
            port,
            watched: None,
            told: None,
        }
    }

    /// The proxies, when they changed: the listed ones at the first call, the pods' whenever
    /// they come, go, or start or stop running; `None` when nothing changed. The first look
    /// waits for the pods' first list, up to [`FIRST_LOOK_TIMEOUT`]. A watch the API refuses or leaves unanswered, or failed
    /// lately (for up to `watched::TROUBLE_TOLD_FOR` after, unless a change comes through), or
    /// that shows no running proxy, is an error (told once, until it changes), and the proxies
    /// known stay as they are.
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
                watched,
                told,
            } => {
                let watched = watched.get_or_insert_with(|| {
                    let what = format!("the proxies' pods ({selector})");
                    Arc::new(Watched::start(Api::clone(pods), selector, what))
                });
                if told.is_none() {
                    // Not answered in time: told as such below.
                    let _ = tokio::time::timeout(FIRST_LOOK_TIMEOUT, watched.first_list()).await;
                }
                let found = match watched.trouble().map_or_else(|| watched.objects(), Err) {
                    Ok(listed) => match proxies(listed.iter().map(|p| &**p), *port) {
                        found if found.is_empty() => Err(format!(
                            "no running pod matches the proxies' selector {selector}"
                        )),
                        found => Ok(found),
                    },
                    Err(why) => Err(why),
                };
                if told.as_ref() == Some(&found) {
                    return None;
                }
                *told = Some(found.clone());
                Some(found.map_err(anyhow::Error::msg))
            }
        }
    }
}

/// The proxies of the pods in phase Running, with an address, not being deleted; each
/// running while one of its containers does. Not only the ready ones: a proxy is ready only
/// once it has a table. Sorted. Pure.
pub fn proxies<'p>(pods: impl IntoIterator<Item = &'p Pod>, port: u16) -> Vec<Proxy> {
    let mut found: Vec<Proxy> = pods
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            Some(Proxy {
                admin: format!("http://{}", pod_address(p, port)?),
                running: runs(p),
            })
        })
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(phase: &str, ip: Option<&str>, deleting: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "status": { "phase": phase, "podIP": ip, "containerStatuses": [{
                "name": "fleet-proxy", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"running": {}}}] },
        }))
        .unwrap();
        if deleting {
            pod.metadata.deletion_timestamp = Some(Time(Default::default()));
        }
        pod
    }

    #[test]
    fn the_proxies_are_the_running_pods_with_an_address_running_while_a_container_does() {
        let mut crashing = pod("Running", Some("10.0.0.2"), false);
        let waiting = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        let containers = crashing
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut();
        containers.unwrap()[0].state = Some(serde_json::from_value(waiting).unwrap());
        let pods = [
            pod("Running", Some("10.0.0.9"), false),
            pod("Running", Some("fd00::7"), false),
            pod("Running", Some("10.0.0.8"), true),
            pod("Pending", Some("10.0.0.7"), false),
            pod("Running", None, false),
            pod("Running", Some("10.0.0.1"), false),
            crashing,
        ];
        let found: Vec<_> = proxies(&pods, 9901)
            .into_iter()
            .map(|p| (p.admin, p.running))
            .collect();
        assert_eq!(
            found,
            [
                ("http://10.0.0.1:9901".into(), true),
                ("http://10.0.0.2:9901".into(), false),
                ("http://10.0.0.9:9901".into(), true),
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
