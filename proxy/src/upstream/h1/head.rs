//! The heads of one HTTP/1.1 exchange: the request head written from the parts fleet-proxy
//! forwards, and the response head parsed (by httparse) into `http` types, with how its body
//! is framed. Pure: bytes in, values out.

use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most fields a response head may carry (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Largest response head taken; a larger one fails the exchange.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How a response body is delimited (RFC 9112, section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// None: a response to HEAD, a 204 or 304, or `Content-Length: 0`.
    Empty,
    Length(u64),
    Chunked,
    /// By the backend closing the connection.
    UntilClose,
}

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another exchange once this body has been read.
    pub keep_alive: bool,
    /// The backend said the connection ends with this answer (`Connection: close`, or HTTP/1.0
    /// without `keep-alive`): it processes no request sent after (RFC 9112, section 9.6).
    pub closes: bool,
    /// The status line's reason when it is not the status code's usual one (`419 Page
    /// Expired`): passed on to HTTP/1.1 clients, as nginx does, rather than hyper's `<none>`.
    /// Boxed: it is rare, and a head is moved several times per request.
    pub reason: Option<Box<hyper::ext::ReasonPhrase>>,
}

/// The framing header the request head gets, if its own headers do not frame the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    Nothing,
    ContentLength(u64),
    Chunked,
}

/// Appends a request head: origin-form target, HTTP/1.1, the headers as they are (the
/// service has already removed the hop-by-hop ones), and the framing header `added`. A request
/// without `Host` (from an HTTP/1.0 client) gets `backend`, the backend's address, as HTTP/1.1
/// requires one (RFC 9112 §3.2) and many servers refuse a request without.
pub fn encode_request(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    backend: &str,
    marked: bool,
    added: Added,
) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    encode_fields(out, &parts.headers);
    // Only an HTTP/1.0 request can come without one (the service refuses others).
    if parts.version == http::Version::HTTP_10 && !parts.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(backend.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if marked {
        let mark = HeaderValue::from_static("1");
        encode_field(out, &crate::service::X_FLEET_MIRROR, &mark);
    }
    match added {
        Added::Nothing => {}
        Added::ContentLength(n) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Added::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends header fields, one line each.
fn encode_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        encode_field(out, name, value);
    }
}

/// Appends one header (or trailer) field line.
pub fn encode_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Whether a parsed head keeps its header fields or only what frames the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fields {
    Keep,
    /// An answer nobody will read (a mirrored copy's): status and framing only, no header map.
    Drop,
}

/// Why a response head was not taken; each names what is wrong with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not a response head: bytes that are not HTTP, or a head broken in its syntax. The
    /// backend or the connection is at fault (another service on the port, bytes left over
    /// from an earlier answer).
    Garbled(&'static str),
    /// A response head, refused for what it says: over the limits, a coding other than
    /// `chunked`, lengths that differ, an unasked-for `101`. The endpoint's answer.
    Refused(&'static str),
}

/// Takes the response head off the front of `buf`, skipping interim (1xx) heads. `Ok(None)`:
/// the head is not complete yet.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    fields: Fields,
) -> Result<Option<Head>, Bad> {
    while !buf.is_empty() {
        let mut found = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut found);
        // What httparse took so far is a status line and fields: past the limits, it is a
        // head too large, not bytes that are not HTTP.
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Ok(None),
            Ok(_) => return Err(Bad::Refused("response head too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Bad::Refused("more than 100 response headers"));
            }
            Err(_) => return Err(Bad::Garbled("malformed response head")),
        };
        let status = resp
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(Bad::Garbled("malformed response status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Bad::Refused(
                "101 Switching Protocols without an upgrade asked for",
            ));
        }
        let head = match status.is_informational() {
            true => None,
            false => Some(build(status, &resp, method, fields).map_err(Bad::Refused)?),
        };
        buf.advance(len);
        if head.is_some() {
            return Ok(head);
        }
    }
    Ok(None)
}

