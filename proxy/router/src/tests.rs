#![allow(clippy::unwrap_used)]

mod props;

use http::{HeaderMap, HeaderValue, Method};

use crate::{Bucketing, Cause, Table, bucket_of, cookie, load, query_param};

const TRACKS: &str = r#"
tracks:
  stable: { backends: ["127.0.0.1:9001"] }
  canary: { backends: ["127.0.0.1:9002"] }
  shadow: { backends: ["127.0.0.1:9003"] }
"#;

pub(crate) fn table(routes: &str) -> Table {
    let src = format!("{TRACKS}routes:\n{routes}");
    match load(&src) {
        Ok(t) => t,
        Err(diags) => panic!(
            "{}",
            diags
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// A request as `METHOD host/path?query` with `name: value` headers.
pub(crate) struct Req {
    method: Method,
    host: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
}

pub(crate) fn req(line: &str, headers: &[(&str, &str)]) -> Req {
    let (method, rest) = line.split_once(' ').unwrap();
    let (host, target) = rest.split_at(rest.find('/').unwrap());
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    Req {
        method: method.parse().unwrap(),
        host: host.to_string(),
        path,
        query,
        headers: map,
    }
}

impl Req {
    pub(crate) fn view(&self) -> crate::RequestView<'_> {
        crate::RequestView {
            method: &self.method,
            host: &self.host,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
        }
    }
}

/// The track name a request goes to, with no randomness available.
/// Every diagnostic for `src`, one a line.
fn diagnostics(src: &str) -> String {
    let diags = load(src).unwrap_err();
    let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

fn track_of(t: &Table, r: &Req) -> String {
    let d = t
        .decide(&r.view(), &mut || panic!("needed randomness"))
        .unwrap();
    t.track(d.track).name().to_string()
}

#[test]
fn the_most_specific_host_then_the_most_specific_path_wins() {
    let t = table(
        r#"
  - { name: any-root, host: "*", path_prefix: /, split: { stable: 10000 } }
  - { name: any-api, host: "*", path_prefix: /api, split: { stable: 10000 } }
  - { name: any-api-exact, host: "*", path: /api, split: { stable: 10000 } }
  - { name: sub-root, host: "*.example.com", split: { stable: 10000 } }
  - { name: deep-sub, host: "*.eu.example.com", path_prefix: /, split: { stable: 10000 } }
  - { name: exact-img, host: shop.example.com, path_prefix: /img/, split: { stable: 10000 } }
  - { name: exact-first, host: shop.example.com, path_prefix: /x, split: { stable: 10000 } }
  - { name: exact-second, host: shop.example.com, path_prefix: /x/, split: { stable: 10000 } }
"#,
    );
    let cases = [
        ("other.org", "/", Some("any-root")),
        ("other.org", "/api", Some("any-api-exact")),
        ("other.org", "/api/v1", Some("any-api")),
        ("other.org", "/apix", Some("any-root")),
        ("example.com", "/", Some("any-root")),
        ("a.example.com", "/api", Some("sub-root")),
        ("a.eu.example.com", "/", Some("deep-sub")),
        ("SHOP.Example.COM", "/img/a.png", Some("exact-img")),
        ("shop.example.com:8443", "/img/a.png", Some("exact-img")),
        ("shop.example.com", "/img", Some("sub-root")),
        ("shop.example.com", "/x/y", Some("exact-second")),
        ("shop.example.com", "/x", Some("exact-first")),
        ("shop.example.com.", "/img/a.png", Some("exact-img")),
        ("shop.example.com.:8443", "/img/a.png", Some("exact-img")),
        ("a.eu.example.com.", "/", Some("deep-sub")),
    ];
    for (host, path, want) in cases {
        let r = req(&format!("GET {host}{path}"), &[]);
        let mut view = r.view();
        // As `RequestView::of` has it from a `Host` header.
        view.host = crate::table::strip_port(host);
        let got = t.select(&view).map(|id| t.route(id).name().to_string());
        assert_eq!(got.as_deref(), want, "{host}{path}");
    }
}

#[test]
fn a_path_is_matched_as_a_backend_resolves_it() {
    let t = table(
        r#"
  - { name: root, path_prefix: /, split: { stable: 10000 } }
  - { name: admin, path_prefix: /admin, split: { stable: 10000 } }
"#,
    );
    for path in [
        "/admin",
        "/public/../admin",
        "/public/%2e%2e/admin/x",
        "/%61dmin",
        "//admin",
        "/./admin",
    ] {
        let r = req(&format!("GET h{path}"), &[]);
        let got = t.select(&r.view()).map(|id| t.route(id).name().to_string());
        assert_eq!(got.as_deref(), Some("admin"), "{path}");
    }
    let r = req("GET h/admin%2Fx", &[]);
    let got = t.select(&r.view()).map(|id| t.route(id).name().to_string());
    assert_eq!(
        got.as_deref(),
        Some("root"),
        "an escaped slash ends no segment"
    );
    // A route's own path must be in that form, or no request would ever match it.
    let diags = load("tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - { path_prefix: /a/../b, split: { stable: 10000 } }\n").unwrap_err();
    assert_eq!(
        diags[0].to_string(),
        r#"3:20: error: routes[0].path_prefix: path "/a/../b" is matched as "/b"; write "/b""#
    );
}

#[test]
fn no_route_for_the_host_or_path_means_no_decision() {
    let t = table("  - { host: example.com, path_prefix: /api, split: { stable: 10000 } }\n");
    assert!(
        t.decide(&req("GET other.com/api", &[]).view(), &mut || 0)
            .is_none()
    );
    assert!(
        t.decide(&req("GET example.com/", &[]).view(), &mut || 0)
            .is_none()
    );
}

#[test]
fn header_values_in_utf8_beyond_ascii_are_matched() {
    let t = table(
        r#"
  - path_prefix: /
    rules:
      - { match: { header: { name: x-user, exact: "Zoë" } }, to: canary }
      - { match: { header: { name: x-team, regex: "^équipe-[0-9]+$" } }, to: shadow }
    split: { stable: 10000 }
"#,
    );
    let with = |name: &str, value: &[u8]| {
        let mut r = req("GET h/", &[]);
        r.headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
        track_of(&t, &r)
    };
    assert_eq!(with("x-user", "Zoë".as_bytes()), "canary");
    assert_eq!(with("x-team", "équipe-7".as_bytes()), "shadow");
    // Not UTF-8: never equal to a value, but no failure either.
    assert_eq!(with("x-user", b"Zo\xeb"), "stable");
}

/// Request line, headers, and the track it must go to.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn rules_are_tested_in_order_and_the_first_match_wins() {
    let t = table(
        r#"
  - path_prefix: /
    rules:
      - { match: { header: { name: x-canary, exact: "true" } }, to: canary }
      - { match: { header: { name: x-shadow, present: true } }, to: shadow }
      - { match: { header: { name: x-build, prefix: "rc-" } }, to: canary }
      - { match: { header: { name: x-tenant, regex: "t[0-9]+" } }, to: canary }
      - { match: { cookie: { name: ab-test-group, exact: version-b } }, to: canary }
      - { match: { cookie: { name: user, regex: "beta-.*" } }, to: shadow }
      - { match: { query: { name: track, exact: canary } }, to: canary }
      - { match: { method: [DELETE, PATCH] }, to: shadow }
      - { match: { method: [PUT], header: { name: x-safe, absent: true } }, to: shadow }
    split: { stable: 10000 }
"#,
    );
    let cases: &[Case] = &[
        ("GET h/", &[], "stable"),
        ("GET h/", &[("x-canary", "true")], "canary"),
        ("GET h/", &[("x-canary", "TRUE")], "stable"),
        (
            "GET h/",
            &[("x-canary", "true"), ("x-shadow", "")],
            "canary",
        ),
        ("GET h/", &[("x-shadow", "")], "shadow"),
        (
            "GET h/",
            &[("x-canary", "no"), ("x-canary", "true")],
            "canary",
        ),
        ("GET h/", &[("x-build", "rc-12")], "canary"),
        ("GET h/", &[("x-build", "v1-rc-12")], "stable"),
        ("GET h/", &[("x-tenant", "t42")], "canary"),
        ("GET h/", &[("x-tenant", "t42x")], "stable"),
        (
            "GET h/",
            &[("cookie", "a=1; ab-test-group=version-b")],
            "canary",
        ),
        (
            "GET h/",
            &[("cookie", "a=1"), ("cookie", "ab-test-group=version-b")],
            "canary",
        ),
        (
            "GET h/",
            &[("cookie", "ab-test-group=version-a; ab-test-group=version-b")],
            "stable",
        ),
        ("GET h/", &[("cookie", "user=beta-7")], "shadow"),
        ("GET h/", &[("cookie", "xuser=beta-7")], "stable"),
        ("GET h/?a=1&track=canary", &[], "canary"),
        ("GET h/?track=can%61ry", &[], "canary"),
        ("GET h/?track=canary2", &[], "stable"),
        ("DELETE h/", &[], "shadow"),
        ("PUT h/", &[], "shadow"),
        ("PUT h/", &[("x-safe", "1")], "stable"),
    ];
    for (line, headers, want) in cases {
        assert_eq!(
            track_of(&t, &req(line, headers)),
            *want,
            "{line} {headers:?}"
        );
    }
}

#[test]
fn cookies_are_found_across_headers_and_the_first_duplicate_wins() {
    let mut h = HeaderMap::new();
    h.append("cookie", HeaderValue::from_static("a=1;b=\"quoted\""));
    h.append("cookie", HeaderValue::from_static(" c = 3 ; a=2"));
    assert_eq!(cookie(&h, "a"), Some(&b"1"[..]));
    assert_eq!(cookie(&h, "b"), Some(&b"quoted"[..]));
    assert_eq!(cookie(&h, "c"), Some(&b"3"[..]));
    assert_eq!(cookie(&h, "d"), None);
    // A name that only begins with the one asked for, or a pair without `=`, is not it.
    h.append(
        "cookie",
        HeaderValue::from_static("ab-x=9; ab; abc =8;ab=7"),
    );
    assert_eq!(cookie(&h, "ab"), Some(&b"7"[..]));
}

#[test]
fn query_parameters_are_percent_decoded_and_the_first_wins() {
    let cases = [
        (Some("a=1&a=2"), "a", Some("1")),
        (Some("x=%2Fy+z"), "x", Some("/y z")),
        (Some("flag&b=2"), "flag", Some("")),
        (Some("b%5B%5D=1"), "b[]", Some("1")),
        (Some("bad=%zz%4"), "bad", Some("%zz%4")),
        (None, "a", None),
    ];
    for (query, name, want) in cases {
        assert_eq!(
            query_param(query, name).as_deref(),
            want,
            "{query:?} {name}"
        );
    }
}

#[test]
fn a_sticky_key_below_the_canary_share_goes_to_canary() {
    let t = table("  - { split: { stable: 9500, canary: 500 }, sticky: { header: x-user-id } }\n");
    for user in 0..2000 {
        let key = format!("user-{user}");
        let want = if bucket_of(key.as_bytes()) < 500 {
            "canary"
        } else {
            "stable"
        };
        assert_eq!(track_of(&t, &req("GET h/", &[("x-user-id", &key)])), want);
    }
}

#[test]
fn the_bucket_hash_is_fixed_so_every_proxy_agrees() {
    // XXH64, seed 0, modulo 10000: these values are part of the contract between proxies;
    // if this test fails, users would move between tracks on upgrade.
    let buckets: Vec<String> = ["", "alice", "bob", "user-1"]
        .iter()
        .map(|k| format!("{k:?}={}", bucket_of(k.as_bytes())))
        .collect();
    expect_test::expect![[r#"""=6921 "alice"=9289 "bob"=27 "user-1"=6856"#]]
        .assert_eq(&buckets.join(" "));
}

#[test]
fn a_sticky_cookie_without_max_age_keeps_a_user_for_30_days() {
    let t = table("  - { split: { stable: 5000, canary: 5000 }, sticky: { cookie: b } }\n");
    let d = t.decide(&req("GET h/", &[]).view(), &mut || 1).unwrap();
    assert_eq!(
        d.set_cookie().unwrap().to_string(),
        "b=0000000000000001; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
    );
}

#[test]
fn a_request_without_a_cookie_gets_a_random_bucket_and_a_cookie_to_keep_it() {
    let t = table(
        "  - { split: { stable: 5000, canary: 5000 }, sticky: { cookie: fleet-bucket, max_age: 60 } }\n",
    );
    let d = t
        .decide(&req("GET h/", &[]).view(), &mut || 0xabcd)
        .unwrap();
    let set_cookie = d.set_cookie().unwrap().to_string();
    assert_eq!(
        set_cookie,
        "fleet-bucket=000000000000abcd; Path=/; Max-Age=60; HttpOnly; SameSite=Lax"
    );
    // Coming back with the cookie lands on the same track, with no randomness used.
    let back = req("GET h/", &[("cookie", "fleet-bucket=000000000000abcd")]);
    let again = t
        .decide(&back.view(), &mut || panic!("no randomness with a key"))
        .unwrap();
    assert_eq!(again.track, d.track);
    assert!(matches!(
        again.cause,
        Cause::Split {
            bucketing: Bucketing::Sticky,
            ..
        }
    ));
    assert_eq!(again.set_cookie(), None);
}

#[test]
fn a_rule_match_sets_no_cookie() {
    let t = table(
        "  - { rules: [ { match: { header: { name: x-canary, present: true } }, to: canary } ], split: { stable: 10000 }, sticky: { cookie: b } }\n",
    );
    let d = t
        .decide(&req("GET h/", &[("x-canary", "1")]).view(), &mut || 1)
        .unwrap();
    assert_eq!(d.cause, Cause::Rule(0));
    assert_eq!(d.set_cookie(), None);
}

#[test]
fn mirroring_samples_the_configured_share() {
    let t = table("  - { split: { stable: 10000 }, mirror: { to: shadow, percent: 10 } }\n");
    let mut n = 0u64;
    let mut mirrored = 0;
    for _ in 0..10_000 {
        // Every call yields the next integer: split buckets and samples sweep 0..10000.
        let d = t
            .decide(&req("GET h/", &[]).view(), &mut || {
                n += 1;
                n
            })
            .unwrap();
        mirrored += usize::from(d.mirror.is_some());
    }
    assert_eq!(mirrored, 1000);
}

#[test]
fn a_mirror_compares_answers_only_as_asked() {
    let mirror = |extra: &str| {
        let t = table(&format!(
            "  - {{ split: {{ stable: 10000 }}, mirror: {{ to: shadow, percent: 10{extra} }} }}\n"
        ));
        t.route(crate::RouteId(0)).mirror_compare()
    };
    assert_eq!(mirror(""), None);
    assert_eq!(mirror(", compare: status"), Some(crate::Compare::Status));
    assert_eq!(mirror(", compare: body"), Some(crate::Compare::Body));
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - { split: { stable: 10000 }, mirror: { to: stable, percent: 1, compare: headers } }\n";
    expect_test::expect![[
        r#"3:76: error: routes[0].mirror.compare: unknown value "headers"; expected one of: status, body"#
    ]]
    .assert_eq(&diagnostics(src));
}

#[test]
fn more_than_two_tracks_are_laid_out_by_name_with_stable_on_top() {
    let t = table("  - { split: { stable: 5000, canary: 3000, shadow: 2000 } }\n");
    let split = t.route(crate::RouteId(0)).split();
    let layout: Vec<(&str, u32)> = split
        .shares()
        .map(|(id, s)| (t.track(id).name(), s))
        .collect();
    assert_eq!(
        layout,
        [("canary", 3000), ("shadow", 2000), ("stable", 5000)]
    );
    assert_eq!(t.track(split.track_for(2999)).name(), "canary");
    assert_eq!(t.track(split.track_for(3000)).name(), "shadow");
    assert_eq!(t.track(split.track_for(9999)).name(), "stable");
}

#[test]
fn every_problem_is_reported_at_once_with_its_place_and_fix() {
    let src = r#"tracks:
  stable: { backends: ["127.0.0.1:9001"] }
  canary: { backends: ["nope"] }
routes:
  - host: "*"
    path_prefix: /
    rules:
      - match: { header: { name: x-canary, exact: "true", prefix: t } }
        to: canery
      - match: { cookie: { name: g, regex: "([a-z]" } }
        to: canary
      - match: {}
        to: canary
    split: { stable: 9000, canary: 500 }
    sticky: { cookie: fleet-bucket, header: x-user-id }
    mirror: { to: shadow, percent: 150 }
  - host: "*"
    split: { stable: 10000 }
  - host: "bad host"
    path: nope
    split: { stable: 10000 }
"#;
    let diags = load(src).unwrap_err();
    let text: Vec<String> = diags
        .iter()
        .map(|d| d.in_file("proxy.yaml").to_string())
        .collect();
    expect_test::expect![[r#"
        proxy.yaml:3:24: error: tracks.canary.backends[0]: "nope" is not a `host:port` address; write it as `10.0.0.1:8080` or `svc.local:80`
        proxy.yaml:8:26: error: routes[0].rules[0].match.header: more than one test; keep one of: exact, prefix, regex, present, absent; use several rules to combine
        proxy.yaml:9:13: error: routes[0].rules[0].to: unknown track "canery"; did you mean "canary"?
        proxy.yaml:10:44: error: routes[0].rules[1].match.cookie.regex: bad regex "([a-z]": unclosed group; check its brackets, parentheses and escapes; the syntax is at https://docs.rs/regex
        proxy.yaml:12:16: error: routes[0].rules[2].match: no condition; add one of: header, cookie, query, method
        proxy.yaml:14:12: error: routes[0].split: shares sum to 9500, not 10000; shares are basis points: 10000 is 100%, 500 is 5%
        proxy.yaml:15:13: error: routes[0].sticky: needs exactly one of `cookie` or `header`; write `sticky: { cookie: fleet-bucket }` or `sticky: { header: x-user-id }`
        proxy.yaml:16:19: error: routes[0].mirror.to: unknown track "shadow"; expected one of: canary, stable
        proxy.yaml:16:36: error: routes[0].mirror.percent: 150 is not a percentage; use a number from 0 to 100
        proxy.yaml:17:5: error: routes[1]: same host and path as routes[0], so it can never be chosen; merge the two routes or change host or path
        proxy.yaml:19:11: error: routes[2].host: bad host "bad host"; write `example.com`, `*.example.com` or `*` (no port)
        proxy.yaml:20:11: error: routes[2].path: bad path "nope"; start with `/`, without query or fragment"#]]
    .assert_eq(&text.join("\n"));
}

#[test]
fn a_bad_header_name_and_its_bad_regex_are_both_told_and_a_regex_too_large_says_so() {
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - split: { stable: 10000 }\n    rules:\n      - { match: { header: { name: \"X A\", regex: \"(\" } }, to: stable }\n      - { match: { query: { name: q, regex: \"a{1000}{1000}\" } }, to: stable }\n";
    let text = diagnostics(src);
    expect_test::expect![[r#"
        5:36: error: routes[0].rules[0].match.header.name: bad header name "X A"; use letters, digits and `-`
        5:50: error: routes[0].rules[0].match.header.regex: bad regex "(": unclosed group; check its brackets, parentheses and escapes; the syntax is at https://docs.rs/regex
        6:45: error: routes[0].rules[1].match.query.regex: bad regex "a{1000}{1000}": Compiled regex exceeds size limit of 1048576 bytes; write a smaller pattern: fewer or smaller repetitions (`{1000}`), or classes such as \w in place of Unicode ones"#]]
    .assert_eq(&text);
}

#[test]
fn a_mirror_share_too_small_to_mirror_anything_or_past_100_is_refused() {
    let route = |percent: &str| {
        format!(
            "tracks: {{ stable: {{ backends: [\"127.0.0.1:1\"] }}, shadow: {{ backends: [\"127.0.0.1:2\"] }} }}\nroutes:\n  - {{ split: {{ stable: 10000 }}, mirror: {{ to: shadow, percent: {percent} }} }}\n"
        )
    };
    expect_test::expect!["3:64: error: routes[0].mirror.percent: 0.004 is below the smallest share mirrored, 0.01 (one request in 10000); use 0.01 or more, or 0 to mirror nothing"].assert_eq(&diagnostics(&route("0.004")));
    expect_test::expect!["3:64: error: routes[0].mirror.percent: 100.004 is not a percentage; use a number from 0 to 100"].assert_eq(&diagnostics(&route("100.004")));
    for fine in ["0", "0.01", "0.006", "100"] {
        assert!(load(&route(fine)).is_ok(), "{fine}");
    }
}

#[test]
fn a_bad_host_is_quoted_as_written() {
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - { host: \"EXAMPLE.com:80\", split: { stable: 10000 } }\n";
    expect_test::expect![[r#"3:13: error: routes[0].host: bad host "EXAMPLE.com:80"; write `example.com`, `*.example.com` or `*` (no port)"#]].assert_eq(&diagnostics(src));
}

#[test]
fn a_sticky_cookie_that_expires_at_once_is_refused() {
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - { split: { stable: 10000 }, sticky: { cookie: b, max_age: 0 } }\n";
    let text = diagnostics(src);
    expect_test::expect![[
        r#"3:63: error: routes[0].sticky.max_age: max_age 0 makes the cookie expire at once, so no user would stay put; give the seconds a user keeps their bucket (default 2592000, 30 days)"#
    ]]
    .assert_eq(&text);
}

#[test]
fn a_prefixed_sticky_cookie_that_browsers_would_drop_is_refused() {
    let route = |sticky: &str| {
        format!(
            "tracks: {{ stable: {{ backends: [\"127.0.0.1:1\"] }} }}\nroutes:\n  - {{ split: {{ stable: 10000 }}, sticky: {sticky} }}\n"
        )
    };
    let text = diagnostics(&route("{ cookie: __Host-bucket }"));
    expect_test::expect!["3:51: error: routes[0].sticky.cookie: browsers keep a `__Host-` cookie only if it is `Secure`, so every request would get a new bucket; add `secure: true` (the site must be served over HTTPS), or drop the prefix"]
    .assert_eq(&text);
    assert!(diagnostics(&route("{ cookie: __secure-b, secure: false }")).contains("`__secure-`"));
    for fine in [
        "{ cookie: __Host-bucket, secure: true }",
        "{ cookie: __Secure-b, secure: true }",
        "{ cookie: host-bucket }",
    ] {
        assert!(load(&route(fine)).is_ok(), "{fine}");
    }
}

#[test]
fn a_regex_that_would_break_out_of_its_anchors_is_refused() {
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - rules:\n      - { match: { header: { name: x, regex: \"x)|(.*\" } }, to: stable }\n    split: { stable: 10000 }\n";
    let diags = load(src).unwrap_err();
    assert!(
        diags[0]
            .to_string()
            .contains(r#"bad regex "x)|(.*": unopened group"#),
        "{}",
        diags[0]
    );
}

#[test]
fn structural_errors_name_the_field_and_suggest_a_fix() {
    let src = "tracks: { stable: { backends: [\"127.0.0.1:1\"] } }\nroutes:\n  - { split: { stable: 10000 }, stiky: { cookie: b } }\n";
    let text = diagnostics(src);
    expect_test::expect![[
        r#"3:33: error: routes[0].stiky: unknown field "stiky"; did you mean "sticky"?"#
    ]]
    .assert_eq(&text);
}

#[test]
fn a_wrong_type_or_value_inside_a_track_or_a_split_is_named_with_its_place() {
    let src = "tracks:\n  stable: { backends: 127.0.0.1:1, protocol: h3 }\n  canary: { backends: [\"127.0.0.1:2\"] }\nroutes:\n  - { split: { stable: \"9500\", canary: -100 } }\n  - { host: a, split: { canary: 100 } }\n";
    let text = diagnostics(src);
    expect_test::expect![[r#"
        2:23: error: tracks.stable.backends: expected a list, found the string "127.0.0.1:1"; write a list, even of one item: [127.0.0.1:1]
        2:46: error: tracks.stable.protocol: unknown value "h3"; expected one of: auto, http1, h2c
        5:24: error: routes[0].split.stable: expected a whole number, found the string "9500"; write 9500 without quotes
        5:40: error: routes[0].split.canary: -100 is below the minimum of 0; use 0 or more"#]]
    .assert_eq(&text);
}

#[test]
fn json_is_read_like_yaml() {
    let src = r#"{"tracks": {"stable": {"backends": ["127.0.0.1:1"]}}, "routes": [{"split": {"stable": 10000}}]}"#;
    let t = load(src).unwrap();
    assert_eq!(track_of(&t, &req("GET h/", &[])), "stable");
    // And the spec it keeps serializes back to an equal spec.
    let again = serde_json::to_string(t.spec()).unwrap();
    assert_eq!(load(&again).unwrap().spec(), t.spec());
}

#[test]
fn json_with_a_repeated_key_is_refused_like_yaml_with_one() {
    let src = r#"{"tracks": {"stable": {"backends": ["127.0.0.1:1"]}},
 "routes": [{"split": {"stable": 10000, "stable": 10000}}]}"#;
    let text = diagnostics(src);
    expect_test::expect![[
        r#"2:41: error: routes[0].split.stable: duplicate key "stable"; keep one of them"#
    ]]
    .assert_eq(&text);
}

#[test]
fn cookie_values_that_are_not_utf8_are_present_and_compared_as_bytes_but_match_no_regex() {
    let t = table(
        r#"
  - path_prefix: /
    rules:
      - { match: { cookie: { name: r, regex: ".*" } }, to: shadow }
      - { match: { cookie: { name: p, present: true } }, to: canary }
    split: { stable: 10000 }
"#,
    );
    let with_cookie = |value: &[u8]| {
        let mut r = req("GET h/", &[]);
        r.headers
            .append("cookie", HeaderValue::from_bytes(value).unwrap());
        track_of(&t, &r)
    };
    assert_eq!(
        with_cookie(b"r=\xff\xfe"),
        "stable",
        "no regex matches non-UTF-8"
    );
    assert_eq!(with_cookie(b"r=ok"), "shadow");
    assert_eq!(
        with_cookie(b"p=\xff"),
        "canary",
        "present, whatever its bytes"
    );
    let mut h = HeaderMap::new();
    h.append("cookie", HeaderValue::from_bytes(b"k=\xffab").unwrap());
    assert_eq!(cookie(&h, "k"), Some(&b"\xffab"[..]));
}

/// A table keeps its spec (for `GET /routes`) as long as it is in force, and every rule of a
/// 10,000-route table is one of these; memory a process has not used before is what made its
/// first large tables slow to build. Boxing the three value tests keeps a rule at a fifth of
/// its unboxed size.
#[test]
fn a_rule_as_written_stays_small() {
    let size = std::mem::size_of::<crate::spec::RuleSpec>();
    assert!(size <= 80, "RuleSpec is {size} bytes");
}

#[test]
fn a_sticky_cookie_name_must_be_an_http_token() {
    let with_cookie = |name: &str| {
        let src = format!(
            "{TRACKS}routes:\n  - {{ split: {{ stable: 10000 }}, sticky: {{ cookie: '{name}' }} }}\n"
        );
        load(&src).map(|_| ()).map_err(|d| d[0].to_string())
    };
    for good in ["fleet-bucket", "A_b.9", "!#$%&*+-.^_`|~"] {
        assert_eq!(with_cookie(good), Ok(()), "{good}");
    }
    for bad in [
        "", "a b", "a;b", "a=b", "(x)", "é", "a@b", "a/b", "a[b", "a\"b", "a\tb",
    ] {
        let error = with_cookie(bad).unwrap_err();
        assert!(
            error.contains("routes[0].sticky.cookie: bad cookie name")
                && error.contains("use letters, digits"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn routes_that_could_never_be_chosen_and_repeated_names_are_refused() {
    let errors = |routes: &str| -> Vec<String> {
        match load(&format!("{TRACKS}routes:\n{routes}")) {
            Ok(_) => Vec::new(),
            Err(diags) => diags.iter().map(|d| d.message.clone()).collect(),
        }
    };
    let route = |host: &str, path: &str| {
        format!("  - {{ host: {host}, {path}, split: {{ stable: 10000 }} }}\n")
    };
    let dup = "same host and path as routes[0], so it can never be chosen";
    // Hosts compare without case.
    let twice = route("Shop.Example.com", "path_prefix: /a")
        + &route("shop.example.com", "path_prefix: /a");
    assert_eq!(errors(&twice), [dup]);
    // An exact path and a prefix of the same text are different routes, but their default
    // names (host and path) are one: metrics would merge them. Named apart, they are fine.
    let both = route("a.com", "path: /a") + &route("a.com", "path_prefix: /a");
    assert_eq!(
        errors(&both),
        ["its name in metrics, \"a.com/a\" (host and path), is routes[0]'s too"]
    );
    let named_apart = route("a.com", "path: /a") + &route("a.com", "path_prefix: /a, name: a-tree");
    assert!(
        errors(&named_apart).is_empty(),
        "{:?}",
        errors(&named_apart)
    );
    assert_eq!(
        errors(&(route("a.com", "path: /a") + &route("a.com", "path: /a"))),
        [dup]
    );
    // A missing host is `*` and a missing path `/`.
    let defaults =
        "  - { split: { stable: 10000 } }\n".to_string() + &route("'*'", "path_prefix: /");
    assert_eq!(errors(&defaults), [dup]);
    let named = "  - { name: a, host: a.com, split: { stable: 10000 } }\n  - { name: a, host: b.com, split: { stable: 10000 } }\n";
    assert_eq!(errors(named), ["name \"a\" already used by routes[0]"]);
    // A name given that another route has by default.
    let taken = route("a.com", "path: /a") + &route("b.com", "path: /b, name: a.com/a");
    assert_eq!(
        errors(&taken),
        ["name \"a.com/a\" already used by routes[0]"]
    );
}

#[test]
fn a_large_table_is_read_built_and_freed_with_stops_along_the_way() {
    use crate::pace::tests::{calls, counting};
    const ROUTES: u64 = 2_000;
    let routes: Vec<String> = (0..ROUTES)
        .map(|i| {
            format!(
                r#"{{"host": "svc{i}.test", "rules": [{{"match": {{"cookie": {{"name": "ab", "regex": "b|c"}}}}, "to": "canary"}}], "split": {{"stable": 10000}}}}"#
            )
        })
        .collect();
    let json = format!(
        r#"{{"tracks": {{"stable": {{"backends": ["127.0.0.1:9001"]}}, "canary": {{"backends": ["127.0.0.1:9002"]}}}}, "routes": [{}]}}"#,
        routes.join(",")
    );
    let before = counting();
    let table = load(&json).expect("a valid table");
    // A point per route read, checked, checked for a duplicate and indexed, and more.
    let loading = calls() - before;
    assert!(
        loading >= 4 * ROUTES / u64::from(crate::pace::EVERY),
        "{loading} stops"
    );
    let before = counting();
    drop(table);
    // A point per route as written, per route as built and per host in the index.
    let freeing = calls() - before;
    assert_eq!(freeing, 3 * ROUTES / u64::from(crate::pace::EVERY));
}
