//! One backend address: its passive health and its pool of connections, shared by every
//! table that names it.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::config::Upstream;

use super::pool::Pool;

/// Process start, the origin of the millisecond clock that ejections use.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
pub struct Backend {
    pub addr: String,
    /// `addr` parsed once; `None` only for an address the table check would have refused.
    pub(super) authority: Option<http::uri::Authority>,
    /// `addr` when it is an IP address and port, so that connecting needs no lookup.
    pub(super) socket: Option<SocketAddr>,
    pub(super) pool: Pool,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// While it is ejected: the earliest time (ms) of its next trial request ([`Trial`]), or
    /// [`TRIAL_UNDER_WAY`].
    trial_at_ms: AtomicU64,
    /// Counted since it was first named (rare events, off the request path).
    ejections: AtomicU64,
    trials_passed: AtomicU64,
    trials_failed: AtomicU64,
    /// Under `protocol: auto`, whether it speaks HTTP/2 with prior knowledge: 0 not known,
    /// [`HTTP2_SPOKEN`], or until when (ms) it is taken to speak only HTTP/1.1.
    http2: AtomicU64,
    /// Held while it is asked, so that requests arriving together ask once.
    pub(super) asking_http2: tokio::sync::Mutex<()>,
}

const HTTP2_SPOKEN: u64 = u64::MAX;
/// `trial_at_ms` while a trial request is out: no other is let through.
const TRIAL_UNDER_WAY: u64 = u64::MAX;
/// How long a backend found to speak only HTTP/1.1 is taken at its word before it is asked
/// again (it may be redeployed speaking both); asking costs a connection.
const HTTP2_REFUSED_FOR_MS: u64 = 60_000;
/// How long one that closed on the question is taken to speak only HTTP/1.1 while the try
/// that asked finds out over HTTP/1.1 (at most a try's deadline).
const HTTP2_SILENT_FOR_MS: u64 = 2_000;

impl Backend {
    pub fn new(addr: &str, cfg: &Upstream) -> Self {
        Backend {
            addr: addr.to_string(),
            authority: addr.parse().ok(),
            socket: addr.parse().ok(),
            pool: Pool::new(cfg.max_idle_per_backend, cfg.max_connections_per_backend),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            trial_at_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            trials_passed: AtomicU64::new(0),
            trials_failed: AtomicU64::new(0),
            http2: AtomicU64::new(0),
            asking_http2: tokio::sync::Mutex::const_new(()),
        }
    }

    /// Its passive health as `/stats` and `/metrics` show it.
    pub fn health(&self) -> Health {
        Health {
            ejected: self.ejected_until_ms.load(Relaxed) > now_ms(),
            ejections: self.ejections.load(Relaxed),
            trials_passed: self.trials_passed.load(Relaxed),
            trials_failed: self.trials_failed.load(Relaxed),
        }
    }

    /// Closes idle connections that are stale or that the backend closed.
    pub fn sweep(&self) {
        self.pool.sweep();
    }

    pub fn healthy(&self) -> bool {
        // Never ejected, or no longer: no clock to read.
        let until = self.ejected_until_ms.load(Relaxed);
        if until == 0 {
            return true;
        }
        if until > now_ms() {
            return false;
        }
        let over = self
            .ejected_until_ms
            .compare_exchange(until, 0, Relaxed, Relaxed);
        if over.is_ok() {
            tracing::info!(backend = %self.addr, "ejected backend back: its eject_for is over");
        }
        true
    }

    /// Counts an answer: a gateway error (502–504) from the backend is a failure. Whether it
    /// was a success.
    #[inline]
    pub(super) fn answered(&self, status: http::StatusCode, cfg: &Upstream) -> bool {
        match status.as_u16() {
            502..=504 => {
                self.failed(cfg);
                false
            }
            _ => {
                self.succeeded();
                true
            }
        }
    }

