//! The `kubernetes` driver, and the proxies found as pods (`--proxy-pods`), against a FAKE
//! Kubernetes API server, through kube-rs's documented test harness (a `tower_test` mock
//! service under a real `kube::Client`).
//!
//! What this shows: the requests the driver makes (paths, label selectors, server-side apply
//! with its field manager, the Deployment it sends as JSON typed by k8s-openapi, the lists and
//! watches kube-runtime makes), and how it reads what an API server answers (lists, watch
//! events, statuses, pods, errors). What it cannot show: that a real API server and its
//! controllers behave as the fake does. The fake keeps Deployments and pods in memory, filters
//! by label selector, bumps a Deployment's generation when its spec changes, and sends every
//! change to the watches open as ADDED, MODIFIED or DELETED, numbered by a resourceVersion of
//! its own (it ends a watch, or answers one 410 Gone, only when a test says, and sends no
//! bookmarks); it honours a DELETE's uid precondition; it runs no controllers (a test sets
//! statuses and pods itself), checks no schema and knows no RBAC. A request it holds (`hang`)
//! fails, once it answers again, as a read that timed out.
//!
//! The driver learns of a test's changes through its watches, a moment after they are made,
//! so a test polls it until it reports them (`poll_until`); its own writes it waits for.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use fleet_agent::discover::{FIRST_LOOK_TIMEOUT, Proxy, ProxySource};
use fleet_agent::driver::kubernetes::{KubernetesDriver, ROUND_TIMEOUT};
use fleet_agent::driver::{Driver, Running, Want};
use fleet_agent::watched::Tally;
use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
struct Asked {
    method: Method,
    uri: String,
    content_type: String,
    body: Value,
}

/// The fake API server's state (test-only).
#[derive(Default)]
struct Cluster {
    deployments: BTreeMap<String, Value>,
    /// HorizontalPodAutoscalers, as applied (the fake merges nothing).
    autoscalers: BTreeMap<String, Value>,
    pods: Vec<Value>,
    seen: Vec<Asked>,
    /// Answered to every PATCH instead of applying it.
    refuse_patches: Option<(StatusCode, Value)>,
    /// Autoscalers cannot be listed (a Role from before autoscaling).
    refuse_autoscaler_lists: bool,
    /// Pods cannot be listed.
    refuse_pod_lists: bool,
    /// Watches are refused (a Role without `watch`).
    refuse_watches: bool,
    /// Bumped to end the watches open (`end_watches`).
    watches_ended: u32,
    /// The next watch of pods is told 410 Gone (too far behind) and ended.
    gone_once: bool,
    /// Changes are held from the watches until `release_events` (a real API server promises
    /// no order between a request's answer and its watch event).
    hold_events: bool,
    /// Answered to every DELETE instead of deleting.
    refuse_deletes: Option<(StatusCode, Value)>,
    /// No request is answered (the answers are held, never sent).
    hang: bool,
    /// Deployments made so far, for their uids.
    made: u32,
    /// The lists and watches asked for (kube-runtime's), apart from `seen`.
    watches: Vec<String>,
    /// Every change so far, as a watch sends it: its resourceVersion, its kind's path, the
    /// event's type and the object.
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// The objects as the last change left them, by their kind's path and name.
    recorded: BTreeMap<(&'static str, String), Value>,
    /// Not the API's: the figures of the watches of the driver (or discovery) on it, kept
    /// here for the tests to read.
    tally: Tally,
}

impl Cluster {
    /// Records what changed since the last call as watch events; whether anything did.
    fn record(&mut self) -> bool {
        let deployments = self
            .deployments
            .iter()
            .map(|(n, o)| ((DEPLOYMENTS, n.clone()), o));
        let autoscalers = self
            .autoscalers
            .iter()
            .map(|(n, o)| ((AUTOSCALERS, n.clone()), o));
        let pods = (self.pods.iter()).map(|o| {
            (
                (PODS, o["metadata"]["name"].as_str().unwrap().to_owned()),
                o,
            )
        });
        let now: BTreeMap<_, Value> = deployments
            .chain(autoscalers)
            .chain(pods)
            .map(|(k, o)| (k, o.clone()))
            .collect();
        let mut changes = Vec::new();
        for (key, object) in &now {
            match self.recorded.get(key) {
                None => changes.push((key.0, "ADDED", object.clone())),
                Some(was) if was != object => changes.push((key.0, "MODIFIED", object.clone())),
                Some(_) => {}
            }
        }
        for (key, object) in &self.recorded {
            if !now.contains_key(key) {
                changes.push((key.0, "DELETED", object.clone()));
            }
        }
        for (path, kind, mut object) in changes.clone() {
            let revision = self.revision() + 1;
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            self.events.push((revision, path, kind, object));
        }
        self.recorded = now;
        !changes.is_empty()
    }

    /// The resourceVersion of the last change.
    fn revision(&self) -> u64 {
        self.events.last().map_or(1, |e| e.0)
    }
}

/// The fake API server's state, shared with its tests; every change made under `lock` is
/// sent to the watches open as the lock is let go.
#[derive(Clone)]
struct Shared(Arc<(Mutex<Cluster>, watch::Sender<()>)>);

impl Default for Shared {
    fn default() -> Self {
        Shared(Arc::new((Mutex::default(), watch::Sender::new(()))))
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        Locked(self.0.0.lock().unwrap(), &self.0.1)
    }
}

struct Locked<'a>(MutexGuard<'a, Cluster>, &'a watch::Sender<()>);

impl Deref for Locked<'_> {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if self.0.record() && !self.0.hold_events {
            self.1.send_replace(());
        }
    }
}

type Answer = Response<BoxBody<Bytes, Infallible>>;

/// A driver for namespace `shop` on a fake cluster, rounds as often as polled.
fn fake_cluster() -> (KubernetesDriver, Shared) {
    let (driver, cluster) = fake_cluster_with_rounds_of_a_second();
    (driver.round_every(Duration::ZERO), cluster)
}

/// A driver on a fake cluster that has made its first round for `versions`.
async fn first_round(versions: &[(&str, u32)]) -> (KubernetesDriver, Shared) {
    let (mut driver, cluster) = fake_cluster();
    driver.apply(&want(versions));
    driver.poll().await;
    (driver, cluster)
}

fn fake_cluster_with_rounds_of_a_second() -> (KubernetesDriver, Shared) {
    let (client, cluster) = fake_api();
    let tally = cluster.lock().tally.clone();
    let driver = KubernetesDriver::new(client, Some("shop".into()), 8080, &tally);
    (driver, cluster)
}

/// A real `kube::Client` whose API server is the fake.
fn fake_api() -> (kube::Client, Shared) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Answer>();
    let cluster = Shared::default();
    tokio::spawn(serve(handle, cluster.clone()));
    (kube::Client::new(service, "default"), cluster)
}

async fn serve(mut handle: tower_test::mock::Handle<Request<Body>, Answer>, c: Shared) {
    let mut held: Vec<tower_test::mock::SendResponse<Answer>> = Vec::new();
    let mut changed = c.0.1.subscribe();
    loop {
        let (request, respond) = tokio::select! {
            next = handle.next_request() => match next {
                Some(next) => next,
                None => return,
            },
            _ = changed.changed() => {
                if !c.lock().hang {
                    // Answered again: what was held fails as a read that timed out would.
                    for respond in held.drain(..) {
                        let timed_out = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "read timed out (the FAKE API server hung)",
                        );
                        respond.send_error(timed_out);
                    }
                }
                continue;
            }
        };
        if c.lock().hang {
            held.push(respond);
            continue;
        }
        let uri = request.uri().clone();
        let path = uri.path();
        let query = |key: &str| {
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        if [DEPLOYMENTS, AUTOSCALERS, PODS].contains(&path) && request.method() == Method::GET {
            c.lock().watches.push(uri.to_string());
            if query("watch").is_some_and(|w| w == "true" || w == "1") {
                if c.lock().refuse_watches {
                    let resource = path.rsplit('/').next().unwrap();
                    let (status, refused) = forbidden("watch", resource);
                    let body = Full::new(Bytes::from(serde_json::to_vec(&refused).unwrap()));
                    let mut response = Response::new(BoxBody::new(body));
                    *response.status_mut() = status;
                    respond.send_response(response);
                    continue;
                }
                if path == PODS && std::mem::take(&mut c.lock().gone_once) {
                    let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1",
                        "kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                        "message": "too old resource version"}});
                    let line = Bytes::from(format!("{gone}\n"));
                    respond.send_response(Response::new(BoxBody::new(Full::new(line))));
                    continue;
                }
                let from = query("resourceVersion").unwrap().parse().unwrap();
                let path = [DEPLOYMENTS, AUTOSCALERS, PODS]
                    .into_iter()
                    .find(|p| *p == path);
                let events = send_events(c.clone(), path.unwrap(), query("labelSelector"), from);
                respond.send_response(Response::new(events));
                continue;
            }
        }
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let seen = Asked {
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let watcher = [DEPLOYMENTS, AUTOSCALERS, PODS].contains(&parts.uri.path());
        let (status, answer) = answer(&mut c.lock(), &seen);
        if !watcher {
            c.lock().seen.push(seen);
        }
        let body = Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap()));
        let mut response = Response::new(BoxBody::new(body));
        *response.status_mut() = status;
        respond.send_response(response);
    }
}

