//! The `kubernetes` driver, and the proxies found as pods (`--proxy-pods`), against a FAKE
//! Kubernetes API server, through kube-rs's documented test harness (a `tower_test` mock
//! service under a real `kube::Client`).
//!
//! What this shows: the requests the driver makes (paths, label selectors, server-side apply
//! with its field manager, the Deployment it sends as JSON typed by k8s-openapi), and how it
//! reads what an API server answers (lists, statuses, pods, errors). What it cannot show: that
//! a real API server and its controllers behave as the fake does. The fake keeps Deployments
//! and pods in memory, filters by label selector, and bumps a Deployment's generation when its
//! spec changes; it runs no controllers (a test sets statuses and pods itself), checks no
//! schema and knows no RBAC.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_agent::discover::{LOOK_EVERY, ProxySource};
use fleet_agent::driver::kubernetes::{KubernetesDriver, ROUND_TIMEOUT};
use fleet_agent::driver::{Driver, Want};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

/// One request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
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
    seen: Vec<Seen>,
    /// Answered to every PATCH instead of applying it.
    refuse_patches: Option<(StatusCode, Value)>,
    /// Autoscalers cannot be listed (a Role from before autoscaling).
    refuse_autoscaler_lists: bool,
    /// Answered to every DELETE instead of deleting.
    refuse_deletes: Option<(StatusCode, Value)>,
    /// No request is answered (the answers are held, never sent).
    hang: bool,
    /// Deployments made so far, for their uids.
    made: u32,
}

type Shared = Arc<Mutex<Cluster>>;

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
    (
        KubernetesDriver::new(client, Some("shop".into()), 8080),
        cluster,
    )
}

/// A real `kube::Client` whose API server is the fake.
fn fake_api() -> (kube::Client, Shared) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cluster = Shared::default();
    tokio::spawn(serve(handle, cluster.clone()));
    (kube::Client::new(service, "default"), cluster)
}

async fn serve(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>, c: Shared) {
    let mut held = Vec::new();
    while let Some((request, respond)) = handle.next_request().await {
        if c.lock().unwrap().hang {
            held.push(respond);
            continue;
        }
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let seen = Seen {
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let (status, answer) = answer(&mut c.lock().unwrap(), &seen);
        c.lock().unwrap().seen.push(seen);
        let mut response = Response::new(Body::from(serde_json::to_vec(&answer).unwrap()));
        *response.status_mut() = status;
        respond.send_response(response);
    }
}

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";
const PODS: &str = "/api/v1/namespaces/shop/pods";
const AUTOSCALERS: &str = "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers";

fn answer(c: &mut Cluster, seen: &Seen) -> (StatusCode, Value) {
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
            (StatusCode::OK, list("DeploymentList", "apps/v1", items))
        }
        (&Method::GET, AUTOSCALERS) if c.refuse_autoscaler_lists => (
            StatusCode::FORBIDDEN,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden",
                   "code": 403, "message": "cannot list resource \"horizontalpodautoscalers\""}),
        ),
        (&Method::GET, AUTOSCALERS) => {
            let items: Vec<Value> = c
                .autoscalers
                .values()
                .filter(|a| selects(selector.as_deref(), a))
                .cloned()
                .collect();
            let kind = "HorizontalPodAutoscalerList";
            (StatusCode::OK, list(kind, "autoscaling/v2", items))
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
        (&Method::GET, PODS) => {
            let items = c
                .pods
                .iter()
                .filter(|p| selects(selector.as_deref(), p))
                .cloned()
                .collect();
            (StatusCode::OK, list("PodList", "v1", items))
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

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "7"}, "items": items})
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
    let mut c = c.lock().unwrap();
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
    let mut c = c.lock().unwrap();
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

fn seen(c: &Shared) -> Vec<Seen> {
    std::mem::take(&mut c.lock().unwrap().seen)
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
            format!("GET {DEPLOYMENTS}?&{selector}"),
            format!("GET {AUTOSCALERS}?&{selector}"),
            // Not among the driver's: is the name free?
            format!("GET {DEPLOYMENTS}/checkout-v1"),
            format!("PATCH {DEPLOYMENTS}/checkout-v1?&force=true&fieldManager=fleet-agent"),
            format!("GET {PODS}?&{selector}"),
        ]
    );
    let patch = &requests[3];
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
    let running = driver.poll().await;
    assert!(running.ready.is_empty());
    assert_eq!(running.detail, "checkout-v1: 1 of 2 ready, 2 of 2 updated");
    // The Deployment says all are ready before the pods' readiness reaches the list: not
    // ready until a pod is.
    set_status(&cluster, "checkout-v1", 2);
    set_pods(&cluster, "v1", &[]);
    let running = driver.poll().await;
    assert!(running.ready.is_empty());
    assert_eq!(running.detail, "checkout-v1: no pod ready with an address");

    roll_out(&cluster, "checkout-v1", "v1", 2);
    let running = driver.poll().await;
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
    cluster.lock().unwrap().deployments.insert(
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
    let names: Vec<_> = cluster
        .lock()
        .unwrap()
        .deployments
        .keys()
        .cloned()
        .collect();
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
    let c = cluster.lock().unwrap();
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
    cluster.lock().unwrap().deployments.clear();
    driver.poll().await;
    assert!(
        cluster
            .lock()
            .unwrap()
            .deployments
            .contains_key("checkout-v1")
    );
}

