//! `fleet-controller --etcd … --import-data DIR`: copies a stopped controller's embedded
//! store into etcd, to move from one controller on a volume to several standing in for each
//! other. Everything is copied: fleets, releases (those under way too, which the controllers
//! on etcd carry on from the step they were at, as after a failover), their history and
//! manifests, each region's last desired state, each service's version, the answers kept for
//! request ids, and the release counter. Epochs are not: leaders on etcd number theirs above
//! every epoch of the embedded store, so agents follow them without a restart.
//!
//! Only into a prefix that holds nothing, and never while a controller leads on it or reads a
//! half-made copy: the first transaction, which holds only while no key has the prefix, makes
//! the leader key `<prefix>leader` (no controller's, with no lease), every later one holds only
//! while that key is the import's own, and the last deletes it. Controllers started meanwhile
//! stand by; an import that stops halfway leaves the key, and so no controller leads on what
//! it copied until the prefix is deleted.

use std::path::Path;

use anyhow::Context;

use crate::etcd::{self, Etcd, EtcdOptions};
use crate::store::Embedded;

/// The largest entry copied: what etcd takes in one request (1.5 MiB by default), less room
/// for the prefix and the request's framing.
const LARGEST: usize = 1400 * 1024;

/// What the leader key says while an import holds it (with the import's pid and start).
const IMPORTING: &str = "an import (fleet-controller --import-data), not a controller";

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
    if let Some((key, value)) = entries.iter().find(|(k, v)| k.len() + v.len() > LARGEST) {
        anyhow::bail!(
            "{key} is {} bytes, more than etcd takes in one request; nothing was copied",
            key.len() + value.len()
        );
    }
    let mut imported = counted(&entries);
    let etcd = Etcd::connect(options)?;
    let prefix = String::from_utf8_lossy(&etcd.key("")).into_owned();
    let lock = etcd.key(crate::leader::KEY);
    let mut batches = etcd::in_transactions(entries, |(k, v)| k.len() + v.len()).into_iter();
    let puts = |batch: Vec<(String, Vec<u8>)>| -> Vec<_> {
        (batch.into_iter())
            .map(|(key, value)| etcd::put(etcd.key(&key), value, 0))
            .collect()
    };
    // Each transaction, failing, reads the leader key: a try whose answer was lost may have
    // made it (etcd calls are made again), which its value, this import's own, tells.
    let txn = |compare, success| {
        let request = fleet_proto::etcd::TxnRequest {
            compare: vec![compare],
            success,
            failure: vec![etcd::range(lock.clone())],
        };
        let there = etcd.clone();
        etcd.block_on(async move { there.txn(request).await })
    };
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let since = since.unwrap_or_default().as_nanos();
    let mark = format!("{IMPORTING} ({}, {since})", std::process::id()).into_bytes();
    // The first: the lock, and the first entries, if nothing is under the prefix.
    let mut first = vec![etcd::put(lock.clone(), mark.clone(), 0)];
    first.extend(batches.next().map(puts).unwrap_or_default());
    let answer = txn(etcd::none_under(etcd.key("")), first)?;
    let ours = match answer.succeeded {
        true => answer.header.map_or(0, |h| h.revision),
        false => match etcd::read_back(answer) {
            Some(lock) if lock.value == mark => lock.create_revision,
            _ => 0,
        },
    };
    if ours == 0 {
        let there = etcd.clone();
        let held = etcd.block_on(async move { there.list(there.key(""), vec![]).await })?;
        anyhow::bail!(
            "etcd already holds {} keys under the prefix {prefix}: import into a prefix that \
             holds nothing (--etcd-prefix); if they are from an import that failed, delete them \
             first (etcdctl del --prefix {prefix})",
            held.len()
        );
    }
    imported.transactions = 1;
    let stopped = |done: usize| {
        format!(
            "the import stopped after {done} transactions: what it copied is under {prefix}, \
             where no controller leads while {prefix}{} is the import's; delete it all \
             (etcdctl del --prefix {prefix}) and import again",
            crate::leader::KEY
        )
    };
    let rest: Vec<_> = batches.map(puts).collect();
    for ops in rest {
        let answer = txn(etcd::created_at(lock.clone(), ours), ops)
            .with_context(|| stopped(imported.transactions))?;
        anyhow::ensure!(
            answer.succeeded,
            "{prefix}{} is no longer the import's (deleted, or made again)",
            crate::leader::KEY
        );
        imported.transactions += 1;
    }
    // The last: the lock let go. Gone already, it was let go by a try whose answer was lost.
    let unlock = vec![etcd::delete(lock.clone(), vec![])];
    let answer = txn(etcd::created_at(lock.clone(), ours), unlock)
        .with_context(|| stopped(imported.transactions))?;
    // Every earlier transaction held under the key: another's (a controller's, made since)
    // means it is done too.
    anyhow::ensure!(
        answer.succeeded || etcd::read_back(answer).is_none_or(|kv| kv.create_revision != ours),
        "{prefix}{} is still the import's",
        crate::leader::KEY
    );
    imported.transactions += 1;
    Ok(imported)
}

/// What `entries` hold, by kind.
fn counted(entries: &[(String, Vec<u8>)]) -> Imported {
    let mut imported = Imported {
        keys: entries.len(),
        ..Imported::default()
    };
    for (key, _) in entries {
        match key.split('/').next().unwrap_or_default() {
            "fleets" => imported.fleets += 1,
            "releases" => imported.releases += 1,
            "history" => imported.events += 1,
            "desired" => imported.desired += 1,
            "requests" => imported.answers += 1,
            _ => {}
        }
    }
    imported
}

#[cfg(test)]
mod tests {
    use crate::etcd::in_transactions;

    #[test]
    fn transactions_stay_under_etcds_limits() {
        let small = |i: usize| (format!("history/a/{i:020}"), vec![0; 100]);
        let size = |(k, v): &(String, Vec<u8>)| k.len() + v.len();
        let sizes: Vec<usize> = in_transactions((0..250).map(small).collect(), size)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        // A value larger than the byte limit still goes, alone.
        let large = |i: usize| (format!("manifests/a-{i}"), vec![0; 600 << 10]);
        let sizes: Vec<usize> = in_transactions((0..3).map(large).collect(), size)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert!(in_transactions(Vec::<(String, Vec<u8>)>::new(), size).is_empty());
    }
}
