//! HTTP/1.1 pipelining (RFC 9112, section 9.3.2), for mirrored copies: the requests of a
//! batch go out together on one connection, and the answers are read in the order the
//! requests went, each dropped once its status is known. A batch of copies to one backend then
//! costs one write and about one read, where copies sent each on its own connection cost a
//! write and a read each.
//!
//! Writing and reading go on together, so that a backend that answers as it reads never
//! waits on a proxy that is still writing. An answer that says `Connection: close` ends the
//! pipeline: the backend has processed none of the requests after it (RFC 9112, section 9.6),
//! and they may be sent again on another connection. An answer that ends the connection
//! without saying so (a body delimited by the close, a body framed two ways) leaves the fate of
//! the requests behind it unknown: they fail, and are never sent twice.

/// Largest write buffer a pooled connection keeps between pipelines.
const KEPT_OUT: usize = 64 * 1024;

use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{StatusCode, header};
use tokio::time::Instant;

use super::chunked::Step;
use super::head::{self, Added, Fields};
use super::{Conn, Error, Left, pump};
use crate::body::Digest;
use crate::upstream::backend::Backend;

/// What became of a pipeline's requests, in order.
#[derive(Debug)]
pub struct Answers {
    /// The statuses of the requests answered whole, head and body (the first
    /// `statuses.len()`), each with the time its head came and, when asked for, a digest of
    /// its body.
    pub statuses: Vec<(StatusCode, Instant, Option<u64>)>,
    /// What ended the pipeline before every request was answered: the requests from
    /// `statuses.len()` on failed with it. `None` with requests left over: the backend closed
    /// the connection after an answer that said it would, and processed none of them, so they
    /// may be sent again.
    pub failed: Option<Error>,
    /// With `failed`, the answer being read when it came: its status and when its head came.
    /// Its body did not end, but it was answered, and counts as a primary answer does.
    pub cut: Option<(StatusCode, Instant)>,
}

/// Sends `requests` (each its head and its whole body) to `backend` on one connection,
/// pooled or new, marked as mirrored copies when `marked`; everything must have been answered
/// by `deadline`. The connection goes back to the pool if it can carry more. With
/// `digests`, each answer's body is digested as it is dropped.
pub async fn pipeline(
    backend: &Backend,
    requests: &[(&http::request::Parts, &[u8])],
    marked: bool,
    connect_timeout: Duration,
    deadline: Instant,
    digests: bool,
) -> Answers {
    let mut answers = Answers {
        statuses: Vec::with_capacity(requests.len()),
        failed: None,
        cut: None,
    };
    let connected = match Conn::reused(backend, deadline) {
        Some(conn) => Ok(conn),
        None => Conn::connect(backend, connect_timeout, deadline, deadline).await,
    };
    let mut conn = match connected {
        Ok(conn) => conn,
        Err(e) => {
            answers.failed = Some(e);
            return answers;
        }
    };
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    for (parts, body) in requests {
        encode(&mut out, parts, &backend.addr, body, marked);
    }
    let mut run = Run {
        out: &out,
        written: 0,
        write_failed: None,
        reading: None,
        reusable: true,
        said_close: false,
        deadline: conn.timer.deadline(),
        digest: digests.then(Digest::default),
    };
    let ended = poll_fn(|cx| run.poll(&mut conn, requests, &mut answers.statuses, cx)).await;
    let written_whole = run.written == out.len();
    let (reusable, said_close) = (run.reusable, run.said_close);
    let unanswered = answers.statuses.len() < requests.len();
    match ended {
        Ok(()) if reusable && written_whole && conn.buf.is_empty() => {
            if out.capacity() <= KEPT_OUT {
                conn.out = out;
            }
            backend.pool.put(conn);
        }
        Ok(()) if unanswered && !said_close => {
            answers.failed = Some(Error::Protocol(
                "an answer ended the connection without saying so",
            ));
        }
        Ok(()) => {}
        Err(e) => {
            answers.failed = Some(e);
            answers.cut = run.reading.map(|(_, status, came)| (status, came));
        }
    }
    answers
}