/// A watch's answer: the changes to the objects at `path` that `selector` picks since
/// resourceVersion `from`, then each as it is made, one JSON line each, for as long as the
/// client reads.
fn send_events(
    c: Shared,
    path: &'static str,
    selector: Option<String>,
    mut from: u64,
) -> BoxBody<Bytes, Infallible> {
    let (tx, rx) = mpsc::channel(16);
    let mut changed = c.0.1.subscribe();
    let ended = c.lock().watches_ended;
    tokio::spawn(async move {
        loop {
            let lines: Vec<Bytes> = {
                let cluster = c.lock();
                if cluster.watches_ended != ended {
                    return;
                }
                let new = cluster.events.iter().filter(|e| e.0 > from);
                let lines = new
                    .filter(|e| e.1 == path && selects(selector.as_deref(), &e.3))
                    .map(|e| {
                        let mut line = serde_json::to_vec(&json!({"type": e.2, "object": e.3}));
                        line.as_mut().unwrap().push(b'\n');
                        Bytes::from(line.unwrap())
                    })
                    .collect();
                from = cluster.revision();
                lines
            };
            for line in lines {
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    });
    BoxBody::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";
const PODS: &str = "/api/v1/namespaces/shop/pods";
const AUTOSCALERS: &str = "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers";

fn answer(c: &mut Cluster, seen: &Asked) -> (StatusCode, Value) {
    let (path, query) = seen.uri.split_once('?').unwrap_or((&seen.uri, ""));
    let selector = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v.into_owned());
    match (&seen.method, path) {
        (&Method::GET, DEPLOYMENTS) => {
            let items: Vec<Value> = c
                .deployments
                .values()
                .filter(|d| selects(selector.as_deref(), d))
                .cloned()
                .collect();
            let revision = c.revision();
            (
                StatusCode::OK,
                list("DeploymentList", "apps/v1", items, revision),
            )
        }
        (&Method::GET, AUTOSCALERS) if c.refuse_autoscaler_lists => {
            forbidden("list", "horizontalpodautoscalers")
        }
        (&Method::GET, AUTOSCALERS) => {
            let items: Vec<Value> = c
                .autoscalers
                .values()
                .filter(|a| selects(selector.as_deref(), a))
                .cloned()
                .collect();
            let kind = "HorizontalPodAutoscalerList";
            let revision = c.revision();
            (
                StatusCode::OK,
                list(kind, "autoscaling/v2", items, revision),
            )
        }
        (method, p) if p.starts_with(AUTOSCALERS) => {
            let name = p.rsplit('/').next().unwrap().to_owned();
            match *method {
                Method::GET => match c.autoscalers.get(&name) {
                    Some(a) => (StatusCode::OK, a.clone()),
                    None => not_found(&name),
                },
                Method::PATCH => {
                    c.autoscalers.insert(name, seen.body.clone());
                    (StatusCode::OK, seen.body.clone())
                }
                Method::DELETE
                    if precondition_failed(&c.autoscalers, &name, &seen.body).is_some() =>
                {
                    precondition_failed(&c.autoscalers, &name, &seen.body).unwrap()
                }
                Method::DELETE => match c.autoscalers.remove(&name) {
                    Some(_) => (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                    ),
                    None => not_found(&name),
                },
                _ => panic!("the fake API server does not serve {method} {p}"),
            }
        }
        (&Method::GET, PODS) if c.refuse_pod_lists => forbidden("list", "pods"),
        (&Method::GET, PODS) => {
            let items = c
                .pods
                .iter()
                .filter(|p| selects(selector.as_deref(), p))
                .cloned()
                .collect();
            let revision = c.revision();
            (StatusCode::OK, list("PodList", "v1", items, revision))
        }
        (&Method::GET, p) if p.starts_with(DEPLOYMENTS) => {
            let name = p.rsplit('/').next().unwrap();
            match c.deployments.get(name) {
                Some(d) => (StatusCode::OK, d.clone()),
                None => not_found(name),
            }
        }
        (&Method::PATCH, p) if p.starts_with(DEPLOYMENTS) => {
            if let Some(refused) = &c.refuse_patches {
                return refused.clone();
            }
            let name = p.rsplit('/').next().unwrap().to_owned();
            let mut object = seen.body.clone();
            let (generation, status) = match c.deployments.get(&name) {
                Some(old) if old["spec"] == object["spec"] => {
                    (old["metadata"]["generation"].clone(), old["status"].clone())
                }
                Some(old) => (
                    json!(old["metadata"]["generation"].as_i64().unwrap() + 1),
                    old["status"].clone(),
                ),
                None => (json!(1), Value::Null),
            };
            // A Deployment made anew gets a uid of its own.
            c.made += 1;
            let uid = c.deployments.get(&name).map_or_else(
                || json!(format!("uid-{}", c.made)),
                |old| old["metadata"]["uid"].clone(),
            );
            object["metadata"]["uid"] = uid;
            object["metadata"]["generation"] = generation;
            if !status.is_null() {
                object["status"] = status;
            }
            c.deployments.insert(name, object.clone());
            (StatusCode::OK, object)
        }
        (&Method::DELETE, p) if p.starts_with(DEPLOYMENTS) => {
            if let Some(refused) = &c.refuse_deletes {
                return refused.clone();
            }
            let name = p.rsplit('/').next().unwrap();
            if let Some(refused) = precondition_failed(&c.deployments, name, &seen.body) {
                return refused;
            }
            match c.deployments.remove(name) {
                Some(_) => (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success",
                           "details": {"name": name, "group": "apps", "kind": "deployments"}}),
                ),
                None => not_found(name),
            }
        }
        _ => panic!(
            "the fake API server does not serve {} {}",
            seen.method, seen.uri
        ),
    }
}

/// Whether every `key=value` of `selector` is among `object`'s labels.
fn selects(selector: Option<&str>, object: &Value) -> bool {
    selector.is_none_or(|s| {
        s.split(',').all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            object["metadata"]["labels"][k] == v
        })
    })
}

fn list(kind: &str, api_version: &str, items: Vec<Value>, revision: u64) -> Value {
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"resourceVersion": revision.to_string()}, "items": items})
}

/// The 409 a DELETE gets when its body's uid precondition does not hold for `name`.
fn precondition_failed(
    objects: &BTreeMap<String, Value>,
    name: &str,
    body: &Value,
) -> Option<(StatusCode, Value)> {
    let uid = body["preconditions"]["uid"].as_str()?;
    let found = objects.get(name)?;
    (found["metadata"]["uid"] != uid).then(|| {
        (
            StatusCode::CONFLICT,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Conflict",
                   "code": 409, "message": format!("Precondition failed: UID in precondition: {uid}")}),
        )
    })
}

/// A refusal to `verb` (list, watch) `resource`.
fn forbidden(verb: &str, resource: &str) -> (StatusCode, Value) {
    (
        StatusCode::FORBIDDEN,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden",
               "code": 403, "message": format!("cannot {verb} resource \"{resource}\"")}),
    )
}

/// The API server answers again after `hang`.
fn unhang(c: &Shared) {
    c.lock().hang = false;
    c.0.1.send_replace(());
}

/// Ends every watch open, as an API server that restarts does.
fn end_watches(c: &Shared) {
    c.lock().watches_ended += 1;
    c.0.1.send_replace(());
}

fn not_found(name: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
               "code": 404, "message": format!("deployments.apps \"{name}\" not found")}),
    )
}

fn want(versions: &[(&str, u32)]) -> Want {
    Want {
        service: "checkout".into(),
        versions: versions.iter().map(|(v, n)| (v.to_string(), *n)).collect(),
        image: "registry.example.com/checkout:{version}".into(),
        command: Vec::new(),
        health_check: "/ready".into(),
        cpu: "250m".into(),
        memory: "256Mi".into(),
        run_as_user: 0,
        autoscale: None,
        keep_others: false,
    }
}

/// What a Deployment controller would report: the latest spec of `name` seen, all of its
/// replicas updated, `ready` of them ready.
fn set_status(c: &Shared, name: &str, ready: u32) {
    let mut c = c.lock();
    let d = c.deployments.get_mut(name).unwrap();
    let replicas = d["spec"]["replicas"].clone();
    d["status"] = json!({
        "observedGeneration": d["metadata"]["generation"],
        "replicas": replicas, "updatedReplicas": replicas,
        "readyReplicas": ready, "availableReplicas": ready,
    });
}

/// What kubelets would report: `version`'s pods, ready at the addresses given.
fn set_pods(c: &Shared, version: &str, ready_at: &[&str]) {
    let mut c = c.lock();
    c.pods
        .retain(|p| p["metadata"]["labels"]["app.kubernetes.io/version"] != version);
    for ip in ready_at {
        c.pods.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("checkout-{version}-{ip}"), "labels": {
                "app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": version,
                "app.kubernetes.io/managed-by": "fleet-agent"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
        }));
    }
}

