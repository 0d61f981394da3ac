//! gRPC's outcome. A gRPC answer is an HTTP 200 whatever became of the call: what became of
//! it is its `grpc-status`, in the head of a trailers-only answer or in the trailers (for
//! gRPC-Web, in the body's last message). Counted for the primary and the mirror alike.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, response};

use crate::body::Trailers;
use crate::stats::Counters;

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Which gRPC a message is, by its `content-type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Grpc {
    #[default]
    No,
    /// `application/grpc`: the status is in the head of a trailers-only answer or in the
    /// trailers.
    Native,
    /// `application/grpc-web`: in the head of a trailers-only answer or in the body's last
    /// message, flagged as trailers.
    Web,
    /// `application/grpc-web-text`: its body is base64, so only a trailers-only head is read.
    WebText,
}

impl Grpc {
    /// Each alone or with a `+format` or parameters, in any case (RFC 9110 §8.3.1).
    pub fn of(value: &HeaderValue) -> Grpc {
        /// What follows `word` at the start of `v`, in any case.
        fn after<'a>(v: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
            let head = v.get(..word.len())?;
            head.eq_ignore_ascii_case(word).then(|| &v[word.len()..])
        }
        let ends = |rest: &[u8]| matches!(rest.first(), None | Some(b'+' | b';' | b' '));
        let Some(rest) = after(value.as_bytes(), b"application/grpc") else {
            return Grpc::No;
        };
        if ends(rest) {
            return Grpc::Native;
        }
        match after(rest, b"-web") {
            Some(rest) if ends(rest) => Grpc::Web,
            Some(rest) => match after(rest, b"-text") {
                Some(rest) if ends(rest) => Grpc::WebText,
                _ => Grpc::No,
            },
            None => Grpc::No,
        }
    }
}

/// A gRPC call's outcome, when the answer is of the request's own kind of gRPC: counted at
/// once when the head tells it (a trailers-only answer, or one that `ended` at its head
/// with no status, a failure), else handed back as what to do with the trailers, for
/// [`watch`]. `None` too for other answers, and for `grpc-web-text`'s base64 bodies, which
/// are not read.
pub fn outcome(
    request: Grpc,
    answer: Grpc,
    head: &response::Parts,
    ended: bool,
    counters: &Arc<Counters>,
) -> Option<impl FnOnce(Option<&HeaderMap>) + Send + Sync + Unpin + 'static> {
    // Any other status is counted by its class already; a gRPC answer is a 200.
    if request == Grpc::No || request != answer || head.status != StatusCode::OK {
        return None;
    }
    match head.headers.get(GRPC_STATUS) {
        Some(status) => counters.grpc_status(Some(status.as_bytes())),
        // No body to read: no status either.
        None if ended => counters.grpc_status(None),
        None if request == Grpc::WebText => {}
        None => {
            let counters = counters.clone();
            return Some(move |trailers: Option<&HeaderMap>| {
                let status = trailers.and_then(|t| t.get(GRPC_STATUS));
                counters.grpc_status(status.map(HeaderValue::as_bytes));
            });
        }
    }
    None
}

/// `body`, showing `seen` (from [`outcome`]) its trailers: its HTTP trailers, or for
/// gRPC-Web the message flagged as trailers.
pub fn watch<B, F>(kind: Grpc, body: B, seen: F) -> Trailers<B, F> {
    match kind {
        Grpc::Web => Trailers::grpc_web(body, seen),
        _ => Trailers::new(body, seen),
    }
}
