//! The store in etcd, for controllers that stand in for each other (`leader.rs`). Keys, under
//! the prefix: `fleets/<service>`, `releases/<id>`, `manifests/<release id>`,
//! `history/<id>/<index, 20 digits>`,
//! `desired/<region>`, `requests/<request id>`, `versions/<service>`, `meta/releases`. Values
//! are what the embedded store keeps (JSON, or the encoded desired state and answer).
//!
//! Every write is one transaction that holds only while this controller still leads (its
//! [`Fence`]); one that finds it does not changes nothing, fails, and tells the controller to
//! stop. A release's change must fit in one transaction: etcd takes 128 operations in one by
//! default (`--max-txn-ops`), which is one for the release, one per history event, one per
//! region it sends a desired state to, one each for the service's version, the release's
//! manifest and a request's answer when the change carries them, and one for the write's
//! mark (`transact`). Releases are forgotten 40 to a transaction (121 operations).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, anyhow};
use fleet_engine::HistoryEvent;
use fleet_proto::etcd as pb;

use super::answer::{self, Sweep};
use super::{Lost, ReleaseChange, Store, StoredFleet, StoredRelease};
use crate::etcd::{self, Etcd};
use crate::leader::Fence;

pub struct EtcdStore {
    etcd: Etcd,
    fence: Fence,
    epoch: u64,
    counting: Mutex<()>,
    /// The revision of this controller's last write (`meta/writer`'s), once known, and how
    /// many it has made: see [`EtcdStore::transact`].
    written: Mutex<(Option<i64>, u64)>,
}

impl EtcdStore {
    /// The store of the controller that leads with `fence`, since `epoch`.
    pub fn new(etcd: Etcd, fence: Fence, epoch: u64) -> EtcdStore {
        EtcdStore {
            etcd,
            fence,
            epoch,
            counting: Mutex::new(()),
            written: Mutex::new((None, 0)),
        }
    }

    fn key(&self, table: &str, name: &str) -> Vec<u8> {
        self.etcd.key(&format!("{table}/{name}"))
    }

    /// Puts every `(key, value)` in one transaction, if this controller still leads.
    /// A key put twice keeps its last value, as in the embedded store (etcd refuses a
    /// transaction that names a key twice; a change may send a region two desired states).
    /// A write that fails (etcd unreachable, or its answer lost: it may have been made) ends
    /// the lead: what this controller holds may now be ahead of what etcd has, and the next
    /// leader, maybe this one again, starts from etcd.
    fn write(&self, puts: Vec<(Vec<u8>, Vec<u8>)>) -> anyhow::Result<()> {
        let puts: BTreeMap<Vec<u8>, Vec<u8>> = puts.into_iter().collect();
        self.transact(puts.into_iter().map(|(k, v)| etcd::put(k, v, 0)).collect())
    }

    /// Makes `ops` in one transaction, if this controller still leads; see [`Self::write`].
    ///
    /// Writes land in the order they are made. The etcd client makes a call again when a
    /// try went unanswered or its connection broke (`Etcd::call`), and such a try may yet
    /// reach etcd after the next write. So each transaction also holds only while the key
    /// `meta/writer` is as this controller's last write left it, and puts into it a mark of
    /// its own: a try that reaches etcd after a later write finds the key moved on and
    /// changes nothing, and a try made again after the first went through finds its own mark
    /// there, and is taken as made.
    fn transact(&self, mut ops: Vec<pb::RequestOp>) -> anyhow::Result<()> {
        let writer = self.key("meta", "writer");
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        // After a failed or refused write, none (a write that waited for this one's turn
        // included): later ones could make etcd hold a state without the changes the failed
        // one carried.
        if let Some(why) = self.fence.lost.why() {
            anyhow::bail!("the store writes no more: this controller is stepping down ({why})");
        }
        let last = match written.0 {
            Some(revision) => revision,
            // Not read, this write is not made, and the controller has moved on: it stops.
            None => match self.get(writer.clone()) {
                Ok(kv) => kv.map_or(0, |kv| kv.mod_revision),
                Err(e) => {
                    let why = format!("etcd could not be read before a write: {e:#}");
                    self.fence.lost.lose(why);
                    return Err(e.context("the store could not write"));
                }
            },
        };
        written.1 += 1;
        let mark = format!("{} {}", self.epoch, written.1).into_bytes();
        ops.push(etcd::put(writer.clone(), mark.clone(), 0));
        let request = pb::TxnRequest {
            compare: vec![self.fence.holds(), etcd::modified_at(writer.clone(), last)],
            success: ops,
            failure: vec![etcd::range(writer)],
        };
        let etcd = self.etcd.clone();
        match self.etcd.block_on(async move { etcd.txn(request).await }) {
            Ok(answer) if answer.succeeded => {
                written.0 = answer.header.map(|h| h.revision);
                Ok(())
            }
            Ok(answer) => match etcd::read_back(answer) {
                // Made by a try whose answer was lost.
                Some(kv) if kv.value == mark => {
                    written.0 = Some(kv.mod_revision);
                    Ok(())
                }
                _ => Err(self.deposed()),
            },
            Err(e) => {
                let why = format!("a write to etcd failed, and may or may not have been made: {e}");
                self.fence.lost.lose(why);
                Err(anyhow!("the store could not write: {e:#}"))
            }
        }
    }

    /// Tells the controller it no longer leads; the error to fail the write with.
    fn deposed(&self) -> anyhow::Error {
        let why = "another controller leads now; this one stops";
        self.fence.lost.lose(why.into());
        anyhow!("the store refused the write: {why}")
    }

    fn get(&self, key: Vec<u8>) -> anyhow::Result<Option<pb::KeyValue>> {
        let etcd = self.etcd.clone();
        self.etcd.block_on(async move { etcd.get(key).await })
    }

