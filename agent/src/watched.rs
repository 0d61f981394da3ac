//! Objects of one kind, as the Kubernetes API last told them: a kube-runtime reflector fed by
//! a watch (one list, then the changes as they happen), on a task of its own, and what went
//! wrong with that watch lately.
//!
//! The driver and the proxies' discovery read their objects here rather than listing them
//! again and again: the API server sends each change once, and the agent sees it within one
//! round. kube-runtime lists again when the watch falls too far behind (410 Gone) and backs
//! off while the API cannot be reached, keeping the objects it had.
//!
//! A watch that fails is told (`trouble`) until it shows a change again, or for
//! [`TROUBLE_TOLD_FOR`] after its last failure: a watch taken up again without a change
//! says nothing, so it is not seen to heal before then. Every watch of the agent also keeps
//! its figures in a [`Tally`], which `/metrics` shows. A watch asks the API server to end it
//! after [`WATCH_TIMEOUT_SECS`] and takes it up again, and the client gives up a read that
//! waits longer than [`READ_TIMEOUT`], so that no request (a list, say) hangs for ever on a
//! connection that died unseen: it fails, and kube-runtime tries again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event, watcher};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_util::task::AbortOnDropHandle;

/// How long a watch's failure is told after it happened, unless a change comes through
/// sooner. Above kube-runtime's longest wait between tries (30 s, and as much again of
/// jitter) and the longest a try can take to fail ([`READ_TIMEOUT`]), so that a watch that
/// keeps failing is told all along.
pub const TROUBLE_TOLD_FOR: Duration = Duration::from_secs(150);

/// The API server ends each watch after this long (kube-runtime's default is 290 s), and it
/// is taken up again from where it was.
pub const WATCH_TIMEOUT_SECS: u32 = 60;

/// The longest wait for the next bytes of any answer of the Kubernetes API, counted from the
/// request (or the last bytes), for the client's settings: above [`WATCH_TIMEOUT_SECS`], so
/// that a quiet watch is not cut.
pub const READ_TIMEOUT: Duration = Duration::from_secs(75);

/// What a kind's watch has been through.
#[derive(Default)]
struct Health {
    /// Its first list came through (and with it the objects).
    listed: bool,
    /// The last failure, and when, until a change comes through.
    failed: Option<(String, Instant)>,
}

pub struct Watched<K>
where
    K: kube::Resource + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
    /// Changed after every event, once the store has it.
    health: watch::Receiver<Health>,
    /// What is watched, for people: "Deployments in namespace shop".
    what: String,
    /// Drives the watch; ended when this is dropped.
    _task: AbortOnDropHandle<()>,
}

/// The figures of the agent's watches, by name (`deployments`, `proxy-pods`), for
/// `/metrics`: written by the watches, read by the admin listener. A watch started anew under
/// a name (another service's) carries its counters on and sets the rest afresh.
#[derive(Clone, Debug, Default)]
pub struct Tally(Arc<Mutex<BTreeMap<&'static str, Figures>>>);

/// One watch's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Its first list came through.
    pub listed: bool,
    /// The objects it shows.
    pub objects: usize,
    /// Lists and watches that failed, since the agent started (a relist is no failure).
    pub failures: u64,
    /// Lists made again because the watch fell too far behind (410 Gone).
    pub relists: u64,
    /// When it last failed, until a change came through.
    pub(crate) failed_at: Option<Instant>,
    /// The watch that writes these: the last one started under the name.
    pub(crate) writer: u64,
}

impl Figures {
    /// Its failure is told now ([`TROUBLE_TOLD_FOR`]).
    pub fn failing(&self) -> bool {
        self.failed_at.is_some_and(still_told)
    }
}

