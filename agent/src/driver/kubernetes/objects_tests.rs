#![allow(clippy::unwrap_used)]

use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;

fn spec(version: &str) -> Spec<'_> {
    Spec {
        namespace: "shop",
        service: "checkout",
        version,
        replicas: 3,
        image: format!("registry.example.com/checkout:{version}"),
        port: 8080,
        health_check: "/healthz",
        cpu: "",
        memory: "",
        run_as_user: 0,
        autoscale: None,
    }
}

#[test]
fn resources_given_are_requested_and_memory_is_the_limit_too() {
    let d = deployment(&Spec {
        cpu: "250m",
        memory: "256Mi",
        ..spec("v2")
    });
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["resources"],
        serde_json::json!({
            "requests": { "cpu": "250m", "memory": "256Mi" },
            "limits": { "memory": "256Mi" }
        })
    );
    let cpu_only = deployment(&Spec {
        cpu: "1",
        ..spec("v2")
    });
    let json = serde_json::to_value(&cpu_only).unwrap();
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["resources"],
        serde_json::json!({ "requests": { "cpu": "1" } })
    );
}

#[test]
fn with_run_as_user_the_pods_meet_the_restricted_profile_and_without_it_get_no_context() {
    let d = deployment(&Spec {
        run_as_user: 65532,
        ..spec("v2")
    });
    let json = serde_json::to_value(&d).unwrap();
    let pod = &json["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"],
        serde_json::json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "seccompProfile": { "type": "RuntimeDefault" }
        })
    );
    assert_eq!(
        pod["containers"][0]["securityContext"],
        serde_json::json!({
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] }
        })
    );
    let json = serde_json::to_value(deployment(&spec("v2"))).unwrap();
    let pod = &json["spec"]["template"]["spec"];
    assert!(pod.get("securityContext").is_none(), "{pod}");
    assert!(pod["containers"][0].get("securityContext").is_none());
}

#[test]
fn a_version_that_is_a_name_already_names_its_deployment_as_it_is() {
    assert_eq!(deployment_name("checkout", "v2"), "checkout-v2");
    assert_eq!(
        deployment_name("checkout", "2024-05-01"),
        "checkout-2024-05-01"
    );
}

#[test]
fn other_versions_get_a_hash_so_that_no_two_share_a_deployment() {
    let dotted = deployment_name("checkout", "1.2");
    let dashed = deployment_name("checkout", "1-2");
    let upper = deployment_name("checkout", "V2");
    assert!(dotted.starts_with("checkout-1-2-"), "{dotted}");
    assert_eq!(dashed, "checkout-1-2");
    assert_ne!(dotted, dashed);
    assert!(upper.starts_with("checkout-v2-"), "{upper}");
    assert_ne!(upper, deployment_name("checkout", "v2"));
    for v in ["1.2", "V2", &"9".repeat(63), "a_b"] {
        let name = deployment_name("checkout", v);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
        assert!(!name.ends_with('-') && !name.contains("--"), "{name}");
    }
}

#[test]
fn names_and_versions_that_kubernetes_would_refuse_are_refused_with_the_fix() {
    assert!(check_service("checkout").is_ok());
    let e = check_service("Checkout_API").unwrap_err();
    assert!(
        e.contains("\"Checkout_API\"") && e.contains("lowercase"),
        "{e}"
    );
    assert!(check_service("-checkout").is_err());
    assert!(check_service(&"a".repeat(64)).is_err());

    for ok in ["v2", "1.4.2", "2024_05_01", "rc-1"] {
        assert!(check_version(ok).is_ok(), "{ok}");
    }
    let e = check_version("1.4.2+build.7").unwrap_err();
    assert!(
        e.contains("\"1.4.2+build.7\"") && e.contains("label value"),
        "{e}"
    );
    assert!(check_version("").is_err());
    assert!(check_version("-v2").is_err());
    assert!(check_version(&"1".repeat(64)).is_err());
}

