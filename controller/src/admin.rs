//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` (Prometheus text).

mod releases;

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fleet_proto::admin::text;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::leader::Holder;
use crate::runtime::Controller;
use crate::{standby, tls};

/// Serves the admin endpoints on `listener` until `shutdown`, on a thread and a runtime of
/// their own: `/healthz` and `/readyz` answer while every worker of the controller's runtime
/// waits on its lock (which a store write holds while etcd is slow to answer: an exploratory
/// run saw `/readyz` take 4.4 s so).
pub fn spawn(
    listener: TcpListener,
    role: Arc<Role>,
    tls: Option<Arc<tls::Status>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Out of the controller's runtime's reactor, into the admin runtime's.
    let listener = listener.into_std()?;
    let serving = move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(e) => return tracing::error!(error = %e, "the admin endpoints cannot run"),
        };
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, role, tls, crate::signalled(shutdown)).await,
                Err(e) => tracing::error!(error = %e, "the admin endpoints cannot listen"),
            }
        });
    };
    std::thread::Builder::new()
        .name("fleet-admin".into())
        .spawn(serving)?;
    Ok(())
}

/// Serves the admin endpoints on `listener` until `shutdown`.
async fn serve(
    listener: TcpListener,
    role: Arc<Role>,
    tls: Option<Arc<tls::Status>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let answer = move |path: &str| match (role.controller.get(), role.starting_over.get()) {
        (_, Some(why)) => starting_over(path, why),
        (Some(controller), None) => route(path, controller, tls.as_deref()),
        (None, None) => {
            let leader = role.leader.borrow().clone();
            let unreached = leader.as_ref().and_then(|l| role.reach.unreached(l));
            standby(path, leader.as_ref(), unreached)
        }
    };
    fleet_proto::admin::serve(listener, answer, shutdown).await;
}

/// Whether this controller leads (serves), and if not, who does.
pub struct Role {
    controller: OnceLock<Arc<Controller>>,
    leader: watch::Sender<Option<Holder>>,
    /// Whether that leader takes the connections passed to it.
    reach: Arc<standby::Reach>,
    /// Why it stopped serving to start over (it lost the lead, or its store a write), once
    /// it has.
    starting_over: OnceLock<String>,
}

impl Role {
    /// A controller standing by, not knowing yet who leads.
    pub fn new() -> Arc<Role> {
        Arc::new(Role {
            controller: OnceLock::new(),
            leader: watch::channel(None).0,
            reach: Arc::default(),
            starting_over: OnceLock::new(),
        })
    }

    /// Where the campaign says who leads while this controller does not.
    pub fn leader(&self) -> &watch::Sender<Option<Holder>> {
        &self.leader
    }

    /// Whether the leader takes the connections passed to it (`standby.rs` finds out).
    pub fn reach(&self) -> &Arc<standby::Reach> {
        &self.reach
    }

    /// This controller leads and serves `controller`.
    pub fn lead(&self, controller: Arc<Controller>) {
        let _ = self.controller.set(controller);
    }

    /// This controller stops serving, for `why`, to start over from its store.
    pub fn start_over(&self, why: String) {
        let _ = self.starting_over.set(why);
    }
}

