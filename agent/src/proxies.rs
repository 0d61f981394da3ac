//! The cluster's proxies, as the agent sees them: the table it put on each, and their
//! counters added up since the agent began counting.
//!
//! A proxy can lose the agent's table without the agent doing anything: it restarts and
//! serves the table of its config file, or its file is edited and read again. Each scrape of
//! `/stats` says which table a proxy has in force (`table_version`, since `started_unix_ms`),
//! so the agent sees it there and puts its table back: at once after a restart, and when
//! something replaced it in the same run (a second agent pointed at the same proxy, an
//! operator's `PUT`, a file edit) at once the first time, then at most every
//! [`RESTORE_EVERY`] for that proxy, with a warning, rather than a fight every scrape.
//!
//! A table is in force once every proxy that runs has it (and at least one proxy runs): a
//! proxy pod whose proxy container has not started or has ended (crashing and waiting to
//! start again, say) holds no table and serves nothing, so it keeps no step waiting; it is
//! given the table as soon as it runs (`discover::proxy_runs`). A proxy that runs but is not
//! ready may hold a table and serve the connections it has, so it is waited for, as any other.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use fleet_proto::tally::Tally;
use fleet_proto::v1 as pb;
use fleet_proxy_router::spec::TableSpec;

use crate::discover::Proxy;
use crate::stats::{self, ProxyStats};

const PROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// A table is put back on a proxy that lost it at most this often.
const RESTORE_EVERY: Duration = Duration::from_secs(5);

pub struct Proxies {
    http: reqwest::Client,
    /// The proxies known.
    known: Vec<Proxy>,
    /// The table last programmed, which `installed` is of.
    table: Option<TableSpec>,
    /// The proxies that took `table`: the version each answered our `PUT` with, and the start
    /// of the proxy it answered (known from the first scrape after).
    installed: HashMap<String, (u64, Option<u64>)>,
    tally: Tally<String>,
    /// A table replaced in a proxy's run is not put back on it before this.
    quiet_until: HashMap<String, Instant>,
    /// The proxies whose last scrape got no answer, and why.
    unanswered: HashMap<String, String>,
}

impl Proxies {
    pub fn new(http: reqwest::Client, known: Vec<Proxy>) -> Self {
        Proxies {
            http,
            known,
            table: None,
            installed: HashMap::new(),
            tally: Tally::new(now_unix_ms()),
            quiet_until: HashMap::new(),
            unanswered: HashMap::new(),
        }
    }

    /// Takes the proxies as they are now; true when one needs the table: new, or running
    /// again (a new process, without it). What was known of those gone is forgotten; their
    /// counts stay in the tally.
    pub fn set_proxies(&mut self, found: Vec<Proxy>) -> bool {
        if found == self.known {
            return false;
        }
        let mut needs = false;
        for p in &found {
            match self.known.iter().find(|k| k.admin == p.admin) {
                None => needs |= p.running,
                Some(was) if p.running && !was.running => {
                    // Its process started again: whatever it was put is gone.
                    self.installed.remove(&p.admin);
                    needs = true;
                }
                Some(_) => {}
            }
        }
        tracing::info!(proxies = ?found, "the region's proxies");
        let kept = |proxy: &String| found.iter().any(|p| p.admin == *proxy);
        self.installed.retain(|proxy, _| kept(proxy));
        self.quiet_until.retain(|proxy, _| kept(proxy));
        self.unanswered.retain(|proxy, _| kept(proxy));
        self.known = found;
        needs
    }

