//! The stream to the controller: dialled by the agent, so that clusters behind NAT work;
//! redialled with jittered exponential backoff whenever it breaks.

use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use rand::RngExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Config;
use crate::admin::Observed;

const STATUS_EVERY: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A stream past hello for this long has settled: if it breaks, the backoff starts again.
const SETTLED: Duration = Duration::from_secs(10);

/// Runs the session until `shutdown`, dialling again whenever it ends; and at once when
/// `redial` changes (the reconcile loop stood still, and a word the controller would send
/// only on a change may never come on the open stream). Gives up, saying why, once the
/// controller has refused it for another agent of its cluster for `Config::held_limit`.
pub async fn run(
    config: Config,
    desired: watch::Sender<Option<pb::DesiredState>>,
    mut status: watch::Receiver<pb::AgentStatus>,
    mut redial: watch::Receiver<u64>,
    observed: Arc<Observed>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut failures = 0u32;
    // Since when the controller refuses this agent for another of its cluster.
    let mut held_since: Option<tokio::time::Instant> = None;
    let mut max_epoch = 0u64;
    let instance = instance();
    loop {
        // An agent whose reconcile loop hangs keeps away: it would only report a state that
        // nothing keeps any more, and be counted present.
        while let Err(why) = observed.alive() {
            observed.disconnected(why);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
        let (mut heard, dialled) = (false, tokio::time::Instant::now());
        let result = tokio::select! {
            r = session(&config, &instance, &desired, &mut status, &mut redial, &mut max_epoch, &mut heard, &observed) => r,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let settled = heard && dialled.elapsed() >= SETTLED;
        if !matches!(&result, Err(e) if held_by_another(e)) {
            held_since = None;
        }
        failures = failures_now(failures, settled, result.is_ok());
        observed.disconnected(match &result {
            Ok(()) => "the agent stood still: dialling again for the controller's word".into(),
            Err(e) => format!("{e:#}"),
        });
        match result {
            Ok(()) => {
                tracing::info!("the agent stood still: dialling the controller again for its word");
                continue;
            }
            Err(e) if observed.alive().is_err() => {
                tracing::error!(error = %e, "the reconcile loop hangs; leaving the controller until it goes round again")
            }
            Err(e) if held_by_another(&e) => {
                let since = *held_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= config.held_limit {
                    return Err(format!(
                        "refused for {:?} because another agent is connected for this cluster: {}",
                        config.held_limit,
                        refusal(&e).unwrap_or_default()
                    ));
                }
                tracing::warn!(error = %e, failures, "another agent is connected for this cluster; dialling again (the controller lets one that has gone go once it has been silent a while)")
            }
            Err(e) => match refusal(&e) {
                Some(why) => {
                    tracing::error!(%why, failures, "the controller refused this agent; keeping the last desired state")
                }
                None => {
                    tracing::warn!(error = %e, failures, "controller unreachable; keeping the last desired state")
                }
            },
        }
        let base =
            Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(MAX_BACKOFF);
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::select! {
            _ = tokio::time::sleep(base.mul_f64(jitter)) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    config: &Config,
    instance: &str,
    desired: &watch::Sender<Option<pb::DesiredState>>,
    status: &mut watch::Receiver<pb::AgentStatus>,
    redial: &mut watch::Receiver<u64>,
    max_epoch: &mut u64,
    heard: &mut bool,
    observed: &Observed,
) -> anyhow::Result<()> {
    // A stall before this session is answered by its first word.
    redial.borrow_and_update();
    let channel = fleet_proto::connect::channel(&config.controller, &config.tls).await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        region: config.region.clone(),
        cluster: config.cluster.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        capabilities: vec![
            format!("{}{}", fleet_proto::DRIVER_CAPABILITY, config.driver),
            "proxy:fleet-proxy".into(),
        ],
        instance: instance.to_string(),
    };
    tx.send(message(pb::agent_message::Message::Hello(hello)))
        .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(controller = %config.controller, "connected to the controller");
    *heard = true;
    observed.connected();
    // Whatever the agent runs now, the controller hears it first thing.
    let current = status.borrow().clone();
    tx.send(message(pb::agent_message::Message::Status(current)))
        .await?;
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            received = inbound.message() => {
                let Some(pb::ControllerMessage { message: Some(pb::controller_message::Message::Desired(d)) }) = received? else {
                    anyhow::bail!("the controller ended the stream");
                };
                if !accept(max_epoch, &d) {
                    tracing::warn!(epoch = d.epoch, max_epoch, "ignoring desired state from an older controller epoch");
                    continue;
                }
                desired.send_replace(Some(d));
            }
            // Ended, not failed: the reconcile loop stood still and wants the controller's
            // word, which a new session gets first thing.
            Ok(()) = redial.changed() => return Ok(()),
            _ = status.changed() => {
                let current = status.borrow_and_update().clone();
                tx.send(message(pb::agent_message::Message::Status(current))).await?;
            }
            // The last status again, while the reconcile loop goes round; once it has not for
            // a while, the session ends and the agent keeps away.
            _ = tick.tick() => {
                observed.alive().map_err(anyhow::Error::msg)?;
                let current = status.borrow().clone();
                tx.send(message(pb::agent_message::Message::Status(current))).await?;
            }
        }
    }
}

/// This agent process, for the controller to tell it from another agent that says it is the
/// same cluster: `HOST/PID/RANDOM` (a pod's host name is its name).
fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let random: u32 = rand::random();
    format!("{}/{}/{random:08x}", host.trim(), std::process::id())
}

