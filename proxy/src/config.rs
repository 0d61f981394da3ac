//! The config file: its wire types, and the one check that `--check`, the file watcher and
//! reloads all use. The route table part is checked by `fleet-proxy-router`, exactly as a
//! `PUT /routes` body is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proxy_router::spec::{RouteSpec, TrackSpec};
use fleet_proxy_router::{Diagnostic, Table, TableSpec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod checker;

use checker::Checker;

/// The config file of one fleet-proxy.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Traffic listeners: `127.0.0.1:8080`, or a list of addresses or `{ addr, tls }`.
    pub listen: Listen,
    /// The admin API listener. Keep it on a private address: it has no authentication.
    pub admin: String,
    pub tracks: BTreeMap<String, TrackSpec>,
    #[serde(deserialize_with = "fleet_proxy_router::spec::paced")]
    pub routes: Vec<RouteSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorLimitsSpec>,
    /// How long in-flight requests may take to finish after SIGTERM. Default: `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// How often the config file is checked for changes. Default: `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_interval: Option<String>,
    /// `/readyz` answers 503 until a table has come through `PUT /routes`, and from then on
    /// a reload of the file leaves that table in force until a restart (certificates are
    /// reloaded as always): for proxies an agent programs, whose file's table is a
    /// placeholder, so that one started on it takes no traffic until the agent has given it
    /// the real one, and an edit of the file does not take the real one away. Default:
    /// `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub await_put: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Listen {
    One(String),
    Many(Vec<ListenEntry>),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ListenEntry {
    Addr(String),
    Full(ListenerSpec),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub addr: String,
    /// Terminate TLS here: `{ cert, key }` or a list of them, chosen by SNI; the first one
    /// serves clients that send no name or an unknown one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "tls_written"
    )]
    pub tls: Option<TlsSpec>,
}

/// `tls:` with nothing after it reads as TLS without a certificate, which the checker refuses,
/// rather than as a plain listener (a template that rendered no certificate means TLS).
fn tls_written<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TlsSpec>, D::Error> {
    Ok(Some(
        Option::<TlsSpec>::deserialize(d)?.unwrap_or(TlsSpec::Many(Vec::new())),
    ))
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum TlsSpec {
    One(CertSpec),
    Many(Vec<CertSpec>),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// PEM certificate chain, relative to the config file.
    pub cert: String,
    /// PEM private key, relative to the config file.
    pub key: String,
}

/// Durations are written as `500ms`, `2s`, `1m`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// Default: `1s`.
    pub connect_timeout: Option<String>,
    /// Until the response headers arrive, all tries included. Default: `10s`.
    pub request_timeout: Option<String>,
    /// Each try of a retryable request. Default: `2s`.
    pub per_try_timeout: Option<String>,
    /// After the response head: the longest a response body may go without a byte from its
    /// backend while the client waits, and an upgraded tunnel (WebSocket) without a byte
    /// either way, before it is cut. Default: `60s`.
    pub read_timeout: Option<String>,
    /// Extra tries for idempotent requests without a body on connect failure, reset or
    /// per-try timeout. Default: 3; at most 10 (all of them within `request_timeout`).
    #[schemars(range(max = 10))]
    pub retries: Option<u32>,
    /// Consecutive failures that eject a backend. Default: 5.
    #[schemars(range(min = 1))]
    pub eject_after: Option<u32>,
    /// How long an ejected backend gets no traffic, but for trials. Default: `10s`.
    pub eject_for: Option<String>,
    /// While every backend of a track is ejected (its requests would get `503`), one request
    /// at a time, at most this often, is let through to one as a trial; an answer other than
    /// 502–504 ends its ejection. Default: `1s`.
    pub trial_every: Option<String>,
    /// Idle HTTP/1.1 connections kept open to each backend for reuse; more are closed.
    /// Default: 128.
    pub max_idle_per_backend: Option<u32>,
    /// Most HTTP/1.1 connections open to each backend at once, idle ones included (upgraded
    /// tunnels and the HTTP/2 connection aside). A request that would need another waits
    /// for one to come free, up to its try's deadline, then gets `503`. For backends that
    /// cannot take a burst of connections (a short listen backlog drops the excess, and
    /// their connects time out). Default: no limit.
    #[schemars(range(min = 1))]
    pub max_connections_per_backend: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Open client connections; more are closed at once. Default: 10000.
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for their response headers at once, over all connections; more are
    /// answered 503 at once (load shedding). Default: 10000.
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    /// Headers per request. Default: 100; at most 1000 (hyper sets room for that many aside
    /// for each HTTP/1.1 request it reads).
    #[schemars(range(min = 1, max = 1000))]
    pub max_headers: Option<u32>,
    /// Bytes of a request head (HTTP/1.1) or header list (HTTP/2). Default: 65536; at
    /// least 8192, the smallest read buffer of hyper's HTTP/1 server.
    #[schemars(range(min = 8192))]
    pub max_header_bytes: Option<u32>,
    /// Time to receive a request head, against slowloris. Default: `10s`.
    pub header_read_timeout: Option<String>,
    /// How long a keep-alive connection may wait for its next request. Default: `60s`.
    pub idle_timeout: Option<String>,
    /// How long a client may take no byte of a response it is owed before the response is
    /// cut: its HTTP/1.1 connection closed, or its HTTP/2 stream reset. Default: `60s`.
    pub send_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorLimitsSpec {
    /// Mirrored requests waiting for a slot; more are shed. Default: 1024.
    #[schemars(range(min = 1))]
    pub queue: Option<u32>,
    /// Mirrored requests gathered into a batch or in flight at once. Default: 64.
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    /// Larger request bodies are not mirrored (counted as skipped). Default: 1048576.
    pub max_body_bytes: Option<u32>,
    /// Default: `5s`.
    pub timeout: Option<String>,
    /// Copies due within this time of the first are sent together: the shadow is woken once
    /// for them, and over HTTP/2 they leave in one write. `0s` sends each at once.
    /// Default: `2ms`.
    pub batch_window: Option<String>,
    /// The copies of a batch to one HTTP/1.1 backend go pipelined on one connection (RFC 9112,
    /// section 9.3.2). `false` for a shadow that mishandles pipelined requests: each copy then
    /// goes on a connection of its own. Default: `true`.
    pub pipeline: Option<bool>,
}

#[derive(Clone, Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    /// `(cert, key)` paths; empty for plain text.
    pub tls: Vec<(PathBuf, PathBuf)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub per_try_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub eject_after: u32,
    pub eject_for: Duration,
    pub trial_every: Duration,
    pub max_idle_per_backend: usize,
    /// `usize::MAX` when there is no limit.
    pub max_connections_per_backend: usize,
}

