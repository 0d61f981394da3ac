//! An answer to a request, as kept for the request's repeats: stamped with when it was given,
//! so that the store forgets answers older than [`KEEP_FOR`] (`Store::forget_answers`) rather
//! than grow for ever, and with the request's [`Fingerprint`], so that an id given again with
//! another request is refused rather than answered as the first. An answer kept before answers
//! were stamped has no stamp: the first sweep stamps it with its own time, so that it too is
//! kept for [`KEEP_FOR`] from then. One kept before requests were fingerprinted has none, and
//! answers any request with its id.

use std::time::Duration;

/// How long an answer is kept: a request repeated later is made anew.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// The first byte of a stamped answer, and of one kept with its request's fingerprint. Never
/// the first byte of a protobuf message: the low three bits of a message's first byte are its
/// first field's wire type, and neither 7 nor 6 is one.
const STAMPED: u8 = 0xff;
const FINGERPRINTED: u8 = 0xfe;

/// What a request asked, less its id: the first 8 bytes of the SHA-256 of the request, encoded
/// with its id left empty (protobuf encodes the same message the same way: fields in order, no
/// maps in these requests).
pub type Fingerprint = [u8; 8];

/// The fingerprint of `request`, encoded with its id left empty.
pub fn fingerprint(request: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, request);
    let mut fingerprint = Fingerprint::default();
    fingerprint.copy_from_slice(&digest.as_ref()[..8]);
    fingerprint
}

/// `answer` (an encoded protobuf message) to the request `asked`, given at `at_ms` (Unix
/// milliseconds), as kept.
pub fn kept(at_ms: i64, asked: Fingerprint, answer: &[u8]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(17 + answer.len());
    kept.push(FINGERPRINTED);
    kept.extend_from_slice(&at_ms.to_be_bytes());
    kept.extend_from_slice(&asked);
    kept.extend_from_slice(answer);
    kept
}

/// `answer`, given at `at_ms`, as kept without its request's fingerprint: one kept before
/// requests were fingerprinted, stamped by a sweep.
pub fn stamped(at_ms: i64, answer: &[u8]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(9 + answer.len());
    kept.push(STAMPED);
    kept.extend_from_slice(&at_ms.to_be_bytes());
    kept.extend_from_slice(answer);
    kept
}

/// A request to be answered once: its key in the store (its method, caller and id) and its
/// fingerprint.
#[derive(Clone, Debug)]
pub struct Asked {
    pub key: String,
    pub fingerprint: Fingerprint,
}

/// A kept answer, read.
#[derive(Debug, PartialEq, Eq)]
pub struct Read<'a> {
    /// When it was given; `None` if it has no stamp.
    pub at_ms: Option<i64>,
    /// The fingerprint of the request it answered; `None` if it was not kept.
    pub asked: Option<Fingerprint>,
    pub answer: &'a [u8],
}

/// Reads `kept`, in any of its forms.
pub fn read(kept: &[u8]) -> Read<'_> {
    let unstamped = Read {
        at_ms: None,
        asked: None,
        answer: kept,
    };
    let at = |bytes: &[u8]| Some(i64::from_be_bytes(bytes.try_into().ok()?));
    match kept.split_first() {
        // Fingerprinted, then stamped again by a sweep of a controller from before
        // fingerprints (one rolled back to): read as it was kept.
        Some((&STAMPED, rest)) if rest.len() >= 8 && rest.get(8) == Some(&FINGERPRINTED) => {
            read(&rest[8..])
        }
        Some((&STAMPED, rest)) if rest.len() >= 8 => Read {
            at_ms: at(&rest[..8]),
            asked: None,
            answer: &rest[8..],
        },
        Some((&FINGERPRINTED, rest)) if rest.len() >= 16 => Read {
            at_ms: at(&rest[..8]),
            asked: rest[8..16].try_into().ok(),
            answer: &rest[16..],
        },
        _ => unstamped,
    }
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
    match read(kept).at_ms {
        Some(at) if at < before_ms => Sweep::Forget,
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
        assert_eq!(read(&kept).answer, release);
        assert_eq!(
            read(&release).answer,
            release,
            "kept before answers were stamped"
        );
        assert_eq!(read(&[]).answer, [0u8; 0]);
        assert_eq!(sweep(&kept, 1_001, 5_000), Sweep::Forget);
        assert_eq!(sweep(&kept, 1_000, 5_000), Sweep::Keep);
        assert_eq!(
            sweep(&release, 1_001, 5_000),
            Sweep::Stamp(stamped(5_000, &release))
        );
        assert_eq!(sweep(&[], 1_001, 5_000), Sweep::Stamp(stamped(5_000, &[])));
    }

    #[test]
    fn an_answer_is_read_back_with_its_requests_fingerprint_and_swept_as_stamped_ones_are() {
        let release = fleet_proto::v1::Release::default().encode_to_vec();
        let asked = fingerprint(b"\x12\x08checkout");
        assert_ne!(asked, fingerprint(b"\x12\x08payments"));
        let kept = kept(1_000, asked, &release);
        let read = read(&kept);
        assert_eq!((read.at_ms, read.asked), (Some(1_000), Some(asked)));
        assert_eq!(read.answer, release);
        assert_eq!(sweep(&kept, 1_001, 5_000), Sweep::Forget);
        assert_eq!(sweep(&kept, 1_000, 5_000), Sweep::Keep);
        assert_eq!(super::read(&stamped(7, b"a")).asked, None, "kept before");
        // Cut short (a store's bytes mangled): taken for an answer without a stamp.
        assert_eq!(super::read(&kept[..10]).at_ms, None);
        // Stamped again by a controller from before fingerprints (a rollback of it): as kept.
        let restamped = stamped(9_000, &kept);
        assert_eq!(super::read(&restamped), super::read(&kept));
    }

    #[test]
    fn no_protobuf_message_begins_as_a_stamped_answer_does() {
        // Any byte after the first: the message does not decode.
        for first in [STAMPED, FINGERPRINTED] {
            for second in [0u8, 1, 0x0a, 0x7f, 0x80, 0xff] {
                let bytes = [first, second, 0, 0, 0, 0, 0, 0, 0, 0];
                assert!(
                    fleet_proto::v1::Release::decode(&bytes[..]).is_err(),
                    "{first} {second}"
                );
            }
        }
    }
}
