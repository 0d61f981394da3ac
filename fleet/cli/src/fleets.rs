//! The fleets the controller keeps: `fleetctl fleets` lists them, `fleetctl fleet SERVICE`
//! shows one (with `--manifest`, the manifest as applied), and `fleetctl diff FILE` shows what
//! applying a manifest would change.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use fleet_proto::v1 as pb;

use crate::release::{Refused, Remote};
use crate::render;
use crate::retry::call;
use crate::verbs::{Output, invalid, usage_error};

/// List the fleets the controller keeps.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  fleetctl fleets")]
pub struct Fleets {
    #[command(flatten)]
    remote: Remote,
}

impl Fleets {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut caller = self.remote.caller();
        let listed = call!(caller, list_fleets, pb::ListFleetsRequest {})?.fleets;
        match self.remote.output {
            Output::Json => println!(
                "{}",
                serde_json::Value::Array(listed.iter().map(render::fleet_json).collect())
            ),
            Output::Table => print!("{}", render::fleet_list(&listed, now_ms())),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Show a fleet: its regions, waves and when it was applied; or its manifest as applied.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  fleetctl fleet checkout\n  fleetctl fleet checkout --manifest > checkout.yaml"
)]
pub struct Fleet {
    service: String,
    /// Print the manifest as it was applied, and nothing else.
    #[arg(long)]
    manifest: bool,
    #[command(flatten)]
    remote: Remote,
}

impl Fleet {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut caller = self.remote.caller();
        let request = pb::GetFleetRequest {
            service: self.service.clone(),
        };
        let fleet = call!(caller, get_fleet, request)?;
        match (self.manifest, self.remote.output) {
            (true, Output::Table) => print!("{}", fleet.manifest),
            (true, Output::Json) => println!("{}", render::fleet_json_with_manifest(&fleet)),
            (false, Output::Json) => println!("{}", render::fleet_json(&fleet)),
            (false, Output::Table) => print!("{}", render::fleet_status(&fleet, now_ms())),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Show what applying a manifest would change: the manifest as applied against FILE, as a
/// unified diff. Exits 0 if they are the same, 1 if they differ (or the fleet is not applied
/// yet, or FILE does not validate: its diagnostics are printed), 2 if it could not tell.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  fleetctl diff deploy/examples/multi-region-canary.yaml && echo unchanged"
)]
pub struct Diff {
    #[arg(value_name = "FILE")]
    file: String,
    #[command(flatten)]
    remote: Remote,
}

impl Diff {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let file = &self.file;
        let new = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        let service = match fleet::load(&new) {
            Ok(loaded) => loaded.manifest.service.name,
            Err(diags) => {
                for d in &diags {
                    eprintln!("{}", d.in_file(file));
                }
                eprintln!("{file}: invalid: the controller would refuse it; nothing to compare");
                return Ok(invalid());
            }
        };
        let mut caller = self.remote.caller();
        let request = pb::GetFleetRequest {
            service: service.clone(),
        };
        let applied = match call!(caller, get_fleet, request) {
            Ok(fleet) => fleet,
            Err(e)
                if e.downcast_ref::<Refused>().map(|r| r.code) == Some(tonic::Code::NotFound) =>
            {
                println!("fleet {service} is not applied: applying {file} makes it");
                return Ok(ExitCode::from(1));
            }
            Err(e) => {
                eprintln!("fleetctl: {e:#}");
                return Ok(usage_error());
            }
        };
        let old = format!("fleet {service}, applied");
        match unified(&applied.manifest, &new, &old, file) {
            None => Ok(ExitCode::SUCCESS),
            Some(diff) => {
                print!("{diff}");
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// `old` against `new`, line by line, as a unified diff with three lines of context; `None`
/// if they are the same. Pure.
fn unified(old: &str, new: &str, old_name: &str, new_name: &str) -> Option<String> {
    if old == new {
        return None;
    }
    let diff = similar::TextDiff::from_lines(old, new);
    Some(
        diff.unified_diff()
            .context_radius(3)
            .header(old_name, new_name)
            .to_string(),
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_shows_each_line_changed_with_its_context() {
        let old = "a: 1\nb: 2\nc: 3\n";
        assert_eq!(unified(old, old, "applied", "new.yaml"), None);
        let new = "a: 1\nb: 20\nc: 3\n";
        let diff = unified(old, new, "applied", "new.yaml").unwrap();
        expect_test::expect![[r#"
            --- applied
            +++ new.yaml
            @@ -1,3 +1,3 @@
             a: 1
            -b: 2
            +b: 20
             c: 3
        "#]]
        .assert_eq(&diff);
    }
}
