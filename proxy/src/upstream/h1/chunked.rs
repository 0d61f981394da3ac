//! The chunked transfer coding of a response body (RFC 9112, section 7.1), decoded from the
//! front of a read buffer: chunk data comes out as it arrives, without being copied. Pure.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Longest chunk-size line (with its extensions) taken.
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section taken.
const MAX_TRAILERS: usize = 16 * 1024;

/// What the bytes at the front of the buffer gave.
#[derive(Debug, PartialEq)]
pub enum Step {
    Data(Bytes),
    /// The trailer fields; the body has ended.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// Nothing until more bytes arrive.
    More,
}

#[derive(Debug, Default)]
pub struct Chunked {
    state: State,
}

#[derive(Debug, Default, Clone, Copy)]
enum State {
    #[default]
    Size,
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    Trailers,
    End,
}

impl Chunked {
    pub fn is_end(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Decodes from the front of `buf`, taking off what it used.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, &'static str> {
        loop {
            match self.state {
                State::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        if !buf[0].is_ascii_hexdigit() {
                            return Err("malformed chunk size");
                        }
                        buf.advance(len);
                        self.state = match size {
                            0 => State::Trailers,
                            n => State::Data(n),
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_SIZE_LINE => {
                        return Err("chunk size line too long");
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(_) => return Err("malformed chunk size"),
                },
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    self.state = match left - n as u64 {
                        0 => State::DataEnd,
                        rest => State::Data(rest),
                    };
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                State::DataEnd => match buf.get(..2) {
                    Some(b"\r\n") => {
                        buf.advance(2);
                        self.state = State::Size;
                    }
                    Some(_) => return Err("chunk data not followed by a line end"),
                    None if buf.first().is_some_and(|b| *b != b'\r') => {
                        return Err("chunk data not followed by a line end");
                    }
                    None => return Ok(Step::More),
                },
                State::Trailers => return self.trailers(buf),
                State::End => return Ok(Step::End),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Step, &'static str> {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let (len, fields) = match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                return Err("trailers too large");
            }
            Ok(httparse::Status::Partial) => return Ok(Step::More),
            Err(_) => return Err("malformed trailers"),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for f in fields {
            let name =
                HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| "malformed trailers")?;
            let value = HeaderValue::from_bytes(f.value).map_err(|_| "malformed trailers")?;
            if may_trail(&name) {
                trailers.append(name, value);
            }
        }
        buf.advance(len);
        self.state = State::End;
        Ok(match trailers.is_empty() {
            true => Step::End,
            false => Step::Trailers(trailers),
        })
    }
}

/// False for the fields no trailer section may carry (RFC 9110, section 6.5.1), which are
/// dropped: framing, connection management, routing, the content's format, authentication
/// and cookies. Passed on, the connection-specific ones would have an HTTP/2 client's stream
/// reset, as they are malformed in HTTP/2. Used both ways: for responses' trailers as they
/// are decoded, for requests' as they are written.
pub fn may_trail(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "trailer"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "upgrade"
            | "te"
            | "host"
            | "content-type"
            | "content-encoding"
            | "content-range"
            | "authorization"
            | "www-authenticate"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "set-cookie"
            | "cookie"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` a piece at a time (every split point is tried) and collects the body.
    fn decode(raw: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let (mut chunked, mut buf, mut body) = (Chunked::default(), BytesMut::new(), Vec::new());
        let mut pieces = raw.chunks(piece);
        loop {
            match chunked.step(&mut buf)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::Trailers(t) => return Ok((body, Some(t))),
                Step::End => return Ok((body, None)),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err("incomplete"),
                },
            }
        }
    }

    #[test]
    fn bodies_decode_the_same_however_the_bytes_arrive() {
        let raw = b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\nA \r\n0123456789\r\n0\r\n\r\n";
        for piece in 1..=raw.len() {
            let (body, trailers) = decode(raw, piece).unwrap();
            assert_eq!(body, b"hello 0123456789", "pieces of {piece}");
            assert!(trailers.is_none());
        }
    }

    #[test]
    fn trailers_come_last() {
        let raw = b"2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n";
        for piece in 1..=raw.len() {
            let (body, trailers) = decode(raw, piece).unwrap();
            let trailers = trailers.expect("trailers");
            assert_eq!(body, b"ok");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "fine");
        }
    }

    #[test]
    fn fields_no_trailer_may_carry_are_dropped() {
        let raw = b"0\r\nContent-Length: 9\r\ngrpc-status: 0\r\nConnection: close\r\nTE: x\r\n\r\n";
        let (_, trailers) = decode(raw, raw.len()).unwrap();
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.keys().collect::<Vec<_>>(), ["grpc-status"]);
        let raw = b"0\r\nset-cookie: a=b\r\n\r\n";
        assert_eq!(
            decode(raw, raw.len()),
            Ok((Vec::new(), None)),
            "nothing left: no trailers"
        );
    }

    #[test]
    fn bytes_after_the_last_chunk_stay_in_the_buffer() {
        let (mut chunked, mut buf) = (Chunked::default(), BytesMut::from("0\r\n\r\nHTTP/1.1"));
        assert_eq!(chunked.step(&mut buf), Ok(Step::End));
        assert!(chunked.is_end());
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn malformed_codings_are_refused() {
        let cases: [(&[u8], &str); 6] = [
            (b"x\r\n", "malformed chunk size"),
            (b"\r\n", "malformed chunk size"),
            (b"11111111111111111\r\n", "malformed chunk size"),
            (b"2\r\nokX\r\n", "chunk data not followed by a line end"),
            (b"2\r\nok\rX", "chunk data not followed by a line end"),
            (b"0\r\nbad trailer\r\n\r\n", "malformed trailers"),
        ];
        for (raw, reason) in cases {
            assert_eq!(decode(raw, raw.len()), Err(reason), "{raw:?}");
        }
        let long = [b"1;".as_slice(), &[b'x'; MAX_SIZE_LINE]].concat();
        assert_eq!(decode(&long, long.len()), Err("chunk size line too long"));
    }
}
