//! Which of several controllers sharing one etcd acts: the one whose key `<prefix>leader`
//! exists, bound to its lease. The others stand by and try for it every second; when the
//! leader stops (and revokes its lease) or dies (and its lease runs out), one of them takes
//! it.
//!
//! The revision that created the key is the leader's epoch: larger than every earlier
//! leader's, it goes with every desired state, and agents ignore older ones. Every write of
//! the leader's store holds only while that key is still the one it created ([`Fence`]), so
//! a leader that lost its lease without noticing (paused, cut off) can change nothing; it
//! stops as soon as a write fails so or its lease cannot be renewed.

use std::time::{Duration, Instant};

use fleet_proto::etcd as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::etcd::{self, Etcd};
use crate::store::Lost;

/// The leader key's name under the prefix.
pub(crate) const KEY: &str = "leader";

/// How the controllers of one etcd decide.
#[derive(Clone, Debug)]
pub struct Campaign {
    /// This controller, as its key says while it leads.
    pub us: Holder,
    /// The lease's time to live: how long after the leader dies another takes over.
    pub ttl: Duration,
}

impl Campaign {
    /// How often a standby tries for the lead and renews its lease, and the leader renews
    /// its own.
    fn every(&self) -> Duration {
        (self.ttl / 3).min(Duration::from_secs(1))
    }
}

/// Holds the lead until [`Leadership::resign`] or until it is lost.
pub struct Leadership {
    pub epoch: u64,
    pub fence: Fence,
    lease: i64,
    etcd: Etcd,
    stop_renewing: watch::Sender<bool>,
}

/// Makes the leader's writes conditional on its still leading, and tells when it does not.
#[derive(Clone)]
pub struct Fence {
    key: Vec<u8>,
    revision: i64,
    /// Lost with the lead.
    pub lost: Lost,
}

impl Fence {
    /// The condition every write of the leader carries.
    pub fn holds(&self) -> pb::Compare {
        etcd::created_at(self.key.clone(), self.revision)
    }
}

/// Who leads, as the leader key says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its name, shown by the others.
    pub name: String,
    /// Its gRPC address, as the others reach it (`--advertise`): where they pass
    /// connections to.
    pub grpc: String,
}

/// Stands by until this controller leads; while it does not, `leader` says who does (none
/// while that is not known). Never fails: while etcd cannot be reached it says so in the log
/// and tries again. `standing` holds the lease it stands with, for a caller that gives up
/// on it (drops it) to revoke: a key made just then would otherwise wait for it to run out.
pub async fn campaign(
    etcd: &Etcd,
    campaign: &Campaign,
    leader: &watch::Sender<Option<Holder>>,
    standing: &mut Option<i64>,
) -> Leadership {
    let key = etcd.key(KEY);
    loop {
        // When the lease was last made sure of (granted or renewed), as asked.
        let mut renewed = Instant::now();
        let lease = match etcd.grant(campaign.ttl).await {
            Ok(lease) => *standing.insert(lease),
            Err(e) => {
                tracing::warn!(error = %e, "standing by: cannot reach etcd");
                leader.send_replace(None);
                tokio::time::sleep(campaign.every()).await;
                continue;
            }
        };
        loop {
            let us = &campaign.us;
            let holder = match try_to_lead(etcd, &key, us, lease).await {
                Ok(Ok(revision)) => match made_sure(etcd, campaign, lease, renewed).await {
                    Some(renewed) => {
                        return lead(etcd, campaign, key, (lease, renewed), revision);
                    }
                    // Tried again after the next renewal: the key, if it is still ours,
                    // is found bound to this lease.
                    None => None,
                },
                // A key of ours under another lease (before a restart) is followed by no one.
                Ok(Err(holder)) => holder.filter(|h| h != us),
                Err(e) => {
                    tracing::warn!(error = %e, "standing by: cannot reach etcd");
                    None
                }
            };
            leader.send_if_modified(|was| std::mem::replace(was, holder.clone()) != holder);
            tokio::time::sleep(campaign.every()).await;
            let asked = Instant::now();
            match etcd.renew(lease).await {
                Ok(left) if left > 0 => renewed = asked,
                Ok(_) => break,
                Err(_) if renewed.elapsed() >= campaign.ttl => break,
                Err(_) => {}
            }
        }
    }
}

