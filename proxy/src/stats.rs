//! Counters and latency histograms per route, track and source (primary or mirror), kept
//! since start so that scrapers take deltas; rendered as `/stats` JSON and `/metrics` text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_proxy_router::Table;
use serde_json::{Value, json};

pub mod backends;
mod prometheus;

/// Upper bounds of the latency buckets, in milliseconds; a last bucket takes the rest.
pub const BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Primary,
    Mirror,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Primary => "primary",
            Source::Mirror => "mirror",
        }
    }
}

/// One route × track × source.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    /// Responses by status class, 1xx to 5xx.
    classes: [AtomicU64; 5],
    /// Requests that got no response from a backend (connect failure, reset, timeout, no
    /// healthy backend); the client got a 502, 503 or 504 from the proxy.
    errors: AtomicU64,
    /// gRPC answers, HTTP 200 all, whose `grpc-status` stands for a server's failure.
    grpc_errors: AtomicU64,
    /// Responses whose body the backend broke off (a reset, a close short of its length) or
    /// stalled past `upstream.read_timeout`, after their head had gone out with its status.
    broken: AtomicU64,
    /// Non-cumulative counts per bucket of [`BUCKETS_MS`], plus one for larger values.
    latency: [AtomicU64; BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Mirror series only: copies whose answer was compared with the primary's (both
    /// answered), and those of them whose answers differed.
    compared: AtomicU64,
    differed: AtomicU64,
}

impl Counters {
    /// Records a finished request: its status (proxy-made or not) and time to headers.
    pub fn record(&self, status: u16, upstream_failed: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if let Some(c) = self.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Relaxed);
        }
        if upstream_failed {
            self.errors.fetch_add(1, Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_MS
            .iter()
            .position(|b| us <= b * 1_000)
            .unwrap_or(BUCKETS_MS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }
}

impl Counters {
    /// Counts a response whose body its backend broke off or stalled.
    pub fn broke(&self) {
        self.broken.fetch_add(1, Relaxed);
    }

    /// Counts a gRPC answer's `grpc-status` (in its head, or its trailers) when it stands
    /// for a server's failure: the codes gRPC's HTTP mapping puts in 5xx (UNKNOWN,
    /// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), or is missing
    /// (an answer that ended, or broke, without one). A client's mistakes (NOT_FOUND,
    /// INVALID_ARGUMENT…) are not counted, as 4xx are not errors.
    pub fn grpc_status(&self, status: Option<&[u8]>) {
        let failed = match status.map(<[u8]>::trim_ascii) {
            Some(code) => matches!(code, b"2" | b"4" | b"12" | b"13" | b"14" | b"15"),
            None => true,
        };
        if failed {
            self.grpc_errors.fetch_add(1, Relaxed);
        }
    }
}

impl Counters {
    /// Counts a copy's answer compared with its primary's, and whether they differed.
    pub fn compared(&self, differed: bool) {
        self.compared.fetch_add(1, Relaxed);
        if differed {
            self.differed.fetch_add(1, Relaxed);
        }
    }
}

/// Process-wide counters that belong to no route.
#[derive(Debug, Default)]
pub struct Global {
    /// Gauge: client connections open now.
    pub connections_open: AtomicU64,
    /// Gauge: HTTP/1.1 connections waiting for their next request without buffers.
    pub connections_idle: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub bad_requests: AtomicU64,
    pub no_route: AtomicU64,
    /// Requests answered 503 at once because `max_requests` were in flight.
    pub requests_shed: AtomicU64,
    pub mirror_shed: AtomicU64,
    pub mirror_skipped_body_too_large: AtomicU64,
    /// Copies not sent: the request body did not reach its end (the client went away, or the
    /// primary was answered without reading it).
    pub mirror_skipped_incomplete: AtomicU64,
    /// Response bodies cut after `upstream.read_timeout` without a byte from their backend.
    pub responses_stalled: AtomicU64,
    /// Responses cut after `limits.send_timeout` in which the client took none of them.
    pub responses_unread: AtomicU64,
    pub table_swaps: AtomicU64,
    pub table_rejected: AtomicU64,
}

type Key = (String, String, Source);
/// Counters by route, then track, then source (indexed by `Source as usize`). Nested so that
/// finding existing counters allocates nothing.
type ByRoute = BTreeMap<String, ByTrack>;

#[derive(Debug)]
pub struct Stats {
    started: SystemTime,
    by_route: Mutex<ByRoute>,
    /// Stands in for a route × track × source no request can reach (see [`Stats::resolve`]).
    unreached: Arc<Counters>,
    pub global: Global,
    /// The last mirrored copies answered otherwise than their primaries.
    pub differences: Arc<crate::mirror::differences::Differences>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: SystemTime::now(),
            by_route: Mutex::default(),
            unreached: Arc::default(),
            global: Global::default(),
            differences: Arc::default(),
        }
    }
}

