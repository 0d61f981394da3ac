//! The admin API: health, readiness, the route table (read and replace), metrics, stats, and
//! the last mirrored copies answered otherwise than their primaries.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use fleet_proxy_router::TableSpec;
use fleet_proxy_router::spec::{RouteSpec, TrackSpec};

use crate::state::{Origin, Shared};
use crate::{background, stats};

/// The table in force as `GET /routes` writes it: its spec, with the version in force.
#[derive(serde::Serialize)]
struct InForce<'a> {
    version: u64,
    tracks: &'a std::collections::BTreeMap<String, TrackSpec>,
    routes: &'a [RouteSpec],
}

/// `PUT /routes` bodies larger than this are refused.
const MAX_TABLE_BYTES: usize = 32 << 20;
/// A `PUT /routes` body being read lets the thread's other tasks run after this many bytes.
const YIELD_EVERY: usize = 256 << 10;

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    // HEAD is GET without the body, which hyper leaves out (RFC 9110 §9.3.2): health checkers
    // probe with it.
    let method = match *req.method() {
        Method::HEAD => &Method::GET,
        ref other => other,
    };
    let resp = match (method, req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.draining.load(Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if shared.settings.await_put && !shared.put.load(Relaxed) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "awaiting a table (PUT /routes)\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        // Written out on a background thread, like `/stats`: megabytes for a large table.
        (&Method::GET, "/routes") => {
            let body = background::run("routes", move || {
                let active = shared.active();
                // Every field named: one added to the spec must be added here too.
                let TableSpec {
                    version: _,
                    tracks,
                    routes,
                } = active.table.spec();
                let version = active.version;
                serde_json::to_vec(&InForce {
                    version,
                    tracks,
                    routes,
                })
            });
            match body.await {
                Ok(Ok(body)) => json_body(StatusCode::OK, body),
                Ok(Err(e)) => internal_error(&e.into()),
                Err(e) => internal_error(&e),
            }
        }
        (&Method::PUT, "/routes") => put_routes(shared, req).await,
        // Rendered on a background thread: they take the counters' lock, which a table being
        // installed may hold, and the thread serving traffic must not wait.
        (&Method::GET, "/metrics") => {
            let body = background::run("metrics", move || {
                let active = shared.active();
                let mut out = shared.stats.prometheus(active.version);
                stats::backends::prometheus(&backend_health(&active), &mut out);
                out
            });
            match body.await {
                Ok(body) => {
                    let mut resp = text(StatusCode::OK, body);
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    resp
                }
                Err(e) => internal_error(&e),
            }
        }
        (&Method::GET, "/stats") => {
            let body = background::run("stats", move || {
                let active = shared.active();
                let mut json = shared.stats.json(active.version);
                json["backends"] = stats::backends::json(&backend_health(&active));
                json.to_string()
            });
            match body.await {
                Ok(body) => json_body(StatusCode::OK, body),
                Err(e) => internal_error(&e),
            }
        }
        (&Method::GET, "/mirror/differences") => {
            let body = shared.stats.differences.json().to_string();
            json_body(StatusCode::OK, body)
        }
        (
            _,
            path @ ("/healthz"
            | "/readyz"
            | "/routes"
            | "/metrics"
            | "/stats"
            | "/mirror/differences"),
        ) => {
            let allow = match path {
                "/routes" => "GET, HEAD, PUT",
                _ => "GET, HEAD",
            };
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

/// Validate, then swap: a rejected table leaves the one in force untouched.
async fn put_routes(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // A length over the limit, declared: refused at once rather than read up to the limit.
    if hyper::body::Body::size_hint(req.body()).lower() > MAX_TABLE_BYTES as u64 {
        return too_large(&format!("length limit exceeded ({MAX_TABLE_BYTES} bytes)"));
    }
    // A body that trickles in would hold one of the few admin connections for good.
    let patience = shared.settings.limits.header_read_timeout;
    let collect = read_body(req.into_body(), MAX_TABLE_BYTES);
    let chunks = match tokio::time::timeout(patience, collect).await {
        Ok(Ok(chunks)) => chunks,
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(&e.to_string());
        }
        // Broken framing (a bad chunk size, say); a client that left never reads the answer.
        Ok(Err(e)) => {
            let error = format!("could not read the body: {e}");
            return json_response(StatusCode::BAD_REQUEST, &json!({ "error": error }));
        }
        Err(_) => {
            let error = format!(
                "the table did not arrive within {} (limits.header_read_timeout)",
                humantime::format_duration(patience)
            );
            return json_response(StatusCode::REQUEST_TIMEOUT, &json!({ "error": error }));
        }
    };
    // Checking and building a large table is CPU work: off the threads that serve traffic,
    // and behind them for the CPU. So is joining the chunks as they came into one buffer, a
    // copy of megabytes.
    background::run("routes", move || {
        check_and_install(&shared, &fleet_proxy_router::pace::concat(&chunks))
    })
    .await
    .unwrap_or_else(|e| internal_error(&e))
}

/// The body's chunks as they came, up to `limit` bytes. Megabytes that have all arrived would
/// be read in one go, the traffic on this thread held up for milliseconds: other tasks run
/// after every `YIELD_EVERY` bytes.
async fn read_body<B>(body: B, limit: usize) -> Result<Vec<Bytes>, crate::body::BoxError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::body::BoxError>,
{
    let mut body = Limited::new(body, limit);
    let (mut chunks, mut since) = (Vec::new(), 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            since += data.len();
            chunks.push(data);
        }
        if since >= YIELD_EVERY {
            since = 0;
            tokio::task::yield_now().await;
        }
    }
    Ok(chunks)
}

fn too_large(error: &str) -> Response<Full<Bytes>> {
    json_response(StatusCode::PAYLOAD_TOO_LARGE, &json!({ "error": error }))
}

fn internal_error(e: &anyhow::Error) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({ "error": e.to_string() }),
    )
}

