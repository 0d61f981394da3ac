//! The controller's core: the fleets, one rollout engine per release, the connected agents.
//!
//! Every change goes through [`Controller::step`]: feed the engine, drain its commands, make
//! the new state durable in one transaction, and only then send desired states to agents,
//! publish history to watchers and call webhooks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use chrono::{DateTime, Utc};
use fleet::Manifest;
use fleet_engine::RegionStats;
use fleet_engine::{Command, Engine, Event, Phase};
use fleet_proto::tally::Tally;
use fleet_proto::v1 as pb;
use prost::Message;
use tokio::sync::{Notify, broadcast, mpsc};
use tonic::Status;

use crate::applied::region_applied;
use crate::convert;
use crate::retention;
use crate::store::answer::Asked;
use crate::store::{self, Embedded, ReleaseChange, Store, StoredFleet, StoredRelease};
use crate::webhook;

pub type AgentTx = mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>;

pub struct Controller {
    pub(crate) store: Box<dyn Store>,
    pub epoch: u64,
    /// Of each service, how many ended releases it keeps (0: all).
    pub(crate) keep_releases: usize,
    /// Held through each mutating call of the API, from looking for its answer to storing it.
    pub(crate) requests: Mutex<()>,
    inner: Mutex<Inner>,
    pub(crate) events: broadcast::Sender<pb::ReleaseEvent>,
    wake: Notify,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub fleets: BTreeMap<String, Fleet>,
    pub releases: BTreeMap<String, Running>,
    pub agents: BTreeMap<u64, Agent>,
    /// The last desired state sent to each region.
    pub desired: BTreeMap<String, pb::DesiredState>,
    traffic: Traffic,
    next_conn: u64,
}

/// The manifest release `id` runs on: the one it was started with (for a release stored
/// before releases kept theirs, its service's `fleet` now), with its strategy override.
fn manifest_of(
    store: &dyn Store,
    id: &str,
    r: &StoredRelease,
    fleet: Option<&Arc<Manifest>>,
) -> anyhow::Result<Arc<Manifest>> {
    let manifest = match store.release_manifest(id)? {
        Some(source) => Arc::new(
            fleet::load_kept(&source)
                .map_err(|d| anyhow::anyhow!("release {id}'s manifest no longer validates: {d:?}"))?
                .manifest,
        ),
        None => fleet
            .with_context(|| format!("release {id} names unknown service {}", r.service))?
            .clone(),
    };
    match &r.strategy_override {
        Some(strategy) => Ok(Arc::new(
            fleet::with_strategy(&manifest, strategy, fleet::Rules::Kept).map_err(|d| {
                anyhow::anyhow!("release {id}'s strategy no longer validates: {d:?}")
            })?,
        )),
        None => Ok(manifest),
    }
}

/// Each region's traffic counters, added up report by report over its clusters, so that they
/// only grow while the controller runs: an agent that restarts, reconnects or misses a report
/// neither takes its counts out of its region's nor puts in what it counted before
/// (`fleet_proto::tally`).
pub(crate) struct Traffic {
    since_unix_ms: u64,
    regions: BTreeMap<String, Tally<String>>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            since_unix_ms: u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0),
            regions: BTreeMap::new(),
        }
    }
}

impl Traffic {
    /// Takes the counters of a cluster's agent (counting since `started`); the region's,
    /// added up.
    fn observe(
        &mut self,
        region: &str,
        cluster: &str,
        started: u64,
        stats: Option<pb::TrafficStats>,
    ) -> RegionStats {
        let since = self.since_unix_ms;
        let tally = (self.regions.entry(region.to_string())).or_insert_with(|| Tally::new(since));
        if let Some(stats) = stats {
            tally.observe(cluster.to_string(), started, stats);
        }
        convert::stats(tally.total(), since)
    }
}

