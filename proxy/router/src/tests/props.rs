//! Properties of bucketing and the split that hold for every key and share.

use proptest::prelude::*;

use super::{req, table};
use crate::{Table, load};

fn canary_table(share: u32) -> Table {
    table(&format!(
        "  - {{ split: {{ stable: {}, canary: {share} }}, sticky: {{ cookie: fleet-bucket }} }}\n",
        10_000 - share
    ))
}

fn track_for_user(t: &Table, user: &str) -> String {
    let r = req("GET h/", &[("cookie", &format!("fleet-bucket={user}"))]);
    let d = t
        .decide(&r.view(), &mut || {
            panic!("a keyed request needs no randomness")
        })
        .unwrap();
    t.track(d.track).name().to_string()
}

/// SplitMix64: a small, seeded source of randomness for the accuracy property.
fn splitmix(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

proptest! {
    #[test]
    fn raising_the_canary_share_never_moves_a_user_back_to_stable(
        users in proptest::collection::vec("[a-zA-Z0-9]{1,24}", 1..50),
        low in 0u32..=10_000,
        raise in 0u32..=10_000,
    ) {
        let high = low.saturating_add(raise).min(10_000);
        let (before, after) = (canary_table(low), canary_table(high));
        for user in &users {
            if track_for_user(&before, user) == "canary" {
                prop_assert_eq!(track_for_user(&after, user), "canary");
            }
        }
    }

    #[test]
    fn two_tables_built_from_the_same_config_agree_on_every_key(
        users in proptest::collection::vec("[ -~]{0,40}", 1..50),
        share in 0u32..=10_000,
    ) {
        let (a, b) = (canary_table(share), canary_table(share));
        for user in &users {
            let r = req("GET h/", &[("x-user", user.trim())]);
            let (mut ra, mut rb) = (splitmix(1), splitmix(1));
            prop_assert_eq!(a.decide(&r.view(), &mut ra), b.decide(&r.view(), &mut rb));
            if !user.trim().is_empty() && !user.contains([';', '"', ',', '\\']) {
                prop_assert_eq!(track_for_user(&a, user.trim()), track_for_user(&b, user.trim()));
            }
        }
    }


    #[test]
    fn the_loader_never_panics_on_any_text(src in "[ -~\n]{0,200}") {
        let _ = load(&src);
    }

    #[test]
    fn routing_never_panics_on_any_request(
        host in "[ -~]{0,30}",
        path in "/[ -~]{0,30}",
        query in proptest::option::of("[ -~]{0,30}"),
        cookie in "[ -~]{0,60}",
    ) {
        let t = table(
            "  - { host: \"*.example.com\", path_prefix: /api, rules: [ { match: { cookie: { name: a, regex: \"b.*\" } }, to: canary }, { match: { query: { name: q, prefix: x } }, to: canary } ], split: { stable: 9000, canary: 1000 }, sticky: { cookie: c } }\n  - { split: { stable: 10000 }, mirror: { to: shadow, percent: 50 } }\n",
        );
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&cookie) {
            headers.insert(http::header::COOKIE, v);
        }
        let view = crate::RequestView {
            method: &http::Method::GET,
            host: &host,
            path: &path,
            query: query.as_deref(),
            headers: &headers,
        };
        let mut random = splitmix(7);
        let _ = t.decide(&view, &mut random);
    }
}

proptest! {
    // Each case routes 200,000 requests; a few seeds are enough.
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn keyless_requests_at_one_percent_land_within_a_fifth_of_a_point(seed in any::<u64>()) {
        // With a sticky cookie a keyless request draws the bucket its cookie will keep; without
        // one, every request draws afresh. Each seed tries both.
        let tables = [
            ("sticky", canary_table(100)),
            ("no sticky", table("  - { split: { stable: 9900, canary: 100 } }\n")),
        ];
        for (kind, t) in tables {
            let mut random = splitmix(seed);
            let r = req("GET h/", &[]);
            let canary = (0..100_000)
                .filter(|_| {
                    let d = t.decide(&r.view(), &mut random).unwrap();
                    t.track(d.track).name() == "canary"
                })
                .count();
            let share = canary as f64 / 100_000.0 * 100.0;
            prop_assert!((share - 1.0).abs() <= 0.2, "canary share {share}% ({kind})");
        }
    }
}
