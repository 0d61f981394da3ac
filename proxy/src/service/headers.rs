//! The headers a request and a response are checked for and rewritten by on their way
//! through: framing that cannot be forwarded safely, protocol switches, hop-by-hop headers,
//! and the forwarding headers the backend gets.
//!
//! A request's headers are looked at once, in order ([`Survey`]), rather than with a hashed
//! lookup for each header asked about: most requests carry a handful of headers and none of
//! the ones that need work.

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::conn::Conn;
use crate::grpc::Grpc;

const HOPS: usize = 7;
/// RFC 9110 §7.6.1's connection-specific fields, and `HTTP2-Settings`, which only an h2c
/// upgrade uses (RFC 7540 §3.2.1). `Trailer` is not one: it tells the recipient which
/// trailer fields follow, and an HTTP/1.1 server sends only the trailers it declares.
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
    header::PROXY_AUTHENTICATE,
];
const CONNECTION: usize = 0;
const TRANSFER_ENCODING: usize = 3;
const UPGRADE: usize = 4;

pub const X_FLEET_MIRROR: HeaderName = HeaderName::from_static("x-fleet-mirror");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Which headers the proxy acts on a message carries, and how many times.
#[derive(Debug, Default)]
pub struct Survey {
    /// Fields of each hop-by-hop header (`HOP_BY_HOP` order).
    hops: [u8; HOPS],
    te: bool,
    content_lengths: u8,
    hosts: u8,
    cookies: u8,
    /// The (last) `Host` is empty or an authority without user information.
    host_well_formed: bool,
    mirror: bool,
    xff: bool,
    /// `Expect` (100-continue): met here, by hyper's `100 Continue` once the body is
    /// wanted, and not sent on.
    expect: bool,
    /// A gRPC or gRPC-Web request (by `content-type`): its answer's status is looked for.
    pub grpc: Grpc,
}

impl Survey {
    pub fn of(h: &HeaderMap) -> Survey {
        let mut s = Survey::default();
        for (name, value) in h {
            // By the name's text: one comparison or none for most names, where comparing
            // `HeaderName`s one by one takes a dozen. Two matches, hop-by-hop names first,
            // measured 140 instructions per request cheaper than one flat match.
            let hop = match name.as_str() {
                "connection" => CONNECTION,
                "keep-alive" => 1,
                "proxy-connection" => 2,
                "transfer-encoding" => TRANSFER_ENCODING,
                "upgrade" => UPGRADE,
                "http2-settings" => 5,
                "proxy-authenticate" => 6,
                other => {
                    match other {
                        "content-length" => {
                            s.content_lengths = s.content_lengths.saturating_add(1);
                        }
                        "te" => s.te = true,
                        "cookie" => s.cookies = s.cookies.saturating_add(1),
                        "host" => {
                            s.hosts = s.hosts.saturating_add(1);
                            s.host_well_formed = well_formed(value.as_bytes());
                        }
                        "x-fleet-mirror" => s.mirror = true,
                        "x-forwarded-for" => s.xff = true,
                        "expect" => s.expect = true,
                        "content-type" => s.grpc = Grpc::of(value),
                        _ => {}
                    }
                    continue;
                }
            };
            s.hops[hop] = s.hops[hop].saturating_add(1);
        }
        s
    }

