//! `release watch`: every event as it happens; on a terminal, a live bar per region with its
//! canary weight, step, time left and last verdict.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::release::status;
use crate::render;
use crate::verbs::Output;

/// Follows release `id` until it ends. Exit 0 if it succeeded, 1 if not.
pub async fn watch(
    client: &mut ReleaseServiceClient<Channel>,
    id: &str,
    output: Output,
    fancy: bool,
) -> anyhow::Result<ExitCode> {
    let mut events = client
        .watch(pb::WatchRequest {
            id: id.to_string(),
            after_index: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut bars = fancy.then(Bars::default);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e)) => {
                    let line = match output {
                        Output::Json => render::event_json(&e).to_string(),
                        Output::Table => render::event_line(&e),
                    };
                    match &bars {
                        Some(b) => b.multi.suspend(|| println!("{line}")),
                        None => println!("{line}"),
                    }
                }
                Some(Err(s)) => return Err(status(s)),
                None => break,
            },
            _ = tick.tick(), if bars.is_some() => {
                let release = client.get_release(pb::GetReleaseRequest { id: id.to_string() }).await.map_err(status)?.into_inner();
                if let Some(b) = &mut bars {
                    b.update(&release);
                }
            }
        }
    }
    let release = client
        .get_release(pb::GetReleaseRequest { id: id.to_string() })
        .await
        .map_err(status)?
        .into_inner();
    if let Some(b) = &mut bars {
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
