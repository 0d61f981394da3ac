//! Where the region's proxies are: the admin URLs given (`--proxy-admin`), or the pods a label
//! selector picks in the agent's namespace (`--proxy-pods`), watched, so that proxies scaled
//! out, rescheduled or replaced are found as the API tells of them, without editing the
//! agent's settings.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::driver::kubernetes::objects::pod_address;
use crate::watched::Watched;

/// How long the first look waits for the pods' first list (kube-rs sets no read timeout).
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
        told: Option<Result<Vec<String>, String>>,
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

    /// The proxies' admin URLs, when they are new: the listed ones at the first call, the
    /// pods' whenever the running ones change; `None` when nothing changed. The first look
    /// waits for the pods' first list, up to [`FIRST_LOOK_TIMEOUT`]; a watch whose first list
    /// takes longer is made anew. A watch the API refuses or leaves unanswered, or failed
    /// lately (for up to `watched::TROUBLE_TOLD_FOR` after, unless a change comes through), or
    /// that shows no running proxy, is an error (told once, until it changes), and the proxies
    /// known stay as they are.
    pub async fn look(&mut self) -> Option<anyhow::Result<Vec<String>>> {
        match self {
            ProxySource::Listed(urls) => {
                let urls = std::mem::take(urls);
                (!urls.is_empty()).then_some(Ok(urls))
            }
            ProxySource::Pods {
                pods,
                selector,
                port,
                watched,
                told,
            } => {
                if watched
                    .as_ref()
                    .is_some_and(|w| w.stalled(FIRST_LOOK_TIMEOUT))
                {
                    // Its list may hang on a connection that died unseen: made anew.
                    *watched = None;
                }
                let watched = watched.get_or_insert_with(|| {
                    let what = format!("the proxies' pods ({selector})");
                    Arc::new(Watched::start(Api::clone(pods), selector, what))
                });
                if told.is_none() {
                    // Not answered in time: told as such below.
                    let _ = tokio::time::timeout(FIRST_LOOK_TIMEOUT, watched.first_list()).await;
                }
                let found = match watched.trouble().map_or_else(|| watched.objects(), Err) {
                    Ok(listed) => match admin_urls(listed.iter().map(|p| &**p), *port) {
                        urls if urls.is_empty() => Err(format!(
                            "no running pod matches the proxies' selector {selector}"
                        )),
                        urls => Ok(urls),
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

/// The admin URLs of the pods that can take a table: running, with an address, not being
/// deleted. Not only the ready ones: a proxy is ready only once it has a table. Pure.
pub fn admin_urls<'p>(pods: impl IntoIterator<Item = &'p Pod>, port: u16) -> Vec<String> {
    let mut urls: Vec<String> = pods
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| Some(format!("http://{}", pod_address(p, port)?)))
        .collect();
    urls.sort();
    urls
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(phase: &str, ip: Option<&str>, deleting: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "status": { "phase": phase, "podIP": ip },
        }))
        .unwrap();
        if deleting {
            pod.metadata.deletion_timestamp = Some(Time(Default::default()));
        }
        pod
    }

    #[test]
    fn the_proxies_are_the_running_pods_with_an_address() {
        let pods = [
            pod("Running", Some("10.0.0.9"), false),
            pod("Running", Some("fd00::7"), false),
            pod("Running", Some("10.0.0.8"), true),
            pod("Pending", Some("10.0.0.7"), false),
            pod("Running", None, false),
            pod("Running", Some("10.0.0.1"), false),
        ];
        assert_eq!(
            admin_urls(&pods, 9901),
            [
                "http://10.0.0.1:9901",
                "http://10.0.0.9:9901",
                "http://[fd00::7]:9901"
            ]
        );
    }

    #[tokio::test]
    async fn listed_proxies_are_told_once() {
        let mut source = ProxySource::Listed(vec!["http://127.0.0.1:9901".into()]);
        assert_eq!(
            source.look().await.unwrap().unwrap(),
            ["http://127.0.0.1:9901"]
        );
        assert!(source.look().await.is_none());
    }
}