    /// The trial request it may take while ejected, if one is due and none is out. Asked only
    /// when no backend of the track is healthy, whose requests would all get `503`: one at a
    /// time, at most every `trial_every`, goes to it instead, and its success ends the
    /// ejection (a backend restarted in a second is not kept out for `eject_for`).
    pub(super) fn trial(&self, cfg: &Upstream) -> Option<Trial<'_>> {
        let now = now_ms();
        if self.ejected_until_ms.load(Relaxed) <= now {
            return None;
        }
        let at = self.trial_at_ms.load(Relaxed);
        if at > now {
            return None;
        }
        self.trial_at_ms
            .compare_exchange(at, TRIAL_UNDER_WAY, Relaxed, Relaxed)
            .ok()?;
        Some(Trial {
            backend: self,
            every_ms: millis(cfg.trial_every),
            passed: false,
        })
    }

    /// For `protocol: auto`: whether it speaks HTTP/2 with prior knowledge, if known.
    pub(super) fn speaks_http2(&self) -> Option<bool> {
        match self.http2.load(Relaxed) {
            0 => None,
            HTTP2_SPOKEN => Some(true),
            until if until > now_ms() => Some(false),
            _ => None,
        }
    }

    /// What asking it showed ([`super::probe::http2`]).
    pub(super) fn heard_http2(&self, spoken: bool) {
        let state = match spoken {
            true => HTTP2_SPOKEN,
            false => {
                tracing::info!(backend = %self.addr, "backend speaks no HTTP/2 (prior knowledge): HTTP/1.1 to it for a minute");
                now_ms() + HTTP2_REFUSED_FOR_MS
            }
        };
        self.http2.store(state, Relaxed);
    }

    /// It closed on the question without a word: HTTP/1.1 to it for now, no verdict yet.
    pub(super) fn heard_silence(&self) {
        self.http2.store(now_ms() + HTTP2_SILENT_FOR_MS, Relaxed);
    }

    /// A try over HTTP/2 failed, or the HTTP/1.1 try after a silence did: whether it speaks
    /// HTTP/2 is asked again.
    pub(super) fn forget_http2(&self) {
        self.http2.store(0, Relaxed);
    }

    fn succeeded(&self) {
        // Most requests succeed: read before writing, so the line stays shared.
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    pub(super) fn failed(&self, cfg: &Upstream) {
        // Tries under way when it was ejected fail after: they neither eject it again, which
        // would stretch its time out, nor say so once each.
        let now = now_ms();
        if self.ejected_until_ms.load(Relaxed) > now {
            return;
        }
        // `eject_for: 0s` keeps no backend out: nothing to count or say.
        if cfg.eject_for.is_zero() {
            return;
        }
        if self.failures.fetch_add(1, Relaxed) + 1 >= cfg.eject_after {
            self.failures.store(0, Relaxed);
            let until = now.saturating_add(millis(cfg.eject_for));
            // Of failures on several threads at once, one ejects it and says so.
            if self.ejected_until_ms.swap(until, Relaxed) <= now {
                self.ejections.fetch_add(1, Relaxed);
                self.trial_at_ms
                    .store(now.saturating_add(millis(cfg.trial_every)), Relaxed);
                tracing::warn!(backend = %self.addr, "backend ejected after consecutive failures");
            }
        }
    }
}

/// A backend's passive health, for the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// Out now (`eject_for` not over, no trial passed since).
    pub ejected: bool,
    pub ejections: u64,
    /// Trial requests answered (each ended an ejection), and failed or given up on.
    pub trials_passed: u64,
    pub trials_failed: u64,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A request let through to an ejected backend ([`Backend::trial`]). Unless it [`passed`]
/// (a lost one, a failure or a request given up on alike), the next may go `trial_every`
/// after it ended.
///
/// [`passed`]: Trial::passed
#[derive(Debug)]
pub struct Trial<'a> {
    backend: &'a Backend,
    every_ms: u64,
    passed: bool,
}

