//! The embedded, crash-safe store (redb), one file in the controller's data directory.

use std::path::Path;

use anyhow::Context;
use fleet_engine::HistoryEvent;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::answer::{self, Sweep};
use super::{Lost, ReleaseChange, Store, StoredFleet, StoredRelease};

const FLEETS: TableDefinition<'_, &str, &str> = TableDefinition::new("fleets");
const RELEASES: TableDefinition<'_, &str, &str> = TableDefinition::new("releases");
const MANIFESTS: TableDefinition<'_, &str, &str> = TableDefinition::new("release_manifests");
const HISTORY: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("history");
const DESIRED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("desired");
const REQUESTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("requests");
const VERSIONS: TableDefinition<'_, &str, &str> = TableDefinition::new("versions");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

pub struct Embedded {
    db: Database,
    lost: Lost,
}

impl Embedded {
    pub fn open(dir: &Path) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("fleet.redb");
        let db =
            Database::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            // Create every table, so that readers never meet a missing one.
            txn.open_table(FLEETS)?;
            txn.open_table(RELEASES)?;
            txn.open_table(MANIFESTS)?;
            txn.open_table(HISTORY)?;
            txn.open_table(DESIRED)?;
            txn.open_table(REQUESTS)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Embedded {
            db,
            lost: Lost::default(),
        })
    }

    /// Everything the store keeps, keyed as the etcd store keys it under its prefix
    /// (`etcd.rs`), values as they are: to copy it into etcd. The epoch counter is left out:
    /// leaders on etcd number their own epochs, above every one of this store's.
    pub fn export(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        let tables = [
            (FLEETS, "fleets"),
            (RELEASES, "releases"),
            (MANIFESTS, "manifests"),
            (VERSIONS, "versions"),
        ];
        for (table, name) in tables {
            for row in txn.open_table(table)?.iter()? {
                let (key, value) = row?;
                let value = value.value().as_bytes().to_vec();
                out.push((format!("{name}/{}", key.value()), value));
            }
        }
        for (table, name) in [(DESIRED, "desired"), (REQUESTS, "requests")] {
            for row in txn.open_table(table)?.iter()? {
                let (key, value) = row?;
                out.push((format!("{name}/{}", key.value()), value.value().to_vec()));
            }
        }
        for row in txn.open_table(HISTORY)?.iter()? {
            let (key, value) = row?;
            let (id, index) = key.value();
            let value = value.value().as_bytes().to_vec();
            out.push((format!("history/{id}/{index:020}"), value));
        }
        if let Some(n) = txn.open_table(META)?.get("releases")? {
            let n = n.value().to_string().into_bytes();
            out.push(("meta/releases".to_string(), n));
        }
        Ok(out)
    }

    /// The store on `backend`: for tests that make its writes fail.
    #[cfg(test)]
    fn on(backend: impl redb::StorageBackend) -> anyhow::Result<Embedded> {
        let db = Database::builder().create_with_backend(backend)?;
        Ok(Embedded {
            db,
            lost: Lost::default(),
        })
    }

    /// Makes `change` in one transaction, unless an earlier write failed. One that fails
    /// (a full disk, an I/O error, after which redb takes no more until reopened) loses the
    /// store: the controller starts over from the file.
    fn write<T>(
        &self,
        change: impl FnOnce(&WriteTransaction) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        if let Some(why) = self.lost.why() {
            anyhow::bail!("the store writes no more: the controller is starting over ({why})");
        }
        let written = self
            .db
            .begin_write()
            .map_err(anyhow::Error::from)
            .and_then(|txn| {
                let out = change(&txn)?;
                txn.commit()?;
                Ok(out)
            });
        written.inspect_err(|e| {
            self.lost
                .lose(format!("a write to the store failed: {e:#}"))
        })
    }
}

impl Store for Embedded {
    fn next_epoch(&self) -> anyhow::Result<u64> {
        self.write(|txn| count(txn, "epoch"))
    }

