//! The manifest verbs: validate, plan, schema.

use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use fleet::Diagnostic;
use fleet::plan::ReleaseRequest;

use crate::plan_table;

/// An emergency's reason: recorded, so not empty.
pub fn reason(s: &str) -> Result<String, String> {
    match s.trim().is_empty() {
        true => Err("an emergency needs its reason, which is recorded: say why".into()),
        false => Ok(s.to_string()),
    }
}

/// Exit code for a manifest that does not validate.
pub fn invalid() -> ExitCode {
    ExitCode::from(1)
}
/// Exit code for a command that could not run as given (bad flags, unreadable file).
pub fn usage_error() -> ExitCode {
    ExitCode::from(2)
}

/// Check manifests and report every problem at once.
///
/// Prints each problem as `file:line:column: severity: field.path: what is wrong; how to fix`
/// on stderr. Exits 0 when every file is valid (warnings allowed), 1 when any is not,
/// 2 on a usage error such as a file that cannot be read.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  fleetctl validate deploy/examples/*.yaml")]
pub struct Validate {
    /// Manifest files to check.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<String>,
}

impl Validate {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut code = ExitCode::SUCCESS;
        let mut unreadable = false;
        for file in &self.files {
            // A file that cannot be read is told, and the others are still checked.
            let src = match read(file) {
                Ok(src) => src,
                Err(e) => {
                    eprintln!("fleetctl: {e:#}");
                    unreadable = true;
                    continue;
                }
            };
            match fleet::load(&src) {
                Ok(loaded) => {
                    print_diagnostics(file, &loaded.warnings);
                    let n = loaded.warnings.len();
                    println!("{file}: valid{}", warnings_note(n));
                }
                Err(diags) => {
                    print_diagnostics(file, &diags);
                    let errors = diags.iter().filter(|d| d.is_error()).count();
                    eprintln!("{file}: invalid: {errors} error{}", plural(errors));
                    code = invalid();
                }
            }
        }
        Ok(match unreadable {
            true => usage_error(),
            false => code,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Show the timeline a release would follow: waves, regions, steps, start times and the share
/// of global users exposed after each step.
///
/// Windows and blackouts delay wave starts; approvals and indefinite pauses are assumed to be
/// passed at once and counted. The summary gives the expected finish and the worst-case
/// exposure before the first automated gate can stop the release.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  fleetctl plan deploy/examples/multi-region-canary.yaml\n  \
    fleetctl plan deploy/examples/linear-berlin-window.yaml --start 2026-11-23T08:00:00Z --output json"
)]
pub struct Plan {
    /// The manifest to plan.
    #[arg(value_name = "FILE")]
    file: String,
    /// When the release starts, as RFC 3339. Default: now.
    #[arg(long, value_name = "RFC3339")]
    start: Option<DateTime<Utc>>,
    /// The version being released.
    #[arg(long, default_value = "new", value_parser = version)]
    version: String,
    /// Plan an emergency release, which ignores windows and blackouts; give the reason.
    #[arg(long, value_name = "REASON", value_parser = reason)]
    emergency: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl Plan {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let src = read(&self.file)?;
        let loaded = match fleet::load(&src) {
            Ok(loaded) => loaded,
            Err(diags) => {
                print_diagnostics(&self.file, &diags);
                return Ok(invalid());
            }
        };
        print_diagnostics(&self.file, &loaded.warnings);
        let request = ReleaseRequest {
            version: self.version,
            emergency: self.emergency,
        };
        let start = self.start.unwrap_or_else(Utc::now);
        let plan = fleet::plan::plan(&loaded.manifest, &request, start)?;
        let text = match self.output {
            Output::Table => plan_table::render(&plan),
            Output::Json => serde_json::to_string_pretty(&plan)? + "\n",
        };
        print!("{text}");
        Ok(ExitCode::SUCCESS)
    }
}

/// Print the JSON Schema of the manifest, for editors (e.g. yaml-language-server).
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  fleetctl schema > fleet.schema.json")]
pub struct Schema {}

impl Schema {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        println!("{}", serde_json::to_string_pretty(&fleet::schema())?);
        Ok(ExitCode::SUCCESS)
    }
}

pub(crate) fn read(file: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))
}

pub(crate) fn print_diagnostics(file: &str, diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{}", d.in_file(file));
    }
}

fn warnings_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} warning{})", plural(n)),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A `--version`, as the controller takes one.
fn version(s: &str) -> Result<String, String> {
    fleet_yaml::check_version("version", s).map(|()| s.to_string())
}
