//! `deploy/`: the Kubernetes install and its image, checked without a cluster (none runs
//! here).
//!
//! What this shows:
//! - every object is a valid Kubernetes object as k8s-openapi types it: a misspelt or
//!   misplaced field fails, as it does not survive a round trip through the typed object;
//! - the containers' flags and environment are the ones the binaries take (each binary is run
//!   with the flags, and its `--help` lists the variables);
//! - the proxies' starting config passes `fleet-proxy --check`;
//! - the agent's Role grants what the kubernetes driver calls;
//! - the names and ports that refer to each other agree, and the image has every binary the
//!   workloads run.
//!
//! What it cannot show: that a cluster admits these objects (admission, quotas, a CNI that
//! enforces NetworkPolicy), that the image builds, or that the parts find each other over a
//! cluster's network.
#![allow(clippy::unwrap_used)]

use fleet_e2e::bin;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The documents of `deploy/kubernetes/FILE`.
fn documents(file: &str) -> Vec<Value> {
    let path = deploy_dir().join("kubernetes").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap()
}

/// `doc` read as `T` and written back: the same as `doc` when every field is one `T` has.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap();
    serde_json::to_value(typed).unwrap()
}

fn typed(doc: &Value) -> Value {
    match doc["kind"].as_str().unwrap() {
        "Namespace" => round_trip::<Namespace>(doc),
        "Service" => round_trip::<Service>(doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "ConfigMap" => round_trip::<ConfigMap>(doc),
        "Deployment" => round_trip::<Deployment>(doc),
        "StatefulSet" => round_trip::<StatefulSet>(doc),
        "Role" => round_trip::<Role>(doc),
        "RoleBinding" => round_trip::<RoleBinding>(doc),
        "NetworkPolicy" => round_trip::<NetworkPolicy>(doc),
        "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(doc),
        other => panic!("no check for kind {other}"),
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn template(workload: &Value) -> PodTemplateSpec {
    serde_json::from_value(workload["spec"]["template"].clone()).unwrap()
}

#[test]
fn every_object_is_a_kubernetes_object_with_no_field_it_does_not_have() {
    for file in ["controller.yaml", "controller-ha.yaml", "cluster.yaml"] {
        let docs = documents(file);
        assert!(docs.len() >= 3, "{file}: {} documents", docs.len());
        for doc in &docs {
            assert_eq!(
                &typed(doc),
                doc,
                "{file}: {} {} has fields its type has not (left: as typed)",
                doc["kind"],
                doc["metadata"]["name"]
            );
        }
    }
}

/// A mistake of the kind the round trip is there to catch is caught.
#[test]
fn a_misspelt_field_does_not_survive_the_round_trip() {
    let mut doc = find(&documents("cluster.yaml"), "Deployment", "fleet-agent").clone();
    doc["spec"]["template"]["spec"]["serviceAcountName"] = "fleet-agent".into();
    assert_ne!(typed(&doc), doc);
}

#[test]
fn each_container_runs_a_binary_of_the_image_with_flags_and_variables_it_takes() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("docker/Dockerfile")).unwrap();
    // fleet-proxy comes from the profile-guided build (benches/pgo.sh), the rest as built.
    let in_image: BTreeSet<&str> = (dockerfile.split_whitespace())
        .filter_map(|w| {
            (w.strip_prefix("target/release/")).or_else(|| w.strip_prefix("target/pgo/"))
        })
        .collect();
    assert!(in_image.len() >= 4, "{in_image:?}");
    if dockerfile.contains("target/pgo/") {
        let script = deploy_dir().join("../benches/pgo.sh");
        assert!(
            dockerfile.contains("benches/pgo.sh") && script.exists(),
            "the image installs a profile-guided build that nothing builds"
        );
    }
    for name in &in_image {
        assert!(
            bin(name).exists(),
            "the image installs {name}, not a workspace binary"
        );
    }

    let mut checked = 0;
    for file in ["controller.yaml", "controller-ha.yaml", "cluster.yaml"] {
        let docs = documents(file);
        for doc in docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        {
            let spec = template(doc).spec.unwrap();
            for c in &spec.containers {
                let command = c.command.as_ref().unwrap();
                let name = command[0].strip_prefix("/usr/local/bin/").unwrap();
                assert!(in_image.contains(name), "{name} is not in the image");
                // Every flag (and value) is taken: clap stops at the first it does not know,
                // before `--help`.
                let args = c.args.clone().unwrap_or_default();
                let out = Command::new(bin(name))
                    .args(&args)
                    .arg("--help")
                    .env_clear()
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{name} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // Help text wraps lines between `[env:` and the name.
                let help = String::from_utf8_lossy(&out.stdout);
                let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
                let mut variables: Vec<String> =
                    c.env.iter().flatten().map(|e| e.name.clone()).collect();
                for from in c.env_from.iter().flatten() {
                    let map = from.config_map_ref.as_ref().unwrap();
                    let data = find(&docs, "ConfigMap", &map.name)["data"].clone();
                    variables.extend(data.as_object().unwrap().keys().cloned());
                }
                // A variable the arguments take (`$(POD_IP)`) is Kubernetes', not the binary's.
                let in_args = |v: &str| args.iter().any(|a| a.contains(&format!("$({v})")));
                for v in variables.into_iter().filter(|v| !in_args(v)) {
                    assert!(
                        help.contains(&format!("[env: {v}=")),
                        "{name} does not read {v}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4, "controller (twice), agent, proxy");
}

#[test]
fn highly_available_controllers_advertise_their_pod_address_and_one_survives_a_drain() {
    let docs = documents("controller-ha.yaml");
    let deployment = find(&docs, "Deployment", "fleet-controller");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let spec = template(deployment).spec.unwrap();
    let c = &spec.containers[0];
    let args = c.args.clone().unwrap();
    let flag = |name: &str| {
        let at = args.iter().position(|a| a == name).unwrap();
        args[at + 1].clone()
    };
    assert!(flag("--etcd").starts_with("http://"), "{args:?}");
    assert!(!args.contains(&"--data".to_string()), "{args:?}");
    // Kubernetes puts $(POD_IP) in only if the container has that variable.
    let grpc = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("grpc"));
    let port = grpc.unwrap().container_port;
    assert_eq!(flag("--advertise"), format!("$(POD_IP):{port}"));
    let from = |name: &str| {
        let var = c.env.iter().flatten().find(|e| e.name == name).unwrap();
        let field = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        field.field_path.clone()
    };
    assert_eq!(from("POD_IP"), "status.podIP");
    assert_eq!(from("FLEET_CONTROLLER_NAME"), "metadata.name");
    let budget = find(&docs, "PodDisruptionBudget", "fleet-controller");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert!(selects(
        "app.kubernetes.io/name=fleet-controller",
        &deployment["spec"]["template"]
    ));
}

#[test]
fn the_proxies_start_on_a_config_fleet_proxy_accepts_at_the_path_they_are_given() {
    let docs = documents("cluster.yaml");
    let config = find(&docs, "ConfigMap", "fleet-proxy")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, &config).unwrap();
    let out = Command::new(bin("fleet-proxy"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its table is a placeholder: the proxy takes traffic only once the agent put its own.
    assert!(config.contains("\nawait_put: true\n"), "{config}");

    let proxy = template(find(&docs, "StatefulSet", "fleet-proxy"))
        .spec
        .unwrap();
    let c = &proxy.containers[0];
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[1], format!("{}/config.yaml", mount.mount_path));
    let volume = &proxy.volumes.as_ref().unwrap()[0];
    assert_eq!(volume.name, mount.name);
    assert_eq!(volume.config_map.as_ref().unwrap().name, "fleet-proxy");
    let port = |name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .container_port
    };
    assert!(config.contains(&format!("listen: 0.0.0.0:{}", port("http"))));
    assert!(config.contains(&format!("admin: 0.0.0.0:{}", port("admin"))));
}

#[test]
fn the_agent_is_allowed_what_the_kubernetes_driver_does_and_reaches_every_proxy() {
    let docs = documents("cluster.yaml");
    let role: Role = serde_json::from_value(find(&docs, "Role", "fleet-agent").clone()).unwrap();
    // The calls of agent/src/driver/kubernetes.rs, and the watches of agent/src/watched.rs.
    for (group, resource, verb) in [
        ("apps", "deployments", "get"),
        ("apps", "deployments", "list"),
        ("apps", "deployments", "watch"),
        // A server-side apply that makes the object.
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "delete"),
        // agent/src/driver/kubernetes/scaling.rs.
        ("autoscaling", "horizontalpodautoscalers", "get"),
        ("autoscaling", "horizontalpodautoscalers", "list"),
        ("autoscaling", "horizontalpodautoscalers", "watch"),
        ("autoscaling", "horizontalpodautoscalers", "create"),
        ("autoscaling", "horizontalpodautoscalers", "patch"),
        ("autoscaling", "horizontalpodautoscalers", "delete"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
    ] {
        assert!(
            role.rules.iter().flatten().any(|r| {
                let has = |l: &Option<Vec<String>>, x: &str| l.iter().flatten().any(|v| v == x);
                has(&r.api_groups, group)
                    && has(&r.resources, resource)
                    && r.verbs.iter().any(|v| v == verb)
            }),
            "the Role does not allow {verb} {resource}"
        );
    }
    let binding = find(&docs, "RoleBinding", "fleet-agent");
    assert_eq!(binding["subjects"][0]["name"], "fleet-agent");
    let agent = template(find(&docs, "Deployment", "fleet-agent"))
        .spec
        .unwrap();
    assert_eq!(agent.service_account_name.as_deref(), Some("fleet-agent"));
    // Its probes ask the admin port it serves on.
    let c = &agent.containers[0];
    let args = c.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--admin").unwrap();
    let admin = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("admin"));
    assert_eq!(
        args[at + 1],
        format!("0.0.0.0:{}", admin.unwrap().container_port)
    );
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("admin".into()));
    }

    // The agent finds the proxies as the pods its selector picks, at their admin port.
    let proxies = find(&docs, "StatefulSet", "fleet-proxy");
    let pod = &proxies["spec"]["template"];
    let config = &find(&docs, "ConfigMap", "fleet-agent")["data"];
    let selector = config["FLEET_PROXY_PODS"].as_str().unwrap();
    assert!(selects(selector, pod), "{selector} picks no proxy pod");
    let admin_port = pod["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap()["containerPort"]
        .as_i64()
        .unwrap();
    assert_eq!(config["FLEET_PROXY_ADMIN_PORT"], admin_port.to_string());
    assert!(
        config.get("FLEET_PROXY_ADMIN").is_none(),
        "one or the other"
    );

    // The controller's URL is its Service's.
    let controller = documents("controller.yaml");
    let svc = find(&controller, "Service", "fleet-controller");
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(
        config["FLEET_CONTROLLER"],
        format!(
            "http://{}.{}.svc:{}",
            svc["metadata"]["name"].as_str().unwrap(),
            svc["metadata"]["namespace"].as_str().unwrap(),
            grpc["port"]
        )
    );
}

#[test]
fn services_select_their_pods_by_label_and_port_name_and_objects_share_a_namespace() {
    for file in ["controller.yaml", "controller-ha.yaml", "cluster.yaml"] {
        let docs = documents(file);
        let namespaces: BTreeSet<&str> = docs
            .iter()
            .filter(|d| d["kind"] != "Namespace")
            .map(|d| d["metadata"]["namespace"].as_str().unwrap())
            .collect();
        assert_eq!(namespaces.len(), 1, "{file}: {namespaces:?}");
        let workloads: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
            .collect();
        // A StatefulSet's own Service gives its pods their names: it must be headless.
        for set in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
            let own = find(
                &docs,
                "Service",
                set["spec"]["serviceName"].as_str().unwrap(),
            );
            assert_eq!(own["spec"]["clusterIP"], "None", "{file}");
        }
        for svc in docs.iter().filter(|d| d["kind"] == "Service") {
            let selector = svc["spec"]["selector"].as_object().unwrap();
            let selected: Vec<_> = workloads
                .iter()
                .filter(|w| {
                    let labels = &w["spec"]["template"]["metadata"]["labels"];
                    selector.iter().all(|(k, v)| labels[k] == *v)
                })
                .collect();
            assert_eq!(selected.len(), 1, "{file}: {}", svc["metadata"]["name"]);
            let ports = &selected[0]["spec"]["template"]["spec"]["containers"][0]["ports"];
            for p in svc["spec"]["ports"].as_array().unwrap() {
                assert!(
                    ports
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|c| c["name"] == p["targetPort"]),
                    "{file}: {} targets port {}, which its pods do not name",
                    svc["metadata"]["name"],
                    p["targetPort"]
                );
            }
        }
    }
}

/// Whether every `key=value` of the label selector `selector` is among `object`'s labels.
fn selects(selector: &str, object: &Value) -> bool {
    selector.split(',').all(|term| {
        term.split_once('=')
            .is_some_and(|(k, v)| object["metadata"]["labels"][k] == v)
    })
}
