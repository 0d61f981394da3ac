//! HTTP/2 streams whose client takes none of their response for `send_timeout` are reset.
//!
//! hyper sends a response body on a stream of its own, and asks the body for its next piece
//! only once the client's flow-control window has room for all of the last one. A client
//! that gives a stream no window (it stopped reading, or withholds `WINDOW_UPDATE`) leaves
//! hyper waiting with no timer of its own, holding the backend connection under it. So each
//! stream runs as a task of its own ([`Streams`], hyper's executor) that learns from the
//! body ([`Pulls`], shared through a task-local) when hyper holds a piece it has no room
//! for. A stream is cut once it has held the same piece for `send_timeout` with no byte
//! taken by the client on the whole connection, or for four times that however the
//! connection moves (other streams being read do not keep an unread one forever). The cut
//! drops the stream, which resets it (`CANCEL`), and fails the request body still going to
//! an HTTP/2 backend, which resets the backend's stream too. The timer is made only when a
//! stream first waits for room.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use crate::body::{Body, BoxError, boxed};
use crate::framing::Seen;
use crate::state::Shared;

tokio::task_local! {
    static PULLS: Arc<Pulls>;
}

/// However the connection moves, a stream is cut after holding one piece for this many
/// `send_timeout`s.
const MAX_HOLD: u32 = 4;

/// What a stream's response body tells its task, and what the task tells the stream's
/// request body.
#[derive(Debug, Default)]
pub struct Pulls {
    /// The piece hyper took last and has not come back for yet (0: none held).
    held: AtomicU64,
    /// The stream was cut.
    cut: AtomicBool,
    /// The request body, waiting for the client: woken by a cut.
    request: AtomicWaker,
}

impl Pulls {
    /// The stream's `Pulls`, when called from the task of an HTTP/2 stream.
    pub fn of_this_stream() -> Option<Arc<Pulls>> {
        PULLS.try_with(Arc::clone).ok()
    }

    /// hyper asks for the next piece: the last one found room.
    pub fn asked(&self) {
        self.held.store(0, Ordering::Relaxed);
    }

    /// hyper took piece number `piece` (counted from 1) and may hold it until it has room.
    pub fn gave(&self, piece: u64) {
        self.held.store(piece, Ordering::Relaxed);
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.request.wake();
    }
}

/// `body`, the request body of an HTTP/2 stream, made to fail once the stream is cut (as is
/// when called outside a stream's task). Needed only when something other than the stream's
/// own task sends it on: hyper's client, for an HTTP/2 backend.
pub fn tie_to_stream(body: Body) -> Body {
    match Pulls::of_this_stream() {
        Some(pulls) => boxed(Tied { body, pulls }),
        None => body,
    }
}

struct Tied {
    body: Body,
    pulls: Arc<Pulls>,
}

impl http_body::Body for Tied {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.pulls.request.register(cx.waker());
        if self.pulls.cut.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err("the client took nothing of the response".into())));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// hyper's executor for the streams of one HTTP/2 connection.
#[derive(Clone)]
pub struct Streams {
    pub shared: Arc<Shared>,
    /// The connection's bytes, as its socket saw them.
    pub seen: Arc<Seen>,
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Streams {
    fn execute(&self, stream: F) {
        let pulls = Arc::new(Pulls::default());
        tokio::spawn(Stream {
            task: PULLS.scope(pulls.clone(), stream),
            pulls,
            streams: self.clone(),
            hold: None,
            timer: None,
        });
    }
}

/// A piece held without room.
struct Hold {
    piece: u64,
    since: Instant,
    /// When the connection was last seen to move, and its count of writes then.
    moved: Instant,
    writes: u64,
}

pin_project_lite::pin_project! {
    struct Stream<F: Future> {
        #[pin]
        task: TaskLocalFuture<Arc<Pulls>, F>,
        pulls: Arc<Pulls>,
        streams: Streams,
        hold: Option<Hold>,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for Stream<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let held = this.pulls.held.load(Ordering::Relaxed);
        if held == 0 {
            // Waiting for the backend or the request, not for the client. A timer set
            // earlier may still wake the task once: it then finds nothing held.
            return Poll::Pending;
        }
        let (seen, shared) = (&this.streams.seen, &this.streams.shared);
        let send_timeout = shared.settings.limits.send_timeout;
        let hold = match this.hold {
            Some(hold) if hold.piece == held => hold,
            _ => {
                let now = Instant::now();
                this.hold.insert(Hold {
                    piece: held,
                    since: now,
                    moved: now,
                    writes: seen.writes(),
                })
            }
        };
        // Set for the first hold; after that it may be due earlier than this hold needs
        // (it was set for an earlier one), and is moved when it comes.
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let writes = seen.writes();
            if writes != hold.writes {
                (hold.moved, hold.writes) = (now, writes);
            }
            let due = (hold.moved + send_timeout).min(hold.since + send_timeout * MAX_HOLD);
            if now >= due {
                shared
                    .stats
                    .global
                    .responses_unread
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("an HTTP/2 client took nothing of a response within send_timeout");
                this.pulls.cut();
                // Dropping the stream resets it, and lets the backend connection go.
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}
