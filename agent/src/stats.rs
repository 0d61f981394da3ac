//! From a proxy's `GET /stats` to the per-track counters the controller judges. The agent
//! sums its proxies' through a [`fleet_proto::tally::Tally`].

use std::collections::BTreeMap;

use fleet_proto::v1 as pb;
use serde::Deserialize;

use crate::routes::{CANARY, STABLE};

/// The part of a proxy's `/stats` the agent reads (documented in docs/proxy.md).
#[derive(Debug, Deserialize)]
pub struct ProxyStats {
    /// When the proxy started: its counters are since then.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// The version of the table in force.
    #[serde(default)]
    pub table_version: u64,
    pub latency_bounds_ms: Vec<f64>,
    pub series: Vec<Series>,
}

#[derive(Debug, Deserialize)]
pub struct Series {
    pub track: String,
    pub source: String,
    pub requests: u64,
    #[serde(default)]
    pub responses: BTreeMap<String, u64>,
    pub errors: u64,
    /// gRPC answers (HTTP 200) whose status stands for a server's failure; absent from
    /// proxies older than the field.
    #[serde(default)]
    pub grpc_errors: u64,
    /// Responses whose body the backend broke off or stalled after their head; absent from
    /// proxies older than the field.
    #[serde(default)]
    pub broken: u64,
    /// Mirror series: copies whose answer was compared with the primary's, and those that
    /// differed; absent from proxies older than the fields.
    #[serde(default)]
    pub compared: u64,
    #[serde(default)]
    pub differed: u64,
    pub latency: Latency,
}

#[derive(Debug, Deserialize)]
pub struct Latency {
    pub cumulative: Vec<u64>,
}

/// A proxy's series summed into stable and canary counters. An error is a 5xx answer, a gRPC
/// answer with a server's failure in its status, an answer whose body the backend broke off
/// or stalled, or none at all; mirrored copies count with
/// the track they were sent to, so that a mirror phase has numbers to judge.
pub fn tracks(proxy: &ProxyStats) -> pb::TrafficStats {
    let mut out = pb::TrafficStats::default();
    for s in &proxy.series {
        let into = match s.track.as_str() {
            STABLE => &mut out.stable,
            CANARY => &mut out.canary,
            _ => continue,
        };
        let fivexx = s.responses.get("5xx").copied().unwrap_or(0);
        // A primary answered by the proxy for a dead backend is already a 5xx; a mirrored
        // copy that got no answer is in no class.
        let unanswered = if s.source == "mirror" { s.errors } else { 0 };
        let series = pb::TrackStats {
            requests: s.requests,
            errors: fivexx + unanswered + s.grpc_errors + s.broken,
            latency_bounds_ms: proxy.latency_bounds_ms.clone(),
            latency_counts: s.latency.cumulative.clone(),
            compared: s.compared,
            differed: s.differed,
        };
        fleet_proto::tally::add_track(into, &series);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_add_up_by_track_with_5xx_and_unanswered_mirrors_as_errors_and_comparisons() {
        let json = r#"{
          "latency_bounds_ms": [10, 100],
          "series": [
            {"route":"demo","track":"stable","source":"primary","requests":90,"responses":{"2xx":89,"5xx":1},"errors":1,"broken":3,"latency":{"cumulative":[80,90,90],"sum_us":1}},
            {"route":"demo","track":"canary","source":"primary","requests":10,"responses":{"2xx":9,"5xx":1},"errors":0,"grpc_errors":2,"latency":{"cumulative":[5,10,10],"sum_us":1}},
            {"route":"demo","track":"canary","source":"mirror","requests":4,"responses":{"2xx":3},"errors":1,"compared":3,"differed":1,"latency":{"cumulative":[2,3,4],"sum_us":1}},
            {"route":"api","track":"canary","source":"mirror","requests":2,"responses":{"2xx":2},"errors":0,"compared":2,"differed":0,"latency":{"cumulative":[2,2,2],"sum_us":1}}
          ]}"#;
        let proxy: ProxyStats = serde_json::from_str(json).unwrap();
        let total = tracks(&proxy);
        let (stable, canary) = (total.stable.unwrap(), total.canary.unwrap());
        // 5xx 1 + bodies broken off 3.
        assert_eq!((stable.requests, stable.errors), (90, 4));
        // 5xx 1 + gRPC failures 2 (on 200s) + an unanswered copy 1.
        assert_eq!((canary.requests, canary.errors), (16, 4));
        assert_eq!(canary.latency_counts, [9, 15]);
        // Copies compared with their primaries, over both routes.
        assert_eq!((canary.compared, canary.differed), (5, 1));
        assert_eq!((stable.compared, stable.differed), (0, 0));
        assert_eq!(canary.latency_bounds_ms, [10.0, 100.0]);
    }
}
