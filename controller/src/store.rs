//! What the controller keeps: fleets, releases with their engine state, history, the manifest
//! each was started with, the last desired state of every region, answered requests, and the
//! epoch. Ended releases beyond `--keep-releases` of a service are forgotten with their
//! history and manifest (`Store::forget`); answers a day (`answer.rs`). Two stores keep it: the embedded
//! one (redb, one file; the default) and etcd, for controllers that stand in for each other
//! (`etcd.rs` in this directory, with `leader.rs`).
//!
//! Every change to a release is one transaction: its new state, its new history events, the
//! desired states it sends and the answer to the request that made it are durable together,
//! before any of it leaves the controller.

pub mod answer;
mod embedded;
mod etcd;

pub use embedded::Embedded;
pub use etcd::EtcdStore;

use std::sync::Arc;

use fleet_engine::{HistoryEvent, State};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredFleet {
    pub service: String,
    pub manifest: String,
    pub applied_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredRelease {
    pub service: String,
    pub started_at_ms: i64,
    /// How many history events the release has.
    pub history_len: u64,
    /// The strategy the release was started with instead of the manifest's.
    #[serde(default)]
    pub strategy_override: Option<String>,
    pub state: State,
}

/// One release's change, written in one transaction.
pub struct ReleaseChange<'a> {
    pub id: &'a str,
    pub release: &'a StoredRelease,
    /// New history events with their indexes.
    pub events: &'a [(u64, HistoryEvent)],
    /// New desired states, encoded, by region.
    pub desired: &'a [(String, Vec<u8>)],
    /// The service's version once the release has succeeded.
    pub version: Option<(&'a str, &'a str)>,
    /// In the release's first change: the fleet manifest it was started with (its source),
    /// which it runs on to its end, whatever is applied after.
    pub manifest: Option<&'a str>,
    /// The answer to the request that made the change, by the request's key: kept with it,
    /// so that a repeat of the request is answered and never made again.
    pub answer: Option<(&'a str, &'a [u8])>,
}

