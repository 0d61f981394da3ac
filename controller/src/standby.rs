//! What a standby controller does with the connections to its gRPC port: it passes each, as
//! bytes, to the controller that leads (at the address its leader key gives), so that a
//! Service may send clients to any controller, and TLS, if on, is between the client and
//! the leader. While no controller is known to lead, connections are closed at once and
//! clients dial again.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::leader::Holder;

/// How long a standby waits for the leader to take a connection it passes on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Passes every connection `listener` accepts to the leader `leader` names, until `until`
/// resolves; then gives the listener back, for this controller to serve on. `us` is this
/// controller: a leader key that names it (left from before a restart) is not followed.
/// Connections passed on end when the leader changes, or when this controller leads: their
/// clients dial again and reach the leader of now, not one that may be paused or cut off.
pub async fn pass_through(
    listener: TcpListener,
    mut leader: watch::Receiver<Option<Holder>>,
    us: Holder,
    until: impl Future<Output = ()>,
) -> TcpListener {
    tokio::pin!(until);
    let mut passing = JoinSet::new();
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
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let to = leader.borrow().clone();
        match to {
            Some(to) if to != us && to.grpc != us.grpc => {
                passing_to = Some(to.clone());
                passing.spawn(pass(client, to.grpc));
            }
            // Closed: the client dials again, by when a leader may be known.
            _ => drop(client),
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

/// Copies bytes both ways between `client` and the leader at `to` until either ends.
async fn pass(mut client: TcpStream, to: String) {
    let leader = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&to)).await;
    let mut leader = match leader {
        Ok(Ok(leader)) => leader,
        Ok(Err(e)) => return tracing::debug!(%to, error = %e, "the leader refused a connection"),
        Err(_) => return tracing::debug!(%to, "the leader did not take a connection in time"),
    };
    let _ = (client.set_nodelay(true), leader.set_nodelay(true));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut leader).await;
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

    #[tokio::test]
    async fn connections_pass_to_the_leader_it_knows_and_are_closed_while_it_knows_none() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let us = holder("us", &at.to_string());
        let (leader_tx, leader_rx) = watch::channel(None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let passing = tokio::spawn(pass_through(listener, leader_rx, us.clone(), async {
            let _ = stopped.await;
        }));
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
