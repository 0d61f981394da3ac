//! Handing freed memory back to the system after a burst.
//!
//! mimalloc returns the pages a thread freed only when that thread allocates again. A proxy
//! that served 10,000 new connections at once and then went quiet kept 31–163 MiB (median 85)
//! where its parked connections need 26: their serving state was freed, its pages never given
//! back (`benches/README.md`). So once enough connections have parked or closed, the periodic
//! sweep asks the allocator to give back what is free. Under steady load nothing parks in bulk,
//! and the allocator's own lazy return is left alone: purging eagerly costs page faults
//! (`MIMALLOC_PURGE_DELAY=0` took 0.3–0.6 per request).

/// Connections parked or closed, since memory was last given back, that make it worth doing
/// again: a connection's serving state is about 16 KiB, so this is some 16 MiB.
pub const RELEASE_AFTER: u64 = 1_000;

/// Decides, from the connection gauges read at each sweep, when to give memory back. It counts
/// net changes between sweeps, so steady churn (as many connections waking or opening as
/// parking or closing) adds only its ups and downs.
#[derive(Debug, Default)]
pub struct Release {
    last: Option<(u64, u64)>,
    freed: u64,
}

impl Release {
    /// Takes the connections open and parked now; true when at least [`RELEASE_AFTER`] have
    /// parked or closed since the last `true`.
    pub fn observe(&mut self, open: u64, parked: u64) -> bool {
        if let Some((was_open, was_parked)) = self.last.replace((open, parked)) {
            self.freed += was_open.saturating_sub(open) + parked.saturating_sub(was_parked);
        }
        let due = self.freed >= RELEASE_AFTER;
        if due {
            self.freed = 0;
        }
        due
    }
}

/// Gives back to the system the memory that the calling thread's heap and every arena of the
/// allocator hold free. Takes a few milliseconds with 10,000 connections parked.
#[allow(unsafe_code)] // The one call into the allocator; the rest of the workspace forbids `unsafe`.
pub fn release_free() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time;
    // it visits the calling thread's heap and the shared arenas under their own locks. Where
    // mimalloc is not the global allocator (the tests), it finds nothing to give back.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_back_once_enough_connections_parked_or_closed() {
        let mut r = Release::default();
        assert!(
            !r.observe(10_000, 0),
            "the first reading only sets the baseline"
        );
        assert!(!r.observe(10_000, 600), "600 parked");
        assert!(r.observe(9_600, 600), "and 400 closed: 1,000 in all");
        assert!(!r.observe(9_600, 600), "nothing new");
        assert!(!r.observe(9_600, 100), "connections waking up free nothing");
        assert!(!r.observe(12_000, 100), "nor do new ones");
        assert!(r.observe(11_000, 100), "1,000 closed");
    }
}