/// The rollout of `name` complete with `ready` pods ready at 10.1.0.1, 10.1.0.2…
fn roll_out(c: &Shared, name: &str, version: &str, ready: u32) {
    set_status(c, name, ready);
    let ips: Vec<String> = (1..=ready).map(|i| format!("10.1.0.{i}")).collect();
    set_pods(
        c,
        version,
        &ips.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// Polls the driver until it reports what `done` looks for, for up to 10 s: it learns of the
/// fake's changes through its watches, a moment after they are made (or, after a watch
/// failed, once kube-runtime has tried again: 0.8 to 1.6 s after a first failure).
async fn poll_until(driver: &mut KubernetesDriver, done: impl Fn(&Running) -> bool) -> Running {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let running = driver.poll().await;
        if done(&running) {
            return running;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reported in 10 s: {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the driver until its detail is `detail`.
async fn poll_until_detail(driver: &mut KubernetesDriver, detail: &str) -> Running {
    poll_until(driver, |r| r.detail == detail).await
}

fn seen(c: &Shared) -> Vec<Asked> {
    std::mem::take(&mut c.lock().seen)
}

#[tokio::test]
async fn a_wanted_version_is_applied_server_side_as_a_deployment_and_ready_once_rolled_out() {
    let (mut driver, cluster) = fake_cluster();
    driver.apply(&want(&[("v1", 2)]));
    let running = driver.poll().await;
    assert!(running.ready.is_empty(), "{running:?}");
    assert_eq!(running.detail, "checkout-v1: no status yet");

    let requests = seen(&cluster);
    let uris: Vec<_> = requests
        .iter()
        .map(|s| format!("{} {}", s.method, s.uri))
        .collect();
    let selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfleet-agent%2Capp.kubernetes.io%2Fname%3Dcheckout";
    assert_eq!(
        uris,
        [
            // Not among the driver's: is the name free?
            format!("GET {DEPLOYMENTS}/checkout-v1"),
            format!("PATCH {DEPLOYMENTS}/checkout-v1?&force=true&fieldManager=fleet-agent"),
        ]
    );
    // The service's objects, each listed, then watched from the list's resourceVersion.
    let watches = std::mem::take(&mut cluster.lock().watches);
    for path in [DEPLOYMENTS, AUTOSCALERS, PODS] {
        let asked: Vec<_> = (watches.iter())
            .filter(|w| w.starts_with(&format!("{path}?")) && w.contains(selector))
            .collect();
        assert!(
            asked.len() >= 2 && !asked[0].contains("watch=") && asked[1].contains("watch=true"),
            "{path}: {watches:?}"
        );
    }
    let patch = &requests[1];
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert_eq!(patch.body["kind"], "Deployment");
    assert_eq!(patch.body["spec"]["replicas"], 2);
    let container = &patch.body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example.com/checkout:v1");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "256Mi"}})
    );

    roll_out(&cluster, "checkout-v1", "v1", 1);
    let running = poll_until_detail(&mut driver, "checkout-v1: 1 of 2 ready, 2 of 2 updated").await;
    assert!(running.ready.is_empty());
    // The Deployment says all are ready before the pods' readiness reaches the driver: not
    // ready until a pod is.
    set_pods(&cluster, "v1", &[]);
    set_status(&cluster, "checkout-v1", 2);
    let running = poll_until_detail(&mut driver, "checkout-v1: no pod ready with an address").await;
    assert!(running.ready.is_empty());

    roll_out(&cluster, "checkout-v1", "v1", 2);
    let running = poll_until(&mut driver, |r| !r.ready.is_empty()).await;
    assert_eq!(
        running.ready,
        BTreeMap::from([(
            "v1".to_owned(),
            vec!["10.1.0.1:8080".to_owned(), "10.1.0.2:8080".to_owned()]
        )])
    );
    assert_eq!(running.detail, "");
    assert!(
        seen(&cluster).iter().all(|s| s.method == Method::GET),
        "an unchanged want is not applied again"
    );
}

#[tokio::test]
async fn a_new_version_gets_its_own_deployment_and_an_unwanted_one_is_deleted() {
    let (mut driver, cluster) = first_round(&[("v1", 2)]).await;
    // Something else's Deployment in the namespace, not the agent's.
    cluster.lock().deployments.insert(
        "checkout-db".into(),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "checkout-db", "labels": {"app.kubernetes.io/name": "checkout"}}}),
    );

    driver.apply(&want(&[("v1", 2), ("1.4.2", 1)]));
    driver.poll().await;
    let canary = deployment_named(&cluster, "checkout-1-4-2-");
    assert_eq!(canary["spec"]["replicas"], 1);
    assert_eq!(
        canary["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example.com/checkout:1.4.2"
    );

    driver.apply(&want(&[("1.4.2", 3)]));
    driver.poll().await;
    let requests = seen(&cluster);
    let deleted: Vec<_> = requests
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| s.uri.as_str())
        .collect();
    assert_eq!(deleted, [format!("{DEPLOYMENTS}/checkout-v1?")]);
    let names: Vec<_> = cluster.lock().deployments.keys().cloned().collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"checkout-db".to_owned()),
        "not the agent's: kept"
    );
    let canary = deployment_named(&cluster, "checkout-1-4-2-");
    assert_eq!(canary["spec"]["replicas"], 3, "scaled as asked");
    assert_eq!(canary["metadata"]["generation"], 2);
}

fn deployment_named(cluster: &Shared, prefix: &str) -> Value {
    let c = cluster.lock();
    let found: Vec<_> = c
        .deployments
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "{:?}", c.deployments.keys());
    found[0].1.clone()
}

#[tokio::test]
async fn a_deployment_deleted_by_hand_is_made_again() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    cluster.lock().deployments.clear();
    poll_until(&mut driver, |_| {
        cluster.lock().deployments.contains_key("checkout-v1")
    })
    .await;
}

#[tokio::test]
async fn what_cannot_run_is_reported_with_the_reason_and_nothing_is_ready() {
    let (mut driver, cluster) = fake_cluster();
    let refused = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "reason": "Forbidden", "code": 403,
        "message": "deployments.apps \"checkout-v1\" is forbidden: User \"system:serviceaccount:shop:fleet-agent\" cannot patch resource \"deployments\""});
    cluster.lock().refuse_patches = Some((StatusCode::FORBIDDEN, refused));
    driver.apply(&want(&[("v1", 1)]));
    let running = driver.poll().await;
    assert!(running.ready.is_empty());
    assert!(
        running
            .detail
            .starts_with("applying Deployment checkout-v1 in namespace shop:")
            && running.detail.contains("cannot patch resource"),
        "{}",
        running.detail
    );

    let (mut driver, cluster) = fake_cluster();
    driver.apply(&Want {
        image: String::new(),
        ..want(&[("v1", 1)])
    });
    let running = driver.poll().await;
    assert!(
        running.detail.contains("`workload.image`"),
        "{}",
        running.detail
    );
    assert!(seen(&cluster).is_empty(), "nothing asked of the cluster");

    let (mut driver, cluster) = fake_cluster();
    driver.apply(&want(&[("v1", 1), ("2.0+b7", 1)]));
    let running = driver.poll().await;
    assert!(
        running
            .detail
            .contains("version \"2.0+b7\" cannot be a Kubernetes label value"),
        "{}",
        running.detail
    );
    assert_eq!(
        cluster.lock().deployments.keys().collect::<Vec<_>>(),
        ["checkout-v1"],
        "the valid version still runs"
    );
}

fn ready(version: &str, addresses: &[&str]) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(
        version.to_owned(),
        addresses.iter().map(|a| a.to_string()).collect(),
    )])
}

/// A Deployment as if someone had made it.
fn put(cluster: &Shared, name: &str, object: Value) {
    cluster.lock().deployments.insert(name.into(), object);
}

fn managed(name: &str, version: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "generation": 1, "uid": format!("uid-{name}"), "labels": {
               "app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": version,
               "app.kubernetes.io/managed-by": "fleet-agent"}},
           "spec": {"replicas": 1}})
}

/// A driver whose v1 rolled out, seen ready on 10.1.0.1 and 10.1.0.2.
async fn serving_v1_on_two_pods() -> (KubernetesDriver, Shared) {
    let (mut driver, cluster) = first_round(&[("v1", 2)]).await;
    roll_out(&cluster, "checkout-v1", "v1", 2);
    let both = ready("v1", &["10.1.0.1:8080", "10.1.0.2:8080"]);
    poll_until(&mut driver, |r| r.ready == both).await;
    (driver, cluster)
}

#[tokio::test]
async fn once_rolled_out_a_version_follows_its_pods_to_new_addresses() {
    let (mut driver, cluster) = serving_v1_on_two_pods().await;

    // A pod evicted: the version goes on with the one left, then with its replacement.
    set_status(&cluster, "checkout-v1", 1);
    set_pods(&cluster, "v1", &["10.1.0.1"]);
    let one = ready("v1", &["10.1.0.1:8080"]);
    poll_until(&mut driver, |r| r.ready == one).await;
    set_pods(&cluster, "v1", &["10.1.0.1", "10.1.0.7"]);
    set_status(&cluster, "checkout-v1", 2);
    let replaced = ready("v1", &["10.1.0.1:8080", "10.1.0.7:8080"]);
    poll_until(&mut driver, |r| r.ready == replaced).await;

    // A new spec (three replicas) rolls out with the version still served by its ready pods,
    // and what it waits for is told.
    driver.apply(&want(&[("v1", 3)]));
    let running = driver.poll().await;
    assert_eq!(running.ready, replaced);
    assert_eq!(
        running.detail,
        "checkout-v1: its latest spec is not yet seen by the cluster; serving with its 2 ready pods"
    );
    roll_out(&cluster, "checkout-v1", "v1", 3);
    poll_until(&mut driver, |r| r.ready["v1"].len() == 3).await;
}

