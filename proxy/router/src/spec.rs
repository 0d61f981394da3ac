//! The route table as written: plain serde types, shared by the YAML config file and the JSON
//! body of `PUT /routes`, so that both are read, checked and reported the same way.
//!
//! They are turned into the checked [`Table`](crate::Table) by [`Table::build`](crate::Table::build).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The whole routing table: the tracks traffic can go to and the routes that choose them.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// On `PUT /routes` only: the version the change was based on. If it is not the version in
    /// force, the table is not replaced (409). `GET /routes` reports the version in force here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The tracks (stable, canary, shadow, …) by name, each with its backends.
    #[serde(deserialize_with = "unique_keys")]
    pub tracks: BTreeMap<String, TrackSpec>,
    /// The routes; a request takes the most specific host, then the most specific path.
    #[serde(deserialize_with = "paced")]
    pub routes: Vec<RouteSpec>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackSpec {
    /// Backend addresses as `host:port`, used round robin.
    pub backends: Vec<String>,
    /// How to speak to the backends: `auto` (HTTP/2 if the client spoke HTTP/2 and the
    /// backend speaks it, else HTTP/1.1), `http1`, or `h2c` (HTTP/2 with prior knowledge).
    /// Default: `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolSpec {
    Auto,
    Http1,
    H2c,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// A name for metrics and stats. Default: host and path, as `*/api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `example.com` (exact), `*.example.com` (any subdomain) or `*`. Default: `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Matches this path and everything below it, segment by segment. Default: `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Matches exactly this path; instead of `path_prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Evaluated in order before the split; the first rule that matches picks the track.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Basis points per track, summing to 10000, as `{ stable: 9500, canary: 500 }`.
    #[serde(deserialize_with = "unique_keys")]
    pub split: BTreeMap<String, u32>,
    /// Where the split finds a user's key, so that the user stays on one track.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickySpec>,
    /// A sampled share of requests is copied to another track; its answers are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Every condition given must hold.
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// The track that serves a matching request.
    pub to: String,
}

/// The tests are boxed: a rule rarely has more than one, and unboxed each would take its full
/// size in every rule (a 10,000-route table's rules took 14 MiB instead of 3).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Box<ValueMatchSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<Box<ValueMatchSpec>>,
    /// A query-string parameter, compared after percent-decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Box<ValueMatchSpec>>,
    /// Request methods, as `[GET, HEAD]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Vec<String>>,
}

/// A named value (header, cookie or query parameter) and exactly one test on it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A regular expression that must match the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: the value is there, whatever it is; `false`: it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// `true`: the value is not there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absent: Option<bool>,
}

/// Exactly one of `cookie` or `header`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StickySpec {
    /// The cookie that holds the key; the proxy sets it when a request comes without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The header that holds the key (e.g. `x-user-id`); no header means a random bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Max-Age of the cookie the proxy sets, in seconds. Default: 2592000 (30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// Mark the cookie `Secure`. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    /// The track that receives the copies.
    pub to: String,
    /// Percent of the route's requests to copy, 0-100, down to 0.01.
    pub percent: f64,
    /// Whether each copy's answer is compared with the primary's: `status` (and a gRPC call's
    /// `grpc-status`), or `body` (also a digest of the body). Default: not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Compare>,
}

/// What of a mirrored copy's answer is compared with the primary's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    /// The status code, and a gRPC call's `grpc-status`.
    Status,
    /// Those and the body (a digest of its bytes; other headers and trailers are not
    /// compared).
    Body,
}

/// A map that refuses a repeated key, which serde_json would otherwise resolve silently by
/// keeping the last one (the YAML reader reports it as an error).
fn unique_keys<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map with unique keys")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key \"{key}\"")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// A sequence read with a yield point after each element, in pieces joined at the end (see
/// [`crate::pace`]).
pub fn paced<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Paced<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Paced<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            const PIECE: usize = 256;
            let (mut pieces, mut piece) = (Vec::new(), Vec::new());
            while let Some(value) = seq.next_element()? {
                piece.push(value);
                if piece.len() == PIECE {
                    pieces.push(std::mem::take(&mut piece));
                }
                crate::pace::point();
            }
            pieces.push(piece);
            Ok(crate::pace::join(pieces))
        }
    }

    d.deserialize_seq(Paced(std::marker::PhantomData))
}
