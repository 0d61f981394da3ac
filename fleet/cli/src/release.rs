//! The verbs that talk to a controller: `apply` and `release ...`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleet_proto::connect::ClientTls;
use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use tonic::transport::Channel;

use crate::retry::{self, Caller, call};
use crate::verbs::Output;
use crate::{progress, render};

#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// The controller's gRPC URL.
    #[arg(
        long,
        global = true,
        env = "FLEET_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub controller: String,
    /// For an `https://` controller: PEM CA that signed its certificate. Default: the
    /// system's roots.
    #[arg(long, global = true, env = "FLEET_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// For a controller that asks for one (mutual TLS): your PEM certificate.
    #[arg(long, global = true, env = "FLEET_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, global = true, env = "FLEET_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// How to print answers: a table for people, or JSON for scripts (a document for each
    /// answer; `release history` and `release watch` print one JSON object a line, as events
    /// come). `diff` prints a unified diff either way and refuses json.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Bear with a controller that is away for a moment (the connection refused, reset or
    /// timed out; a call cut, or answered UNAVAILABLE: restarting, or handing its lead to
    /// another) for this long from the first try: the call is made again, a change with the
    /// same request id, which the controller makes at most once. A refusal, a certificate
    /// refused or a name that does not resolve is not tried again. 0s: fail at once.
    #[arg(
        long,
        global = true,
        env = "FLEET_RETRY_FOR",
        value_name = "DURATION",
        default_value_t = retry::RETRY_FOR.into(),
        value_parser = duration
    )]
    pub retry_for: humantime::Duration,
    /// The id of the change this command makes (a start, an apply, a promote…): the same
    /// command run again with the same id is answered as the first was, never made twice, for
    /// a day (a pipeline's job id, say); the same verb given the id with other arguments is
    /// refused (ids are each verb's own). Give each change its own. Default: a new one each
    /// run.
    #[arg(long, global = true, env = "FLEET_REQUEST_ID", value_name = "ID")]
    pub request_id: Option<String>,
}

impl Remote {
    /// A caller of the controller these flags name.
    pub fn caller(&self) -> Caller {
        Caller::new(&self.controller, self.tls(), self.retry_for.into())
    }

    /// The request id of the change this command makes: `--request-id`, or a new one.
    pub fn request_id(&self) -> String {
        self.request_id.clone().unwrap_or_else(request_id)
    }

    fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// Store a fleet manifest in the controller (validated first; nothing changes if it is invalid).
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  fleetctl apply deploy/examples/multi-region-canary.yaml --controller http://127.0.0.1:7070"
)]
pub struct Apply {
    #[arg(value_name = "FILE")]
    file: String,
    #[command(flatten)]
    remote: Remote,
}

/// Start, follow and steer releases.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  fleetctl release start checkout v2\n  fleetctl release start checkout v2 --watch\n  fleetctl release watch checkout-1\n  fleetctl release promote checkout-1"
)]
pub struct Release {
    #[command(subcommand)]
    verb: ReleaseVerb,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Subcommand, Debug)]
enum ReleaseVerb {
    /// Start releasing VERSION of SERVICE through its waves.
    Start {
        service: String,
        version: String,
        /// Override windows and blackouts; the reason is recorded.
        #[arg(long, value_name = "REASON", value_parser = crate::verbs::reason)]
        emergency: Option<String>,
        /// End a release of the service that is still running (its regions sent back to the
        /// stable version, and carried on by this one), then start this one.
        #[arg(long)]
        supersede: bool,
        /// The version running now, for the first release of a service.
        #[arg(long = "from", value_name = "VERSION")]
        from_version: Option<String>,
        /// A file with a strategy, as the manifest writes one, to use for every region of this
        /// release instead of the manifest's.
        #[arg(long = "strategy", value_name = "FILE")]
        strategy: Option<String>,
        /// Then follow it until it ends, as `release watch` does: exit 0 if it succeeded, 1
        /// if not, 2 if the start was refused, 3 if the controller stayed away longer than
        /// --reconnect-for (for a pipeline whose step is the release).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        follow: Follow,
    },
    /// List releases.
    List {
        #[arg(long)]
        service: Option<String>,
    },
    /// Show a release: phase, wave, and every region's step and last verdict.
    Status { id: String },
    /// Follow a release live until it ends; exits 0 if it succeeded, 1 if not, 3 if the
    /// controller stayed away longer than --reconnect-for (2: no such release).
    Watch {
        id: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Every event of a release, with its actor, reason and numbers.
    History { id: String },
    /// Pass the current gate: an approval, a bake, or the step of every region at a step in
    /// force (applied and ready; a step not yet in force is not passed unseen).
    ///
    /// With --gate, pass that gate or nothing: a promote made twice (a retried job, a double
    /// click) then passes one gate, not two. `release status` names the gate the release
    /// waits at.
    Promote {
        #[command(flatten)]
        steer: Steer,
        /// The gate to pass, as `release status` names it: approval:WAVE, bake:WAVE or
        /// step:REGION=N,…; refused (exit 2, naming the gate the release waits at) if the
        /// release waits at another.
        #[arg(long, value_name = "GATE", value_parser = gate)]
        gate: Option<String>,
    },
    /// Hold the release where it is: no step, bake or wave moves on until resume. Analysis
    /// goes on, and a failing check is acted on as the manifest's on_failure says.
    Pause(Steer),
    /// Carry on after a pause.
    Resume(Steer),
    /// Roll every region the release reached back to the stable version.
    ///
    /// These four are refused (exit 2, saying why) when they would change nothing: on a
    /// release that has ended, a pause of a paused one, a resume of one not paused, an abort
    /// of one rolling back, a promote with no gate to pass yet.
    Abort(Steer),
}

/// How a command that follows a release bears with a controller that goes away.
#[derive(Args, Debug)]
struct Follow {
    /// While following, dial a controller that went away (a restart, a lost connection) again
    /// for this long before giving up; the events go on where they stopped.
    #[arg(
        long,
        value_name = "DURATION",
        default_value_t = progress::RECONNECT_FOR.into(),
        value_parser = duration
    )]
    reconnect_for: humantime::Duration,
}

