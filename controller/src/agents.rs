//! `ListAgents` (pure): the agents connected now, or every cluster of a fleet with its agent
//! or without one.

use std::collections::BTreeMap;

use fleet::Manifest;
use fleet_proto::v1 as pb;

use crate::runtime::Agent;

/// Every agent connected now, by region and cluster, each marked `unnamed` if `named` says no
/// manifest names it; with `fleet`, every cluster of its manifest instead, in its order, each
/// with its agents (two, if two agents from before `Hello.instance` say they are it) or a row without one, and after them the
/// agents in its regions whose cluster it does not name (a release under way may still name
/// it).
pub fn list(
    agents: &BTreeMap<u64, Agent>,
    fleet: Option<&Manifest>,
    named: impl Fn(&Agent) -> bool,
) -> Vec<pb::Agent> {
    let info = |a: &Agent| pb::Agent {
        unnamed: !named(a),
        ..info(a)
    };
    let Some(manifest) = fleet else {
        let mut all: Vec<pb::Agent> = agents.values().map(info).collect();
        all.sort_by(|a, b| (&a.region, &a.cluster).cmp(&(&b.region, &b.cluster)));
        return all;
    };
    let mut listed = Vec::new();
    for (region, cluster) in clusters(manifest) {
        let before = listed.len();
        listed.extend(agents.values().filter(|a| is(a, region, cluster)).map(info));
        if listed.len() == before {
            listed.push(pb::Agent {
                region: region.to_string(),
                cluster: cluster.to_string(),
                ..Default::default()
            });
        }
    }
    let strays = (agents.values())
        .filter(|a| manifest.region(&a.region).is_some())
        .filter(|a| !names(manifest, &a.region, &a.cluster));
    listed.extend(strays.map(info));
    listed
}

/// Every cluster of `manifest`, in its order: its region, and the name its agent says.
fn clusters(manifest: &Manifest) -> impl Iterator<Item = (&str, &str)> {
    (manifest.regions.iter()).flat_map(|r| {
        r.clusters
            .iter()
            .map(|c| (r.name.as_str(), c.agent.as_str()))
    })
}

/// Whether `manifest` names the agent that says it is `cluster` in `region`. Pure.
pub(crate) fn names(manifest: &Manifest, region: &str, cluster: &str) -> bool {
    (manifest.region(region)).is_some_and(|r| r.clusters.iter().any(|c| c.agent == cluster))
}

/// Whether `a` is the agent of `cluster` in `region`.
fn is(a: &Agent, region: &str, cluster: &str) -> bool {
    a.region == region && a.cluster == cluster
}

/// The driver an agent's hello names among its capabilities (`driver:kubernetes`).
pub fn driver(capabilities: &[String]) -> &str {
    (capabilities.iter())
        .find_map(|c| c.strip_prefix(fleet_proto::DRIVER_CAPABILITY))
        .unwrap_or_default()
}

/// How many clusters of each fleet (by service) have no agent connected now.
pub fn missing<'f>(
    fleets: impl IntoIterator<Item = (&'f String, &'f Manifest)>,
    agents: &BTreeMap<u64, Agent>,
) -> Vec<(&'f str, usize)> {
    (fleets.into_iter())
        .map(|(service, manifest)| {
            let without = clusters(manifest)
                .filter(|(region, cluster)| !agents.values().any(|a| is(a, region, cluster)))
                .count();
            (service.as_str(), without)
        })
        .collect()
}

fn info(a: &Agent) -> pb::Agent {
    let status = a.status.clone().unwrap_or_default();
    pb::Agent {
        region: a.region.clone(),
        cluster: a.cluster.clone(),
        connected: true,
        agent_version: a.version.clone(),
        driver: a.driver.clone(),
        connected_at_ms: a.connected_at_ms,
        reported_at_ms: a.reported_at_ms,
        release_id: status.release_id,
        applied_seq: status.applied_seq,
        ready: status.ready,
        detail: status.detail,
        unnamed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(region: &str, cluster: &str, status: Option<pb::AgentStatus>) -> Agent {
        Agent {
            region: region.into(),
            cluster: cluster.into(),
            tx: tokio::sync::mpsc::unbounded_channel().0,
            status,
            version: "0.1.0".into(),
            driver: driver(&["proxy:fleet-proxy".into(), "driver:kubernetes".into()]).into(),
            instance: format!("host/1/{cluster}"),
            connected_at_ms: 1_000,
            reported_at_ms: 2_000,
            sent: None,
        }
    }

    fn rows(listed: &[pb::Agent]) -> Vec<(&str, &str, bool)> {
        (listed.iter())
            .map(|a| (a.region.as_str(), a.cluster.as_str(), a.connected))
            .collect()
    }

    #[test]
    fn a_fleets_clusters_are_listed_in_its_order_with_their_agents_or_without() {
        let manifest = fleet::load(include_str!("../../deploy/examples/quick.yaml"))
            .unwrap()
            .manifest;
        let ready = pb::AgentStatus {
            release_id: "demo-1".into(),
            applied_seq: 3,
            ready: true,
            ..Default::default()
        };
        let agents = BTreeMap::from([
            (1, agent("us-east", "use-a", None)),
            (2, agent("us-west", "usw-a", Some(ready))),
            // Not the fleet's: left out of its list.
            (3, agent("ap-south", "aps-a", None)),
            // In its region, of a cluster it does not name (renamed, say): listed last.
            (4, agent("us-west", "usw-old", None)),
        ]);
        let named = |a: &Agent| a.cluster != "usw-old";
        let listed = list(&agents, Some(&manifest), named);
        assert_eq!(
            rows(&listed),
            [
                ("us-west", "usw-a", true),
                ("us-east", "use-a", true),
                ("eu-west", "euw-a", false),
                ("us-west", "usw-old", true)
            ]
        );
        let unnamed: Vec<bool> = listed.iter().map(|a| a.unnamed).collect();
        assert_eq!(unnamed, [false, false, false, true]);
        let west = &listed[0];
        assert_eq!(
            (west.driver.as_str(), west.release_id.as_str()),
            ("kubernetes", "demo-1")
        );
        assert_eq!((west.applied_seq, west.ready), (3, true));
        assert_eq!((west.connected_at_ms, west.reported_at_ms), (1_000, 2_000));
        let service = "demo".to_string();
        assert_eq!(missing([(&service, &manifest)], &agents), [("demo", 1)]);
        let all = list(&agents, None, named);
        assert_eq!(
            rows(&all),
            [
                ("ap-south", "aps-a", true),
                ("us-east", "use-a", true),
                ("us-west", "usw-a", true),
                ("us-west", "usw-old", true)
            ]
        );
        assert!(all[3].unnamed && !all[2].unnamed);
    }
}