/// A controller that stops serving to start over, while it stops: alive, not ready.
fn starting_over(path: &str, why: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok: starting over\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("starting over: {why}\n"),
        ),
        "/metrics" => {
            let mut out = String::new();
            leading(&mut out, false);
            text(StatusCode::OK, out)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// A standby's answers: alive; ready while it knows a leader to pass connections to and
/// that leader took the last one (`unreached` says why not); and the one metric that says
/// it stands by.
fn standby(
    path: &str,
    leader: Option<&Holder>,
    unreached: Option<String>,
) -> Response<Full<Bytes>> {
    match (path, leader) {
        ("/healthz", _) => text(StatusCode::OK, "ok: standing by\n".into()),
        ("/readyz", Some(Holder { name, grpc })) => match unreached {
            Some(error) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "standing by: {name} leads, at {grpc}, but does not take connections \
                     there ({error}): {}\n",
                    standby::UNREACHED_MEANS
                ),
            ),
            None => text(
                StatusCode::OK,
                format!("standing by: {name} leads, at {grpc}; connections pass to it\n"),
            ),
        },
        ("/readyz", None) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "standing by: no controller is known to lead\n".into(),
        ),
        ("/metrics", _) => {
            let mut out = String::new();
            leading(&mut out, false);
            text(StatusCode::OK, out)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn leading(out: &mut String, leads: bool) {
    let name = "fleet_controller_leading";
    let help = "1 while this controller leads (serves), 0 while it stands by for another.";
    head(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {}", u8::from(leads));
}

fn route(path: &str, controller: &Controller, tls: Option<&tls::Status>) -> Response<Full<Bytes>> {
    match path {
        "/healthz" | "/readyz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => {
            let mut out = metrics(controller);
            leading(&mut out, true);
            controller.store.metrics(&mut out);
            if let Some(tls) = tls {
                tls_metrics(&mut out, tls);
            }
            text(StatusCode::OK, out)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Writes the `# HELP` and `# TYPE` lines of metric `name`.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn metrics(controller: &Controller) -> String {
    let inner = controller.lock();
    let mut out = String::new();
    let epoch = "fleet_controller_epoch";
    head(&mut out, epoch, "gauge", "The controller's current epoch.");
    let _ = writeln!(out, "{epoch} {}", controller.epoch);
    let agents = "fleet_controller_agents";
    head(&mut out, agents, "gauge", "Agents connected now.");
    let _ = writeln!(out, "{agents} {}", inner.agents.len());
    let missing = "fleet_controller_clusters_without_agent";
    let help = "Clusters of each fleet that have no agent connected now.";
    head(&mut out, missing, "gauge", help);
    let fleets = (inner.fleets.iter()).map(|(service, f)| (service, &*f.manifest));
    for (service, n) in crate::agents::missing(fleets, &inner.agents) {
        let service = fleet_proto::admin::escape(service);
        let _ = writeln!(out, "{missing}{{service=\"{service}\"}} {n}");
    }
    let releases = "fleet_controller_releases";
    head(&mut out, releases, "gauge", "Releases known, by phase.");
    let mut phases = std::collections::BTreeMap::<&str, u64>::new();
    let mut under_way = Vec::new();
    for (id, run) in &inner.releases {
        let phase = &run.engine.state().phase;
        *phases.entry(crate::convert::phase_name(phase)).or_default() += 1;
        if !phase.is_terminal() {
            under_way.push(crate::convert::release(id, run.started_at_ms, &run.engine));
        }
    }
    drop(inner);
    for (phase, n) in phases {
        let _ = writeln!(out, "{releases}{{phase=\"{phase}\"}} {n}");
    }
    releases::write(&mut out, &under_way);
    out
}

/// The gRPC listener's TLS: what to alert on before clients are shut out (a certificate near
/// its end, renewed files that do not work).
fn tls_metrics(out: &mut String, tls: &tls::Status) {
    let read = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
    let expiry = "fleet_controller_tls_certificate_expiry_seconds";
    let help = "When the controller's certificate in force expires (Unix time).";
    head(out, expiry, "gauge", help);
    let _ = writeln!(
        out,
        "{expiry} {}",
        tls.certificate_expiry.load(Ordering::Relaxed)
    );
    let reloads = "fleet_controller_tls_reloads_total";
    let help = "Reads of changed TLS files, by whether the new settings went into force.";
    head(out, reloads, "counter", help);
    let _ = writeln!(out, "{reloads}{{result=\"ok\"}} {}", read(&tls.reloads));
    let _ = writeln!(
        out,
        "{reloads}{{result=\"failed\"}} {}",
        read(&tls.reloads_failed)
    );
    let refused = "fleet_controller_tls_handshakes_refused_total";
    head(
        out,
        refused,
        "counter",
        "Client handshakes refused or given up.",
    );
    let _ = writeln!(out, "{refused} {}", read(&tls.refused));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn said(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// `GET path` of the server at `addr`, from this thread, blocking: the answer's text.
    fn get_blocking(addr: std::net::SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_is_answered_while_every_worker_waits_on_the_controllers_lock() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let controller = Controller::open(dir.path(), crate::KEEP_RELEASES).unwrap();
        let role = Role::new();
        role.lead(controller.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        spawn(listener, role, None, shutdown).unwrap();
        // A store write held up by etcd: the lock held for 3 s, and every worker of this
        // runtime waiting for it (this test's own included, below).
        let (held, lock_taken) = std::sync::mpsc::channel();
        let holder = {
            let controller = controller.clone();
            std::thread::spawn(move || {
                let _guard = controller.lock();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(3));
            })
        };
        lock_taken.recv().unwrap();
        for _ in 0..2 {
            let controller = controller.clone();
            tokio::spawn(async move { drop(controller.lock()) });
        }
        let asked = Instant::now();
        let answer = std::thread::spawn(move || get_blocking(addr, "/readyz"))
            .join()
            .unwrap();
        let took = asked.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        holder.join().unwrap();
        let _ = stop.send(true);
    }

    #[tokio::test]
    async fn a_standby_is_ready_while_the_leader_it_knows_takes_connections() {
        let leader = Holder {
            name: "ctl-0".into(),
            grpc: "10.0.0.7:7070".into(),
        };
        let (status, body) = said(standby("/readyz", Some(&leader), None)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("ctl-0 leads, at 10.0.0.7:7070; connections pass to it"));
        let refused = Some("Connection refused (os error 111)".to_string());
        let (status, body) = said(standby("/readyz", Some(&leader), refused)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("but does not take connections there (Connection refused"));
        assert!(body.contains("its --advertise"), "{body}");
        let (status, _) = said(standby("/readyz", None, None)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _) = said(standby("/healthz", Some(&leader), Some("x".into()))).await;
        assert_eq!(status, StatusCode::OK, "alive all the same");
    }
}
