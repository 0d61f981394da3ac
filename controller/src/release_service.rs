//! `fleet.v1.ReleaseService`: fleets and releases for tooling and fleetctl.

use std::pin::Pin;
use std::sync::Arc;

use chrono::Utc;
use fleet_engine::{Action, Engine, Event, ReleaseSpec};
use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_server::ReleaseService;
use fleet_yaml::check_version;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::identity::{Operator, Role};
use crate::regions;
use crate::runtime::{Controller, Running};
use crate::store::answer::{self, Asked};

pub struct Releases {
    pub controller: Arc<Controller>,
    /// Watch streams end when this turns true.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ReleaseEvent, Status>> + Send>>;

/// The gate of every call that changes something, which each such call passes first: a
/// viewer's request is refused here; an operator's gives the operator its certificate names
/// (under mutual TLS; `None` on a plain listener). A new changing call must begin with it.
fn may_change<T>(request: &Request<T>) -> Result<Option<Operator>, Status> {
    match request.extensions().get::<Role>() {
        Some(Role::Operator(name)) => Ok(Some(Operator(name.clone()))),
        Some(Role::Viewer(name)) => {
            let e = crate::identity::read_only(name);
            tracing::warn!(%e, "release API change refused");
            Err(Status::permission_denied(e))
        }
        None => Ok(None),
    }
}

/// Who acts: under mutual TLS the operator the certificate names, whatever the request's
/// `actor` says; else that `actor`, or `operator` when it is empty.
fn actor(caller: &Option<Operator>, claimed: &str) -> String {
    match caller {
        Some(Operator(name)) => name.clone(),
        None if claimed.is_empty() => "operator".into(),
        None => claimed.into(),
    }
}

/// How a call or stream ends that the controller cuts as it stops.
pub(crate) fn stopping() -> Status {
    Status::unavailable("the controller is stopping")
}

/// The answer for a service that has no fleet, naming the fix.
fn no_fleet(service: &str) -> Status {
    Status::not_found(format!(
        "no fleet for service \"{service}\": apply its manifest with `fleetctl apply`"
    ))
}

/// Maps an internal failure to a gRPC status, in one place.
fn internal(e: anyhow::Error) -> Status {
    tracing::error!(error = %e, "request failed");
    Status::internal(format!("{e:#}"))
}

/// A request that changes something, made once whatever its repeats.
trait Mutating: Message + Clone {
    fn request_id(&mut self) -> &mut String;
    /// Forgets who claims to make it: what is asked is the same whoever asks it again (a
    /// command run again in another shell, whose `$USER` differs). Under mutual TLS the
    /// request's key names the operator.
    fn forget_actor(&mut self) {}
}

impl Mutating for pb::ApplyFleetRequest {
    fn request_id(&mut self) -> &mut String {
        &mut self.request_id
    }
}

impl Mutating for pb::StartReleaseRequest {
    fn request_id(&mut self) -> &mut String {
        &mut self.request_id
    }
    fn forget_actor(&mut self) {
        self.actor.clear();
    }
}

impl Mutating for pb::OperatorRequest {
    fn request_id(&mut self) -> &mut String {
        &mut self.request_id
    }
    fn forget_actor(&mut self) {
        self.actor.clear();
    }
}

impl Releases {
    /// Answers a mutating request once: a repeat (the same request with the same id) gets the
    /// first answer; another request given the id of one answered is refused. Ids are each
    /// `method`'s own (an abort given a start's id is an abort, not the start's answer) and,
    /// under mutual TLS, each operator's own. `act` is given the request's key, and stores the
    /// answer: with its change (`Controller::step_answering`), or after it
    /// ([`Releases::keep_answer`]).
    fn once<T: Message + Default>(
        &self,
        method: &str,
        caller: &Option<Operator>,
        request: &impl Mutating,
        act: impl FnOnce(&Asked) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let mut asked = request.clone();
        let request_id = std::mem::take(asked.request_id());
        asked.forget_actor();
        if request_id.is_empty() {
            return Err(Status::invalid_argument(
                "request_id is empty: give every mutating call a unique id, e.g. a UUID",
            ));
        }
        let fingerprint = answer::fingerprint(&asked.encode_to_vec());
        let key = match caller {
            Some(Operator(name)) => format!("{method}/{name}/{request_id}"),
            None => format!("{method}/{request_id}"),
        };
        let request = Asked { key, fingerprint };
        // One mutating call at a time: two with the same id at once (a client that retried
        // while its first call waited on the store) make the change once.
        let _one_at_a_time = (self.controller.requests)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let store = &self.controller.store;
        // Not read (etcd unreachable, say): nothing was done, and another try may read it.
        let answered = store.answered(&request.key).map_err(|e| {
            Status::unavailable(format!(
                "cannot read the store, so nothing was done: {e:#}; make the call again"
            ))
        })?;
        if let Some(kept) = answered {
            let kept = answer::read(&kept);
            if kept.asked.is_some_and(|asked| asked != fingerprint) {
                return Err(Status::invalid_argument(format!(
                    "request_id {request_id} was given to another {method} call, with other \
                     arguments, which the controller answered: nothing was done. An id names \
                     one change, and makes it once; give this one an id of its own (fleetctl: \
                     leave out --request-id, and FLEET_REQUEST_ID unset)"
                )));
            }
            return T::decode(kept.answer)
                .map(Response::new)
                .map_err(|e| Status::internal(e.to_string()));
        }
        act(&request)
            .map(Response::new)
            .map_err(|s| self.starting_over(s))
    }

