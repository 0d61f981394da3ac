//! The embedded, crash-safe store (redb): fleets, releases with their engine state, history,
//! the last desired state of every region, answered requests, and the epoch.
//!
//! Every change to a release is one transaction: its new state, its new history events and
//! the desired states it sends are durable together, before any of it leaves the controller.

use std::path::Path;

use anyhow::Context;
use fleet_engine::{HistoryEvent, State};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const FLEETS: TableDefinition<'_, &str, &str> = TableDefinition::new("fleets");
const RELEASES: TableDefinition<'_, &str, &str> = TableDefinition::new("releases");
const HISTORY: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("history");
const DESIRED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("desired");
const REQUESTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("requests");
const VERSIONS: TableDefinition<'_, &str, &str> = TableDefinition::new("versions");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

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
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
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
        Ok(Store { db })
    }

    /// A new epoch, larger than every earlier one, for this controller's term.
    pub fn next_epoch(&self) -> anyhow::Result<u64> {
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

    /// A new release id number.
    pub fn next_release_number(&self) -> anyhow::Result<u64> {
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

    pub fn put_fleet(&self, fleet: &StoredFleet) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(FLEETS)?.insert(
            fleet.service.as_str(),
            serde_json::to_string(fleet)?.as_str(),
        )?;
        txn.commit()?;
        Ok(())
    }

    pub fn fleets(&self) -> anyhow::Result<Vec<StoredFleet>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FLEETS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(serde_json::from_str(row?.1.value())?);
        }
        Ok(out)
    }

    pub fn save_release(&self, change: ReleaseChange<'_>) -> anyhow::Result<()> {
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

    pub fn put_desired(&self, region: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(DESIRED)?.insert(region, bytes)?;
        txn.commit()?;
        Ok(())
    }

    pub fn releases(&self) -> anyhow::Result<Vec<(String, StoredRelease)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RELEASES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (id, value) = row?;
            out.push((id.value().to_string(), serde_json::from_str(value.value())?));
        }
        Ok(out)
    }

    /// A release's history from index `from` on.
    pub fn history(&self, id: &str, from: u64) -> anyhow::Result<Vec<(u64, HistoryEvent)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HISTORY)?;
        let mut out = Vec::new();
        for row in table.range((id, from)..=(id, u64::MAX))? {
            let (key, value) = row?;
            out.push((key.value().1, serde_json::from_str(value.value())?));
        }
        Ok(out)
    }

    pub fn desired(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DESIRED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (region, bytes) = row?;
            out.push((region.value().to_string(), bytes.value().to_vec()));
        }
        Ok(out)
    }

    pub fn version(&self, service: &str) -> anyhow::Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VERSIONS)?;
        Ok(table.get(service)?.map(|v| v.value().to_string()))
    }

    /// The answer already given to `request_id`, if any.
    pub fn answered(&self, request_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REQUESTS)?;
        Ok(table.get(request_id)?.map(|v| v.value().to_vec()))
    }

    pub fn answer(&self, request_id: &str, response: &[u8]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(REQUESTS)?.insert(request_id, response)?;
        txn.commit()?;
        Ok(())
    }
}
