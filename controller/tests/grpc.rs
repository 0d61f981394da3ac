//! The controller over real gRPC on 127.0.0.1: release tooling through `ReleaseService`, and
//! one test-only fake agent per region through `AgentService`. The fake agent applies each
//! desired state at once and reports synthetic proxy counters split by the applied weight.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_runs_through_every_wave_over_grpc_and_watch_streams_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    let id = apply_and_start(&mut client).await;
    let mut watch = client
        .watch(pb::WatchRequest {
            id: id.clone(),
            after_index: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    let streamed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = watch.next().await {
            let event = event.unwrap();
            assert_eq!(
                event.index as usize,
                kinds.len(),
                "events arrive in order, none missing"
            );
            kinds.push((event.region.clone(), event.kind.clone()));
        }
    })
    .await;
    assert!(
        streamed.is_ok(),
        "the watch stream ends when the release ends"
    );
    let release = client
        .get_release(pb::GetReleaseRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(release.phase, "succeeded", "{release:#?}");
    assert_eq!(
        (release.wave.as_str(), release.wave_state.as_str()),
        ("last", "done")
    );
    for (region, (applied, _)) in &agents.0 {
        assert_eq!(
            weights(applied),
            [1000, 5000, 10_000, 0],
            "{region} went through the manifest's weights in order"
        );
    }
    let started: Vec<&str> = kinds
        .iter()
        .filter(|(_, k)| k == "wave_started")
        .map(|(r, _)| r.as_str())
        .collect();
    assert_eq!(started.len(), 3);
    assert_eq!(kinds.last().unwrap().1, "succeeded");
    let history = client
        .history(pb::HistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.events.len(),
        kinds.len(),
        "history holds every event watch streamed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_and_later_waves_never_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.05);
    let id = apply_and_start(&mut client).await;
    let release = wait_for(&mut client, &id, Duration::from_secs(30), |r| {
        r.phase == "rolled_back"
    })
    .await;
    assert_eq!(release.wave_state, "stopped", "{release:#?}");
    assert!(
        release.reason.contains("us-west failed 2 checks in a row"),
        "{}",
        release.reason
    );
    assert_eq!(weights(&agents["us-west"].0), [1000, 0]);
    assert!(weights(&agents["us-east"].0).is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_are_idempotent_and_a_second_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let id = apply_and_start(&mut client).await;
    let again = apply_and_start(&mut client).await;
    assert_eq!(
        id, again,
        "the same request id answers with the same release"
    );
    let refused = client
        .start_release(pb::StartReleaseRequest {
            request_id: "start-2".into(),
            service: "demo".into(),
            version: "v3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("is still running"),
        "{}",
        refused.message()
    );
    let invalid = client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-bad".into(),
            manifest: "apiVersion: fleet/v1\nregoins: []\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(
        invalid.message().contains("did you mean \"regions\"?"),
        "{}",
        invalid.message()
    );
    let no_id = client
        .promote(pb::OperatorRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_id.code(), tonic::Code::InvalidArgument);
    // An id is each method's own: an abort given the start's id aborts.
    let aborted = client
        .abort(pb::OperatorRequest {
            request_id: "start-1".into(),
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(aborted.phase.as_str(), "rolling_back" | "rolled_back"),
        "{aborted:#?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_carries_on_from_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    let id = apply_and_start(&mut client).await;
    let before = wait_for(&mut client, &id, Duration::from_secs(30), |r| {
        r.regions
            .iter()
            .any(|g| g.region == "us-east" && g.status == "active")
    })
    .await;
    server.stop().await;
    drop(agents);
    // A new controller on the same data directory, and the agents reconnect to it.
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let after = client
        .get_release(pb::GetReleaseRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let step = |r: &pb::Release| {
        r.regions
            .iter()
            .find(|g| g.region == "us-east")
            .map(|g| g.step)
    };
    assert!(step(&after) >= step(&before), "no step lost: {after:#?}");
    let agents = fake_agents(&server, 0.0);
    wait_for(&mut client, &id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    let east: Vec<u32> = weights(&agents["us-east"].0);
    assert_eq!(east.last(), Some(&0), "promoted");
    assert!(
        east.windows(2).all(|w| w[0] != w[1] || w[0] == 0),
        "no weight applied twice: {east:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_runs_to_its_end_on_the_manifest_it_started_with_through_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    let id = apply_and_start(&mut client).await;
    wait_for(&mut client, &id, Duration::from_secs(30), |r| {
        r.regions
            .iter()
            .any(|g| g.region == "us-east" && g.status == "active")
    })
    .await;
    // Mid-release, the fleet is applied again with other steps, and the controller restarts.
    let steps = "      - { weight: 10, pause: 1s }\n      - { weight: 50, pause: 1s }\n";
    assert!(QUICK.contains(steps));
    let other = QUICK.replace(steps, "      - { weight: 30, pause: 1s }\n");
    client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-2".into(),
            manifest: other.clone(),
        })
        .await
        .unwrap();
    server.stop().await;
    drop(agents);
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    wait_for(&mut client, &id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    // The last wave went through the steps the release started with.
    assert_eq!(weights(&agents["eu-west"].0), [1000, 5000, 10_000, 0]);
    // The next release runs on the fleet as applied now.
    let next = start_v3(&mut client).await;
    let release = wait_for(&mut client, &next, Duration::from_secs(30), |r| {
        r.regions.iter().any(|g| g.canary_weight_bp > 0)
    })
    .await;
    let west = release.regions.iter().find(|g| g.region == "us-west");
    assert_eq!(west.unwrap().canary_weight_bp, 3000, "{release:#?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_repeated_after_a_restart_is_answered_with_the_release_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let id = apply_and_start(&mut client).await;
    server.stop().await;
    // The start's answer is in the file with the release it began (one write), so no failure
    // after that write can leave the one without the other.
    {
        let requests = redb::TableDefinition::<&str, &[u8]>::new("requests");
        let db = redb::Database::open(dir.path().join("fleet.redb")).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = txn.open_table(requests).unwrap();
        assert!(table.get("start_release/start-1").unwrap().is_some());
    }
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    // The client, told nothing, asks again: the release it started, not "still running".
    let again = apply_and_start(&mut client).await;
    assert_eq!(again, id);
    let listed = client
        .list_releases(pb::ListReleasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.releases.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_each_service_the_newest_ended_releases_are_kept_and_older_ones_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let options = || fleet_controller::Options {
        keep_releases: 1,
        ..Default::default()
    };
    let server = Server::start_options(dir.path(), options()).await;
    let mut client = server.client().await;
    let _agents = fake_agents(&server, 0.0);
    let first = apply_and_start(&mut client).await;
    let succeeded = |r: &pb::Release| r.phase == "succeeded";
    wait_for(&mut client, &first, Duration::from_secs(60), succeeded).await;
    let second = start_v3(&mut client).await;
    // While the second runs, the first is the newest ended release: kept.
    let history = |id: &str| pb::HistoryRequest { id: id.into() };
    assert!(
        !client
            .history(history(&first))
            .await
            .unwrap()
            .into_inner()
            .events
            .is_empty()
    );
    wait_for(&mut client, &second, Duration::from_secs(60), succeeded).await;
    let gone = client.history(history(&first)).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(gone.message().contains("--keep-releases"), "{gone:?}");
    assert_eq!(listed(&mut client).await, [second.as_str()]);
    server.stop().await;
    // An ended release whose manifest a controller no longer takes (its checks grew stricter,
    // say) does not keep it from starting.
    {
        let manifests = redb::TableDefinition::<&str, &str>::new("release_manifests");
        let db = redb::Database::open(dir.path().join("fleet.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let mut table = txn.open_table(manifests).unwrap();
        assert!(
            table
                .insert(second.as_str(), "service: [")
                .unwrap()
                .is_some()
        );
        drop(table);
        txn.commit().unwrap();
    }
    // The forgotten one is gone from the store too.
    let server = Server::start_options(dir.path(), options()).await;
    let mut client = server.client().await;
    assert_eq!(listed(&mut client).await, [second.as_str()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_call_repeated_with_its_request_id_is_answered_not_made_again_and_another_refused()
 {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let _agents = fake_agents(&server, 0.0);
    let id = apply_and_start(&mut client).await;
    let call = |request_id: &str| pb::OperatorRequest {
        request_id: request_id.into(),
        id: id.clone(),
        actor: "alice".into(),
        reason: "testing".into(),
        ..Default::default()
    };
    let paused = client.pause(call("pause-1")).await.unwrap().into_inner();
    assert_eq!(paused.phase, "paused");
    let resumed = client.resume(call("resume-1")).await.unwrap().into_inner();
    assert_eq!(resumed.phase, "progressing");
    // The same call twice at once (a client that retried while its first was under way):
    // made once, both answered alike.
    let (mut a, mut b) = (client.clone(), client.clone());
    let (first, second) = tokio::join!(a.pause(call("pause-2")), b.pause(call("pause-2")));
    assert_eq!(first.unwrap().into_inner(), second.unwrap().into_inner());
    let history = client.history(pb::HistoryRequest { id: id.clone() });
    let history = history.await.unwrap().into_inner().events;
    let by_alice = history.iter().filter(|e| e.actor == "alice").count();
    assert_eq!(
        by_alice,
        1 + 3,
        "started, paused, resumed, paused: {history:#?}"
    );
    client.resume(call("resume-2")).await.unwrap();
    // After a restart too: the answer was kept with the change.
    server.stop().await;
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let again = client.pause(call("pause-1")).await.unwrap().into_inner();
    assert_eq!(again, paused, "the first answer");
    // Run again by another (without mutual TLS, the actor is the client's word): the same call.
    let by_bob = pb::OperatorRequest {
        actor: "bob".into(),
        ..call("pause-1")
    };
    assert_eq!(client.pause(by_bob).await.unwrap().into_inner(), paused);
    // Another call given its id (another reason) is refused, and changes nothing.
    let other = pb::OperatorRequest {
        reason: "another reason".into(),
        ..call("pause-1")
    };
    let refused = client.pause(other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with(
            "request_id pause-1 was given to another pause call, with other arguments"
        ),
        "{}",
        refused.message()
    );
    let now = client.get_release(pb::GetReleaseRequest { id: id.clone() });
    assert_ne!(
        now.await.unwrap().into_inner().phase,
        "paused",
        "not paused again"
    );
    server.stop().await;
}

/// The ids of every release the controller knows.
async fn listed(
    client: &mut fleet_proto::v1::release_service_client::ReleaseServiceClient<
        tonic::transport::Channel,
    >,
) -> Vec<String> {
    let all = client.list_releases(pb::ListReleasesRequest::default());
    let all = all.await.unwrap().into_inner().releases;
    all.into_iter().map(|r| r.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_server_reflection_answer_for_any_grpc_client() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    server.client().await;
    let channel = tonic::transport::Endpoint::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["fleet.v1.ReleaseService", "fleet.v1.AgentService"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"fleet.v1.ReleaseService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"fleet.v1.AgentService".to_string()),
        "{names:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supersede_rolls_the_running_release_back_and_starts_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let _agents = fake_agents(&server, 0.0);
    let first = apply_and_start(&mut client).await;
    wait_for(&mut client, &first, Duration::from_secs(30), |r| {
        r.regions.iter().any(|g| g.canary_weight_bp > 0)
    })
    .await;
    let request = pb::StartReleaseRequest {
        request_id: "start-v3".into(),
        service: "demo".into(),
        version: "v3".into(),
        supersede: true,
        actor: "bob".into(),
        ..Default::default()
    };
    let second = client.start_release(request).await.unwrap().into_inner();
    assert_ne!(second.id, first);
    assert_eq!(
        second.from_version, "v1",
        "the superseded release never became the stable version"
    );
    let old = client
        .get_release(pb::GetReleaseRequest { id: first.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.phase, "rolled_back", "ended at once: {old:#?}");
    let history = client
        .history(pb::HistoryRequest { id: first.clone() })
        .await
        .unwrap()
        .into_inner();
    let by = format!("superseded by {} (v3)", second.id);
    assert!(
        (history.events.iter())
            .any(|e| e.kind == "rollback_started" && e.reason == by && e.actor == "bob"),
        "{history:#?}"
    );
    // Ended, it is refused what would change nothing.
    let abort = pb::OperatorRequest {
        request_id: "abort-old".into(),
        id: first.clone(),
        ..Default::default()
    };
    let refused = client.abort(abort).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().starts_with(&format!(
            "release {first}: the release has rolled back (superseded by"
        )),
        "{}",
        refused.message()
    );
    let done = wait_for(&mut client, &second.id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    assert_eq!(done.to_version, "v3");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_may_override_the_strategy_and_a_bad_override_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    let apply = |manifest: &str| pb::ApplyFleetRequest {
        request_id: "apply".into(),
        manifest: manifest.into(),
    };
    client.apply_fleet(apply(QUICK)).await.unwrap();
    let start = |request_id: &str, strategy: &str| pb::StartReleaseRequest {
        request_id: request_id.into(),
        service: "demo".into(),
        version: "v2".into(),
        from_version: "v1".into(),
        strategy_override: strategy.into(),
        ..Default::default()
    };
    // The manifest applied again under its id: answered; another manifest under it: refused.
    client.apply_fleet(apply(QUICK)).await.unwrap();
    let other = client
        .apply_fleet(apply(&format!("{QUICK}# edited\n")))
        .await;
    assert_eq!(other.unwrap_err().code(), tonic::Code::InvalidArgument);
    let fleet = client.get_fleet(pb::GetFleetRequest {
        service: "demo".into(),
    });
    assert_eq!(
        fleet.await.unwrap().into_inner().manifest,
        QUICK,
        "unchanged"
    );
    let refused = client
        .start_release(start(
            "bad",
            "linear: { step_weight: 60, max_weight: 50, interval: 1s }",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("strategy_override:1:24: error: linear.step_weight: step_weight 60% is above max_weight 50%"), "{}", refused.message());
    let none = client
        .list_releases(pb::ListReleasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.releases.is_empty(), "a refused start changes nothing");
    let release = client
        .start_release(start(
            "good",
            "linear: { step_weight: 50, interval: 500ms }",
        ))
        .await
        .unwrap()
        .into_inner();
    // Its id given to a start of another strategy: refused, before anything is looked at.
    let again = client.start_release(start("good", "linear: { step_weight: 25, interval: 1s }"));
    let refused = again.await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("another start_release call"),
        "{}",
        refused.message()
    );
    wait_for(&mut client, &release.id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    for (region, (applied, _)) in &agents.0 {
        assert_eq!(
            weights(applied),
            [5000, 10_000, 0],
            "{region} followed the override, not the manifest"
        );
    }
    server.stop().await;
}

/// A webhook receiver on 127.0.0.1 that answers `503` to its first call and `200` after.
async fn flaky_webhook() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let status = if n == 0 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let answer =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_503_pauses_the_release_and_resume_calls_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    let (url, calls) = flaky_webhook().await;
    let manifest =
        format!("{QUICK}webhooks:\n  - {{ on: pre-rollout, url: \"{url}\", timeout: 2s }}\n");
    client
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply".into(),
            manifest,
        })
        .await
        .unwrap();
    let request = pb::StartReleaseRequest {
        request_id: "start".into(),
        service: "demo".into(),
        version: "v2".into(),
        from_version: "v1".into(),
        ..Default::default()
    };
    let id = client.start_release(request).await.unwrap().into_inner().id;
    let paused = wait_for(&mut client, &id, Duration::from_secs(10), |r| {
        r.phase == "paused"
    })
    .await;
    assert!(paused.reason.contains("answered 503"), "{}", paused.reason);
    assert!(
        weights(&agents["us-west"].0).is_empty(),
        "nothing moved before the hook passed"
    );
    client
        .resume(pb::OperatorRequest {
            request_id: "resume".into(),
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for(&mut client, &id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "called once, and again on resume"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_controller_stops_while_an_agent_holds_its_stream_open_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let _ = server.client().await;
    let agents = AgentServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let (tx, _unread) = usw_a_says_hello(agents).await;
    // The agent neither reads what it is sent nor hangs up (a stuck one, say).
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the controller stopped");
    drop(tx);
}

#[tokio::test]
async fn an_agent_notices_a_path_that_died_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let _ = server.client().await;
    let (path, paths) = watch::channel(Path::Open);
    let relay = freezable_relay(server.grpc.clone(), paths).await;
    // Pings every 300 ms, each given 2 s: a busy machine answers late, not never.
    let (keepalive, timeout) = (Duration::from_millis(300), Duration::from_secs(2));
    let endpoint =
        fleet_proto::connect::endpoint_pinging(&relay, &Default::default(), keepalive, timeout);
    let agents = AgentServiceClient::new(endpoint.unwrap().connect().await.unwrap());
    let (tx, mut inbound) = usw_a_says_hello(agents).await;
    let quiet = tokio::time::timeout(keepalive * 4, inbound.message()).await;
    assert!(quiet.is_err(), "alive while pings are answered: {quiet:?}");

    path.send(Path::Frozen).unwrap();
    let noticed = tokio::time::timeout(keepalive + timeout * 3, inbound.message()).await;
    assert!(
        matches!(noticed, Ok(Err(_))),
        "the stream fails once a ping goes unanswered: {noticed:?}"
    );
    drop(tx);
    // The controller's end of the path is still frozen: cut it, or its graceful stop would
    // wait for its own pings to go unanswered.
    path.send(Path::Cut).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_watch_open_as_the_controller_stops_ends_unavailable_not_as_if_the_release_ended() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    // No agents: the release stays under way.
    let id = apply_and_start(&mut client).await;
    let mut events = client
        .watch(pb::WatchRequest { id, after_index: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events.message().await.unwrap().unwrap().kind,
        "release_started"
    );
    let stopping = tokio::spawn(server.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                ended => return ended,
            }
        }
    })
    .await
    .unwrap();
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the controller is stopping");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_agents_shows_each_cluster_of_a_fleet_with_its_agent_or_without() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    apply_and_start(&mut client).await;
    // Agents for two of the three regions.
    let west = fake_agent(server.grpc.clone(), "us-west", 0.0);
    let east = fake_agent(server.grpc.clone(), "us-east", 0.0);
    let of_fleet = || pb::ListAgentsRequest {
        service: "demo".into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = client.list_agents(of_fleet()).await.unwrap().into_inner();
        let reported = |a: &pb::Agent| a.reported_at_ms > 0 && a.release_id == "demo-1";
        if listed.agents.iter().filter(|a| reported(a)).count() == 2 {
            break listed.agents;
        }
        assert!(std::time::Instant::now() < deadline, "{listed:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rows: Vec<(&str, &str, bool)> = (listed.iter())
        .map(|a| (a.region.as_str(), a.cluster.as_str(), a.connected))
        .collect();
    assert_eq!(
        rows,
        [
            ("us-west", "usw-a", true),
            ("us-east", "use-a", true),
            ("eu-west", "euw-a", false)
        ]
    );
    assert_eq!(listed[0].agent_version, "test");
    // Without a service: the agents connected, whatever their fleet.
    let all = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(all.len(), 2);
    let unknown = pb::ListAgentsRequest {
        service: "nope".into(),
    };
    let refused = client.list_agents(unknown).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    assert_eq!(
        refused.message(),
        "no fleet for service \"nope\": apply its manifest with `fleetctl apply`"
    );
    west.1.abort();
    east.1.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_tls_dialled_over_https_is_told_at_once_to_be_dialled_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    server.client().await;
    let https = server.grpc.replacen("http://", "https://", 1);
    // A CA of the test's own: nothing depends on the machine's roots.
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let tls = fleet_proto::connect::ClientTls {
        ca: Some(dir.path().join("ca.pem")),
        ..Default::default()
    };
    let e = fleet_proto::connect::dial(&https, &tls).await.unwrap_err();
    assert!(!e.passing, "not tried again: {e}");
    assert!(
        e.to_string()
            .contains("does not speak TLS: for a controller without TLS, use an http:// URL"),
        "{e}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_a_region_of_another_service_is_refused_naming_the_region_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = quick_applied(dir.path()).await;
    let apply = |request_id: &str, manifest: &str| pb::ApplyFleetRequest {
        request_id: request_id.into(),
        manifest: manifest.into(),
    };
    // Service "shop" in demo's regions: refused, and nothing changed.
    let shop = QUICK.replacen("name: demo", "name: shop", 1);
    let refused = client.apply_fleet(apply("shop", &shop)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .starts_with("regions[0].name: region \"us-west\" is service demo's; nothing changed.")
            && refused.message().contains("\"shop-us-west\""),
        "{}",
        refused.message()
    );
    let listed = client.list_fleets(pb::ListFleetsRequest {});
    let services: Vec<String> = (listed.await.unwrap().into_inner().fleets.into_iter())
        .map(|f| f.service)
        .collect();
    assert_eq!(services, ["demo"]);
    // Its regions named apart: applied; and demo may still be applied again.
    let apart = ["us-west", "us-east", "eu-west"]
        .into_iter()
        .fold(shop, |m, r| m.replace(r, &format!("shop-{r}")));
    client.apply_fleet(apply("shop-2", &apart)).await.unwrap();
    client.apply_fleet(apply("demo-2", QUICK)).await.unwrap();

    // A release of demo under way (no agent answers) steers its regions though demo's fleet
    // names them apart since: still not another service's to take.
    let start = pb::StartReleaseRequest {
        request_id: "start-demo".into(),
        service: "demo".into(),
        version: "v2".into(),
        from_version: "v1".into(),
        ..Default::default()
    };
    let release = client.start_release(start).await.unwrap().into_inner();
    let moved = QUICK.replace("us-west", "demo-us-west");
    client.apply_fleet(apply("demo-3", &moved)).await.unwrap();
    let taking = QUICK
        .replacen("name: demo", "name: cart", 1)
        .replace("us-east", "cart-us-east")
        .replace("eu-west", "cart-eu-west");
    let refused = client
        .apply_fleet(apply("cart", &taking))
        .await
        .unwrap_err();
    let steered = format!(
        "regions[0].name: region \"us-west\" is steered by service demo's release {}, under way;",
        release.id
    );
    assert!(
        refused.message().starts_with(&steered),
        "{}",
        refused.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_of_a_version_that_cannot_be_one_or_runs_already_is_refused_saying_which() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = quick_applied(dir.path()).await;
    let start = |id: &str, version: &str| pb::StartReleaseRequest {
        request_id: id.into(),
        service: "demo".into(),
        version: version.into(),
        from_version: "v1".into(),
        ..Default::default()
    };
    for (id, version, said) in [
        (
            "a",
            "v 3; rm -rf /",
            "version \"v 3; rm -rf /\" is not a version: ",
        ),
        ("b", "", "version is empty: "),
        ("c", "v1", "version \"v1\" is the one running already"),
    ] {
        let refused = client.start_release(start(id, version)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().starts_with(said), "{}", refused.message());
    }
    let blank = pb::StartReleaseRequest {
        emergency_reason: "  ".into(),
        ..start("d", "v2")
    };
    let refused = client.start_release(blank).await.unwrap_err();
    assert!(
        refused.message().starts_with("emergency_reason is blank"),
        "{}",
        refused.message()
    );
    assert!(listed(&mut client).await.is_empty());
    // The refused starts used no number up: the first release is the service's first.
    let started = client.start_release(start("e", "v2")).await.unwrap();
    assert_eq!(started.into_inner().id, "demo-1");
    // A manifest above what a controller keeps in one store write: refused before anything.
    let large = pb::ApplyFleetRequest {
        request_id: "large".into(),
        manifest: format!("{QUICK}{}", "#".repeat(1024 * 1024)),
    };
    let refused = client.apply_fleet(large).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("above the 1048576 (1 MiB) a controller keeps"),
        "{}",
        refused.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_echoes_a_huge_argument_is_cut_not_a_broken_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = quick_applied(dir.path()).await;
    let huge = "a".repeat(100_000);
    let refused = client
        .get_release(pb::GetReleaseRequest { id: huge.clone() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let said = refused.message();
    assert!(said.len() < 2_100, "{} bytes", said.len());
    assert!(said.ends_with("bytes]"), "{said}");
    let refused = client
        .get_fleet(pb::GetFleetRequest { service: huge })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    // The connection is whole: the next call is answered on it.
    assert!(listed(&mut client).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_are_listed_oldest_first_demo_9_before_demo_10() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = quick_applied(dir.path()).await;
    // Each start supersedes the last (no agent answers): eleven releases, one under way.
    for n in 1..=11 {
        let start = pb::StartReleaseRequest {
            request_id: format!("start-{n}"),
            service: "demo".into(),
            version: format!("v{}", n + 1),
            from_version: "v1".into(),
            supersede: true,
            ..Default::default()
        };
        client.start_release(start).await.unwrap();
    }
    let ids = listed(&mut client).await;
    let numbered: Vec<String> = (1..=11).map(|n| format!("demo-{n}")).collect();
    assert_eq!(ids, numbered);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_release_rolled_back_the_next_knows_what_runs_and_a_wrong_from_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let first = apply_and_start(&mut client).await;
    let abort = pb::OperatorRequest {
        request_id: "abort-1".into(),
        id: first.clone(),
        actor: "alice".into(),
        reason: "not today".into(),
        ..Default::default()
    };
    client.abort(abort).await.unwrap();
    // While it rolls back, a start is told to wait or supersede (an abort is made already).
    let mut start = pb::StartReleaseRequest {
        request_id: "start-2".into(),
        service: "demo".into(),
        version: "v3".into(),
        ..Default::default()
    };
    // (No agent is connected yet: the first region is rolled back once its agent is.) A
    // start's own fault is told first, whatever runs.
    let empty = pb::StartReleaseRequest {
        request_id: "start-empty".into(),
        version: String::new(),
        ..start.clone()
    };
    let refused = client.start_release(empty).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let refused = client.start_release(start.clone()).await.unwrap_err();
    let said = refused.message();
    assert!(
        said.ends_with("is rolling back; wait for it, or pass supersede (fleetctl: --supersede) to start this one now"),
        "{said}"
    );
    // What the rollback waits for is said.
    let rolling = client
        .get_release(pb::GetReleaseRequest { id: first.clone() })
        .await
        .unwrap()
        .into_inner();
    let west = &rolling.regions[0];
    assert_eq!(
        (west.region.as_str(), west.status.as_str()),
        ("us-west", "rolling_back")
    );
    // Its agent has not been connected since the release started: it is unreachable.
    let why = "not every cluster's agent is connected: it is put in force as they come";
    assert!(west.waiting.starts_with(why) && !west.reachable, "{west:?}");
    let _agents = fake_agents(&server, 0.0);
    let ended = |r: &pb::Release| r.phase == "rolled_back";
    wait_for(&mut client, &first, Duration::from_secs(30), ended).await;

    // v1 runs, as the rollback left it: no --from needed, and a wrong one is refused.
    start.request_id = "start-3".into();
    start.from_version = "v9".into();
    let refused = client.start_release(start.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let said = refused.message();
    assert!(
        said.starts_with("from_version \"v9\" is not what runs: demo runs v1"),
        "{said}"
    );
    start.request_id = "start-4".into();
    start.from_version = String::new();
    let second = client.start_release(start).await.unwrap().into_inner();
    assert_eq!(second.from_version, "v1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_given_its_gate_passes_that_gate_once_and_refuses_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut client = server.client().await;
    let agents = fake_agents(&server, 0.0);
    // The first step waits for a promote.
    let manifest = QUICK.replace(
        "{ weight: 10, pause: 1s }",
        "{ weight: 10, pause: indefinite }",
    );
    assert_ne!(manifest, QUICK);
    let apply = pb::ApplyFleetRequest {
        request_id: "apply-1".into(),
        manifest,
    };
    client.apply_fleet(apply).await.unwrap();
    let id = start_v2(&mut client).await.id;
    let at_gate = wait_for(&mut client, &id, Duration::from_secs(30), |r| {
        !r.gate.is_empty()
    })
    .await;
    assert_eq!(at_gate.gate, "step:us-west=1", "{at_gate:#?}");
    let promote = |request_id: &str, gate: &str| pb::OperatorRequest {
        request_id: request_id.into(),
        id: id.clone(),
        gate: gate.into(),
        ..Default::default()
    };
    // A gate it does not wait at: refused, nothing changed.
    let refused = (client.promote(promote("p-0", "bake:first")).await).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(
            "waits at gate step:us-west=1, not at bake:first (passed already, or not reached \
             yet): give --gate step:us-west=1 to pass that one; nothing changed"
        ),
        "{}",
        refused.message()
    );
    // Not a gate's name: refused as such.
    let garbage = (client.promote(promote("p-g", "garbage text")).await).unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument);
    assert!(
        garbage
            .message()
            .starts_with("gate \"garbage text\" is not a gate's name"),
        "{}",
        garbage.message()
    );
    // Its gate: passed.
    let passed = (client.promote(promote("p-1", "step:us-west=1")).await).unwrap();
    assert_ne!(passed.into_inner().gate, "step:us-west=1");
    // The same promote made again under a new request id (a retried job): refused, whatever
    // gate the release has come to since.
    let again = (client.promote(promote("p-2", "step:us-west=1")).await).unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert!(
        again.message().contains("not at step:us-west=1"),
        "{}",
        again.message()
    );
    // A gate is for a promote.
    let pause = pb::OperatorRequest {
        gate: "step:us-west=1".into(),
        ..promote("p-3", "")
    };
    let wrong = client.pause(pause).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    // The release goes on to its end, each region's indefinite pause promoted by its gate.
    for (n, region) in ["us-east", "eu-west"].into_iter().enumerate() {
        let gate = format!("step:{region}=1");
        wait_for(&mut client, &id, Duration::from_secs(60), |r| {
            r.gate == gate
        })
        .await;
        let request_id = format!("p-next-{n}");
        (client.promote(promote(&request_id, &gate)).await).unwrap();
    }
    wait_for(&mut client, &id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    let west = weights(&agents["us-west"].0);
    assert_eq!(west.iter().filter(|w| **w == 1000).count(), 1, "{west:?}");
    // Each promote's history names its gate, in its details too.
    let history = (client.history(pb::HistoryRequest { id: id.clone() }).await)
        .unwrap()
        .into_inner()
        .events;
    let gates: Vec<serde_json::Value> = (history.iter())
        .filter(|e| e.kind == "promoted")
        .map(|e| serde_json::from_str::<serde_json::Value>(&e.detail_json).unwrap()["gate"].clone())
        .collect();
    assert_eq!(
        gates,
        ["step:us-west=1", "step:us-east=1", "step:eu-west=1"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_agents_are_away_when_a_release_starts_is_unreachable_and_holds_until_they_come()
 {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = quick_applied(dir.path()).await;
    // The first two regions' agents are connected; the last one's is not.
    let mut agents = Agents(
        ["us-west", "us-east"]
            .into_iter()
            .map(|r| (r, fake_agent(server.grpc.clone(), r, 0.0)))
            .collect(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = client
            .list_agents(pb::ListAgentsRequest {
                service: "demo".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .agents;
        if listed.iter().filter(|a| a.connected).count() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = start_v2(&mut client).await;
    let reachable = |r: &pb::Release, region: &str| {
        (r.regions.iter())
            .find(|g| g.region == region)
            .map(|g| g.reachable)
    };
    // Said in the start's own answer, and in the history.
    assert_eq!(reachable(&started, "eu-west"), Some(false), "{started:#?}");
    assert_eq!(reachable(&started, "us-west"), Some(true), "{started:#?}");
    let history = client
        .history(pb::HistoryRequest {
            id: started.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        history.iter().any(|e| e.region == "eu-west"
            && e.reason == "agent unreachable (the release has not reached this region yet)"),
        "{history:#?}"
    );
    // The first two waves go through; the last holds at its first step, unreachable.
    let held = wait_for(&mut client, &started.id, Duration::from_secs(60), |r| {
        r.wave == "last" && r.wave_state == "running"
    })
    .await;
    assert_eq!(held.phase, "progressing");
    assert_eq!(reachable(&held, "eu-west"), Some(false));
    // Its agent comes: the release carries on to its end.
    agents
        .0
        .insert("eu-west", fake_agent(server.grpc.clone(), "eu-west", 0.0));
    wait_for(&mut client, &started.id, Duration::from_secs(60), |r| {
        r.phase == "succeeded"
    })
    .await;
    let west = weights(&agents["eu-west"].0);
    assert_eq!(west.last(), Some(&0), "promoted: {west:?}");
    server.stop().await;
}
