//! What a standby controller does with the connections to its gRPC port: it passes each, as
//! bytes, to the controller that leads (at the address its leader key gives), so that a
//! Service may send clients to any controller, and TLS, if on, is between the client and
//! the leader. While no controller is known to lead, connections are closed at once and
//! clients dial again. Whether the leader takes them is known (a standby dials it every
//! [`PROBE_EVERY`] too), for the standby's readiness ([`Reach`]).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::leader::Holder;

/// How long a standby waits for the leader to take a connection it passes on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a standby dials the leader to learn whether it takes connections (closing at
/// once what it opened), with or without clients.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Whether the leader took the last connection a standby made to it: a leader that was
/// killed keeps its key until its lease runs out, and one whose `--advertise` is wrong keeps
/// it for good, while every connection passed to it fails.
#[derive(Default)]
pub struct Reach(Mutex<Last>);

/// What the last dial to start, of those that ended, found.
#[derive(Default)]
struct Last {
    /// When it started: a slower dial that started before it and ends after is not taken.
    started: Option<Instant>,
    unreached: Option<Unreached>,
}

/// The leader the last connection failed to reach, and why.
struct Unreached {
    leader: Holder,
    error: String,
}

/// What a leader that takes no connection means, for the log and the standby's readiness.
pub const UNREACHED_MEANS: &str = "killed, another takes over once its lease runs out; if it \
     runs, its --advertise is not an address this controller reaches it at";

impl Reach {
    /// Why `leader` did not take the last connection made to it, if it did not.
    pub fn unreached(&self, leader: &Holder) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (last.unreached.as_ref())
            .filter(|u| u.leader == *leader)
            .map(|u| u.error.clone())
    }

    /// Records what a connection to `leader`, dialled at `started`, found; says so once when
    /// it starts failing, and when it works again.
    fn record(&self, leader: &Holder, started: Instant, outcome: Result<(), String>) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.started.is_some_and(|s| s > started) {
            return;
        }
        last.started = Some(started);
        match outcome {
            Ok(()) => {
                if last.unreached.take().is_some_and(|u| u.leader == *leader) {
                    tracing::info!(leader = %leader.name, at = %leader.grpc, "the leader takes connections again");
                }
            }
            Err(error) => {
                if (last.unreached.as_ref()).is_none_or(|u| u.leader != *leader) {
                    tracing::warn!(
                        leader = %leader.name, at = %leader.grpc, %error,
                        "cannot pass connections to the leader: {UNREACHED_MEANS}"
                    );
                }
                last.unreached = Some(Unreached {
                    leader: leader.clone(),
                    error,
                });
            }
        }
    }
}

