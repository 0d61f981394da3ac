//! `release watch`: every event as it happens; on a terminal, a live bar per region with its
//! canary weight, step, time left and last verdict.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_stream::StreamExt;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::release::{status, told};
use crate::render;
use crate::retry::{Away, NotReached};
use crate::verbs::Output;

/// Follows release `id` until it ends. Exit 0 if it succeeded, 1 if not; an error if it
/// could not be followed to its end ([`NotReached`], exit 3, when the controller stayed away
/// for `reconnect_for`).
///
/// [`NotReached`]: crate::retry::NotReached
///
/// A controller that goes away (a restart, an upgrade, a connection lost) is dialled again
/// for up to `reconnect_for`, and the events go on from the first one not yet printed: a
/// pipeline's release step outlives the controller's restarts, and prints each event once, in
/// order.
pub async fn watch(
    client: &mut ReleaseServiceClient<Channel>,
    id: &str,
    output: Output,
    reconnect_for: Duration,
) -> anyhow::Result<ExitCode> {
    // Bars on a terminal; plain lines when piped.
    let fancy = output == Output::Table && std::io::stdout().is_terminal();
    let mut printer = Printer {
        output,
        bars: fancy.then(Bars::default),
        next: 0,
        lost: None,
    };
    let release = loop {
        let request = pb::WatchRequest {
            id: id.to_string(),
            after_index: printer.next,
        };
        let followed = match client.watch(request).await {
            Ok(events) => printer.follow(events.into_inner(), client, id).await,
            Err(s) => Err(s),
        };
        // The stream ends cleanly once the release has ended and all of it was sent.
        let ended = match followed {
            Ok(()) => client.get_release(get(id)).await.map(|r| r.into_inner()),
            Err(s) => Err(s),
        };
        let why = match ended {
            Ok(r) if TERMINAL.contains(&r.phase.as_str()) => break r,
            Ok(_) => "it ended the stream while the release goes on".to_string(),
            Err(s) if resumable(&s) => told(&s),
            Err(s) => return Err(status(s)),
        };
        let lost = printer.lost.get_or_insert_with(Away::new);
        let (tries, wait) = lost.failed();
        if lost.since.elapsed() >= reconnect_for {
            return Err(NotReached(anyhow::anyhow!(
                "gave up following {id} after {} without the controller (last: {why}); the \
                 release does not depend on this command, and goes on with its controller: \
                 `fleetctl release watch {id}` follows it again",
                humantime::format_duration(reconnect_for)
            ))
            .into());
        }
        // Told once a try again has failed too: a stream cut once (by a load balancer, say)
        // and followed again at once is not worth a word.
        if tries == 2 {
            printer.warn(&format!(
                "lost the controller: {why}; dialling it again for up to {}",
                humantime::format_duration(reconnect_for)
            ));
        }
        tokio::time::sleep(wait).await;
    };
    if let Some(b) = &mut printer.bars {
        b.update(&release);
        b.finish();
    }
    if output == Output::Table {
        print!("{}", render::release_status(&release));
    }
    Ok(if release.phase == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How long to bear with a controller that goes away, unless told.
pub const RECONNECT_FOR: Duration = Duration::from_secs(300);
/// A stream that has brought an event, or stayed open this long, ends a loss: a controller
/// that takes the call and ends it at once (as it stops, say) does not.
const SETTLED: Duration = Duration::from_secs(10);

/// The phases a release ends in.
const TERMINAL: [&str; 2] = ["succeeded", "rolled_back"];

fn get(id: &str) -> pb::GetReleaseRequest {
    pb::GetReleaseRequest { id: id.to_string() }
}

/// Whether following may go on after `s` once the controller is back: not after an answer
/// that another try would only repeat (no such release, a certificate it refuses).
fn resumable(s: &tonic::Status) -> bool {
    use tonic::Code;
    // A certificate refused (expired, revoked, another CA's) is refused again: exit 2 at
    // once, not 3 after --reconnect-for.
    !fleet_proto::connect::tls_failed(s)
        && !matches!(
            s.code(),
            Code::NotFound
                | Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::Unimplemented
                | Code::FailedPrecondition
        )
}

/// Prints a release's events, each once, and keeps its bars.
struct Printer {
    output: Output,
    bars: Option<Bars>,
    /// The index of the next event to print.
    next: u64,
    /// While the controller is away, since when.
    lost: Option<Away>,
}

impl Printer {
    /// Prints the events of one watch stream as they come, until it ends (`Ok`) or fails.
    async fn follow(
        &mut self,
        mut events: Streaming<pb::ReleaseEvent>,
        client: &mut ReleaseServiceClient<Channel>,
        id: &str,
    ) -> Result<(), tonic::Status> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let settled = tokio::time::sleep(SETTLED);
        tokio::pin!(settled);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(e)) => {
                        self.back();
                        self.event(&e);
                    }
                    Some(Err(s)) => return Err(s),
                    None => return Ok(()),
                },
                () = &mut settled, if self.lost.is_some() => self.back(),
                _ = tick.tick(), if self.bars.is_some() => {
                    // A look that fails leaves the bars as they were: the stream tells of a
                    // controller gone.
                    if let (Ok(release), Some(b)) = (client.get_release(get(id)).await, &mut self.bars) {
                        b.update(release.get_ref());
                    }
                }
            }
        }
    }

    /// The controller is back: a loss ends, told to have ended if it was told.
    fn back(&mut self) {
        if self.lost.take().is_some_and(|lost| lost.tries >= 2) {
            self.warn("following the release again");
        }
    }

    /// Prints `e`, unless it was printed already.
    fn event(&mut self, e: &pb::ReleaseEvent) {
        let Some(line) = self.take_line(e) else {
            return;
        };
        match &self.bars {
            Some(b) => b.multi.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// The line to print for `e`, counted as printed: none for an event printed already.
    fn take_line(&mut self, e: &pb::ReleaseEvent) -> Option<String> {
        if e.index < self.next {
            return None;
        }
        self.next = e.index + 1;
        Some(match self.output {
            Output::Json => render::event_json(e).to_string(),
            Output::Table => render::event_line(e),
        })
    }

    /// Tells of the controller on stderr, out of the way of the events.
    fn warn(&self, line: &str) {
        match &self.bars {
            Some(b) => b.multi.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    regions: BTreeMap<String, ProgressBar>,
}

impl Bars {
    fn update(&mut self, release: &pb::Release) {
        let now = chrono::Utc::now().timestamp_millis();
        for g in &release.regions {
            let bar = self.regions.entry(g.region.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(10_000));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>14} [{bar:30.green/white}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(g.region.clone());
                bar
            });
            let done = matches!(g.status.as_str(), "succeeded");
            bar.set_position(if done {
                10_000
            } else {
                u64::from(g.canary_weight_bp)
            });
            // A step's pause stands still while the region waits for it.
            let left = if g.hold_until_ms > now && g.deadline_ms == 0 {
                format!(", {}s left", (g.hold_until_ms - now + 999) / 1000)
            } else {
                String::new()
            };
            let step = if g.steps > 0 && g.status == "active" {
                format!(" step {}/{}{left}", g.step + 1, g.steps)
            } else {
                String::new()
            };
            let verdict = if g.deadline_ms > 0 {
                let left = (g.deadline_ms - now).max(0) / 1000;
                format!(" · not ready, fails in {left}s: {}", short(&g.waiting))
            } else if g.status == "rolling_back" && !g.waiting.is_empty() {
                format!(" · not yet in force: {}", short(&g.waiting))
            } else if g.last_verdict.is_empty() {
                String::new()
            } else {
                format!(" · {}", short(&g.last_verdict))
            };
            // A promoted region runs the new version as its stable one: all of its traffic.
            let share = if done {
                "100%".to_string()
            } else {
                render::percent(g.canary_weight_bp)
            };
            bar.set_message(format!("{share} {}{step}{verdict}", g.status));
        }
    }

    fn finish(&self) {
        for bar in self.regions.values() {
            bar.abandon();
        }
    }
}

/// The verdict's outcome and first numbers, to fit a terminal line.
fn short(verdict: &str) -> String {
    let mut s: String = verdict.chars().take(70).collect();
    if verdict.chars().count() > 70 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_dialled_again_and_an_answer_is_not() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::Cancelled,
        ] {
            assert!(resumable(&tonic::Status::new(code, "cut")), "{code:?}");
        }
        for code in [
            tonic::Code::NotFound,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
        ] {
            assert!(!resumable(&tonic::Status::new(code, "no")), "{code:?}");
        }
    }

    #[test]
    fn an_event_already_printed_is_not_printed_again() {
        let mut printer = Printer {
            output: Output::Json,
            bars: None,
            next: 0,
            lost: None,
        };
        let event = |index| pb::ReleaseEvent {
            index,
            ..Default::default()
        };
        let printed: Vec<u64> = [0, 1, 1, 0, 2]
            .into_iter()
            .filter_map(|index| printer.take_line(&event(index)))
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(&line).unwrap()["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(printed, [0, 1, 2]);
    }
}
