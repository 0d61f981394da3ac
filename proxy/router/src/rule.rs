//! Rules: conditions on a request's headers, cookies, query and method, tested in order.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, header};
use regex::Regex;

use crate::{RequestView, TrackId};

/// A rule: all of its conditions hold ⇒ the request goes to `to`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub(crate) conditions: Vec<Condition>,
    pub(crate) to: TrackId,
}

impl Rule {
    pub fn to(&self) -> TrackId {
        self.to
    }

    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        self.conditions.iter().all(|c| c.matches(req))
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Condition {
    Header(HeaderName, Test),
    Cookie(String, Test),
    Query(String, Test),
    Method(Vec<Method>),
}

/// One test on a value that may be missing.
#[derive(Clone, Debug)]
pub(crate) enum Test {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends when built, so it matches the whole value.
    /// Shared by every rule of the table with the same pattern.
    Regex(Arc<Regex>),
    Present,
    Absent,
}

impl Test {
    fn holds(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Test::Present, v) => v.is_some(),
            (Test::Absent, v) => v.is_none(),
            (_, None) => false,
            (Test::Exact(want), Some(v)) => v == want,
            (Test::Prefix(want), Some(v)) => v.starts_with(want.as_str()),
            (Test::Regex(re), Some(v)) => re.is_match(v),
        }
    }
}

impl Condition {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            // A header sent several times matches if any of its values does; values that are
            // not UTF-8 never match a value test but still count as present. (`to_str` would
            // refuse any byte over 0x7f, so UTF-8 such as `Zoë` is read as bytes.)
            Condition::Header(name, test) => {
                let mut values = req.headers.get_all(name).iter().peekable();
                match test {
                    Test::Present => values.peek().is_some(),
                    Test::Absent => values.peek().is_none(),
                    _ => values.any(|v| test.holds(std::str::from_utf8(v.as_bytes()).ok())),
                }
            }
            // Compared as bytes: most values are settled without a UTF-8 check.
            Condition::Cookie(name, test) => {
                let value = cookie(req.headers, name);
                match test {
                    Test::Present | Test::Absent => test.holds(value.map(|_| "")),
                    Test::Exact(want) => value == Some(want.as_bytes()),
                    Test::Prefix(want) => value.is_some_and(|v| v.starts_with(want.as_bytes())),
                    Test::Regex(_) => test.holds(value.and_then(|v| std::str::from_utf8(v).ok())),
                }
            }
            Condition::Query(name, test) => test.holds(query_param(req.query, name).as_deref()),
            Condition::Method(methods) => methods.contains(req.method),
        }
    }
}

/// The value of cookie `name` across every `Cookie` header (HTTP/2 sends one per cookie).
/// When a name appears more than once the first wins, as browsers send the most specific
/// path first. Surrounding double quotes are removed. Bytes, as sent: a value that is not
/// UTF-8 matches no regex, but is still a sticky key.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    // Bytes, not `str`: only the values of `name` need checking, not every cookie.
    let name = name.as_bytes();
    for header in headers.get_all(header::COOKIE) {
        let mut rest = header.as_bytes();
        while !rest.is_empty() {
            let end = memchr::memchr(b';', rest).unwrap_or(rest.len());
            let pair = rest[..end].trim_ascii_start();
            rest = rest.get(end + 1..).unwrap_or_default();
            // The name, optional spaces, `=`: most pairs are settled by their first bytes.
            let Some(value) = pair
                .strip_prefix(name)
                .and_then(|after| after.trim_ascii_start().strip_prefix(b"="))
            else {
                continue;
            };
            let value = value.trim_ascii();
            return Some(
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value),
            );
        }
    }
    None
}

/// The first value of query parameter `name`, percent-decoded (`+` is a space). A parameter
/// written without `=` has the empty value.
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| decode(k) == name)
        .map(|(_, v)| decode(v))
}

fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(percent_decode(s.as_bytes()))
}

fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