    /// The proxies that run but did not answer the last scrape, for people: one stopped or
    /// hung serves nobody, though it may hold the table.
    pub fn unanswered(&self) -> impl Iterator<Item = String> + '_ {
        let mut said: Vec<String> = (self.unanswered.iter())
            .map(|(proxy, why)| format!("proxy {proxy} does not answer: {why}"))
            .collect();
        said.sort();
        said.into_iter()
    }

    /// The proxies left out because their process does not run, for people.
    pub fn not_running(&self) -> impl Iterator<Item = String> + '_ {
        (self.known.iter().filter(|p| !p.running))
            .map(|p| format!("proxy {} does not run: left out until it does", p.admin))
    }

    /// Puts `table` on every proxy that runs and does not have it yet, all at once, each
    /// whatever the others answer (one down must not keep the rest on an old table, nor slow
    /// them); fails, naming each, if any did not take it, or if none runs. Called again while
    /// one is down, it puts the table on that one only.
    pub async fn program(&mut self, table: &TableSpec) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.known.is_empty(),
            "no proxy is known to put the table on"
        );
        anyhow::ensure!(
            self.known.iter().any(|p| p.running),
            "no proxy runs to put the table on (their pods' containers are not running)"
        );
        if self.table.as_ref() != Some(table) {
            self.table = Some(table.clone());
            self.installed.clear();
        }
        let body = bytes::Bytes::from(serde_json::to_vec(table)?);
        let mut puts = tokio::task::JoinSet::new();
        for proxy in (self.known.iter())
            .filter(|p| p.running)
            .map(|p| &p.admin)
            .filter(|p| !self.installed.contains_key(*p))
        {
            let (http, proxy, body) = (self.http.clone(), proxy.clone(), body.clone());
            puts.spawn(async move {
                let answer = put(&http, &proxy, body).await;
                (proxy, answer)
            });
        }
        let mut failed = Vec::new();
        while let Some(done) = puts.join_next().await {
            match done? {
                (proxy, Ok(version)) => {
                    self.installed.insert(proxy, (version, None));
                }
                (_, Err(e)) => failed.push(format!("{e:#}")),
            }
        }
        failed.sort();
        match failed.is_empty() {
            true => Ok(()),
            false => anyhow::bail!("{}", failed.join("; ")),
        }
    }

    /// Reads every running proxy's counters into the tally, all at once (one that does not
    /// answer keeps none of the others waiting; one that does not run is not asked). True when a proxy was found serving another table
    /// than the one put on it (restarted, or its file read again): the table needs putting
    /// again.
    pub async fn scrape(&mut self) -> bool {
        let mut fetches = tokio::task::JoinSet::new();
        for (i, proxy) in self.known.iter().enumerate().filter(|(_, p)| p.running) {
            let (http, url) = (
                self.http.clone(),
                format!("{}/stats", proxy.admin.trim_end_matches('/')),
            );
            fetches.spawn(async move {
                let asked = async {
                    let response = http.get(&url).timeout(PROXY_TIMEOUT).send().await?;
                    response.error_for_status()?.json::<ProxyStats>().await
                };
                (
                    i,
                    asked.await.map_err(|e| crate::no_answer(&e, PROXY_TIMEOUT)),
                )
            });
        }
        let mut answers: Vec<Option<Result<ProxyStats, String>>> =
            self.known.iter().map(|_| None).collect();
        while let Some(done) = fetches.join_next().await {
            if let Ok((i, answer)) = done {
                answers[i] = Some(answer);
            }
        }
        let mut lost = false;
        for (proxy, answer) in self.known.iter().map(|p| &p.admin).zip(answers) {
            let stats = match answer {
                None => continue,
                Some(Err(why)) => {
                    if self.unanswered.insert(proxy.clone(), why.clone()).is_none() {
                        tracing::warn!(proxy, %why, "a proxy does not answer");
                    }
                    continue;
                }
                Some(Ok(stats)) => stats,
            };
            if self.unanswered.remove(proxy).is_some() {
                tracing::info!(proxy, "a proxy answers again");
            }
            if let Some((version, started)) = self.installed.get_mut(proxy) {
                let started = *started.get_or_insert(stats.started_unix_ms);
                let now = Instant::now();
                let quiet = self.quiet_until.get(proxy).is_some_and(|t| now < *t);
                let put = (*version, started);
                let serving = (stats.table_version, stats.started_unix_ms);
                if let Some(again) = put_back(put, serving, quiet) {
                    if again == Again::Limited {
                        self.quiet_until.insert(proxy.clone(), now + RESTORE_EVERY);
                    }
                    tracing::warn!(
                        proxy,
                        serving = stats.table_version,
                        put = *version,
                        "a proxy serves another table than the one put on it; putting it again"
                    );
                    self.installed.remove(proxy);
                    lost = true;
                }
            }
            let tracks = stats::tracks(&stats);
            (self.tally).observe(proxy.clone(), stats.started_unix_ms, tracks);
        }
        lost
    }

    /// What every proxy counted since the agent began counting; `None` until one answered.
    pub fn stats(&self) -> Option<pb::TrafficStats> {
        (!self.tally.is_empty()).then(|| self.tally.total().clone())
    }

    pub fn counting_since_unix_ms(&self) -> u64 {
        self.tally.since_unix_ms()
    }
}

