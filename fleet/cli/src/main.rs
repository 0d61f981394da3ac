//! `fleetctl`: the Fleet command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetctl::{agents, certs, demo, fleets, release, verbs};

/// Validate and plan fleet manifests; start, follow and steer releases.
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
    Apply(release::Apply),
    Diff(fleets::Diff),
    Fleets(fleets::Fleets),
    Fleet(fleets::Fleet),
    Release(release::Release),
    Agents(agents::Agents),
    Demo(demo::Demo),
    Certs(certs::Certs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Validate(v) => v.run(),
        Verb::Plan(p) => p.run(),
        Verb::Schema(s) => s.run(),
        Verb::Apply(a) => runtime().and_then(|rt| rt.block_on(a.run())),
        Verb::Diff(d) => runtime().and_then(|rt| rt.block_on(d.run())),
        Verb::Fleets(f) => runtime().and_then(|rt| rt.block_on(f.run())),
        Verb::Fleet(f) => runtime().and_then(|rt| rt.block_on(f.run())),
        Verb::Release(r) => runtime().and_then(|rt| rt.block_on(r.run())),
        Verb::Agents(a) => runtime().and_then(|rt| rt.block_on(a.run())),
        Verb::Demo(d) => runtime().and_then(|rt| rt.block_on(d.run())),
        Verb::Certs(c) => c.run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetctl: {e:#}");
            verbs::usage_error()
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
