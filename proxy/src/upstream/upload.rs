//! A request body on its way to a backend through hyper's client. hyper reports the body's
//! failure as its own and a try's deadline says nothing of whose side was slow; the body
//! keeps the two facts that tell: whether it failed, and whether it was asked for more that
//! the client had not sent yet.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use tokio::time::Instant;

use crate::body::{Body, BoxError};

/// What the sending side saw of the body; shared with the try that sent it.
#[derive(Debug)]
pub struct Seen {
    failed: AtomicBool,
    waiting: AtomicBool,
    /// When the body began on its way.
    began: Instant,
    /// When the sender last took a piece of the body (the upload moved), in nanoseconds
    /// after `began`, at least 1; 0 while it took none. A store, not a lock, per piece.
    moved: AtomicU64,
}

impl Seen {
    /// The client's body failed (an upload given up, a stream reset).
    pub fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    /// The sender asked for more of the body and the client had not sent it: a deadline
    /// that comes now is the client's doing. hyper's HTTP/2 client holds a piece while the
    /// backend's window is shut and asks for no more, so a backend that stopped reading is
    /// not excused; but once the window has any room it queues the whole piece and asks
    /// again, so the backend may not have taken the last piece the client sent.
    pub fn waits_for_the_client(&self) -> bool {
        self.waiting.load(Relaxed)
    }

    /// When the sender last took a piece of the body, if it took any.
    pub fn moved(&self) -> Option<Instant> {
        match self.moved.load(Relaxed) {
            0 => None,
            nanos => Some(self.began + std::time::Duration::from_nanos(nanos)),
        }
    }
}

pub struct Upload {
    body: Body,
    seen: Arc<Seen>,
}

impl Upload {
    pub fn new(body: Body) -> (Self, Arc<Seen>) {
        let seen = Arc::new(Seen {
            failed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            began: Instant::now(),
            moved: AtomicU64::new(0),
        });
        (
            Upload {
                body,
                seen: seen.clone(),
            },
            seen,
        )
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.seen.waiting.store(polled.is_pending(), Relaxed);
        match &polled {
            Poll::Ready(Some(Err(_))) => self.seen.failed.store(true, Relaxed),
            Poll::Ready(Some(Ok(_))) => {
                let nanos = u64::try_from(self.seen.began.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.seen.moved.store(nanos.max(1), Relaxed);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;

    use http_body::Body as _;

    use super::*;

    type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

    /// A test fake: a body that gives these, one a poll, then ends.
    struct Scripted(VecDeque<Polled>);

    impl http_body::Body for Scripted {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled {
            self.0.pop_front().unwrap_or(Poll::Ready(None))
        }
    }

    #[test]
    fn it_tells_a_body_waited_on_from_one_that_ended_or_failed() {
        let data = || Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))));
        let script = [
            data(),
            Poll::Pending,
            Poll::Ready(Some(Err("reset".into()))),
        ];
        let (mut upload, seen) = Upload::new(Body::new(Scripted(script.into())));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = || Pin::new(&mut upload).poll_frame(&mut cx);
        assert!(poll().is_ready());
        assert!(!seen.waits_for_the_client(), "a frame came at once");
        assert!(poll().is_pending());
        assert!(seen.waits_for_the_client() && !seen.failed());
        assert!(matches!(poll(), Poll::Ready(Some(Err(_)))));
        assert!(seen.failed() && !seen.waits_for_the_client());

        let script = [Poll::Pending];
        let (mut upload, seen) = Upload::new(Body::new(Scripted(script.into())));
        let mut poll = || Pin::new(&mut upload).poll_frame(&mut cx);
        assert!(poll().is_pending());
        assert!(matches!(poll(), Poll::Ready(None)));
        assert!(
            !seen.waits_for_the_client(),
            "an ended body waits for nothing"
        );
    }
}
