//! Traffic counters summed over sources that each count from their own start: the proxies of
//! a cluster (summed by its agent) and the clusters of a region (summed by the controller).
//!
//! A plain sum of what each source reports goes wrong whenever one of them changes under it:
//! a source that restarts takes its counts out of the sum, one that misses a report takes
//! them out for a while and puts them back later, and one seen for the first time adds all it
//! ever counted, earlier releases' traffic included. The controller judges a region by the
//! difference between two readings, so any of these lands in a verdict. A [`Tally`] adds up
//! what each source counted *between its reports* instead, so its total only grows: a missed
//! report adds nothing until the next one, a source that restarted adds what it counted since
//! its start, and a source first seen adds nothing (its counts are from before the tally
//! looked) unless it started after the tally did. Each run of a source (a source and its
//! start) is followed on its own, so two that report under one name (an agent and its
//! replacement overlapping, one admin URL in front of two proxies) each add what they counted,
//! rather than each report looking like the other's restart. Pure.

use std::collections::HashMap;
use std::hash::Hash;

use crate::v1::{TrackStats, TrafficStats};

#[derive(Debug)]
pub struct Tally<K> {
    /// When this tally began, in ms since the Unix epoch: a source that started after it is
    /// counted whole at its first report.
    since_unix_ms: u64,
    total: TrafficStats,
    /// What each run of each source reported last, and at which report of the tally's.
    last: HashMap<(K, u64), (TrafficStats, u64)>,
    /// Reports taken so far: the tally's clock.
    reports: u64,
}

/// A run not heard from in this many reports (of any source) is forgotten: an agent's proxies
/// report five times a second each, so minutes. One heard from again after is taken as first
/// seen (nothing of it counts until its next report).
const FORGET_AFTER: u64 = 4096;

impl<K: Hash + Eq> Tally<K> {
    pub fn new(since_unix_ms: u64) -> Self {
        Tally {
            since_unix_ms,
            total: TrafficStats::default(),
            last: HashMap::new(),
            reports: 0,
        }
    }

    /// Takes a report of `source`: its counters since it started, at `started_unix_ms` (0 if
    /// it does not say; a restart then shows only as a counter that went down).
    pub fn observe(&mut self, source: K, started_unix_ms: u64, now: TrafficStats) {
        let run = (source, started_unix_ms);
        let added = match self.last.get(&run) {
            // A counter that went down: it restarted without saying, and all is since then.
            Some((last, _)) => difference(&now, last).unwrap_or_else(|| now.clone()),
            // A new run (a restart, or a source not seen before): all of it counts if it
            // began after the tally did.
            None if started_unix_ms > self.since_unix_ms => now.clone(),
            None => TrafficStats::default(),
        };
        add(&mut self.total, &added);
        self.reports += 1;
        self.last.insert(run, (now, self.reports));
        // Runs that ended (restarts) go, now and then.
        if self.reports.is_multiple_of(FORGET_AFTER) {
            let reports = self.reports;
            self.last.retain(|_, (_, at)| reports - *at < FORGET_AFTER);
        }
    }

    /// When the tally began, in ms since the Unix epoch.
    pub fn since_unix_ms(&self) -> u64 {
        self.since_unix_ms
    }

    /// Whether any source has reported.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Everything counted since the tally began.
    pub fn total(&self) -> &TrafficStats {
        &self.total
    }
}

/// `now - last`, or `None` if any counter went down (the source restarted, and its counters
/// are all since then) or its latency buckets changed.
fn difference(now: &TrafficStats, last: &TrafficStats) -> Option<TrafficStats> {
    let track = |now: &Option<TrackStats>, last: &Option<TrackStats>| {
        let zero = TrackStats::default();
        let (now, last) = (
            now.as_ref().unwrap_or(&zero),
            last.as_ref().unwrap_or(&zero),
        );
        let sub = |a: u64, b: u64| a.checked_sub(b);
        let counts = match (now.latency_counts.len(), last.latency_counts.len()) {
            (_, 0) => Some(now.latency_counts.clone()),
            _ if now.latency_bounds_ms != last.latency_bounds_ms => None,
            _ => (now.latency_counts.iter().zip(&last.latency_counts))
                .map(|(a, b)| sub(*a, *b))
                .collect(),
        };
        Some(TrackStats {
            requests: sub(now.requests, last.requests)?,
            errors: sub(now.errors, last.errors)?,
            latency_bounds_ms: now.latency_bounds_ms.clone(),
            latency_counts: counts?,
            compared: sub(now.compared, last.compared)?,
            differed: sub(now.differed, last.differed)?,
        })
    };
    Some(TrafficStats {
        stable: Some(track(&now.stable, &last.stable)?),
        canary: Some(track(&now.canary, &last.canary)?),
    })
}

/// Adds `more` into `into`, track by track.
fn add(into: &mut TrafficStats, more: &TrafficStats) {
    for (into, more) in [
        (&mut into.stable, &more.stable),
        (&mut into.canary, &more.canary),
    ] {
        if let Some(more) = more {
            add_track(into, more);
        }
    }
}