/// A store. Calls block until the change is durable (or the answer read); they are made with
/// the controller's lock held, as a change and its effects must be in one order.
pub trait Store: Send + Sync {
    /// A new epoch, larger than every earlier one, for this controller's term.
    fn next_epoch(&self) -> anyhow::Result<u64>;
    /// A new release id number.
    fn next_release_number(&self) -> anyhow::Result<u64>;
    fn put_fleet(&self, fleet: &StoredFleet) -> anyhow::Result<()>;
    fn fleets(&self) -> anyhow::Result<Vec<StoredFleet>>;
    fn save_release(&self, change: ReleaseChange<'_>) -> anyhow::Result<()>;
    fn put_desired(&self, region: &str, bytes: &[u8]) -> anyhow::Result<()>;
    fn releases(&self) -> anyhow::Result<Vec<(String, StoredRelease)>>;
    /// Forgets the releases `ids`: each one's record, manifest and history.
    fn forget(&self, ids: &[String]) -> anyhow::Result<()>;
    /// The fleet manifest release `id` was started with; none for one stored before
    /// releases kept theirs.
    fn release_manifest(&self, id: &str) -> anyhow::Result<Option<String>>;
    /// A release's history from index `from` on.
    fn history(&self, id: &str, from: u64) -> anyhow::Result<Vec<(u64, HistoryEvent)>>;
    fn desired(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
    fn version(&self, service: &str) -> anyhow::Result<Option<String>>;
    /// The answer already given to `request_id`, if any, as kept (`answer::kept`).
    fn answered(&self, request_id: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Keeps `kept`, an answer as `answer::kept` makes it, for `request_id`.
    fn answer(&self, request_id: &str, kept: &[u8]) -> anyhow::Result<()>;
    /// Forgets the answers given before `before_ms`, and stamps with `now_ms` those kept
    /// without a stamp (`answer::sweep`); how many it forgot. Writes only if there is
    /// something to change.
    fn forget_answers(&self, before_ms: i64, now_ms: i64) -> anyhow::Result<usize>;
    /// Tells once the store takes no more writes, and why.
    fn lost(&self) -> &Lost;
    /// Writes the store's own metrics (Prometheus text), if it has any.
    fn metrics(&self, _out: &mut String) {}
}

/// Whether a store has stopped taking writes, and why. After a write that failed (its outcome
/// unknown, or the file broken) or that etcd refused (another controller leads), what the
/// controller holds may be ahead of what the store has: a later write could store a state
/// without the failed one's changes. So the store refuses every write after that, and the
/// controller stops serving and starts over from what the store has.
#[derive(Clone)]
pub struct Lost(Arc<watch::Sender<Option<String>>>);

impl Default for Lost {
    fn default() -> Lost {
        Lost(Arc::new(watch::channel(None).0))
    }
}

impl Lost {
    /// The store takes no more writes, for `why` (the first reason given stands).
    pub fn lose(&self, why: String) {
        self.0.send_if_modified(|lost| {
            let first = lost.is_none();
            if first {
                *lost = Some(why);
            }
            first
        });
    }

    /// Why the store takes no more writes, if it does not.
    pub fn why(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Resolves with why, once the store takes no more writes.
    pub async fn wait(&self) -> String {
        let mut lost = self.0.subscribe();
        let why = lost.wait_for(Option::is_some).await;
        why.map_or_else(|_| "stopped".into(), |why| why.clone().unwrap_or_default())
    }
}

/// What the stores' tests share.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod fixtures {
    use fleet_engine::HistoryEvent;

    use super::*;

    pub fn event(reason: String) -> HistoryEvent {
        HistoryEvent {
            at: chrono::Utc::now(),
            actor: "t".into(),
            region: None,
            what: fleet_engine::What::ReleaseStarted,
            reason,
        }
    }

    pub fn release() -> StoredRelease {
        let manifest = fleet::load(include_str!("../../tests/e2e/fleet.yaml"))
            .unwrap()
            .manifest;
        let spec = fleet_engine::ReleaseSpec {
            id: "e2e-1".into(),
            service: "e2e".into(),
            from_version: "v1".into(),
            to_version: "v2".into(),
            emergency: None,
            actor: "t".into(),
        };
        let engine = fleet_engine::Engine::start(manifest.into(), spec, chrono::Utc::now());
        StoredRelease {
            service: "e2e".into(),
            started_at_ms: 1,
            history_len: 12,
            strategy_override: None,
            state: engine.state().clone(),
        }
    }

    /// Keeps answers given more than a day ago, less, and without a stamp (kept before answers
    /// were stamped), and checks that a sweep forgets the first only, and stamps the last.
    pub fn forgetting_answers(store: &dyn Store) {
        use super::answer::stamped;
        let now = chrono::Utc::now().timestamp_millis();
        let day = 24 * 60 * 60 * 1000;
        // More than one etcd transaction takes.
        for i in 0..150 {
            store
                .answer(&format!("pause/old-{i}"), &stamped(now - day - 1, b"old"))
                .unwrap();
        }
        store
            .answer("pause/new", &stamped(now - 1, b"new"))
            .unwrap();
        store.answer("pause/unstamped", b"\x0a\x01c").unwrap();
        assert_eq!(store.forget_answers(now - day, now).unwrap(), 150);
        assert_eq!(store.answered("pause/old-0").unwrap(), None);
        assert_eq!(store.answered("pause/old-149").unwrap(), None);
        let new = store.answered("pause/new").unwrap();
        assert_eq!(new, Some(stamped(now - 1, b"new")));
        let unstamped = store.answered("pause/unstamped").unwrap();
        assert_eq!(unstamped, Some(stamped(now, b"\x0a\x01c")));
        // Stamped now, it is kept for a day from now.
        assert_eq!(store.forget_answers(now - day + 1, now + 1).unwrap(), 0);
        assert!(store.answered("pause/unstamped").unwrap().is_some());
    }

    /// Stores two releases with history and manifests, forgets the first, and checks that
    /// nothing of it is left and the second is whole.
    pub fn forgetting(store: &dyn Store) {
        let events: Vec<_> = (0..7).map(|i| (i, event(format!("e{i}")))).collect();
        // e2e-1 is a prefix of e2e-10's keys.
        for id in ["e2e-1", "e2e-10"] {
            let change = ReleaseChange {
                id,
                release: &release(),
                events: &events,
                desired: &[],
                version: None,
                manifest: Some("m"),
                answer: None,
            };
            store.save_release(change).unwrap();
        }
        store.forget(&["e2e-1".into()]).unwrap();
        let ids: Vec<String> = store.releases().unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(ids, ["e2e-10"]);
        assert!(store.history("e2e-1", 0).unwrap().is_empty());
        assert_eq!(store.release_manifest("e2e-1").unwrap(), None);
        assert_eq!(store.history("e2e-10", 0).unwrap().len(), 7);
        assert_eq!(
            store.release_manifest("e2e-10").unwrap().as_deref(),
            Some("m")
        );
    }
}
