//! The proxy table for a desired state: the pure translation from what the controller wants
//! to what `PUT /routes` takes, with the backends the driver made ready.

use std::collections::BTreeMap;

use fleet_proto::v1 as pb;
use fleet_proxy_router::spec::{
    Compare, MatchSpec, MirrorSpec, RouteSpec, RuleSpec, StickySpec, TableSpec, TrackSpec,
    ValueMatchSpec,
};

pub const STABLE: &str = "stable";
pub const CANARY: &str = "canary";

/// The table for `desired`, given the ready backends of each version; `None` while a version
/// it needs has none.
pub fn table(
    desired: &pb::DesiredState,
    ready: &BTreeMap<String, Vec<String>>,
) -> Option<TableSpec> {
    let stable = desired.stable.as_ref()?;
    let canary = desired.canary.as_ref();
    let backends = |version: &str| ready.get(version).filter(|b| !b.is_empty()).cloned();
    let mut tracks = BTreeMap::from([(STABLE.to_string(), track(backends(&stable.version)?))]);
    if let Some(c) = canary {
        tracks.insert(CANARY.to_string(), track(backends(&c.version)?));
    }
    let routes = desired.routes.clone().unwrap_or_default();
    let weight = if canary.is_some() {
        routes.canary_weight_bp.min(10_000)
    } else {
        0
    };
    let split = match canary {
        Some(_) => BTreeMap::from([
            (STABLE.to_string(), 10_000 - weight),
            (CANARY.to_string(), weight),
        ]),
        None => BTreeMap::from([(STABLE.to_string(), 10_000)]),
    };
    let rules = match canary {
        Some(_) => routes.cohort.iter().filter_map(rule).collect(),
        None => Vec::new(),
    };
    let sticky = routes.sticky.as_ref().map(|s| match s {
        pb::route_table::Sticky::StickyCookie(c) => StickySpec {
            cookie: Some(c.clone()),
            ..Default::default()
        },
        pb::route_table::Sticky::StickyHeader(h) => StickySpec {
            header: Some(h.clone()),
            ..Default::default()
        },
    });
    let mirror = (canary.is_some() && routes.mirror_bp > 0).then(|| MirrorSpec {
        to: CANARY.to_string(),
        percent: f64::from(routes.mirror_bp) / 100.0,
        // Left out unless asked for: proxies older than comparisons refuse the field.
        compare: match routes.mirror_compare() {
            pb::MirrorCompare::None => None,
            pb::MirrorCompare::Status => Some(Compare::Status),
            pb::MirrorCompare::Body => Some(Compare::Body),
        },
    });
    let route = RouteSpec {
        name: Some(desired.service.clone()),
        host: Some(if routes.host.is_empty() {
            "*".into()
        } else {
            routes.host.clone()
        }),
        path_prefix: Some(if routes.path_prefix.is_empty() {
            "/".into()
        } else {
            routes.path_prefix.clone()
        }),
        path: None,
        rules,
        split,
        sticky,
        mirror,
    };
    Some(TableSpec {
        version: None,
        tracks,
        routes: vec![route],
    })
}

fn track(backends: Vec<String>) -> TrackSpec {
    TrackSpec {
        backends,
        protocol: None,
    }
}

fn rule(c: &pb::CohortRule) -> Option<RuleSpec> {
    let mut value = ValueMatchSpec {
        name: c.name.clone(),
        ..Default::default()
    };
    match c.test.as_str() {
        "exact" => value.exact = Some(c.value.clone()),
        "prefix" => value.prefix = Some(c.value.clone()),
        "regex" => value.regex = Some(c.value.clone()),
        "present" => value.present = Some(c.value != "false"),
        _ => return None,
    }
    let (mut matches, value) = (MatchSpec::default(), Some(Box::new(value)));
    match c.on.as_str() {
        "header" => matches.header = value,
        "cookie" => matches.cookie = value,
        "query" => matches.query = value,
        _ => return None,
    }
    Some(RuleSpec {
        matches,
        to: CANARY.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(canary_weight_bp: u32, with_canary: bool) -> pb::DesiredState {
        pb::DesiredState {
            service: "demo".into(),
            stable: Some(pb::Track {
                version: "v1".into(),
                replicas: 1,
            }),
            canary: with_canary.then(|| pb::Track {
                version: "v2".into(),
                replicas: 1,
            }),
            routes: Some(pb::RouteTable {
                canary_weight_bp,
                cohort: vec![pb::CohortRule {
                    on: "header".into(),
                    name: "x-canary".into(),
                    test: "exact".into(),
                    value: "true".into(),
                }],
                mirror_bp: 1000,
                sticky: Some(pb::route_table::Sticky::StickyCookie("fleet-bucket".into())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ready() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            ("v1".into(), vec!["127.0.0.1:1".into()]),
            ("v2".into(), vec!["127.0.0.1:2".into()]),
        ])
    }

    #[test]
    fn a_canary_step_splits_by_weight_keeps_the_cohort_and_mirrors() {
        let t = table(&desired(500, true), &ready()).unwrap();
        let route = &t.routes[0];
        assert_eq!(
            route.split,
            BTreeMap::from([("canary".into(), 500), ("stable".into(), 9500)])
        );
        assert_eq!(route.rules.len(), 1);
        assert_eq!(route.rules[0].to, "canary");
        assert_eq!(route.mirror.as_ref().map(|m| m.percent), Some(10.0));
        assert_eq!(t.tracks["canary"].backends, ["127.0.0.1:2"]);
        // The table is one the proxy accepts.
        let json = serde_json::to_string(&t).unwrap();
        assert!(fleet_proxy_router::load(&json).is_ok(), "{json}");
    }

    #[test]
    fn mirrored_answers_are_compared_only_as_asked() {
        let compare = |asked: pb::MirrorCompare| {
            let mut d = desired(0, true);
            d.routes.as_mut().unwrap().mirror_compare = asked.into();
            let t = table(&d, &ready()).unwrap();
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(
                json.contains("compare"),
                asked != pb::MirrorCompare::None,
                "{json}"
            );
            t.routes[0].mirror.as_ref().and_then(|m| m.compare)
        };
        assert_eq!(compare(pb::MirrorCompare::None), None);
        assert_eq!(compare(pb::MirrorCompare::Status), Some(Compare::Status));
        assert_eq!(compare(pb::MirrorCompare::Body), Some(Compare::Body));
    }

    #[test]
    fn without_a_canary_everything_goes_to_stable() {
        let t = table(&desired(500, false), &ready()).unwrap();
        assert_eq!(
            t.routes[0].split,
            BTreeMap::from([("stable".into(), 10_000)])
        );
        assert!(t.routes[0].rules.is_empty() && t.routes[0].mirror.is_none());
        assert_eq!(t.tracks.keys().collect::<Vec<_>>(), ["stable"]);
    }

    #[test]
    fn no_table_until_every_version_needed_is_ready() {
        let only_v1 = BTreeMap::from([("v1".to_string(), vec!["127.0.0.1:1".to_string()])]);
        assert!(table(&desired(500, true), &only_v1).is_none());
        assert!(table(&desired(500, false), &only_v1).is_some());
    }
}
