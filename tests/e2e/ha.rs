//! Controllers that keep their state in a real etcd and stand in for each other: a whole
//! fleet of real processes on 127.0.0.1, as in `release.rs`, with a second controller
//! standing by on the leader's address.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fleet_e2e::World;
use fleet_e2e::etcd::Etcd;

/// Reads `url`: its status and body.
async fn get(url: String) -> (u16, String) {
    let response = fleetctl::local::http_client()
        .get(url)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies_and_carries_the_release_on_from_the_same_step() {
    let etcd = Etcd::start().unwrap();
    let mut world = World::start_on_etcd(&etcd).await.unwrap();
    let standby = world.fleet.start_standby().await.unwrap();
    // Not ready, and saying who leads once it has asked etcd.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get(format!("http://{}/readyz", standby.admin)).await;
        assert_eq!(status, 503, "a standby is not ready: {body}");
        if body.contains("standing by: controller-0 leads") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(format!("http://{}/metrics", standby.admin)).await;
    assert!(metrics.contains("fleet_controller_leading 0"), "{metrics}");

    let (id, watch) = world.release_into_its_second_wave().await.unwrap();
    let admin = standby.admin;
    let killed = Instant::now();
    world.fleet.crash_controller().await.unwrap();
    // The lease lives 2 s; the standby tries for the lead three times as often.
    let within = Duration::from_secs(10);
    world.fleet.standby_leads(standby, within).await.unwrap();
    let took = killed.elapsed();
    println!("the standby led {took:?} after the leader was killed");
    assert!(
        took >= Duration::from_secs(1),
        "not before the lease ran out: {took:?}"
    );
    let (status, _) = get(format!("http://{admin}/readyz")).await;
    assert_eq!(status, 200);
    let (_, metrics) = get(format!("http://{admin}/metrics")).await;
    assert!(metrics.contains("fleet_controller_leading 1"), "{metrics}");

    world.succeeded_step_by_step(&id).await;
    world.each_step_once(&id).await;
    world.watched_each_event_once(&id, watch).await;
    // The new leader numbers releases on from the old one's.
    let next = world.start_release("v3").await.unwrap();
    let number = |id: &str| id.rsplit('-').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(number(&next), number(&id) + 1, "{next} after {id}");
    world.stop().await;
}