impl Inner {
    /// Sends `d` to every connected agent of `region` that a manifest names ([`Self::named`])
    /// or that is one of `also` (the agents the release that desires it names there, which
    /// has just ended if it was superseded), and keeps it as the region's last desired state,
    /// for agents that connect later.
    fn deliver(&mut self, region: String, d: pb::DesiredState, also: &[String]) {
        let to: Vec<u64> = (self.agents.iter())
            .filter(|(_, a)| a.region == region)
            .filter(|(_, a)| also.contains(&a.cluster) || self.named(&a.region, &a.cluster))
            .map(|(conn, _)| *conn)
            .collect();
        for conn in to {
            if let Some(agent) = self.agents.get_mut(&conn) {
                agent.send(&d);
            }
        }
        self.desired.insert(region, d);
    }

    /// Whether an agent of each of `clusters` of `region` is connected.
    pub fn reachable(&self, clusters: &[fleet::model::Cluster], region: &str) -> bool {
        (clusters.iter())
            .all(|c| (self.agents.values()).any(|a| a.region == region && a.cluster == c.agent))
    }

    /// Whether the agent of `cluster` in `region` is one a manifest names: its service's
    /// fleet now, or a release under way (started before the fleet changed). Only those are
    /// sent desired states: another (left over from a renamed cluster, say) would apply steps
    /// that no release judges or rolls back, as no release hears it.
    pub fn named(&self, region: &str, cluster: &str) -> bool {
        let names = |m: &Manifest| crate::agents::names(m, region, cluster);
        self.fleets.values().any(|f| names(&f.manifest))
            || (self.releases.values())
                .filter(|r| !r.engine.state().phase.is_terminal())
                .any(|r| names(r.engine.manifest()))
    }
}

/// The names the agents of `region`'s clusters say in `manifest`.
fn agents_in(manifest: &Manifest, region: &str) -> Vec<String> {
    let clusters = manifest.region(region).map(|r| r.clusters.as_slice());
    (clusters.unwrap_or_default().iter())
        .map(|c| c.agent.clone())
        .collect()
}

/// The version a release leaves running, for the service's record: the new one once it
/// succeeded, the old one when it has just rolled back (aborted, failed or superseded), so
/// that the next start knows what runs. Pure.
fn ran_now(state: &fleet_engine::State, ended_now: bool) -> Option<&str> {
    match state.phase {
        Phase::Succeeded => Some(&state.spec.to_version),
        Phase::RolledBack { .. } if ended_now => Some(&state.spec.from_version),
        _ => None,
    }
}

fn desired_message(d: pb::DesiredState) -> pb::ControllerMessage {
    pb::ControllerMessage {
        message: Some(pb::controller_message::Message::Desired(d)),
    }
}

pub(crate) struct Fleet {
    pub manifest: Arc<Manifest>,
    pub source: String,
    pub applied_at_ms: i64,
}

pub(crate) struct Running {
    pub engine: Engine,
    pub service: String,
    pub strategy_override: Option<String>,
    pub started_at_ms: i64,
    pub history_len: u64,
    /// The fleet manifest it was started with, until its first change stores it.
    pub unstored_manifest: Option<String>,
}

pub(crate) struct Agent {
    pub region: String,
    pub cluster: String,
    pub tx: AgentTx,
    /// Its last report, but for the counters, which went into its region's tally.
    pub status: Option<pb::AgentStatus>,
    /// Its version, and the driver it applies desired states with, as its hello said.
    pub version: String,
    pub driver: String,
    /// The agent process, as its hello said (`Hello::instance`).
    pub instance: String,
    pub connected_at_ms: i64,
    /// When its last report came (0: none yet).
    pub reported_at_ms: i64,
    /// The desired state last sent on its stream.
    pub sent: Option<pb::DesiredState>,
}

impl Agent {
    /// Sends `d` on the agent's stream, unless it was the last sent there: an agent that
    /// comes back is sent its region's state as it says hello, and again as the release
    /// hears its region reachable.
    fn send(&mut self, d: &pb::DesiredState) {
        if self.sent.as_ref() != Some(d) {
            let _ = self.tx.send(Ok(desired_message(d.clone())));
            self.sent = Some(d.clone());
        }
    }
}

