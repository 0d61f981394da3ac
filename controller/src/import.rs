//! `fleet-controller --etcd … --import-data DIR`: copies a stopped controller's embedded
//! store into etcd, to move from one controller on a volume to several standing in for each
//! other. Everything is copied: fleets, releases (those under way too, which the controllers
//! on etcd carry on from the step they were at, as after a failover), their history and
//! manifests, each region's last desired state, each service's version, the answers kept for
//! request ids, and the release counter. Epochs are not: leaders on etcd number theirs above
//! every epoch of the embedded store, so agents follow them without a restart.
//!
//! Only into a prefix that holds nothing, and only while no controller leads on it: every
//! transaction holds only while no leader key exists.

use std::path::Path;

use anyhow::Context;

use crate::etcd::{self, Etcd, EtcdOptions};
use crate::store::Embedded;

/// Puts in one transaction: under etcd's default limit of 128 operations.
const PUTS_A_TRANSACTION: usize = 100;
/// Bytes in one transaction: under etcd's default request limit of 1.5 MiB.
const BYTES_A_TRANSACTION: usize = 1 << 20;

/// What was copied, for people.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub fleets: usize,
    pub releases: usize,
    pub events: usize,
    pub desired: usize,
    pub answers: usize,
    /// Keys in all, and the transactions they took.
    pub keys: usize,
    pub transactions: usize,
}

/// Copies the embedded store in `dir` into the etcd `options` name, under its prefix.
pub fn import_data(dir: &Path, options: &EtcdOptions) -> anyhow::Result<Imported> {
    let file = dir.join("fleet.redb");
    anyhow::ensure!(
        file.exists(),
        "--import-data {}: there is no store here ({} is missing): give the directory the \
         controller was given as --data",
        dir.display(),
        file.display()
    );
    let store = Embedded::open(dir).with_context(|| {
        format!(
            "--import-data {}: cannot open the store; if a controller still runs on it, stop it \
             first",
            dir.display()
        )
    })?;
    let entries = store.export()?;
    let etcd = Etcd::connect(options)?;
    let prefix = etcd.key("");
    let there = etcd.clone();
    let held = etcd.block_on(async move { there.list(there.key(""), vec![]).await })?;
    let prefix_text = String::from_utf8_lossy(&prefix).into_owned();
    anyhow::ensure!(
        held.is_empty(),
        "etcd already holds {} keys under the prefix {prefix_text}: import into a prefix that \
         holds nothing (--etcd-prefix); if they are from an import that failed, delete them \
         first (etcdctl del --prefix {prefix_text})",
        held.len()
    );
    let mut imported = Imported::default();
    for (key, _) in &entries {
        let table = key.split('/').next().unwrap_or_default();
        match table {
            "fleets" => imported.fleets += 1,
            "releases" => imported.releases += 1,
            "history" => imported.events += 1,
            "desired" => imported.desired += 1,
            "requests" => imported.answers += 1,
            _ => {}
        }
    }
    imported.keys = entries.len();
    for batch in batches(entries) {
        let puts = batch
            .into_iter()
            .map(|(key, value)| etcd::put(etcd.key(&key), value, 0))
            .collect();
        let request = fleet_proto::etcd::TxnRequest {
            // No controller leads meanwhile: one would act on half a copy.
            compare: vec![etcd::created_at(etcd.key(crate::leader::KEY), 0)],
            success: puts,
            failure: vec![],
        };
        let there = etcd.clone();
        let answer = etcd.block_on(async move { there.txn(request).await })?;
        anyhow::ensure!(
            answer.succeeded,
            "a controller leads on etcd under the prefix {prefix_text}: stop every controller \
             on it, delete what was copied (etcdctl del --prefix {prefix_text}) and import again"
        );
        imported.transactions += 1;
    }
    Ok(imported)
}

/// `entries` in transactions: each under both limits, and at least one entry each.
fn batches(entries: Vec<(String, Vec<u8>)>) -> Vec<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        let size = entry.0.len() + entry.1.len();
        match out.last_mut() {
            Some(last)
                if last.len() < PUTS_A_TRANSACTION && bytes + size <= BYTES_A_TRANSACTION =>
            {
                bytes += size;
                last.push(entry);
            }
            _ => {
                bytes = size;
                out.push(vec![entry]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_stay_under_etcds_limits() {
        let small = |i: usize| (format!("history/a/{i:020}"), vec![0; 100]);
        let sizes: Vec<usize> = batches((0..250).map(small).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        // A value larger than the byte limit still goes, alone.
        let large = |i: usize| (format!("manifests/a-{i}"), vec![0; 600 << 10]);
        let sizes: Vec<usize> = batches((0..3).map(large).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert!(batches(Vec::new()).is_empty());
    }
}