/// Whether to take `d`: never from an older controller epoch than one already seen, so that a
/// controller that lost its term cannot act after a new one took over.
fn accept(max_epoch: &mut u64, d: &pb::DesiredState) -> bool {
    if d.epoch < *max_epoch {
        return false;
    }
    *max_epoch = d.epoch;
    true
}

/// The failures in a row that set the wait before dialling again, after a session that
/// ended `ok` or not, having `settled` (past hello, for [`SETTLED`]) or not: a stream that
/// settled and then broke is a new trouble, not the last one going on, so the agent dials again
/// at once, backing off only while dialling keeps failing (or a controller keeps ending the
/// stream as soon as it is open).
fn failures_now(before: u32, settled: bool, ok: bool) -> u32 {
    match (ok, settled) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => before.saturating_add(1),
    }
}

/// Why the controller refused this agent, when it did (its certificate names another
/// cluster, say), that what answers is no controller (a wrong port), or one that speaks TLS
/// dialled over http://: a fault to fix here, where other failures are the network's.
fn refusal(e: &anyhow::Error) -> Option<&str> {
    let status = e.downcast_ref::<tonic::Status>()?;
    if fleet_proto::connect::not_grpc(status) {
        return Some(fleet_proto::connect::NOT_GRPC);
    }
    if fleet_proto::connect::spoke_tls(status) {
        return Some(fleet_proto::connect::SPOKE_TLS);
    }
    matches!(
        status.code(),
        tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::AlreadyExists
    )
    .then(|| status.message())
}

/// Whether the controller refused this agent because another is connected for its cluster
/// (which may be this agent's predecessor, not yet seen gone).
fn held_by_another(e: &anyhow::Error) -> bool {
    (e.downcast_ref::<tonic::Status>()).is_some_and(|s| s.code() == tonic::Code::AlreadyExists)
}

fn message(m: pb::agent_message::Message) -> pb::AgentMessage {
    pb::AgentMessage { message: Some(m) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_starts_again_once_a_stream_got_past_hello() {
        assert_eq!(failures_now(0, false, false), 1);
        assert_eq!(failures_now(5, false, false), 6, "dialling keeps failing");
        assert_eq!(failures_now(5, true, false), 1, "it broke once settled");
        assert_eq!(failures_now(5, true, true), 0);
    }

    #[test]
    fn a_refusal_is_told_apart_from_a_network_failure() {
        let refused = anyhow::Error::new(tonic::Status::permission_denied("wrong cluster"));
        assert_eq!(refusal(&refused), Some("wrong cluster"));
        let bad_hello = anyhow::Error::new(tonic::Status::invalid_argument("not a name"));
        assert_eq!(refusal(&bad_hello), Some("not a name"));
        let second = anyhow::Error::new(tonic::Status::already_exists("has an agent"));
        assert_eq!(refusal(&second), Some("has an agent"));
        assert!(held_by_another(&second) && !held_by_another(&refused));
        let cut = anyhow::Error::new(tonic::Status::unavailable("connection reset"));
        assert_eq!(refusal(&cut), None);
        assert_eq!(refusal(&anyhow::anyhow!("dns error")), None);
        let web = "protocol error: received message with invalid compression flag: 104 (valid \
            flags are 0 and 1) while receiving response with status: 200 OK";
        let web = anyhow::Error::new(tonic::Status::internal(web));
        assert_eq!(refusal(&web), Some(fleet_proto::connect::NOT_GRPC));
    }

    #[test]
    fn desired_state_from_an_older_epoch_is_ignored() {
        let at = |epoch, seq| pb::DesiredState {
            epoch,
            seq,
            ..Default::default()
        };
        let mut max = 0;
        assert!(accept(&mut max, &at(2, 5)));
        assert!(accept(&mut max, &at(2, 6)));
        assert!(
            !accept(&mut max, &at(1, 9)),
            "an older controller lost its term"
        );
        assert!(
            accept(&mut max, &at(3, 6)),
            "a newer one may resend the same step"
        );
        assert_eq!(max, 3);
    }
}