/// How a table goes back on a proxy that lost it.
#[derive(Debug, PartialEq, Eq)]
enum Again {
    /// The proxy restarted: at once, whatever came before.
    AtOnce,
    /// Something replaced it in the same run: now, then not again for a while.
    Limited,
}

/// Whether a proxy that was put table version `put.0` in its run started at `put.1`, and
/// now serves `serving` (version, start), needs it put back; `quiet` while a table replaced in
/// this run was put back lately. Pure.
fn put_back(put: (u64, u64), serving: (u64, u64), quiet: bool) -> Option<Again> {
    match (put.1 != serving.1, put.0 != serving.0) {
        (true, _) => Some(Again::AtOnce),
        (false, true) if !quiet => Some(Again::Limited),
        _ => None,
    }
}

/// Puts the table `body` (JSON) on one proxy; the version it is in force as.
async fn put(http: &reqwest::Client, proxy: &str, body: bytes::Bytes) -> anyhow::Result<u64> {
    let url = format!("{}/routes", proxy.trim_end_matches('/'));
    let response = (http.put(&url))
        .timeout(PROXY_TIMEOUT)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| url.clone())?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {body}");
    }
    #[derive(serde::Deserialize)]
    struct Put {
        version: u64,
    }
    let put: Put = response.json().await?;
    Ok(put.version)
}

