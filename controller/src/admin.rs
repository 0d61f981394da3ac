//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::runtime::Controller;

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    controller: Arc<Controller>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let controller = controller.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let controller = controller.clone();
                async move { Ok::<_, Infallible>(route(&req, &controller)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, controller: &Controller) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" | "/readyz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => text(StatusCode::OK, metrics(controller)),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn metrics(controller: &Controller) -> String {
    let inner = controller.lock();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP fleet_controller_epoch The controller's current epoch."
    );
    let _ = writeln!(out, "# TYPE fleet_controller_epoch gauge");
    let _ = writeln!(out, "fleet_controller_epoch {}", controller.epoch);
    let _ = writeln!(out, "# HELP fleet_controller_agents Agents connected now.");
    let _ = writeln!(out, "# TYPE fleet_controller_agents gauge");
    let _ = writeln!(out, "fleet_controller_agents {}", inner.agents.len());
    let _ = writeln!(
        out,
        "# HELP fleet_controller_releases Releases known, by phase."
    );
    let _ = writeln!(out, "# TYPE fleet_controller_releases gauge");
    let mut phases = std::collections::BTreeMap::<String, u64>::new();
    for run in inner.releases.values() {
        let phase = crate::convert::release("", 0, &run.engine).phase;
        *phases.entry(phase).or_default() += 1;
    }
    for (phase, n) in phases {
        let _ = writeln!(out, "fleet_controller_releases{{phase=\"{phase}\"}} {n}");
    }
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
