//! The agent's admin HTTP listener (`--admin`): `/healthz` (the reconcile loop goes round: a
//! liveness probe restarts an agent that hangs), `/readyz` (connected to the controller: an
//! upgraded agent that cannot reach it fails its rollout), `/metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet_proto::admin::{escape, text};
use fleet_proto::v1 as pb;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::watched::{Figures, Tally};

/// The reconcile loop is taken for hung when it has not gone round for this long (a round
/// takes at most about 20 s: a proxy lookup, a driver round and the proxies' calls, each with
/// its own timeout).
pub const HUNG_AFTER: Duration = Duration::from_secs(60);

/// What the agent's parts tell the admin endpoints: the reconcile loop its rounds, the
/// session its link to the controller.
#[derive(Debug)]
pub struct Observed {
    started: Instant,
    /// The loop is taken for hung when it has not gone round for this long.
    hung_after: Duration,
    rounds: AtomicU64,
    last_round: Mutex<Option<(Instant, SystemTime)>>,
    link: Mutex<Link>,
}

/// The link to the controller.
#[derive(Clone, Debug, Default)]
struct Link {
    connected: bool,
    /// Sessions that ended after they were connected.
    disconnects: u64,
    /// Why the last session ended, or the last dial failed.
    why: String,
}

impl Observed {
    /// `hung_after`: [`HUNG_AFTER`], but for tests.
    pub fn new(hung_after: Duration) -> Self {
        Observed {
            started: Instant::now(),
            hung_after,
            rounds: AtomicU64::new(0),
            last_round: Mutex::default(),
            link: Mutex::new(Link {
                why: "not dialled yet".into(),
                ..Link::default()
            }),
        }
    }