/// `reason` when a status line has one other than `status`'s usual reason.
fn unusual_reason(
    status: StatusCode,
    reason: Option<&str>,
) -> Option<Box<hyper::ext::ReasonPhrase>> {
    let reason = reason.filter(|r| !r.is_empty())?;
    // Most answers are `200 OK`: settled without the table of usual reasons.
    if (status == StatusCode::OK && reason == "OK") || Some(reason) == status.canonical_reason() {
        return None;
    }
    hyper::ext::ReasonPhrase::try_from(reason.as_bytes())
        .ok()
        .map(Box::new)
}

fn build(
    status: StatusCode,
    resp: &httparse::Response<'_, '_>,
    method: &Method,
    fields: Fields,
) -> Result<Head, &'static str> {
    let found = &*resp.headers;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = match fields {
        Fields::Keep => HeaderMap::with_capacity(found.len()),
        Fields::Drop => HeaderMap::new(),
    };
    let (mut length, mut lengths_differ, mut coding, mut close, mut keep_alive_token) =
        (None::<u64>, false, None::<bool>, false, false);
    for f in found {
        let name = match common_name(f.name.as_bytes()) {
            Some(name) => name,
            None if fields == Fields::Drop => match framing_name(f.name) {
                Some(name) => name,
                None => continue,
            },
            None => HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| "malformed response header name")?,
        };
        let value = f.value;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(value).ok_or("malformed content-length")?;
            lengths_differ |= length.is_some_and(|l| l != n);
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // `chunked` alone, across every Transfer-Encoding field: a body under another
            // coding as well (`gzip, chunked`) would reach the client with that coding undone
            // by nobody and said by nothing, so it is refused, as nginx refuses it.
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if !token.is_empty() {
                    let chunked = coding.is_none() && token.eq_ignore_ascii_case(b"chunked");
                    coding = Some(chunked);
                }
            }
        } else if name == header::CONNECTION {
            let mut names_others = false;
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let (is_close, is_keep_alive) = (
                    token.eq_ignore_ascii_case(b"close"),
                    token.eq_ignore_ascii_case(b"keep-alive"),
                );
                close |= is_close;
                keep_alive_token |= is_keep_alive;
                names_others |= !is_close && !is_keep_alive && !token.is_empty();
            }
            // Hop-by-hop: the service removes it anyway, with any header it names; one that
            // names none is not worth keeping until then.
            if !names_others {
                continue;
            }
        }
        if fields == Fields::Drop {
            continue;
        }
        let value =
            HeaderValue::from_bytes(value).map_err(|_| "malformed response header value")?;
        headers.append(name, value);
    }
    // Framed by its coding: a Content-Length beside it must not reach the client (RFC 9112,
    // section 6.3).
    if coding.is_some() && length.is_some() {
        headers.remove(header::CONTENT_LENGTH);
    }
    let bodiless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match (coding, length) {
        _ if bodiless => Framing::Empty,
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => return Err("transfer-encoding other than chunked"),
        (None, Some(_)) if lengths_differ => return Err("differing content-lengths"),
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    };
    let persistent = match version {
        Version::HTTP_10 => keep_alive_token && !close,
        _ => !close,
    };
    // A body framed two ways is read by its coding, but the connection is not trusted after;
    // nor after a coding in HTTP/1.0, which has none (RFC 9112, section 6.1).
    let doubtful = coding.is_some() && (length.is_some() || version == Version::HTTP_10);
    let keep_alive = persistent && framing != Framing::UntilClose && !doubtful;
    Ok(Head {
        status,
        headers,
        framing,
        keep_alive,
        closes: !persistent,
        reason: match fields {
            Fields::Keep => unusual_reason(status, resp.reason),
            Fields::Drop => None,
        },
    })
}

/// A Content-Length value: digits only, no sign, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    // At most 19 digits: below 10^19, which fits in a u64.
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The names that frame a body or end a connection, in any case.
fn framing_name(name: &str) -> Option<HeaderName> {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
    ]
    .into_iter()
    .find(|n| n.as_str().eq_ignore_ascii_case(name))
}