    fn next_release_number(&self) -> anyhow::Result<u64> {
        self.write(|txn| count(txn, "releases"))
    }

    fn put_fleet(&self, fleet: &StoredFleet) -> anyhow::Result<()> {
        self.write(|txn| {
            let json = serde_json::to_string(fleet)?;
            txn.open_table(FLEETS)?
                .insert(fleet.service.as_str(), json.as_str())?;
            Ok(())
        })
    }

    fn fleets(&self) -> anyhow::Result<Vec<StoredFleet>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FLEETS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(serde_json::from_str(row?.1.value())?);
        }
        Ok(out)
    }

    fn save_release(&self, change: ReleaseChange<'_>) -> anyhow::Result<()> {
        self.write(|txn| {
            txn.open_table(RELEASES)?
                .insert(change.id, serde_json::to_string(change.release)?.as_str())?;
            let mut history = txn.open_table(HISTORY)?;
            for (index, event) in change.events {
                history.insert((change.id, *index), serde_json::to_string(event)?.as_str())?;
            }
            let mut desired = txn.open_table(DESIRED)?;
            for (region, bytes) in change.desired {
                desired.insert(region.as_str(), bytes.as_slice())?;
            }
            if let Some((service, version)) = change.version {
                txn.open_table(VERSIONS)?.insert(service, version)?;
            }
            if let Some(manifest) = change.manifest {
                txn.open_table(MANIFESTS)?.insert(change.id, manifest)?;
            }
            if let Some((request, answer)) = change.answer {
                txn.open_table(REQUESTS)?.insert(request, answer)?;
            }
            Ok(())
        })
    }

    fn put_desired(&self, region: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.write(|txn| {
            txn.open_table(DESIRED)?.insert(region, bytes)?;
            Ok(())
        })
    }

    fn releases(&self) -> anyhow::Result<Vec<(String, StoredRelease)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RELEASES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (id, value) = row?;
            out.push((id.value().to_string(), serde_json::from_str(value.value())?));
        }
        Ok(out)
    }

    fn forget(&self, ids: &[String]) -> anyhow::Result<()> {
        self.write(|txn| {
            let mut releases = txn.open_table(RELEASES)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let mut history = txn.open_table(HISTORY)?;
            for id in ids.iter().map(String::as_str) {
                releases.remove(id)?;
                manifests.remove(id)?;
                history.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            }
            Ok(())
        })
    }

    fn release_manifest(&self, id: &str) -> anyhow::Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MANIFESTS)?;
        Ok(table.get(id)?.map(|v| v.value().to_string()))
    }

    fn history(&self, id: &str, from: u64) -> anyhow::Result<Vec<(u64, HistoryEvent)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let mut out = Vec::new();
        for row in table.range((id, from)..=(id, u64::MAX))? {
            let (key, value) = row?;
            out.push((key.value().1, serde_json::from_str(value.value())?));
        }
        Ok(out)
    }

    fn desired(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DESIRED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (region, bytes) = row?;
            out.push((region.value().to_string(), bytes.value().to_vec()));
        }
        Ok(out)
    }

    fn version(&self, service: &str) -> anyhow::Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VERSIONS)?;
        Ok(table.get(service)?.map(|v| v.value().to_string()))
    }

    fn answered(&self, request_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REQUESTS)?;
        Ok(table.get(request_id)?.map(|v| v.value().to_vec()))
    }

    fn answer(&self, request_id: &str, kept: &[u8]) -> anyhow::Result<()> {
        self.write(|txn| {
            txn.open_table(REQUESTS)?.insert(request_id, kept)?;
            Ok(())
        })
    }

    fn forget_answers(&self, before_ms: i64, now_ms: i64) -> anyhow::Result<usize> {
        let mut forget = Vec::new();
        let mut stamp = Vec::new();
        let txn = self.db.begin_read()?;
        for row in txn.open_table(REQUESTS)?.iter()? {
            let (key, kept) = row?;
            match answer::sweep(kept.value(), before_ms, now_ms) {
                Sweep::Keep => {}
                Sweep::Forget => forget.push(key.value().to_string()),
                Sweep::Stamp(stamped) => stamp.push((key.value().to_string(), stamped)),
            }
        }
        drop(txn);
        if forget.is_empty() && stamp.is_empty() {
            return Ok(0);
        }
        self.write(|txn| {
            let mut table = txn.open_table(REQUESTS)?;
            for key in &forget {
                table.remove(key.as_str())?;
            }
            for (key, stamped) in &stamp {
                table.insert(key.as_str(), stamped.as_slice())?;
            }
            Ok(forget.len())
        })
    }

    fn lost(&self) -> &Lost {
        &self.lost
    }
}