#[tokio::test]
async fn what_cannot_run_is_reported_with_the_reason_and_nothing_is_ready() {
    let (mut driver, cluster) = fake_cluster();
    let refused = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "reason": "Forbidden", "code": 403,
        "message": "deployments.apps \"checkout-v1\" is forbidden: User \"system:serviceaccount:shop:fleet-agent\" cannot patch resource \"deployments\""});
    cluster.lock().unwrap().refuse_patches = Some((StatusCode::FORBIDDEN, refused));
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
        cluster
            .lock()
            .unwrap()
            .deployments
            .keys()
            .collect::<Vec<_>>(),
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
    cluster
        .lock()
        .unwrap()
        .deployments
        .insert(name.into(), object);
}

fn managed(name: &str, version: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "generation": 1, "uid": format!("uid-{name}"), "labels": {
               "app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": version,
               "app.kubernetes.io/managed-by": "fleet-agent"}},
           "spec": {"replicas": 1}})
}

#[tokio::test]
async fn once_rolled_out_a_version_follows_its_pods_to_new_addresses() {
    let (mut driver, cluster) = first_round(&[("v1", 2)]).await;
    roll_out(&cluster, "checkout-v1", "v1", 2);
    assert_eq!(
        driver.poll().await.ready,
        ready("v1", &["10.1.0.1:8080", "10.1.0.2:8080"])
    );

    // A pod evicted: the version goes on with the one left, then with its replacement.
    set_status(&cluster, "checkout-v1", 1);
    set_pods(&cluster, "v1", &["10.1.0.1"]);
    assert_eq!(driver.poll().await.ready, ready("v1", &["10.1.0.1:8080"]));
    set_pods(&cluster, "v1", &["10.1.0.1", "10.1.0.7"]);
    set_status(&cluster, "checkout-v1", 2);
    assert_eq!(
        driver.poll().await.ready,
        ready("v1", &["10.1.0.1:8080", "10.1.0.7:8080"])
    );

    // A new spec (three replicas) rolls out with the version still served by its ready pods,
    // and what it waits for is told.
    driver.apply(&want(&[("v1", 3)]));
    let running = driver.poll().await;
    assert_eq!(
        running.ready,
        ready("v1", &["10.1.0.1:8080", "10.1.0.7:8080"])
    );
    assert_eq!(
        running.detail,
        "checkout-v1: its latest spec is not yet seen by the cluster; serving with its 2 ready pods"
    );
    roll_out(&cluster, "checkout-v1", "v1", 3);
    assert_eq!(driver.poll().await.ready["v1"].len(), 3);
}

#[tokio::test]
async fn a_deployment_made_again_must_roll_out_anew() {
    let (mut driver, cluster) = first_round(&[("v1", 2)]).await;
    roll_out(&cluster, "checkout-v1", "v1", 2);
    assert_eq!(driver.poll().await.ready["v1"].len(), 2);
    // Deleted by hand: made again at generation 1 as before, its old pods not yet gone.
    cluster.lock().unwrap().deployments.clear();
    let running = driver.poll().await;
    assert!(running.ready.is_empty(), "{running:?}");
    assert_eq!(running.detail, "checkout-v1: no status yet");
    roll_out(&cluster, "checkout-v1", "v1", 2);
    assert_eq!(driver.poll().await.ready["v1"].len(), 2);
}