    /// Puts the request's one host in `Host`, or refuses the request. An HTTP/1.1 request
    /// carries exactly one well-formed `Host` (RFC 9112 §3.2), and an HTTP/2 one `:authority`
    /// or `Host` (RFC 9113 §8.3.1). A host in the URI (absolute-form; `:authority`) is the
    /// one: over HTTP/1 it replaces the `Host` sent (RFC 9112 §3.2.2), over HTTP/2 a `Host`
    /// must agree with it. So a backend never reads another host than routing used.
    pub fn settle_host<B>(&self, req: &mut http::Request<B>) -> Result<(), &'static str> {
        let version = req.version();
        match self.hosts {
            0 if version == Version::HTTP_11 => return Err("no Host header"),
            1 if !self.host_well_formed => return Err("malformed Host header"),
            2.. => return Err("more than one Host header"),
            _ => {}
        }
        let Some(authority) = req.uri().authority() else {
            return match self.hosts == 0 && version == Version::HTTP_2 {
                true => Err("neither :authority nor Host"),
                false => Ok(()),
            };
        };
        if !matches!(req.uri().scheme_str(), Some("http" | "https")) {
            return Err("the request target's scheme is neither http nor https");
        }
        if authority.as_str().contains('@') {
            return Err("user information in the request target");
        }
        match req.headers().get(header::HOST) {
            Some(sent) if version == Version::HTTP_2 => {
                let scheme = req.uri().scheme_str();
                if !same_authority(scheme, sent.as_bytes(), authority.as_str().as_bytes()) {
                    return Err("Host header differs from :authority");
                }
            }
            _ => {
                // A copy: only when the `Host` is to be written.
                let host =
                    HeaderValue::from_str(authority.as_str()).map_err(|_| "malformed authority")?;
                req.headers_mut().insert(header::HOST, host);
            }
        }
        Ok(())
    }

    /// An HTTP/2 request's cookie may come in crumbs, one field each (RFC 9113 §8.2.3):
    /// joined into one `Cookie`, as an HTTP/1.1 backend must get it and as the header count
    /// limit should see it.
    pub fn join_cookies(&self, h: &mut HeaderMap) {
        if self.cookies < 2 {
            return;
        }
        let mut joined = Vec::new();
        for crumb in h.get_all(header::COOKIE) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(crumb.as_bytes());
        }
        if let Ok(cookie) = HeaderValue::from_bytes(&joined) {
            h.insert(header::COOKIE, cookie);
        }
    }

    /// Refuses what hyper lets through but a proxy must not forward: a Transfer-Encoding
    /// other than exactly `chunked` (several codings, several headers), Content-Length next
    /// to Transfer-Encoding, or Content-Length sent twice.
    pub fn framing(&self, h: &HeaderMap, version: Version) -> Result<(), &'static str> {
        let te = self.hops[TRANSFER_ENCODING];
        let chunked = |v: &HeaderValue| v.as_bytes().eq_ignore_ascii_case(b"chunked");
        if te > 1 || (te == 1 && !h.get(header::TRANSFER_ENCODING).is_some_and(chunked)) {
            return Err("unsupported transfer-encoding");
        }
        if self.content_lengths > 1 || (self.content_lengths == 1 && te == 1) {
            return Err("ambiguous message length");
        }
        if version == Version::HTTP_2 && te > 0 {
            return Err("transfer-encoding is not allowed in HTTP/2");
        }
        Ok(())
    }

    /// An HTTP/1.1 request to switch protocols: `Upgrade`, and `Connection` naming it. Not one
    /// to h2c: that would hand the client an HTTP/2 connection straight to the backend, its
    /// requests neither routed nor counted nor given forwarding headers. A server may ignore
    /// an `Upgrade` (RFC 9110 §7.8): the request then goes on without it.
    pub fn wants_upgrade(&self, h: &HeaderMap, version: Version) -> bool {
        version == Version::HTTP_11
            && self.hops[UPGRADE] > 0
            && self.hops[CONNECTION] > 0
            && connection_has(h, "upgrade")
            && !tokens(h, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("h2c"))
    }
}

/// A `Host` value (RFC 9110 §7.2): empty, or a host and an optional port, without user
/// information. Checked by the bytes' classes, as RFC 3986's `reg-name`, `IP-literal` and
/// `port` allow them, one table lookup a byte: parsing it into an `Authority` copies it,
/// for every request.
fn well_formed(host: &[u8]) -> bool {
    host.iter().all(|&b| HOST_BYTES[usize::from(b)]) && port_well_formed(host)
}