#[tokio::test]
async fn a_deployment_made_again_must_roll_out_anew() {
    let (mut driver, cluster) = serving_v1_on_two_pods().await;
    // Deleted by hand: made again at generation 1 as before, its old pods not yet gone.
    cluster.lock().deployments.clear();
    let running = poll_until_detail(&mut driver, "checkout-v1: no status yet").await;
    assert!(running.ready.is_empty(), "{running:?}");
    roll_out(&cluster, "checkout-v1", "v1", 2);
    poll_until(&mut driver, |r| {
        r.ready.get("v1").is_some_and(|a| a.len() == 2)
    })
    .await;
}

#[tokio::test]
async fn a_failed_apply_leaves_the_running_version_running_and_served() {
    let (mut driver, cluster) = serving_v1_on_two_pods().await;
    cluster.lock().refuse_patches = Some((
        StatusCode::TOO_MANY_REQUESTS,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": "TooManyRequests", "code": 429, "message": "too many requests"}),
    ));
    driver.apply(&want(&[("v1", 3)]));
    let running = driver.poll().await;
    assert!(seen(&cluster).iter().all(|s| s.method != Method::DELETE));
    assert!(cluster.lock().deployments.contains_key("checkout-v1"));
    assert_eq!(
        running.ready,
        ready("v1", &["10.1.0.1:8080", "10.1.0.2:8080"])
    );
    assert!(
        running
            .detail
            .starts_with("applying Deployment checkout-v1 in namespace shop:"),
        "{}",
        running.detail
    );
}

/// A driver restarted while v0 ran, keeping it (`keep_others`) while it wants v1.
async fn restarted_over_v0() -> (KubernetesDriver, Shared) {
    let (mut driver, cluster) = fake_cluster();
    // What ran before the agent restarted; the proxies may still send traffic to it.
    put(&cluster, "checkout-v0", managed("checkout-v0", "v0"));
    driver.apply(&Want {
        keep_others: true,
        ..want(&[("v1", 1)])
    });
    driver.poll().await;
    (driver, cluster)
}

#[tokio::test]
async fn after_a_restart_nothing_is_deleted_until_the_proxies_have_a_table() {
    let (mut driver, cluster) = restarted_over_v0().await;
    assert!(seen(&cluster).iter().all(|s| s.method != Method::DELETE));
    assert!(cluster.lock().deployments.contains_key("checkout-v0"));

    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    assert!(!cluster.lock().deployments.contains_key("checkout-v0"));
}

#[tokio::test(start_paused = true)]
async fn a_deployment_made_anew_under_its_name_is_not_deleted_on_what_the_watch_showed_before() {
    let (mut driver, cluster) = restarted_over_v0().await;
    // Deleted and made again under the name (another uid) before the watch shows it.
    cluster.lock().hold_events = true;
    let mut anew = managed("checkout-v0", "v0");
    anew["metadata"]["uid"] = json!("uid-anew");
    put(&cluster, "checkout-v0", anew);
    seen(&cluster);
    driver.apply(&want(&[("v1", 1)]));
    let running = driver.poll().await;
    let deletes: Vec<_> = (seen(&cluster).into_iter())
        .filter(|s| s.method == Method::DELETE)
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(
        deletes[0].body["preconditions"]["uid"], "uid-checkout-v0",
        "only the one the watch showed"
    );
    assert_eq!(
        cluster.lock().deployments["checkout-v0"]["metadata"]["uid"],
        "uid-anew",
        "the one made anew is left to the next round"
    );
    assert!(!running.detail.contains("deleting"), "{}", running.detail);
}

#[tokio::test]
async fn a_name_taken_by_another_deployment_is_reported_and_left_alone() {
    let (mut driver, cluster) = fake_cluster();
    let theirs = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "checkout-v1", "generation": 4, "labels": {"app": "checkout"}},
        "spec": {"replicas": 5}});
    put(&cluster, "checkout-v1", theirs.clone());
    driver.apply(&want(&[("v1", 1)]));
    let running = driver.poll().await;
    assert!(running.ready.is_empty());
    assert!(
        running.detail.starts_with(
            "Deployment checkout-v1 in namespace shop is not fleet-agent's for checkout v1: rename or delete it"
        ),
        "{}",
        running.detail
    );
    assert!(seen(&cluster).iter().all(|s| s.method == Method::GET));
    assert_eq!(cluster.lock().deployments["checkout-v1"], theirs);
}

#[tokio::test]
async fn a_failed_delete_is_reported_and_the_wanted_version_carries_on() {
    let (mut driver, cluster) = fake_cluster();
    put(&cluster, "checkout-v0", managed("checkout-v0", "v0"));
    cluster.lock().refuse_deletes = Some((
        StatusCode::FORBIDDEN,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden",
               "code": 403, "message": "cannot delete resource \"deployments\""}),
    ));
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    roll_out(&cluster, "checkout-v1", "v1", 1);
    let running = driver.poll().await;
    assert_eq!(running.ready, ready("v1", &["10.1.0.1:8080"]));
    assert!(
        running
            .detail
            .starts_with("deleting Deployment checkout-v0 in namespace shop:"),
        "{}",
        running.detail
    );
}

#[tokio::test]
async fn why_pods_are_not_ready_is_reported_as_the_cluster_says() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    set_status(&cluster, "checkout-v1", 0);
    cluster.lock().pods.push(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "checkout-v1-abc", "labels": {
            "app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": "v1",
            "app.kubernetes.io/managed-by": "fleet-agent"}},
        "status": {"containerStatuses": [{"name": "checkout", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                                   "message": "Back-off pulling image \"registry.example.com/checkout:v1\""}}}]},
    }));
    poll_until_detail(
        &mut driver,
        "checkout-v1: 0 of 1 ready, 1 of 1 updated (pod checkout-v1-abc: container checkout waiting: \
         ImagePullBackOff: Back-off pulling image \"registry.example.com/checkout:v1\")",
    )
    .await;
}

#[tokio::test]
async fn a_hand_edit_of_the_drivers_fields_is_undone() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    {
        // `kubectl set image`: another image, the next generation.
        let mut c = cluster.lock();
        let d = c.deployments.get_mut("checkout-v1").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest".into();
        d["metadata"]["generation"] = 2.into();
    }
    seen(&cluster);
    let image = || {
        cluster.lock().deployments["checkout-v1"]["spec"]["template"]["spec"]["containers"][0]
            ["image"]
            .clone()
    };
    poll_until(&mut driver, |_| {
        image() == "registry.example.com/checkout:v1"
    })
    .await;
    assert!(seen(&cluster).iter().any(|s| s.method == Method::PATCH));
}

#[tokio::test]
async fn rounds_are_a_second_apart_unless_the_want_changes() {
    let (mut driver, cluster) = fake_cluster_with_rounds_of_a_second();
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    seen(&cluster);
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    assert!(
        seen(&cluster).is_empty(),
        "the same want, within a second: no call"
    );
    driver.apply(&want(&[("v1", 2)]));
    driver.poll().await;
    assert!(seen(&cluster).iter().any(|s| s.method == Method::PATCH));
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_does_not_answer_is_reported_and_the_agent_goes_on() {
    let (mut driver, cluster) = fake_cluster();
    cluster.lock().hang = true;
    driver.apply(&want(&[("v1", 1)]));
    let started = tokio::time::Instant::now();
    let running = driver.poll().await;
    assert_eq!(started.elapsed(), ROUND_TIMEOUT);
    assert!(running.ready.is_empty());
    assert_eq!(
        running.detail,
        "the Kubernetes API did not answer within 10s (namespace shop)"
    );

    // The API answers again, and the requests held fail as reads that timed out
    // (`watched::READ_TIMEOUT`): kube-runtime lists again and the round goes through.
    unhang(&cluster);
    poll_until_detail(&mut driver, "checkout-v1: no status yet").await;
}

#[tokio::test(start_paused = true)]
async fn a_write_the_watch_does_not_show_is_told_and_judged_as_answered() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    cluster.lock().hold_events = true;
    driver.apply(&want(&[("v1", 2), ("v2", 1)]));
    let started = tokio::time::Instant::now();
    let running = driver.poll().await;
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "waited 2 s, no more"
    );
    assert_eq!(
        running.detail,
        "the watch of Deployments in namespace shop has not shown the change to checkout-v1 \
         within 2s; the watch of Deployments in namespace shop has not shown the change to \
         checkout-v2 within 2s; checkout-v1: no status yet; checkout-v2: no status yet"
    );
    // The next round: v1, shown at its earlier generation, stands as applied; v2, not shown
    // at all, is applied again (to the same effect).
    seen(&cluster);
    driver.poll().await;
    assert_eq!(
        changes(&cluster),
        [format!("PATCH {DEPLOYMENTS}/checkout-v2 fleet-agent")]
    );
}

#[tokio::test]
async fn a_watch_too_far_behind_lists_again_and_is_no_failure() {
    let (mut driver, cluster) = serving_v1_on_two_pods().await;
    cluster.lock().gone_once = true;
    cluster.lock().watches.clear();
    end_watches(&cluster);
    // The pods change while the watch is taken up again (told 410 Gone, listed anew).
    set_pods(&cluster, "v1", &["10.1.0.1", "10.1.0.4"]);
    let moved = ready("v1", &["10.1.0.1:8080", "10.1.0.4:8080"]);
    poll_until(&mut driver, |r| {
        assert_eq!(r.detail, "", "nothing told, all along");
        r.ready == moved
    })
    .await;
    assert!(
        !cluster.lock().gone_once,
        "the pods' watch was told 410 Gone"
    );
    let pod_lists = (cluster.lock().watches.iter())
        .filter(|w| w.starts_with(&format!("{PODS}?")) && !w.contains("watch="))
        .count();
    assert_eq!(pod_lists, 1, "listed again");
    let figures = cluster.lock().tally.figures();
    assert_eq!(figures["pods"].relists, 1, "{figures:?}");
    assert!(
        figures.values().all(|f| f.failures == 0 && !f.failing()),
        "{figures:?}"
    );
}

