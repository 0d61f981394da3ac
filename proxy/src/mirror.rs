//! Mirroring: copies of sampled requests go to the mirror track from a bounded queue and a
//! bounded set of tasks. The primary only ever does a `try_send`; when the mirror is slow
//! or down the queue fills and further copies are shed and counted, never waited for.
//!
//! Copies go out in batches: those due within `batch_window` of the first are sent together.
//! A copy sent on its own cost about as much CPU as a whole proxied request, though it is half
//! the socket work: the shadow, lightly loaded, sleeps between copies, and each copy woke it
//! (0.36 wake-ups per copy). A batch wakes it about once (0.09 per copy); 10% mirroring went
//! from 0.89× to 0.96× of the unmirrored throughput (`benches/mirror.sh`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fleet_proxy_router::{RouteId, TrackId};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::MirrorLimits;
use crate::state::{Active, Shared};
use crate::stats::Source;
use crate::upstream::{Outgoing, send};

/// One copy to send: the request as forwarded to the primary, with its whole body; it goes
/// out marked with `x-fleet-mirror: 1` ([`Outgoing::marked`]).
pub struct Job {
    pub active: Arc<Active>,
    pub route: RouteId,
    pub track: TrackId,
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub http2: bool,
}

pub struct Mirror {
    tx: mpsc::Sender<Job>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Job>>>,
}

impl Mirror {
    pub fn new(limits: &MirrorLimits) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue);
        Mirror {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }

    /// Starts the task that sends the copies; it ends when `shared` is dropped.
    pub fn start(shared: &Arc<Shared>) {
        let rx = crate::lock(&shared.mirror.rx).take();
        let Some(rx) = rx else { return };
        let limits = shared.settings.mirror.clone();
        tokio::spawn(dispatch(rx, Arc::downgrade(shared), limits));
    }

    /// Queues a copy if there is room; otherwise counts it as shed.
    pub fn offer(&self, shared: &Shared, job: Job) {
        if self.tx.try_send(job).is_err() {
            shared.stats.global.mirror_shed.fetch_add(1, Relaxed);
        }
    }
}

/// Takes copies off the queue, gathers those due within the batch window of the first, and
/// sends each batch at once, each copy a task of its own. At most `concurrency` copies are
/// gathered or in flight; the rest wait in the queue, which sheds once full. A batch that
/// fills the last place goes at once: waiting could add nothing to it, and a shadow with a
/// backlog is not asleep.
async fn dispatch(mut rx: mpsc::Receiver<Job>, shared: Weak<Shared>, limits: MirrorLimits) {
    let mut batch = Vec::new();
    let mut in_flight = JoinSet::new();
    let window = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(window);
    loop {
        let send_now = tokio::select! {
            biased;
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a mirrored copy's task failed");
                }
                false
            }
            () = &mut window, if !batch.is_empty() => true,
            job = rx.recv(), if batch.len() + in_flight.len() < limits.concurrency => {
                let Some(job) = job else { return };
                batch.push(job);
                let now = limits.batch_window.is_zero()
                    || batch.len() + in_flight.len() >= limits.concurrency;
                if batch.len() == 1 && !now {
                    window.as_mut().reset(Instant::now() + limits.batch_window);
                }
                now
            }
        };
        if send_now {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            for job in batch.drain(..) {
                in_flight.spawn(run(shared.clone(), job));
            }
        }
    }
}

async fn run(shared: Arc<Shared>, job: Job) {
    let started = Instant::now();
    let Job {
        active,
        route,
        track,
        parts,
        body,
        http2,
    } = job;
    let mut out = Outgoing {
        parts,
        body: Some(crate::body::full(body)),
        http2,
        retryable: false,
        client_upgrade: None,
        marked: true,
    };
    let start = active.next_index(track);
    let sending = send(
        &shared.settings.upstream,
        active.backends(track),
        start,
        active.table.track(track).name(),
        &mut out,
    );
    let outcome = tokio::time::timeout(shared.settings.mirror.timeout, async {
        let resp = sending.await.ok()?;
        let status = resp.status().as_u16();
        // Read the answer to the end so the connection goes back to the pool; keep nothing.
        // As for the primary, the status counts once it came, whatever becomes of the body.
        let mut body = resp.into_body();
        while let Some(Ok(_)) = body.frame().await {}
        Some(status)
    })
    .await
    .ok()
    .flatten();
    let counters = active.counters(route, track, Source::Mirror);
    match outcome {
        Some(status) => counters.record(status, false, started.elapsed()),
        // No status to count: only the error.
        None => counters.record(0, true, started.elapsed()),
    }
}