/// Adds `more` into `into`; latency counts only while the buckets agree (sources of another
/// version with other buckets add their counts, not their histograms).
pub fn add_track(into: &mut Option<TrackStats>, more: &TrackStats) {
    let into = into.get_or_insert_with(TrackStats::default);
    into.requests += more.requests;
    into.errors += more.errors;
    into.compared += more.compared;
    into.differed += more.differed;
    if into.latency_bounds_ms.is_empty() {
        into.latency_bounds_ms = more.latency_bounds_ms.clone();
        into.latency_counts = vec![0; more.latency_bounds_ms.len()];
    }
    if into.latency_bounds_ms == more.latency_bounds_ms {
        for (total, n) in into.latency_counts.iter_mut().zip(&more.latency_counts) {
            *total += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stable and canary requests, each with a tenth as errors and all under the one bucket.
    fn stats(stable: u64, canary: u64) -> TrafficStats {
        let track = |n: u64| TrackStats {
            requests: n,
            errors: n / 10,
            latency_bounds_ms: vec![100.0],
            latency_counts: vec![n],
            compared: n / 2,
            differed: n / 20,
        };
        TrafficStats {
            stable: Some(track(stable)),
            canary: Some(track(canary)),
        }
    }

    fn totals(t: &Tally<&str>) -> (u64, u64) {
        let total = t.total();
        let n = |s: &Option<TrackStats>| s.as_ref().map_or(0, |s| s.requests);
        (n(&total.stable), n(&total.canary))
    }

    #[test]
    fn what_a_source_counted_before_the_tally_began_is_not_counted() {
        let mut t = Tally::new(1_000);
        t.observe("a", 500, stats(900, 100));
        assert_eq!(totals(&t), (0, 0));
        t.observe("a", 500, stats(950, 110));
        assert_eq!(totals(&t), (50, 10));
        // A source that started after the tally counts whole: all of it is since.
        t.observe("b", 2_000, stats(7, 3));
        assert_eq!(totals(&t), (57, 13));
        let canary = t.total().canary.clone().unwrap();
        assert_eq!(
            (canary.errors, canary.latency_counts.clone()),
            (1, vec![13])
        );
    }

    #[test]
    fn a_restart_adds_what_was_counted_since_and_the_total_never_goes_down() {
        let mut t = Tally::new(0);
        t.observe("a", 1, stats(100, 10));
        t.observe("b", 1, stats(200, 20));
        assert_eq!(totals(&t), (300, 30));
        // `a` restarted: a new start, fewer requests than before.
        t.observe("a", 2, stats(5, 1));
        assert_eq!(totals(&t), (305, 31));
        // A restart the source does not announce shows as a counter going down.
        t.observe("b", 1, stats(4, 0));
        assert_eq!(totals(&t), (309, 31));
        // And one announced, whose counts happen to be higher, is still taken whole.
        t.observe("a", 3, stats(500, 50));
        assert_eq!(totals(&t), (809, 81));
    }

    #[test]
    fn two_runs_reporting_under_one_name_each_add_what_they_counted() {
        let mut t = Tally::new(0);
        t.observe("a", 1, stats(100, 0));
        t.observe("a", 2, stats(10, 0));
        t.observe("a", 1, stats(150, 0));
        t.observe("a", 2, stats(20, 0));
        t.observe("a", 1, stats(160, 0));
        // Each run whole at its first report (both began after the tally), then its steps.
        assert_eq!(totals(&t), (100 + 10 + 50 + 10 + 10, 0));
    }

    #[test]
    fn runs_that_ended_are_forgotten() {
        let mut t = Tally::new(0);
        for start in 1..=3 {
            t.observe("a", start, stats(10, 0));
        }
        for _ in 0..2 * FORGET_AFTER {
            t.observe("b", 1, stats(1, 0));
        }
        assert_eq!(t.last.len(), 1, "only b's run is left");
        assert_eq!(totals(&t), (31, 0));
    }

    #[test]
    fn a_missed_report_adds_nothing_until_the_next_one() {
        let mut t = Tally::new(0);
        t.observe("a", 1, stats(10, 1));
        t.observe("b", 1, stats(20, 2));
        // `b` does not answer this round; the total stays, then takes up what it missed.
        t.observe("a", 1, stats(15, 1));
        assert_eq!(totals(&t), (35, 3));
        t.observe("b", 1, stats(40, 4));
        assert_eq!(totals(&t), (55, 5));
    }

    #[test]
    fn other_latency_buckets_restart_the_histogram_but_not_the_counts() {
        let mut t = Tally::new(0);
        t.observe("a", 1, stats(10, 0));
        let mut other = stats(12, 0);
        for track in [&mut other.stable, &mut other.canary].into_iter().flatten() {
            track.latency_bounds_ms = vec![50.0, 100.0];
            track.latency_counts = vec![6, 12];
        }
        t.observe("a", 1, other);
        let stable = t.total().stable.clone().unwrap();
        // Taken whole as a restart (the buckets changed with the proxy's version).
        assert_eq!(stable.requests, 22);
        assert_eq!(stable.latency_bounds_ms, [100.0]);
        assert_eq!(stable.latency_counts, [10]);
    }
}