#[tokio::test]
async fn another_service_is_watched_anew() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    assert_eq!(cluster.lock().tally.figures()["deployments"].objects, 1);
    cluster.lock().watches.clear();
    driver.apply(&Want {
        service: "payments".into(),
        ..want(&[("v1", 1), ("v2", 1)])
    });
    driver.poll().await;
    let watches = std::mem::take(&mut cluster.lock().watches);
    let payments = "app.kubernetes.io%2Fname%3Dpayments";
    for path in [DEPLOYMENTS, AUTOSCALERS, PODS] {
        assert!(
            (watches.iter()).any(|w| w.starts_with(&format!("{path}?")) && w.contains(payments)),
            "{path}: {watches:?}"
        );
    }
    // Its figures are the new watches': the two payments Deployments, not checkout's one.
    let figures = cluster.lock().tally.figures();
    assert_eq!(figures.len(), 3, "{figures:?}");
    assert_eq!(figures["deployments"].objects, 2, "{figures:?}");
}

#[tokio::test]
async fn a_write_is_waited_for_until_the_watch_shows_it() {
    let (mut driver, cluster) = fake_cluster();
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    // Each change reaches the watch only after the driver has had its answer (and has gone
    // on, unless it waits for it).
    let answered = |method: Method| {
        let cluster = cluster.clone();
        cluster.lock().hold_events = true;
        tokio::spawn(async move {
            while !cluster.lock().seen.iter().any(|s| s.method == method) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            cluster.lock().hold_events = false;
            cluster.0.1.send_replace(());
        })
    };
    seen(&cluster);
    let released = answered(Method::PATCH);
    driver.apply(&want(&[("v1", 1), ("v2", 1)]));
    let running = driver.poll().await;
    released.await.unwrap();
    assert_eq!(
        running.detail, "checkout-v1: no status yet; checkout-v2: no status yet",
        "judged on the Deployment just made"
    );
    seen(&cluster);
    let released = answered(Method::DELETE);
    driver.apply(&want(&[("v2", 1)]));
    driver.poll().await;
    driver.poll().await;
    released.await.unwrap();
    let deletes = seen(&cluster)
        .into_iter()
        .filter(|s| s.method == Method::DELETE)
        .count();
    assert_eq!(deletes, 1, "not deleted again");
}

#[tokio::test]
async fn a_watch_that_fails_is_told_and_what_it_last_showed_is_judged() {
    let (mut driver, cluster) = serving_v1_on_two_pods().await;
    let both = ready("v1", &["10.1.0.1:8080", "10.1.0.2:8080"]);

    // The API server restarts with a Role that no longer allows watching.
    cluster.lock().refuse_watches = true;
    end_watches(&cluster);
    let running = poll_until(&mut driver, |r| !r.detail.is_empty()).await;
    assert_eq!(running.ready, both, "served on as last seen");
    assert!(
        running
            .detail
            .starts_with("watching Deployments in namespace shop: ")
            && running
                .detail
                .contains("cannot watch resource \"deployments\""),
        "{}",
        running.detail
    );
    // Each of the three watches has been refused (and counted) before they are allowed again.
    within(10, "every watch refused", || {
        (cluster.lock().tally.figures().values()).all(|f| f.failures >= 1)
    })
    .await;

    // Allowed again: the next changes come through, and the failure is no longer told.
    cluster.lock().refuse_watches = false;
    set_pods(&cluster, "v1", &["10.1.0.1", "10.1.0.3"]);
    cluster.lock().deployments.get_mut("checkout-v1").unwrap()["metadata"]["annotations"] =
        json!({"example.com/note": "touched"});
    let moved = ready("v1", &["10.1.0.1:8080", "10.1.0.3:8080"]);
    poll_until(&mut driver, |r| r.ready == moved && r.detail.is_empty()).await;

    // `/metrics` has counted the failures, and shows which watches have come through since: a
    // watch taken up again says nothing until a change comes (the autoscalers had none).
    let figures = cluster.lock().tally.figures();
    for (watch, failing) in [
        ("deployments", false),
        ("pods", false),
        ("autoscalers", true),
    ] {
        let f = &figures[watch];
        assert!(f.failures >= 1, "{watch}: {f:?}");
        assert_eq!(f.failing(), failing, "{watch}: {f:?}");
        assert!(f.listed, "{watch}: {f:?}");
    }
    assert_eq!(figures["pods"].objects, 2);
}

