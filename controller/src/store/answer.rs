//! An answer to a request, as kept for the request's repeats: stamped with when it was given,
//! so that the store forgets answers older than [`KEEP_FOR`] (`Store::forget_answers`) rather
//! than grow for ever. An answer kept before answers were stamped has no stamp: the first
//! sweep stamps it with its own time, so that it too is kept for [`KEEP_FOR`] from then.

use std::time::Duration;

/// How long an answer is kept: a request repeated later is made anew.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// The first byte of a stamped answer. Never the first byte of a protobuf message: the low
/// three bits of a message's first byte are its first field's wire type, and 7 is none.
const STAMPED: u8 = 0xff;

/// `answer` (an encoded protobuf message), given at `at_ms` (Unix milliseconds), as kept.
pub fn stamped(at_ms: i64, answer: &[u8]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(9 + answer.len());
    kept.push(STAMPED);
    kept.extend_from_slice(&at_ms.to_be_bytes());
    kept.extend_from_slice(answer);
    kept
}

/// The answer in `kept`, stamped or not.
pub fn answer(kept: &[u8]) -> &[u8] {
    match split(kept) {
        Some((_, answer)) => answer,
        None => kept,
    }
}

/// When the answer in `kept` was given, and the answer; `None` if it has no stamp.
fn split(kept: &[u8]) -> Option<(i64, &[u8])> {
    let (&first, rest) = kept.split_first()?;
    if first != STAMPED || rest.len() < 8 {
        return None;
    }
    let (at, answer) = rest.split_at(8);
    Some((i64::from_be_bytes(at.try_into().ok()?), answer))
}

/// What a sweep does with a kept answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Sweep {
    Keep,
    Forget,
    /// Keep it as this: stamped now.
    Stamp(Vec<u8>),
}

/// What to do with `kept` when answers given before `before_ms` are forgotten, at `now_ms`.
/// Pure.
pub fn sweep(kept: &[u8], before_ms: i64, now_ms: i64) -> Sweep {
    match split(kept) {
        Some((at, _)) if at < before_ms => Sweep::Forget,
        Some(_) => Sweep::Keep,
        None => Sweep::Stamp(stamped(now_ms, kept)),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn an_answer_is_read_back_stamped_or_not_and_forgotten_once_old() {
        let release = fleet_proto::v1::Release {
            id: "checkout-1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let kept = stamped(1_000, &release);
        assert_eq!(answer(&kept), release);
        assert_eq!(
            answer(&release),
            release,
            "kept before answers were stamped"
        );
        assert_eq!(answer(&[]), [0u8; 0]);
        assert_eq!(sweep(&kept, 1_001, 5_000), Sweep::Forget);
        assert_eq!(sweep(&kept, 1_000, 5_000), Sweep::Keep);
        assert_eq!(
            sweep(&release, 1_001, 5_000),
            Sweep::Stamp(stamped(5_000, &release))
        );
        assert_eq!(sweep(&[], 1_001, 5_000), Sweep::Stamp(stamped(5_000, &[])));
    }

    #[test]
    fn no_protobuf_message_begins_as_a_stamped_answer_does() {
        // Any byte after the first: the message does not decode.
        for second in [0u8, 1, 0x0a, 0x7f, 0x80, 0xff] {
            let bytes = [STAMPED, second, 0, 0, 0, 0, 0, 0, 0, 0];
            assert!(
                fleet_proto::v1::Release::decode(&bytes[..]).is_err(),
                "{second}"
            );
        }
    }
}
