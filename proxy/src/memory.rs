//! When to hand freed memory back to the system after a burst.
//!
//! mimalloc returns the pages a thread freed only when that thread allocates again. A proxy
//! that served 10,000 new connections at once and then went quiet kept 31–163 MiB (median 85)
//! where its parked connections need 26: their serving state was freed, its pages never given
//! back (`benches/README.md`). So when many connections stop being served at once (they park
//! or close), the periodic sweep asks the allocator to give back what is free
//! (`fleet_proxy_alloc::release_free`). Under steady load the number being served moves up and
//! down by little, and the allocator's own lazy return is left alone: purging eagerly costs
//! page faults (`MIMALLOC_PURGE_DELAY=0` took 0.3–0.6 per request).
//!
//! The sweep runs on one thread that serves traffic; only that thread's heap is visited. At
//! one worker thread (what the benchmarks measure) that is all of them.

/// How far the number of connections being served must fall from its peak since memory was
/// last given back: a connection's serving state is about 16 KiB, so this is some 16 MiB.
pub const RELEASE_AFTER: u64 = 1_000;

/// How far the fall must have gone on after a release, once it ends, for what it freed to be
/// given back too (some 1.6 MiB).
pub const RELEASE_TAIL: u64 = 100;

/// Decides, from the connection gauges read at each sweep, when to give memory back.
#[derive(Debug, Default)]
pub struct Release {
    /// The most connections seen being served (open, not parked) since the last release.
    peak: u64,
    /// After a release, while the number served keeps falling: the number at the release and
    /// the lowest since.
    tail: Option<(u64, u64)>,
}

impl Release {
    /// Takes the connections open and parked now; true when the number being served has
    /// fallen by at least [`RELEASE_AFTER`] from its peak since the last `true`, or when a
    /// fall that went on after a release by at least [`RELEASE_TAIL`] has ended (the last of a
    /// wave of parking connections, too few to reach the threshold on their own).
    pub fn observe(&mut self, open: u64, parked: u64) -> bool {
        let serving = open.saturating_sub(parked);
        self.peak = self.peak.max(serving);
        if self.peak - serving >= RELEASE_AFTER {
            self.peak = serving;
            self.tail = Some((serving, serving));
            return true;
        }
        match self.tail {
            Some((at, lowest)) if serving < lowest => {
                self.tail = Some((at, serving));
                false
            }
            Some((at, lowest)) => {
                self.tail = None;
                self.peak = serving;
                at - lowest >= RELEASE_TAIL
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_back_when_many_connections_stop_being_served_at_once() {
        let mut r = Release::default();
        assert!(!r.observe(10_000, 0), "a burst arrives");
        assert!(!r.observe(10_000, 600), "600 parked");
        assert!(r.observe(9_600, 600), "and 400 closed: 1,000 fewer served");
        assert!(
            r.observe(9_600, 9_000),
            "8,400 more parked: below the new peak of 9,000"
        );
        assert!(
            !r.observe(9_600, 9_600),
            "the last 600: not yet another thousand"
        );
        assert!(
            r.observe(9_600, 9_600),
            "the fall has ended: what the last 600 freed goes back too"
        );
        assert!(!r.observe(9_600, 9_600), "and only once");
        assert!(!r.observe(12_000, 9_600), "a new burst: 2,400 served");
        assert!(r.observe(9_600, 9_600), "and done");
    }

    #[test]
    fn a_fall_that_goes_on_after_a_release_by_too_little_is_left_to_the_allocator() {
        let mut r = Release::default();
        assert!(!r.observe(10_000, 0));
        assert!(r.observe(10_000, 9_000), "9,000 parked");
        assert!(!r.observe(10_000, 9_050), "50 more");
        assert!(
            !r.observe(10_000, 9_050),
            "then none: 50 is not worth a release"
        );
        assert!(
            !r.observe(10_000, 9_500),
            "a later fall, not a release's tail, waits for the threshold"
        );
    }

    #[test]
    fn a_wave_of_parking_is_given_back_once_it_reaches_the_threshold() {
        let mut r = Release::default();
        assert!(!r.observe(10_000, 0));
        assert!(r.observe(10_000, 9_999), "9,999 fewer served");
        assert!(
            !r.observe(10_000, 10_000),
            "one more is not another thousand"
        );
        assert!(
            !r.observe(9_000, 9_000),
            "a parked connection closing frees no serving state"
        );
    }

    #[test]
    fn steady_traffic_that_goes_up_and_down_never_gives_memory_back() {
        let mut r = Release::default();
        // An hour of sweeps: ±50 connections served around 9,000, and opening and closing.
        for i in 0..3_600u64 {
            let wobble = (i * 37) % 101;
            assert!(
                !r.observe(10_000 + wobble, 1_000 + (i * 53) % 101),
                "sweep {i}"
            );
        }
    }
}
