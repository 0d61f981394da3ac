//! The checks on everything in the config file but the table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_yaml::{Diagnostics, Positions};

use super::{
    CertSpec, FileConfig, Limits, Listen, ListenEntry, Listener, MirrorLimits, Settings, TlsSpec,
    Upstream,
};

pub(super) struct Checker<'a> {
    pub(super) at: &'a Positions,
    pub(super) diags: &'a mut Diagnostics,
    /// The `(cert, key)` files that could not be loaded.
    pub(super) refused_certs: Vec<(PathBuf, PathBuf)>,
}

/// Whether two listeners could not both be bound: the same port (port 0 asks the kernel for
/// one, so two of those never clash) on the same address, or on a wildcard address that
/// covers the other (`0.0.0.0` every IPv4 address; `[::]`, dual-stack as Linux binds it by
/// default, every address).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

impl Checker<'_> {
    /// The settings of file `f`, whose text has digest `source`.
    pub(super) fn settings(&mut self, f: &FileConfig, dir: &Path, source: u64) -> Option<Settings> {
        let entries: Vec<(String, Option<&TlsSpec>)> = match &f.listen {
            Listen::One(a) => vec![(a.clone(), None)],
            Listen::Many(list) => list
                .iter()
                .map(|e| match e {
                    ListenEntry::Addr(a) => (a.clone(), None),
                    ListenEntry::Full(l) => (l.addr.clone(), l.tls.as_ref()),
                })
                .collect(),
        };
        if entries.is_empty() {
            self.error(
                "listen",
                "no listener",
                "add an address such as `127.0.0.1:8080`",
            );
        }
        let mut listeners = Vec::new();
        let mut placed: Vec<(SocketAddr, String)> = Vec::new();
        for (i, (addr, tls)) in entries.iter().enumerate() {
            let path = match &f.listen {
                Listen::One(_) => "listen".to_string(),
                Listen::Many(_) => format!("listen[{i}]"),
            };
            let addr = self.addr(&path, addr);
            if let Some(addr) = addr {
                if let Some((other, at)) = placed.iter().find(|(p, _)| clash(*p, addr)) {
                    let message = match *other == addr {
                        true => format!("{addr} is also {at}"),
                        false => format!("{addr} takes the port of {at} ({other}) too"),
                    };
                    self.error(&path, message, "give each listener a port of its own");
                }
                placed.push((addr, path.clone()));
            }
            let certs: Vec<&CertSpec> = match tls {
                None => vec![],
                Some(TlsSpec::One(c)) => vec![c],
                Some(TlsSpec::Many(cs)) => cs.iter().collect(),
            };
            // `tls: []`, or `tls:` with nothing after it (a template that rendered no
            // certificate): meant for TLS, and plain HTTP would be served on it.
            if tls.is_some() && certs.is_empty() {
                self.error(
                    &format!("{path}.tls"),
                    "no certificate",
                    "give at least one `{ cert, key }`, or remove `tls` to serve plain HTTP",
                );
            }
            let mut tls = Vec::new();
            for (j, c) in certs.iter().enumerate() {
                let at = match tls_is_list(entries[i].1) {
                    true => format!("{path}.tls[{j}]"),
                    false => format!("{path}.tls"),
                };
                let (cert, key) = (dir.join(&c.cert), dir.join(&c.key));
                if let Err(e) = crate::tls::load_cert(&cert, &key) {
                    self.error(
                        &at,
                        format!("cannot use this certificate: {e:#}"),
                        "give PEM files for the chain and its private key",
                    );
                    self.refused_certs.push((cert.clone(), key.clone()));
                }
                tls.push((cert, key));
            }
            if let Some(addr) = addr {
                listeners.push(Listener { addr, tls });
            }
        }
        let admin = self.addr("admin", &f.admin);
        if let Some(admin) = admin
            && let Some((other, at)) = placed.iter().find(|(p, _)| clash(*p, admin))
        {
            let message = match *other == admin {
                true => format!("{admin} is also a traffic listener"),
                false => format!("{admin} takes the port of traffic listener {at} ({other}) too"),
            };
            self.error("admin", message, "give the admin API an address of its own");
        }
        let u = f.upstream.clone().unwrap_or_default();
        let l = f.limits.clone().unwrap_or_default();
        let m = f.mirror.clone().unwrap_or_default();
        // Each checked before any is used, so that every bad one is reported.
        let connect_timeout = self.timeout("upstream.connect_timeout", &u.connect_timeout, 1_000);
        let request_timeout = self.timeout("upstream.request_timeout", &u.request_timeout, 10_000);
        let per_try_timeout = self.timeout("upstream.per_try_timeout", &u.per_try_timeout, 2_000);
        let read_timeout = self.timeout("upstream.read_timeout", &u.read_timeout, 60_000);
        let eject_for = self.duration("upstream.eject_for", &u.eject_for, 10_000);
        let trial_every = self.duration("upstream.trial_every", &u.trial_every, 1_000);
        let header_read_timeout =
            self.timeout("limits.header_read_timeout", &l.header_read_timeout, 10_000);
        let idle_timeout = self.timeout("limits.idle_timeout", &l.idle_timeout, 60_000);
        let send_timeout = self.timeout("limits.send_timeout", &l.send_timeout, 60_000);
        let mirror_timeout = self.timeout("mirror.timeout", &m.timeout, 5_000);
        let batch_window = self.batch_window(&m.batch_window);
        let drain_timeout = self.duration("drain_timeout", &f.drain_timeout, 30_000);
        let watch_interval = self.timeout("watch_interval", &f.watch_interval, 1_000);
        let upstream = Upstream {
            connect_timeout: connect_timeout?,
            request_timeout: request_timeout?,
            per_try_timeout: per_try_timeout?,
            read_timeout: read_timeout?,
            retries: u.retries.unwrap_or(3),
            eject_after: u.eject_after.unwrap_or(5),
            eject_for: eject_for?,
            trial_every: trial_every?,
            max_idle_per_backend: u.max_idle_per_backend.unwrap_or(128) as usize,
            max_connections_per_backend: u
                .max_connections_per_backend
                .map_or(usize::MAX, |n| n as usize),
        };
        let limits = Limits {
            max_connections: l.max_connections.unwrap_or(10_000) as usize,
            max_requests: l.max_requests.unwrap_or(10_000) as usize,
            max_headers: l.max_headers.unwrap_or(100) as usize,
            max_header_bytes: l.max_header_bytes.unwrap_or(65_536) as usize,
            header_read_timeout: header_read_timeout?,
            idle_timeout: idle_timeout?,
            send_timeout: send_timeout?,
        };
        let mirror = MirrorLimits {
            queue: m.queue.unwrap_or(1024) as usize,
            concurrency: m.concurrency.unwrap_or(64) as usize,
            max_body_bytes: m.max_body_bytes.unwrap_or(1 << 20) as usize,
            timeout: mirror_timeout?,
            batch_window: batch_window?,
            pipeline: m.pipeline.unwrap_or(true),
        };
        Some(Settings {
            listeners,
            admin: admin?,
            upstream,
            limits,
            mirror,
            drain_timeout: drain_timeout?,
            watch_interval: watch_interval?,
            await_put: f.await_put.unwrap_or(false),
            source,
        })
    }

    fn error(&mut self, path: &str, message: impl Into<String>, help: impl Into<String>) {
        self.diags.error(self.at.of(path), path, message, help);
    }

    fn addr(&mut self, path: &str, addr: &str) -> Option<SocketAddr> {
        let parsed = addr.parse().ok();
        if parsed.is_none() {
            self.error(
                path,
                format!("\"{addr}\" is not an IP address and port"),
                "write it as `127.0.0.1:8080` or `[::]:8080`",
            );
        }
        parsed
    }

    /// A duration that must not be zero: a timeout nothing could meet, or an interval that
    /// would spin.
    fn timeout(&mut self, path: &str, text: &Option<String>, default_ms: u64) -> Option<Duration> {
        let d = self.duration(path, text, default_ms)?;
        self.refuse_unless(
            !d.is_zero(),
            path,
            text,
            "must be more than zero",
            "write a positive duration such as `500ms` or `2s`",
        )?;
        Some(d)
    }

    /// How long a mirrored copy may wait for others: zero (each at once) up to
    /// [`MAX_BATCH_WINDOW`].
    fn batch_window(&mut self, text: &Option<String>) -> Option<Duration> {
        let path = "mirror.batch_window";
        let d = self.duration(path, text, 2)?;
        self.refuse_unless(
            d <= MAX_BATCH_WINDOW,
            path,
            text,
            "would hold copies back too long",
            "write at most `1s`; a few milliseconds gather the copies of a busy proxy",
        )?;
        Some(d)
    }

    /// Reports the value written at `path` as `problem` unless `ok`.
    fn refuse_unless(
        &mut self,
        ok: bool,
        path: &str,
        text: &Option<String>,
        problem: &str,
        help: &str,
    ) -> Option<()> {
        if !ok {
            let text = text.as_deref().unwrap_or_default();
            self.error(path, format!("\"{text}\" {problem}"), help);
        }
        ok.then_some(())
    }

    fn duration(&mut self, path: &str, text: &Option<String>, default_ms: u64) -> Option<Duration> {
        // humantime takes months and years; `5M` is too easily meant as five minutes.
        if let Some((t, unit)) = text
            .as_deref()
            .and_then(|t| Some((t, fleet_yaml::vague_unit(t)?)))
        {
            self.error(
                path,
                format!("\"{t}\" is in {unit:?}, which is months or years"),
                "write minutes as `m` (`5m`) and longer times in `d` (`30d`)",
            );
            return None;
        }
        match text {
            None => Some(Duration::from_millis(default_ms)),
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) => {
                    // Longer ones would overflow the clock's arithmetic, and mean no limit.
                    self.refuse_unless(
                        d <= MAX_DURATION,
                        path,
                        text,
                        "is longer than a year",
                        "write at most `365d`",
                    )?;
                    Some(d)
                }
                Err(e) => {
                    self.error(
                        path,
                        format!("\"{t}\" is not a duration{}", why_not_a_duration(t, &e)),
                        "write it as `500ms`, `2s` or `1m`",
                    );
                    None
                }
            },
        }
    }
}

