//! `fleetctl agents`: which clusters have their agent connected, and what each last said.

use std::process::ExitCode;

use clap::Args;
use fleet_proto::v1 as pb;

use crate::release::Remote;
use crate::render;
use crate::retry::{Caller, call};
use crate::verbs::Output;

/// Show the agents connected to the controller; with `--service`, every cluster of its fleet,
/// connected or not, and the agents in its regions of clusters it does not name (exit 1 if a
/// cluster has no agent, if an agent's cluster is named by no manifest, or if two agents say
/// they are the same cluster: a check to make before a release).
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  fleetctl agents\n  fleetctl agents --service checkout")]
pub struct Agents {
    /// List the clusters of this service's fleet, each with its agent or without one.
    #[arg(long)]
    service: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

impl Agents {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut caller = self.remote.caller();
        let request = pb::ListAgentsRequest {
            service: self.service.clone().unwrap_or_default(),
        };
        let listed = call!(caller, list_agents, request)?.agents;
        match self.remote.output {
            Output::Json => println!(
                "{}",
                serde_json::Value::Array(listed.iter().map(render::agent_json).collect())
            ),
            Output::Table => {
                let now = chrono::Utc::now().timestamp_millis();
                print!("{}", render::agent_list(&listed, now));
            }
        }
        let doubled = doubled(&listed);
        for line in &doubled {
            eprintln!("{line}");
        }
        let missing = listed.iter().filter(|a| !a.connected).count();
        if missing > 0 {
            eprintln!("{missing} cluster(s) without an agent connected");
        }
        let unnamed = listed.iter().filter(|a| a.unnamed).count();
        if unnamed > 0 {
            eprintln!(
                "{unnamed} agent(s) of a cluster no manifest names, sent no desired state: a \
                 renamed cluster's, or one started with the wrong --region or --cluster"
            );
        }
        match missing > 0 || unnamed > 0 || !doubled.is_empty() {
            true => Ok(ExitCode::from(1)),
            false => Ok(ExitCode::SUCCESS),
        }
    }
}

/// After a release of `service` started: a warning on stderr for each cluster of its fleet
/// that has no agent connected, whose region will wait for one when its wave comes. Nothing
/// if the controller cannot say (one from before `ListAgents`).
pub async fn warn_missing(caller: &Caller, service: &str) {
    let request = pb::ListAgentsRequest {
        service: service.to_string(),
    };
    // One try: the release has started; this is only a warning.
    let mut once = caller.clone().retrying_for(std::time::Duration::ZERO);
    if let Ok(listed) = call!(once, list_agents, request) {
        for warning in missing(&listed.agents, service) {
            eprintln!("{warning}");
        }
    }
}

/// A warning for each cluster in `agents` without an agent connected. Pure.
fn missing(agents: &[pb::Agent], service: &str) -> Vec<String> {
    (agents.iter())
        .filter(|a| !a.connected)
        .map(|a| {
            format!(
                "warning: no agent is connected for cluster {} of region {}: the region waits \
                 for it when its wave comes (`fleetctl agents --service {service}`)",
                a.cluster, a.region
            )
        })
        .collect()
}

/// An error for each cluster that more than one connected agent says it is: both apply the
/// desired state and program the region's proxies. Pure.
fn doubled(agents: &[pb::Agent]) -> Vec<String> {
    let mut count = std::collections::BTreeMap::<(&str, &str), usize>::new();
    for a in agents.iter().filter(|a| a.connected) {
        *count.entry((&a.region, &a.cluster)).or_default() += 1;
    }
    (count.into_iter().filter(|(_, n)| *n > 1))
        .map(|((region, cluster), n)| {
            format!(
                "error: {n} agents say they are cluster {cluster} of region {region}: stop all but \
                 one (a second install, or an old agent still running)"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_two_connected_agents_say_they_are_is_an_error() {
        let agent = |region: &str, cluster: &str, connected| pb::Agent {
            region: region.into(),
            cluster: cluster.into(),
            connected,
            ..Default::default()
        };
        let listed = [
            agent("eu-west", "euw-a", true),
            agent("eu-west", "euw-a", true),
            agent("us-east", "euw-a", true),
            agent("us-east", "use-a", false),
            agent("us-east", "use-a", true),
        ];
        assert_eq!(
            doubled(&listed),
            [
                "error: 2 agents say they are cluster euw-a of region eu-west: stop all but one (a \
              second install, or an old agent still running)"
            ]
        );
    }

    #[test]
    fn each_cluster_without_an_agent_is_warned_of() {
        let agent = |cluster: &str, connected| pb::Agent {
            region: "eu-west".into(),
            cluster: cluster.into(),
            connected,
            ..Default::default()
        };
        let warnings = missing(&[agent("euw-a", true), agent("euw-b", false)], "checkout");
        assert_eq!(
            warnings,
            [
                "warning: no agent is connected for cluster euw-b of region eu-west: the region \
              waits for it when its wave comes (`fleetctl agents --service checkout`)"
            ]
        );
    }
}
