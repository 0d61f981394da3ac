//! The embedded, crash-safe store (redb), one file in the controller's data directory.

use std::path::Path;

use anyhow::Context;
use fleet_engine::HistoryEvent;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{ReleaseChange, Store, StoredFleet, StoredRelease};

const FLEETS: TableDefinition<'_, &str, &str> = TableDefinition::new("fleets");
const RELEASES: TableDefinition<'_, &str, &str> = TableDefinition::new("releases");
const HISTORY: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("history");
const DESIRED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("desired");
const REQUESTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("requests");
const VERSIONS: TableDefinition<'_, &str, &str> = TableDefinition::new("versions");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

pub struct Embedded {
    db: Database,
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
            txn.open_table(HISTORY)?;
            txn.open_table(DESIRED)?;
            txn.open_table(REQUESTS)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Embedded { db })
    }
}

impl Store for Embedded {
    fn next_epoch(&self) -> anyhow::Result<u64> {
        let txn = self.db.begin_write()?;
        let epoch = {
            let mut meta = txn.open_table(META)?;
            let epoch = meta.get("epoch")?.map_or(0, |v| v.value()) + 1;
            meta.insert("epoch", epoch)?;
            epoch
        };
        txn.commit()?;
        Ok(epoch)
    }

    fn next_release_number(&self) -> anyhow::Result<u64> {
        let txn = self.db.begin_write()?;
        let n = {
            let mut meta = txn.open_table(META)?;
            let n = meta.get("releases")?.map_or(0, |v| v.value()) + 1;
            meta.insert("releases", n)?;
            n
        };
        txn.commit()?;
        Ok(n)
    }

    fn put_fleet(&self, fleet: &StoredFleet) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(FLEETS)?.insert(
            fleet.service.as_str(),
            serde_json::to_string(fleet)?.as_str(),
        )?;
        txn.commit()?;
        Ok(())
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
        let txn = self.db.begin_write()?;
        {
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
        }
        txn.commit()?;
        Ok(())
    }

    fn put_desired(&self, region: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(DESIRED)?.insert(region, bytes)?;
        txn.commit()?;
        Ok(())
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

    fn answer(&self, request_id: &str, response: &[u8]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(REQUESTS)?.insert(request_id, response)?;
        txn.commit()?;
        Ok(())
    }
}
