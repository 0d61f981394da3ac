//! `fleetctl`: the Fleet command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetctl::retry::NotReached;
use fleetctl::{agents, certs, demo, fleets, release, verbs};

/// Validate and plan fleet manifests; start, follow and steer releases.
#[derive(Parser, Debug)]
#[command(
    name = "fleetctl",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 done (a release followed to its end succeeded; a manifest is valid); \
                  1 not (the release failed or rolled back; the manifest is not valid; `diff`: \
                  it would change something; `fleet`: no fleet kept for the service; `agents`: \
                  a cluster without its agent); 2 refused, or could not run as given (the message \
                  says why: trying again changes nothing); 3 the controller was not reached, or \
                  stayed away, for --retry-for or --reconnect-for (the message says whether a \
                  change was made): the same command may succeed once it is back."
)]
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
    catch_output_errors();
    // A panic unwinds out of the verb (what it started, a demo's processes, is dropped and so
    // ended) before an output error is told.
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(code) => code,
        Err(panic) => match output_failure(panic.as_ref()) {
            Some(why) => output_failed(why),
            None => std::panic::resume_unwind(panic),
        },
    }
}

/// Why writing to stdout failed, if `panic` is `print!`'s on failing to.
fn output_failure(panic: &(dyn std::any::Any + Send)) -> Option<&str> {
    let said = (panic.downcast_ref::<String>().map(String::as_str))
        .or_else(|| panic.downcast_ref::<&str>().copied());
    said?.strip_prefix("failed printing to stdout: ")
}

/// The end of a run whose output could not be written: quiet, as a program ended by
/// SIGPIPE, when the reader stopped reading (`| head`); else told in a line.
fn output_failed(why: &str) -> ExitCode {
    if why.starts_with("Broken pipe") {
        return ExitCode::from(141);
    }
    eprintln!("fleetctl: cannot write its output: {why}");
    ExitCode::FAILURE
}

/// `print!` panics when stdout cannot be written (a pipe whose reader has gone, a full disk):
/// such a panic is left for `main` to tell in a line, rather than told with a backtrace.
fn catch_output_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if output_failure(info.payload()).is_none() {
            default(info);
        }
    }));
}

fn run(cli: Cli) -> ExitCode {
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
            match e.downcast_ref::<NotReached>() {
                Some(_) => ExitCode::from(NotReached::EXIT_CODE),
                None => verbs::usage_error(),
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