    /// Every value under `table/`, from `from` on, with its name.
    fn list(&self, table: &str, from: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let prefix = self.key(table, "");
        let start = if from.is_empty() {
            vec![]
        } else {
            self.key(table, from)
        };
        let etcd = self.etcd.clone();
        let list = prefix.clone();
        let kvs = self
            .etcd
            .block_on(async move { etcd.list(list, start).await })?;
        let named = kvs.into_iter().map(|kv| {
            let name = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            (name, kv.value)
        });
        Ok(named.collect())
    }

    /// Adds one to the counter `meta/name`; its new value. Only this controller writes (every
    /// write is fenced), and `counting` takes its own callers one at a time, so nothing
    /// changes the counter between the read and the write.
    fn count(&self, name: &str) -> anyhow::Result<u64> {
        let _one_at_a_time = self.counting.lock().unwrap_or_else(PoisonError::into_inner);
        let key = self.key("meta", name);
        let n = match self.get(key.clone())? {
            Some(kv) => parse_count(&kv.value)?,
            None => 0,
        };
        self.write(vec![(key, (n + 1).to_string().into_bytes())])?;
        Ok(n + 1)
    }
}

fn parse_count(value: &[u8]) -> anyhow::Result<u64> {
    let text = String::from_utf8_lossy(value);
    text.parse()
        .with_context(|| format!("the store's counter holds {text:?}, not a number"))
}

fn json<T: serde::de::DeserializeOwned>(value: &[u8]) -> anyhow::Result<T> {
    Ok(serde_json::from_slice(value)?)
}

impl Store for EtcdStore {
    fn next_epoch(&self) -> anyhow::Result<u64> {
        Ok(self.epoch)
    }

    fn next_release_number(&self) -> anyhow::Result<u64> {
        self.count("releases")
    }

    fn put_fleet(&self, fleet: &StoredFleet) -> anyhow::Result<()> {
        let key = self.key("fleets", &fleet.service);
        self.write(vec![(key, serde_json::to_vec(fleet)?)])
    }

    fn fleets(&self) -> anyhow::Result<Vec<StoredFleet>> {
        let rows = self.list("fleets", "")?;
        rows.iter().map(|(_, value)| json(value)).collect()
    }

    fn save_release(&self, change: ReleaseChange<'_>) -> anyhow::Result<()> {
        let mut puts = vec![(
            self.key("releases", change.id),
            serde_json::to_vec(change.release)?,
        )];
        for (index, event) in change.events {
            let key = self.key("history", &format!("{}/{index:020}", change.id));
            puts.push((key, serde_json::to_vec(event)?));
        }
        for (region, bytes) in change.desired {
            puts.push((self.key("desired", region), bytes.clone()));
        }
        if let Some((service, version)) = change.version {
            puts.push((self.key("versions", service), version.as_bytes().to_vec()));
        }
        if let Some(manifest) = change.manifest {
            let key = self.key("manifests", change.id);
            puts.push((key, manifest.as_bytes().to_vec()));
        }
        if let Some((request, answer)) = change.answer {
            puts.push((self.key("requests", request), answer.to_vec()));
        }
        self.write(puts)
    }

    fn put_desired(&self, region: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.write(vec![(self.key("desired", region), bytes.to_vec())])
    }

    fn releases(&self) -> anyhow::Result<Vec<(String, StoredRelease)>> {
        let rows = self.list("releases", "")?;
        rows.into_iter()
            .map(|(id, value)| Ok((id, json(&value)?)))
            .collect()
    }

    fn forget(&self, ids: &[String]) -> anyhow::Result<()> {
        // Three operations a release, in transactions under etcd's default limit of 128.
        for some in ids.chunks(40) {
            let mut ops = Vec::new();
            for id in some {
                ops.push(etcd::delete(self.key("releases", id), vec![]));
                ops.push(etcd::delete(self.key("manifests", id), vec![]));
                let history = self.key("history", &format!("{id}/"));
                let end = etcd::prefix_end(&history);
                ops.push(etcd::delete(history, end));
            }
            self.transact(ops)?;
        }
        Ok(())
    }