/// Logs every region that two services' fleets have (a store from before regions were
/// checked): a region's agents run one service.
fn warn_of_shared_regions(fleets: &BTreeMap<String, Fleet>) {
    let mut services: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (service, fleet) in fleets {
        for region in &fleet.manifest.regions {
            services.entry(&region.name).or_default().push(service);
        }
    }
    for (region, services) in services.into_iter().filter(|(_, s)| s.len() > 1) {
        tracing::warn!(
            region,
            services = ?services,
            "a region of several services' fleets: its agents run one service; name each \
             service's regions apart (a fleet may keep the regions it has, but no fleet may \
             take another's, nor a release start where another service's release is under way)"
        );
    }
}

impl Controller {
    /// Opens the store in `dir`, takes a new epoch, and restores every fleet and release,
    /// keeping `keep_releases` ended releases of each service.
    pub fn open(dir: &std::path::Path, keep_releases: usize) -> anyhow::Result<Arc<Controller>> {
        Controller::open_store(Box::new(Embedded::open(dir)?), keep_releases)
    }

    /// Takes a new epoch from `store` and restores every fleet and release from it.
    pub(crate) fn open_store(
        store: Box<dyn Store>,
        keep_releases: usize,
    ) -> anyhow::Result<Arc<Controller>> {
        let epoch = store.next_epoch()?;
        let mut inner = Inner::default();
        for f in store.fleets()? {
            let manifest = fleet::load_kept(&f.manifest)
                .map_err(|d| {
                    anyhow::anyhow!("stored fleet {} no longer validates: {d:?}", f.service)
                })?
                .manifest;
            inner.fleets.insert(
                f.service.clone(),
                Fleet {
                    manifest: Arc::new(manifest),
                    source: f.manifest,
                    applied_at_ms: f.applied_at_ms,
                },
            );
        }
        warn_of_shared_regions(&inner.fleets);
        for (id, r) in store.releases()? {
            let fleet = inner.fleets.get(&r.service).map(|f| &f.manifest);
            let manifest = match manifest_of(&*store, &id, &r, fleet) {
                Ok(manifest) => manifest,
                // An ended release is only read: one whose manifest this controller no longer
                // takes (its checks grew stricter, say) is shown on its fleet's, rather than
                // keep the controller from starting.
                Err(e) if r.state.phase.is_terminal() => match fleet {
                    Some(fleet) => {
                        tracing::warn!(release = %id, error = %e, "shown on its fleet's manifest");
                        fleet.clone()
                    }
                    None => {
                        tracing::warn!(release = %id, error = %e, "not restored");
                        continue;
                    }
                },
                Err(e) => return Err(e),
            };
            let engine = Engine::restore(manifest, r.state);
            inner.releases.insert(
                id,
                Running {
                    engine,
                    service: r.service,
                    strategy_override: r.strategy_override,
                    started_at_ms: r.started_at_ms,
                    history_len: r.history_len,
                    unstored_manifest: None,
                },
            );
        }
        for (region, bytes) in store.desired()? {
            let mut desired =
                pb::DesiredState::decode(bytes.as_slice()).context("stored desired state")?;
            // Same seq under the new epoch: agents acknowledge it without applying it again.
            desired.epoch = epoch;
            inner.desired.insert(region, desired);
        }
        tracing::info!(
            epoch,
            fleets = inner.fleets.len(),
            releases = inner.releases.len(),
            "controller store open"
        );
        let (events, _) = broadcast::channel(4096);
        let controller = Controller {
            store,
            epoch,
            keep_releases,
            requests: Mutex::new(()),
            inner: Mutex::new(inner),
            events,
            wake: Notify::new(),
        };
        controller.forget_old(&mut controller.lock(), None)?;
        // A start writes its regions' baselines after the release: a controller that stopped
        // in between writes them now, before any region is steered.
        {
            let mut inner = controller.lock();
            let running: Vec<String> = (inner.releases.iter())
                .filter(|(_, run)| !run.engine.state().phase.is_terminal())
                .map(|(id, _)| id.clone())
                .collect();
            for id in running {
                controller.baseline(&mut inner, &id)?;
            }
        }
        Ok(Arc::new(controller))
    }