/// A pod of the region's proxies (or of `name`) at `ip`, its container running while the pod
/// is "Running".
fn proxy_pod(name: &str, ip: &str, phase: &str) -> Value {
    let state = match phase {
        "Running" => json!({"running": {}}),
        _ => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-{ip}"), "labels": {"app.kubernetes.io/name": name}},
        "status": {"phase": phase, "podIP": ip, "containerStatuses": [{"name": "fleet-proxy",
            "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state}]},
    })
}

/// The proxies `selector` picks in namespace shop, on the fake API, their admin API on 9901.
fn proxy_pods(client: kube::Client, cluster: &Shared, selector: &str) -> ProxySource {
    let tally = cluster.lock().tally.clone();
    ProxySource::pods(client, Some("shop"), selector.into(), 9901, &tally)
}

/// Proxies as `(admin URL, running)`.
fn told(found: Vec<Proxy>) -> Vec<(String, bool)> {
    found.into_iter().map(|p| (p.admin, p.running)).collect()
}

#[tokio::test]
async fn the_proxies_are_the_running_pods_a_selector_picks_followed_as_they_change() {
    let (client, cluster) = fake_api();
    let selector = "app.kubernetes.io/name=fleet-proxy";
    let mut source = proxy_pods(client, &cluster, selector);
    cluster.lock().pods = vec![
        proxy_pod("fleet-proxy", "10.2.0.2", "Running"),
        proxy_pod("fleet-proxy", "10.2.0.3", "Pending"),
        proxy_pod("checkout", "10.1.0.1", "Running"),
    ];
    assert_eq!(
        told(source.look().await.unwrap().unwrap()),
        [("http://10.2.0.2:9901".into(), true)]
    );
    let asked: Vec<_> = std::mem::take(&mut cluster.lock().watches);
    let pods = "/api/v1/namespaces/shop/pods?";
    let picked = "labelSelector=app.kubernetes.io%2Fname%3Dfleet-proxy";
    assert!(
        asked[0].starts_with(pods) && asked[0].contains(picked),
        "listed: {asked:?}"
    );
    assert!(seen(&cluster).is_empty(), "nothing but the watch");
    assert!(source.look().await.is_none(), "nothing new");

    // Scaled out, one rescheduled, one crashing: found through the watch, without listing
    // again.
    let mut crashing = proxy_pod("fleet-proxy", "10.2.0.4", "Running");
    crashing["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "CrashLoopBackOff"}});
    cluster.lock().pods = vec![proxy_pod("fleet-proxy", "10.2.0.3", "Running"), crashing];
    let found = look_until_told(&mut source).await.unwrap();
    assert_eq!(
        told(found),
        [
            ("http://10.2.0.3:9901".into(), true),
            ("http://10.2.0.4:9901".into(), false)
        ]
    );
    let asked = std::mem::take(&mut cluster.lock().watches);
    assert!(
        asked.iter().all(|a| a.contains("watch=")),
        "not listed again: {asked:?}"
    );

    // None running: told once, naming the selector (the proxies known stay).
    cluster.lock().pods = vec![proxy_pod("fleet-proxy", "10.2.0.5", "Pending")];
    let e = look_until_told(&mut source).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no running pod matches the proxies' selector app.kubernetes.io/name=fleet-proxy"
    );
    assert!(source.look().await.is_none(), "told once");
    cluster.lock().pods = vec![proxy_pod("fleet-proxy", "10.2.0.5", "Running")];
    let found = look_until_told(&mut source).await.unwrap();
    assert_eq!(told(found), [("http://10.2.0.5:9901".into(), true)]);
}

#[tokio::test(start_paused = true)]
async fn proxies_whose_pods_the_api_does_not_list_are_told_and_the_agent_goes_on() {
    let (client, cluster) = fake_api();
    cluster.lock().hang = true;
    let selector = "app.kubernetes.io/name=fleet-proxy";
    let mut source = proxy_pods(client, &cluster, selector);
    let started = tokio::time::Instant::now();
    let e = source.look().await.unwrap().unwrap_err();
    assert_eq!(started.elapsed(), FIRST_LOOK_TIMEOUT);
    assert_eq!(
        e.to_string(),
        "listing the proxies' pods (app.kubernetes.io/name=fleet-proxy): no answer yet"
    );
    let started = tokio::time::Instant::now();
    assert!(source.look().await.is_none(), "told once");
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the later looks do not wait"
    );

    // The API answers again, and the list held fails as a read that timed out: told, then
    // listed again, and the proxies are found.
    cluster.lock().pods = vec![proxy_pod("fleet-proxy", "10.2.0.2", "Running")];
    unhang(&cluster);
    let e = look_until_told(&mut source).await.unwrap_err().to_string();
    assert!(e.contains("read timed out"), "{e}");
    let found = look_until_told(&mut source).await.unwrap();
    assert_eq!(told(found), [("http://10.2.0.2:9901".into(), true)]);
    let lists = (cluster.lock().watches.iter())
        .filter(|w| !w.contains("watch="))
        .count();
    assert_eq!(lists, 1, "listed again (the list held is not recorded)");
}

#[tokio::test]
async fn proxies_whose_pods_may_not_be_listed_are_told_why() {
    let (client, cluster) = fake_api();
    cluster.lock().refuse_pod_lists = true;
    let selector = "app.kubernetes.io/name=fleet-proxy";
    let mut source = proxy_pods(client, &cluster, selector);
    let e = source.look().await.unwrap().unwrap_err().to_string();
    assert!(
        e.starts_with("listing the proxies' pods (app.kubernetes.io/name=fleet-proxy): ")
            && e.contains("cannot list resource \"pods\""),
        "{e}"
    );
}

/// Looks until the source tells something new, for up to 5 s.
async fn look_until_told(source: &mut ProxySource) -> anyhow::Result<Vec<Proxy>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(told) = source.look().await {
            return told;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing told in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const AUTOSCALE: fleet_agent::driver::Autoscale = fleet_agent::driver::Autoscale {
    min: 2,
    max: 10,
    cpu_percent: 70,
};

fn autoscaled(versions: &[(&str, u32)]) -> Want {
    Want {
        autoscale: Some(AUTOSCALE),
        ..want(versions)
    }
}

/// The requests of a round that changed something, as `METHOD path fieldManager`.
fn changes(c: &Shared) -> Vec<String> {
    seen(c)
        .iter()
        .filter(|s| s.method != Method::GET)
        .map(|s| {
            let (path, query) = s.uri.split_once('?').unwrap_or((&s.uri, ""));
            let manager = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "fieldManager")
                .map(|(_, v)| format!(" {v}"))
                .unwrap_or_default();
            format!("{} {path}{manager}", s.method)
        })
        .collect()
}

#[tokio::test]
async fn an_autoscaled_version_gets_an_autoscaler_after_its_count_is_handed_over() {
    let (mut driver, cluster) = first_round(&[("v1", 3)]).await;
    // A real API server records that fleet-agent's apply set the count (the fake does not).
    cluster.lock().deployments.get_mut("checkout-v1").unwrap()["metadata"]["managedFields"] = json!([{"manager": "fleet-agent", "operation": "Apply",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]);
    roll_out(&cluster, "checkout-v1", "v1", 3);
    poll_until(&mut driver, |r| {
        r.ready.get("v1").is_some_and(|a| a.len() == 3)
    })
    .await;
    seen(&cluster);

    driver.apply(&autoscaled(&[("v1", 2)]));
    driver.poll().await;
    assert_eq!(
        changes(&cluster),
        [
            format!("PATCH {DEPLOYMENTS}/checkout-v1 fleet-agent-handover"),
            format!("PATCH {DEPLOYMENTS}/checkout-v1 fleet-agent"),
            format!("PATCH {AUTOSCALERS}/checkout-v1 fleet-agent"),
        ],
        "the count is kept under another manager before the driver's apply lets go of it"
    );
    {
        let c = cluster.lock();
        let hpa = &c.autoscalers["checkout-v1"];
        assert_eq!(hpa["spec"]["minReplicas"], 2);
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "checkout-v1");
        let owner = &hpa["metadata"]["ownerReferences"][0];
        assert_eq!(
            owner["uid"],
            c.deployments["checkout-v1"]["metadata"]["uid"]
        );
        assert!(
            c.deployments["checkout-v1"]["spec"]
                .get("replicas")
                .is_none()
        );
    }
    // The fake merges nothing: the count the autoscaler keeps is put back by hand, as a
    // real API server would have kept it, and the rollout is judged against it.
    cluster.lock().deployments.get_mut("checkout-v1").unwrap()["spec"]["replicas"] = json!(3);
    roll_out(&cluster, "checkout-v1", "v1", 3);
    let running = poll_until_detail(&mut driver, "").await;
    assert_eq!(running.ready["v1"].len(), 3);
    assert!(changes(&cluster).is_empty(), "nothing applied again");

    // A new version gets its own autoscaler (nothing to hand over: it is new).
    driver.apply(&autoscaled(&[("v1", 2), ("v2", 2)]));
    driver.poll().await;
    assert_eq!(
        changes(&cluster),
        [
            format!("PATCH {DEPLOYMENTS}/checkout-v2 fleet-agent"),
            format!("PATCH {AUTOSCALERS}/checkout-v2 fleet-agent"),
        ]
    );
    // v1 no longer wanted: its Deployment goes, and its autoscaler with it.
    driver.apply(&autoscaled(&[("v2", 2)]));
    driver.poll().await;
    assert_eq!(
        changes(&cluster),
        [
            format!("DELETE {DEPLOYMENTS}/checkout-v1"),
            format!("DELETE {AUTOSCALERS}/checkout-v1"),
        ]
    );
    // No longer autoscaled: the count is the driver's again, and the autoscaler goes.
    driver.apply(&want(&[("v2", 4)]));
    driver.poll().await;
    assert_eq!(
        changes(&cluster),
        [
            format!("PATCH {DEPLOYMENTS}/checkout-v2 fleet-agent"),
            format!("DELETE {AUTOSCALERS}/checkout-v2"),
        ]
    );
    let c = cluster.lock();
    assert_eq!(c.deployments["checkout-v2"]["spec"]["replicas"], 4);
    assert!(c.autoscalers.is_empty());
}

#[tokio::test]
async fn an_autoscaler_of_another_with_the_name_is_reported_and_left_alone() {
    let (mut driver, cluster) = fake_cluster();
    let theirs = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "checkout-v1", "labels": {"app": "checkout"}},
        "spec": {"maxReplicas": 50}});
    cluster
        .lock()
        .autoscalers
        .insert("checkout-v1".into(), theirs.clone());
    driver.apply(&autoscaled(&[("v1", 2)]));
    let running = driver.poll().await;
    assert!(
        running.detail.starts_with(
            "HorizontalPodAutoscaler checkout-v1 in namespace shop is not fleet-agent's for \
             checkout v1: delete it (the agent makes its own)"
        ),
        "{}",
        running.detail
    );
    assert_eq!(
        changes(&cluster),
        [format!("PATCH {DEPLOYMENTS}/checkout-v1 fleet-agent")]
    );
    assert_eq!(cluster.lock().autoscalers["checkout-v1"], theirs);
}

/// A driver that made an autoscaled v2, rolled out with `pods` pods: the count its autoscaler
/// holds it at (the fake runs no HPA controller, so the count is set here).
async fn autoscaled_v2_with(pods: u32) -> (KubernetesDriver, Shared) {
    let (mut driver, cluster) = fake_cluster();
    driver.apply(&autoscaled(&[("v2", 2)]));
    driver.poll().await;
    cluster.lock().deployments.get_mut("checkout-v2").unwrap()["spec"]["replicas"] = json!(pods);
    roll_out(&cluster, "checkout-v2", "v2", pods);
    (driver, cluster)
}

#[tokio::test]
async fn a_new_autoscaled_version_is_ready_only_with_min_pods() {
    // Made without a count, the Deployment has one pod until its autoscaler acts.
    let (mut driver, _cluster) = autoscaled_v2_with(1).await;
    let running = poll_until_detail(&mut driver, "checkout-v2: 1 of 2 ready, 1 of 2 updated").await;
    assert!(running.ready.is_empty(), "{running:?}");
}

#[tokio::test]
async fn an_autoscaler_that_cannot_scale_is_reported_and_its_version_serves_on() {
    let (mut driver, cluster) = autoscaled_v2_with(2).await;
    poll_until_detail(&mut driver, "").await;
    // As the HPA controller writes it in a cluster without a metrics server.
    let status = json!({
        "currentReplicas": 2,
        "desiredReplicas": 2,
        "conditions": [
            { "type": "AbleToScale", "status": "True", "reason": "SucceededGetScale",
              "lastTransitionTime": "2026-12-06T00:00:00Z" },
            { "type": "ScalingActive", "status": "False", "reason": "FailedGetResourceMetric",
              "message": "the HPA was unable to compute the replica count: failed to get cpu utilization: unable to get metrics for resource cpu: no metrics returned from resource metrics API",
              "lastTransitionTime": "2026-12-06T00:00:00Z" },
        ],
    });
    cluster.lock().autoscalers.get_mut("checkout-v2").unwrap()["status"] = status;
    let running = poll_until_detail(
        &mut driver,
        "autoscaler checkout-v2 cannot scale, FailedGetResourceMetric: the HPA was unable to \
         compute the replica count: failed to get cpu utilization: unable to get metrics for \
         resource cpu: no metrics returned from resource metrics API (does the cluster run a \
         metrics server?)",
    )
    .await;
    assert_eq!(
        running.ready,
        ready("v2", &["10.1.0.1:8080", "10.1.0.2:8080"])
    );
}

