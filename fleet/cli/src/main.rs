//! `fleetctl`: the Fleet command line.

mod plan_table;
mod verbs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Validate and plan fleet manifests.
#[derive(Parser, Debug)]
#[command(name = "fleetctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    Validate(verbs::Validate),
    Plan(verbs::Plan),
    Schema(verbs::Schema),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Validate(v) => v.run(),
        Verb::Plan(p) => p.run(),
        Verb::Schema(s) => s.run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetctl: {e:#}");
            verbs::usage_error()
        }
    }
}
