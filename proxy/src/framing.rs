//! Sees the raw HTTP/1 request heads that hyper normalizes away, so that ambiguous framing
//! can be refused rather than repaired.
//!
//! hyper frames a request that has both `Content-Length` and `Transfer-Encoding` by the
//! chunked coding alone and drops the `Content-Length`; it also folds repeated identical
//! `Content-Length`s into one (hyper issues 3860 and 4123). That is safe, but a request smuggler
//! sends exactly those, and fleet-proxy refuses them: [`Scan`] wraps the connection, follows
//! the message framing byte by byte (heads, fixed bodies, chunked bodies), and queues one
//! [`Verdict`] per request head; the service takes them in order. When it cannot follow (an
//! HTTP/2 preface, an upgrade, a head hyper will reject anyway), it stops and queues nothing
//! more, and requests without a verdict are judged by hyper's parser alone.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the raw head of one request showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// Refuse with 400 and close, for this reason.
    Refuse(&'static str),
}

/// What the raw bytes of one connection showed: a verdict per request head, in order, and
/// whether the connection is idle between requests (see [`Seen::idle_io`]).
#[derive(Debug, Default)]
pub struct Seen {
    verdicts: Mutex<VecDeque<Verdict>>,
    /// Every byte read so far belongs to a complete request: no partial head or body.
    between_messages: AtomicBool,
    /// The last read found nothing waiting.
    read_blocked: AtomicBool,
    /// The last write or flush could not finish.
    write_blocked: AtomicBool,
    /// Writes that took bytes since the connection began (and flushes that finished after
    /// waiting for room): the client took some when this moves.
    writes: AtomicU64,
    /// Reads that brought bytes since the scan stopped following the framing (an HTTP/2
    /// connection, from its preface on): the client sent some when this moves. Not counted
    /// while HTTP/1 is scanned: only HTTP/2's close looks at it.
    reads: AtomicU64,
    /// The scan stopped at a head asking to switch protocols (`Upgrade`, `CONNECT`): what
    /// follows on the connection is not read by it.
    stopped_at_upgrade: AtomicBool,
}

impl Seen {
    /// Whether the scan stopped at a head asking to switch protocols. Unless the connection
    /// then became a tunnel, it must close after that answer: a request behind it would go
    /// unscanned.
    pub fn stopped_at_upgrade(&self) -> bool {
        self.stopped_at_upgrade.load(Relaxed)
    }

    /// The verdict on the next HTTP/1 request of the connection, if the scan saw its head.
    pub fn next(&self) -> Option<Verdict> {
        crate::lock(&self.verdicts).pop_front()
    }

    fn push(&self, v: Verdict) {
        crate::lock(&self.verdicts).push_back(v);
    }

    /// Every byte read so far belongs to a complete request (false too once the scan stopped
    /// following the framing).
    pub fn between_messages(&self) -> bool {
        self.between_messages.load(Relaxed)
    }

    /// Nothing half-read, nothing waiting to be written, and the last read came back empty:
    /// the bytes say the connection is between requests. (Whether a request is still being
    /// answered is for the service to say.)
    pub fn idle_io(&self) -> bool {
        self.between_messages.load(Relaxed)
            && self.read_blocked.load(Relaxed)
            && !self.write_blocked.load(Relaxed)
    }

    /// The last write or flush is waiting for room from the client.
    pub fn write_blocked(&self) -> bool {
        self.write_blocked.load(Relaxed)
    }

    /// Writes that took bytes since the connection began.
    pub fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }

    /// Reads that brought bytes since the scan stopped following the framing.
    pub fn reads(&self) -> u64 {
        self.reads.load(Relaxed)
    }

    /// As if a write had taken bytes.
    #[cfg(test)]
    pub fn count_write(&self) {
        self.writes.fetch_add(1, Relaxed);
    }
}

#[derive(Debug)]
enum State {
    /// Reading a head, kept in `head` until its blank line.
    Head,
    /// Skipping this many body bytes.
    Fixed(u64),
    /// A chunk-size line, kept in `head`.
    ChunkSize,
    /// Chunk data, then its line end.
    ChunkData(u64),
    ChunkDataEnd,
    /// Trailer lines after the last chunk, kept in `head`, until a blank line.
    Trailers,
    /// Not following any more.
    Off,
}

/// The connection, passed through unchanged, with the framing followed on the side.
pub struct Scan<I> {
    inner: I,
    /// Bytes read off `inner` earlier and not yet passed on, already scanned.
    replay: Bytes,
    state: State,
    head: Vec<u8>,
    max_head: usize,
    seen: Arc<Seen>,
    /// `seen.writes` and `seen.reads`, kept here too: this is their one writer, so they are
    /// stored, not added to.
    writes: u64,
    reads: u64,
}

