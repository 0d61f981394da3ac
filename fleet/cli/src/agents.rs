//! `fleetctl agents`: which clusters have their agent connected, and what each last said.

use std::process::ExitCode;

use clap::Args;
use fleet_proto::v1 as pb;

use crate::release::{Remote, status};
use crate::render;
use crate::verbs::Output;

/// Show the agents connected to the controller; with `--service`, every cluster of its fleet,
/// connected or not (exit 1 if one is not: a check to make before a release).
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
        let mut client = self.remote.connect().await?;
        let listed = client
            .list_agents(pb::ListAgentsRequest {
                service: self.service.clone().unwrap_or_default(),
            })
            .await
            .map_err(status)?
            .into_inner()
            .agents;
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
        let missing = listed.iter().filter(|a| !a.connected).count();
        if missing > 0 {
            eprintln!("{missing} cluster(s) without an agent connected");
            return Ok(ExitCode::from(1));
        }
        Ok(ExitCode::SUCCESS)
    }
}