    /// Forgets every ended release beyond the newest `keep_releases` of its service, but
    /// `just_ended` (its watchers and webhooks have yet to hear of its end): in the store
    /// first, then here. Then the answers to requests older than a day.
    fn forget_old(&self, inner: &mut Inner, just_ended: Option<&str>) -> anyhow::Result<()> {
        self.forget_old_releases(inner, just_ended)?;
        let now_ms = Utc::now().timestamp_millis();
        let keep_for = i64::try_from(store::answer::KEEP_FOR.as_millis()).unwrap_or(i64::MAX);
        let answers = self.store.forget_answers(now_ms - keep_for, now_ms)?;
        if answers > 0 {
            tracing::info!(answers, "forgot answers to requests older than a day");
        }
        Ok(())
    }

    /// The releases part of [`Controller::forget_old`].
    fn forget_old_releases(
        &self,
        inner: &mut Inner,
        just_ended: Option<&str>,
    ) -> anyhow::Result<()> {
        let seen = inner.releases.iter().map(|(id, run)| retention::Seen {
            id,
            service: &run.service,
            ended: run.engine.state().phase.is_terminal(),
        });
        let old = retention::forget(seen, self.keep_releases, just_ended);
        if old.is_empty() {
            return Ok(());
        }
        self.store.forget(&old)?;
        for id in &old {
            inner.releases.remove(id);
        }
        tracing::info!(releases = ?old, keep = self.keep_releases, "forgot ended releases");
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; carry on with it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Feeds release `id` through `f`, persists the outcome, then acts on it.
    pub(crate) fn step(
        self: &Arc<Self>,
        inner: &mut Inner,
        id: &str,
        f: impl FnOnce(&mut Engine),
    ) -> anyhow::Result<()> {
        self.change(inner, id, f, None).map(drop)
    }

    /// [`Controller::step`] for `request`, whose answer (the release after the change) is
    /// stored with the change: a repeat of the request is answered with it and never made
    /// again, whatever fails after. The answer.
    pub(crate) fn step_answering(
        self: &Arc<Self>,
        inner: &mut Inner,
        id: &str,
        f: impl FnOnce(&mut Engine),
        request: &Asked,
    ) -> anyhow::Result<pb::Release> {
        let answer = self.change(inner, id, f, Some(request))?;
        answer.with_context(|| format!("no release {id}"))
    }

    /// [`Controller::step`], answering `request` if given.
    fn change(
        self: &Arc<Self>,
        inner: &mut Inner,
        id: &str,
        f: impl FnOnce(&mut Engine),
        request: Option<&Asked>,
    ) -> anyhow::Result<Option<pb::Release>> {
        let epoch = self.epoch;
        let Some(run) = inner.releases.get_mut(id) else {
            return Ok(None);
        };
        let was_under_way = !run.engine.state().phase.is_terminal();
        f(&mut run.engine);
        let mut events = Vec::new();
        let mut desired = Vec::new();
        let mut hooks = Vec::new();
        while let Some(command) = run.engine.poll_command() {
            match command {
                Command::Record(e) => {
                    events.push((run.history_len, e));
                    run.history_len += 1;
                }
                Command::Desire { region, desired: d } => {
                    desired.push((region, convert::desired(epoch, run.engine.manifest(), &d)));
                }
                hook @ Command::CallWebhook { .. } => hooks.push(hook),
            }
        }
        let state = run.engine.state();
        let ended_now = was_under_way && state.phase.is_terminal();
        let record = StoredRelease {
            service: run.service.clone(),
            strategy_override: run.strategy_override.clone(),
            started_at_ms: run.started_at_ms,
            history_len: run.history_len,
            state: state.clone(),
        };
        let encoded: Vec<(String, Vec<u8>)> = desired
            .iter()
            .map(|(r, d)| (r.clone(), d.encode_to_vec()))
            .collect();
        let answer = request.map(|_| convert::release(id, run.started_at_ms, &run.engine));
        let now_ms = Utc::now().timestamp_millis();
        let answer_bytes = (answer.as_ref().zip(request))
            .map(|(a, r)| store::answer::kept(now_ms, r.fingerprint, &a.encode_to_vec()));
        self.store.save_release(ReleaseChange {
            id,
            release: &record,
            events: &events,
            desired: &encoded,
            version: ran_now(state, ended_now).map(|v| (record.service.as_str(), v)),
            manifest: run.unstored_manifest.as_deref(),
            answer: request.map(|r| r.key.as_str()).zip(answer_bytes.as_deref()),
        })?;
        run.unstored_manifest = None;
        let to: Vec<Vec<String>> = (desired.iter())
            .map(|(region, _)| agents_in(run.engine.manifest(), region))
            .collect();
        // Durable: now it may leave.
        for ((region, d), also) in desired.into_iter().zip(to) {
            inner.deliver(region, d, &also);
        }
        for (index, e) in &events {
            let _ = self.events.send(convert::event(id, *index, e));
        }
        for hook in hooks {
            webhook::spawn(self.clone(), id.to_string(), hook);
        }
        self.wake.notify_one();
        if ended_now {
            // This change stands; a store that cannot forget is lost, and the controller
            // starts over.
            if let Err(e) = self.forget_old(inner, Some(id)) {
                tracing::error!(error = %e, "cannot forget old releases");
            }
        }
        Ok(answer)
    }

    /// Feeds an event to release `id`.
    pub fn handle(self: &Arc<Self>, id: &str, event: Event) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut inner = self.lock();
        self.step(&mut inner, id, |e| e.handle(now, event))
    }

