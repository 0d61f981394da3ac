//! `fleet-demo-app --port P --version V [--fail-rate R] [--latency-ms N] [--sick-while PATH]`:
//! the service of the demo and the end-to-end tests. `GET /healthz` answers `ok` (a 503 while
//! the `--sick-while` file exists); every other request answers `hello from VERSION` with an
//! `x-version` header, or a 500 for a `--fail-rate` share of them.
//! `FLEET_DEMO_FAULTS="v2=0.05,v3=0.5"` sets the fail rate by version when the flag is absent;
//! `v4=crash` has that version exit with an error as it starts, as a broken build would;
//! `v5=sick-while:PATH` sets its `--sick-while`, for a version that falls ill in service.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngExt;

/// A tiny HTTP service that says which version it is, for demos and tests.
#[derive(Parser, Debug, Clone)]
#[command(after_help = "Example:\n  fleet-demo-app --port 8081 --version v2 --fail-rate 0.05")]
struct Args {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    version: String,
    /// Share of requests (0 to 1) answered with a 500.
    #[arg(long)]
    fail_rate: Option<f64>,
    /// Delay before every answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// The health check answers 503 while this file exists.
    #[arg(long)]
    sick_while: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let fault = match std::env::var("FLEET_DEMO_FAULTS") {
        Ok(faults) => fault_for(&faults, &args.version)?,
        Err(_) => None,
    };
    match fault {
        Some(Fault::Crash) => {
            anyhow::bail!("{} crashes as it starts (FLEET_DEMO_FAULTS)", args.version)
        }
        Some(Fault::FailRate(rate)) => args.fail_rate = args.fail_rate.or(Some(rate)),
        Some(Fault::SickWhile(path)) => args.sick_while = args.sick_while.or(Some(path)),
        None => {}
    }
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let args = args.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, args.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>, args: Args) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
        if args.sick_while.as_ref().is_some_and(|p| p.exists()) {
            *response.body_mut() = Full::new(Bytes::from_static(b"sick (--sick-while)\n"));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(response);
    }
    if args.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.latency_ms)).await;
    }
    let fail = args
        .fail_rate
        .is_some_and(|r| rand::rng().random_bool(r.clamp(0.0, 1.0)));
    let (status, body) = match fail {
        true => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{} failed this one\n", args.version),
        ),
        false => (StatusCode::OK, format!("hello from {}\n", args.version)),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&args.version) {
        response.headers_mut().insert("x-version", v);
    }
    Ok(response)
}

enum Fault {
    FailRate(f64),
    Crash,
    SickWhile(std::path::PathBuf),
}

/// What `faults` ("v2=0.05,v3=0.5,v4=crash,v5=sick-while:/run/ill") gives `version`. The whole list is checked, so
/// that a typo anywhere in it (a pair without `=`, a value that is neither a rate nor
/// `crash`, a version given twice) is an error rather than a healthy version run quietly.
fn fault_for(faults: &str, version: &str) -> anyhow::Result<Option<Fault>> {
    let mut found: Option<Fault> = None;
    let mut seen = std::collections::BTreeSet::new();
    for pair in faults.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((v, fault)) = pair.split_once('=') else {
            anyhow::bail!(
                "FLEET_DEMO_FAULTS: {pair:?} is not VERSION=RATE, VERSION=crash or \
                 VERSION=sick-while:PATH"
            );
        };
        let v = v.trim();
        if !seen.insert(v) {
            anyhow::bail!("FLEET_DEMO_FAULTS: {v} is given twice; give each version once");
        }
        let fault = match fault.trim() {
            "crash" => Fault::Crash,
            sick if sick
                .strip_prefix("sick-while:")
                .is_some_and(|p| !p.is_empty()) =>
            {
                Fault::SickWhile(sick["sick-while:".len()..].into())
            }
            rate => match rate.parse::<f64>() {
                Ok(rate) if (0.0..=1.0).contains(&rate) => Fault::FailRate(rate),
                _ => anyhow::bail!(
                    "FLEET_DEMO_FAULTS: {v}={rate:?} is not a fail rate from 0 to 1 (e.g. \
                     0.05), \"crash\" or \"sick-while:PATH\""
                ),
            },
        };
        if v == version {
            found = Some(fault);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_a_rate_or_a_crash_and_anything_else_is_refused() {
        let faults = "v2=0.05, v3=crash ,v4=sick-while:/run/ill";
        assert!(matches!(fault_for(faults, "v2"), Ok(Some(Fault::FailRate(r))) if r == 0.05));
        assert!(matches!(fault_for(faults, "v3"), Ok(Some(Fault::Crash))));
        assert!(
            matches!(fault_for(faults, "v4"), Ok(Some(Fault::SickWhile(p))) if p == std::path::Path::new("/run/ill"))
        );
        assert!(matches!(fault_for(faults, "v1"), Ok(None)));
        for (typo, said) in [
            ("v2=0.05,v4=crahs", "is not a fail rate from 0 to 1"),
            ("v2=0.05,v5=1.5", "is not a fail rate"),
            ("v2=sick-while:", "is not a fail rate"),
            ("v2:crash", "is not VERSION=RATE, VERSION=crash or"),
            ("v2=0.05,v2=crash", "v2 is given twice"),
        ] {
            // Whichever version asks: a typo anywhere is refused.
            let e = fault_for(typo, "v2").err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(said)),
                "{typo}: {e:?}"
            );
        }
    }
}
