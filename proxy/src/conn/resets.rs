//! HTTP/2 clients that reset their streams before the answer (CVE-2023-44487, "rapid reset").
//!
//! h2 itself limits resets of streams not yet handed to the proxy. A stream reset after that
//! has been routed and sent on: its backend exchange is dropped half done, and an HTTP/1.1
//! backend connection with it. With 1,000 streams allowed at once, a client could make the
//! proxy open and drop backend connections as fast as it sends frames. Such a connection is
//! closed once its resets before an answer reach [`LIMIT`] and are half its requests or more,
//! as Envoy closes one whose "premature resets" are half of 500 streams; a client that cancels
//! now and then (a browser leaving a page, a gRPC deadline) is nowhere near.

/// Resets before an answer that a connection may make before the share is looked at.
pub const LIMIT: u64 = 100;

/// Whether a connection with `resets` of its `requests` reset before their answer is closed.
pub fn too_many(resets: u64, requests: u64) -> bool {
    resets >= LIMIT && resets * 2 >= requests
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