impl Follow {
    /// Follows release `id` as `release watch` does.
    async fn watch(&self, caller: &Caller, id: &str, output: Output) -> anyhow::Result<ExitCode> {
        // Bearing with a controller away from the start as from then on: `--reconnect-for`
        // bounds the whole wait for one that is down.
        let reconnect_for = self.reconnect_for.into();
        let mut dialling = caller
            .clone()
            .bearing_with(reconnect_for, "--reconnect-for");
        let mut client = dialling.client().await?;
        progress::watch(&mut client, id, output, reconnect_for).await
    }
}

/// A duration flag, read as the manifest reads durations (no months or years, at most 30
/// days).
/// `--gate`'s value: not empty (an unset variable in `--gate "$GATE"` would otherwise pass
/// whatever gate the release waits at); the controller reads the rest.
fn gate(s: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err(
            "an empty gate names none: give the gate `fleetctl release status` names \
             (approval:WAVE, bake:WAVE or step:REGION=N,…), or leave --gate out to pass \
             whatever gate the release waits at"
                .into(),
        ),
        _ => Ok(s.to_string()),
    }
}

fn duration(s: &str) -> Result<humantime::Duration, String> {
    fleet::duration(s).map(Into::into)
}

#[derive(Args, Debug)]
struct Steer {
    id: String,
    /// Why; recorded in the history.
    #[arg(long, default_value = "")]
    reason: String,
}

pub async fn connect(url: &str, tls: &ClientTls) -> anyhow::Result<ReleaseServiceClient<Channel>> {
    let channel = fleet_proto::connect::channel(url, tls).await?;
    Ok(ReleaseServiceClient::new(channel))
}

/// `e`, its diagnostics of the strategy override (which the controller names
/// `strategy_override`) pointing into `file`, the file it was read from.
fn in_file(e: anyhow::Error, file: Option<&str>) -> anyhow::Error {
    match file {
        Some(file) => {
            let said = format!("{e:#}").replace("strategy_override:", &format!("{file}:"));
            anyhow::anyhow!(said)
        }
        None => e,
    }
}

/// A fresh id for a mutating request.
pub fn request_id() -> String {
    format!("fleetctl-{:016x}", rand::random::<u64>())
}

pub fn actor() -> String {
    std::env::var("USER").unwrap_or_else(|_| "fleetctl".into())
}