/// Appends one request: its head, framed by its body's length unless it says it already,
/// and the body.
fn encode(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    backend: &str,
    body: &[u8],
    marked: bool,
) {
    let added = match body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
        true => Added::Nothing,
        false => Added::ContentLength(body.len() as u64),
    };
    head::encode_request(out, parts, backend, marked, added);
    out.extend_from_slice(body);
}

/// A pipeline under way.
struct Run<'a> {
    out: &'a [u8],
    written: usize,
    /// Writing stopped with this; answers already on their way are still read.
    write_failed: Option<Error>,
    /// The answer being read, once its head has come: its body, its status and when it came.
    reading: Option<(Left, StatusCode, Instant)>,
    /// Every answer so far lets the connection carry more.
    reusable: bool,
    /// The answer that ended the connection said so.
    said_close: bool,
    /// When the connection's timer fires, read off the clock too: a backend that sends
    /// faster than the task's budget of reads would keep the timer from ever being polled
    /// ready.
    deadline: Instant,
    /// The digest of the body being read, when digests are asked for.
    digest: Option<Digest>,
}

impl Run<'_> {
    /// Ready once every request is answered, or an answer closed the connection; fails with
    /// what broke the connection or the deadline.
    fn poll(
        &mut self,
        conn: &mut Conn,
        requests: &[(&http::request::Parts, &[u8])],
        statuses: &mut Vec<(StatusCode, Instant, Option<u64>)>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        if self.written < self.out.len()
            && self.write_failed.is_none()
            && let Poll::Ready(Err(e)) =
                pump::poll_write_all(&mut conn.io, cx, self.out, &mut self.written)
        {
            self.write_failed = Some(e);
        }
        loop {
            // What the bytes read so far give.
            loop {
                match &mut self.reading {
                    None if statuses.len() == requests.len() => return Poll::Ready(Ok(())),
                    None => {
                        let method = &requests[statuses.len()].0.method;
                        let Some(head) = head::parse_response(&mut conn.buf, method, Fields::Drop)?
                        else {
                            break;
                        };
                        self.reusable &= head.keep_alive;
                        self.said_close |= head.closes;
                        let left = Left::of(head.framing);
                        self.reading = Some((left, head.status, Instant::now()));
                    }
                    Some((left, status, came)) => {
                        let digest = self.digest.as_mut();
                        if !skip(left, &mut conn.buf, digest).map_err(Error::Protocol)? {
                            break;
                        }
                        let digest = self.digest.as_mut().map(|d| std::mem::take(d).digest());
                        statuses.push((*status, *came, digest));
                        self.reading = None;
                        if !self.reusable {
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
            match conn.poll_read(cx) {
                Poll::Ready(Ok(0)) if matches!(self.reading, Some((Left::UntilClose, ..))) => {
                    // That body ends here, and with it the connection.
                    if let Some((_, status, came)) = self.reading.take() {
                        statuses.push((status, came, self.digest.as_ref().map(Digest::digest)));
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.write_failed.take().unwrap_or(Error::Closed)));
                }
                Poll::Ready(Ok(_)) if Instant::now() >= self.deadline => {
                    return Poll::Ready(Err(Error::TimedOut));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.write_failed.take().unwrap_or(Error::Io(e))));
                }
                Poll::Pending if conn.timer.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(Error::TimedOut));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Drops what the front of `buf` holds of a body, digesting it if asked; true once the body
/// has ended.
fn skip(
    left: &mut Left,
    buf: &mut BytesMut,
    mut digest: Option<&mut Digest>,
) -> Result<bool, &'static str> {
    match left {
        Left::Length(n) => {
            let taken = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
            if let Some(digest) = digest {
                digest.update(&buf[..taken]);
            }
            buf.advance(taken);
            *n -= taken as u64;
            Ok(*n == 0)
        }
        Left::Chunked(chunked) => loop {
            match chunked.step(buf)? {
                Step::Data(data) => {
                    if let Some(digest) = digest.as_deref_mut() {
                        digest.update(&data);
                    }
                }
                Step::Trailers(_) | Step::End => return Ok(true),
                Step::More => return Ok(false),
            }
        },
        Left::UntilClose => {
            if let Some(digest) = digest {
                digest.update(buf);
            }
            buf.clear();
            Ok(false)
        }
    }
}