    /// Stores `answer` to `request`, made already: for a call whose change was not written
    /// with its answer.
    fn keep_answer(&self, request: &Asked, answer: &impl Message) -> Result<(), Status> {
        let now = Utc::now().timestamp_millis();
        let kept = answer::kept(now, request.fingerprint, &answer.encode_to_vec());
        (self.controller.store)
            .answer(&request.key, &kept)
            .map_err(internal)
    }

    /// A call that failed because the store takes no more writes is Unavailable, not
    /// Internal: the controller starts over from its store (or another leads), and the
    /// client should make the call again, with the same request_id.
    fn starting_over(&self, failed: Status) -> Status {
        match (failed.code(), self.controller.store.lost().why()) {
            (tonic::Code::Internal, Some(why)) => Status::unavailable(format!(
                "the controller is starting over from its store ({why}); the call may not \
                 have been made: make it again, with the same request_id, once the controller \
                 is back"
            )),
            _ => failed,
        }
    }

    fn release(&self, id: &str) -> Result<pb::Release, Status> {
        let inner = self.controller.lock();
        let run = inner.releases.get(id).ok_or_else(|| {
            let keep = self.controller.keep_releases;
            let forgotten = match keep {
                0 => String::new(),
                keep => format!(", or it was forgotten: of each service the controller keeps the newest {keep} ended releases (--keep-releases)"),
            };
            Status::not_found(format!("no release {id}{forgotten}"))
        })?;
        Ok(convert::release(id, run.started_at_ms, &run.engine))
    }

