//! The path a route is chosen by: the request's path as a backend resolves it, so that
//! `/public/../admin`, `/%61dmin` and `//admin` are routed as `/admin` is. The request goes
//! on with its path as sent; only the choice of route reads this form.

use std::borrow::Cow;

/// The path with `.` and `..` segments resolved (RFC 3986, section 5.2.4; never above the
/// root), repeated slashes merged, and percent-encoded unreserved characters (letters,
/// digits, `-`, `.`, `_`, `~`) decoded, as RFC 3986's section 6.2.2 allows. Other escapes stay
/// escaped, in upper case (`%2f` is `%2F`): an escaped slash is not a segment's end. `;`
/// parameters and `\` are left as they are. Borrowed, after one pass over its bytes, when
/// there is nothing to do (nearly always).
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || !needs_work(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Cow::Owned(out)
}

/// A `%`, or a segment that is empty, `.` or `..`, begins: a slash followed by a slash or a
/// dot.
fn needs_work(path: &[u8]) -> bool {
    path.iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || (b == b'/' && matches!(path.get(i + 1), Some(b'/' | b'.'))))
}

fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)? << 4) | hex(*bytes.get(i + 2)?)?))
            .flatten();
        match escaped {
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(c));
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                i += 3;
            }
            None => {
                // Whole characters: `i` is at a character boundary here.
                let c = path[i..].chars().next().unwrap_or_default();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn paths_are_read_as_a_backend_resolves_them() {
        for (sent, read) in [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/api/v1/", "/api/v1/"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("//admin", "/admin"),
            ("/admin/./x", "/admin/x"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/../../etc", "/etc"),
            ("/..", "/"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            ("/caf%C3%A9/%7euser", "/caf%C3%A9/~user"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
            ("/é/../x", "/x"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(sent), read, "{sent}");
        }
    }

    #[test]
    fn a_path_with_nothing_to_resolve_is_borrowed() {
        for p in ["/", "/api/v1/users", "/a.b/c.d", "/x-y_z~"] {
            assert!(matches!(normalize(p), std::borrow::Cow::Borrowed(_)), "{p}");
        }
        assert_eq!(normalize("/.well-known/x"), "/.well-known/x");
    }
}
