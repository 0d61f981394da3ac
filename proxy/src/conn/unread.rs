//! HTTP/2 streams whose client takes none of their response for `send_timeout` are reset.
//!
//! hyper sends a response body on a stream of its own: it hands each piece of the body to
//! h2, which sends what the client's flow-control window allows and buffers the rest, and
//! asks the body for the next piece at once. It takes that next piece on only once the
//! window has room for all of the last one and a byte more; until then it waits, with no
//! timer of its own, holding the backend connection under it.
//!
//! So each stream runs as a task of its own ([`Streams`], hyper's executor) that learns from
//! the body ([`Pulls`]) when hyper holds a piece it has no room for. While it does, the task
//! looks at the connection every `send_timeout / 2`; the stream is cut once two looks in a
//! row find that nothing was written to the client on the whole connection, or once it has
//! held one piece for four `send_timeout`s however the connection moves (streams being read
//! do not keep one left unread forever). The cut drops the stream, which resets it
//! (`CANCEL`), and the request body an HTTP/2 backend may still be sent, which hyper's client
//! holds apart from the stream. The timer is made only when a stream first waits for room.
//!
//! The `Pulls` are handed over through a task-local set for the stream's first poll only, in
//! which hyper first polls the service's future: what needs them takes them there, at once
//! (a scope around every poll would cost 1% of an HTTP/2 request's instructions).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::body::{Body, BoxError};
use crate::framing::Seen;
use crate::state::Shared;

tokio::task_local! {
    static PULLS: Arc<Pulls>;
}

/// However the connection moves, a stream is cut after holding one piece this many
/// `send_timeout`s.
const MAX_HOLD: u32 = 4;

/// Looks in a row that found nothing written, each `send_timeout / 2` after the last, before a
/// stream holding a piece is cut.
const QUIET_LOOKS: u32 = 2;

/// What a stream's response body tells its task, and what the task takes from the stream's
/// request body.
#[derive(Debug, Default)]
pub struct Pulls {
    /// The piece hyper took last and has not come back for yet (0: none held).
    held: AtomicU64,
    /// The request body, when hyper's client sends it on from a task of its own
    /// ([`tie_to_stream`]). A cut takes it: that drops the client's side of the stream at
    /// once, which h2 needs before it resets the stream.
    request: Mutex<Option<Body>>,
    /// The task sending the request body on, woken by a cut.
    sender: AtomicWaker,
}

impl Pulls {
    /// The stream's `Pulls`, when called in the first poll of an HTTP/2 stream's task.
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

    fn cut(&self) {
        drop(crate::lock(&self.request).take());
        self.sender.wake();
    }
}

/// `body`, the request body of an HTTP/2 stream, put where a cut of the stream can take it
/// (as is, when called outside the first poll of a stream's task). Needed only when
/// something other than the stream's own task sends it on: hyper's client, for an HTTP/2
/// backend.
pub fn tie_to_stream(body: Body) -> Body {
    match Pulls::of_this_stream() {
        Some(pulls) => {
            *crate::lock(&pulls.request) = Some(body);
            // Its errors are the proxy's already: boxed as it is.
            Body::new(Tied(pulls))
        }
        None => body,
    }
}

struct Tied(Arc<Pulls>);

impl Tied {
    fn with<T>(&self, f: impl FnOnce(&mut Body) -> T) -> Option<T> {
        crate::lock(&self.0.request).as_mut().map(f)
    }
}

impl http_body::Body for Tied {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.0.sender.register(cx.waker());
        // Cut: the backend's stream is reset as cancelled.
        let cut = || Poll::Ready(Some(Err(h2::Error::from(h2::Reason::CANCEL).into())));
        self.with(|body| Pin::new(body).poll_frame(cx))
            .unwrap_or_else(cut)
    }

    fn is_end_stream(&self) -> bool {
        self.with(|body| body.is_end_stream()).unwrap_or(false)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.with(|body| body.size_hint()).unwrap_or_default()
    }
}

/// hyper's executor for the streams of one HTTP/2 connection.
#[derive(Clone)]
pub struct Streams(Arc<Connection>);

/// What each stream of a connection looks at.
struct Connection {
    shared: Arc<Shared>,
    /// The connection's bytes, as its socket saw them.
    seen: Arc<Seen>,
}

