//! Body types: one boxed body for everything the proxy sends, and the tee that copies a
//! request body for the mirror while it streams to the primary.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

mod grpc_web;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Told what passes through a [`Watch`]ed body.
pub trait Watcher {
    /// A frame of data.
    fn data(&mut self, data: &Bytes);
    /// The trailers, the body's last frame.
    fn trailers(&mut self, _trailers: &http::HeaderMap) {}
    /// Whether the body is whole only with its trailers (a gRPC answer's status): then a body
    /// dropped with all its length there, but not its end, is not.
    fn waits_for_trailers(&self) -> bool {
        false
    }
    /// The body reached its end (`true`), or failed or was dropped before it; told once.
    fn end(&mut self, whole: bool);
}

/// Passes a body through, telling its watcher what passes and how it ended.
pub struct Watch<W: Watcher> {
    inner: Body,
    watcher: W,
    ended: bool,
}

impl<W: Watcher> Watch<W> {
    pub fn new(inner: Body, watcher: W) -> Self {
        let mut watch = Watch {
            inner,
            watcher,
            ended: false,
        };
        // hyper may never poll a body that says it has ended.
        if http_body::Body::is_end_stream(&watch.inner) {
            watch.end(true);
        }
        watch
    }

    fn end(&mut self, whole: bool) {
        if !std::mem::replace(&mut self.ended, true) {
            self.watcher.end(whole);
        }
    }
}

// `Watch` holds nothing pinned in place: `Body` is a `Pin<Box<_>>`, and the watcher is never
// pinned.
impl<W: Watcher> Unpin for Watch<W> {}

impl<W: Watcher> http_body::Body for Watch<W> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.watcher.data(data);
                }
                if let Some(trailers) = frame.trailers_ref() {
                    this.watcher.trailers(trailers);
                }
                // hyper stops polling once the body says it has ended.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<W: Watcher> Drop for Watch<W> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away, or the exchange failed; unless all
        // its length is there. hyper's HTTP/1 server drops a body once it has written the
        // length it announced, and an HTTP/2 backend's body says it has ended only once its
        // END_STREAM has come, which may be in a frame of its own, never polled for.
        let all_there = http_body::Body::size_hint(&self.inner).exact() == Some(0);
        self.end(all_there && !self.watcher.waits_for_trailers());
    }
}

/// How a teed body ended.
#[derive(Debug)]
pub enum TeeEnd {
    /// The whole body.
    Complete(Bytes),
    /// It grew past the cap; the copy was dropped.
    TooLarge,
    /// It failed or was dropped before its end.
    Incomplete,
}

/// Keeps a copy of a watched body, up to `cap` bytes; `done` learns how it ended, as soon as
/// the copy is too large.
pub struct Tee<F: FnOnce(TeeEnd)> {
    copy: Option<BytesMut>,
    cap: usize,
    done: Option<F>,
}

impl<F: FnOnce(TeeEnd)> Tee<F> {
    pub fn new(cap: usize, done: F) -> Self {
        // Not reserved up front by the announced length: a client could announce megabytes,
        // send nothing, and have the proxy hold them.
        Tee {
            copy: Some(BytesMut::new()),
            cap,
            done: Some(done),
        }
    }

    fn tell(&mut self, end: TeeEnd) {
        if let Some(done) = self.done.take() {
            done(end);
        }
    }
}

impl<F: FnOnce(TeeEnd)> Watcher for Tee<F> {
    fn data(&mut self, data: &Bytes) {
        let Some(copy) = self.copy.as_mut() else {
            return;
        };
        match copy.len() + data.len() > self.cap {
            true => {
                self.copy = None;
                self.tell(TeeEnd::TooLarge);
            }
            false => copy.extend_from_slice(data),
        }
    }

    fn end(&mut self, whole: bool) {
        match (whole, self.copy.take()) {
            (true, Some(copy)) => self.tell(whole_copy(copy)),
            _ => self.tell(TeeEnd::Incomplete),
        }
    }
}

/// The whole copy, held in an allocation of about its length: grown piece by piece, it can
/// hold twice what it has, and copies wait in the mirror's queue.
fn whole_copy(copy: BytesMut) -> TeeEnd {
    TeeEnd::Complete(match copy.capacity() - copy.len() > copy.len() / 8 {
        true => Bytes::copy_from_slice(&copy),
        false => copy.freeze(),
    })
}

/// A response body that fails once its backend has sent nothing for `idle` while the client
/// waited for more: a backend stalled mid-body holds neither its client nor a connection for
/// good. The timer is made the first time a frame is not ready at once, so a body that comes
/// whole costs none, and is moved on, not made again, for each frame after.
pub struct Quiet<B, F> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
    /// Told when the body ends short, once.
    on_cut: Option<F>,
}

