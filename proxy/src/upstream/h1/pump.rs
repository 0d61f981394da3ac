//! A request on its way to the backend: the head, then the body written as it arrives and as
//! the socket takes it. The exchange polls it beside reading the response, head and body, so
//! both directions stream at once (an echo answers each piece before the next is sent) and a
//! backend that answers early is heard.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::Body as _;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::super::Error;
use super::chunked::may_trail;
use crate::body::Body;

/// Request body data up to this size is copied next to its framing and written with it;
/// larger data is written as it is.
const COPY_UP_TO: usize = 4 * 1024;
/// Frames that are ready are gathered up to this many bytes before a write.
const GATHER_UP_TO: usize = 16 * 1024;

#[derive(Debug)]
pub struct Pump {
    body: Body,
    chunked: bool,
    /// Framing and small data, written from `at`.
    out: Vec<u8>,
    at: usize,
    /// Large data, written after `out` as it is.
    large: Option<Bytes>,
    /// The chunk's line end, due after `large`.
    after_large: bool,
    /// The body's last frame has been taken.
    ended: bool,
    /// The last poll found everything written and the client's body with nothing more yet.
    starved: bool,
    /// Bytes the socket took so far, the head's included.
    written: u64,
    /// The head's length: the upload moves once the socket takes bytes past it.
    head: u64,
}

impl Pump {
    /// `head` is the request head, already encoded; `chunked` frames the body in chunks.
    pub fn new(head: Vec<u8>, body: Body, chunked: bool) -> Self {
        Pump {
            head: head.len() as u64,
            body,
            chunked,
            out: head,
            at: 0,
            large: None,
            after_large: false,
            ended: false,
            starved: false,
            written: 0,
        }
    }

    /// The write buffer, for the connection's next exchange.
    pub fn into_buf(mut self) -> Vec<u8> {
        self.out.clear();
        self.out
    }

    /// How many bytes of the body (with its framing) the socket has taken: the upload
    /// moves while this does, which takes both a client that sends and a backend that reads.
    pub fn written(&self) -> u64 {
        self.written.saturating_sub(self.head)
    }

    /// Whether the request is held up by its client, not by the backend: at the last poll
    /// everything so far had been written and the body had nothing more.
    pub fn waits_for_the_client(&self) -> bool {
        self.starved
    }

    /// Ready once the whole request has been written.
    pub fn poll(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.starved = false;
        loop {
            let waiting = self.gather(cx)?;
            ready!(self.write(io, cx))?;
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            if waiting {
                // Everything is written and the body has nothing yet: it will wake us.
                self.starved = true;
                return Poll::Pending;
            }
            // The buffer was full (or held a large frame): now written, gather again.
        }
    }