    fn release_manifest(&self, id: &str) -> anyhow::Result<Option<String>> {
        let kv = self.get(self.key("manifests", id))?;
        Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    fn history(&self, id: &str, from: u64) -> anyhow::Result<Vec<(u64, HistoryEvent)>> {
        let rows = self.list(&format!("history/{id}"), &format!("{from:020}"))?;
        let event = |(index, value): (String, Vec<u8>)| {
            let index = index.parse()?;
            Ok((index, json(&value)?))
        };
        rows.into_iter().map(event).collect()
    }

    fn desired(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        self.list("desired", "")
    }

    fn version(&self, service: &str) -> anyhow::Result<Option<String>> {
        let kv = self.get(self.key("versions", service))?;
        Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    fn answered(&self, request_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .get(self.key("requests", request_id))?
            .map(|kv| kv.value))
    }

    fn answer(&self, request_id: &str, kept: &[u8]) -> anyhow::Result<()> {
        self.write(vec![(self.key("requests", request_id), kept.to_vec())])
    }

    fn forget_answers(&self, before_ms: i64, now_ms: i64) -> anyhow::Result<usize> {
        let mut ops = Vec::new();
        let mut forgot = 0;
        for (name, kept) in self.list("requests", "")? {
            let key = self.key("requests", &name);
            match answer::sweep(&kept, before_ms, now_ms) {
                Sweep::Keep => {}
                Sweep::Forget => {
                    forgot += 1;
                    ops.push(etcd::delete(key, vec![]));
                }
                Sweep::Stamp(stamped) => ops.push(etcd::put(key, stamped, 0)),
            }
        }
        for some in etcd::in_transactions(ops, etcd::op_size) {
            self.transact(some)?;
        }
        Ok(forgot)
    }

    fn lost(&self) -> &Lost {
        &self.fence.lost
    }

    fn metrics(&self, out: &mut String) {
        if let Some(refused) = self.etcd.password_file_refused() {
            let name = "fleet_controller_etcd_password_file_refused";
            let _ = writeln!(
                out,
                "# HELP {name} 1 while etcd refuses the password in --etcd-password-file (or it \
                 cannot be read) and the controller authenticates with the one etcd last took, \
                 which it forgets when it restarts.\n# TYPE {name} gauge\n{name} {}",
                u8::from(refused)
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::watch;

    use super::*;
    use fleet_proto::connect::ClientTls;

    use crate::etcd::EtcdOptions;
    use crate::leader::{self, Campaign, Leadership};
    use crate::store::fixtures::{self, event, release};

    /// The tests' real etcd (Debian's etcd-server), shared with the end-to-end tests.
    mod server {
        include!("../../../tests/src/etcd.rs");
    }

    /// The options of the tests' store: etcd at `endpoints`, under `/test/`, as `user` (and
    /// password) if given.
    fn options(endpoints: Vec<String>, user: Option<(&str, &str)>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: "/test/".into(),
            tls: Default::default(),
            user: user.map(|(user, password)| crate::etcd::Credentials {
                user: user.into(),
                password: crate::etcd::Password::Given(password.into()),
            }),
        }
    }

    fn connect(server: &server::Etcd) -> Etcd {
        Etcd::connect(&options(vec![server.url.clone()], None)).unwrap()
    }

    fn campaign(name: &str, ttl: Duration) -> Campaign {
        Campaign {
            us: leader::Holder {
                name: name.into(),
                grpc: format!("{name}:7070"),
            },
            ttl,
        }
    }

    async fn lead(etcd: &Etcd, name: &str) -> Leadership {
        lead_for(etcd, name, Duration::from_secs(2)).await
    }

    /// [`lead`] with a lease of `ttl`.
    async fn lead_for(etcd: &Etcd, name: &str, ttl: Duration) -> Leadership {
        let campaign = campaign(name, ttl);
        leader::campaign(etcd, &campaign, &watch::channel(None).0, &mut None).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_embedded_store_keeps_etcd_keeps_under_the_prefix() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leadership = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leadership.fence.clone(), leadership.epoch);
        assert_eq!(store.next_release_number().unwrap(), 1);
        assert_eq!(store.next_release_number().unwrap(), 2);
        let fleet = StoredFleet {
            service: "checkout".into(),
            manifest: "m".into(),
            applied_at_ms: 3,
        };
        store.put_fleet(&fleet).unwrap();
        assert_eq!(store.fleets().unwrap()[0].manifest, "m");
        let release = release();
        // 12 events: three pages of keys in tests.
        let events: Vec<_> = (0..12).map(|i| (i, event(format!("e{i}")))).collect();
        // A change may send a region two desired states (a step, then a rollback): the last.
        let desired = [
            ("us-west".to_string(), vec![0]),
            ("eu".to_string(), vec![3]),
            ("us-west".to_string(), vec![1, 2]),
        ];
        store
            .save_release(ReleaseChange {
                id: "checkout-1",
                release: &release,
                events: &events,
                desired: &desired,
                version: Some(("checkout", "v2")),
                manifest: Some("service: checkout"),
                answer: Some(("start_release/r1", &[7])),
            })
            .unwrap();
        let answered = store.answered("start_release/r1").unwrap();
        assert_eq!(answered.as_deref(), Some(&[7][..]), "kept with the change");
        let releases = store.releases().unwrap();
        assert_eq!(releases.len(), 1);
        assert_eq!(releases[0].0, "checkout-1");
        let manifest = store.release_manifest("checkout-1").unwrap();
        assert_eq!(manifest.as_deref(), Some("service: checkout"));
        assert_eq!(store.release_manifest("checkout-2").unwrap(), None);
        let history = store.history("checkout-1", 9).unwrap();
        let indexes: Vec<u64> = history.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [9, 10, 11]);
        let all = store.history("checkout-1", 0).unwrap();
        let reasons: Vec<&str> = all.iter().map(|(_, e)| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            (0..12).map(|i| format!("e{i}")).collect::<Vec<_>>()
        );
        assert_eq!(
            store.history("checkout-", 0).unwrap().len(),
            0,
            "ids do not run into each other"
        );
        assert_eq!(
            store.desired().unwrap(),
            [("eu".into(), vec![3]), ("us-west".into(), vec![1, 2])]
        );
        store.put_desired("eu", &[4]).unwrap();
        assert_eq!(store.desired().unwrap()[0].1, [4]);
        assert_eq!(store.version("checkout").unwrap().as_deref(), Some("v2"));
        assert_eq!(store.version("other").unwrap(), None);
        assert_eq!(store.answered("r1").unwrap(), None);
        store.answer("r1", b"done").unwrap();
        assert_eq!(store.answered("r1").unwrap().as_deref(), Some(&b"done"[..]));
        // Everything is under the prefix: another prefix's controllers see none of it.
        let other = Etcd::connect(&EtcdOptions {
            prefix: "/other/".into(),
            ..options(vec![server.url.clone()], None)
        })
        .unwrap();
        let theirs = lead(&other, "b").await;
        let store = EtcdStore::new(other, theirs.fence.clone(), theirs.epoch);
        assert_eq!(store.fleets().unwrap().len(), 0);
        assert_eq!(store.next_release_number().unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_lease_is_gone_writes_nothing_once_another_leads_and_is_told_to_stop() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let old = lead(&etcd, "old").await;
        let old_store = EtcdStore::new(etcd.clone(), old.fence.clone(), old.epoch);
        old_store.put_desired("us-west", &[1]).unwrap();
        // A standby says who leads, and waits.
        let seen = watch::channel(None).0;
        let mut told = seen.subscribe();
        let new = campaign("new", Duration::from_secs(2));
        let standby = {
            let (etcd, seen) = (etcd.clone(), seen.clone());
            tokio::spawn(async move { leader::campaign(&etcd, &new, &seen, &mut None).await })
        };
        let leader = told.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(leader, Some(campaign("old", Duration::ZERO).us));
        // The old leader's lease goes as if it had been cut off for its whole time to live,
        // without its knowing: the standby takes over.
        let lease = old.stop_renewing_for_tests();
        etcd.revoke(lease).await.unwrap();
        let new = tokio::time::timeout(Duration::from_secs(10), standby)
            .await
            .unwrap()
            .unwrap();
        assert!(new.epoch > old.epoch, "{} after {}", new.epoch, old.epoch);
        let new_store = EtcdStore::new(etcd.clone(), new.fence.clone(), new.epoch);
        new_store.put_desired("us-west", &[2]).unwrap();
        // The old leader's writes change nothing, fail, and tell it to stop.
        let refused = std::thread::spawn(move || {
            let refused = old_store.put_desired("us-west", &[9]).unwrap_err();
            (refused, old_store.next_release_number().unwrap_err())
        });
        let (refused, counted) = refused.join().unwrap();
        assert!(
            refused.to_string().contains("another controller leads now"),
            "{refused}"
        );
        assert!(
            counted.to_string().contains("another controller leads now"),
            "{counted}"
        );
        let why = tokio::time::timeout(Duration::from_secs(1), old.fence.lost.wait())
            .await
            .unwrap();
        assert!(why.contains("another controller leads now"), "{why}");
        assert_eq!(new_store.desired().unwrap(), [("us-west".into(), vec![2])]);
        assert_eq!(new_store.next_release_number().unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forgotten_release_leaves_nothing_behind() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        fixtures::forgetting(&store);
        // Not a key of the release is left under the prefix.
        let left = etcd.list(b"/test/".to_vec(), vec![]).await.unwrap();
        let left: Vec<String> = (left.iter())
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        assert!(left.iter().all(|k| !k.contains("/e2e-1/")), "{left:?}");
        assert!(!left.iter().any(|k| k.ends_with("/e2e-1")), "{left:?}");
        assert!(left.iter().any(|k| k.contains("/e2e-10/")), "{left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_older_than_a_day_are_forgotten() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd, leading.fence.clone(), leading.epoch);
        fixtures::forgetting_answers(&store);
        // Stamping answers from before stamps were kept rewrites them: more bytes than one
        // request takes (1.5 MiB) go in several transactions.
        let large = vec![0x0a; 100 << 10];
        for i in 0..20 {
            store.answer(&format!("start_release/{i}"), &large).unwrap();
        }
        let now = chrono::Utc::now().timestamp_millis();
        let day = 24 * 60 * 60 * 1000;
        assert_eq!(store.forget_answers(now - day, now).unwrap(), 0);
        let kept = store.answered("start_release/19").unwrap().unwrap();
        assert_eq!(kept, crate::store::answer::stamped(now, &large));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_import_that_stops_halfway_leaves_no_controller_leading_on_what_it_copied() {
        use crate::store::Embedded;
        let dir = tempfile::tempdir().unwrap();
        let embedded = Embedded::open(dir.path()).unwrap();
        // 100 small keys first, then a manifest larger than this etcd takes in a request.
        for i in 0..100 {
            let fleet = StoredFleet {
                service: format!("s{i:03}"),
                manifest: "m".into(),
                applied_at_ms: 1,
            };
            embedded.put_fleet(&fleet).unwrap();
        }
        let manifest = "#".repeat(300 << 10);
        let change = ReleaseChange {
            id: "s000-1",
            release: &release(),
            events: &[],
            desired: &[],
            version: None,
            manifest: Some(&manifest),
            answer: None,
        };
        embedded.save_release(change).unwrap();
        drop(embedded);
        let server = server::Etcd::start_args(&["--max-request-bytes", "200000"]).unwrap();
        let options = options(vec![server.url.clone()], None);
        let stopped = crate::import_data(dir.path(), &options).unwrap_err();
        let said = format!("{stopped:#}");
        assert!(
            said.contains("the import stopped after 1 transactions")
                && said.contains("etcdctl del --prefix /test/"),
            "{said}"
        );
        // What it copied is held by the import's leader key: a controller stands by.
        let etcd = connect(&server);
        let held = etcd.get(etcd.key("leader")).await.unwrap().unwrap();
        assert_eq!(held.lease, 0);
        let led = tokio::time::timeout(Duration::from_secs(3), lead(&etcd, "a")).await;
        assert!(led.is_err(), "a controller led on half a copy");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_releases_than_one_transaction_takes_are_forgotten_at_once() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        // 3 operations each: 150 releases would be 450 in one, over etcd's 128.
        let ids: Vec<String> = (1..=150).map(|n| format!("e2e-{n}")).collect();
        for id in &ids {
            let change = ReleaseChange {
                id,
                release: &release(),
                events: &[(0, event("e".into()))],
                desired: &[],
                version: None,
                manifest: Some("m"),
                answer: None,
            };
            store.save_release(change).unwrap();
        }
        store.forget(&ids).unwrap();
        assert!(store.releases().unwrap().is_empty());
        assert!(store.history("e2e-150", 0).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_embedded_store_imported_into_etcd_reads_back_as_it_was() {
        use crate::store::Embedded;
        let dir = tempfile::tempdir().unwrap();
        let embedded = Embedded::open(dir.path()).unwrap();
        for _ in 0..3 {
            embedded.next_release_number().unwrap();
            embedded.next_epoch().unwrap();
        }
        for service in ["checkout", "search"] {
            let fleet = StoredFleet {
                service: service.into(),
                manifest: format!("service: {service}"),
                applied_at_ms: 3,
            };
            embedded.put_fleet(&fleet).unwrap();
        }
        // 150 events: more than one transaction takes.
        let events: Vec<_> = (0..150).map(|i| (i, event(format!("e{i}")))).collect();
        let changes = [
            (
                "checkout-1",
                &events[..],
                Some(("checkout", "v2")),
                Some("m1"),
            ),
            ("checkout-3", &events[..5], None, None),
        ];
        for (id, events, version, manifest) in changes {
            let change = ReleaseChange {
                id,
                release: &release(),
                events,
                desired: &[("us-west".to_string(), vec![1, 2])],
                version,
                manifest,
                answer: Some((&format!("start_release/{id}"), &[7])),
            };
            embedded.save_release(change).unwrap();
        }
        embedded.put_desired("eu", &[4]).unwrap();
        embedded.answer("apply_fleet/a", b"done").unwrap();
        // Not while a controller has the file open.
        let server = server::Etcd::start().unwrap();
        let options = options(vec![server.url.clone()], None);
        let in_use = crate::import_data(dir.path(), &options).unwrap_err();
        assert!(
            format!("{in_use:#}").contains("stop it first"),
            "{in_use:#}"
        );
        drop(embedded);
        let imported = crate::import_data(dir.path(), &options).unwrap();
        let expected = crate::Imported {
            fleets: 2,
            releases: 2,
            events: 155,
            desired: 2,
            answers: 3,
            keys: 2 + 2 + 155 + 2 + 3 + 1 + 1 + 1,
            // The leader key's and 100 keys, 67 keys, the leader key deleted.
            transactions: 3,
        };
        assert_eq!(imported, expected);
        // Into a prefix that holds something: refused, and nothing is changed.
        let again = crate::import_data(dir.path(), &options).unwrap_err();
        assert!(
            format!("{again:#}").contains("etcd already holds 167 keys under the prefix /test/"),
            "{again:#}"
        );
        let nowhere = crate::import_data(&dir.path().join("nothing"), &options).unwrap_err();
        assert!(
            format!("{nowhere:#}").contains("there is no store here"),
            "{nowhere:#}"
        );

        // What the controllers on etcd read is what the embedded store holds.
        let embedded = Embedded::open(dir.path()).unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd, leading.fence.clone(), leading.epoch);
        let both = |f: &dyn Fn(&dyn Store) -> String| (f(&embedded), f(&store));
        let (a, b) = both(&|s| serde_json::to_string(&s.fleets().unwrap()).unwrap());
        assert_eq!(a, b);
        let (a, b) = both(&|s| serde_json::to_string(&s.releases().unwrap()).unwrap());
        assert_eq!(a, b);
        for id in ["checkout-1", "checkout-3"] {
            let (a, b) = both(&|s| serde_json::to_string(&s.history(id, 0).unwrap()).unwrap());
            assert_eq!(a, b, "{id}");
            let (a, b) = both(&|s| format!("{:?}", s.release_manifest(id).unwrap()));
            assert_eq!(a, b, "{id}");
            let key = format!("start_release/{id}");
            let (a, b) = both(&|s| format!("{:?}", s.answered(&key).unwrap()));
            assert_eq!(a, b, "{id}");
        }
        let (a, b) = both(&|s| format!("{:?}", s.desired().unwrap()));
        assert_eq!(a, b);
        let (a, b) = both(&|s| format!("{:?}", s.version("checkout").unwrap()));
        assert_eq!((a.as_str(), b.as_str()), ("Some(\"v2\")", "Some(\"v2\")"));
        let (a, b) = both(&|s| format!("{:?}", s.answered("apply_fleet/a").unwrap()));
        assert_eq!(a, b);
        // Releases are numbered on from the embedded store's count.
        assert_eq!(store.next_release_number().unwrap(), 4);
    }

    /// A connection to `server` as `user` with `password`.
    fn connect_as(server: &server::Etcd, user: &str, password: &str) -> Etcd {
        Etcd::connect(&options(vec![server.url.clone()], Some((user, password)))).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_etcd_that_asks_for_a_user_is_used_as_one_and_a_stale_token_is_renewed() {
        // Tokens last a second unused; passwords are hashed cheaply.
        let args = ["--auth-token-ttl", "1", "--bcrypt-cost", "4"];
        let server = server::Etcd::start_args(&args).unwrap();
        let plain = connect(&server);
        plain.enable_auth_for_tests("root", "secret").await.unwrap();
        let key = || b"/test/desired/us-west".to_vec();
        // Without a user: refused, saying why.
        let refused = plain.get(key()).await.unwrap_err().to_string();
        assert!(refused.contains("user name is empty"), "{refused}");
        // With a wrong password: told which user, and where its password comes from.
        let wrong = connect_as(&server, "root", "nope");
        let told = wrong.get(key()).await.unwrap_err().to_string();
        assert!(
            told.contains("did not authenticate user \"root\""),
            "{told}"
        );
        assert!(told.contains("--etcd-password-file"), "{told}");
        // As the user: a leader that writes, and another connection that reads.
        let etcd = connect_as(&server, "root", "secret");
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        store.put_desired("us-west", &[1]).unwrap();
        let idle = connect_as(&server, "root", "secret");
        assert!(idle.get(key()).await.unwrap().is_some());
        // Unused for longer than a token lasts, that one's is no longer taken: the next call
        // takes a new token and goes through.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(idle.get(key()).await.unwrap().is_some());
        // The leader, busy renewing its lease all along, still leads and writes.
        store.put_desired("us-west", &[2]).unwrap();
        assert!(leading.fence.lost.why().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_password_renewed_in_its_file_then_in_etcd_is_taken_with_no_call_failing() {
        // Tokens last a second unused; passwords are hashed cheaply.
        let args = ["--auth-token-ttl", "1", "--bcrypt-cost", "4"];
        let server = server::Etcd::start_args(&args).unwrap();
        let plain = connect(&server);
        (plain
            .add_prefix_user_for_tests("fleet", "old", b"/test/")
            .await)
            .unwrap();
        plain.enable_auth_for_tests("root", "secret").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "old\n").unwrap();
        let user = crate::etcd::Credentials {
            user: "fleet".into(),
            password: crate::etcd::Password::File(file.clone()),
        };
        let options = EtcdOptions {
            user: Some(user),
            ..options(vec![server.url.clone()], None)
        };
        let etcd = Etcd::connect(&options).unwrap();
        let key = || b"/test/x".to_vec();
        assert!(etcd.get(key()).await.unwrap().is_none());
        // Waits for the token to be no longer taken (unused for longer than it lasts), so that
        // the next call authenticates.
        let token_ends = || tokio::time::sleep(Duration::from_secs(3));

        // Renewed in the file first (the Secret), which etcd refuses yet: the last password
        // it took is used.
        std::fs::write(&file, "new\n").unwrap();
        token_ends().await;
        assert!(etcd.get(key()).await.unwrap().is_none());
        assert_eq!(etcd.password_file_refused(), Some(true));
        // Then in etcd, which ends the user's tokens: the file's is taken at once.
        let root = connect_as(&server, "root", "secret");
        root.change_password_for_tests("fleet", "new")
            .await
            .unwrap();
        assert!(etcd.get(key()).await.unwrap().is_none());
        assert_eq!(etcd.password_file_refused(), Some(false));
        // A file being written (empty for a moment): the last password taken again.
        std::fs::write(&file, "").unwrap();
        token_ends().await;
        assert!(etcd.get(key()).await.unwrap().is_none());
        // Gone, and the password changed in etcd: told, naming the file.
        std::fs::remove_file(&file).unwrap();
        root.change_password_for_tests("fleet", "newer")
            .await
            .unwrap();
        let told = format!("{:#}", etcd.get(key()).await.unwrap_err());
        assert!(
            told.contains(&format!(
                "--etcd-password-file {}: cannot read it",
                file.display()
            )),
            "{told}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_user_that_may_read_and_write_the_prefix_only_is_all_a_controller_needs() {
        let server = server::Etcd::start_args(&["--bcrypt-cost", "4"]).unwrap();
        let plain = connect(&server);
        plain
            .add_prefix_user_for_tests("fleet", "pw", b"/test/")
            .await
            .unwrap();
        plain.enable_auth_for_tests("root", "secret").await.unwrap();
        // The user may do nothing outside the prefix.
        let etcd = connect_as(&server, "fleet", "pw");
        let denied = |e: anyhow::Error| format!("{e:#}").contains("permission denied");
        let outside = etcd.get(b"/other/x".to_vec()).await.unwrap_err();
        assert!(denied(outside));
        let put = fleet_proto::etcd::TxnRequest {
            compare: vec![],
            success: vec![crate::etcd::put(b"/other/x".to_vec(), vec![1], 0)],
            failure: vec![],
        };
        assert!(denied(etcd.txn(put).await.unwrap_err()));
        // An import into the prefix.
        let dir = tempfile::tempdir().unwrap();
        let embedded = crate::store::Embedded::open(dir.path()).unwrap();
        let fleet = StoredFleet {
            service: "checkout".into(),
            manifest: "m".into(),
            applied_at_ms: 1,
        };
        embedded.put_fleet(&fleet).unwrap();
        drop(embedded);
        let options = options(vec![server.url.clone()], Some(("fleet", "pw")));
        crate::import_data(dir.path(), &options).unwrap();
        // A leader, its writes, forgetting releases and answers, and giving the lead up (its
        // lease outlives the test: only revoking it ends it).
        let leading = lead_for(&etcd, "a", Duration::from_secs(60)).await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        assert_eq!(store.fleets().unwrap().len(), 1);
        assert_eq!(store.next_release_number().unwrap(), 1);
        // Its password taken: the metric that would say otherwise is 0.
        let mut metrics = String::new();
        store.metrics(&mut metrics);
        assert!(
            metrics.contains("\nfleet_controller_etcd_password_file_refused 0\n"),
            "{metrics}"
        );
        fixtures::forgetting(&store);
        fixtures::forgetting_answers(&store);
        store.put_desired("us-west", &[1]).unwrap();
        assert!(leading.fence.lost.why().is_none());
        let epoch = leading.epoch;
        leading.resign().await;
        let next = tokio::time::timeout(Duration::from_secs(3), lead(&etcd, "b")).await;
        assert!(next.unwrap().epoch > epoch, "the lead was not given up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_writes_on_through_the_loss_of_any_one_etcd_member_of_three() {
        // The member that leads etcd's cluster killed, or stopped (it hands over), then one
        // that follows killed.
        for (leads, killed) in [(true, true), (true, false), (false, true)] {
            let mut cluster = server::Cluster::start(3).unwrap();
            let (_, leading, store) = leading_on(cluster.urls.clone()).await;
            let started = std::time::Instant::now();
            let mut lost = None;
            for i in 0..60u8 {
                if i == 20 {
                    let leader = cluster.leader().unwrap();
                    let member = if leads { leader } else { (leader + 1) % 3 };
                    match killed {
                        true => cluster.kill(member),
                        false => cluster.stop(member).unwrap(),
                    }
                    lost = Some(member);
                }
                let written = {
                    let store = &store;
                    tokio::task::block_in_place(|| store.put_desired("us-west", &[i]))
                };
                assert!(written.is_ok(), "{lost:?} lost, write {i}: {written:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(leading.fence.lost.why().is_none(), "{lost:?}");
            assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![59])]);
            println!(
                "member {lost:?} (leading etcd: {leads}, killed: {killed}) lost: 60 writes in {:?}",
                started.elapsed()
            );
        }
    }

    /// A store of a controller that leads on the etcd at `endpoints`, with a lease that
    /// outlives an election on a busy machine (10 s).
    async fn leading_on(endpoints: Vec<String>) -> (Etcd, Leadership, EtcdStore) {
        let etcd = Etcd::connect(&options(endpoints, None)).unwrap();
        let leading = lead_for(&etcd, "a", Duration::from_secs(10)).await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        (etcd, leading, store)
    }

    const NEEDLE: &[u8] = b"desired/us-west";

    /// Test-only: a relay to `to` on 127.0.0.1; once `cut` is set, the next request a client
    /// sends that names [`NEEDLE`] goes on, and then (a moment later, etcd's answer held
    /// back) that client's connection is closed, as a connection lost after a request but
    /// before its answer.
    /// It counts the connections it took in `taken`.
    async fn relay(
        to: std::net::SocketAddr,
        cut: Arc<AtomicBool>,
        taken: Arc<std::sync::atomic::AtomicUsize>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                taken.fetch_add(1, Ordering::SeqCst);
                let server = tokio::net::TcpStream::connect(to).await.unwrap();
                let cut = cut.clone();
                tokio::spawn(async move {
                    let (mut client_in, mut client_out) = client.into_split();
                    let (mut server_in, mut server_out) = server.into_split();
                    // Answers go back until `held`; then they are read and dropped, and the
                    // client's connection stays open, so that it waits for its answer.
                    let held = Arc::new(AtomicBool::new(false));
                    let holding = held.clone();
                    let answers = tokio::spawn(async move {
                        let mut buf = vec![0; 64 << 10];
                        while let Ok(n @ 1..) = server_in.read(&mut buf).await {
                            if !holding.load(Ordering::SeqCst)
                                && client_out.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                        client_out
                    });
                    let mut buf = vec![0; 64 << 10];
                    while let Ok(n @ 1..) = client_in.read(&mut buf).await {
                        let request = &buf[..n];
                        let ours = request.windows(NEEDLE.len()).any(|w| w == NEEDLE);
                        // No answer back, before the request can be answered.
                        let cutting = ours && cut.swap(false, Ordering::SeqCst);
                        if cutting {
                            held.store(true, Ordering::SeqCst);
                        }
                        if server_out.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if cutting {
                            // The rest of the request goes on for a moment.
                            let rest = async {
                                while let Ok(n @ 1..) = client_in.read(&mut buf).await {
                                    let _ = server_out.write_all(&buf[..n]).await;
                                }
                            };
                            let _ = tokio::time::timeout(Duration::from_secs(1), rest).await;
                            answers.abort();
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_answer_was_lost_is_made_again_and_taken_as_made() {
        let server = server::Etcd::start().unwrap();
        let at = server.url.trim_start_matches("http://").parse().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let relayed = relay(at, cut.clone(), taken.clone()).await;
        let (etcd, leading, store) = leading_on(vec![relayed]).await;
        store.put_desired("us-west", &[1]).unwrap();
        // The write reaches etcd and is made; its answer is lost with the connection. Made
        // again, it finds its own mark: taken as made, the lead kept.
        let before = etcd.get(etcd.key("meta/writer")).await.unwrap().unwrap();
        cut.store(true, Ordering::SeqCst);
        let written = tokio::task::block_in_place(|| store.put_desired("us-west", &[2]));
        assert!(written.is_ok(), "{written:?}");
        assert!(!cut.load(Ordering::SeqCst), "no connection was cut");
        assert!(
            taken.load(Ordering::SeqCst) >= 2,
            "not made again on a new connection"
        );
        assert!(leading.fence.lost.why().is_none());
        let after = etcd.get(etcd.key("meta/writer")).await.unwrap().unwrap();
        assert!(after.mod_revision > before.mod_revision);
        assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![2])]);
        // And the next write lands after it.
        store.put_desired("us-west", &[3]).unwrap();
        assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![3])]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_the_lead_is_lost_for_any_reason_nothing_more_is_written() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        store.put_desired("us-west", &[1]).unwrap();
        // As after a write whose answer never came: etcd would still take the next one.
        leading.fence.lost.lose("a write to etcd failed".into());
        let refused = store.put_desired("us-west", &[2]).unwrap_err().to_string();
        assert!(
            refused.contains("stepping down (a write to etcd failed)"),
            "{refused}"
        );
        assert!(store.next_release_number().is_err());
        assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![1])]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_etcd_hangs_steps_down_before_its_lease_can_run_out() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        let leading = lead(&etcd, "a").await;
        // Renewals go unanswered rather than refused: each would wait 5 s for its answer.
        server.freeze();
        let cut = std::time::Instant::now();
        // The lease lives 2 s from the last renewal, at most 0.67 s before the cut.
        let why = tokio::time::timeout(Duration::from_secs(2), leading.fence.lost.wait())
            .await
            .unwrap();
        assert!(why.contains("could not be renewed in time"), "{why}");
        println!("stepped down {:?} after etcd hung", cut.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lead_won_as_etcd_answers_again_after_a_stall_is_kept() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        // Connected before the stall, as a standby is.
        assert!(etcd.get(etcd.key(leader::KEY)).await.unwrap().is_none());
        server.freeze();
        let ttl = Duration::from_secs(3);
        let standby = {
            let etcd = etcd.clone();
            tokio::spawn(async move { lead_for(&etcd, "b", ttl).await })
        };
        // The lease is asked for now and granted when etcd answers again: after the lead's
        // first renewal deadline (2 s), counted from the asking (and before the grant gives
        // up, CALL_FOR).
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.thaw();
        let leading = tokio::time::timeout(Duration::from_secs(10), standby)
            .await
            .unwrap()
            .unwrap();
        // Before made_sure, it stepped down one renewal (1 s) after taking the lead, on a
        // lease etcd had just made, saying it "could not be renewed in time: etcd did not
        // answer in time".
        let kept = tokio::time::timeout(ttl + Duration::from_secs(1), leading.fence.lost.wait());
        assert!(kept.await.is_err(), "{:?}", leading.fence.lost.why());
        let key = etcd.get(etcd.key(leader::KEY)).await.unwrap().unwrap();
        let holder: leader::Holder = serde_json::from_slice(&key.value).unwrap();
        assert_eq!(holder.name, "b", "still its key");
    }

    /// An etcd over TLS (on 127.0.0.1) whose certificate `authority` signs, asking each client
    /// for one it signed: it, and the CA's file.
    fn etcd_signed_by(
        authority: &fleetctl::certs::Authority,
    ) -> (server::Etcd, std::path::PathBuf) {
        let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
        authority.server("etcd", &[], &localhost).unwrap();
        let ([ca, _], [cert, key]) = (authority.files("ca"), authority.files("etcd"));
        let tls = server::Tls {
            cert,
            key,
            client_ca: ca.clone(),
        };
        (server::Etcd::start_tls(&tls).unwrap(), ca)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_certificate_renewed_in_place_is_used_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let authority = |name: &str| {
            let authority = fleetctl::certs::Authority {
                dir: dir.path().join(name),
                days: Some(1),
            };
            authority.ca().unwrap();
            authority.client("controller.fleet").unwrap();
            authority
        };
        let (ours, other) = (authority("ours"), authority("other"));
        let (server, ca) = etcd_signed_by(&ours);
        // The controller's files hold a certificate etcd does not take (another CA's).
        let (shown_cert, shown_key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let [cert, key] = other.files("controller.fleet");
        std::fs::copy(&cert, &shown_cert).unwrap();
        std::fs::copy(&key, &shown_key).unwrap();
        let etcd = Etcd::connect(&EtcdOptions {
            endpoints: vec![server.url.clone()],
            prefix: "/tls/".into(),
            tls: ClientTls {
                ca: Some(ca),
                cert: Some(shown_cert.clone()),
                key: Some(shown_key.clone()),
            },
            user: None,
        })
        .unwrap();
        let key_of = || etcd.key("desired/us-west");
        let refused = etcd.get(key_of()).await.unwrap_err();
        assert!(
            format!("{refused:#}").contains("BadCertificate"),
            "{refused:#}"
        );
        // Renewed in place, as a mounted Secret is: taken up without a restart.
        let [cert, key] = ours.files("controller.fleet");
        std::fs::copy(&key, &shown_key).unwrap();
        std::fs::copy(&cert, &shown_cert).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = etcd.get(key_of()).await {
            assert!(std::time::Instant::now() < deadline, "still refused: {e:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Replaced by files etcd refuses: the last good ones stay in use.
        let [cert, key] = other.files("controller.fleet");
        std::fs::copy(&key, &shown_key).unwrap();
        std::fs::copy(&cert, &shown_cert).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            let got = etcd.get(key_of()).await;
            assert!(got.is_ok(), "{got:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_over_tls_is_reached_with_its_ca_and_a_client_certificate_and_not_without() {
        let dir = tempfile::tempdir().unwrap();
        let authority = fleetctl::certs::Authority {
            dir: dir.path().to_path_buf(),
            days: Some(1),
        };
        authority.ca().unwrap();
        authority.client("controller.fleet").unwrap();
        let (server, ca) = etcd_signed_by(&authority);
        assert!(
            server.url.starts_with("https://127.0.0.1:"),
            "{}",
            server.url
        );
        let [cert, key] = authority.files("controller.fleet");
        let options = |tls| EtcdOptions {
            endpoints: vec![server.url.clone()],
            prefix: "/tls/".into(),
            tls,
            user: None,
        };
        let shown = ClientTls {
            ca: Some(ca.clone()),
            cert: Some(cert),
            key: Some(key),
        };
        let etcd = Etcd::connect(&options(shown)).unwrap();
        let leading = lead(&etcd, "a").await;
        let store = EtcdStore::new(etcd.clone(), leading.fence.clone(), leading.epoch);
        store.put_desired("us-west", &[1]).unwrap();
        assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![1])]);
        // Without a client certificate, etcd lets nothing through.
        let unshown = ClientTls {
            ca: Some(ca),
            ..Default::default()
        };
        let etcd = Etcd::connect(&options(unshown)).unwrap();
        let refused = etcd
            .get(b"/tls/desired/us-west".to_vec())
            .await
            .unwrap_err();
        println!("without a client certificate: {refused}");
        assert!(refused.to_string().starts_with("etcd: "), "{refused}");
        // Files given for a plain URL are a mistake, told as one.
        let plain = EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ..options(ClientTls {
                ca: Some("ca.pem".into()),
                ..Default::default()
            })
        };
        let told = Etcd::connect(&plain).err().unwrap().to_string();
        assert!(
            told.contains("is not https://: write it as https://"),
            "{told}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_resigns_is_followed_at_once_not_after_its_lease() {
        let server = server::Etcd::start().unwrap();
        let etcd = connect(&server);
        // A lease far longer than the deadline below: only the resignation can end it.
        let first = lead_for(&etcd, "first", Duration::from_secs(60)).await;
        let next = {
            let etcd = etcd.clone();
            tokio::spawn(async move { lead(&etcd, "next").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!next.is_finished(), "two leaders");
        let resigned = std::time::Instant::now();
        let first_epoch = first.epoch;
        first.resign().await;
        let next = tokio::time::timeout(Duration::from_secs(3), next)
            .await
            .unwrap()
            .unwrap();
        assert!(
            resigned.elapsed() < Duration::from_secs(2),
            "{:?}",
            resigned.elapsed()
        );
        assert!(next.epoch > first_epoch);
    }
}