    fn operator(
        &self,
        request: Request<pb::OperatorRequest>,
        action: Action,
    ) -> Result<Response<pb::Release>, Status> {
        let caller = may_change(&request)?;
        let r = request.into_inner();
        let actor = actor(&caller, &r.actor);
        let id = r.id.clone();
        let method = format!("{action:?}").to_lowercase();
        self.once(&method, &caller, &r, |request| {
            let event = Event::Operator {
                action,
                actor,
                reason: r.reason.clone(),
            };
            let mut inner = self.controller.lock();
            let Some(run) = inner.releases.get(&id) else {
                return Err(Status::not_found(format!("no release {id}")));
            };
            let refused = match (action, r.gate.as_str()) {
                (_, "") => run.engine.refusal(action),
                (Action::Promote, gate) => match fleet_engine::gate_name(gate) {
                    Ok(name) => run.engine.gate_refusal(&name),
                    Err(why) => {
                        return Err(Status::invalid_argument(format!(
                            "gate {why}; nothing changed"
                        )));
                    }
                },
                (_, gate) => {
                    return Err(Status::invalid_argument(format!(
                        "gate {gate:?} is for a promote, not a {method}; nothing changed"
                    )));
                }
            };
            if let Some(why) = refused {
                return Err(Status::failed_precondition(format!(
                    "release {id}: {why}; nothing changed"
                )));
            }
            let now = Utc::now();
            let answer = self
                .controller
                .step_answering(&mut inner, &id, |e| e.handle(now, event), request)
                .map_err(internal)?;
            Ok(answer)
        })
    }
}

#[tonic::async_trait]
impl ReleaseService for Releases {
    async fn apply_fleet(
        &self,
        request: Request<pb::ApplyFleetRequest>,
    ) -> Result<Response<pb::ApplyFleetResponse>, Status> {
        let caller = may_change(&request)?;
        let r = request.into_inner();
        self.once("apply_fleet", &caller, &r, |request| {
            let max = fleet_proto::MAX_MANIFEST_BYTES;
            if r.manifest.len() > max {
                return Err(Status::invalid_argument(format!(
                    "the manifest is {} bytes, above the {max} (1 MiB) a controller keeps; nothing changed",
                    r.manifest.len()
                )));
            }
            let loaded = fleet::load(&r.manifest).map_err(|diags| {
                let lines: Vec<String> = diags
                    .iter()
                    .map(|d| d.in_file("manifest").to_string())
                    .collect();
                Status::invalid_argument(format!(
                    "the manifest is invalid; nothing changed:\n{}",
                    lines.join("\n")
                ))
            })?;
            let mut warnings: Vec<pb::Diagnostic> =
                loaded.warnings.iter().map(convert::diagnostic).collect();
            let service = loaded.manifest.service.name.clone();
            let mut inner = self.controller.lock();
            let under_way: Vec<(&str, &fleet::Manifest)> = (inner.releases.iter())
                .filter(|(_, r)| r.service == service && !r.engine.state().phase.is_terminal())
                .map(|(id, r)| (id.as_str(), r.engine.manifest()))
                .collect();
            let gone = regions::clusters_gone_under(&under_way, &loaded.manifest, &r.manifest);
            warnings.extend(gone);
            // In the file's order, as the loader gives its own.
            warnings.sort_by_key(|w| (w.line, w.column));
            let held = regions::held_by_others(&inner, &service);
            let had: Vec<String> = (inner.fleets.get(&service).into_iter())
                .flat_map(|f| f.manifest.regions.iter().map(|r| r.name.clone()))
                .collect();
            if let Some(why) = regions::refuse_fleet(&held, &had, &loaded.manifest) {
                return Err(Status::failed_precondition(why));
            }
            self.controller
                .put_fleet(&mut inner, loaded.manifest, r.manifest.clone(), Utc::now())
                .map_err(internal)?;
            let fleet = inner.fleets.get(&service).map(|f| fleet_proto(&service, f));
            drop(inner);
            // Applied again if its answer is lost: to the same effect.
            let answer = pb::ApplyFleetResponse { fleet, warnings };
            self.keep_answer(request, &answer)?;
            Ok(answer)
        })
    }

    async fn get_fleet(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let service = request.into_inner().service;
        let inner = self.controller.lock();
        let fleet = inner
            .fleets
            .get(&service)
            .ok_or_else(|| no_fleet(&service))?;
        Ok(Response::new(fleet_proto(&service, fleet)))
    }