/// The names most responses carry, as servers spell them: known at once, where
/// `HeaderName::from_bytes` lowercases a name and then looks it up.
fn common_name(name: &[u8]) -> Option<HeaderName> {
    Some(match name {
        b"Date" | b"date" => header::DATE,
        b"Server" | b"server" => header::SERVER,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Connection" | b"connection" => header::CONNECTION,
        b"Transfer-Encoding" | b"transfer-encoding" => header::TRANSFER_ENCODING,
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        b"Content-Encoding" | b"content-encoding" => header::CONTENT_ENCODING,
        b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
        b"ETag" | b"etag" => header::ETAG,
        b"Vary" | b"vary" => header::VARY,
        b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
        b"Location" | b"location" => header::LOCATION,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, method: Method) -> Result<Option<Head>, &'static str> {
        parse_response(&mut BytesMut::from(raw), &method, Fields::Keep).map_err(|bad| match bad {
            Bad::Garbled(why) | Bad::Refused(why) => why,
        })
    }

    /// Bytes that are not a response head are the backend's or the connection's fault; a
    /// head refused for what it says is the endpoint's answer.
    #[test]
    fn garbled_bytes_are_told_from_a_refused_head() {
        let kind = |raw: &str| parse_response(&mut BytesMut::from(raw), &Method::GET, Fields::Keep);
        for raw in [
            "SSH-2.0-OpenSSH_9.6\r\n",
            "\x15\x03\x03\x00\x02\x02\x50",
            "HTTP/1.1 2x0 OK\r\n\r\n",
        ] {
            assert!(matches!(kind(raw), Err(Bad::Garbled(_))), "{raw:?}");
        }
        let fields: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        for raw in [
            format!("HTTP/1.1 200 OK\r\n{fields}\r\n"),
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n".to_string(),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n".to_string(),
            "HTTP/1.1 101 Switching Protocols\r\n\r\n".to_string(),
        ] {
            assert!(matches!(kind(&raw), Err(Bad::Refused(_))), "{raw:?}");
        }
    }

    fn head(raw: &str) -> Head {
        parse(raw, Method::GET).unwrap().unwrap()
    }

    #[test]
    fn common_names_are_the_names_http_would_make_and_lengths_read_to_u64_limits() {
        for name in [
            "Date",
            "date",
            "Server",
            "server",
            "Content-Type",
            "content-type",
            "Content-Length",
            "content-length",
            "Connection",
            "connection",
            "Transfer-Encoding",
            "transfer-encoding",
            "Cache-Control",
            "cache-control",
            "Content-Encoding",
            "content-encoding",
            "Last-Modified",
            "last-modified",
            "ETag",
            "etag",
            "Vary",
            "vary",
            "Set-Cookie",
            "set-cookie",
            "Location",
            "location",
        ] {
            let want = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(common_name(name.as_bytes()), Some(want), "{name}");
        }
        assert_eq!(common_name(b"DATE"), None, "others go the long way");
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_length(b"10000000000000000000"), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
    }

    #[test]
    fn request_heads_are_written_in_origin_form_with_every_header() {
        let (mut parts, ()) = http::Request::get("http://example.com/a/b?c=d")
            .header("host", "example.com")
            .header("x-many", "1")
            .header("x-many", "2")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_request(&mut out, &parts, "b:1", false, Added::Nothing);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nx-many: 1\r\nx-many: 2\r\n\r\n"
        );
        // An HTTP/1.0 request without a host (the only kind the service lets through).
        parts.uri = http::Uri::from_static("http://example.com");
        parts.headers.clear();
        parts.version = http::Version::HTTP_10;
        let mut out = Vec::new();
        encode_request(&mut out, &parts, "b:1", false, Added::Nothing);
        assert_eq!(
            out, b"GET / HTTP/1.1\r\nhost: b:1\r\n\r\n",
            "a host of some kind"
        );
        let mut out = Vec::new();
        encode_request(&mut out, &parts, "b:1", true, Added::Chunked);
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nhost: b:1\r\nx-fleet-mirror: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        for (added, line) in [
            (Added::ContentLength(12), "content-length: 12\r\n"),
            (Added::Chunked, "transfer-encoding: chunked\r\n"),
        ] {
            let mut out = Vec::new();
            encode_request(&mut out, &parts, "b:1", false, added);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("GET / HTTP/1.1\r\nhost: b:1\r\n{line}\r\n")
            );
        }
    }

    #[test]
    fn a_head_in_pieces_is_taken_once_whole_and_the_body_stays() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\n\r\nok\n";
        let head_len = raw.len() - 3;
        let mut buf = BytesMut::new();
        for byte in &raw[..head_len - 1] {
            buf.extend_from_slice(&[*byte]);
            assert!(
                parse_response(&mut buf, &Method::GET, Fields::Keep)
                    .unwrap()
                    .is_none()
            );
        }
        buf.extend_from_slice(&raw[head_len - 1..]);
        let h = parse_response(&mut buf, &Method::GET, Fields::Keep)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (StatusCode::OK, Framing::Length(3), true)
        );
        assert_eq!(h.headers["x-a"], "b");
        assert_eq!(&buf[..], b"ok\n");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n",
                Framing::Length(7),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 7\r\n\r\n",
                Framing::Length(7),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\n",
                Framing::Length(7),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: x, Close\r\n\r\n",
                Framing::Length(7),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 7\r\n\r\n",
                Framing::Length(7),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 7\r\nconnection: keep-alive\r\n\r\n",
                Framing::Length(7),
                true,
            ),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            // Names in any case, spelled as no common server does.
            (
                "HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 7\r\nX-Other: 1\r\n\r\n",
                Framing::Length(7),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: chunked\r\nCONNECTION: close\r\n\r\n",
                Framing::Chunked,
                false,
            ),
        ];
        for (raw, framing, keep_alive) in cases {
            let h = head(raw);
            assert_eq!((h.framing, h.keep_alive), (framing, keep_alive), "{raw:?}");
            // Said to close: only by a close token, or by HTTP/1.0 without keep-alive.
            let said = raw.to_ascii_lowercase().contains("close")
                || (raw.starts_with("HTTP/1.0") && !raw.contains("keep-alive"));
            assert_eq!(h.closes, said, "{raw:?}");
            // The same without the header map, for answers nobody reads.
            let mut buf = BytesMut::from(raw);
            let h = parse_response(&mut buf, &Method::GET, Fields::Drop)
                .unwrap()
                .unwrap();
            assert_eq!((h.framing, h.keep_alive), (framing, keep_alive), "{raw:?}");
            assert!(h.headers.is_empty() && buf.is_empty(), "{raw:?}");
        }
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.headers["content-length"], "7", "kept for the client");
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(
            !h.headers.contains_key("content-length"),
            "framed by its coding alone"
        );
        // A Connection header that names no other header is dropped here; one that does stays
        // for the service to remove what it names.
        let h = head("HTTP/1.1 200 OK\r\nconnection: keep-alive\r\n\r\n");
        assert!(!h.headers.contains_key("connection"));
        let h = head("HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\n\r\n");
        assert_eq!(h.headers["connection"], "x-secret");
    }

    #[test]
    fn interim_heads_are_skipped() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n";
        let h = head(raw);
        assert_eq!(h.status, StatusCode::CREATED);
        assert!(!h.headers.contains_key("link"));
        let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2");
        assert!(
            parse_response(&mut buf, &Method::GET, Fields::Keep)
                .unwrap()
                .is_none()
        );
        assert_eq!(&buf[..], b"HTTP/1.1 2");
    }

    #[test]
    fn bad_responses_are_refused_with_a_reason() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n",
                "differing content-lengths",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +7\r\n\r\n",
                "malformed content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                "malformed content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1, 1\r\n\r\n",
                "malformed content-length",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "101 Switching Protocols without an upgrade asked for",
            ),
            (
                "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "malformed response head",
            ),
            (
                "HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
                "malformed response head",
            ),
            ("SMTP ready\r\n\r\n", "malformed response head"),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                "transfer-encoding other than chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                "transfer-encoding other than chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
                "transfer-encoding other than chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
                "transfer-encoding other than chunked",
            ),
        ];
        for (raw, reason) in cases {
            assert_eq!(parse(raw, Method::GET).unwrap_err(), reason, "{raw:?}");
        }
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            parse(&raw, Method::GET).unwrap_err(),
            "more than 100 response headers"
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "v".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            parse(&huge, Method::GET).unwrap_err(),
            "response head too large"
        );
    }
}
