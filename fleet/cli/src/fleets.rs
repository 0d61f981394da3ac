//! The fleets the controller keeps: `fleetctl fleets` lists them, `fleetctl fleet SERVICE`
//! shows one (with `--manifest`, the manifest as applied), and `fleetctl diff FILE` shows what
//! applying a manifest would change.

use std::process::ExitCode;

use clap::Args;
use fleet_proto::v1 as pb;

use crate::release::{Refused, Remote};
use crate::render;
use crate::retry::call;
use crate::verbs::{Output, print_diagnostics, read, usage_error};

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
        if listed.is_empty() {
            eprintln!("no fleet is applied: `fleetctl apply FILE` applies one");
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Show a fleet: its regions, waves and when it was applied; or its manifest as applied.
///
/// Exits 1 if the controller keeps no fleet for SERVICE, 3 if it could not be asked (the
/// controller not reached).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  fleetctl fleet checkout\n  fleetctl fleet checkout --manifest > checkout.yaml"
)]
pub struct Fleet {
    service: String,
    /// Print the manifest as it was applied, and nothing else (with `--output json`: the
    /// fleet with its `manifest`).
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
        let fleet = match call!(caller, get_fleet, request) {
            Err(e) if not_found(&e) => {
                eprintln!("fleetctl: {e:#}");
                return Ok(ExitCode::from(1));
            }
            fleet => fleet?,
        };
        match (self.manifest, self.remote.output) {
            (true, Output::Table) => print!("{}", fleet.manifest),
            (true, Output::Json) => println!("{}", render::fleet_json_with_manifest(&fleet)),
            (false, Output::Json) => println!("{}", render::fleet_json(&fleet)),
            (false, Output::Table) => print!("{}", render::fleet_status(&fleet, now_ms())),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Show what applying a manifest would change: the manifest as applied against FILE.
///
/// Prints a unified diff on stdout (every line added, against /dev/null, for a fleet not
/// applied yet). Exits 0 if applying FILE would change nothing, 1 if it would, 2 if it could
/// not tell: FILE unreadable or not valid (its diagnostics are printed), 3 if the controller
/// was not reached.
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
        anyhow::ensure!(
            self.remote.output == Output::Table,
            "fleetctl diff prints a unified diff; --output json is not for it"
        );
        let new = read(file)?;
        let service = match fleet::load(&new) {
            Ok(loaded) => loaded.manifest.service.name,
            Err(diags) => {
                print_diagnostics(file, &diags);
                eprintln!(
                    "{file} does not validate (`fleetctl validate {file}`); nothing compared"
                );
                return Ok(usage_error());
            }
        };
        let mut caller = self.remote.caller();
        let request = pb::GetFleetRequest {
            service: service.clone(),
        };
        let (applied, old) = match call!(caller, get_fleet, request) {
            Ok(fleet) => (fleet.manifest, format!("fleet {service}, applied")),
            Err(e) if not_found(&e) => {
                eprintln!(
                    "fleet {service} is not applied: applying {file} makes it (`fleetctl fleets` lists those applied)"
                );
                (String::new(), "/dev/null".to_string())
            }
            Err(e) => return Err(e),
        };
        match unified(&applied, &new, &old, file) {
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

/// Whether `e` is the controller saying it has no such thing.
fn not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().map(|r| r.code) == Some(tonic::Code::NotFound)
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