#[tokio::test]
async fn a_failed_apply_leaves_the_running_version_running_and_served() {
    let (mut driver, cluster) = first_round(&[("v1", 2)]).await;
    roll_out(&cluster, "checkout-v1", "v1", 2);
    driver.poll().await;
    cluster.lock().unwrap().refuse_patches = Some((
        StatusCode::TOO_MANY_REQUESTS,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": "TooManyRequests", "code": 429, "message": "too many requests"}),
    ));
    driver.apply(&want(&[("v1", 3)]));
    let running = driver.poll().await;
    assert!(seen(&cluster).iter().all(|s| s.method != Method::DELETE));
    assert!(
        cluster
            .lock()
            .unwrap()
            .deployments
            .contains_key("checkout-v1")
    );
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

#[tokio::test]
async fn after_a_restart_nothing_is_deleted_until_the_proxies_have_a_table() {
    let (mut driver, cluster) = fake_cluster();
    // What ran before the agent restarted; the proxies may still send traffic to it.
    put(&cluster, "checkout-v0", managed("checkout-v0", "v0"));
    driver.apply(&Want {
        keep_others: true,
        ..want(&[("v1", 1)])
    });
    driver.poll().await;
    assert!(seen(&cluster).iter().all(|s| s.method != Method::DELETE));
    assert!(
        cluster
            .lock()
            .unwrap()
            .deployments
            .contains_key("checkout-v0")
    );

    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    assert!(
        !cluster
            .lock()
            .unwrap()
            .deployments
            .contains_key("checkout-v0")
    );
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
    assert_eq!(cluster.lock().unwrap().deployments["checkout-v1"], theirs);
}

#[tokio::test]
async fn a_failed_delete_is_reported_and_the_wanted_version_carries_on() {
    let (mut driver, cluster) = fake_cluster();
    put(&cluster, "checkout-v0", managed("checkout-v0", "v0"));
    cluster.lock().unwrap().refuse_deletes = Some((
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
    cluster.lock().unwrap().pods.push(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "checkout-v1-abc", "labels": {
            "app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": "v1",
            "app.kubernetes.io/managed-by": "fleet-agent"}},
        "status": {"containerStatuses": [{"name": "checkout", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                                   "message": "Back-off pulling image \"registry.example.com/checkout:v1\""}}}]},
    }));
    let detail = driver.poll().await.detail;
    assert_eq!(
        detail,
        "checkout-v1: 0 of 1 ready, 1 of 1 updated (pod checkout-v1-abc: container checkout waiting: \
         ImagePullBackOff: Back-off pulling image \"registry.example.com/checkout:v1\")"
    );
}

#[tokio::test]
async fn a_hand_edit_of_the_drivers_fields_is_undone() {
    let (mut driver, cluster) = first_round(&[("v1", 1)]).await;
    {
        // `kubectl set image`: another image, the next generation.
        let mut c = cluster.lock().unwrap();
        let d = c.deployments.get_mut("checkout-v1").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest".into();
        d["metadata"]["generation"] = 2.into();
    }
    seen(&cluster);
    driver.poll().await;
    assert!(seen(&cluster).iter().any(|s| s.method == Method::PATCH));
    let image = cluster.lock().unwrap().deployments["checkout-v1"]["spec"]["template"]["spec"]
        ["containers"][0]["image"]
        .clone();
    assert_eq!(image, "registry.example.com/checkout:v1");
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
    cluster.lock().unwrap().hang = true;
    driver.apply(&want(&[("v1", 1)]));
    let started = tokio::time::Instant::now();
    let running = driver.poll().await;
    assert_eq!(started.elapsed(), ROUND_TIMEOUT);
    assert!(running.ready.is_empty());
    assert_eq!(
        running.detail,
        "the Kubernetes API did not answer within 10s (namespace shop)"
    );
}

/// A pod of the region's proxies (or of `name`), running at `ip`.
fn proxy_pod(name: &str, ip: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-{ip}"), "labels": {"app.kubernetes.io/name": name}},
        "status": {"phase": phase, "podIP": ip},
    })
}