impl Stats {
    /// The counters of a route, track and source, created on first use and kept across
    /// table swaps (tables resolve them once, when they are built).
    pub fn counters(&self, route: &str, track: &str, source: Source) -> Arc<Counters> {
        let mut map = crate::lock(&self.by_route);
        counters_in(&mut map, route, track, source)
    }

    /// The counters of every route × track × source of a table, under one lock:
    /// `[route][track][source]`. Only the pairs a route can reach get a series (the tracks it
    /// serves as primary, its mirror track as mirror); the others share one set of counters
    /// that nothing increments and nothing shows, so that a table of many routes and tracks
    /// does not grow `/metrics` by every combination.
    pub fn resolve(&self, table: &Table) -> Vec<Vec<[Arc<Counters>; 2]>> {
        let mut map = crate::lock(&self.by_route);
        let tracks = table.tracks().len();
        // Each route looked up once, each track it reaches once: a 10,000-route table is
        // 10,000 lookups among every route seen since start, not 40,000.
        table
            .routes()
            .map(|(_, route)| {
                fleet_proxy_router::pace::point();
                let mut row = vec![[self.unreached.clone(), self.unreached.clone()]; tracks];
                let by_track = entry(&mut map, route.name());
                let reached = route.serves().map(|t| (t, Source::Primary));
                for (track, source) in reached.chain(route.mirror_to().map(|t| (t, Source::Mirror)))
                {
                    let by_source = entry(by_track, table.track(track).name());
                    row[track.index()][source as usize] = of_source(by_source, source);
                }
                row
            })
            .collect()
    }

    fn snapshot(&self) -> Vec<(Key, Arc<Counters>)> {
        let map = crate::lock(&self.by_route);
        let mut out = Vec::new();
        for (route, by_track) in map.iter() {
            fleet_proxy_router::pace::point();
            for (track, by_source) in by_track {
                for (source, c) in [Source::Primary, Source::Mirror].iter().zip(by_source) {
                    if let Some(c) = c {
                        out.push(((route.clone(), track.clone(), *source), c.clone()));
                    }
                }
            }
        }
        out
    }

    pub fn json(&self, table_version: u64) -> Value {
        let since = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let series: Vec<Value> = self
            .snapshot()
            .into_iter()
            .map(|((route, track, source), c)| {
                fleet_proxy_router::pace::point();
                let classes = &c.classes;
                let mut cumulative = 0;
                let buckets: Vec<u64> = c
                    .latency
                    .iter()
                    .map(|b| {
                        cumulative += b.load(Relaxed);
                        cumulative
                    })
                    .collect();
                let mut series = json!({
                    "route": route,
                    "track": track,
                    "source": source.as_str(),
                    "requests": c.requests.load(Relaxed),
                    "grpc_errors": c.grpc_errors.load(Relaxed),
                    "broken": c.broken.load(Relaxed),
                    "responses": {
                        "1xx": classes[0].load(Relaxed), "2xx": classes[1].load(Relaxed),
                        "3xx": classes[2].load(Relaxed), "4xx": classes[3].load(Relaxed),
                        "5xx": classes[4].load(Relaxed),
                    },
                    "errors": c.errors.load(Relaxed),
                    "latency": { "cumulative": buckets, "sum_us": c.latency_sum_us.load(Relaxed) },
                });
                if source == Source::Mirror {
                    series["compared"] = json!(c.compared.load(Relaxed));
                    series["differed"] = json!(c.differed.load(Relaxed));
                }
                series
            })
            .collect();
        let g = &self.global;
        json!({
            "started_unix_ms": since,
            "table_version": table_version,
            "latency_bounds_ms": BUCKETS_MS,
            "series": series,
            "proxy": {
                "connections_open": g.connections_open.load(Relaxed),
                "connections_idle": g.connections_idle.load(Relaxed),
                "connections_accepted": g.connections_accepted.load(Relaxed),
                "connections_rejected": g.connections_rejected.load(Relaxed),
                "bad_requests": g.bad_requests.load(Relaxed),
                "no_route": g.no_route.load(Relaxed),
                "requests_shed": g.requests_shed.load(Relaxed),
                "mirror_shed": g.mirror_shed.load(Relaxed),
                "mirror_skipped_body_too_large": g.mirror_skipped_body_too_large.load(Relaxed),
                "mirror_skipped_incomplete": g.mirror_skipped_incomplete.load(Relaxed),
                "responses_stalled": g.responses_stalled.load(Relaxed),
                "responses_unread": g.responses_unread.load(Relaxed),
                "table_swaps": g.table_swaps.load(Relaxed),
                "table_rejected": g.table_rejected.load(Relaxed),
            },
        })
    }
}