    /// Wakes each engine when its next timer is due, until `shutdown`.
    pub async fn run_timers(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let next = self
                .lock()
                .releases
                .values()
                .filter_map(|r| r.engine.poll_timeout())
                .min();
            let wait = next.map_or(std::time::Duration::from_secs(3600), |t| {
                (t - Utc::now()).to_std().unwrap_or_default()
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = &mut shutdown => return,
            }
            let now = Utc::now();
            let mut inner = self.lock();
            let due: Vec<String> = inner
                .releases
                .iter()
                .filter(|(_, r)| r.engine.poll_timeout().is_some_and(|t| t <= now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                if let Err(e) = self.step(&mut inner, &id, |e| e.handle_timeout(now)) {
                    tracing::error!(release = %id, error = %e, "cannot persist a release's change");
                }
            }
        }
    }

    /// Ends every agent stream, as the controller stops; agents reconnect to the next one.
    pub fn disconnect_agents(&self) {
        self.lock().agents.clear();
    }

    /// Takes the stream of an agent that said `hello`, and sends it the region's desired
    /// state first thing: its connection's number. A stream of the agent already connected
    /// for the cluster (the same instance dialling again, or one that says no instance)
    /// replaces its older one, whose stream ends; another agent's is refused while that one
    /// is connected, saying which holds the cluster.
    pub fn agent_connected(self: &Arc<Self>, hello: pb::Hello, tx: AgentTx) -> Result<u64, String> {
        let mut inner = self.lock();
        let held = (inner.agents.iter())
            .find(|(_, a)| a.region == hello.region && a.cluster == hello.cluster)
            .map(|(conn, a)| (*conn, a));
        if let Some((conn, agent)) = held {
            // An agent from before instances were said cannot be told from its own redial:
            // it replaces the stream, as it did.
            if !hello.instance.is_empty() && agent.instance != hello.instance {
                let since = chrono::DateTime::from_timestamp_millis(agent.connected_at_ms)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                return Err(format!(
                    "cluster {} of region {} has an agent connected already (instance {:?}, version {}, since {since}); \
                     two agents for one cluster would fight over its workloads and its proxies' table: \
                     stop one, or give each its own --cluster",
                    hello.cluster, hello.region, agent.instance, agent.version
                ));
            }
            tracing::info!(region = %hello.region, cluster = %hello.cluster, "the agent dialled again: its new stream replaces the old");
            // Its sender dropped, the old stream ends.
            inner.agents.remove(&conn);
        }
        inner.next_conn += 1;
        let conn = inner.next_conn;
        let mut agent = Agent {
            region: hello.region.clone(),
            cluster: hello.cluster.clone(),
            tx,
            status: None,
            version: hello.agent_version.clone(),
            driver: crate::agents::driver(&hello.capabilities).to_string(),
            instance: hello.instance,
            connected_at_ms: Utc::now().timestamp_millis(),
            reported_at_ms: 0,
            sent: None,
        };
        match inner.named(&hello.region, &hello.cluster) {
            true => {
                if let Some(d) = inner.desired.get(&hello.region) {
                    agent.send(d);
                }
            }
            // Before any manifest is applied (a fleet coming up, agents first), that is as
            // expected; after, the cluster may be misnamed, or renamed away.
            false if inner.fleets.is_empty() && inner.releases.is_empty() => {
                tracing::info!(region = %hello.region, cluster = %hello.cluster, "an agent connected before any manifest was applied: it is sent its desired state once one names its cluster");
            }
            false => {
                tracing::warn!(region = %hello.region, cluster = %hello.cluster, "an agent of a cluster no manifest names: it is sent no desired state until one does");
            }
        }
        tracing::info!(region = %hello.region, cluster = %hello.cluster, version = %hello.agent_version, "agent connected");
        inner.agents.insert(conn, agent);
        self.update_reachability(&mut inner, &hello.region);
        Ok(conn)
    }

    pub fn agent_gone(self: &Arc<Self>, conn: u64) {
        let mut inner = self.lock();
        if let Some(agent) = inner.agents.remove(&conn) {
            tracing::warn!(region = %agent.region, cluster = %agent.cluster, "agent gone");
            self.update_reachability(&mut inner, &agent.region);
        }
    }

    pub fn agent_status(self: &Arc<Self>, conn: u64, mut status: pb::AgentStatus) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(agent) = inner.agents.get_mut(&conn) else {
            return;
        };
        // The counters go into the region's tally; the status kept is the rest.
        let (started, counted) = (status.counting_since_unix_ms, status.stats.take());
        let stats = inner
            .traffic
            .observe(&agent.region, &agent.cluster, started, counted);
        agent.status = Some(status);
        agent.reported_at_ms = Utc::now().timestamp_millis();
        let region = agent.region.clone();
        let reports: Vec<(String, Option<pb::AgentStatus>)> = inner
            .agents
            .values()
            .filter(|a| a.region == region)
            .map(|a| (a.cluster.clone(), a.status.clone()))
            .collect();
        let active: Vec<String> = inner
            .releases
            .iter()
            .filter(|(_, r)| {
                !r.engine.state().phase.is_terminal()
                    && r.engine.state().regions.contains_key(&region)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in active {
            let applied = (inner.releases.get(&id))
                .and_then(|run| run.engine.manifest().region(&region))
                .and_then(|r| region_applied(&id, &r.clusters, &reports));
            let stats = stats.clone();
            let region = region.clone();
            let result = self.step(inner, &id, |e| {
                let now = Utc::now();
                // The numbers first: a step this report says is applied begins with them.
                e.handle(
                    now,
                    Event::Stats {
                        region: region.clone(),
                        stats,
                    },
                );
                if let Some(a) = applied {
                    let (seq, ready, detail) = (a.seq, a.ready, a.detail);
                    e.handle(
                        now,
                        Event::Applied {
                            region,
                            seq,
                            ready,
                            detail,
                        },
                    );
                }
            });
            if let Err(e) = result {
                tracing::error!(release = %id, error = %e, "cannot persist a release");
            }
        }
    }

    /// Tells every running release whether each cluster of `region` has its agent.
    fn update_reachability(self: &Arc<Self>, inner: &mut Inner, region: &str) {
        let ids: Vec<String> = inner
            .releases
            .iter()
            .filter(|(_, r)| !r.engine.state().phase.is_terminal())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(run) = inner.releases.get(&id) else {
                continue;
            };
            let Some(clusters) = run
                .engine
                .manifest()
                .region(region)
                .map(|r| r.clusters.clone())
            else {
                continue;
            };
            let reachable = inner.reachable(&clusters, region);
            let region = region.to_string();
            let result = self.step(inner, &id, |e| {
                e.handle(Utc::now(), Event::Reachable { region, reachable })
            });
            if let Err(e) = result {
                tracing::error!(release = %id, error = %e, "cannot persist a release");
            }
        }
    }

    /// Gives every region of release `id` that has never had a desired state of its service its baseline:
    /// the stable version alone. A region the controller has not steered before (the first
    /// release of a service) then runs the version it is said to run, before its wave starts.
    /// Made after the start is written, and again as the store is opened (for a start whose
    /// baselines a stop kept from being written).
    pub(crate) fn baseline(&self, inner: &mut Inner, id: &str) -> anyhow::Result<()> {
        let Some(run) = inner.releases.get(id) else {
            return Ok(());
        };
        let state = run.engine.state();
        let manifest = run.engine.manifest();
        let sticky = manifest
            .strategy
            .sticky
            .as_ref()
            .map(fleet_engine::output::StickyKey::from);
        let mut fresh = Vec::new();
        // The release's own regions (one restored on its fleet's manifest steers no region
        // added to that since).
        for region in state.regions.keys().cloned() {
            // Another service's, left from before the region was this one's: not this
            // service's baseline.
            let own = |d: &pb::DesiredState| d.service == state.spec.service;
            if inner.desired.get(&region).is_some_and(own) {
                continue;
            }
            let desired = fleet_engine::Desired {
                seq: 0,
                release: id.to_string(),
                stable: state.spec.from_version.clone(),
                canary: None,
                replicas: manifest.service.workload.replicas,
                traffic: fleet_engine::Traffic {
                    sticky: sticky.clone(),
                    ..Default::default()
                },
            };
            fresh.push((region, convert::desired(self.epoch, manifest, &desired)));
        }
        for (region, d) in &fresh {
            self.store.put_desired(region, &d.encode_to_vec())?;
        }
        for (region, d) in fresh {
            inner.deliver(region, d, &[]);
        }
        Ok(())
    }

    pub(crate) fn put_fleet(
        &self,
        inner: &mut Inner,
        manifest: Manifest,
        source: String,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let service = manifest.service.name.clone();
        let stored = StoredFleet {
            service: service.clone(),
            manifest: source.clone(),
            applied_at_ms: now.timestamp_millis(),
        };
        self.store.put_fleet(&stored)?;
        let unnamed: Vec<u64> = (inner.agents.iter())
            .filter(|(_, a)| !inner.named(&a.region, &a.cluster))
            .map(|(conn, _)| *conn)
            .collect();
        inner.fleets.insert(
            service,
            Fleet {
                manifest: Arc::new(manifest),
                source,
                applied_at_ms: stored.applied_at_ms,
            },
        );
        // An agent the manifest now names is sent its region's desired state, as it would
        // have been had it connected now.
        for conn in unnamed {
            let Some(agent) = inner.agents.get(&conn) else {
                continue;
            };
            let named = inner.named(&agent.region, &agent.cluster);
            if let (true, Some(d)) = (named, inner.desired.get(&agent.region).cloned())
                && let Some(agent) = inner.agents.get_mut(&conn)
            {
                agent.send(&d);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::answer::{KEEP_FOR, stamped};

    #[test]
    fn a_fleet_stored_before_a_stricter_rule_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let source = include_str!("../../deploy/examples/quick.yaml");
        // Taken when durations over 30 days were: refused now, kept with a warning.
        let old = format!("{source}progress_deadline: 45d\n");
        assert!(fleet::load(&old).is_err());
        let store = Embedded::open(dir.path()).unwrap();
        let fleet = StoredFleet {
            service: "demo".into(),
            manifest: old,
            applied_at_ms: 1,
        };
        store.put_fleet(&fleet).unwrap();
        drop(store);
        let controller = Controller::open(dir.path(), 0).unwrap();
        assert!(controller.lock().fleets.contains_key("demo"));
    }

    #[test]
    fn a_release_stored_without_its_baselines_gets_them_as_the_store_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let source = include_str!("../../deploy/examples/quick.yaml");
        let manifest = Arc::new(fleet::load(source).unwrap().manifest);
        let store = Embedded::open(dir.path()).unwrap();
        let fleet = StoredFleet {
            service: "demo".into(),
            manifest: source.into(),
            applied_at_ms: 1,
        };
        store.put_fleet(&fleet).unwrap();
        let mut engine = Engine::start(manifest, crate::demo_1(), Utc::now());
        // The start's own write, as `change` makes it, with what the engine desired at once;
        // the controller stopped before it wrote the other regions' baselines.
        let mut desired = Vec::new();
        while let Some(command) = engine.poll_command() {
            if let Command::Desire { region, desired: d } = command {
                let d = convert::desired(1, engine.manifest(), &d);
                desired.push((region, d.encode_to_vec()));
            }
        }
        let release = StoredRelease {
            service: "demo".into(),
            started_at_ms: 1,
            history_len: 0,
            strategy_override: None,
            state: engine.state().clone(),
        };
        store
            .save_release(ReleaseChange {
                id: "demo-1",
                release: &release,
                events: &[],
                desired: &desired,
                version: None,
                manifest: Some(source),
                answer: None,
            })
            .unwrap();
        // Another service's, left from before the region was demo's.
        let theirs = pb::DesiredState {
            service: "shop".into(),
            release_id: "shop-1".into(),
            ..Default::default()
        };
        store
            .put_desired("eu-west", &theirs.encode_to_vec())
            .unwrap();
        drop(store);

        let controller = Controller::open(dir.path(), 0).unwrap();
        let stored: BTreeMap<String, pb::DesiredState> = (controller.store.desired().unwrap())
            .into_iter()
            .map(|(region, bytes)| (region, pb::DesiredState::decode(&bytes[..]).unwrap()))
            .collect();
        let regions: Vec<&str> = stored.keys().map(String::as_str).collect();
        assert_eq!(regions, ["eu-west", "us-east", "us-west"]);
        for (region, d) in &stored {
            assert_eq!(d.release_id, "demo-1", "{region}");
            let stable = d.stable.as_ref().map(|t| t.version.as_str());
            assert_eq!(stable, Some("v1"), "{region}");
        }
        let desired_first = desired.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>();
        for region in ["us-east", "eu-west"] {
            assert!(
                !desired_first.contains(&region),
                "{region} had no desired state of demo"
            );
            assert_eq!(stored[region].service, "demo", "{region}");
            assert!(stored[region].canary.is_none(), "{region}: the baseline");
        }
        assert_eq!(controller.lock().desired.len(), 3, "and delivered");
    }

    #[test]
    fn answers_older_than_a_day_are_forgotten_as_the_store_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now().timestamp_millis();
        let day = i64::try_from(KEEP_FOR.as_millis()).unwrap();
        let store = Embedded::open(dir.path()).unwrap();
        store
            .answer("pause/old", &stamped(now - day - 60_000, b"old"))
            .unwrap();
        store
            .answer("pause/new", &stamped(now - 60_000, b"new"))
            .unwrap();
        drop(store);
        let controller = Controller::open(dir.path(), 0).unwrap();
        assert_eq!(controller.store.answered("pause/old").unwrap(), None);
        let new = controller.store.answered("pause/new").unwrap();
        assert_eq!(new, Some(stamped(now - 60_000, b"new")));
    }
}
