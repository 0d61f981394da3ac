//! Body types: one boxed body for everything the proxy sends, and the tee that copies a
//! request body for the mirror while it streams to the primary.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

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

/// Passes a body through and keeps a copy, up to `cap` bytes; `done` learns how it ended.
pub struct Tee<F: FnOnce(TeeEnd)> {
    inner: Body,
    copy: Option<BytesMut>,
    cap: usize,
    done: Option<F>,
}

impl<F: FnOnce(TeeEnd)> Tee<F> {
    pub fn new(inner: Body, cap: usize, done: F) -> Self {
        Tee {
            inner,
            copy: Some(BytesMut::new()),
            cap,
            done: Some(done),
        }
    }

    fn finish(&mut self, end: fn(Bytes) -> TeeEnd) {
        if let Some(done) = self.done.take() {
            let copy = self.copy.take().map(BytesMut::freeze).unwrap_or_default();
            done(end(copy));
        }
    }
}

// `Tee` holds nothing pinned in place: `Body` is a `Pin<Box<_>>` and `F` is only moved out.
impl<F: FnOnce(TeeEnd)> Unpin for Tee<F> {}

impl<F: FnOnce(TeeEnd)> http_body::Body for Tee<F> {
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
                if let (Some(data), Some(copy)) = (frame.data_ref(), this.copy.as_mut()) {
                    match copy.len() + data.len() > this.cap {
                        true => this.finish(|_| TeeEnd::TooLarge),
                        false => copy.extend_from_slice(data),
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(TeeEnd::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(|_| TeeEnd::Incomplete),
            Poll::Ready(None) => this.finish(TeeEnd::Complete),
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

impl<F: FnOnce(TeeEnd)> Drop for Tee<F> {
    fn drop(&mut self) {
        // A body dropped before its end (client gone, primary failed) is not mirrored.
        self.finish(|_| TeeEnd::Incomplete);
    }
}

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