/// Adds one to the counter `name` of the meta table: its new value.
fn count(txn: &WriteTransaction, name: &str) -> anyhow::Result<u64> {
    let mut meta = txn.open_table(META)?;
    let n = meta.get(name)?.map_or(0, |v| v.value()) + 1;
    meta.insert(name, n)?;
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use redb::StorageBackend;
    use redb::backends::InMemoryBackend;

    use super::*;

    /// Test-only fake: redb's in-memory backend, whose writes fail while `failing` is set, as
    /// on a full disk; it counts the writes asked of it.
    #[derive(Debug, Default)]
    struct Disk {
        inner: InMemoryBackend,
        failing: AtomicBool,
        writes: AtomicU64,
    }

    #[derive(Debug, Clone, Default)]
    struct Shared(Arc<Disk>);

    impl StorageBackend for Shared {
        fn len(&self) -> std::io::Result<u64> {
            self.0.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.0.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.0.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.writes.fetch_add(1, Ordering::SeqCst);
            if self.0.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.0.inner.write(offset, data)
        }
    }

    #[test]
    fn a_change_keeps_the_answer_to_the_request_that_made_it() {
        let store = Embedded::on(Shared::default()).unwrap();
        let change = super::super::ReleaseChange {
            id: "e2e-1",
            release: &crate::store::fixtures::release(),
            events: &[],
            desired: &[],
            version: None,
            manifest: None,
            answer: Some(("promote/r1", &[1, 2])),
        };
        store.save_release(change).unwrap();
        let answered = store.answered("promote/r1").unwrap();
        assert_eq!(answered.as_deref(), Some(&[1, 2][..]));
    }

    #[test]
    fn a_forgotten_release_leaves_nothing_behind() {
        let store = Embedded::on(Shared::default()).unwrap();
        crate::store::fixtures::forgetting(&store);
    }

    #[test]
    fn answers_older_than_a_day_are_forgotten() {
        let store = Embedded::on(Shared::default()).unwrap();
        crate::store::fixtures::forgetting_answers(&store);
    }

    #[test]
    fn after_a_write_fails_the_store_writes_nothing_more_and_says_why() {
        let disk = Shared::default();
        let store = Embedded::on(disk.clone()).unwrap();
        store.put_desired("us-west", &[1]).unwrap();
        assert_eq!(store.lost().why(), None);

        disk.0.failing.store(true, Ordering::SeqCst);
        let failed = store.put_desired("us-west", &[2]).unwrap_err();
        let why = store.lost().why().unwrap();
        assert!(why.contains("a write to the store failed"), "{why}");
        assert!(why.contains("No space left on device"), "{why}: {failed:#}");

        // The disk has room again, but the controller's memory may be ahead of the file:
        // nothing more is written, and redb is not even asked.
        disk.0.failing.store(false, Ordering::SeqCst);
        let writes = disk.0.writes.load(Ordering::SeqCst);
        let refused = store.put_desired("us-west", &[3]).unwrap_err().to_string();
        assert!(refused.contains("the store writes no more"), "{refused}");
        assert!(store.next_release_number().is_err());
        assert!(store.answer("r", &[1]).is_err());
        assert_eq!(disk.0.writes.load(Ordering::SeqCst), writes);
        // What was written before stands, and reads still answer.
        assert_eq!(store.desired().unwrap(), [("us-west".into(), vec![1])]);
    }
}