#[test]
fn a_deployment_runs_the_image_of_its_version_behind_a_readiness_probe() {
    let d = deployment(&spec("v2"));
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "checkout-v2",
                "namespace": "shop",
                "labels": {
                    "app.kubernetes.io/managed-by": "fleet-agent",
                    "app.kubernetes.io/name": "checkout",
                    "app.kubernetes.io/version": "v2"
                }
            },
            "spec": {
                "replicas": 3,
                "selector": { "matchLabels": {
                    "app.kubernetes.io/managed-by": "fleet-agent",
                    "app.kubernetes.io/name": "checkout",
                    "app.kubernetes.io/version": "v2"
                } },
                "template": {
                    "metadata": { "labels": {
                        "app.kubernetes.io/managed-by": "fleet-agent",
                        "app.kubernetes.io/name": "checkout",
                        "app.kubernetes.io/version": "v2"
                    } },
                    "spec": { "containers": [{
                        "name": "checkout",
                        "image": "registry.example.com/checkout:v2",
                        "ports": [{ "name": "http", "containerPort": 8080 }],
                        "env": [
                            { "name": "PORT", "value": "8080" },
                            { "name": "FLEET_VERSION", "value": "v2" }
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz", "port": "http" },
                            "periodSeconds": 2
                        },
                        "lifecycle": { "preStop": { "sleep": { "seconds": 5 } } }
                    }] }
                }
            }
        })
    );
    assert_eq!(
        selector("checkout"),
        "app.kubernetes.io/managed-by=fleet-agent,app.kubernetes.io/name=checkout"
    );
}

fn with_status(generation: i64, status: DeploymentStatus) -> Deployment {
    let mut d = deployment(&spec("v2"));
    d.metadata.generation = Some(generation);
    d.status = Some(status);
    d
}

#[test]
fn a_rollout_is_complete_once_the_latest_spec_runs_everywhere_ready_and_alone() {
    let done = DeploymentStatus {
        observed_generation: Some(2),
        replicas: Some(3),
        updated_replicas: Some(3),
        ready_replicas: Some(3),
        available_replicas: Some(3),
        ..DeploymentStatus::default()
    };
    assert_eq!(rolled_out(&with_status(2, done.clone()), 3), Ok(()));

    let unseen = with_status(3, done.clone());
    assert!(rolled_out(&unseen, 3).unwrap_err().contains("not yet seen"));
    let short = with_status(
        2,
        DeploymentStatus {
            ready_replicas: Some(2),
            ..done.clone()
        },
    );
    assert_eq!(
        rolled_out(&short, 3).unwrap_err(),
        "checkout-v2: 2 of 3 ready, 3 of 3 updated"
    );
    let old_left = with_status(
        2,
        DeploymentStatus {
            replicas: Some(4),
            ..done
        },
    );
    assert!(
        rolled_out(&old_left, 3)
            .unwrap_err()
            .contains("1 old instances")
    );
    let mut fresh = deployment(&spec("v2"));
    fresh.metadata.generation = Some(1);
    assert!(rolled_out(&fresh, 3).unwrap_err().contains("no status"));
}

#[test]
fn an_autoscaled_rollout_wants_what_its_autoscaler_set_and_never_fewer_than_min() {
    let mut scaled = with_status(2, done5());
    let mut count = |n| {
        if let Some(spec) = scaled.spec.as_mut() {
            spec.replicas = n;
        }
        let replicas = wanted_replicas(&scaled, Some(&AUTOSCALE), 3);
        (replicas, rolled_out(&scaled, replicas))
    };
    assert_eq!(count(Some(5)), (5, Ok(())));
    assert_eq!(
        count(Some(6)),
        (6, Err("checkout-v2: 5 of 6 ready, 5 of 6 updated".into()))
    );
    // Made without a count, the Deployment has one until its autoscaler acts: not enough.
    assert_eq!(count(None).0, AUTOSCALE.min);
    assert_eq!(count(Some(1)).0, AUTOSCALE.min);
    assert_eq!(
        wanted_replicas(&scaled, None, 3),
        3,
        "not autoscaled: as asked"
    );
}

fn done5() -> DeploymentStatus {
    DeploymentStatus {
        observed_generation: Some(2),
        replicas: Some(5),
        updated_replicas: Some(5),
        ready_replicas: Some(5),
        ..DeploymentStatus::default()
    }
}

const AUTOSCALE: crate::driver::Autoscale = crate::driver::Autoscale {
    min: 2,
    max: 10,
    cpu_percent: 70,
};