#[tokio::test(start_paused = true)]
async fn the_proxies_are_the_running_pods_a_selector_picks_looked_up_every_few_seconds() {
    let (client, cluster) = fake_api();
    let selector = "app.kubernetes.io/name=fleet-proxy";
    let mut source = ProxySource::pods(client, Some("shop"), selector.into(), 9901);
    cluster.lock().unwrap().pods = vec![
        proxy_pod("fleet-proxy", "10.2.0.2", "Running"),
        proxy_pod("fleet-proxy", "10.2.0.3", "Pending"),
        proxy_pod("checkout", "10.1.0.1", "Running"),
    ];
    assert_eq!(
        source.look().await.unwrap().unwrap(),
        ["http://10.2.0.2:9901"]
    );
    let asked = seen(&cluster).pop().unwrap();
    assert_eq!(asked.method, Method::GET);
    assert_eq!(
        asked.uri,
        "/api/v1/namespaces/shop/pods?&labelSelector=app.kubernetes.io%2Fname%3Dfleet-proxy"
    );
    assert!(source.look().await.is_none(), "not again so soon");

    // Scaled out, one rescheduled: found at the next look.
    cluster.lock().unwrap().pods = vec![
        proxy_pod("fleet-proxy", "10.2.0.3", "Running"),
        proxy_pod("fleet-proxy", "10.2.0.4", "Running"),
    ];
    tokio::time::advance(LOOK_EVERY).await;
    assert_eq!(
        source.look().await.unwrap().unwrap(),
        ["http://10.2.0.3:9901", "http://10.2.0.4:9901"]
    );

    // None running: told, naming the selector (the proxies known stay).
    cluster.lock().unwrap().pods = vec![proxy_pod("fleet-proxy", "10.2.0.5", "Pending")];
    tokio::time::advance(LOOK_EVERY).await;
    let e = source.look().await.unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "no running pod matches the proxies' selector app.kubernetes.io/name=fleet-proxy"
    );

    // An API server that does not answer: an error, after a while, and no hang; the next
    // look waits its turn from then, so the agent's rounds are not held every time.
    cluster.lock().unwrap().hang = true;
    tokio::time::advance(LOOK_EVERY).await;
    let e = source.look().await.unwrap().unwrap_err();
    assert!(e.to_string().contains("no answer within"), "{e}");
    assert!(source.look().await.is_none());
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
    roll_out(&cluster, "checkout-v1", "v1", 3);
    // A real API server records that fleet-agent's apply set the count (the fake does not).
    cluster
        .lock()
        .unwrap()
        .deployments
        .get_mut("checkout-v1")
        .unwrap()["metadata"]["managedFields"] = json!([{"manager": "fleet-agent", "operation": "Apply",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]);
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
        let c = cluster.lock().unwrap();
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
    cluster
        .lock()
        .unwrap()
        .deployments
        .get_mut("checkout-v1")
        .unwrap()["spec"]["replicas"] = json!(3);
    roll_out(&cluster, "checkout-v1", "v1", 3);
    let running = driver.poll().await;
    assert_eq!(running.detail, "");
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
    let c = cluster.lock().unwrap();
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
        .unwrap()
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
    assert_eq!(cluster.lock().unwrap().autoscalers["checkout-v1"], theirs);
}

/// A driver that made an autoscaled v2, rolled out with `pods` pods: the count its autoscaler
/// holds it at (the fake runs no HPA controller, so the count is set here).
async fn autoscaled_v2_with(pods: u32) -> (KubernetesDriver, Shared) {
    let (mut driver, cluster) = fake_cluster();
    driver.apply(&autoscaled(&[("v2", 2)]));
    driver.poll().await;
    cluster
        .lock()
        .unwrap()
        .deployments
        .get_mut("checkout-v2")
        .unwrap()["spec"]["replicas"] = json!(pods);
    roll_out(&cluster, "checkout-v2", "v2", pods);
    (driver, cluster)
}

#[tokio::test]
async fn a_new_autoscaled_version_is_ready_only_with_min_pods() {
    // Made without a count, the Deployment has one pod until its autoscaler acts.
    let (mut driver, _cluster) = autoscaled_v2_with(1).await;
    let running = driver.poll().await;
    assert!(running.ready.is_empty(), "{running:?}");
    assert_eq!(running.detail, "checkout-v2: 1 of 2 ready, 1 of 2 updated");
}

#[tokio::test]
async fn an_autoscaler_that_cannot_scale_is_reported_and_its_version_serves_on() {
    let (mut driver, cluster) = autoscaled_v2_with(2).await;
    let running = driver.poll().await;
    assert_eq!(running.detail, "", "{running:?}");
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
    cluster
        .lock()
        .unwrap()
        .autoscalers
        .get_mut("checkout-v2")
        .unwrap()["status"] = status;
    let running = driver.poll().await;
    assert_eq!(
        running.ready,
        ready("v2", &["10.1.0.1:8080", "10.1.0.2:8080"])
    );
    assert_eq!(
        running.detail,
        "autoscaler checkout-v2 cannot scale, FailedGetResourceMetric: the HPA was unable to \
         compute the replica count: failed to get cpu utilization: unable to get metrics for \
         resource cpu: no metrics returned from resource metrics API (does the cluster run a \
         metrics server?)"
    );
}

#[tokio::test]
async fn autoscalers_that_cannot_be_listed_stop_only_what_autoscales() {
    let (mut driver, cluster) = fake_cluster();
    cluster.lock().unwrap().refuse_autoscaler_lists = true;
    driver.apply(&want(&[("v1", 1)]));
    driver.poll().await;
    roll_out(&cluster, "checkout-v1", "v1", 1);
    let running = driver.poll().await;
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
