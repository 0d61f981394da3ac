//! A mirrored copy's answer compared with its primary's (`mirror: { compare: status | body }`).
//! Each side reports its answer once it has it whole; the second to report compares the two
//! and counts the copy under its mirror series (`compared`, `differed`). A side that gets no
//! answer from its backend (a failure, a timeout, its client gone, a copy shed or skipped)
//! reports nothing, and that copy is not compared: a shadow's failures are counted as its
//! errors already, the primary's are not the copy's difference.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use fleet_proxy_router::{Compare, RouteId, TrackId};
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Uri, request, response};

use super::differences::{self, Difference, Differences, cut};
use crate::body::{Digest, Watcher};
use crate::grpc::GRPC_STATUS;
use crate::state::Active;
use crate::stats::Source;

/// What is compared of one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// A gRPC call's outcome (not gRPC-Web's, which copies are not read for): gRPC answers
    /// are HTTP 200 whatever it is.
    pub grpc: Option<HeaderValue>,
    /// A digest of the body's bytes, when bodies are compared.
    pub body: Option<u64>,
}

impl Answer {
    /// The same, holding none of the buffer its `grpc-status` was read from (an HTTP/2
    /// frame's, kilobytes), as a difference kept for long should.
    fn owned(self) -> Answer {
        let grpc = self
            .grpc
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        Answer { grpc, ..self }
    }
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
    /// The request, to name it among the differences kept.
    method: Method,
    uri: Uri,
    differences: Arc<Differences>,
    first: Mutex<Option<(Side, Answer)>>,
}

impl Pair {
    /// For the request in `parts` on `route`, copied to `track`; a difference is kept in
    /// `differences`.
    pub fn new(
        compare: Compare,
        active: Arc<Active>,
        route: RouteId,
        track: TrackId,
        parts: &request::Parts,
        differences: Arc<Differences>,
    ) -> Self {
        Pair {
            compare,
            active,
            route,
            track,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            differences,
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
        if differed {
            let (primary, copy) = match side {
                Side::Copy => (first.1, answer),
                Side::Primary => (answer, first.1),
            };
            self.keep(primary, copy);
        }
        // Counted once kept: whoever sees the count sees the difference.
        let (route, track) = (self.route, self.track);
        self.active
            .counters(route, track, Source::Mirror)
            .compared(differed);
    }

    /// Logs a difference and keeps it for `GET /mirror/differences`.
    fn keep(&self, primary: Answer, copy: Answer) {
        let route = self.active.table.route(self.route).name();
        let bodies_differ = differences::bodies_differ(&primary, &copy);
        tracing::debug!(
            route,
            path = self.uri.path(),
            primary = primary.status,
            copy = copy.status,
            primary_grpc = ?primary.grpc,
            copy_grpc = ?copy.grpc,
            ?bodies_differ,
            "a mirrored copy was answered differently"
        );
        self.differences.record(Difference {
            at: SystemTime::now(),
            route: route.to_owned(),
            track: self.active.table.track(self.track).name().to_owned(),
            method: cut(self.method.as_str(), differences::METHOD_MAX),
            path: cut(self.uri.path(), differences::PATH_MAX),
            primary: primary.owned(),
            copy: copy.owned(),
        });
    }
}

/// One side's answer as it comes, [`Watch`](crate::body::Watch)ed on its way (to the client,
/// or to be dropped): its status, its `grpc-status` (in its head, or its trailers), and with
/// bodies compared a digest of its body. Told to the pair once whole; a body that fails or is
/// dropped before its end (the client went away, the mirror's timeout) tells nothing.
pub struct Answering {
    side: Side,
    answer: Answer,
    digest: Option<Digest>,
    /// An answer to a gRPC call: whole only with its trailers.
    waits_for_trailers: bool,
    pair: Arc<Pair>,
}

impl Answering {
    /// For the answer with `head`; `None` if it is whole already and has been told (statuses
    /// alone are compared, and it is not an answer to a gRPC call, whose outcome may be in
    /// its trailers).
    pub fn new(
        side: Side,
        pair: Arc<Pair>,
        head: &response::Parts,
        grpc_call: bool,
    ) -> Option<Self> {
        let grpc = grpc_call.then(|| head.headers.get(GRPC_STATUS).cloned());
        let answer = Answer {
            status: head.status.as_u16(),
            grpc: grpc.flatten(),
            body: None,
        };
        if !pair.bodies() && !grpc_call {
            pair.answered(side, answer);
            return None;
        }
        Some(Answering {
            side,
            answer,
            digest: pair.bodies().then(Digest::default),
            waits_for_trailers: grpc_call,
            pair,
        })
    }
}

impl Watcher for Answering {
    fn data(&mut self, data: &Bytes) {
        if let Some(digest) = &mut self.digest {
            digest.update(data);
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(status) = trailers.get(GRPC_STATUS) {
            self.answer.grpc = Some(status.clone());
        }
    }

    fn waits_for_trailers(&self) -> bool {
        // A gRPC call's status may be in them, though its length is all there.
        self.waits_for_trailers
    }

    fn end(&mut self, whole: bool) {
        if whole {
            let mut answer = self.answer.clone();
            answer.body = self.digest.as_ref().map(Digest::digest);
            self.pair.answered(self.side, answer);
        }
    }
}