/// After the host, nothing or `:` and digits: an IPv6 literal's colons are inside its
/// brackets, and no other host has one (`a.example:1:2` and `a.example:abc` are not a host
/// and port, whichever colon routing would split at).
fn port_well_formed(host: &[u8]) -> bool {
    let after_host = match host.first() {
        Some(b'[') => match memchr::memchr(b']', host) {
            Some(end) => &host[end + 1..],
            None => return false,
        },
        _ => match memchr::memchr3(b':', b'[', b']', host) {
            Some(at) => &host[at..],
            None => return true,
        },
    };
    match after_host.split_first() {
        None => true,
        Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~%!$&'()*+,;=:[]";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    tokens(h, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated tokens of every `name` field.
fn tokens(h: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    h.get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes a response's hop-by-hop headers (see [`strip_hop_by_hop`]); a `101` keeps the
/// `Connection: upgrade` and `Upgrade` its client needs. Gives which gRPC the answer is (by
/// its `content-type`, seen in the same pass).
pub fn strip_response(h: &mut HeaderMap, switched: bool) -> Grpc {
    let survey = Survey::of(h);
    match strip_hop_by_hop(h, &survey, switched) {
        false => survey.grpc,
        // `Connection` named other headers, the content's type perhaps: look again.
        true => h.get(header::CONTENT_TYPE).map_or(Grpc::No, Grpc::of),
    }
}

/// Removes hop-by-hop headers and those the `Connection` header names. `te: trailers` stays:
/// gRPC needs it end to end. With `upgrade`, `Connection: upgrade` and `Upgrade` stay.
/// True when `Connection` named other headers, which are gone now too.
fn strip_hop_by_hop(h: &mut HeaderMap, survey: &Survey, upgrade: bool) -> bool {
    // Headers the `Connection` header names are hop-by-hop too; `keep-alive` and `close`,
    // by far the commonest values, name none.
    let names_none = |v: &HeaderValue| {
        let v = v.as_bytes();
        v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
    };
    let named_others =
        survey.hops[CONNECTION] > 0 && !h.get_all(header::CONNECTION).iter().all(names_none);
    if named_others {
        let named: Vec<HeaderName> = tokens(h, header::CONNECTION)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            // The host routing used: no client may take it from the backend.
            .filter(|n| n != header::HOST)
            // `TE` is trimmed below to the `trailers` a sender names it for (RFC 9110 §10.1.4).
            .filter(|n| n != header::TE)
            .collect();
        for name in named {
            h.remove(name);
        }
    }
    for (name, fields) in HOP_BY_HOP.into_iter().zip(survey.hops) {
        let kept = upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if fields > 0 && !kept {
            h.remove(name);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `TE` is hop-by-hop but for its `trailers` token, which gRPC needs end to end.
    let trailers = |v: &str| v.eq_ignore_ascii_case("trailers");
    let only_trailers = |v: &HeaderValue| v.to_str().is_ok_and(trailers);
    if survey.te && !h.get(header::TE).is_some_and(only_trailers) {
        let keep = tokens(h, header::TE).any(trailers);
        h.remove(header::TE);
        if keep {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    named_others
}

/// The request's headers as its backend gets them: hop-by-hop ones gone, `X-Forwarded-For`,
/// `-Proto` and `-Host` set, and no `x-fleet-mirror` but the proxy's own.
pub fn forwarded(h: &mut HeaderMap, survey: &Survey, conn: &Conn, upgrade: bool) {
    let named_others = strip_hop_by_hop(h, survey, upgrade);
    // `Connection` may have named any of these: look again, in that rare case.
    let again;
    let survey = match named_others {
        true => {
            again = Survey::of(h);
            &again
        }
        false => survey,
    };
    // Only the proxy marks mirrored copies; a client cannot pass for one.
    if survey.mirror {
        h.remove(X_FLEET_MIRROR);
    }
    // The client was told to go on (or, HTTP/1.0, may not expect): the body is sent on as
    // it comes, so the backend is asked for nothing (a server that does not do `Expect` may
    // answer 417; Go's closes the connection after an early answer). nginx clears it too.
    if survey.expect {
        h.remove(header::EXPECT);
    }
    let xff = match survey.xff {
        false => conn.peer_ip.clone(),
        true => {
            let prior = h.get_all(X_FORWARDED_FOR).iter();
            let mut joined = prior.fold(Vec::new(), |mut all, v| {
                all.extend_from_slice(v.as_bytes());
                all.extend_from_slice(b", ");
                all
            });
            joined.extend_from_slice(conn.peer_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| conn.peer_ip.clone())
        }
    };
    h.insert(X_FORWARDED_FOR, xff);
    let proto = if conn.tls { "https" } else { "http" };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // The host routing used, as backends of either protocol get it in `Host` or
    // `:authority`; never one a client wrote itself.
    match h.get(header::HOST).cloned() {
        Some(host) => {
            h.insert(X_FORWARDED_HOST, host);
        }
        None => {
            h.remove(X_FORWARDED_HOST);
        }
    }
}

/// Whether two authorities name the same host and port once normalized for `scheme`, as
/// RFC 9113 §8.3.1 asks of an intermediary comparing `Host` with `:authority` (RFC 3986
/// §6.2.3): the host without regard to case, an empty or absent port as the scheme's default.
fn same_authority(scheme: Option<&str>, a: &[u8], b: &[u8]) -> bool {
    let default: &[u8] = match scheme {
        Some("https") => b"443",
        _ => b"80",
    };
    let normalized = |authority| match split_port(authority) {
        (host, b"") => (host, default),
        given => given,
    };
    let ((host_a, port_a), (host_b, port_b)) = (normalized(a), normalized(b));
    host_a.eq_ignore_ascii_case(host_b) && port_a == port_b
}

/// An authority's host and port (empty when absent); an IPv6 literal's colons are its own.
fn split_port(authority: &[u8]) -> (&[u8], &[u8]) {
    match authority.iter().rposition(|&b| b == b':') {
        Some(i) if !authority[i + 1..].contains(&b']') => (&authority[..i], &authority[i + 1..]),
        _ => (authority, b""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_well_formed_by_rfc_3986s_classes() {
        for good in [
            "",
            "a.example",
            "a.example:8080",
            "[::1]:80",
            "127.0.0.1",
            "x_y-z~1%41",
            "a.example:",
            "[v1.x]",
        ] {
            assert!(well_formed(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "user@a.example",
            "a/b",
            "a?b",
            "a#b",
            "a\"b",
            "a\tb",
            "é.example",
            "a.example:1:2",
            "a.example:abc",
            "a.example:8080]",
            "a[b]",
            "[::1",
            "[::1]x",
            "[::1]:8a",
        ] {
            assert!(!well_formed(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn host_and_authority_are_compared_after_scheme_based_normalization() {
        for (scheme, a, b, same) in [
            ("http", "a.test", "a.test", true),
            ("http", "a.test", "A.Test", true),
            ("http", "a.test", "a.test:80", true),
            ("http", "a.test:", "a.test:80", true),
            ("https", "a.test:443", "a.test", true),
            ("http", "[::1]", "[::1]:80", true),
            ("http", "a.test:8080", "A.TEST:8080", true),
            ("http", "a.test", "b.test", false),
            ("http", "a.test", "a.test:443", false),
            ("https", "a.test", "a.test:80", false),
            ("http", "a.test:8080", "a.test:8081", false),
            ("http", "a.test:8080", "a.test", false),
            ("http", "[::1]", "[::2]:80", false),
            ("http", "a.test", "a.test.evil", false),
        ] {
            // Either way round.
            for (x, y) in [(a, b), (b, a)] {
                let got = same_authority(Some(scheme), x.as_bytes(), y.as_bytes());
                assert_eq!(got, same, "{scheme}: {x} {y}");
            }
        }
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn framing_that_cannot_be_forwarded_safely_is_refused() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Version, Result<(), &'a str>);
        let cases: &[Case<'_>] = &[
            (&[], Version::HTTP_11, Ok(())),
            (&[("content-length", "3")], Version::HTTP_11, Ok(())),
            (
                &[("transfer-encoding", "Chunked")],
                Version::HTTP_11,
                Ok(()),
            ),
            (
                &[("transfer-encoding", "gzip, chunked")],
                Version::HTTP_11,
                Err("unsupported transfer-encoding"),
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                Version::HTTP_11,
                Err("unsupported transfer-encoding"),
            ),
            (
                &[("content-length", "3"), ("transfer-encoding", "chunked")],
                Version::HTTP_11,
                Err("ambiguous message length"),
            ),
            (
                &[("content-length", "3"), ("content-length", "3")],
                Version::HTTP_11,
                Err("ambiguous message length"),
            ),
            (
                &[("transfer-encoding", "chunked")],
                Version::HTTP_2,
                Err("transfer-encoding is not allowed in HTTP/2"),
            ),
        ];
        for (fields, version, want) in cases {
            let h = headers(fields);
            assert_eq!(Survey::of(&h).framing(&h, *version), *want, "{fields:?}");
        }
    }

    #[test]
    fn the_survey_knows_each_hop_by_hop_header_by_its_place() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let h = headers(&[(name.as_str(), "x"), (name.as_str(), "y")]);
            let mut want = [0; HOPS];
            want[i] = 2;
            assert_eq!(Survey::of(&h).hops, want, "{name}");
        }
    }

    #[test]
    fn an_upgrade_needs_both_headers_on_http_1_1() {
        let up = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(Survey::of(&up).wants_upgrade(&up, Version::HTTP_11));
        assert!(!Survey::of(&up).wants_upgrade(&up, Version::HTTP_10));
        let no_token = headers(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
        assert!(!Survey::of(&no_token).wants_upgrade(&no_token, Version::HTTP_11));
    }

    #[test]
    fn a_clients_forwarding_host_is_replaced_and_te_keeps_only_trailers() {
        // A client of a dual-stack listener over IPv4 is named by its IPv4 address.
        let conn = Conn::new("[::ffff:10.0.0.9]:5000".parse().unwrap(), false);
        let mut h = headers(&[
            ("host", "svc.example"),
            ("x-forwarded-host", "evil.example"),
            ("connection", "te"),
            ("te", "trailers, gzip"),
        ]);
        let survey = Survey::of(&h);
        forwarded(&mut h, &survey, &conn, false);
        assert_eq!(h["x-forwarded-host"], "svc.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["te"], "trailers");
        // Without a host to give, a client's own is not passed on either.
        let mut h = headers(&[("x-forwarded-host", "evil.example"), ("te", "gzip")]);
        let survey = Survey::of(&h);
        forwarded(&mut h, &survey, &conn, false);
        assert!(
            !h.contains_key("x-forwarded-host") && !h.contains_key("te"),
            "{h:?}"
        );
    }

    #[test]
    fn a_switching_response_keeps_only_the_headers_its_switch_needs() {
        let mut h = headers(&[
            ("connection", "upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ]);
        strip_response(&mut h, true);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["connection", "sec-websocket-accept", "upgrade"]);
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_headers_are_set_after_hop_by_hop_ones_and_those_named_go() {
        let conn = Conn::new("10.0.0.9:5000".parse().unwrap(), false);
        let mut h = headers(&[
            ("host", "svc.example"),
            ("connection", "x-forwarded-host, x-secret"),
            ("x-secret", "1"),
            ("x-forwarded-host", "spoofed"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-fleet-mirror", "1"),
            ("te", "gzip"),
            ("keep-alive", "timeout=5"),
        ]);
        let survey = Survey::of(&h);
        forwarded(&mut h, &survey, &conn, false);
        let mut got: Vec<_> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "host: svc.example",
                "x-forwarded-for: 192.0.2.1, 10.0.0.9",
                // Named by `Connection`, the client's went; the proxy's own is set.
                "x-forwarded-host: svc.example",
                "x-forwarded-proto: http",
            ]
        );
    }
}