fn now_unix_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A FAKE proxy admin API (test-only): answers every request with `{"version": 7}` and
    /// counts them.
    async fn fake_proxy() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        fake_proxy_saying(r#"{"version": 7}"#).await
    }

    /// A FAKE proxy admin API (test-only): answers every request with `body` and counts them.
    async fn fake_proxy_saying(
        body: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let puts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = puts.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        (url, puts)
    }

    #[tokio::test]
    async fn a_proxy_that_is_down_keeps_none_of_the_others_from_their_table() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (live, puts) = fake_proxy().await;
        let known = vec![Proxy::listed(&dead), Proxy::listed(&live)];
        let mut proxies = Proxies::new(crate::http_client(), known);
        let table = TableSpec {
            version: None,
            tracks: Default::default(),
            routes: Vec::new(),
        };
        let e = proxies.program(&table).await.unwrap_err().to_string();
        assert!(e.contains(&dead), "{e}");
        assert!(!e.contains(&live), "{e}");
        let count = || puts.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(count(), 1);
        assert_eq!(proxies.installed.get(&live), Some(&(7, None)));

        // Tried again while one is down: only that one is put to.
        assert!(proxies.program(&table).await.is_err());
        assert_eq!(count(), 1, "the live proxy has the table already");
        // A new table goes to every proxy again.
        let newer = TableSpec {
            version: Some(2),
            ..table
        };
        assert!(proxies.program(&newer).await.is_err());
        assert_eq!(count(), 2);
    }

    #[tokio::test]
    async fn proxies_that_do_not_answer_keep_none_of_the_others_stats_waiting() {
        // Two that take connections and never answer: each costs PROXY_TIMEOUT, not both.
        let silent: Vec<_> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut urls: Vec<String> = silent
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let stats =
            r#"{"started_unix_ms": 1, "table_version": 1, "latency_bounds_ms": [], "series": []}"#;
        urls.push(fake_proxy_saying(stats).await.0);
        let known = urls.iter().map(|u| Proxy::listed(u)).collect();
        let mut proxies = Proxies::new(crate::http_client(), known);
        let started = Instant::now();
        assert!(!proxies.scrape().await);
        assert!(
            started.elapsed() < PROXY_TIMEOUT * 3 / 2,
            "{:?}",
            started.elapsed()
        );
        assert!(
            proxies.stats().is_some(),
            "the one that answered is counted"
        );
    }

    #[tokio::test]
    async fn proxies_found_anew_are_told_and_those_gone_forgotten() {
        let mut proxies = Proxies::new(crate::http_client(), Vec::new());
        let table = TableSpec {
            version: None,
            tracks: Default::default(),
            routes: Vec::new(),
        };
        let e = proxies.program(&table).await.unwrap_err();
        assert_eq!(e.to_string(), "no proxy is known to put the table on");

        let (a, b) = (
            "http://10.2.0.2:9901".to_string(),
            "http://10.2.0.3:9901".to_string(),
        );
        let listed = |urls: &[&String]| urls.iter().map(|u| Proxy::listed(u)).collect();
        assert!(proxies.set_proxies(listed(&[&a, &b])), "new ones");
        proxies.installed.insert(a.clone(), (7, None));
        proxies.installed.insert(b.clone(), (7, None));
        assert!(!proxies.set_proxies(listed(&[&a, &b])), "the same");
        assert!(!proxies.set_proxies(listed(&[&b])), "one gone: none new");
        assert!(!proxies.installed.contains_key(&a), "forgotten");
        assert!(proxies.installed.contains_key(&b), "kept, with its table");
        assert!(proxies.set_proxies(listed(&[&a, &b])), "back: new again");
    }

    #[tokio::test]
    async fn a_proxy_that_does_not_run_is_left_out_and_given_the_table_once_it_runs() {
        let (live, puts) = fake_proxy().await;
        let (other, other_puts) = fake_proxy().await;
        let stopped = Proxy {
            admin: other.clone(),
            running: false,
        };
        let table = TableSpec {
            version: None,
            tracks: Default::default(),
            routes: Vec::new(),
        };
        // Alone, it takes nothing: no proxy runs.
        let mut proxies = Proxies::new(crate::http_client(), vec![stopped.clone()]);
        let e = proxies.program(&table).await.unwrap_err().to_string();
        assert!(e.starts_with("no proxy runs to put the table on"), "{e}");

        let mut proxies = Proxies::new(crate::http_client(), vec![stopped, Proxy::listed(&live)]);
        proxies.program(&table).await.unwrap();
        let count = |puts: &std::sync::Arc<std::sync::atomic::AtomicUsize>| {
            puts.load(std::sync::atomic::Ordering::SeqCst)
        };
        assert_eq!((count(&puts), count(&other_puts)), (1, 0), "left out");
        let told: Vec<_> = proxies.not_running().collect();
        assert_eq!(
            told,
            [format!(
                "proxy {other} does not run: left out until it does"
            )]
        );

        // It runs: it needs the table, and is given it alone.
        assert!(proxies.set_proxies(vec![Proxy::listed(&other), Proxy::listed(&live)]));
        proxies.program(&table).await.unwrap();
        assert_eq!((count(&puts), count(&other_puts)), (1, 1));
        assert_eq!(proxies.not_running().count(), 0);
    }

    #[test]
    fn a_proxy_that_runs_again_is_a_new_process_without_its_table() {
        let mut proxies = Proxies::new(crate::http_client(), Vec::new());
        let a = "http://10.2.0.2:9901".to_string();
        let (running, stopped) = (
            Proxy::listed(&a),
            Proxy {
                admin: a.clone(),
                running: false,
            },
        );
        assert!(proxies.set_proxies(vec![running.clone()]), "new");
        proxies.installed.insert(a.clone(), (7, Some(1)));
        assert!(
            !proxies.set_proxies(vec![stopped.clone()]),
            "stopped: nothing to put"
        );
        assert!(
            proxies.set_proxies(vec![running]),
            "running again: needs it"
        );
        assert!(
            !proxies.installed.contains_key(&a),
            "what it was put is gone"
        );
        let mut fresh = Proxies::new(crate::http_client(), Vec::new());
        assert!(
            !fresh.set_proxies(vec![stopped]),
            "new, not running: nothing to put"
        );
    }

    #[test]
    fn a_lost_table_goes_back_at_once_after_a_restart_and_at_a_limited_pace_otherwise() {
        // In force as put: nothing to do.
        assert_eq!(put_back((4, 100), (4, 100), false), None);
        // The proxy restarted (its file's table, version 1): at once, even in a quiet spell.
        assert_eq!(put_back((4, 100), (1, 200), true), Some(Again::AtOnce));
        // Replaced in the same run (a file edit, a hand PUT, a second agent): now, and not
        // again while the spell lasts.
        assert_eq!(put_back((4, 100), (5, 100), false), Some(Again::Limited));
        assert_eq!(put_back((4, 100), (6, 100), true), None);
    }
}
