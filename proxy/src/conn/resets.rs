//! HTTP/2 clients that reset their streams before the answer (CVE-2023-44487, "rapid reset").
//!
//! h2 itself limits resets of streams not yet handed to the proxy. A stream reset after that
//! has been routed and sent on: its backend exchange is dropped half done, and an HTTP/1.1
//! backend connection with it. With 1,000 streams allowed at once, a client could make the
//! proxy open and drop backend connections as fast as it sends frames.
//!
//! So a forwarded request dropped before its answer within [`PREMATURE`] of its start counts
//! as an early reset, and a connection is closed once its early resets reach [`LIMIT`] and are
//! half its forwarded requests or more (requests the proxy answers itself, a 404 for no route,
//! do not dilute the share). Envoy's rule is alike: "premature" resets within a second,
//! half of 500 streams. A client whose deadlines are seconds long, or that cancels now and
//! then (a browser leaving a page), is nowhere near it.

use std::time::Duration;

/// A request dropped sooner than this after it began is an early reset.
pub const PREMATURE: Duration = Duration::from_secs(1);

/// Early resets a connection may make before the share is looked at.
pub const LIMIT: u64 = 100;

/// Whether a connection with `resets` early resets of its `forwarded` requests is closed.
pub fn too_many(resets: u64, forwarded: u64) -> bool {
    resets >= LIMIT && resets * 2 >= forwarded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_closed_for_many_resets_that_are_half_its_requests_or_more() {
        assert!(!too_many(LIMIT - 1, LIMIT - 1), "under the limit");
        assert!(too_many(LIMIT, LIMIT), "every request reset");
        assert!(too_many(LIMIT, 2 * LIMIT), "half of them");
        assert!(!too_many(LIMIT, 2 * LIMIT + 1), "under half");
        assert!(
            !too_many(10_000, 100_000),
            "a long-lived client that cancels now and then"
        );
    }
}
