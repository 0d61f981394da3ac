//! What every request shares: the table in force (one `ArcSwap`), backend health, counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use fleet_proxy_router::{RouteId, Table, TrackId};

use crate::config::Settings;
use crate::mirror::Mirror;
use crate::stats::{Counters, Source, Stats};
use crate::upstream::Backend;

/// A table in force, with what the data plane resolved for it once, off the hot path:
/// each track's backends (whose health outlives the table) and each route × track's counters.
pub struct Active {
    pub version: u64,
    pub table: Table,
    backends: Vec<Vec<Arc<Backend>>>,
    next: Vec<AtomicUsize>,
    counters: Vec<Vec<[Arc<Counters>; 2]>>,
}

impl Active {
    pub fn backends(&self, track: TrackId) -> &[Arc<Backend>] {
        &self.backends[track.index()]
    }

    /// Each backend the table names, once (an address several tracks name is one backend,
    /// with one health), by address.
    pub fn distinct_backends(&self) -> Vec<&Arc<Backend>> {
        let mut all: Vec<&Arc<Backend>> = self.backends.iter().flatten().collect();
        all.sort_by(|a, b| a.addr.cmp(&b.addr));
        all.dedup_by(|a, b| a.addr == b.addr);
        all
    }

    /// Where round robin starts for this request on `track`.
    pub fn next_index(&self, track: TrackId) -> usize {
        self.next[track.index()].fetch_add(1, Ordering::Relaxed)
    }

    pub fn counters(&self, route: RouteId, track: TrackId, source: Source) -> &Arc<Counters> {
        &self.counters[route.index()][track.index()][source as usize]
    }
}

/// Its counters are let go a few routes at a time, as its table is freed (see
/// `fleet_proxy_router::pace`).
impl Drop for Active {
    fn drop(&mut self) {
        fleet_proxy_router::pace::release(std::mem::take(&mut self.counters));
    }
}

/// How long past the request timeout a retired table waits for its last requests before the
/// last of them is left to free it.
const RETIRE_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Shared {
    pub settings: Settings,
    active: ArcSwap<Active>,
    /// Serializes installs so that versions increase and compare-and-swap is exact.
    install: Mutex<()>,
    health: Mutex<HashMap<String, Arc<Backend>>>,
    pub stats: Stats,
    pub mirror: Mirror,
    pub draining: AtomicBool,
    /// A table has been put through `PUT /routes` since the start (`await_put`).
    pub put: AtomicBool,
    /// Requests in flight across the proxy, against `limits.max_requests`.
    pub admissions: Arc<crate::conn::Admissions>,
}

/// Where a table to install comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `PUT /routes`.
    Put,
    /// The config file, read again.
    File,
}

/// Why a table was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The change was based on another version than the one in force.
    #[error("table version {expected} is not the one in force ({current})")]
    Conflict { expected: u64, current: u64 },
    /// With `await_put`, the file's table once one has come through `PUT /routes`.
    #[error("the table put through PUT /routes stays in force (await_put)")]
    PutTableKept,
}

impl Shared {
    pub fn new(settings: Settings, table: Table) -> Arc<Shared> {
        let stats = Stats::default();
        let health = Mutex::default();
        let first = resolve(1, table, &settings, &health, &stats);
        let mirror = Mirror::new(&settings.mirror);
        let admissions = crate::conn::Admissions::new(settings.limits.max_requests);
        let shared = Arc::new(Shared {
            settings,
            active: ArcSwap::from_pointee(first),
            install: Mutex::new(()),
            health,
            stats,
            mirror,
            draining: AtomicBool::new(false),
            put: AtomicBool::new(false),
            admissions,
        });
        shared
            .stats
            .global
            .table_swaps
            .fetch_add(1, Ordering::Relaxed);
        shared
    }

    /// Forgets backends that no table names any more, closing their pooled connections, and
    /// closes the stale idle connections of the others.
    pub fn sweep_backends(&self) {
        // An install in the background may hold the map: skip this sweep rather than have the
        // thread serving traffic wait for a thread the scheduler puts last.
        let Some(mut health) = crate::try_lock(&self.health) else {
            return;
        };
        // Only this map holds such a backend: no table in force, no request in flight.
        health.retain(|_, backend| Arc::strong_count(backend) > 1);
        for backend in health.values() {
            backend.sweep();
        }
    }