/// One unit of a gauge, held while it lasts.
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    pub fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn counters_in(map: &mut ByRoute, route: &str, track: &str, source: Source) -> Arc<Counters> {
    of_source(entry(entry(map, route), track), source)
}

fn of_source(by_source: &mut BySource, source: Source) -> Arc<Counters> {
    by_source[source as usize]
        .get_or_insert_with(Arc::default)
        .clone()
}

type ByTrack = BTreeMap<String, BySource>;
type BySource = [Option<Arc<Counters>>; 2];

/// The entry under `name`, made empty if new; the name is copied only then.
fn entry<'m, V: Default>(map: &'m mut BTreeMap<String, V>, name: &str) -> &'m mut V {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), V::default());
    }
    map.get_mut(name).expect("inserted above")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// `/stats` is a contract with the agent: this snapshot changes only on purpose.
    #[test]
    fn the_stats_json_keeps_its_shape() {
        let stats = Stats::default();
        let c = stats.counters("web", "canary", Source::Primary);
        c.record(200, false, Duration::from_micros(1_500));
        c.record(503, true, Duration::from_millis(40));
        stats
            .counters("web", "shadow", Source::Mirror)
            .record(0, true, Duration::from_secs(60));
        let mut json = stats.json(3);
        json["started_unix_ms"] = json!(0);
        expect_test::expect![[r#"
            {
              "latency_bounds_ms": [
                1,
                2,
                5,
                10,
                25,
                50,
                100,
                250,
                500,
                1000,
                2500,
                5000,
                10000,
                30000
              ],
              "proxy": {
                "bad_requests": 0,
                "connections_accepted": 0,
                "connections_idle": 0,
                "connections_open": 0,
                "connections_rejected": 0,
                "mirror_shed": 0,
                "mirror_skipped_body_too_large": 0,
                "mirror_skipped_incomplete": 0,
                "no_route": 0,
                "requests_shed": 0,
                "responses_stalled": 0,
                "responses_unread": 0,
                "table_rejected": 0,
                "table_swaps": 0
              },
              "series": [
                {
                  "broken": 0,
                  "errors": 1,
                  "grpc_errors": 0,
                  "latency": {
                    "cumulative": [
                      0,
                      1,
                      1,
                      1,
                      1,
                      2,
                      2,
                      2,
                      2,
                      2,
                      2,
                      2,
                      2,
                      2,
                      2
                    ],
                    "sum_us": 41500
                  },
                  "requests": 2,
                  "responses": {
                    "1xx": 0,
                    "2xx": 1,
                    "3xx": 0,
                    "4xx": 0,
                    "5xx": 1
                  },
                  "route": "web",
                  "source": "primary",
                  "track": "canary"
                },
                {
                  "broken": 0,
                  "compared": 0,
                  "differed": 0,
                  "errors": 1,
                  "grpc_errors": 0,
                  "latency": {
                    "cumulative": [
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      0,
                      1
                    ],
                    "sum_us": 60000000
                  },
                  "requests": 1,
                  "responses": {
                    "1xx": 0,
                    "2xx": 0,
                    "3xx": 0,
                    "4xx": 0,
                    "5xx": 0
                  },
                  "route": "web",
                  "source": "mirror",
                  "track": "shadow"
                }
              ],
              "started_unix_ms": 0,
              "table_version": 3
            }"#]]
        .assert_eq(&serde_json::to_string_pretty(&json).unwrap());
    }

    thread_local! {
        static STOPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// The router's stops (see `fleet_proxy_router::pace`) that `work` makes on this thread.
    fn stops_in<T>(work: impl FnOnce() -> T) -> u64 {
        fleet_proxy_router::pace::on_this_thread(|| STOPS.set(STOPS.get() + 1));
        let before = STOPS.get();
        std::hint::black_box(work());
        STOPS.get() - before
    }

    /// `/stats` and `/metrics` of a large table are rendered on a background thread, which
    /// must give the core back along the way: a point per series in every pass over them.
    #[test]
    fn rendering_many_series_stops_along_the_way() {
        const SERIES: u64 = 800;
        let stats = Stats::default();
        for i in 0..SERIES {
            stats.counters(&format!("svc{i}.test"), "stable", Source::Primary);
        }
        // A point per route taking the snapshot, then per series: a stop per eight points.
        assert_eq!(stops_in(|| stats.json(1)), 2 * SERIES / 8);
        // The snapshot, then six families of metrics.
        assert_eq!(stops_in(|| stats.prometheus(1)), 7 * SERIES / 8);
    }
}