/// When the lease was last made sure of, for the leader to count from: `renewed` if that
/// was just now (a renewal's time at most, as in the standby's loop); else a renewal is
/// asked for first, and its time is (none if it failed, or came late). A grant or a try
/// that etcd was slow to answer (it stalled, then answered everything at once) counts the
/// lease as nearly spent though etcd may have just made it: leading on that count would
/// step down at the first renewal.
async fn made_sure(
    etcd: &Etcd,
    campaign: &Campaign,
    lease: i64,
    renewed: Instant,
) -> Option<Instant> {
    let quick = campaign.every() / 2;
    if renewed.elapsed() < quick {
        return Some(renewed);
    }
    let asked = Instant::now();
    let why = match tokio::time::timeout(quick, etcd.renew(lease)).await {
        Ok(Ok(left)) if left > 0 => return Some(asked),
        Ok(Ok(_)) => "its lease had expired".to_string(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => format!("etcd did not answer within {quick:?}"),
    };
    tracing::warn!(%why, "standing by: won the lead late, and could not renew its lease before leading");
    None
}

/// Creates the key if nobody holds it: the revision that did, or who holds it (none if it
/// went just now, or says what no controller of this version writes). A key bound to
/// `lease` is this controller's own, made by a try whose answer was lost: it leads.
async fn try_to_lead(
    etcd: &Etcd,
    key: &[u8],
    us: &Holder,
    lease: i64,
) -> anyhow::Result<Result<i64, Option<Holder>>> {
    let request = pb::TxnRequest {
        compare: vec![etcd::created_at(key.to_vec(), 0)],
        success: vec![etcd::put(key.to_vec(), serde_json::to_vec(us)?, lease)],
        failure: vec![etcd::range(key.to_vec())],
    };
    let answer = etcd.txn(request).await?;
    if answer.succeeded {
        return Ok(Ok(answer.header.map_or(0, |h| h.revision)));
    }
    match etcd::read_back(answer) {
        Some(kv) if kv.lease == lease => Ok(Ok(kv.create_revision)),
        holder => Ok(Err(
            holder.and_then(|kv| serde_json::from_slice(&kv.value).ok())
        )),
    }
}

/// Epochs of leaders on etcd start here: above every epoch of the embedded store (which
/// counts the controller's starts), so that agents follow a fleet moved from `--data` to
/// `--etcd` without a restart.
const EPOCHS_FROM: u64 = 1 << 32;

/// Leads with the key `revision` made, bound to `lease`, last made sure of at `renewed`.
fn lead(
    etcd: &Etcd,
    campaign: &Campaign,
    key: Vec<u8>,
    (lease, renewed): (i64, Instant),
    revision: i64,
) -> Leadership {
    let fence = Fence {
        key,
        revision,
        lost: Lost::default(),
    };
    let (stop_renewing, stop) = watch::channel(false);
    etcd.spawn(renew(
        etcd.clone(),
        campaign.clone(),
        (lease, renewed),
        fence.clone(),
        stop,
    ));
    let epoch = EPOCHS_FROM + u64::try_from(revision).unwrap_or(0);
    tracing::info!(epoch, name = %campaign.us.name, "leading");
    Leadership {
        epoch,
        fence,
        lease,
        etcd: etcd.clone(),
        stop_renewing,
    }
}

/// Keeps the leader's lease alive; loses the lead when it has expired, or when it could not
/// be renewed in time for the next try to come before the lease may run out at etcd (from
/// when the last renewal that worked was asked for).
async fn renew(
    etcd: Etcd,
    campaign: Campaign,
    (lease, mut renewed): (i64, Instant),
    fence: Fence,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(campaign.every()) => {}
        }
        // The lead ends one renewal's wait before the lease may run out at etcd; a renewal
        // that takes longer counts as failed.
        let deadline = renewed + campaign.ttl.saturating_sub(campaign.every());
        let asked = Instant::now();
        let renewal = tokio::time::timeout_at(deadline.into(), etcd.renew(lease)).await;
        let e = match renewal {
            Ok(Ok(left)) if left > 0 => {
                renewed = asked;
                continue;
            }
            Ok(Ok(_)) => return fence.lost.lose("its etcd lease expired".into()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "etcd did not answer in time".into(),
        };
        if Instant::now() + campaign.every() >= deadline {
            let ttl = humantime::format_duration(campaign.ttl);
            return fence.lost.lose(format!(
                "its etcd lease ({ttl}) could not be renewed in time: {e}"
            ));
        }
        tracing::warn!(error = %e, "cannot renew the leader's lease yet");
    }
}

impl Leadership {
    /// The lease that keeps the lead, for tests that take it away as etcd would, after
    /// stopping its renewal (which would notice).
    #[cfg(test)]
    pub fn stop_renewing_for_tests(&self) -> i64 {
        let _ = self.stop_renewing.send(true);
        self.lease
    }

    /// Gives the lead up at once (revokes the lease), so that a standby need not wait for it
    /// to run out.
    pub async fn resign(self) {
        let _ = self.stop_renewing.send(true);
        self.fence.lost.lose("it stopped".into());
        match tokio::time::timeout(Duration::from_secs(2), self.etcd.revoke(self.lease)).await {
            Ok(Ok(())) => tracing::info!("gave up the lead"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not give up the lead; it runs out"),
            Err(_) => tracing::warn!("etcd did not answer; the lead runs out instead"),
        }
    }
}