impl Tally {
    /// Every watch's figures, by name.
    pub fn figures(&self) -> BTreeMap<&'static str, Figures> {
        self.lock().clone()
    }

    /// A watch starts under `name`: it writes its figures from now on (the one it replaces
    /// no longer does); its counters carry on.
    fn start(&self, name: &'static str) -> u64 {
        static WRITERS: AtomicU64 = AtomicU64::new(1);
        let writer = WRITERS.fetch_add(1, Ordering::Relaxed);
        let mut tally = self.lock();
        let figures = tally.entry(name).or_default();
        *figures = Figures {
            failures: figures.failures,
            relists: figures.relists,
            writer,
            ..Figures::default()
        };
        writer
    }

    /// Changes the figures of `name`, if `writer` still writes them.
    fn note(&self, name: &'static str, writer: u64, change: impl FnOnce(&mut Figures)) {
        if let Some(figures) = self.lock().get_mut(name).filter(|f| f.writer == writer) {
            change(figures);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Figures>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What can be watched: a Kubernetes object of a kind known at compile time.
pub trait Object:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Object for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

impl<K: Object> Watched<K> {
    /// Watches the objects `api` serves that `selector` (labels) picks; `what` names them
    /// for people, `name` in `tally`.
    pub fn start(
        api: Api<K>,
        selector: &str,
        what: String,
        tally: &Tally,
        name: &'static str,
    ) -> Self {
        let (store, writer) = reflector::store();
        let (told, health) = watch::channel(Health::default());
        let config = (watcher::Config::default().labels(selector)).timeout(WATCH_TIMEOUT_SECS);
        let events = watcher(api, config).default_backoff().reflect(writer);
        let tallied = Tallied {
            tally: tally.clone(),
            writer: tally.start(name),
            name,
            store: store.clone(),
        };
        let task = tokio::spawn(follow(events, told, what.clone(), tallied));
        Watched {
            store,
            health,
            what,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// The objects, once first listed; until then why not.
    pub fn objects(&self) -> Result<Vec<Arc<K>>, String> {
        let health = self.health.borrow();
        if !health.listed {
            return Err(match &health.failed {
                Some((why, _)) => why.clone(),
                None => format!("listing {}: no answer yet", self.what),
            });
        }
        Ok(self.store.state())
    }

    /// Why the watch failed lately, while it is told ([`TROUBLE_TOLD_FOR`]).
    pub fn trouble(&self) -> Option<String> {
        let health = self.health.borrow();
        let (why, at) = health.failed.as_ref()?;
        still_told(*at).then(|| why.clone())
    }

    /// Waits for the first list to come through, or to fail.
    pub async fn first_list(&self) {
        self.until(|_, health| health.listed || health.failed.is_some())
            .await;
    }

    /// Waits, until `deadline`, for the objects to be as `done` wants (a write of the
    /// driver's come back through the watch); false if they were not. Does not wait on a
    /// watch that has never listed: it has no objects to show.
    pub async fn shows(&self, deadline: Instant, done: impl Fn(&[Arc<K>]) -> bool) -> bool {
        if !self.health.borrow().listed {
            return false;
        }
        let shown = self.until(|store, health| health.listed && done(&store.state()));
        tokio::time::timeout_at(deadline, shown).await.is_ok()
    }

    /// What is watched, for people.
    pub fn what(&self) -> &str {
        &self.what
    }

    async fn until(&self, done: impl Fn(&Store<K>, &Health) -> bool) {
        let mut health = self.health.clone();
        loop {
            if done(&self.store, &health.borrow_and_update()) {
                return;
            }
            if health.changed().await.is_err() {
                // The watch ended: nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl<K> std::fmt::Debug for Watched<K>
where
    K: kube::Resource + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("what", &self.what).finish()
    }
}

/// Where a watch keeps its figures.
struct Tallied<K: Object> {
    tally: Tally,
    name: &'static str,
    writer: u64,
    store: Store<K>,
}

/// Drives the watch (the reflector keeps the store), noting what it goes through.
async fn follow<K, S>(events: S, told: watch::Sender<Health>, what: String, tallied: Tallied<K>)
where
    K: Object,
    S: tokio_stream::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let (mut failed, mut relisted) = (false, false);
        // The tally is noted before those waiting on the health are woken: what they read
        // next is no older.
        told.send_modify(|health| {
            match event {
                // Sent before a list is asked for: nothing has come through yet.
                Ok(Event::Init) => {}
                Ok(Event::InitDone) => {
                    health.listed = true;
                    health.failed = None;
                }
                // Only a list come through in full, or a change, shows the watch well again.
                Ok(Event::InitApply(_)) => {}
                Ok(Event::Apply(_) | Event::Delete(_)) => health.failed = None,
                // Too far behind (410 Gone): kube-runtime lists again, which is no failure.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::debug!(what, "watch too far behind; listing again");
                    relisted = true;
                }
                Err(e) => {
                    let why = failure(&what, &e);
                    tracing::warn!(%why, "watching the Kubernetes API");
                    health.failed = Some((why, Instant::now()));
                    failed = true;
                }
            }
            (tallied.tally).note(tallied.name, tallied.writer, |figures| {
                figures.listed = health.listed;
                figures.objects = tallied.store.len();
                figures.failures += u64::from(failed);
                figures.relists += u64::from(relisted);
                figures.failed_at = health.failed.as_ref().map(|(_, at)| *at);
            });
        });
    }
}

/// Whether a failure at `at` is still told ([`TROUBLE_TOLD_FOR`]).
fn still_told(at: Instant) -> bool {
    at.elapsed() < TROUBLE_TOLD_FOR
}

/// What a watch's failure means, naming what was watched, with a hint when the agent may not
/// do it. Pure.
fn failure(what: &str, e: &watcher::Error) -> String {
    let (doing, code, said) = match e {
        watcher::Error::InitialListFailed(e) => ("listing", api_code(e), e.to_string()),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            ("watching", api_code(e), e.to_string())
        }
        watcher::Error::WatchError(status) => ("watching", Some(status.code), status.to_string()),
        e => ("watching", None, e.to_string()),
    };
    let hint = match code {
        Some(403) => {
            " (does the agent's Role allow list and watch? deploy/kubernetes/cluster.yaml has the rules)"
        }
        _ => "",
    };
    format!("{doing} {what}: {said}{hint}")
}

/// The status code the API answered with, if the error is an answer of the API.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether `seen` is `answered` (a write's answer) or a later version of it: the same object
/// (uid), at its generation or a later one. Pure.
pub fn at_least<K: kube::Resource>(seen: &K, answered: &K) -> bool {
    let (seen, answered) = (seen.meta(), answered.meta());
    seen.uid == answered.uid && seen.generation >= answered.generation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_started_anew_under_a_name_writes_its_figures_and_the_counters_carry_on() {
        let tally = Tally::default();
        let first = tally.start("pods");
        tally.note("pods", first, |f| {
            f.listed = true;
            f.objects = 4;
            f.failures = 2;
            f.relists = 1;
            f.failed_at = Some(Instant::now());
        });
        let second = tally.start("pods");
        let figures = |tally: &Tally| tally.figures()["pods"].clone();
        let started = figures(&tally);
        assert_eq!((started.listed, started.objects), (false, 0));
        assert_eq!((started.failures, started.relists), (2, 1));
        assert!(!started.failing());

        // The watch it replaced, not yet ended, writes nothing more.
        tally.note("pods", first, |f| f.objects = 9);
        assert_eq!(figures(&tally).objects, 0);
        tally.note("pods", second, |f| f.objects = 1);
        assert_eq!(figures(&tally).objects, 1);
    }
}