    async fn list_fleets(
        &self,
        _: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        let inner = self.controller.lock();
        let fleets = inner
            .fleets
            .iter()
            .map(|(s, f)| fleet_proto(s, f))
            .collect();
        Ok(Response::new(pb::ListFleetsResponse { fleets }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let service = request.into_inner().service;
        let inner = self.controller.lock();
        let fleet = match service.as_str() {
            "" => None,
            s => Some(inner.fleets.get(s).ok_or_else(|| no_fleet(s))?),
        };
        let named = |a: &crate::runtime::Agent| inner.named(&a.region, &a.cluster);
        let agents = crate::agents::list(&inner.agents, fleet.map(|f| &*f.manifest), named);
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn start_release(
        &self,
        request: Request<pb::StartReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let caller = may_change(&request)?;
        let r = request.into_inner();
        let actor = actor(&caller, &r.actor);
        self.once("start_release", &caller, &r, |request| {
            // The request's own faults first: they are the caller's to fix, whatever runs.
            check_version("version", &r.version).map_err(Status::invalid_argument)?;
            if !r.emergency_reason.is_empty() && r.emergency_reason.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "emergency_reason is blank: give the reason, which is recorded (or leave it empty for an ordinary release)",
                ));
            }
            if !r.from_version.is_empty() {
                check_version("from_version", &r.from_version).map_err(Status::invalid_argument)?;
            }
            let controller = &self.controller;
            let mut inner = controller.lock();
            // Read under the lock: a release that ends meanwhile writes what it leaves running.
            let from = controller.store.version(&r.service).map_err(internal)?;
            let (manifest, source) = inner
                .fleets
                .get(&r.service)
                .map(|f| (f.manifest.clone(), f.source.clone()))
                .ok_or_else(|| no_fleet(&r.service))?;
            let strategy_override = (!r.strategy_override.trim().is_empty()).then(|| r.strategy_override.clone());
            let manifest = match &strategy_override {
                Some(strategy) => Arc::new(fleet::with_strategy(&manifest, strategy, fleet::Rules::Now).map_err(|diags| {
                    let lines: Vec<String> = diags.iter().map(|d| d.in_file("strategy_override").to_string()).collect();
                    Status::invalid_argument(format!("the strategy override is invalid; nothing changed:\n{}", lines.join("\n")))
                })?),
                None => manifest,
            };
            let running: Vec<String> = inner
                .releases
                .iter()
                .filter(|(_, run)| run.service == r.service && !run.engine.state().phase.is_terminal())
                .map(|(id, _)| id.clone())
                .collect();
            if let Some(why) = regions::refuse_release(&regions::held_by_others(&inner, &r.service), &manifest) {
                return Err(Status::failed_precondition(why));
            }
            // Every check comes before any change, so that a refused request changes nothing.
            if let (Some(id), false) = (running.first(), r.supersede) {
                let rolling_back = (inner.releases.get(id))
                    .is_some_and(|run| matches!(run.engine.state().phase, fleet_engine::Phase::RollingBack { .. }));
                let or = match rolling_back {
                    true => "is rolling back; wait for it, or pass supersede (fleetctl: --supersede) to start this one now",
                    false => "is still running; wait for it, abort it, or pass supersede (fleetctl: --supersede) to roll it back and start this one",
                };
                return Err(Status::failed_precondition(format!("release {id} of {} {or}", r.service)));
            }
            // What runs now: the last version released, else what a superseded release rolls
            // back to, else what the caller says.
            let superseded_from = running.first().and_then(|id| inner.releases.get(id)).map(|run| run.engine.state().spec.from_version.clone());
            let from_version = match (from.or(superseded_from), r.from_version.is_empty()) {
                (Some(v), false) if v != r.from_version => {
                    return Err(Status::invalid_argument(format!(
                        "from_version \"{}\" is not what runs: {} runs {v}, as its releases left it; leave from_version out (fleetctl: --from)",
                        r.from_version, r.service
                    )));
                }
                (Some(v), _) => v,
                (None, false) => r.from_version.clone(),
                (None, true) => {
                    return Err(Status::failed_precondition(format!(
                        "the controller has not released {} before and does not know which version runs now; pass from_version (fleetctl: --from VERSION)",
                        r.service
                    )));
                }
            };
            if r.version == from_version {
                return Err(Status::invalid_argument(format!("version \"{}\" is the one running already: nothing to release", r.version)));
            }
            // Taken once every check has passed, so that a refused start uses no number up.
            let number = controller.store.next_release_number().map_err(internal)?;
            let id = format!("{}-{number}", r.service);
            // Every release of the service under way (one, but for a store from before
            // supersede ended them) ends: the new one takes its regions over.
            for old in &running {
                let now = Utc::now();
                let by = format!("{id} ({})", r.version);
                controller.step(&mut inner, old, |e| e.supersede(now, &actor, &by)).map_err(internal)?;
            }
            let spec = ReleaseSpec {
                id: id.clone(),
                service: r.service.clone(),
                from_version,
                to_version: r.version.clone(),
                emergency: (!r.emergency_reason.is_empty()).then(|| r.emergency_reason.clone()),

                actor,
            };
            // A new release counts every region reachable: it is told of those whose agents
            // are not all connected now, which hold until they are (as when agents go).
            let unreachable: Vec<String> = (manifest.regions.iter())
                .filter(|g| !inner.reachable(&g.clusters, &g.name))
                .map(|g| g.name.clone())
                .collect();
            let now = Utc::now();
            inner.releases.insert(
                id.clone(),
                Running {
                    engine: Engine::start(manifest, spec, now),
                    service: r.service.clone(),
                    strategy_override,
                    started_at_ms: now.timestamp_millis(),
                    history_len: 0,
                    unstored_manifest: Some(source),
                },
            );
            let told = |e: &mut Engine| {
                for region in unreachable {
                    e.handle(now, Event::Reachable { region, reachable: false });
                }
            };
            let answer = match controller.step_answering(&mut inner, &id, told, request) {
                Ok(answer) => answer,
                Err(e) => {
                    // Not stored, so not started (the controller starts over from its store).
                    inner.releases.remove(&id);
                    return Err(internal(e));
                }
            };
            controller.baseline(&mut inner, &id).map_err(internal)?;
            Ok(answer)
        })
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        self.release(&request.into_inner().id).map(Response::new)
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let service = request.into_inner().service;
        let inner = self.controller.lock();
        let mut releases: Vec<pb::Release> = inner
            .releases
            .iter()
            .filter(|(_, r)| service.is_empty() || r.service == service)
            .map(|(id, r)| convert::release(id, r.started_at_ms, &r.engine))
            .collect();
        // Oldest first: by when each started, then by number (demo-9 before demo-10), where
        // the ids' text order put demo-10 first.
        releases.sort_by(|a, b| {
            (a.started_at_ms, a.id.len(), &a.id).cmp(&(b.started_at_ms, b.id.len(), &b.id))
        });
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        // Subscribe before reading the stored history, so that nothing falls between them.
        let mut live = self.controller.events.subscribe();
        self.release(&r.id)?;
        let past = self
            .controller
            .store
            .history(&r.id, r.after_index)
            .map_err(internal)?;
        let controller = self.controller.clone();
        let id = r.id.clone();
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            let mut next = r.after_index;
            for (index, e) in past {
                if tx.send(Ok(convert::event(&id, index, &e))).await.is_err() {
                    return;
                }
                next = index + 1;
            }
            loop {
                let ended = (controller.lock().releases.get(&id))
                    .map(|run| run.engine.state().phase.is_terminal() && run.history_len <= next);
                match ended {
                    Some(false) => {}
                    Some(true) => return,
                    // Forgotten (`--keep-releases`) before all was sent: not a clean end.
                    None => {
                        let _ = tx
                            .send(Err(Status::not_found(format!(
                                "release {id} was forgotten"
                            ))))
                            .await;
                        return;
                    }
                }
                // The stream ends cleanly only once the release has ended and everything is
                // sent; a client told otherwise follows it again from where it stopped.
                let received = tokio::select! {
                    received = live.recv() => received,
                    _ = shutdown.wait_for(|stop| *stop) => Err(RecvError::Closed),
                };
                match received {
                    Ok(e) if e.release_id == id && e.index >= next => {
                        next = e.index + 1;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the live feed: catch up from the store.
                        let missed = match controller.store.history(&id, next) {
                            Ok(missed) => missed,
                            Err(e) => {
                                let _ = tx.send(Err(internal(e))).await;
                                return;
                            }
                        };
                        for (index, e) in missed {
                            next = index + 1;
                            if tx.send(Ok(convert::event(&id, index, &e))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => {
                        let _ = tx.send(Err(stopping())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let id = request.into_inner().id;
        self.release(&id)?;
        let events = self
            .controller
            .store
            .history(&id, 0)
            .map_err(internal)?
            .iter()
            .map(|(index, e)| convert::event(&id, *index, e))
            .collect();
        // Forgotten meanwhile: not found, rather than an empty history.
        self.release(&id)?;
        Ok(Response::new(pb::HistoryResponse { events }))
    }

    async fn promote(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        self.operator(request, Action::Promote)
    }

    async fn pause(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        self.operator(request, Action::Pause)
    }

    async fn resume(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        self.operator(request, Action::Resume)
    }

    async fn abort(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        self.operator(request, Action::Abort)
    }
}

fn fleet_proto(service: &str, f: &crate::runtime::Fleet) -> pb::Fleet {
    pb::Fleet {
        service: service.to_string(),
        manifest: f.source.clone(),
        applied_at_ms: f.applied_at_ms,
        regions: f.manifest.regions.iter().map(|r| r.name.clone()).collect(),
        waves: f.manifest.waves.iter().map(|w| w.name.clone()).collect(),
    }
}

/// A stream fed by a task through a small channel; the task stops when the client goes.
pub(crate) fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_an_image_tag_that_may_be_a_label_value() {
        for ok in ["v2", "1.4.0-rc.1", "V2_b", "a".repeat(63).as_str()] {
            assert_eq!(check_version("version", ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_version("version", ""),
            Err("version is empty: give the version to release, e.g. v2".into())
        );
        for bad in [
            "v 3; rm -rf /",
            "-v2",
            ".v2",
            "v2/x",
            "a".repeat(64).as_str(),
            "_x",
            "v2_",
            "v\u{e9}",
        ] {
            let said = check_version("from_version", bad).unwrap_err();
            assert!(
                said.starts_with(&format!("from_version {bad:?} is not a version")),
                "{said}"
            );
        }
    }
}