impl<I> Scan<I> {
    /// `read` are bytes already taken off `inner` (a protocol sniff); they are read first.
    pub fn new(inner: I, read: Bytes, max_head: usize, seen: Arc<Seen>) -> Self {
        let mut scan = Scan {
            inner,
            replay: Bytes::new(),
            state: State::Head,
            head: Vec::new(),
            max_head,
            seen,
            writes: 0,
            reads: 0,
        };
        scan.feed(&read);
        scan.replay = read;
        scan.note_position();
        scan
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// Puts back bytes that were read through this scan but not consumed (hyper's read
    /// buffer when a connection is taken apart); they are read again first.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let mut all = bytes.to_vec();
        all.extend_from_slice(&self.replay);
        self.replay = Bytes::from(all);
    }

    fn note_position(&self) {
        let between = matches!(self.state, State::Head) && self.head.is_empty();
        self.seen.between_messages.store(between, Relaxed);
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Fixed(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkData(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::ChunkDataEnd;
                    }
                }
                State::ChunkDataEnd => match bytes.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        bytes = &bytes[i + 1..];
                        self.state = State::ChunkSize;
                    }
                    None => bytes = &[],
                },
                State::Head | State::ChunkSize | State::Trailers => {
                    bytes = self.take_unit(bytes);
                }
            }
        }
    }

    /// Takes bytes of the current unit: a whole head (up to its blank line) in `Head` and
    /// `Trailers`, one line in `ChunkSize`. A unit that arrived whole in one read is judged
    /// where it lies; only one split across reads is copied into `head`. Returns the rest.
    fn take_unit<'b>(&mut self, mut bytes: &'b [u8]) -> &'b [u8] {
        if matches!(self.state, State::Head) && self.head.is_empty() {
            // Blank lines before a request line are skipped, as hyper does.
            let skip = bytes
                .iter()
                .position(|b| *b != b'\r' && *b != b'\n')
                .unwrap_or(bytes.len());
            bytes = &bytes[skip..];
            // A head that begins in this read is found and read in one pass; one that does
            // not end in it waits for the next read.
            return match survey(bytes) {
                Some((end, facts)) => {
                    self.state = self.judge(&facts);
                    &bytes[end..]
                }
                None => self.keep(bytes),
            };
        }
        let Some(end) = self.unit_end(bytes) else {
            return self.keep(bytes);
        };
        let (unit, rest) = bytes.split_at(end);
        if self.head.is_empty() {
            self.on_unit(unit);
        } else {
            let mut head = std::mem::take(&mut self.head);
            head.extend_from_slice(unit);
            self.on_unit(&head);
        }
        rest
    }

    /// Keeps the start of a unit that has not ended yet, for the next read.
    fn keep<'b>(&mut self, bytes: &[u8]) -> &'b [u8] {
        self.head.extend_from_slice(bytes);
        if self.head.len() > self.max_head {
            // hyper refuses heads this large (431); nothing to follow.
            self.state = State::Off;
        }
        &[]
    }

    /// Where in `bytes` the unit begun in `head` ends (just past its last line end).
    fn unit_end(&self, bytes: &[u8]) -> Option<usize> {
        let whole_head = !matches!(self.state, State::ChunkSize);
        let prev = &self.head;
        // The byte `back` places before position `i` of `bytes`, looking into `head`.
        let before = |i: usize, back: usize| match i.checked_sub(back) {
            Some(j) => Some(bytes[j]),
            None => (prev.len() + i).checked_sub(back).map(|j| prev[j]),
        };
        let mut from = 0;
        while let Some(at) = memchr::memchr(b'\n', &bytes[from..]) {
            let i = from + at;
            from = i + 1;
            if !whole_head {
                return Some(from);
            }
            // A blank line: the head is only that line, or a line end comes before it.
            let blank_lf = before(i, 1).is_none_or(|b| b == b'\n');
            let blank_crlf = before(i, 1) == Some(b'\r') && before(i, 2).is_none_or(|b| b == b'\n');
            if blank_lf || blank_crlf {
                return Some(from);
            }
        }
        None
    }

    fn on_unit(&mut self, unit: &[u8]) {
        self.state = match self.state {
            State::Head => self.on_head(unit),
            State::ChunkSize => {
                let size = unit.split(|b| *b == b';').next().unwrap_or_default();
                match std::str::from_utf8(size.trim_ascii()).map(|s| u64::from_str_radix(s, 16)) {
                    Ok(Ok(0)) => State::Trailers,
                    Ok(Ok(n)) => State::ChunkData(n),
                    _ => State::Off,
                }
            }
            State::Trailers => State::Head,
            _ => State::Off,
        };
    }

    fn on_head(&mut self, head: &[u8]) -> State {
        match survey(head) {
            Some((_, facts)) => self.judge(&facts),
            None => State::Off,
        }
    }

    /// Queues the verdict on a head and says how its body is framed.
    fn judge(&mut self, facts: &Facts<'_>) -> State {
        if facts.h2_preface {
            return State::Off;
        }
        let verdict = match (facts.lengths, facts.codings) {
            (1.., 1..) => Verdict::Refuse("both content-length and transfer-encoding"),
            (2.., _) => Verdict::Refuse("more than one content-length"),
            _ => Verdict::Clean,
        };
        self.seen.push(verdict);
        if facts.upgrade {
            self.seen.stopped_at_upgrade.store(true, Relaxed);
        }
        if verdict != Verdict::Clean || facts.upgrade {
            return State::Off;
        }
        match (facts.first_length, facts.last_coding) {
            (_, Some(coding)) => {
                let last = coding.rsplit(|b| *b == b',').next().unwrap_or_default();
                match last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    true => State::ChunkSize,
                    false => State::Off,
                }
            }
            (Some(len), None) => match std::str::from_utf8(len).map(str::parse::<u64>) {
                Ok(Ok(0)) => State::Head,
                Ok(Ok(n)) => State::Fixed(n),
                _ => State::Off,
            },
            (None, None) => State::Head,
        }
    }
}