#[tokio::test]
async fn autoscalers_that_cannot_be_listed_stop_only_what_autoscales() {
    let (mut driver, cluster) = fake_cluster();
    cluster.lock().refuse_autoscaler_lists = true;
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    roll_out(&cluster, "checkout-v1", "v1", 1);
    let running = poll_until(&mut driver, |r| !r.ready.is_empty()).await;
    assert_eq!(running.ready, ready("v1", &["10.1.0.1:8080"]));
    assert_eq!(running.detail, "", "a fixed count needs no autoscaler");
    driver.apply(&autoscaled(&[("v1", 1)]));
    let running = driver.poll().await;
    assert!(
        running
            .detail
            .starts_with("listing HorizontalPodAutoscalers in namespace shop:"),
        "{}",
        running.detail
    );
}

/// What a test-only controller sends an agent.
type Sent = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ControllerMessage, tonic::Status>> + Send>,
>;

/// Serves the test-only controller `service` on 127.0.0.1: its URL and its server's task.
async fn serve_controller<S: AgentService>(
    service: S,
) -> (
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(service))
        .serve_with_incoming(incoming);
    (url, tokio::spawn(server))
}

/// TEST-ONLY: a controller that sends each agent the desired state `desired` holds, as it
/// changes (a new session first thing; nothing while it holds `None`), and keeps every
/// status the agent reports.
#[derive(Clone)]
struct Steering {
    desired: watch::Receiver<Option<pb::DesiredState>>,
    statuses: Arc<Mutex<Vec<pb::AgentStatus>>>,
    /// How many sessions were opened.
    sessions: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl AgentService for Steering {
    type SessionStream = Sent;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let (statuses, mut inbound) = (self.statuses.clone(), request.into_inner());
        (self.sessions).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                if let Some(pb::agent_message::Message::Status(status)) = message.message {
                    statuses.lock().unwrap().push(status);
                }
            }
        });
        let desired = tokio_stream::wrappers::WatchStream::new(self.desired.clone());
        let sent = desired.filter_map(|d| {
            let message = pb::controller_message::Message::Desired(d?);
            Some(Ok(pb::ControllerMessage {
                message: Some(message),
            }))
        });
        Ok(tonic::Response::new(Box::pin(sent)))
    }
}

/// A [`Steering`] controller serving on 127.0.0.1, sending `first`: the sender that steers
/// it, the controller, its URL and its server's task.
async fn steering(
    first: pb::DesiredState,
) -> (
    watch::Sender<Option<pb::DesiredState>>,
    Steering,
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let (steer, wanted) = watch::channel(Some(first));
    let controller = Steering {
        desired: wanted,
        statuses: Arc::default(),
        sessions: Arc::default(),
    };
    let (url, server) = serve_controller(controller.clone()).await;
    (steer, controller, url, server)
}

