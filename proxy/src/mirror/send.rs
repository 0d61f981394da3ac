//! Sending a batch of copies. Those that can share a connection are grouped by the backend
//! round robin picks for each and pipelined, a group to a connection
//! ([`upstream::pipeline`]); the others (copies over HTTP/2, with a body over
//! [`PIPELINED_BODY_MAX`], asking for an upgrade or a `100 Continue`, or gRPC calls, whose
//! outcome is in their trailers) go each on its own through [`upstream::send`], as a primary
//! request does.

use std::sync::Arc;

use http::header;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::Job;
use super::compare::{Answer, Answering, Side};
use crate::body::{Watch, boxed};
use crate::grpc::{self, Grpc};
use crate::state::Shared;
use crate::stats::{Counters, Source};
use crate::upstream::{self, Backend, Outgoing};

/// Largest body a pipelined copy carries; a larger one goes on its own, rather than be
/// copied again into the pipeline's write.
pub const PIPELINED_BODY_MAX: usize = 16 * 1024;

/// A share of a batch, sent by one task.
pub enum Work {
    /// Copies to one backend, pipelined on one connection.
    Pipelined(Arc<Backend>, Vec<Job>),
    /// Boxed: the fewer, and the batch's plan stays small.
    Single(Box<Job>),
}

impl Work {
    pub fn copies(&self) -> usize {
        match self {
            Work::Pipelined(_, jobs) => jobs.len(),
            Work::Single(_) => 1,
        }
    }
}

/// Shares a batch out: the copies that may be pipelined (none unless `pipeline`) by
/// backend, the rest one by one.
pub fn plan(batch: impl IntoIterator<Item = Job>, pipeline: bool) -> Vec<Work> {
    let mut work: Vec<Work> = Vec::new();
    for job in batch {
        let backend = (pipeline && pipelines(&job))
            .then(|| {
                let start = job.active.next_index(job.track);
                upstream::pick(job.active.backends(job.track), start).cloned()
            })
            .flatten();
        let Some(backend) = backend else {
            work.push(Work::Single(Box::new(job)));
            continue;
        };
        let group = work.iter_mut().find_map(|w| match w {
            Work::Pipelined(b, jobs) if Arc::ptr_eq(b, &backend) => Some(jobs),
            _ => None,
        });
        match group {
            Some(jobs) => jobs.push(job),
            None => work.push(Work::Pipelined(backend, vec![job])),
        }
    }
    work
}

/// Whether a copy may share a connection with others: HTTP/1.1, a small body, nothing that
/// would make the backend answer out of step (a protocol switch, `100 Continue`), and not a
/// gRPC call (the pipeline reads no trailers).
fn pipelines(job: &Job) -> bool {
    !job.http2
        && job.body.len() <= PIPELINED_BODY_MAX
        && !job.parts.headers.contains_key(header::UPGRADE)
        && !job.parts.headers.contains_key(header::EXPECT)
        && grpc(&job.parts.headers) == Grpc::No
}

/// A gRPC call's copy, whose outcome is counted: gRPC's own (gRPC-Web copies count by
/// their HTTP status).
fn grpc(headers: &http::HeaderMap) -> Grpc {
    match headers.get(header::CONTENT_TYPE).map(Grpc::of) {
        Some(Grpc::Native) => Grpc::Native,
        _ => Grpc::No,
    }
}

/// Sends one share of a batch and counts each copy under the mirror track.
pub async fn run(shared: Arc<Shared>, work: Work) {
    match work {
        Work::Pipelined(backend, jobs) => pipelined(&shared, &backend, &jobs).await,
        Work::Single(job) => single(&shared, *job).await,
    }
}