/// What is wrong with `text`, in words, where humantime's error says more than "not a
/// duration" (its positions, "expected number at 0", help nobody).
fn why_not_a_duration(text: &str, e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    match e {
        _ if text.trim_start().starts_with('-') => ": a duration is never negative".into(),
        E::UnknownUnit { unit, .. } if unit.is_empty() => ": a number needs its unit".into(),
        E::UnknownUnit { unit, .. } => format!(": unknown unit \"{unit}\""),
        E::NumberOverflow => ": too long".into(),
        E::Empty => ": it is empty".into(),
        _ => String::new(),
    }
}

/// The longest any duration may be.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// The longest a copy may be held back to go out with others.
const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);

fn tls_is_list(tls: Option<&TlsSpec>) -> bool {
    matches!(tls, Some(TlsSpec::Many(_)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn diagnostics(extra: &str) -> Vec<String> {
        let src = format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{extra}tracks:\n  stable: {{ backends: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
        );
        match crate::config::check(&src, Path::new(".")) {
            Ok(_) => vec![],
            Err(diags) => diags.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// docs/proxy.md shows every default in its reference config, from `upstream:` to the end
    /// of the block; a file that spells those lines out must mean what a file without them does.
    #[test]
    fn the_defaults_are_the_ones_docs_proxy_md_shows() {
        let docs = include_str!("../../../docs/proxy.md");
        let from = docs
            .find("\nupstream:")
            .expect("the reference config's upstream:")
            + 1;
        let shown = &docs[from..from + docs[from..].find("```").unwrap()];
        assert!(shown.contains("defaults shown"));
        // Every optional setting is among the lines shown, so none can be left out of them.
        let schema = fleet_yaml::schema_of::<crate::config::FileConfig>();
        let fields = |def: &str| {
            let props = &schema["$defs"][def]["properties"];
            props
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        let settings_fields = ["drain_timeout", "watch_interval", "await_put"].map(String::from);
        for field in ["UpstreamSpec", "LimitsSpec", "MirrorLimitsSpec"]
            .iter()
            .flat_map(|def| fields(def))
            .chain(settings_fields)
        {
            assert!(
                shown.contains(&format!(" {field}:")) || shown.contains(&format!("\n{field}:")),
                "docs/proxy.md does not show {field}"
            );
        }
        let settings = |head: &str| {
            let src = format!(
                "listen: 127.0.0.1:1000\nadmin: 127.0.0.1:0\n{head}tracks:\n  stable: {{ backends: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
            );
            crate::config::check(&src, Path::new(".")).unwrap().0
        };
        let (defaults, spelled) = (settings(""), settings(shown));
        assert_eq!(defaults.upstream, spelled.upstream);
        assert_eq!(defaults.limits, spelled.limits);
        assert_eq!(defaults.mirror, spelled.mirror);
        assert_eq!(
            (
                defaults.drain_timeout,
                defaults.watch_interval,
                defaults.await_put
            ),
            (
                spelled.drain_timeout,
                spelled.watch_interval,
                spelled.await_put
            )
        );
        // The issue's own numbers, which tools rely on.
        let u = &defaults.upstream;
        let s = std::time::Duration::from_secs;
        assert_eq!(
            (u.request_timeout, u.per_try_timeout, u.retries),
            (s(10), s(2), 3)
        );
        assert_eq!(defaults.mirror.max_body_bytes, 1 << 20);
        assert_eq!(defaults.drain_timeout, s(30));
    }

    #[test]
    fn the_settings_read_at_start_only_that_a_reload_changes_are_named() {
        let settings = |head: &str| {
            let src = format!(
                "{head}tracks:\n  stable: {{ backends: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
            );
            crate::config::check(&src, Path::new(".")).unwrap().0
        };
        let first = settings("listen: 127.0.0.1:1000\nadmin: 127.0.0.1:0\n");
        let same = settings("listen: 127.0.0.1:1000\nadmin: 127.0.0.1:0\n# a comment\n");
        assert!(first.fixed_at_start_changed(&same).is_empty());
        assert_ne!(first.source, same.source, "another text");
        let other = settings(
            "listen: 127.0.0.1:1001\nadmin: 127.0.0.1:0\nupstream: { retries: 1 }\ndrain_timeout: 5s\n",
        );
        assert_eq!(
            first.fixed_at_start_changed(&other),
            ["listen", "upstream", "drain_timeout"]
        );
    }

    #[test]
    fn a_zero_timeout_or_interval_is_refused_and_every_bad_duration_is_named() {
        let diags = diagnostics(
            "watch_interval: 0s\nlimits: { header_read_timeout: 0ms, send_timeout: 366d }\nupstream: { request_timeout: soon, connect_timeout: 5M }\n",
        );
        assert_eq!(diags.len(), 5, "{diags:#?}");
        for (field, value) in [
            ("watch_interval", "\"0s\" must be more than zero"),
            (
                "limits.send_timeout",
                "\"366d\" is longer than a year; write at most `365d`",
            ),
            (
                "limits.header_read_timeout",
                "\"0ms\" must be more than zero",
            ),
            ("upstream.request_timeout", "\"soon\" is not a duration"),
            (
                "upstream.connect_timeout",
                "\"5M\" is in \"M\", which is months or years; write minutes as `m`",
            ),
        ] {
            assert!(
                diags.iter().any(|d| d.contains(field) && d.contains(value)),
                "no diagnostic on {field}: {diags:#?}"
            );
        }
        assert!(
            diags
                .iter()
                .any(|d| d.contains("write a positive duration"))
        );
    }

    #[test]
    fn a_duration_that_is_not_one_says_why_in_words() {
        let said = |d: &str| {
            let diags = diagnostics(&format!("drain_timeout: \"{d}\"\n"));
            assert_eq!(diags.len(), 1, "{diags:#?}");
            let text = diags[0]
                .split_once("drain_timeout: ")
                .unwrap()
                .1
                .to_string();
            text.split_once("; write it as").unwrap().0.to_string()
        };
        assert_eq!(
            said("-1s"),
            "\"-1s\" is not a duration: a duration is never negative"
        );
        assert_eq!(
            said("10"),
            "\"10\" is not a duration: a number needs its unit"
        );
        assert_eq!(
            said("5 parsecs"),
            "\"5 parsecs\" is not a duration: unknown unit \"parsecs\""
        );
        assert_eq!(said(""), "\"\" is not a duration: it is empty");
        assert_eq!(said("soon"), "\"soon\" is not a duration");
    }

    #[test]
    fn limits_a_proxy_could_not_serve_with_are_refused_with_the_least_allowed() {
        let diags = diagnostics(
            "limits: { max_header_bytes: 4096, max_connections: 0, max_requests: 0, max_headers: 0 }\nupstream: { eject_after: 0 }\nmirror: { queue: 0, concurrency: 0 }\n",
        );
        assert_eq!(diags.len(), 7, "{diags:#?}");
        assert!(
            diags[0].contains(
                "limits.max_header_bytes: 4096 is below the minimum of 8192; use 8192 or more"
            ),
            "{diags:#?}"
        );
        for field in [
            "max_connections",
            "max_requests",
            "max_headers",
            "eject_after",
            "queue",
            "concurrency",
        ] {
            let named = diags.iter().any(|d| {
                d.contains(&format!(
                    "{field}: 0 is below the minimum of 1; use 1 or more"
                ))
            });
            assert!(named, "{field}: {diags:#?}");
        }
    }

    #[test]
    fn counts_past_what_a_proxy_could_serve_with_are_refused_with_the_most_allowed() {
        // u32::MAX headers: hyper would set room aside for them for each request (and abort
        // on the allocation); u32::MAX retries wrapped to no try at all.
        let diags =
            diagnostics("limits: { max_headers: 4294967295 }\nupstream: { retries: 4294967295 }\n");
        assert_eq!(
            diags,
            [
                "3:24: error: limits.max_headers: 4294967295 is above the maximum of 1000; use 1000 or less",
                "4:22: error: upstream.retries: 4294967295 is above the maximum of 10; use 10 or less",
            ],
            "{diags:#?}"
        );
    }

    #[test]
    fn the_admin_api_may_not_share_a_traffic_listeners_address() {
        let src = "listen: [127.0.0.1:8080, 127.0.0.1:8081]\nadmin: 127.0.0.1:8081\ntracks:\n  stable: { backends: [\"127.0.0.1:1\"] }\nroutes:\n  - { split: { stable: 10000 } }\n";
        let diags: Vec<String> = match crate::config::check(src, Path::new(".")) {
            Ok(_) => vec![],
            Err(diags) => diags.iter().map(|d| d.to_string()).collect(),
        };
        assert_eq!(
            diags,
            [
                "2:8: error: admin: 127.0.0.1:8081 is also a traffic listener; give the admin API an address of its own"
            ]
        );
    }

    #[test]
    fn a_tls_listener_without_a_certificate_is_refused_not_served_plain() {
        let check = |entry: &str| -> Vec<String> {
            let src = format!(
                "listen:\n  - {entry}\nadmin: 127.0.0.1:0\ntracks:\n  stable: {{ backends: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
            );
            match crate::config::check(&src, Path::new(".")) {
                Ok(_) => vec![],
                Err(diags) => diags.iter().map(|d| d.to_string()).collect(),
            }
        };
        for tls in ["[]", "null", ""] {
            let found = check(&format!("{{ addr: 127.0.0.1:0, tls: {tls} }}"));
            let at = found
                .iter()
                .map(|d| d.split_once(' ').map_or("", |(_, m)| m));
            assert_eq!(
                at.collect::<Vec<_>>(),
                [
                    "error: listen[0].tls: no certificate; give at least one `{ cert, key }`, or remove `tls` to serve plain HTTP"
                ],
                "tls: {tls:?}"
            );
        }
        assert_eq!(check("{ addr: 127.0.0.1:0 }"), Vec::<String>::new());
    }

    #[test]
    fn listeners_that_could_not_all_be_bound_are_refused() {
        let check = |listen: &str, admin: &str| -> Vec<String> {
            let src = format!(
                "listen: {listen}\nadmin: {admin}\ntracks:\n  stable: {{ backends: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
            );
            match crate::config::check(&src, Path::new(".")) {
                Ok(_) => vec![],
                Err(diags) => diags.iter().map(|d| d.to_string()).collect(),
            }
        };
        assert_eq!(
            check("[127.0.0.1:8080, 127.0.0.1:8080]", "127.0.0.1:9901"),
            [
                "1:26: error: listen[1]: 127.0.0.1:8080 is also listen[0]; give each listener a port of its own"
            ]
        );
        assert_eq!(
            check("[127.0.0.1:8080, 0.0.0.0:8080]", "127.0.0.1:9901"),
            [
                "1:26: error: listen[1]: 0.0.0.0:8080 takes the port of listen[0] (127.0.0.1:8080) too; give each listener a port of its own"
            ]
        );
        assert_eq!(
            check("[127.0.0.1:8080]", "0.0.0.0:8080"),
            [
                "2:8: error: admin: 0.0.0.0:8080 takes the port of traffic listener listen[0] (127.0.0.1:8080) too; give the admin API an address of its own"
            ]
        );
        assert_eq!(check("[\"[::]:8080\"]", "10.0.0.1:8080").len(), 1);
        // Different ports, different addresses, an IPv4 wildcard beside an IPv6 address, and
        // ports the kernel picks: all fine.
        for (listen, admin) in [
            ("[127.0.0.1:8080, 127.0.0.1:8443]", "127.0.0.1:9901"),
            ("[127.0.0.1:8080, 127.0.0.2:8080]", "127.0.0.3:8080"),
            ("[0.0.0.0:8080, \"[::1]:8080\"]", "127.0.0.1:9901"),
            ("[127.0.0.1:0, 127.0.0.1:0]", "127.0.0.1:0"),
        ] {
            assert_eq!(
                check(listen, admin),
                Vec::<String>::new(),
                "{listen} {admin}"
            );
        }
    }

    #[test]
    fn zero_is_a_fine_drain_timeout_ejection_and_batch_window() {
        assert_eq!(
            diagnostics(
                "drain_timeout: 0s\nupstream: { eject_for: 0s }\nmirror: { batch_window: 0s }\n"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_batch_window_over_a_second_is_refused_with_the_longest_allowed() {
        let diags = diagnostics("mirror: { batch_window: 5s }\n");
        assert_eq!(diags.len(), 1, "{diags:#?}");
        for part in [
            "mirror.batch_window",
            "\"5s\" would hold copies back too long",
            "write at most `1s`",
        ] {
            assert!(diags[0].contains(part), "{part:?} not in {:?}", diags[0]);
        }
        assert_eq!(
            diagnostics("mirror: { batch_window: 1s }\n"),
            Vec::<String>::new()
        );
    }
}