impl Apply {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let manifest = std::fs::read_to_string(&self.file)
            .with_context(|| format!("cannot read {}", self.file))?;
        let max = fleet_proto::MAX_MANIFEST_BYTES;
        anyhow::ensure!(
            manifest.len() <= max,
            "{} is {} bytes: a controller takes a manifest of at most {max} bytes (1 MiB)",
            self.file,
            manifest.len()
        );
        // Checked here first, as `validate` checks it: its diagnostics then name the file,
        // and an invalid file exits 1 without a word to the controller.
        if let Err(diags) = fleet::load(&manifest) {
            crate::verbs::print_diagnostics(&self.file, &diags);
            let errors = diags.iter().filter(|d| d.is_error()).count();
            eprintln!("{}: invalid: {errors} error(s); nothing applied", self.file);
            return Ok(crate::verbs::invalid());
        }
        let change = self.remote.request_id();
        let mut changing = self.remote.caller().changing(&change);
        let response = call!(
            changing,
            apply_fleet,
            pb::ApplyFleetRequest {
                request_id: change.clone(),
                manifest,
            }
        )?;
        for w in &response.warnings {
            eprintln!(
                "{}:{}:{}: warning: {}: {}; {}",
                self.file, w.line, w.column, w.path, w.message, w.help
            );
        }
        let fleet = response.fleet.unwrap_or_default();
        match self.remote.output {
            Output::Json => {
                let mut applied = render::fleet_json(&fleet);
                applied["warnings"] = render::diagnostics_json(&response.warnings);
                println!("{applied}")
            }
            Output::Table => println!(
                "applied fleet {} (waves: {})",
                fleet.service,
                fleet.waves.join(" → ")
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Release {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut caller = self.remote.caller();
        let change = self.remote.request_id();
        let mut changing = caller.clone().changing(&change);
        let output = self.remote.output;
        let steer = |s: &Steer| pb::OperatorRequest {
            request_id: change.clone(),
            id: s.id.clone(),
            actor: actor(),
            reason: s.reason.clone(),
            gate: String::new(),
        };
        let release = match self.verb {
            ReleaseVerb::Start {
                service,
                version,
                emergency,
                supersede,
                from_version,
                strategy,
                watch,
                follow,
            } => {
                let strategy_override = match &strategy {
                    Some(file) => std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read {file}"))?,
                    None => String::new(),
                };
                let started = call!(
                    changing,
                    start_release,
                    pb::StartReleaseRequest {
                        request_id: change.clone(),
                        service,
                        version,
                        emergency_reason: emergency.unwrap_or_default(),
                        supersede,
                        actor: actor(),
                        from_version: from_version.unwrap_or_default(),
                        strategy_override,
                    }
                )
                .map_err(|e| in_file(e, strategy.as_deref()))?;
                crate::agents::warn_missing(&caller, &started.service).await;
                if watch {
                    if output == Output::Table {
                        println!("started {}", started.id);
                    }
                    return follow.watch(&caller, &started.id, output).await;
                }
                started
            }
            ReleaseVerb::List { service } => {
                let list = call!(
                    caller,
                    list_releases,
                    pb::ListReleasesRequest {
                        service: service.unwrap_or_default(),
                    }
                )?;
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::Value::Array(
                            list.releases.iter().map(render::release_json).collect()
                        )
                    ),
                    Output::Table => print!("{}", render::release_list(&list.releases)),
                }
                return Ok(ExitCode::SUCCESS);
            }
            ReleaseVerb::Status { id } => call!(caller, get_release, pb::GetReleaseRequest { id })?,
            ReleaseVerb::Watch { id, follow } => {
                return follow.watch(&caller, &id, output).await;
            }
            ReleaseVerb::History { id } => {
                let history = call!(caller, history, pb::HistoryRequest { id })?;
                for e in &history.events {
                    match output {
                        Output::Json => println!("{}", render::event_json(e)),
                        Output::Table => println!("{}", render::event_line(e)),
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            ReleaseVerb::Promote { steer: s, gate } => {
                let request = pb::OperatorRequest {
                    gate: gate.unwrap_or_default(),
                    ..steer(&s)
                };
                call!(changing, promote, request)?
            }
            ReleaseVerb::Pause(s) => call!(changing, pause, steer(&s))?,
            ReleaseVerb::Resume(s) => call!(changing, resume, steer(&s))?,
            ReleaseVerb::Abort(s) => call!(changing, abort, steer(&s))?,
        };
        match output {
            Output::Json => println!("{}", render::release_json(&release)),
            Output::Table => print!("{}", render::release_status(&release)),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// A controller's refusal, as the user should read it. A call cut below gRPC (the connection
/// closed or reset: a controller that asks for a client certificate closes it on a client
/// without one) is not the controller's answer, and is told as such; nor is a controller
/// that says it is unavailable (stopping, or starting over).
pub fn status(s: tonic::Status) -> anyhow::Error {
    // A status made from a transport error carries it as its source (a TLS alert, a reset);
    // one the controller answered has none.
    let cut = std::error::Error::source(&s).is_some() || s.code() == tonic::Code::Cancelled;
    let why = told(&s);
    match (cut, s.code()) {
        (true, _) => {
            let hint = match fleet_proto::connect::spoke_tls(&s) {
                true => fleet_proto::connect::SPOKE_TLS,
                false => fleet_proto::connect::HINT,
            };
            anyhow::anyhow!("the connection to the controller failed: {why} ({hint})")
        }
        (false, _) if fleet_proto::connect::not_grpc(&s) => {
            anyhow::anyhow!("{} ({why})", fleet_proto::connect::NOT_GRPC)
        }
        (false, tonic::Code::Unavailable) => {
            anyhow::anyhow!("the controller is unavailable: {why}")
        }
        (false, code) => anyhow::Error::new(Refused {
            code,
            said: format!("the controller refused: {why}"),
        }),
    }
}

/// The controller's refusal of a call, as [`status`] tells it, with its code.
#[derive(Debug)]
pub struct Refused {
    pub code: tonic::Code,
    said: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.said)
    }
}

impl std::error::Error for Refused {}

/// A status's message and the errors beneath it, each said once (a transport error's sources
/// often repeat its words).
pub fn told(s: &tonic::Status) -> String {
    fleet_proto::connect::said_once(s.message().to_owned(), std::error::Error::source(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategy_overrides_diagnostics_point_into_its_file() {
        let said = "strategy_override:1:24: error: linear.step_weight: step_weight 60% is above max_weight 50%";
        let e = in_file(anyhow::anyhow!(said), Some("fast.yaml"));
        assert!(
            format!("{e:#}").starts_with("fast.yaml:1:24: error: linear.step_weight"),
            "{e:#}"
        );
        let e = in_file(anyhow::anyhow!(said), None);
        assert_eq!(format!("{e:#}"), said);
    }
}