#[test]
fn an_autoscaled_version_leaves_its_count_to_an_autoscaler_its_deployment_owns() {
    let autoscaled = Spec {
        autoscale: Some(AUTOSCALE),
        cpu: "250m",
        ..spec("v2")
    };
    let mut d = deployment(&autoscaled);
    let json = serde_json::to_value(&d).unwrap();
    assert!(json["spec"].get("replicas").is_none(), "{json}");
    d.metadata.uid = Some("uid-7".into());
    let hpa = autoscaler("shop", ("checkout", "v2"), &AUTOSCALE, &d);
    let hpa = serde_json::to_value(hpa).unwrap();
    assert_eq!(
        hpa,
        serde_json::json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {
                "name": "checkout-v2",
                "namespace": "shop",
                "labels": {
                    "app.kubernetes.io/managed-by": "fleet-agent",
                    "app.kubernetes.io/name": "checkout",
                    "app.kubernetes.io/version": "v2"
                },
                "ownerReferences": [
                    { "apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout-v2", "uid": "uid-7" }
                ]
            },
            "spec": {
                "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout-v2" },
                "minReplicas": 2,
                "maxReplicas": 10,
                "metrics": [{
                    "type": "Resource",
                    "resource": { "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 70 } }
                }]
            }
        })
    );
}

#[test]
fn a_count_the_driver_applied_is_handed_over_before_the_driver_lets_go_of_it() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    let entry = |manager: &str, fields: serde_json::Value| ManagedFieldsEntry {
        manager: Some(manager.into()),
        operation: Some("Apply".into()),
        fields_v1: Some(FieldsV1(fields)),
        ..ManagedFieldsEntry::default()
    };
    let mut d = deployment(&spec("v2"));
    assert_eq!(
        replicas_handover(&d),
        None,
        "no one's yet: a new Deployment"
    );
    d.metadata.managed_fields = Some(vec![entry(
        MANAGER,
        serde_json::json!({"f:spec": {"f:replicas": {}, "f:template": {}}}),
    )]);
    assert_eq!(
        replicas_handover(&d),
        Some(serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "checkout-v2" },
            "spec": { "replicas": 3 },
        }))
    );
    // Handed over already (the driver applies without a count): nothing to do.
    d.metadata.managed_fields = Some(vec![
        entry(MANAGER, serde_json::json!({"f:spec": {"f:template": {}}})),
        entry(HANDOVER, serde_json::json!({"f:spec": {"f:replicas": {}}})),
    ]);
    assert_eq!(replicas_handover(&d), None);
}

fn pod(version: &str, ip: Option<&str>, ready: bool, deleting: bool) -> Pod {
    let mut p = Pod::default();
    p.metadata.labels = Some(BTreeMap::from([(VERSION.to_owned(), version.to_owned())]));
    if deleting {
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
    }
    p.status = Some(PodStatus {
        pod_ip: ip.map(str::to_owned),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    p
}

#[test]
fn a_versions_instances_are_its_ready_pods_that_are_not_going_away() {
    let pods = [
        pod("v2", Some("10.0.0.9"), true, false),
        pod("v2", Some("10.0.0.3"), true, false),
        pod("v2", Some("10.0.0.4"), false, false),
        pod("v2", Some("10.0.0.5"), true, true),
        pod("v2", None, true, false),
        pod("v1", Some("10.0.0.1"), true, false),
        pod("v2", Some("fd00::7"), true, false),
    ];
    assert_eq!(
        ready_addresses(&pods, "v2", 8080),
        ["10.0.0.3:8080", "10.0.0.9:8080", "[fd00::7]:8080"]
    );
    assert_eq!(ready_addresses(&pods, "v1", 80), ["10.0.0.1:80"]);
}

#[test]
fn a_rollout_the_cluster_gave_up_on_says_why() {
    let d = with_status(
        2,
        DeploymentStatus {
            observed_generation: Some(2),
            conditions: Some(vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                message: Some("ReplicaSet \"checkout-v2-5d8\" has timed out progressing.".into()),
                ..DeploymentCondition::default()
            }]),
            ..DeploymentStatus::default()
        },
    );
    assert_eq!(
        rolled_out(&d, 3).unwrap_err(),
        "checkout-v2: ProgressDeadlineExceeded: ReplicaSet \"checkout-v2-5d8\" has timed out progressing."
    );
}

