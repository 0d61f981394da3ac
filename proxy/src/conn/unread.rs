//! HTTP/2 streams whose client takes none of their response for `send_timeout` are reset.
//!
//! hyper sends a response body on a stream of its own, and asks the body for its next piece
//! only once the client's flow-control window has room for the last one. A client that gives
//! a stream no window (it stopped reading, or withholds `WINDOW_UPDATE`) leaves hyper
//! waiting for room with no timer of its own, holding the backend connection under it. So
//! each stream runs as a task of its own ([`Streams`], hyper's executor) that tells, from
//! the body ([`Pulls`], shared through a task-local), when hyper holds a piece it has no room
//! for, and drops the stream (hyper then resets it: `CANCEL`) once it has held the same
//! piece for `send_timeout`. The timer is made only when a stream first waits for room.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use crate::state::Shared;

tokio::task_local! {
    static PULLS: Arc<Pulls>;
}

/// What a stream's response body tells its task: which piece hyper took last and has not
/// yet come back for (0: none held).
#[derive(Debug, Default)]
pub struct Pulls {
    held: AtomicU64,
}

impl Pulls {
    /// The stream's `Pulls`, when called from the task of an HTTP/2 stream.
    pub fn of_this_stream() -> Option<Arc<Pulls>> {
        PULLS.try_with(Arc::clone).ok()
    }

    /// hyper asks for the next piece: the last one found room.
    pub fn asked(&self) {
        self.held.store(0, Relaxed);
    }

    /// hyper took piece number `piece` (counted from 1) and may hold it until it has room.
    pub fn gave(&self, piece: u64) {
        self.held.store(piece, Relaxed);
    }
}

/// hyper's executor for the streams of one HTTP/2 connection.
#[derive(Clone)]
pub struct Streams {
    pub shared: Arc<Shared>,
    pub send_timeout: Duration,
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Streams {
    fn execute(&self, stream: F) {
        let pulls = Arc::new(Pulls::default());
        tokio::spawn(Stream {
            task: PULLS.scope(pulls.clone(), stream),
            pulls,
            timer: None,
            send_timeout: self.send_timeout,
            shared: self.shared.clone(),
        });
    }
}

pin_project_lite::pin_project! {
    struct Stream<F: Future> {
        #[pin]
        task: TaskLocalFuture<Arc<Pulls>, F>,
        pulls: Arc<Pulls>,
        // The piece the timer was set for, and the timer.
        timer: Option<(u64, Pin<Box<Sleep>>)>,
        send_timeout: Duration,
        shared: Arc<Shared>,
    }
}

impl<F: Future<Output = ()>> Future for Stream<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let held = this.pulls.held.load(Relaxed);
        if held == 0 {
            // Waiting for the backend or the request, not for the client. A timer set
            // earlier may still wake the task once: it then finds nothing held.
            return Poll::Pending;
        }
        let sleep = match this.timer {
            Some((piece, sleep)) if *piece == held => sleep,
            Some((piece, sleep)) => {
                *piece = held;
                sleep.as_mut().reset(Instant::now() + *this.send_timeout);
                sleep
            }
            None => {
                let sleep = Box::pin(tokio::time::sleep(*this.send_timeout));
                &mut this.timer.insert((held, sleep)).1
            }
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.shared
            .stats
            .global
            .responses_unread
            .fetch_add(1, Relaxed);
        tracing::debug!("an HTTP/2 client took nothing of a response within send_timeout");
        // Dropping the stream resets it, and lets the backend connection go.
        Poll::Ready(())
    }
}