impl Streams {
    pub fn new(shared: Arc<Shared>, seen: Arc<Seen>) -> Self {
        Streams(Arc::new(Connection { shared, seen }))
    }
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Streams {
    fn execute(&self, stream: F) {
        let pulls = Arc::new(Pulls::default());
        tokio::spawn(Watched {
            stream,
            pulls,
            conn: self.0.clone(),
            started: false,
            watch: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// hyper's future for one stream, and what watches it.
    struct Watched<F: Future> {
        #[pin]
        stream: F,
        pulls: Arc<Pulls>,
        conn: Arc<Connection>,
        started: bool,
        // Made when the stream first holds a piece (most never do), and kept.
        watch: Option<Pin<Box<Watch>>>,
    }
}

pin_project_lite::pin_project! {
    /// A piece held without room, as the looks saw it, and the timer of the looks.
    struct Watch {
        piece: u64,
        since: Instant,
        // The connection's writes at the last look.
        writes: u64,
        // Looks in a row that found none.
        quiet: u32,
        #[pin]
        timer: Sleep,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let polled = match *this.started {
            true => this.stream.poll(cx),
            false => {
                *this.started = true;
                PULLS.sync_scope(this.pulls.clone(), || this.stream.as_mut().poll(cx))
            }
        };
        if polled.is_ready() {
            return Poll::Ready(());
        }
        let held = this.pulls.held.load(Relaxed);
        if held == 0 {
            // Waiting for the backend or the request, not for the client. A timer set
            // earlier may still wake the task once: it then finds nothing held.
            return Poll::Pending;
        }
        let Connection { shared, seen } = &**this.conn;
        let send_timeout = shared.settings.limits.send_timeout;
        let period = send_timeout / 2;
        let watch = match this.watch {
            Some(watch) => watch,
            None => this.watch.insert(Box::pin(Watch {
                piece: held,
                since: Instant::now(),
                writes: seen.writes(),
                quiet: 0,
                timer: tokio::time::sleep(period),
            })),
        };
        let mut w = watch.as_mut().project();
        if *w.piece != held {
            let now = Instant::now();
            (*w.piece, *w.since, *w.writes, *w.quiet) = (held, now, seen.writes(), 0);
            // A timer still set for an earlier hold comes within a period anyway.
            if w.timer.is_elapsed() {
                w.timer.as_mut().reset(now + period);
            }
        }
        while w.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            // A look that comes a period late (the thread was held up) tells nothing of
            // the client, nor does one less than a period into the hold (its timer was set
            // for an earlier one): each quiet look speaks for a whole period.
            let late = now.saturating_duration_since(w.timer.deadline()) > period;
            let early = now.saturating_duration_since(*w.since) < period;
            let writes = seen.writes();
            if late || early || writes != *w.writes {
                (*w.writes, *w.quiet) = (writes, 0);
            } else {
                *w.quiet += 1;
            }
            let held_for = now.saturating_duration_since(*w.since);
            if *w.quiet >= QUIET_LOOKS || held_for >= send_timeout.saturating_mul(MAX_HOLD) {
                shared.stats.global.responses_unread.fetch_add(1, Relaxed);
                tracing::debug!("an HTTP/2 client took nothing of a response within send_timeout");
                this.pulls.cut();
                // Dropping the stream resets it, and lets the backend connection go.
                return Poll::Ready(());
            }
            w.timer.as_mut().reset(now + period);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;

    /// A stream task holding piece 1, with a `send_timeout` of 1 s (its stream never ends
    /// by itself); the connection's `Seen`, and the proxy's state.
    struct Held {
        task: JoinHandle<()>,
        pulls: Arc<Pulls>,
        seen: Arc<Seen>,
        shared: Arc<Shared>,
        wake: Arc<tokio::sync::Notify>,
    }

    impl Held {
        /// hyper found room for the piece held, and holds `piece` now.
        async fn give(&self, piece: u64) {
            self.pulls.asked();
            self.pulls.gave(piece);
            self.wake.notify_one();
            turns().await;
        }

        fn cut(&self) -> bool {
            self.task.is_finished()
        }
    }

    async fn holding() -> Held {
        let src = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nlimits: { send_timeout: 1s }\ntracks:\n  stable: { backends: [\"127.0.0.1:9\"] }\nroutes:\n  - { split: { stable: 10000 } }\n";
        let (settings, table) = crate::config::check(src, std::path::Path::new(".")).unwrap();
        let shared = Shared::new(settings, table);
        let (pulls, seen) = (Arc::new(Pulls::default()), Arc::new(Seen::default()));
        let wake = Arc::new(tokio::sync::Notify::new());
        pulls.gave(1);
        let woken = wake.clone();
        let task = tokio::spawn(Watched {
            // As hyper's stream, woken when it has something new to tell.
            stream: async move {
                loop {
                    woken.notified().await;
                }
            },
            pulls: pulls.clone(),
            conn: Streams::new(shared.clone(), seen.clone()).0,
            started: false,
            watch: None,
        });
        // Its first turn, at 0 ms: the hold begins.
        turns().await;
        Held {
            task,
            pulls,
            seen,
            shared,
            wake,
        }
    }

    /// Lets time run on by `ms` (paused time), a millisecond at a time, each time letting
    /// the tasks whose timers came do their turn.
    async fn after(ms: u64) {
        for _ in 0..ms {
            tokio::time::advance(Duration::from_millis(1)).await;
            turns().await;
        }
    }

    async fn turns() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_held_with_nothing_written_is_cut_at_the_send_timeout() {
        let h = holding().await;
        after(999).await;
        assert!(!h.cut());
        after(2).await;
        assert!(h.cut());
        let unread = &h.shared.stats.global.responses_unread;
        assert_eq!(unread.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cut_counts_from_the_last_write_and_comes_within_half_a_timeout_of_it() {
        let h = holding().await;
        // The connection writes out what it can of the piece before the one held, just
        // after the hold began (hyper hands it over as it takes the next).
        after(10).await;
        h.seen.count_write();
        after(1_000).await;
        assert!(!h.cut(), "cut within a timeout of the last write");
        after(500).await;
        assert!(h.cut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_taking_other_pieces_of_the_connection_keeps_a_held_stream_four_timeouts() {
        let h = holding().await;
        for _ in 0..39 {
            after(100).await;
            h.seen.count_write();
        }
        assert!(!h.cut(), "cut at 3.9 s");
        after(200).await;
        assert!(h.cut(), "not cut at 4.1 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_pieces_keep_finding_room_is_never_cut() {
        let h = holding().await;
        // A new piece held every 400 ms: each took the client's window.
        for piece in 2..100 {
            after(400).await;
            h.give(piece).await;
        }
        assert!(!h.cut());
        // Waiting for the backend (nothing held) is never the client's doing.
        h.pulls.asked();
        h.wake.notify_one();
        after(60_000).await;
        assert!(!h.cut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_look_that_comes_soon_after_a_new_hold_does_not_count() {
        let h = holding().await;
        // Piece 2 is held at 400 ms; the look set for piece 1 comes at 500 ms, 100 ms into
        // it, and tells nothing. The looks at 1 and 1.5 s do: cut at 1.5 s, 1.1 s after.
        after(400).await;
        h.give(2).await;
        after(999).await;
        assert!(
            !h.cut(),
            "cut 1 s after the first hold, 0.6 s into this one"
        );
        after(102).await;
        assert!(h.cut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_look_that_comes_late_does_not_blame_the_client() {
        let h = holding().await;
        // The thread is held up for 2 s: the look due at 0.5 s comes at 2 s and tells
        // nothing; the next two, at 2.5 and 3 s, do.
        tokio::time::advance(Duration::from_secs(2)).await;
        turns().await;
        assert!(!h.cut(), "cut on a late look");
        after(999).await;
        assert!(!h.cut());
        after(2).await;
        assert!(h.cut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_takes_the_request_body_and_wakes_its_sender() {
        use http_body_util::BodyExt;
        let h = holding().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let mut tied = PULLS.sync_scope(h.pulls.clone(), || tie_to_stream(Body::new(Chan(rx))));
        // The sender waits for the client's next bytes, which never come.
        let sender = tokio::spawn(async move { tied.frame().await.map(|f| f.is_err()) });
        after(1_001).await;
        assert!(h.cut());
        let failed = tokio::time::timeout(Duration::from_secs(1), sender).await;
        let failed = failed.unwrap().unwrap();
        assert_eq!(failed, Some(true), "the body fails once cut");
        assert!(tx.is_closed(), "and the client's side of it is dropped");
    }

    /// A request body fed through a channel.
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Chan {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            let data = self.0.poll_recv(cx);
            data.map(|d| d.map(|d| Ok(http_body::Frame::data(d))))
        }
    }
}