/// What a request head says about its framing.
#[derive(Default)]
struct Facts<'h> {
    h2_preface: bool,
    lengths: u32,
    codings: u32,
    first_length: Option<&'h [u8]>,
    last_coding: Option<&'h [u8]>,
    /// CONNECT, or an `Upgrade` header: the bytes after the head may not be HTTP/1.
    upgrade: bool,
}

/// Finds the end of the head at the front of `bytes` (just past its blank line; leading blank
/// lines already skipped) and reads its framing headers on the way: one pass over the lines.
fn survey(bytes: &[u8]) -> Option<(usize, Facts<'_>)> {
    let mut facts = Facts::default();
    let (mut start, mut first) = (0, true);
    // One searcher for every line end, rather than a search begun anew for each line.
    for end in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = end + 1;
        if line.is_empty() {
            return Some((start, facts));
        }
        if std::mem::take(&mut first) {
            facts.h2_preface = line.starts_with(b"PRI * HTTP/2");
            facts.upgrade = line.starts_with(b"CONNECT ");
            continue;
        }
        // No space may come between a field name and its colon (RFC 9112, section 5.1; hyper
        // refuses a head with one), so a name is known by the colon right after it: most
        // lines are settled by a byte or two.
        let field = |name: &[u8]| {
            let named = line.get(name.len()) == Some(&b':')
                && line[..name.len()].eq_ignore_ascii_case(name);
            named.then(|| line[name.len() + 1..].trim_ascii())
        };
        if let Some(value) = field(b"content-length") {
            facts.lengths += 1;
            facts.first_length.get_or_insert(value);
        } else if let Some(value) = field(b"transfer-encoding") {
            facts.codings += 1;
            facts.last_coding = Some(value);
        } else if field(b"upgrade").is_some() {
            facts.upgrade = true;
        }
    }
    None
}

impl<I: AsyncRead + Unpin> AsyncRead for Scan<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.seen.read_blocked.store(polled.is_pending(), Relaxed);
        if polled.is_ready() {
            match this.state {
                State::Off if buf.filled().len() > before => {
                    this.reads += 1;
                    this.seen.reads.store(this.reads, Relaxed);
                }
                State::Off => {}
                _ => this.feed(&buf.filled()[before..]),
            }
        }
        this.note_position();
        polled
    }
}

impl<I> Scan<I> {
    /// A write: bytes taken when it wrote some.
    fn note_write(&mut self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        self.seen.write_blocked.store(polled.is_pending(), Relaxed);
        if let Poll::Ready(Ok(1..)) = polled {
            self.count_write();
        }
        polled
    }

    /// A flush or shutdown: bytes taken only when it finished after waiting for room (one
    /// that finds nothing to write, as HTTP/2's after every turn, took nothing).
    fn note_flush(&mut self, polled: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
        let waited = self.seen.write_blocked.swap(polled.is_pending(), Relaxed);
        if waited && let Poll::Ready(Ok(())) = polled {
            self.count_write();
        }
        polled
    }

    fn count_write(&mut self) {
        self.writes += 1;
        self.seen.writes.store(self.writes, Relaxed);
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Scan<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_flush(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS close_notify may have to wait for room too.
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note_flush(polled)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<Verdict> {
        let seen = Arc::new(Seen::default());
        let mut s = Scan::new((), Bytes::new(), 65_536, seen.clone());
        for c in chunks {
            s.feed(c);
        }
        std::iter::from_fn(|| seen.next()).collect()
    }

    #[test]
    fn pipelined_requests_get_one_verdict_each_whatever_the_read_boundaries() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        let expected = [
            Verdict::Clean,
            Verdict::Clean,
            Verdict::Clean,
            Verdict::Refuse("more than one content-length"),
        ];
        assert_eq!(scan(&[stream]), expected);
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(scan(&[a, b]), expected, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(scan(&bytes), expected);
    }

    #[test]
    fn both_lengths_in_either_order_are_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
        ] {
            assert_eq!(
                scan(&[head]),
                [Verdict::Refuse("both content-length and transfer-encoding")]
            );
        }
    }

    #[test]
    fn http2_and_upgrades_stop_the_scan() {
        assert_eq!(
            scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET / HTTP/1.1\r\n\r\n"]),
            []
        );
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan(&[upgrade]), [Verdict::Clean]);
    }
}
