//! Mirroring: copies of sampled requests go to the mirror track from a bounded queue and a
//! bounded set of tasks. The primary only ever does a `try_send`; when the mirror is slow
//! or down the queue fills and further copies are shed and counted, never waited for.
//!
//! Copies go out in batches: those due within `batch_window` of the first are sent together.
//! A copy sent on its own cost about as much CPU as a whole proxied request, though it is half
//! the socket work: the shadow, lightly loaded, sleeps between copies, and each copy woke it
//! (0.36 wake-ups per copy). A batch wakes it about once (0.09 per copy); 10% mirroring went
//! from 0.89× to 0.96× of the unmirrored throughput (`benches/mirror.sh`). The copies of a
//! batch to one backend are pipelined on one connection ([`send`]): one write for them all.

pub mod compare;
pub mod differences;
mod send;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fleet_proxy_router::{RouteId, TrackId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::MirrorLimits;
use crate::state::{Active, Shared};

/// One copy to send: the request as forwarded to the primary, with its whole body; it goes
/// out marked with `x-fleet-mirror: 1` ([`Outgoing::marked`]).
pub struct Job {
    pub active: Arc<Active>,
    pub route: RouteId,
    pub track: TrackId,
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub http2: bool,
    /// HTTP/2 only because the client spoke it ([`Outgoing::auto`]).
    pub auto: bool,
    /// Its answer is compared with the primary's.
    pub pair: Option<Arc<compare::Pair>>,
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
/// sends each batch at once: a task for each backend's pipelined share and for each copy
/// that goes on its own. At most `concurrency` copies are gathered or in flight; the rest
/// wait in the queue, which sheds once full. A batch that fills the last place goes at once:
/// waiting could add nothing to it, and a shadow with a backlog is not asleep.
async fn dispatch(mut rx: mpsc::Receiver<Job>, shared: Weak<Shared>, limits: MirrorLimits) {
    let mut batch = Vec::new();
    let mut in_flight = JoinSet::new();
    // The copies each task carries, and their sum.
    let mut carrying = HashMap::new();
    let mut carried = 0;
    let window = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(window);
    loop {
        let send_now = tokio::select! {
            biased;
            Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "a mirrored copy's task failed");
                        e.id()
                    }
                };
                carried -= carrying.remove(&id).unwrap_or(0);
                false
            }
            () = &mut window, if !batch.is_empty() => true,
            job = rx.recv(), if batch.len() + carried < limits.concurrency => {
                let Some(job) = job else { return };
                batch.push(job);
                let now = limits.batch_window.is_zero()
                    || batch.len() + carried >= limits.concurrency;
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
            for work in send::plan(batch.drain(..), limits.pipeline) {
                let copies = work.copies();
                let task = in_flight.spawn(send::run(shared.clone(), work));
                carrying.insert(task.id(), copies);
                carried += copies;
            }
        }
    }
}
