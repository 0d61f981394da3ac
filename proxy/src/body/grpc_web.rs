//! A gRPC-Web answer's outcome. gRPC-Web carries its trailers in the body, as the last
//! message, flagged in its frame's first byte (`0x80`) and written as an HTTP/1.1 header
//! block ("grpc-status:0\r\ngrpc-message:…\r\n"). [`super::Trailers`] passes the body
//! through untouched and shows this walk each piece: its message frames are followed by their
//! lengths, and only the trailers' bytes are kept.

use bytes::Buf;
use http::{HeaderMap, HeaderValue};

use crate::grpc::GRPC_STATUS;

/// Trailers beyond this are not kept: the status comes first in practice.
const TRAILERS_KEPT: usize = 16 * 1024;
/// A message frame's head: a flags byte and a big-endian length.
const FRAME_HEAD: usize = 5;
const TRAILERS_FLAG: u8 = 0x80;

/// Where the walk over the body's message frames is.
#[derive(Debug)]
pub enum Scan {
    /// Reading a frame's head: what of it has come.
    Head { head: [u8; FRAME_HEAD], had: usize },
    /// Inside a frame: the bytes left of it, and the trailers' bytes if it holds them.
    Message {
        left: u64,
        trailers: Option<Vec<u8>>,
    },
}

impl Default for Scan {
    fn default() -> Self {
        Scan::Head {
            head: [0; FRAME_HEAD],
            had: 0,
        }
    }
}

impl Scan {
    /// Takes the next piece of the body; gives the trailers once their frame has ended.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<HeaderMap> {
        while data.has_remaining() {
            match self {
                Scan::Head { head, had } => {
                    let n = (FRAME_HEAD - *had).min(data.len());
                    head[*had..*had + n].copy_from_slice(&data[..n]);
                    *had += n;
                    data.advance(n);
                    if *had == FRAME_HEAD {
                        let left =
                            u64::from(u32::from_be_bytes([head[1], head[2], head[3], head[4]]));
                        let trailers = (head[0] & TRAILERS_FLAG != 0).then(Vec::new);
                        *self = Scan::Message { left, trailers };
                    }
                }
                Scan::Message { left, trailers } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    if let Some(kept) = trailers {
                        let room = TRAILERS_KEPT.saturating_sub(kept.len());
                        kept.extend_from_slice(&data[..n.min(room)]);
                    }
                    *left -= n as u64;
                    data.advance(n);
                }
            }
            // A frame has ended (one of no length, where its head does).
            if let Scan::Message { left: 0, trailers } = self {
                if let Some(block) = trailers.take() {
                    return Some(parse(&block));
                }
                *self = Scan::default();
            }
        }
        None
    }
}

/// The `grpc-status` of a trailers block ("name:value" lines; names in any case).
fn parse(block: &[u8]) -> HeaderMap {
    let mut found = HeaderMap::new();
    for line in block.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"grpc-status")
            && let Ok(value) = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
        {
            found.insert(GRPC_STATUS, value);
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flags];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The status found when `body` comes in pieces of `piece` bytes.
    fn status(body: &[u8], piece: usize) -> Option<Option<String>> {
        let mut scan = Scan::default();
        for chunk in body.chunks(piece) {
            if let Some(t) = scan.feed(chunk) {
                return Some(t.get(GRPC_STATUS).map(|v| v.to_str().unwrap().to_string()));
            }
        }
        None
    }

    #[test]
    fn the_trailers_message_is_found_however_the_body_is_cut() {
        let mut body = frame(0, b"hello");
        body.extend(frame(0x01, b"compressed"));
        body.extend(frame(0, b""));
        body.extend(frame(0x80, b"grpc-message:x\r\nGrpc-Status: 14\r\n"));
        for piece in 1..=body.len() {
            assert_eq!(
                status(&body, piece),
                Some(Some("14".into())),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn a_body_without_trailers_or_with_empty_ones_gives_what_it_has() {
        assert_eq!(status(&frame(0, b"only a message"), 3), None);
        let body = [frame(0, b"m"), frame(0x80, b"")].concat();
        for piece in 1..=body.len() {
            assert_eq!(status(&body, piece), Some(None), "pieces of {piece}");
        }
        let without = frame(0x80, b"grpc-message: no status\r\n");
        assert_eq!(status(&without, 4), Some(None));
    }

    #[test]
    fn huge_trailers_keep_their_first_bytes() {
        let mut block = b"grpc-status: 13\r\n".to_vec();
        block.extend(std::iter::repeat_n(b'x', 100_000));
        assert_eq!(status(&frame(0x80, &block), 4096), Some(Some("13".into())));
    }
}