/// Passes every connection `listener` accepts to the leader `leader` names, until `until`
/// resolves; then gives the listener back, for this controller to serve on. `us` is this
/// controller: a leader key that names it (left from before a restart) is not followed.
/// Connections passed on end when the leader changes, or when this controller leads: their
/// clients dial again and reach the leader of now, not one that may be paused or cut off.
pub async fn pass_through(
    listener: TcpListener,
    mut leader: watch::Receiver<Option<Holder>>,
    us: Holder,
    reach: Arc<Reach>,
    until: impl Future<Output = ()>,
) -> TcpListener {
    tokio::pin!(until);
    let mut passing = JoinSet::new();
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probing = JoinSet::new();
    // The leader the connections in `passing` go to.
    let mut passing_to = leader.borrow().clone();
    loop {
        let client = tokio::select! {
            _ = &mut until => return listener,
            changed = leader.changed() => match changed {
                // Another leader (not just one unknown for a moment: etcd slow to answer).
                Ok(()) => {
                    let now = leader.borrow().clone();
                    if now.is_some() && now != passing_to {
                        passing.abort_all();
                        // A probe of the last leader would hold up the next one's.
                        probing.abort_all();
                        passing_to = now;
                    }
                    continue;
                }
                // Nobody will say who leads any more: wait to be told to stop.
                Err(_) => {
                    (&mut until).await;
                    return listener;
                }
            },
            Some(_) = passing.join_next(), if !passing.is_empty() => continue,
            Some(_) = probing.join_next(), if !probing.is_empty() => continue,
            _ = probe.tick() => {
                if let Some(to) = followed(&leader, &us)
                    && probing.is_empty()
                {
                    probing.spawn(dial(to, reach.clone()));
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match followed(&leader, &us) {
            Some(to) => {
                passing_to = Some(to.clone());
                passing.spawn(pass(client, to, reach.clone()));
            }
            // Closed: the client dials again, by when a leader may be known.
            None => drop(client),
        }
    }
}

/// `--advertise`'s value as the others dial it: `HOST:PORT`, an IPv6 address put in
/// brackets (Kubernetes' `$(POD_IP):7070` gives none); an error that says what to write.
pub fn advertised(text: &str) -> anyhow::Result<String> {
    let wrong = || {
        anyhow::anyhow!(
            "--advertise {text:?}: write HOST:PORT, the address at which the other controllers \
             reach this one's gRPC port, such as 10.0.0.7:7070 or [fd00::7]:7070"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(wrong)?;
    port.parse::<u16>().map_err(|_| wrong())?;
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => Ok(format!("[{v6}]:{port}")),
        Err(_) if host.is_empty() || host.contains(':') && !host.starts_with('[') => Err(wrong()),
        Err(_) => Ok(text.to_string()),
    }
}

/// The leader `leader` names, unless it is this controller (`us`): a key left by it before a
/// restart would have it pass connections to itself.
fn followed(leader: &watch::Receiver<Option<Holder>>, us: &Holder) -> Option<Holder> {
    let to = leader.borrow().clone();
    to.filter(|to| to != us && to.grpc != us.grpc)
}

/// Copies bytes both ways between `client` and the leader `to` until either ends.
async fn pass(mut client: TcpStream, to: Holder, reach: Arc<Reach>) {
    let Some(mut leader) = dial(to, reach).await else {
        return;
    };
    let _ = (client.set_nodelay(true), leader.set_nodelay(true));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut leader).await;
}

/// A connection to the leader `to`, if it takes one in time; what it found goes in `reach`.
async fn dial(to: Holder, reach: Arc<Reach>) -> Option<TcpStream> {
    let started = Instant::now();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&to.grpc)).await;
    let (outcome, stream) = match connected {
        Ok(Ok(stream)) => (Ok(()), Some(stream)),
        Ok(Err(e)) => (Err(e.to_string()), None),
        Err(_) => (
            Err(format!(
                "it did not take a connection within {CONNECT_TIMEOUT:?}"
            )),
            None,
        ),
    };
    reach.record(&to, started, outcome);
    stream
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn holder(name: &str, grpc: &str) -> Holder {
        Holder {
            name: name.into(),
            grpc: grpc.into(),
        }
    }

    /// A stand-in for the leader's port that answers each connection with its first bytes
    /// in upper case, and keeps it open until the other side closes it.
    async fn leader() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0; 5];
                    c.read_exact(&mut buf).await.unwrap();
                    c.write_all(&buf.to_ascii_uppercase()).await.unwrap();
                    let _ = c.read(&mut buf).await;
                });
            }
        });
        addr
    }

    /// Connects to `at`, says hello: what comes back before the connection ends.
    async fn hello(at: std::net::SocketAddr) -> Vec<u8> {
        let mut c = TcpStream::connect(at).await.unwrap();
        let _ = c.write_all(b"hello").await;
        let mut back = vec![0; 5];
        match tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back)).await {
            Ok(Ok(_)) => back,
            Ok(Err(_)) => vec![],
            Err(_) => panic!("neither passed on nor closed"),
        }
    }

    #[test]
    fn an_advertised_address_is_one_to_dial() {
        assert_eq!(advertised("10.0.0.7:7070").unwrap(), "10.0.0.7:7070");
        assert_eq!(advertised("fd00::7:7070").unwrap(), "[fd00::7]:7070");
        assert_eq!(advertised("[fd00::7]:7070").unwrap(), "[fd00::7]:7070");
        assert_eq!(advertised("ctl-0.fleet:7070").unwrap(), "ctl-0.fleet:7070");
        for wrong in ["10.0.0.7", ":7070", "10.0.0.7:http", "fd00::zz:7070"] {
            let e = advertised(wrong).unwrap_err().to_string();
            assert!(e.contains("write HOST:PORT"), "{wrong}: {e}");
        }
    }

    /// Polls `reach` until it says whether the last connection to `leader` `failed`, for up
    /// to 10 s: why, if it did.
    async fn reached_as(reach: &Reach, leader: &Holder, failed: bool) -> Option<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let unreached = reach.unreached(leader);
            if unreached.is_some() == failed {
                return unreached;
            }
            assert!(tokio::time::Instant::now() < deadline, "{unreached:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_leader_that_takes_no_connection_is_known_without_a_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let us = holder("us", &listener.local_addr().unwrap().to_string());
        // A port nothing listens on: a leader killed, or one whose --advertise is wrong.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = closed.local_addr().unwrap();
        drop(closed);
        let gone = holder("gone", &at.to_string());
        // `leader_tx` is kept, so that the leader stays known: dropped, nobody says who leads.
        let (leader_tx, leader_rx) = watch::channel(Some(gone.clone()));
        let reach = Arc::new(Reach::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let passing = tokio::spawn(pass_through(
            listener,
            leader_rx,
            us,
            reach.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let why = reached_as(&reach, &gone, true).await.unwrap();
        assert!(why.contains("refused"), "{why}");
        // Back on its port: known to take connections at the next look.
        let back = TcpListener::bind(at).await.unwrap();
        reached_as(&reach, &gone, false).await;
        drop((back, leader_tx));
        let _ = stop.send(());
        passing.await.unwrap();
    }

    #[tokio::test]
    async fn connections_pass_to_the_leader_it_knows_and_are_closed_while_it_knows_none() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let us = holder("us", &at.to_string());
        let (leader_tx, leader_rx) = watch::channel(None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let reach = Arc::new(Reach::default());
        let passing = tokio::spawn(pass_through(
            listener,
            leader_rx,
            us.clone(),
            reach,
            async {
                let _ = stopped.await;
            },
        ));
        assert_eq!(hello(at).await, b"", "no leader known: closed");
        leader_tx.send_replace(Some(holder("them", &leader().await)));
        assert_eq!(hello(at).await, b"HELLO");
        // A connection passed on ends when another leads.
        let mut open = TcpStream::connect(at).await.unwrap();
        open.write_all(b"howdy").await.unwrap();
        let mut back = [0; 5];
        open.read_exact(&mut back).await.unwrap();
        // Not when etcd could not say for a moment who leads.
        leader_tx.send_replace(None);
        let still = tokio::time::timeout(Duration::from_millis(300), open.read(&mut back)).await;
        assert!(still.is_err(), "ended: {still:?}");
        leader_tx.send_replace(Some(holder("others", &leader().await)));
        let ended = tokio::time::timeout(Duration::from_secs(5), open.read(&mut back)).await;
        assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{ended:?}");
        assert_eq!(hello(at).await, b"HELLO");
        // A leader key left by this very controller (before a restart) is not followed: that
        // would pass connections to itself.
        leader_tx.send_replace(Some(us));
        assert_eq!(hello(at).await, b"");
        let _ = stop.send(());
        let listener = passing.await.unwrap();
        assert_eq!(
            listener.local_addr().unwrap(),
            at,
            "the listener is given back"
        );
    }
}
