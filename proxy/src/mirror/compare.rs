//! A mirrored copy's answer compared with its primary's (`mirror: { compare: status | body }`).
//! Each side reports its answer once it has it whole; the second to report compares the two
//! and counts the copy under its mirror series (`compared`, `differed`). A side that gets no
//! answer from its backend (a failure, a timeout, its client gone, a copy shed or skipped)
//! reports nothing, and that copy is not compared: a shadow's failures are counted as its
//! errors already, the primary's are not the copy's difference.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fleet_proxy_router::{Compare, RouteId, TrackId};

use crate::body::{Digest, Watcher};
use crate::state::Active;
use crate::stats::Source;

/// What is compared of one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// A digest of the body's bytes, when bodies are compared.
    pub body: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Primary,
    Copy,
}

/// The two answers to one mirrored request.
pub struct Pair {
    compare: Compare,
    active: Arc<Active>,
    route: RouteId,
    /// The mirror track, under whose series the comparison counts.
    track: TrackId,
    first: Mutex<Option<(Side, Answer)>>,
}

impl Pair {
    pub fn new(compare: Compare, active: Arc<Active>, route: RouteId, track: TrackId) -> Self {
        Pair {
            compare,
            active,
            route,
            track,
            first: Mutex::new(None),
        }
    }

    /// Whether bodies are compared, not statuses alone.
    pub fn bodies(&self) -> bool {
        self.compare == Compare::Body
    }

    /// One side's whole answer. The second side to answer compares and counts.
    pub fn answered(&self, side: Side, answer: Answer) {
        let first = {
            let mut slot = crate::lock(&self.first);
            match slot.take() {
                Some(first) => first,
                None => {
                    *slot = Some((side, answer));
                    return;
                }
            }
        };
        debug_assert_ne!(first.0, side, "each side answers once");
        let differed = first.1 != answer;
        let (route, track) = (self.route, self.track);
        self.active
            .counters(route, track, Source::Mirror)
            .compared(differed);
        if differed {
            let (primary, copy) = match side {
                Side::Copy => (first.1, answer),
                Side::Primary => (answer, first.1),
            };
            tracing::debug!(
                route = self.active.table.route(route).name(),
                primary = primary.status,
                copy = copy.status,
                bodies_differ = primary.body != copy.body,
                "a mirrored copy was answered differently"
            );
        }
    }
}

/// The primary's answer on its way to the client, [`Watch`](crate::body::Watch)ed: its body's
/// digest is taken as it passes, and the answer reported once the body has ended. A body that
/// fails or is dropped before its end (the client went away) reports nothing.
pub struct PrimaryBody {
    status: u16,
    digest: Digest,
    pair: Arc<Pair>,
}

impl PrimaryBody {
    pub fn new(status: u16, pair: Arc<Pair>) -> Self {
        PrimaryBody {
            status,
            digest: Digest::new(),
            pair,
        }
    }
}

impl Watcher for PrimaryBody {
    fn data(&mut self, data: &Bytes) {
        self.digest.update(data);
    }

    fn end(&mut self, whole: bool) {
        if whole {
            let body = Some(self.digest.finish());
            let answer = Answer {
                status: self.status,
                body,
            };
            self.pair.answered(Side::Primary, answer);
        }
    }
}
