//! Where the region's proxies are: the admin URLs given (`--proxy-admin`), or the pods a label
//! selector picks in the agent's namespace (`--proxy-pods`), looked up again every
//! [`LOOK_EVERY`], so that proxies scaled out, rescheduled or replaced are found without
//! editing the agent's settings.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::time::Instant;

use crate::driver::kubernetes::objects::pod_address;

/// How often the proxies' pods are looked up.
pub const LOOK_EVERY: Duration = Duration::from_secs(5);
/// A lookup that takes longer is given up (kube-rs sets no read timeout).
const LOOK_TIMEOUT: Duration = Duration::from_secs(5);

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
        /// When to look again; `None` before the first look.
        next: Option<Instant>,
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
            next: None,
        }
    }

    /// The proxies' admin URLs, when it is time to look: the listed ones at the first call,
    /// the pods' every [`LOOK_EVERY`]; `None` in between. A lookup the API refuses or leaves
    /// unanswered, or that finds no running proxy, is an error, and the proxies known stay as
    /// they are.
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
                next,
            } => {
                if next.is_some_and(|at| Instant::now() < at) {
                    return None;
                }
                let params = ListParams::default().labels(selector);
                let list = pods.list(&params);
                let found = match tokio::time::timeout(LOOK_TIMEOUT, list).await {
                    Ok(Ok(list)) => match admin_urls(&list.items, *port) {
                        urls if urls.is_empty() => Err(anyhow::anyhow!(
                            "no running pod matches the proxies' selector {selector}"
                        )),
                        urls => Ok(urls),
                    },
                    Ok(Err(e)) => Err(anyhow::anyhow!(
                        "listing the proxies' pods ({selector}): {e}"
                    )),
                    Err(_) => Err(anyhow::anyhow!(
                        "listing the proxies' pods ({selector}): no answer within {LOOK_TIMEOUT:?}"
                    )),
                };
                // From the end of this look, so that an API that does not answer costs the
                // loop one wait in every few seconds, not one every pass.
                *next = Some(Instant::now() + LOOK_EVERY);
                Some(found)
            }
        }
    }
}

/// The admin URLs of the pods that can take a table: running, with an address, not being
/// deleted. Not only the ready ones: a proxy is ready only once it has a table. Pure.
pub fn admin_urls(pods: &[Pod], port: u16) -> Vec<String> {
    let mut urls: Vec<String> = pods
        .iter()
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