impl Trial<'_> {
    /// It was answered with no gateway error: the backend is back, its count of failures at
    /// zero.
    pub(super) fn passed(mut self) {
        let b = self.backend;
        b.failures.store(0, Relaxed);
        b.ejected_until_ms.store(0, Relaxed);
        self.passed = true;
        tracing::info!(backend = %b.addr, "ejected backend back: a trial request was answered");
    }
}

impl Drop for Trial<'_> {
    fn drop(&mut self) {
        let b = self.backend;
        let next = match self.passed {
            true => {
                b.trials_passed.fetch_add(1, Relaxed);
                0
            }
            false => {
                b.trials_failed.fetch_add(1, Relaxed);
                now_ms().saturating_add(self.every_ms)
            }
        };
        b.trial_at_ms.store(next, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn upstream(eject_after: u32) -> Upstream {
        Upstream {
            eject_after,
            eject_for: Duration::from_secs(600),
            ..Upstream::for_tests()
        }
    }

    #[test]
    fn an_ejected_backend_takes_one_trial_at_a_time_and_is_back_when_one_passes() {
        let cfg = Upstream {
            trial_every: Duration::ZERO,
            ..upstream(1)
        };
        let b = Backend::new("127.0.0.1:1", &cfg);
        assert!(b.trial(&cfg).is_none(), "not ejected: no trial");
        b.failed(&cfg);
        assert!(!b.healthy());
        let first = b.trial(&cfg).expect("due at once with trial_every 0s");
        assert!(b.trial(&cfg).is_none(), "one at a time");
        // A trial that fails (or is given up on) lets the next one through.
        drop(first);
        assert!(!b.healthy(), "a failed trial ends nothing");
        b.trial(&cfg).expect("the next trial").passed();
        assert!(b.healthy());
        assert!(b.trial(&cfg).is_none(), "back: no trial");
        assert_eq!(b.failures.load(Relaxed), 0);
        let health = Health {
            ejected: false,
            ejections: 1,
            trials_passed: 1,
            trials_failed: 1,
        };
        assert_eq!(b.health(), health);
    }

    #[test]
    fn with_eject_for_zero_failures_neither_eject_nor_count() {
        let cfg = Upstream {
            eject_for: Duration::ZERO,
            ..upstream(1)
        };
        let b = Backend::new("127.0.0.1:1", &cfg);
        for _ in 0..3 {
            b.failed(&cfg);
        }
        assert!(b.healthy());
        assert_eq!(b.ejected_until_ms.load(Relaxed), 0, "said to be ejected");
        assert_eq!(b.failures.load(Relaxed), 0);
    }

    #[test]
    fn a_trial_is_due_trial_every_after_the_ejection_and_after_the_last_trial() {
        let cfg = Upstream {
            trial_every: Duration::from_secs(600),
            ..upstream(1)
        };
        let b = Backend::new("127.0.0.1:1", &cfg);
        b.failed(&cfg);
        assert!(b.trial(&cfg).is_none(), "not due for ten minutes");
        b.trial_at_ms.store(0, Relaxed);
        drop(b.trial(&cfg).expect("due"));
        assert!(b.trial(&cfg).is_none(), "ten minutes after the last");
    }

    #[test]
    fn failures_of_tries_under_way_when_it_was_ejected_neither_eject_it_again_nor_count() {
        let cfg = upstream(2);
        let b = Backend::new("127.0.0.1:1", &cfg);
        b.failed(&cfg);
        assert!(b.healthy());
        b.failed(&cfg);
        assert!(!b.healthy());
        let until = b.ejected_until_ms.load(Relaxed);
        // Hundreds of requests were in flight when it went out: their failures follow.
        for _ in 0..501 {
            b.failed(&cfg);
        }
        assert_eq!(b.ejected_until_ms.load(Relaxed), until, "ejected again");
        assert_eq!(b.failures.load(Relaxed), 0);
    }
}