impl Steering {
    /// Waits, up to 10 s, for the agent's last status to be as `done` wants.
    async fn last_status_until(&self, done: impl Fn(&pb::AgentStatus) -> bool) -> pb::AgentStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let last = self.statuses.lock().unwrap().last().cloned();
            if let Some(last) = last.filter(|s| done(s)) {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not reported in 10 s: {:?}",
                self.statuses.lock().unwrap().last()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// TEST-ONLY: a driver whose every wanted version is ready at once, at 127.0.0.1:9.
struct AllReady(Vec<String>);

impl Driver for AllReady {
    fn apply(&mut self, want: &Want) {
        self.0 = want.versions.keys().cloned().collect();
    }

    async fn poll(&mut self) -> Running {
        let at = vec!["127.0.0.1:9".to_string()];
        Running {
            ready: self.0.iter().map(|v| (v.clone(), at.clone())).collect(),
            ..Running::default()
        }
    }

    async fn shutdown(&mut self) {}
}

/// TEST-ONLY: a proxy's admin API on `listener` that takes every table (as version 7) and
/// says, asked for its stats, that it serves it.
async fn fake_proxy(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut socket, _)) = listener.accept().await {
        let mut read = vec![0; 64 * 1024];
        let n = socket.read(&mut read).await.unwrap_or(0);
        let body = match read[..n].starts_with(b"PUT /routes") {
            true => r#"{"version": 7}"#,
            false => {
                r#"{"started_unix_ms": 1, "table_version": 7, "latency_bounds_ms": [], "series": []}"#
            }
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = socket.write_all(answer.as_bytes()).await;
    }
}

/// The state `seq` of release demo-1: v1 stable, and v2 taking `canary` basis points.
fn desired(seq: u64, canary: u32) -> pb::DesiredState {
    let track = |version: &str| pb::Track {
        version: version.into(),
        replicas: 1,
    };
    pb::DesiredState {
        epoch: 1,
        seq,
        release_id: "demo-1".into(),
        service: "checkout".into(),
        stable: Some(track("v1")),
        canary: (canary > 0).then(|| track("v2")),
        routes: Some(pb::RouteTable {
            canary_weight_bp: canary,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_is_in_force_without_a_proxy_that_does_not_run_and_not_without_one_that_does() {
    // Two proxy pods on one admin port: one at 127.0.0.1, served; one at 127.0.0.2, where
    // nothing listens, its container crashing.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port();
    tokio::spawn(fake_proxy(proxy));
    let (client, cluster) = fake_api();
    let mut crashing = proxy_pod("fleet-proxy", "127.0.0.2", "Running");
    crashing["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "CrashLoopBackOff"}});
    cluster.lock().pods = vec![proxy_pod("fleet-proxy", "127.0.0.1", "Running"), crashing];

    let (steer, controller, url, server) = steering(desired(1, 0)).await;
    let selector = "app.kubernetes.io/name=fleet-proxy".to_string();
    let watches = Tally::default();
    let config = fleet_agent::Config {
        controller: url,
        region: "us-west".into(),
        cluster: "usw-a".into(),
        proxies: ProxySource::pods(client, Some("shop"), selector, port, &watches),
        tls: Default::default(),
        driver: "test".into(),
        hung_after: Duration::from_secs(60),
        stale_after: fleet_agent::STALE_AFTER,
        held_limit: fleet_agent::HELD_LIMIT,
        watches,
    };
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = format!("http://{}/metrics", admin.local_addr().unwrap());
    let (stop, shutdown) = watch::channel(false);
    let agent = tokio::spawn(fleet_agent::run(
        config,
        AllReady(Vec::new()),
        Some(admin),
        shutdown,
    ));

    // In force with the proxy that runs; the other is named.
    let applied = controller.last_status_until(|s| s.applied_seq == 1).await;
    assert!(applied.ready);
    let left_out = format!("proxy http://127.0.0.2:{port} does not run: left out until it does");
    assert!(applied.detail.contains(&left_out), "{}", applied.detail);
    // The proxies' watch, listed before the step, is on `/metrics`.
    let metrics = (reqwest::get(&metrics).await.unwrap().text().await).unwrap();
    let listed = "fleet_agent_watch_objects{watch=\"proxy-pods\"} 2";
    assert!(metrics.lines().any(|l| l == listed), "{metrics}");

    // Its container runs, but it cannot be reached: once the agent has seen it run (a process
    // just started holds no table before), the next step waits for it.
    cluster.lock().pods[1]["status"]["containerStatuses"][0]["state"] = json!({"running": {}});
    (controller.last_status_until(|s| !s.detail.contains(&left_out))).await;
    steer.send_replace(Some(desired(2, 1000)));
    let unreached = format!("127.0.0.2:{port}");
    // Working on seq 2 (seq 1 no longer reported applied), held by the proxy unreached.
    let working_on_2 = |s: &pb::AgentStatus| s.applied_seq == 0;
    let held = |s: &pb::AgentStatus| {
        working_on_2(s)
            && s.detail.contains("proxies not programmed")
            && s.detail.contains(&unreached)
    };
    controller.last_status_until(held).await;
    let ever_2 = (controller.statuses.lock().unwrap().iter()).any(|s| s.applied_seq == 2);
    assert!(!ever_2, "seq 2 was never in force");
    stop.send_replace(true);
    let stopped = tokio::time::timeout(Duration::from_secs(10), agent).await;
    stopped.expect("the agent stops").unwrap().unwrap();
    server.abort();
}

/// An agent's config for region us-west, cluster usw-a, with the proxy whose admin API is
/// at `admin`.
fn listed(controller: String, admin: String) -> fleet_agent::Config {
    fleet_agent::Config {
        controller,
        region: "us-west".into(),
        cluster: "usw-a".into(),
        proxies: ProxySource::Listed(vec![admin]),
        tls: Default::default(),
        driver: "test".into(),
        hung_after: Duration::from_secs(60),
        stale_after: fleet_agent::STALE_AFTER,
        held_limit: fleet_agent::HELD_LIMIT,
        watches: Tally::default(),
    }
}

/// Polls `done` until it holds, failing with `what` after `seconds`.
async fn within(seconds: u64, what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// TEST-ONLY: a proxy's admin API that counts the tables put on it (each taken as version 7)
/// and says, asked for its stats, that it serves the version `serving` holds.
#[derive(Clone, Default)]
struct CountingProxy {
    puts: Arc<std::sync::atomic::AtomicUsize>,
    serving: Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    async fn serve(self, listener: tokio::net::TcpListener) {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut read = vec![0; 64 * 1024];
            let n = socket.read(&mut read).await.unwrap_or(0);
            let body = match read[..n].starts_with(b"PUT /routes") {
                true => {
                    self.puts.fetch_add(1, SeqCst);
                    self.serving.store(7, SeqCst);
                    r#"{"version": 7}"#.to_string()
                }
                false => format!(
                    r#"{{"started_unix_ms": 1, "table_version": {}, "latency_bounds_ms": [], "series": []}}"#,
                    self.serving.load(SeqCst)
                ),
            };
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    }
}

/// TEST-ONLY: a driver as [`AllReady`] whose next apply, once `stall` is set, holds its
/// thread for three seconds (as a stopped process holds the agent's loop; a slow poll is no
/// standing still), saying so in `stalling`.
struct Stalling {
    ready: AllReady,
    stall: Arc<std::sync::atomic::AtomicBool>,
    stalling: Arc<std::sync::atomic::AtomicBool>,
    /// How many times it was applied.
    applied: Arc<std::sync::atomic::AtomicUsize>,
    /// Once set, the next poll takes three seconds (and clears it when done).
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver for Stalling {
    fn apply(&mut self, want: &Want) {
        use std::sync::atomic::Ordering::SeqCst;
        self.applied.fetch_add(1, SeqCst);
        self.ready.apply(want);
        if self.stall.swap(false, SeqCst) {
            self.stalling.store(true, SeqCst);
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    async fn poll(&mut self) -> Running {
        use std::sync::atomic::Ordering::SeqCst;
        if self.slow.load(SeqCst) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            self.slow.store(false, SeqCst);
        }
        self.ready.poll().await
    }

    async fn shutdown(&mut self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stood_still_puts_no_table_until_the_controllers_next_word() {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = CountingProxy::default();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(proxy.clone().serve(listener));
    let (steer, controller, url, server) = steering(desired(1, 0)).await;
    let config = fleet_agent::Config {
        stale_after: Duration::from_secs(2),
        ..listed(url, admin)
    };
    let (stall, stalling) = (Arc::default(), Arc::default());
    let applied = Arc::<std::sync::atomic::AtomicUsize>::default();
    let slow = Arc::<std::sync::atomic::AtomicBool>::default();
    let driver = Stalling {
        ready: AllReady(Vec::new()),
        stall: Arc::clone(&stall),
        stalling: Arc::clone(&stalling),
        applied: Arc::clone(&applied),
        slow: Arc::clone(&slow),
    };
    let (stop, shutdown) = watch::channel(false);
    let agent = tokio::spawn(fleet_agent::run(config, driver, None, shutdown));
    controller
        .last_status_until(|s| s.applied_seq == 1 && s.ready)
        .await;
    assert_eq!(proxy.puts.load(SeqCst), 1);

    // A poll slower than stale_after (a Kubernetes round may take 10 s) is no standing still.
    let still = "the agent stood still: it changes nothing";
    slow.store(true, SeqCst);
    within(10, "never polled slowly", || !slow.load(SeqCst)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let said = controller.statuses.lock().unwrap().last().cloned().unwrap();
    assert!(!said.detail.contains(still), "{}", said.detail);

    // The agent stands still; meanwhile another puts a table on its proxy (an agent started
    // in its place, say, for a state the controller has since changed). The controller has
    // no word to give for now (a new session gets nothing).
    steer.send_replace(None);
    let sessions = controller.sessions.load(SeqCst);
    stall.store(true, SeqCst);
    within(10, "never stood still", || stalling.load(SeqCst)).await;
    proxy.serving.store(8, SeqCst);
    // Going round again, it says so and leaves the proxy as it is. Its stream was never
    // dropped (the session runs on the other thread): it dials again for the word.
    (controller.last_status_until(|s| s.detail.contains(still))).await;
    within(5, "never dialled again for the word", || {
        controller.sessions.load(SeqCst) > sessions
    })
    .await;
    assert_eq!(proxy.puts.load(SeqCst), 1, "put back before the word");
    // However long the controller keeps silent (here longer than stale_after); nor are its
    // workloads changed on the state it holds.
    let applied_then = applied.load(SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(applied.load(SeqCst), applied_then, "the driver was applied");
    let said = controller.statuses.lock().unwrap().last().cloned().unwrap();
    assert!(said.detail.contains(still), "{}", said.detail);
    assert_eq!(
        proxy.puts.load(SeqCst),
        1,
        "put back though the controller was silent"
    );
    // The controller's word: its table goes back on, at once.
    steer.send_replace(Some(desired(1, 0)));
    within(1, "not put back at the word", || {
        proxy.puts.load(SeqCst) >= 2
    })
    .await;
    (controller.last_status_until(|s| !s.detail.contains(still))).await;

    // It stands still again, and the controller speaks meanwhile: that word is the latest,
    // so it carries on at once (the table replaced meanwhile goes back on).
    stalling.store(false, SeqCst);
    stall.store(true, SeqCst);
    within(10, "never stood still", || stalling.load(SeqCst)).await;
    proxy.serving.store(9, SeqCst);
    steer.send_replace(Some(desired(1, 0)));
    let lost = "the word was lost in the stall";
    within(6, lost, || proxy.puts.load(SeqCst) >= 3).await;

    // It stands still a third time, and the controller, which holds its word but sends one
    // only when it changes, says nothing on the stream it has: the new session brings it.
    stalling.store(false, SeqCst);
    stall.store(true, SeqCst);
    within(10, "never stood still", || stalling.load(SeqCst)).await;
    proxy.serving.store(10, SeqCst);
    let unasked = "the word was never asked for";
    within(6, unasked, || proxy.puts.load(SeqCst) >= 4).await;
    (controller.last_status_until(|s| !s.detail.contains(still))).await;
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_stops_answering_is_named_in_the_agents_word() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let proxy = tokio::spawn(CountingProxy::default().serve(listener));
    let (_steer, controller, url, server) = steering(desired(1, 0)).await;
    let config = listed(url, admin.clone());
    let (stop, shutdown) = watch::channel(false);
    let driver = AllReady(Vec::new());
    let agent = tokio::spawn(fleet_agent::run(config, driver, None, shutdown));
    let in_force = |s: &pb::AgentStatus| s.applied_seq == 1 && s.ready;
    let silent = format!("proxy {admin} does not answer: no connection taken");
    let said = controller.last_status_until(in_force).await;
    assert!(!said.detail.contains("does not answer"), "{}", said.detail);
    // It goes away (its listener closed): named, the step still in force on the table it put.
    proxy.abort();
    let said = (controller.last_status_until(|s| s.detail.contains(&silent))).await;
    assert!(in_force(&said), "{said:?}");
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
    server.abort();
}

/// TEST-ONLY: a driver as [`AllReady`] that, once `blind` is set, sees nothing (as a round
/// the Kubernetes API does not answer).
struct Blind {
    ready: AllReady,
    blind: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver for Blind {
    fn apply(&mut self, want: &Want) {
        self.ready.apply(want);
    }

    async fn poll(&mut self) -> Running {
        match self.blind.load(std::sync::atomic::Ordering::SeqCst) {
            true => Running {
                detail: "the Kubernetes API did not answer within 10s".into(),
                unseen: true,
                ..Running::default()
            },
            false => self.ready.poll().await,
        }
    }

    async fn shutdown(&mut self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_sees_nothing_leaves_a_step_in_force_and_a_new_one_not() {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(CountingProxy::default().serve(listener));
    let (steer, controller, url, server) = steering(desired(1, 0)).await;
    let config = listed(url, admin);
    let blind = Arc::default();
    let driver = Blind {
        ready: AllReady(Vec::new()),
        blind: Arc::clone(&blind),
    };
    let (stop, shutdown) = watch::channel(false);
    let agent = tokio::spawn(fleet_agent::run(config, driver, None, shutdown));
    controller
        .last_status_until(|s| s.applied_seq == 1 && s.ready)
        .await;
    // The API goes away: the step stays in force, the agent saying why it cannot see.
    blind.store(true, SeqCst);
    let unseen = "did not answer";
    let said = (controller.last_status_until(|s| s.detail.contains(unseen))).await;
    assert!(said.applied_seq == 1 && said.ready, "{said:?}");
    // A new step is not taken as in force unseen.
    steer.send_replace(Some(desired(2, 1000)));
    let said = (controller.last_status_until(|s| s.applied_seq != 1)).await;
    assert!(said.applied_seq == 0 && !said.ready, "{said:?}");
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
    server.abort();
}

/// TEST-ONLY: a controller that refuses every agent, as one does a second agent for a
/// cluster whose agent is connected.
struct Refusing;

#[tonic::async_trait]
impl AgentService for Refusing {
    type SessionStream = Sent;

    async fn session(
        &self,
        _: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        Err(tonic::Status::already_exists(
            "cluster usw-a of region us-west has an agent connected already",
        ))
    }
}

#[tokio::test]
async fn an_agent_refused_for_another_of_its_cluster_gives_up_after_held_limit() {
    let (url, server) = serve_controller(Refusing).await;
    let config = fleet_agent::Config {
        held_limit: Duration::from_secs(1),
        ..listed(url, "http://127.0.0.1:9".into())
    };
    let (_stop, shutdown) = watch::channel(false);
    let agent = fleet_agent::run(config, AllReady(Vec::new()), None, shutdown);
    let ended = tokio::time::timeout(Duration::from_secs(10), agent).await;
    let e = ended
        .expect("still dialling after 10 s")
        .unwrap_err()
        .to_string();
    let said = "refused for 1s because another agent is connected for this cluster: cluster usw-a";
    assert!(e.starts_with(said), "{e}");
    server.abort();
}