#[test]
fn only_the_drivers_own_deployment_for_that_service_and_version_is_its_own() {
    let ours = deployment(&spec("v2"));
    assert!(is_ours(&ours, "checkout", "v2"));
    assert!(!is_ours(&ours, "checkout-canary", "v2"), "another service");
    assert!(!is_ours(&ours, "checkout", "v3"));
    let mut theirs = ours.clone();
    theirs.metadata.labels.as_mut().unwrap().remove(MANAGED_BY);
    assert!(!is_ours(&theirs, "checkout", "v2"));
}

#[test]
fn a_pod_that_cannot_be_scheduled_says_why() {
    let mut p = pod("v2", None, false, false);
    p.metadata.name = Some("checkout-v2-x".into());
    p.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some("0/3 nodes are available: 3 Insufficient cpu.".into()),
        ..PodCondition::default()
    }]);
    assert_eq!(
        pod_trouble(&[p.clone()], "v2").unwrap(),
        "pod checkout-v2-x: not scheduled: 0/3 nodes are available: 3 Insufficient cpu."
    );
    assert_eq!(pod_trouble(&[p], "v1"), None, "another version's pod");
}

#[test]
fn an_autoscaler_says_why_it_cannot_scale_once_that_has_stood_two_minutes() {
    let hpa = |conditions: serde_json::Value| -> HorizontalPodAutoscaler {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "checkout-v2" },
            "spec": { "maxReplicas": 5, "scaleTargetRef": { "kind": "Deployment", "name": "checkout-v2" } },
            "status": { "desiredReplicas": 2, "conditions": conditions },
        }))
        .unwrap()
    };
    let now: Timestamp = "2026-12-06T01:00:00Z".parse().unwrap();
    // As the HPA controller words them (k8s.io/kubernetes pkg/controller/podautoscaler).
    let condition = |kind: &str, status: &str, reason: &str, message: &str, since: &str| {
        serde_json::json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since,
        })
    };
    let (old, new) = ("2026-12-06T00:50:00Z", "2026-12-06T00:59:30Z");
    let able = condition("AbleToScale", "True", "SucceededGetScale", "", old);
    let active = condition("ScalingActive", "True", "ValidMetricFound", "", old);
    assert_eq!(
        autoscaler_stuck(&hpa(serde_json::json!([able, active])), now),
        None
    );
    let no_metrics_server = |since| {
        let message = "the HPA was unable to compute the replica count: failed to get cpu \
            utilization: unable to get metrics for resource cpu: unable to fetch metrics from \
            resource metrics API: the server could not find the requested resource (get \
            pods.metrics.k8s.io)";
        let c = condition(
            "ScalingActive",
            "False",
            "FailedGetResourceMetric",
            message,
            since,
        );
        hpa(serde_json::json!([able, c]))
    };
    assert_eq!(
        autoscaler_stuck(&no_metrics_server(new), now),
        None,
        "new pods have no metrics for a while"
    );
    let told = autoscaler_stuck(&no_metrics_server(old), now).unwrap();
    assert!(
        told.starts_with("autoscaler checkout-v2 cannot scale, FailedGetResourceMetric: the HPA")
            && told.ends_with("(does the cluster run a metrics server?)"),
        "{told}"
    );
    let message = "the HPA was unable to compute the replica count: failed to get cpu \
        utilization: missing request for cpu in container app of Pod checkout-v2-x";
    let no_request = condition(
        "ScalingActive",
        "False",
        "FailedGetResourceMetric",
        message,
        old,
    );
    assert_eq!(
        autoscaler_stuck(&hpa(serde_json::json!([able, no_request])), now).unwrap(),
        format!("autoscaler checkout-v2 cannot scale, FailedGetResourceMetric: {message}"),
        "the message says it all: no hint"
    );
    let backoff = condition("AbleToScale", "False", "BackoffBoth", "recent rescale", old);
    let disabled = condition(
        "ScalingActive",
        "False",
        "ScalingDisabled",
        "scaled to 0",
        old,
    );
    assert_eq!(
        autoscaler_stuck(&hpa(serde_json::json!([backoff, disabled])), now),
        None
    );
    let mut unread = hpa(serde_json::json!([]));
    unread.status = None;
    assert_eq!(autoscaler_stuck(&unread, now), None, "not yet looked at");
}
