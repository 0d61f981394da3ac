//! Whether a backend speaks HTTP/2 with prior knowledge, for tracks with `protocol: auto`:
//! asked once on a connection of its own, closed after. It gets the HTTP/2 preface and an
//! empty SETTINGS frame; an HTTP/2 server's first frame is its own SETTINGS (RFC 9113 §3.4),
//! while an HTTP/1.1 server answers the preface with a status line ("HTTP/1.1 400"). Asking
//! on a connection of its own keeps a request from being sent, body and all, to a backend
//! that cannot read it: once a request is on its way it cannot be taken back.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Backend, Error, pool};

/// The client connection preface (RFC 9113 §3.4) and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// `Ok(Some(true))` if the backend's first bytes are a SETTINGS frame header on stream 0,
/// `Ok(Some(false))` if they are anything else (a status line). `Ok(None)` if it ended the
/// connection without a byte (a close or a reset): some HTTP/1.1 servers answer the preface
/// so, while an HTTP/2 server sends its SETTINGS first; yet a server in trouble may too, so
/// the caller learns which from the HTTP/1.1 try that follows. A failure to connect, or no
/// answer by `deadline`, is an error, as for any try.
pub(super) async fn http2(
    backend: &Backend,
    connect_timeout: Duration,
    deadline: Instant,
) -> Result<Option<bool>, Error> {
    let asking = async {
        let mut stream = pool::connect(backend, connect_timeout).await?;
        stream.write_all(PREFACE).await.map_err(Error::Io)?;
        let mut first = [0u8; 9];
        let mut got = 0;
        while got < first.len() {
            match stream.read(&mut first[got..]).await {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
        Ok(match got {
            0 => None,
            _ => Some(got == first.len() && is_settings(&first)),
        })
    };
    tokio::time::timeout_at(deadline, asking)
        .await
        .unwrap_or(Err(Error::TimedOut))
}

/// A frame header (RFC 9113 §4.1): type SETTINGS (4), stream 0.
fn is_settings(head: &[u8; 9]) -> bool {
    head[3] == 0x4 && head[5..9] == [0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settings_frame_header_is_told_from_a_status_line() {
        // An empty SETTINGS, a SETTINGS with three settings and the ACK flag.
        assert!(is_settings(b"\0\0\0\x04\0\0\0\0\0"));
        assert!(is_settings(b"\0\0\x12\x04\x01\0\0\0\0"));
        // A status line; a HEADERS frame; a SETTINGS frame on a stream (not allowed).
        assert!(!is_settings(b"HTTP/1.1 "));
        assert!(!is_settings(b"\0\0\x05\x01\x04\0\0\0\x01"));
        assert!(!is_settings(b"\0\0\0\x04\0\0\0\0\x01"));
    }
}