    /// Takes the frames that are ready, while what is buffered stays small. True when the
    /// body had nothing ready (its waker is then registered); false when the buffer filled
    /// or the body ended.
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        while !self.ended && self.large.is_none() && self.out.len() < GATHER_UP_TO {
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Ok(true),
                Poll::Ready(None) => {
                    self.end(None);
                    return Ok(false);
                }
                Poll::Ready(Some(frame)) => frame.map_err(Error::Body)?,
            };
            match frame.into_data() {
                Ok(data) => self.put(data),
                Err(frame) => self.end(frame.trailers_ref()),
            }
            if !self.ended && self.body.is_end_stream() {
                self.end(None);
            }
        }
        Ok(false)
    }

    fn put(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if self.chunked {
            self.out
                .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() <= COPY_UP_TO {
            self.out.extend_from_slice(&data);
            if self.chunked {
                self.out.extend_from_slice(b"\r\n");
            }
        } else {
            self.large = Some(data);
            self.after_large = self.chunked;
        }
    }

    /// The body's end: the last chunk and any trailers (only the chunked coding carries them).
    fn end(&mut self, trailers: Option<&http::HeaderMap>) {
        self.ended = true;
        if !self.chunked {
            return;
        }
        self.out.extend_from_slice(b"0\r\n");
        if let Some(trailers) = trailers {
            // Only the fields a trailer may carry: a backend that merged, say, a trailing
            // `content-length` into its headers would be misled.
            for (name, value) in trailers.iter().filter(|(n, _)| may_trail(n)) {
                super::head::encode_field(&mut self.out, name, value);
            }
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes what is buffered; Ready once all of it is out.
    fn write(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let at = self.at;
        let wrote = poll_write_all(io, cx, &self.out, &mut self.at);
        self.written += (self.at - at) as u64;
        ready!(wrote)?;
        self.out.clear();
        self.at = 0;
        if let Some(large) = &mut self.large {
            while !large.is_empty() {
                let n = ready!(poll_write(io, cx, large))?;
                large.advance(n);
                self.written += n as u64;
            }
            self.large = None;
            if std::mem::take(&mut self.after_large) {
                self.out.extend_from_slice(b"\r\n");
                return self.write(io, cx);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes `bytes` from `at` on, moving `at` along; Ready once all of it is out.
pub(super) fn poll_write_all(
    io: &mut TcpStream,
    cx: &mut Context<'_>,
    bytes: &[u8],
    at: &mut usize,
) -> Poll<Result<(), Error>> {
    while *at < bytes.len() {
        *at += ready!(poll_write(io, cx, &bytes[*at..]))?;
    }
    Poll::Ready(Ok(()))
}

fn poll_write(
    io: &mut TcpStream,
    cx: &mut Context<'_>,
    bytes: &[u8],
) -> Poll<Result<usize, Error>> {
    match ready!(Pin::new(io).poll_write(cx, bytes)) {
        Ok(0) => Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into()))),
        Ok(n) => Poll::Ready(Ok(n)),
        Err(e) => Poll::Ready(Err(Error::Io(e))),
    }
}

#[cfg(test)]
mod tests {
    use http_body::Frame;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::body::Frames;

    /// The two ends of a real connection on 127.0.0.1: the proxy's and the backend's.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (io, listener.accept().await.unwrap().0)
    }

    /// What the backend's end of a real connection receives when `frames` are pumped after
    /// the head `HEAD\r\n`.
    async fn received(frames: Vec<Frame<Bytes>>, chunked: bool) -> Vec<u8> {
        let (mut io, mut backend) = connected().await;
        let body = crate::body::boxed(Frames(frames.into()));
        let mut pump = Pump::new(b"HEAD\r\n".to_vec(), body, chunked);
        std::future::poll_fn(|cx| pump.poll(&mut io, cx))
            .await
            .unwrap();
        drop(io);
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_out_in_chunks_with_the_trailers_it_may_carry() {
        let large = Bytes::from(vec![b'x'; 5000]);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("7"));
        trailers.insert("content-length", http::HeaderValue::from_static("1"));
        trailers.insert("host", http::HeaderValue::from_static("elsewhere"));
        let frames = vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(large.clone()),
            Frame::data(Bytes::new()),
            Frame::trailers(trailers),
        ];
        let mut want = b"HEAD\r\n2\r\nab\r\n1388\r\n".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b"\r\n0\r\nx-sum: 7\r\n\r\n");
        assert_eq!(received(frames, true).await, want);
    }

    #[tokio::test]
    async fn a_body_of_known_length_goes_out_as_it_is() {
        let frames = vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::from_static(b"cd")),
        ];
        assert_eq!(received(frames, false).await, b"HEAD\r\nabcd");
    }

    /// Large frames into a backend that starts reading late: the socket fills mid-frame, and
    /// the pump must go on once it drains (found by review: it stalled with no waker).
    #[tokio::test]
    async fn large_frames_reach_a_backend_that_reads_late() {
        let (mut io, mut backend) = connected().await;
        let frames: Vec<_> = (0..256)
            .map(|_| Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
            .collect();
        let mut pump = Pump::new(
            b"HEAD\r\n".to_vec(),
            crate::body::boxed(Frames(frames.into())),
            false,
        );
        let (filled_tx, filled_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            // Starts once the pump has had to wait for the socket.
            let _ = filled_rx.await;
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let mut filled = Some(filled_tx);
        let pumping = std::future::poll_fn(|cx| {
            let polled = pump.poll(&mut io, cx);
            if polled.is_pending()
                && let Some(tx) = filled.take()
            {
                let _ = tx.send(());
            }
            polled
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), pumping)
            .await
            .expect("the pump goes on once the socket drains")
            .unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), 6 + 256 * 64 * 1024);
    }

    /// A head larger than what is gathered before a write: the body is still taken.
    #[tokio::test]
    async fn a_body_after_a_head_over_16_kib_goes_out() {
        let (mut io, mut backend) = connected().await;
        let body = crate::body::boxed(Frames(vec![Frame::data(Bytes::from_static(b"ab"))].into()));
        let mut pump = Pump::new(vec![b'h'; 20 * 1024], body, false);
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            std::future::poll_fn(|cx| pump.poll(&mut io, cx)),
        )
        .await
        .expect("the body follows the head")
        .unwrap();
        drop(io);
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 20 * 1024 + 2);
        assert!(got.ends_with(b"hab"));
    }
}