    /// The table in force. A request holds on to it until it is done, whatever swaps happen.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Puts `table`, from `origin`, in force and returns its version. With `expected`, only
    /// if the version in force is that one. With `await_put`, a table from the file only
    /// until one has come through `PUT /routes`; decided under the install lock, so that a
    /// reload and a `PUT` at once cannot leave the file's table in force.
    pub fn install(
        &self,
        table: Table,
        expected: Option<u64>,
        origin: Origin,
    ) -> Result<u64, InstallError> {
        let _one_at_a_time = crate::lock(&self.install);
        let current = self.active.load().version;
        if let Some(expected) = expected.filter(|e| *e != current) {
            return Err(InstallError::Conflict { expected, current });
        }
        if origin == Origin::File && self.settings.await_put && self.put.load(Ordering::Relaxed) {
            return Err(InstallError::PutTableKept);
        }
        let next = resolve(
            current + 1,
            table,
            &self.settings,
            &self.health,
            &self.stats,
        );
        let retired = self.active.swap(Arc::new(next));
        // Requests still on the old table finish on it; whoever is last frees it. Let that
        // be a background thread rather than the thread serving traffic.
        let patience = self.settings.upstream.request_timeout + RETIRE_SLACK;
        crate::background::retire(retired, patience);
        self.stats
            .global
            .table_swaps
            .fetch_add(1, Ordering::Relaxed);
        if origin == Origin::Put {
            self.put.store(true, Ordering::Relaxed);
        }
        tracing::info!(version = current + 1, "route table installed");
        Ok(current + 1)
    }
}

fn resolve(
    version: u64,
    table: Table,
    settings: &Settings,
    health: &Mutex<HashMap<String, Arc<Backend>>>,
    stats: &Stats,
) -> Active {
    // Held only while the backends are looked up: the traffic thread's sweep takes it too,
    // and a background build must not keep it through the counters below.
    let mut health = crate::lock(health);
    let backends: Vec<Vec<Arc<Backend>>> = table
        .tracks()
        .map(|(_, t)| {
            t.backends()
                .iter()
                .map(|addr| {
                    health
                        .entry(addr.clone())
                        .or_insert_with(|| Arc::new(Backend::new(addr, &settings.upstream)))
                        .clone()
                })
                .collect()
        })
        .collect();
    drop(health);
    let counters = stats.resolve(&table);
    // Each table starts round robin at a random backend: were it always the first, a fleet
    // pushing tables often would load every track's first backend the most.
    let next = (backends.iter())
        .map(|b| AtomicUsize::new(rand::random_range(0..b.len().max(1))))
        .collect();
    Active {
        version,
        table,
        backends,
        next,
        counters,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::cell::Cell;

    use super::*;

    thread_local! {
        static STOPS: Cell<u64> = const { Cell::new(0) };
    }

    /// The router's stops (see `fleet_proxy_router::pace`) that dropping `value` makes on
    /// this thread.
    fn stops_dropping<T>(value: T) -> u64 {
        fleet_proxy_router::pace::on_this_thread(|| STOPS.set(STOPS.get() + 1));
        let before = STOPS.get();
        drop(value);
        STOPS.get() - before
    }

    fn check(src: &str) -> (Settings, Table) {
        crate::config::check(src, std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn each_table_starts_round_robin_at_a_random_backend() {
        let src = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntracks:\n  stable: { backends: [\"127.0.0.1:9\", \"127.0.0.1:10\"] }\nroutes:\n  - { split: { stable: 10000 } }\n";
        let (health, stats) = (Mutex::default(), Stats::default());
        // One request per table, as when tables come faster than requests: with a fixed
        // start all 64 would go to one backend (a chance of 2^-63 with random starts).
        let firsts: std::collections::HashSet<usize> = (0..64)
            .map(|v| {
                let (settings, table) = check(src);
                let active = resolve(v, table, &settings, &health, &stats);
                let track = active.table.tracks().next().unwrap().0;
                active.next_index(track) % active.backends(track).len()
            })
            .collect();
        assert_eq!(firsts.len(), 2, "{firsts:?}");
    }

    #[test]
    fn a_table_taken_out_of_force_frees_its_counters_with_stops_along_the_way() {
        const ROUTES: u64 = 2_000;
        let table = || {
            let routes: Vec<String> = (0..ROUTES)
                .map(|i| format!(r#"{{"host": "svc{i}.test", "split": {{"stable": 10000}}}}"#))
                .collect();
            let json = format!(
                r#"{{"tracks": {{"stable": {{"backends": ["127.0.0.1:9"]}}}}, "routes": [{}]}}"#,
                routes.join(",")
            );
            fleet_proxy_router::load(&json).unwrap()
        };
        let src = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntracks:\n  stable: { backends: [\"127.0.0.1:9\"] }\nroutes:\n  - { split: { stable: 10000 } }\n";
        let (settings, _) = check(src);
        let (health, stats) = (Mutex::default(), Stats::default());
        let active = resolve(2, table(), &settings, &health, &stats);
        let of_the_table = stops_dropping(table());
        let of_the_active = stops_dropping(active);
        // Beyond its table's, a point per route's counters: a stop per eight.
        assert_eq!(of_the_active - of_the_table, ROUTES / 8);
    }
}
