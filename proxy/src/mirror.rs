//! Mirroring: copies of sampled requests go to the mirror track from a bounded queue and a
//! bounded set of tasks. The primary only ever does a `try_send`; when the mirror is slow
//! or down the queue fills and further copies are shed and counted, never waited for.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use fleet_proxy_router::{RouteId, TrackId};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

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

    /// Starts `concurrency` workers that take copies off the queue one at a time; they end
    /// when `shared` is dropped. Long-lived workers, not a task per copy: a copy then costs
    /// a queue hand-off rather than a spawn.
    pub fn start(shared: &Arc<Shared>) {
        let rx = crate::lock(&shared.mirror.rx).take();
        let Some(rx) = rx else { return };
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..shared.settings.mirror.concurrency {
            let (rx, weak) = (rx.clone(), Arc::downgrade(shared));
            tokio::spawn(async move {
                loop {
                    // One idle worker waits on the queue; the others wait for their turn.
                    let Some(job) = rx.lock().await.recv().await else {
                        return;
                    };
                    let Some(shared) = weak.upgrade() else { return };
                    run(&shared, job).await;
                }
            });
        }
    }

    /// Queues a copy if there is room; otherwise counts it as shed.
    pub fn offer(&self, shared: &Shared, job: Job) {
        if self.tx.try_send(job).is_err() {
            shared.stats.global.mirror_shed.fetch_add(1, Relaxed);
        }
    }
}

async fn run(shared: &Shared, job: Job) {
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