/// Why a response body ended short of its end.
#[derive(Clone, Copy, Debug)]
pub enum Short<'a> {
    /// Nothing from the backend for `idle`: cut here.
    Stalled,
    /// The body failed with this error (a reset, a close short of its length).
    Broken(&'a BoxError),
}

impl<B, F: FnOnce(Short<'_>)> Quiet<B, F> {
    pub fn new(inner: B, idle: Duration, on_cut: F) -> Self {
        Quiet {
            inner,
            idle,
            timer: None,
            moved: false,
            on_cut: Some(on_cut),
        }
    }
}

/// What a client whose response stalled gets instead of the rest of it.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?} in the middle of a response body")]
pub struct Stalled(Duration);

impl<B, F> http_body::Body for Quiet<B, F>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce(Short<'_>) + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let (idle, moved) = (this.idle, std::mem::take(&mut this.moved));
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if moved {
                            timer.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        timer
                    }
                    none => none.insert(Box::pin(tokio::time::sleep(idle))),
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(on_cut) = this.on_cut.take() {
                            on_cut(Short::Stalled);
                        }
                        tracing::debug!(?idle, "response body cut: nothing from its backend");
                        Poll::Ready(Some(Err(Stalled(idle).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(frame) => {
                this.moved = true;
                let frame = frame.map(|f| f.map_err(Into::into));
                if let Some(Err(e)) = &frame
                    && let Some(on_cut) = this.on_cut.take()
                {
                    on_cut(Short::Broken(e));
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Passes a body through and shows `seen` its trailers as they pass, or `None` when it ends
/// or fails without any. A body dropped before its end (the client left) shows nothing.
pub struct Trailers<B, F> {
    inner: B,
    seen: Option<F>,
    /// For gRPC-Web, whose trailers come in the body: the walk over its messages.
    web: Option<grpc_web::Scan>,
}

impl<B, F> Trailers<B, F> {
    pub fn new(inner: B, seen: F) -> Self {
        Trailers {
            inner,
            seen: Some(seen),
            web: None,
        }
    }

    /// For a gRPC-Web body: its trailers are the message flagged as such.
    pub fn grpc_web(inner: B, seen: F) -> Self {
        Trailers {
            web: Some(grpc_web::Scan::default()),
            ..Trailers::new(inner, seen)
        }
    }
}

impl<B, F> http_body::Body for Trailers<B, F>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    F: FnOnce(Option<&http::HeaderMap>) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.seen.is_none() {
            return polled;
        }
        let this = &mut *self;
        let in_body = match (&polled, &mut this.web) {
            (Poll::Ready(Some(Ok(frame))), Some(scan)) => {
                frame.data_ref().and_then(|d| scan.feed(d))
            }
            _ => None,
        };
        let shown = match &polled {
            _ if in_body.is_some() => Some(in_body.as_ref()),
            Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                Some(trailers) => Some(Some(trailers)),
                // The last frame, and no trailers: hyper asks no more of a body at its end.
                None if this.inner.is_end_stream() => Some(None),
                None => None,
            },
            Poll::Ready(Some(Err(_)) | None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(trailers) = shown
            && let Some(seen) = this.seen.take()
        {
            seen(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A digest of a body's bytes as they pass, whatever pieces they come in (xxHash64, seed 0).
pub type Digest = xxhash_rust::xxh64::Xxh64;

/// A body of frames that are all ready at once, taken in order (a test double).
#[cfg(test)]
pub struct Frames(pub std::collections::VecDeque<Frame<Bytes>>);

#[cfg(test)]
impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Digest;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;

    use super::{Quiet, SizeHint, Tee, TeeEnd, Watch, Watcher};

    /// Frames as a channel gives them (a test double).
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Chan {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A body of a known length that says it has ended only when polled after its last
    /// byte, as an HTTP/2 backend's does when its END_STREAM comes in a frame of its own; with
    /// trailers after its data, if given.
    struct Sized(Option<Bytes>, Option<http::HeaderMap>);

    impl http_body::Body for Sized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let frame = match self.0.take() {
                Some(data) => Some(Frame::data(data)),
                None => self.1.take().map(Frame::trailers),
            };
            std::task::Poll::Ready(frame.map(Ok))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
        }
    }

    /// Records what a watch told.
    #[derive(Default)]
    struct Told(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl Watcher for Told {
        fn data(&mut self, data: &Bytes) {
            self.0.lock().unwrap().push(format!("{} bytes", data.len()));
        }

        fn trailers(&mut self, trailers: &http::HeaderMap) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} trailers", trailers.len()));
        }

        fn end(&mut self, whole: bool) {
            self.0.lock().unwrap().push(format!("whole: {whole}"));
        }
    }

    #[tokio::test]
    async fn a_watched_body_whose_length_is_all_there_has_ended_though_not_polled_again() {
        let told = Told::default();
        let seen = told.0.clone();
        let body = Sized(Some(Bytes::from_static(b"abc")), None);
        let mut body = Watch::new(super::boxed(body), told);
        assert!(body.frame().await.unwrap().is_ok());
        // hyper's HTTP/1 server, having written the length it announced, drops the body.
        drop(body);
        assert_eq!(*seen.lock().unwrap(), ["3 bytes", "whole: true"]);
    }

    /// Waits for the trailers, as the answer to a gRPC call does.
    struct Trailing(Told);

    impl Watcher for Trailing {
        fn data(&mut self, data: &Bytes) {
            self.0.data(data);
        }

        fn waits_for_trailers(&self) -> bool {
            true
        }

        fn end(&mut self, whole: bool) {
            self.0.end(whole);
        }
    }

    #[tokio::test]
    async fn a_body_awaiting_its_trailers_is_not_whole_when_dropped_without_them() {
        let told = Told::default();
        let seen = told.0.clone();
        let body = Sized(Some(Bytes::from_static(b"abc")), None);
        let mut body = Watch::new(super::boxed(body), Trailing(told));
        assert!(body.frame().await.unwrap().is_ok());
        drop(body);
        assert_eq!(*seen.lock().unwrap(), ["3 bytes", "whole: false"]);
    }

    #[tokio::test]
    async fn a_watched_body_of_a_known_length_is_whole_only_after_its_trailers() {
        let told = Told::default();
        let seen = told.0.clone();
        let trailers = http::HeaderMap::from_iter([(
            http::HeaderName::from_static("grpc-status"),
            http::HeaderValue::from_static("13"),
        )]);
        let body = Sized(Some(Bytes::from_static(b"abc")), Some(trailers));
        let body = Watch::new(super::boxed(body), told);
        assert!(body.collect().await.unwrap().trailers().is_some());
        assert_eq!(
            *seen.lock().unwrap(),
            ["3 bytes", "1 trailers", "whole: true"]
        );
    }

    /// The copy a tee hands on, of a body of `pieces`, sent with its length or not.
    async fn teed(pieces: Vec<Bytes>, with_length: bool) -> Bytes {
        let total: usize = pieces.iter().map(Bytes::len).sum();
        let (tx, rx) = tokio::sync::mpsc::channel(pieces.len());
        for p in pieces {
            tx.try_send(p).unwrap();
        }
        drop(tx);
        let body = match with_length {
            true => super::boxed(http_body_util::Full::new(Bytes::from(vec![7; total]))),
            false => super::boxed(Chan(rx)),
        };
        let (copied, got) = tokio::sync::oneshot::channel();
        let tee = Tee::new(1 << 20, move |end| {
            let TeeEnd::Complete(bytes) = end else {
                panic!("{end:?}")
            };
            copied.send(bytes).unwrap();
        });
        let tee = Watch::new(body, tee);
        assert_eq!(tee.collect().await.unwrap().to_bytes().len(), total);
        got.await.unwrap()
    }

    #[tokio::test]
    async fn a_teed_copy_is_held_in_about_its_length() {
        let mut pieces = vec![Bytes::from(vec![1; 300])];
        pieces.extend((0..40).map(|_| Bytes::from(vec![2; 16 * 1024])));
        let total = 300 + 40 * 16 * 1024;
        for with_length in [false, true] {
            let copy = teed(pieces.clone(), with_length).await;
            assert_eq!(copy.len(), total);
            let held = copy.try_into_mut().unwrap().capacity();
            assert!(held <= total + total / 8, "{held} for {total} bytes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_is_not_cut_however_long_it_lasts() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let started = tokio::time::Instant::now();
        let body = Quiet::new(
            Chan(rx),
            Duration::from_millis(400),
            |_: super::Short<'_>| (),
        )
        .collect()
        .await;
        assert_eq!(body.unwrap().to_bytes(), "xxxxxx");
        assert!(
            started.elapsed() > Duration::from_millis(400),
            "longer than idle in all"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_quiet_for_idle_fails() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let told = cut.clone();
        let on_cut = move |short: super::Short<'_>| {
            assert!(matches!(short, super::Short::Stalled));
            told.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        let mut body = Quiet::new(Chan(rx), Duration::from_millis(100), on_cut);
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("sent nothing"), "{error}");
        assert!(
            cut.load(std::sync::atomic::Ordering::SeqCst),
            "the cut is told"
        );
        drop(tx);
    }

    #[test]
    fn a_digest_does_not_depend_on_the_pieces() {
        let whole = {
            let mut d = Digest::default();
            d.update(b"hello, world");
            d.digest()
        };
        let mut pieces = Digest::default();
        for piece in [&b"hel"[..], b"", b"lo, w", b"orld"] {
            pieces.update(piece);
        }
        assert_eq!(pieces.digest(), whole);
        let mut other = Digest::default();
        other.update(b"hello, World");
        assert_ne!(other.digest(), whole);
    }
}