    /// The reconcile loop went round once more.
    pub fn round(&self) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_round) = Some((Instant::now(), SystemTime::now()));
    }

    /// Whether the reconcile loop is alive now ([`alive`]).
    pub fn alive(&self) -> Result<(), String> {
        let last = lock(&self.last_round).map(|(at, _)| at);
        alive(Instant::now(), self.started, last, self.hung_after)
    }

    /// The session is connected to the controller.
    pub fn connected(&self) {
        let mut link = lock(&self.link);
        link.connected = true;
        link.why.clear();
    }

    /// The session ended, or could not be opened, for `why`.
    pub fn disconnected(&self, why: String) {
        let mut link = lock(&self.link);
        if link.connected {
            link.disconnects += 1;
        }
        link.connected = false;
        link.why = why;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the reconcile loop is alive at `now`: it went round within `hung_after` (or,
/// before its first round, started within it). Pure.
pub fn alive(
    now: Instant,
    started: Instant,
    last_round: Option<Instant>,
    hung_after: Duration,
) -> Result<(), String> {
    let since = last_round.unwrap_or(started);
    let quiet = now.saturating_duration_since(since);
    match (quiet < hung_after, last_round) {
        (true, _) => Ok(()),
        (false, Some(_)) => Err(format!(
            "the reconcile loop has not gone round for {}s",
            quiet.as_secs()
        )),
        (false, None) => Err(format!(
            "the reconcile loop has not gone round once in {}s",
            quiet.as_secs()
        )),
    }
}

/// What the endpoints read.
#[derive(Clone)]
pub struct View {
    pub observed: Arc<Observed>,
    pub desired: watch::Receiver<Option<pb::DesiredState>>,
    pub status: watch::Receiver<pb::AgentStatus>,
    /// The Kubernetes watches' figures.
    pub watches: Tally,
    /// `region`, `cluster` and `driver`, for `fleet_agent_info`.
    pub labels: [(&'static str, String); 3],
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, view: View, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    fleet_proto::admin::serve(listener, move |path: &str| route(path, &view), stop).await;
}

fn route(path: &str, view: &View) -> Response<Full<Bytes>> {
    let observed = &view.observed;
    match path {
        "/healthz" => match observed.alive() {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
        },
        "/readyz" => {
            let link = lock(&observed.link).clone();
            match link.connected {
                true => text(StatusCode::OK, "ok\n".into()),
                false => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not connected to the controller: {}\n", link.why),
                ),
            }
        }
        "/metrics" => text(StatusCode::OK, metrics(view)),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Writes the `# HELP` and `# TYPE` lines of metric `name`, and its one sample (with
/// `labels`, as `a="b",c="d"`).
fn sample(out: &mut String, name: &str, labels: &str, kind: &str, help: &str, value: f64) {
    head(out, name, kind, help);
    let _ = match labels {
        "" => writeln!(out, "{name} {value}"),
        _ => writeln!(out, "{name}{{{labels}}} {value}"),
    };
}

/// Writes the `# HELP` and `# TYPE` lines of metric `name`.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn metrics(view: &View) -> String {
    let observed = &view.observed;
    let link = lock(&observed.link).clone();
    let last_round = lock(&observed.last_round).map_or(0.0, |(_, at)| {
        at.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
    let (release, desired_seq) = match &*view.desired.borrow() {
        Some(d) => (escape(&d.release_id), d.seq),
        None => (String::new(), 0),
    };
    let (applied_seq, ready) = {
        let status = view.status.borrow();
        (status.applied_seq, status.ready)
    };
    let mut info: Vec<String> = (view.labels.iter())
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    info.push(format!("version=\"{}\"", env!("CARGO_PKG_VERSION")));
    let rounds = observed.rounds.load(Ordering::Relaxed);
    let samples: [(&str, &str, &str, &str, f64); 8] = [
        (
            "fleet_agent_info",
            &info.join(","),
            "gauge",
            "The agent's cluster and driver.",
            1.0,
        ),
        (
            "fleet_agent_controller_connected",
            "",
            "gauge",
            "Whether the agent is connected to the controller now.",
            f64::from(u8::from(link.connected)),
        ),
        (
            "fleet_agent_controller_disconnects_total",
            "",
            "counter",
            "Connections to the controller that ended.",
            link.disconnects as f64,
        ),
        (
            "fleet_agent_reconcile_rounds_total",
            "",
            "counter",
            "Rounds of the reconcile loop (desired state, driver, proxies, report).",
            rounds as f64,
        ),
        (
            "fleet_agent_reconcile_last_round_seconds",
            "",
            "gauge",
            "When the reconcile loop last went round (Unix time; 0: never).",
            last_round,
        ),
        (
            "fleet_agent_desired_seq",
            &format!("release=\"{release}\""),
            "gauge",
            "The sequence number of the desired state received (0: none).",
            desired_seq as f64,
        ),
        (
            "fleet_agent_applied_seq",
            "",
            "gauge",
            "The sequence number of the desired state in force: applied, ready and the proxies programmed (0: none).",
            applied_seq as f64,
        ),
        (
            "fleet_agent_ready",
            "",
            "gauge",
            "Whether the desired state received is in force.",
            f64::from(u8::from(ready)),
        ),
    ];
    let mut out = String::new();
    for (name, labels, kind, help, value) in samples {
        sample(&mut out, name, labels, kind, help, value);
    }
    watch_metrics(&mut out, &view.watches.figures());
    out
}

/// The Kubernetes watches' metrics, one sample per watch (none with the process driver and
/// listed proxies). Pure.
fn watch_metrics(out: &mut String, watches: &BTreeMap<&'static str, Figures>) {
    type Metric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Figures) -> f64,
    );
    let metrics: [Metric; 5] = [
        (
            "fleet_agent_watch_listed",
            "gauge",
            "Whether the watch's first list of the Kubernetes API came through.",
            |f| f64::from(u8::from(f.listed)),
        ),
        (
            "fleet_agent_watch_objects",
            "gauge",
            "The objects the watch shows.",
            |f| f.objects as f64,
        ),
        (
            "fleet_agent_watch_failing",
            "gauge",
            "Whether the watch failed in the last 150 s and no change has come through since (the log says why).",
            |f| f64::from(u8::from(f.failing())),
        ),
        (
            "fleet_agent_watch_failures_total",
            "counter",
            "Lists and watches of the Kubernetes API that failed.",
            |f| f.failures as f64,
        ),
        (
            "fleet_agent_watch_relists_total",
            "counter",
            "Lists made again because the watch fell too far behind (410 Gone).",
            |f| f.relists as f64,
        ),
    ];
    if watches.is_empty() {
        return;
    }
    for (name, kind, help, value) in metrics {
        head(out, name, kind, help);
        for (watch, figures) in watches {
            let _ = writeln!(out, "{name}{{watch=\"{watch}\"}} {}", value(figures));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_watch_is_a_sample_of_each_watch_metric_and_no_watch_no_metric() {
        let mut out = String::new();
        watch_metrics(&mut out, &BTreeMap::new());
        assert_eq!(
            out, "",
            "the process driver and listed proxies watch nothing"
        );

        let failed = Figures {
            listed: true,
            objects: 3,
            failures: 2,
            relists: 1,
            failed_at: Some(tokio::time::Instant::now()),
            writer: 1,
        };
        let watches = BTreeMap::from([("deployments", failed), ("pods", Figures::default())]);
        watch_metrics(&mut out, &watches);
        for line in [
            "# TYPE fleet_agent_watch_failures_total counter",
            "fleet_agent_watch_listed{watch=\"deployments\"} 1",
            "fleet_agent_watch_listed{watch=\"pods\"} 0",
            "fleet_agent_watch_objects{watch=\"deployments\"} 3",
            "fleet_agent_watch_failing{watch=\"deployments\"} 1",
            "fleet_agent_watch_failing{watch=\"pods\"} 0",
            "fleet_agent_watch_failures_total{watch=\"deployments\"} 2",
            "fleet_agent_watch_relists_total{watch=\"deployments\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in:\n{out}");
        }
        assert_eq!(out.matches("# HELP").count(), 5, "one family each:\n{out}");
    }

    #[test]
    fn the_loop_is_alive_while_it_goes_round_within_a_minute() {
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        assert_eq!(alive(at(59), start, None, HUNG_AFTER), Ok(()), "starting");
        assert_eq!(
            alive(at(61), start, None, HUNG_AFTER),
            Err("the reconcile loop has not gone round once in 61s".into())
        );
        assert_eq!(alive(at(100), start, Some(at(41)), HUNG_AFTER), Ok(()));
        assert_eq!(
            alive(at(100), start, Some(at(30)), HUNG_AFTER),
            Err("the reconcile loop has not gone round for 70s".into())
        );
    }
}