#[cfg(test)]
impl Upstream {
    /// The defaults, with one idle connection kept per backend and no cap.
    pub fn for_tests() -> Self {
        Upstream {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            per_try_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(60),
            retries: 3,
            eject_after: 5,
            eject_for: Duration::from_secs(10),
            trial_every: Duration::from_secs(1),
            max_idle_per_backend: 1,
            max_connections_per_backend: usize::MAX,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_requests: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MirrorLimits {
    pub queue: usize,
    pub concurrency: usize,
    pub max_body_bytes: usize,
    pub timeout: Duration,
    pub batch_window: Duration,
    pub pipeline: bool,
}

/// Everything in the file but the table: fixed for the life of the process, except TLS
/// certificates, which reloads read again.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listeners: Vec<Listener>,
    pub admin: SocketAddr,
    pub upstream: Upstream,
    pub limits: Limits,
    pub mirror: MirrorLimits,
    pub drain_timeout: Duration,
    pub watch_interval: Duration,
    pub await_put: bool,
    /// A digest of the text these settings were read from: a reload that reads the same text
    /// leaves the table in force alone.
    pub source: u64,
}

impl Settings {
    /// The settings read at start only that differ in `other`, by their names in the file.
    pub fn fixed_at_start_changed(&self, other: &Settings) -> Vec<&'static str> {
        // Where each listener is, and whether it speaks TLS.
        let addrs = |s: &Settings| {
            let listeners = s.listeners.iter();
            listeners
                .map(|l| (l.addr, l.tls.is_empty()))
                .collect::<Vec<_>>()
        };
        [
            ("listen", addrs(self) != addrs(other)),
            ("admin", self.admin != other.admin),
            ("upstream", self.upstream != other.upstream),
            ("limits", self.limits != other.limits),
            ("mirror", self.mirror != other.mirror),
            ("drain_timeout", self.drain_timeout != other.drain_timeout),
            (
                "watch_interval",
                self.watch_interval != other.watch_interval,
            ),
            ("await_put", self.await_put != other.await_put),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }
}

/// What tells one text (a config file, a certificate) from another without keeping it.
pub fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

/// Reads and checks a config file's text; `dir` resolves relative certificate paths.
pub fn check(src: &str, dir: &Path) -> Result<(Settings, Table), Vec<Diagnostic>> {
    check_certs(src, dir).map_err(|refused| refused.diags)
}

/// A file refused: every diagnostic, and the `(cert, key)` files among them that could not
/// be loaded (a certificate not there yet, say: their change may make the file good).
pub struct Refused {
    pub diags: Vec<Diagnostic>,
    pub certs: Vec<(PathBuf, PathBuf)>,
}

/// [`check`], telling which certificates were refused.
pub fn check_certs(src: &str, dir: &Path) -> Result<(Settings, Table), Refused> {
    let mut loaded = fleet_yaml::load::<FileConfig>(src);
    let Some(file) = loaded.value.take() else {
        let diags = loaded.diags.into_sorted();
        return Err(Refused {
            diags,
            certs: Vec::new(),
        });
    };
    let mut c = Checker {
        at: &loaded.positions,
        diags: &mut loaded.diags,
        refused_certs: Vec::new(),
    };
    let settings = c.settings(&file, dir, digest(src.as_bytes()));
    let certs = std::mem::take(&mut c.refused_certs);
    let spec = TableSpec {
        version: None,
        tracks: file.tracks,
        routes: file.routes,
    };
    let table = Table::build(spec, &loaded.positions, &mut loaded.diags);
    match (settings, table) {
        (Some(s), Some(t)) if !loaded.diags.has_errors() => Ok((s, t)),
        _ => Err(Refused {
            diags: loaded.diags.into_sorted(),
            certs,
        }),
    }
}
