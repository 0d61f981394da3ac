//! Bounds the message of every status the controller answers with. Messages echo what was
//! asked (a service, an id, a reason): one that echoed a 100 KB argument whole made a header
//! larger than clients take, and they dropped the connection instead of reading the answer.

use tonic::codegen::http::{HeaderValue, Response};

/// The most of a status message sent, in bytes as sent (percent-encoded).
pub(crate) const MAX_MESSAGE: usize = 2048;

/// `response` with its `grpc-message` cut to [`MAX_MESSAGE`], if longer.
pub(crate) fn bounded<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    if let Some(cut) = (headers.get("grpc-message")).and_then(|m| cut(m.as_bytes())) {
        headers.insert("grpc-message", cut);
    }
    response
}

/// `message` cut to [`MAX_MESSAGE`] (not inside a `%XX` escape), saying so; `None` if it is
/// short enough.
fn cut(message: &[u8]) -> Option<HeaderValue> {
    if message.len() <= MAX_MESSAGE {
        return None;
    }
    let tail = &message[MAX_MESSAGE - 2..MAX_MESSAGE];
    let mut end = MAX_MESSAGE - 2 + tail.iter().position(|b| *b == b'%').unwrap_or(2);
    // Nor inside a character: a client takes a message that does not decode to UTF-8 for no
    // status at all. The bytes of one left incomplete are the last escapes.
    while end >= 3 && incomplete(&message[..end]) {
        end -= 3;
    }
    let mut kept = message[..end].to_vec();
    let said = format!(" [cut: the message was {} bytes]", message.len());
    kept.extend_from_slice(said.as_bytes());
    HeaderValue::from_bytes(&kept).ok()
}

/// Whether `encoded` (percent-encoded) ends inside a UTF-8 character.
fn incomplete(encoded: &[u8]) -> bool {
    let bytes: Vec<u8> = percent_encoding::percent_decode(encoded).collect();
    std::str::from_utf8(&bytes).is_err_and(|e| e.error_len().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_is_cut_and_never_inside_an_escape() {
        assert_eq!(cut(b"no fleet for service \"a\""), None);
        let long = "a".repeat(100_000);
        let kept = cut(long.as_bytes()).unwrap();
        let said = " [cut: the message was 100000 bytes]";
        assert_eq!(
            kept.as_bytes(),
            format!("{}{said}", &long[..MAX_MESSAGE]).as_bytes()
        );
        for shift in 0..3 {
            // An escape (%C3%A9, an é) ending at, across or just before the cut.
            let text = format!(
                "{}{}",
                "a".repeat(MAX_MESSAGE - 4 + shift),
                "%C3%A9".repeat(9)
            );
            let kept = cut(text.as_bytes()).unwrap();
            let kept = std::str::from_utf8(kept.as_bytes()).unwrap();
            let head = &kept[..kept.find(" [cut").unwrap()];
            assert!(head.len() <= MAX_MESSAGE, "{shift}");
            // Whole escapes of whole characters: six bytes of text each (%C3%A9).
            let escapes = head.trim_start_matches('a');
            assert_eq!(escapes.len() % 6, 0, "{shift}: {escapes}");
            assert!(!incomplete(head.as_bytes()), "{shift}: {escapes}");
        }
    }
}
