//! The weighted split: basis points, sticky buckets, and the cookie that keeps a user put.

use http::{HeaderMap, HeaderName};

use crate::TrackId;
use crate::rule::cookie;

/// Buckets are `0..BUCKETS`, one per basis point.
pub const BUCKETS: u32 = 10_000;

/// The bucket of a sticky key: XXH64 of the key's bytes with seed 0, modulo 10000.
///
/// This function is part of the contract between proxies: every fleet-proxy, whatever its
/// version or platform, puts a key in the same bucket, so users do not move when they reach
/// another proxy of the region. Changing it moves users between tracks.
pub fn bucket_of(key: &[u8]) -> u32 {
    // The remainder is below 10000, so it always fits in u32.
    (xxhash_rust::xxh64::xxh64(key, 0) % u64::from(BUCKETS)) as u32
}

/// Tracks laid out over the buckets. Every track other than the baseline takes a range from
/// bucket 0 upwards, in name order; the baseline (`stable` when it is in the split, else the
/// last track by name) takes the rest at the top. With two tracks, `bucket < canary share ⇒
/// canary`: raising the share only moves users from the baseline to the canary, never back.
#[derive(Clone, Debug)]
pub struct Split {
    /// `(end, track)`: buckets below `end` and at or above the previous end go to `track`.
    ranges: Vec<(u32, TrackId)>,
}

impl Split {
    /// `shares` are basis points in layout order (baseline last) and sum to [`BUCKETS`].
    pub(crate) fn new(shares: &[(TrackId, u32)]) -> Self {
        let mut end = 0;
        let ranges = shares
            .iter()
            .map(|&(track, share)| {
                end += share;
                (end, track)
            })
            .collect();
        Split { ranges }
    }

    /// The track that serves `bucket`.
    pub fn track_for(&self, bucket: u32) -> TrackId {
        self.ranges
            .iter()
            .find(|(end, _)| bucket < *end)
            .or(self.ranges.last())
            .map(|(_, track)| *track)
            // A checked split has at least one track; keep a total function all the same.
            .unwrap_or(TrackId(0))
    }

    /// The track, when a single one takes every bucket.
    pub fn single(&self) -> Option<TrackId> {
        let mut serving = self.shares().filter(|(_, share)| *share > 0);
        match (serving.next(), serving.next()) {
            (Some((track, _)), None) => Some(track),
            _ => None,
        }
    }

    /// The tracks in layout order, with their share in basis points.
    pub fn shares(&self) -> impl Iterator<Item = (TrackId, u32)> + '_ {
        let starts = std::iter::once(0).chain(self.ranges.iter().map(|(end, _)| *end));
        self.ranges
            .iter()
            .zip(starts)
            .map(|(&(end, track), start)| (track, end - start))
    }
}

/// Where a route finds a user's sticky key.
#[derive(Clone, Debug)]
pub enum Sticky {
    /// In a cookie, which the proxy sets to a random key when the request has none.
    Cookie {
        name: String,
        max_age: u64,
        secure: bool,
    },
    /// In a header; a request without it gets a random bucket and no cookie.
    Header(HeaderName),
}

/// How the bucket of a request was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bucketing {
    /// From the request's sticky key.
    Sticky,
    /// At random, without a cookie to keep it (no sticky key configured, or a header key
    /// missing).
    Random,
    /// At random, and the user keeps it through this `Set-Cookie` header value.
    Assigned { set_cookie: String },
}

impl Sticky {
    /// The request's bucket and how it was found. `random` is called only when the request
    /// carries no key.
    pub(crate) fn bucket(
        &self,
        headers: &HeaderMap,
        random: &mut dyn FnMut() -> u64,
    ) -> (u32, Bucketing) {
        match self {
            Sticky::Cookie {
                name,
                max_age,
                secure,
            } => match cookie(headers, name) {
                Some(key) if !key.is_empty() => (bucket_of(key), Bucketing::Sticky),
                _ => {
                    let key = format!("{:016x}", random());
                    let secure = if *secure { "; Secure" } else { "" };
                    let set_cookie = format!(
                        "{name}={key}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
                    );
                    (
                        bucket_of(key.as_bytes()),
                        Bucketing::Assigned { set_cookie },
                    )
                }
            },
            Sticky::Header(name) => match headers.get(name).map(|v| v.as_bytes()) {
                Some(key) if !key.is_empty() => (bucket_of(key), Bucketing::Sticky),
                _ => (random_bucket(random), Bucketing::Random),
            },
        }
    }
}

pub(crate) fn random_bucket(random: &mut dyn FnMut() -> u64) -> u32 {
    (random() % u64::from(BUCKETS)) as u32
}