async fn pipelined(shared: &Shared, backend: &Backend, jobs: &[Job]) {
    let started = Instant::now();
    let deadline = started + shared.settings.mirror.timeout;
    let copies: Vec<_> = jobs.iter().map(|j| (&j.parts, &j.body[..])).collect();
    let digests = jobs
        .iter()
        .any(|j| j.pair.as_ref().is_some_and(|p| p.bodies()));
    let mut from = 0;
    // Those the backend closed the connection before processing go again, on another.
    while from < jobs.len() {
        let answers = upstream::pipeline(
            &shared.settings.upstream,
            backend,
            &copies[from..],
            deadline,
            digests,
        )
        .await;
        for (job, (status, at, digest)) in jobs[from..].iter().zip(&answers.statuses) {
            count(job.counters(), Some(status.as_u16()), *at - started);
            if let Some(pair) = &job.pair {
                let body = digest.filter(|_| pair.bodies());
                let (status, grpc) = (status.as_u16(), None);
                pair.answered(Side::Copy, Answer { status, grpc, body });
            }
        }
        from += answers.statuses.len();
        if answers.failed.is_some() || answers.statuses.is_empty() {
            let mut behind = jobs[from..].iter();
            // One whose answer had begun counts by its head, as on a connection of its own.
            if let Some((status, at)) = answers.cut
                && let Some(job) = behind.next()
            {
                count(job.counters(), Some(status.as_u16()), at - started);
            }
            let failed = started.elapsed();
            for job in behind {
                count(job.counters(), None, failed);
            }
            return;
        }
    }
}

async fn single(shared: &Shared, job: Job) {
    let started = Instant::now();
    let Job {
        active,
        route,
        track,
        parts,
        body,
        http2,
        auto,
        pair,
    } = job;
    let call = grpc(&parts.headers);
    let mut out = Outgoing {
        parts,
        body: Some(crate::body::full(body)),
        http2,
        auto,
        retryable: false,
        upgrade: false,
        marked: true,
    };
    let start = active.next_index(track);
    let sending = upstream::send(
        &shared.settings.upstream,
        active.backends(track),
        start,
        active.table.track(track).name(),
        &mut out,
    );
    // The timeout covers the whole copy: its answer's head, then its body.
    let deadline = started + shared.settings.mirror.timeout;
    let counters = active.counters(route, track, Source::Mirror);
    let resp = match tokio::time::timeout_at(deadline, sending).await {
        Ok(Ok(resp)) => resp,
        _ => return count(counters, None, started.elapsed()),
    };
    // As for the primary, the status counts once it came, whatever becomes of the body.
    let status = resp.status().as_u16();
    count(counters, Some(status), started.elapsed());
    let (head, body) = resp.into_parts();
    // Compared with the primary's answer once whole: at once, or once its body is read.
    let answering =
        pair.and_then(|pair| Answering::new(Side::Copy, pair, &head, call == Grpc::Native));
    let ended = http_body::Body::is_end_stream(&body);
    let outcome = grpc::outcome(call, grpc(&head.headers), &head, ended, counters);
    // Read to the end so the connection goes back to the pool. Cut by the timeout, a call
    // has no outcome of its own, as a primary whose client left: its trailers are not seen,
    // and it is not compared.
    let read = async {
        match (outcome, answering) {
            (Some(seen), None) => drain(grpc::watch(call, body, seen)).await,
            (None, None) => drain(body).await,
            (outcome, Some(answering)) => {
                let body = match outcome {
                    Some(seen) => boxed(grpc::watch(call, body, seen)),
                    None => boxed(body),
                };
                drain(Watch::new(body, answering)).await;
            }
        }
    };
    let _cut = tokio::time::timeout_at(deadline, read).await;
}

/// Reads a body to its end, or to its first error, keeping nothing.
async fn drain<B: http_body::Body + Unpin>(mut body: B) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// Counts a copy's outcome: its status, or (`None`) an error.
fn count(counters: &Counters, status: Option<u16>, took: std::time::Duration) {
    counters.record(status.unwrap_or(0), status.is_none(), took);
}

impl Job {
    /// Where the copy's outcome is counted: under the mirror track.
    fn counters(&self) -> &Counters {
        self.active.counters(self.route, self.track, Source::Mirror)
    }
}