fn check_and_install(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => {
            shared.stats.global.table_rejected.fetch_add(1, Relaxed);
            let errors = [not_utf8(body, e)];
            return json_response(StatusCode::BAD_REQUEST, &json!({ "errors": errors }));
        }
    };
    let started = std::time::Instant::now();
    let table = match fleet_proxy_router::load(text) {
        Ok(t) => t,
        Err(diags) => {
            shared.stats.global.table_rejected.fetch_add(1, Relaxed);
            return json_response(StatusCode::BAD_REQUEST, &json!({ "errors": diags }));
        }
    };
    let expected = table.spec().version;
    let (routes, built) = (table.routes().len(), started.elapsed());
    match shared.install(table, expected, Origin::Put) {
        Ok(version) => {
            // Read, checked and built; then in force.
            let (build_ms, total_ms) = (millis(built), millis(started.elapsed()));
            tracing::info!(
                version,
                routes,
                build_ms,
                total_ms,
                "table replaced through PUT /routes"
            );
            let answer = json!({ "version": version, "build_ms": build_ms, "total_ms": total_ms });
            json_response(StatusCode::OK, &answer)
        }
        // A version conflict: the only refusal of a table put.
        Err(e) => json_response(StatusCode::CONFLICT, &json!({ "error": e.to_string() })),
    }
}

/// The diagnostic for a body that stops being UTF-8 where `e` says, placed like any other.
fn not_utf8(body: &[u8], e: std::str::Utf8Error) -> fleet_yaml::Diagnostic {
    let valid = e.valid_up_to();
    // Up to `valid` the text is UTF-8: lines and columns count characters, as editors do.
    let before = std::str::from_utf8(&body[..valid]).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    fleet_yaml::Diagnostic {
        severity: fleet_yaml::Severity::Error,
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        path: String::new(),
        message: match e.error_len() {
            Some(_) => format!("byte 0x{:02x} is not UTF-8", body[valid]),
            None => "the body ends in the middle of a character".into(),
        },
        help: "send the table as UTF-8 JSON or YAML".into(),
    }
}

/// Milliseconds to a tenth.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The health of each backend the table in force names.
fn backend_health(active: &crate::state::Active) -> Vec<(String, crate::upstream::Health)> {
    (active.distinct_backends().into_iter())
        .map(|b| (b.addr.clone(), b.health()))
        .collect()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    json_body(status, value.to_string())
}

/// A response of JSON text already written.
fn json_body(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::body::Frame;

    use super::*;
    use crate::body::Frames;

    /// `n` chunks of 64 KiB, all there at once, the i-th filled with byte i.
    fn ready_body(n: u8) -> Frames {
        Frames(
            (0..n)
                .map(|i| Frame::data(Bytes::from(vec![i; 64 << 10])))
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_table_body_arrives_whole_and_lets_other_tasks_run_while_it_is_read() {
        // Another task on this thread counts the times it got to run.
        let turns = Arc::new(AtomicUsize::new(0));
        let counter = turns.clone();
        let other = tokio::spawn(async move {
            loop {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        let chunks = read_body(ready_body(16), MAX_TABLE_BYTES).await.unwrap();
        // One MiB read: the other task ran at least at every 256 KiB.
        assert!(turns.load(Ordering::Relaxed) >= 3, "{turns:?}");
        other.abort();
        let whole = chunks.concat();
        assert_eq!(whole.len(), 16 << 16);
        assert!(whole[..64 << 10].iter().all(|b| *b == 0));
        assert!(whole[15 << 16..].iter().all(|b| *b == 15));
    }

    #[tokio::test]
    async fn a_table_body_over_the_limit_is_refused() {
        let err = read_body(ready_body(4), 200 << 10).await.unwrap_err();
        assert!(err.to_string().contains("length limit exceeded"), "{err}");
    }
}
