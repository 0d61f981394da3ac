//! `fleetctl release watch`, the real binary, against a TEST-ONLY fake controller on
//! 127.0.0.1 whose `Watch` streams end as a scenario says: cut mid-release and followed again
//! from the next event, or ended at once again and again (a controller that takes the call
//! and drops it), which must not keep the command dialling for ever. And `release pause`
//! against one that says it is unavailable the first time: the pause made again with the
//! same request id.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::release_service_server::{ReleaseService, ReleaseServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How the fake's `Watch` calls go.
#[derive(Clone, Copy)]
enum Scenario {
    /// The first sends events 0 and 1 and is cut (UNAVAILABLE); the next sends the rest from
    /// where it is asked and ends; the release has succeeded.
    CutOnce,
    /// Every call ends at once, cleanly, while the release goes on.
    EndsAtOnce,
}

/// Test-only: a controller with one release, `demo-1`.
#[derive(Clone)]
struct Fake {
    scenario: Scenario,
    /// The `after_index` of each `Watch` call.
    calls: Arc<Mutex<Vec<u64>>>,
    /// The request id of each `Pause` call; the first is answered UNAVAILABLE.
    pauses: Arc<Mutex<Vec<String>>>,
}

fn event(index: u64) -> pb::ReleaseEvent {
    pb::ReleaseEvent {
        release_id: "demo-1".into(),
        index,
        kind: format!("event_{index}"),
        ..Default::default()
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::ReleaseEvent, Status>> + Send>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this fake"))
}

#[tonic::async_trait]
impl ReleaseService for Fake {
    type WatchStream = Events;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Events>, Status> {
        let after = request.into_inner().after_index;
        let first = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(after);
            calls.len() == 1
        };
        let items: Vec<Result<pb::ReleaseEvent, Status>> = match (self.scenario, first) {
            (Scenario::CutOnce, true) => {
                vec![Ok(event(0)), Ok(event(1)), Err(Status::unavailable("cut"))]
            }
            (Scenario::CutOnce, false) => (after..4).map(|i| Ok(event(i))).collect(),
            (Scenario::EndsAtOnce, _) => Vec::new(),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn get_release(
        &self,
        _: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let phase = match self.scenario {
            Scenario::CutOnce => "succeeded",
            Scenario::EndsAtOnce => "progressing",
        };
        Ok(Response::new(pb::Release {
            id: "demo-1".into(),
            phase: phase.into(),
            ..Default::default()
        }))
    }

    async fn apply_fleet(
        &self,
        _: Request<pb::ApplyFleetRequest>,
    ) -> Result<Response<pb::ApplyFleetResponse>, Status> {
        unimplemented()
    }
    async fn get_fleet(
        &self,
        _: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        unimplemented()
    }
    async fn list_fleets(
        &self,
        _: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        unimplemented()
    }
    async fn list_agents(
        &self,
        _: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        unimplemented()
    }
    async fn start_release(
        &self,
        _: Request<pb::StartReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        unimplemented()
    }
    async fn list_releases(
        &self,
        _: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        unimplemented()
    }
    async fn history(
        &self,
        _: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        unimplemented()
    }
    async fn promote(
        &self,
        _: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        unimplemented()
    }
    async fn pause(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let first = {
            let mut pauses = self.pauses.lock().unwrap();
            pauses.push(request.into_inner().request_id);
            pauses.len() == 1
        };
        match first {
            true => Err(Status::unavailable("the controller is stopping")),
            false => Ok(Response::new(pb::Release {
                id: "demo-1".into(),
                phase: "paused".into(),
                ..Default::default()
            })),
        }
    }
    async fn resume(
        &self,
        _: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        unimplemented()
    }
    async fn abort(
        &self,
        _: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        unimplemented()
    }
}

/// Serves `fake` on 127.0.0.1 and runs `fleetctl release watch demo-1 ARGS` against it, to
/// its end (within 30 s): its exit code, stdout and stderr.
async fn watch(fake: Fake, args: &[&str]) -> (i32, String, String) {
    fleetctl(fake, &[&["release", "watch", "demo-1"], args].concat()).await
}

/// Serves `fake` on 127.0.0.1 and runs `fleetctl ARGS` against it, to its end (within 30 s):
/// its exit code, stdout and stderr.
async fn fleetctl(fake: Fake, args: &[&str]) -> (i32, String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReleaseServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    command
        .args(args)
        .args(["--controller", &url])
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("fleetctl ended")
        .unwrap();
    server.abort();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[tokio::test]
async fn a_cut_stream_is_followed_again_from_the_next_event_each_printed_once() {
    let calls = Arc::default();
    let fake = Fake {
        scenario: Scenario::CutOnce,
        calls: Arc::clone(&calls),
        pauses: Arc::default(),
    };
    let (code, out, err) = watch(fake, &["--output", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let printed: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(printed, [0, 1, 2, 3]);
    assert_eq!(*calls.lock().unwrap(), [0, 2], "asked again from event 2");
    // Followed again at once: not worth a word.
    assert!(!err.contains("lost the controller"), "{err}");
}

#[tokio::test]
async fn a_controller_that_ends_every_stream_at_once_is_given_up_on_in_time() {
    let calls = Arc::default();
    let fake = Fake {
        scenario: Scenario::EndsAtOnce,
        calls: Arc::clone(&calls),
        pauses: Arc::default(),
    };
    let started = Instant::now();
    let (code, _, err) = watch(fake, &["--reconnect-for", "2s"]).await;
    assert_eq!(code, 3, "the controller stayed away: {err}");
    assert!(
        err.contains("gave up following demo-1 after 2s without the controller (last: it ended the stream while the release goes on)"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Backing off, not spinning: 250 ms, 500 ms, 1 s… between tries.
    let tries = calls.lock().unwrap().len();
    assert!((2..=6).contains(&tries), "{tries} tries");
    assert_eq!(err.matches("lost the controller").count(), 1, "{err}");
}

#[tokio::test]
async fn a_change_the_controller_could_not_take_is_made_again_with_the_same_request_id() {
    let pause = ["release", "pause", "demo-1", "--retry-for", "30s"];
    for given in [None, Some("pipeline-42")] {
        let pauses = Arc::<Mutex<Vec<String>>>::default();
        let fake = Fake {
            scenario: Scenario::CutOnce,
            calls: Arc::default(),
            pauses: Arc::clone(&pauses),
        };
        let args = match given {
            Some(id) => [&pause[..], &["--request-id", id]].concat(),
            None => pause.to_vec(),
        };
        let (code, out, err) = fleetctl(fake, &args).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("release demo-1: "), "{out}");
        // Made again at once: not worth a word.
        assert!(!err.contains("trying again"), "{err}");
        let pauses = pauses.lock().unwrap();
        assert_eq!(pauses.len(), 2, "{pauses:?}");
        assert_eq!(pauses[0], pauses[1]);
        if let Some(id) = given {
            assert_eq!(pauses[0], id);
        }
    }
}

#[tokio::test]
async fn a_change_given_up_on_says_how_to_make_it_again_without_making_it_twice() {
    let pauses = Arc::<Mutex<Vec<String>>>::default();
    let fake = Fake {
        scenario: Scenario::CutOnce,
        calls: Arc::default(),
        pauses: Arc::clone(&pauses),
    };
    let pause = ["release", "pause", "demo-1", "--retry-for", "0s"];
    let (code, out, err) = fleetctl(fake, &pause).await;
    assert_eq!(code, 3, "not reached in time: {out}{err}");
    let id = pauses.lock().unwrap()[0].clone();
    assert!(
        err.contains(&format!(
            "the change may or may not have been made: make it again with --request-id {id}"
        )),
        "{err}"
    );
}
