//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` (Prometheus text).

mod releases;

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fleet_proto::admin::text;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::runtime::Controller;
use crate::tls;

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    controller: Arc<Controller>,
    tls: Option<Arc<tls::Status>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let answer = move |path: &str| route(path, &controller, tls.as_deref());
    fleet_proto::admin::serve(listener, answer, shutdown).await;
}

fn route(path: &str, controller: &Controller, tls: Option<&tls::Status>) -> Response<Full<Bytes>> {
    match path {
        "/healthz" | "/readyz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => {
            let mut out = metrics(controller);
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
