//! The controller's gRPC listener over TLS, with a client CA (mutual TLS), reached the way
//! the agent and fleetctl reach it (`fleet_proto::connect`); certificates made by rcgen.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use fleet_controller::tls::{Files, Reloader};
use fleet_proto::connect::{ClientTls, channel, endpoint};
use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::release_service_client::ReleaseServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, IsCa,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams,
};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const QUICK: &str = include_str!("../../deploy/examples/quick.yaml");

/// A CA, and certificates it signed written as PEM files into `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: &'static str,
}

impl Ca {
    fn new(dir: &Path, name: &'static str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = Ca {
            issuer,
            dir: dir.to_owned(),
            name,
        };
        std::fs::write(ca.path("ca.pem"), ca.issuer.pem()).unwrap();
        ca
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(format!("{}-{file}", self.name))
    }

    /// Writes `<name>-<who>.pem` and `<name>-<who>.key` for `names`; returns their paths.
    fn sign(&self, who: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.sign_serial(who, names, rand_serial())
    }

    /// [`Ca::sign`] with the serial number `serial`.
    fn sign_serial(&self, who: &str, names: &[&str], serial: u64) -> (PathBuf, PathBuf) {
        self.sign_with(who, names, |params| {
            params.serial_number = Some(serial.into())
        })
    }

    /// [`Ca::sign`], valid until `not_after` (to the second).
    fn sign_until(
        &self,
        who: &str,
        names: &[&str],
        not_after: std::time::SystemTime,
    ) -> (PathBuf, PathBuf) {
        self.sign_with(who, names, |params| params.not_after = not_after.into())
    }

    /// [`Ca::sign`], with its parameters as `set` makes them.
    fn sign_with(
        &self,
        who: &str,
        names: &[&str],
        set: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        set(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.path(&format!("{who}.pem")),
            self.path(&format!("{who}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Writes `<name>-crl.pem`, revoking the certificates of serial numbers `revoked`.
    fn revoke(&self, revoked: &[u64]) -> PathBuf {
        let crl = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap();
        let path = self.path("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}

/// The listener's files: `cert` and `key`, clients' certificates signed by `ca`.
fn files(cert: &Path, key: &Path, ca: &Path) -> Files {
    Files {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: ca.to_owned(),
        client_crl: None,
    }
}

/// The settings `files` make, or why they make none.
fn config(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    files(cert, key, ca).server_config()
}

fn rand_serial() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) >> 1
}

/// A controller serving mutual TLS on loopback, its clients' certificates signed by `ca`.
struct Mutual {
    port: u16,
    admin_port: u16,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Mutual {
    async fn start(ca: &Ca, cert: &Path, key: &Path, dir: &Path) -> Mutual {
        Mutual::with(files(cert, key, &ca.path("ca.pem")), dir).await
    }

    async fn with(files: Files, dir: &Path) -> Mutual {
        let tls = Reloader::new(files).unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_port = admin.local_addr().unwrap().port();
        let port = grpc.local_addr().unwrap().port();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let data = dir.join("data");
        let task = tokio::spawn(async move {
            let options = fleet_controller::Options {
                tls: Some(tls),
                ..Default::default()
            };
            fleet_controller::serve_with(grpc, admin, &data, shutdown, options).await
        });
        Mutual {
            port,
            admin_port,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// The value of the sample `name` (with its labels) on `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line[name.len()..].trim().parse().unwrap()
    }
}

/// Whether a health check over `tls` to `url` is answered.
async fn answered(url: &str, tls: &ClientTls) -> bool {
    let Ok(channel) = channel(url, tls).await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), check).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let theirs = Ca::new(dir.path(), "theirs");
    let (server_cert, server_key) = ours.sign("controller", &["localhost", "127.0.0.1"]);
    let (agent_cert, agent_key) = ours.sign("agent", &["agent.usw1-a"]);
    let (stranger_cert, stranger_key) = theirs.sign("stranger", &["agent.usw1-a"]);

    let server = Mutual::start(&ours, &server_cert, &server_key, dir.path()).await;
    let port = server.port;

    let url = format!("https://127.0.0.1:{port}");
    let agent = ClientTls {
        ca: Some(ours.path("ca.pem")),
        cert: Some(agent_cert),
        key: Some(agent_key.clone()),
    };
    assert!(answered(&url, &agent).await, "a client of the CA");
    let localhost = format!("https://localhost:{port}");
    assert!(answered(&localhost, &agent).await, "by its other name");

    let without_certificate = ClientTls {
        cert: None,
        key: None,
        ..agent.clone()
    };
    assert!(
        !answered(&url, &without_certificate).await,
        "no certificate"
    );
    let stranger = ClientTls {
        cert: Some(stranger_cert),
        key: Some(stranger_key),
        ..agent.clone()
    };
    assert!(
        !answered(&url, &stranger).await,
        "a certificate of another CA"
    );
    let trusting_another = ClientTls {
        ca: Some(theirs.path("ca.pem")),
        ..agent.clone()
    };
    assert!(
        !answered(&url, &trusting_another).await,
        "a controller it does not trust"
    );
    let plain = format!("http://127.0.0.1:{port}");
    assert!(
        !answered(&plain, &ClientTls::default()).await,
        "plain HTTP/2"
    );

    server.stop().await;
}

#[test]
fn tls_settings_that_cannot_work_are_refused_naming_the_flag() {
    let missing = ClientTls {
        ca: Some("/nonexistent/ca.pem".into()),
        ..ClientTls::default()
    };
    let e = endpoint("https://127.0.0.1:7070", &missing).unwrap_err();
    assert_eq!(e.to_string(), "--ca /nonexistent/ca.pem: cannot read it");
    let e = endpoint("http://127.0.0.1:7070", &missing).unwrap_err();
    assert!(e.to_string().contains("is not https://"), "{e}");
    let half = ClientTls {
        cert: Some("/tmp/agent.pem".into()),
        ..ClientTls::default()
    };
    let e = endpoint("https://127.0.0.1:7070", &half).unwrap_err();
    assert!(
        e.to_string().starts_with("--tls-cert needs --tls-key"),
        "{e}"
    );
    let e = config(
        Path::new("/nonexistent/c.pem"),
        Path::new("/nonexistent/c.key"),
        Path::new("/nonexistent/ca.pem"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--tls-cert /nonexistent/c.pem: cannot read it"
    );

    // Files that are there but are not what their flag says.
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let (cert, key) = ours.sign("controller", &["localhost"]);
    let (_, other_key) = ours.sign("other", &["localhost"]);
    let e = config(&cert, &key, &key).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "--client-ca {}: no certificate in it",
            key.display()
        )),
        "{e}"
    );
    let e = config(&key, &key, &ours.path("ca.pem")).unwrap_err();
    assert!(e.to_string().starts_with("--tls-cert"), "{e}");
    let e = config(&cert, &cert, &ours.path("ca.pem")).unwrap_err();
    assert!(e.to_string().starts_with("--tls-key"), "{e}");
    let e = config(&cert, &other_key, &ours.path("ca.pem")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "--tls-cert {}, --tls-key {}: not a certificate and its key",
            cert.display(),
            other_key.display()
        )
    );
    let crl = Files {
        client_crl: Some(key.clone()),
        ..files(&cert, &key, &ours.path("ca.pem"))
    };
    let e = crl.server_config().unwrap_err();
    assert!(e.to_string().starts_with("--client-crl"), "{e}");
    let theirs = Ca::new(dir.path(), "theirs");
    let crl = Files {
        client_crl: Some(theirs.revoke(&[1])),
        ..files(&cert, &key, &ours.path("ca.pem"))
    };
    let e = crl.server_config().unwrap_err();
    assert!(
        e.to_string()
            .contains("a list issued by \"CN=theirs CA\", which is none of --client-ca's CAs"),
        "{e}"
    );
    let not_a_ca = ClientTls {
        ca: Some(key.clone()),
        ..ClientTls::default()
    };
    let e = endpoint("https://127.0.0.1:7070", &not_a_ca).unwrap_err();
    assert!(e.to_string().starts_with("--ca"), "{e}");
}

/// A client of `url` trusting `ca` and showing `cert`.
async fn client_of(url: &str, ca: &Ca, cert: &(PathBuf, PathBuf)) -> Channel {
    channel(url, &showing(ca, cert)).await.unwrap()
}

/// Opens an agent's stream saying hello for `cluster` in `region`.
async fn hello(channel: Channel, region: &str, cluster: &str) -> Result<(), tonic::Status> {
    session(channel, region, cluster).await.map(drop)
}

/// An agent's stream after its hello for `cluster` in `region`, open while the sender lives.
type Session = (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::ControllerMessage>,
);

async fn session(channel: Channel, region: &str, cluster: &str) -> Result<Session, tonic::Status> {
    let hello = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            region: region.into(),
            cluster: cluster.into(),
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.unwrap();
    let inbound = AgentServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// An agent's stream for `cluster` in us-west, open, through a client of `url` trusting `ca`
/// and showing `cert`.
async fn agent_in_us_west(url: &str, ca: &Ca, cert: &(PathBuf, PathBuf), cluster: &str) -> Session {
    session(client_of(url, ca, cert).await, "us-west", cluster)
        .await
        .unwrap()
}

/// Whether the controller ends `session` within `within`.
async fn ended(session: &mut Session, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, session.1.message()).await,
        Ok(Err(_) | Ok(None))
    )
}

#[tokio::test]
async fn each_client_may_do_only_what_its_certificate_names_it_for() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (server_cert, server_key) = ca.sign("controller", &["localhost"]);
    let agent = ca.sign("agent", &["usw1-a.us-west.agent.fleet"]);
    let alice = ca.sign("alice", &["alice.operator.fleet"]);
    let server = Mutual::start(&ca, &server_cert, &server_key, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    let as_agent = client_of(&url, &ca, &agent).await;
    let as_alice = client_of(&url, &ca, &alice).await;

    hello(as_agent.clone(), "us-west", "usw1-a").await.unwrap();
    let refused = hello(as_agent.clone(), "us-west", "usw1-b")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .ends_with("give this agent a certificate for the DNS name usw1-b.us-west.agent.fleet"),
        "{refused:?}"
    );
    let refused = hello(as_alice.clone(), "us-west", "usw1-a")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "an operator is no agent"
    );
    let wildcard = ca.sign("wildcard", &["*.us-west.agent.fleet"]);
    let as_wildcard = client_of(&url, &ca, &wildcard).await;
    for (cluster, code) in [
        ("*", Code::InvalidArgument),
        ("usw1-a", Code::PermissionDenied),
    ] {
        let refused = hello(as_wildcard.clone(), "us-west", cluster)
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            code,
            "a wildcard speaks for no one: {cluster}"
        );
    }
    for (region, cluster) in [("us-west", "USW1-A"), ("us-west", "a.b"), ("", "usw1-a")] {
        let refused = hello(as_agent.clone(), region, cluster).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{region:?} {cluster:?}"
        );
    }

    let mut agent_api = ReleaseServiceClient::new(as_agent);
    let refused = agent_api
        .list_fleets(pb::ListFleetsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().starts_with(
            "a certificate for usw1-a.us-west.agent.fleet is neither an operator's nor a viewer's: \
             the release API needs a certificate for <name>.operator.fleet"
        ),
        "{refused:?}"
    );

    // What alice does is recorded as hers, whoever the request says acts.
    let mut api = ReleaseServiceClient::new(as_alice);
    api.apply_fleet(pb::ApplyFleetRequest {
        request_id: "apply-1".into(),
        manifest: QUICK.into(),
    })
    .await
    .unwrap();
    let release = api
        .start_release(pb::StartReleaseRequest {
            request_id: "start-1".into(),
            service: "demo".into(),
            version: "v2".into(),
            from_version: "v1".into(),
            actor: "mallory".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    api.abort(pb::OperatorRequest {
        request_id: "abort-1".into(),
        id: release.id.clone(),
        actor: "mallory".into(),
        reason: "testing".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Request ids are each operator's own: bob's "apply-1" is not alice's.
    let bob = ca.sign("bob", &["bob.operator.fleet"]);
    let mut bobs = ReleaseServiceClient::new(client_of(&url, &ca, &bob).await);
    let refused = bobs
        .apply_fleet(pb::ApplyFleetRequest {
            request_id: "apply-1".into(),
            manifest: "not: a fleet".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with("the manifest is invalid"),
        "bob's own request, checked: {refused:?}"
    );

    let history = api
        .history(pb::HistoryRequest {
            id: release.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let actors: Vec<(&str, &str)> = history
        .events
        .iter()
        .filter(|e| e.actor != "engine")
        .map(|e| (e.kind.as_str(), e.actor.as_str()))
        .collect();
    assert!(actors.len() >= 2, "{actors:?}");
    assert!(
        actors.iter().all(|(_, actor)| *actor == "alice"),
        "{actors:?}"
    );

    // A viewer reads everything and changes nothing.
    let dash = ca.sign("dash", &["dash.viewer.fleet"]);
    let mut viewer = ReleaseServiceClient::new(client_of(&url, &ca, &dash).await);
    let id = release.id.clone();
    let seen = viewer
        .get_release(pb::GetReleaseRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (seen.id.as_str(), seen.phase.as_str()),
        (id.as_str(), "rolling_back")
    );
    let listed = viewer.list_releases(pb::ListReleasesRequest::default());
    assert_eq!(listed.await.unwrap().into_inner().releases.len(), 1);
    let fleets = viewer.list_fleets(pb::ListFleetsRequest::default());
    assert_eq!(fleets.await.unwrap().into_inner().fleets.len(), 1);
    let read = viewer.history(pb::HistoryRequest { id: id.clone() });
    assert_eq!(read.await.unwrap().into_inner(), history);
    let agents = viewer.list_agents(pb::ListAgentsRequest {
        service: "demo".into(),
    });
    assert_eq!(agents.await.unwrap().into_inner().agents.len(), 3);
    let refusals = [
        viewer
            .apply_fleet(pb::ApplyFleetRequest {
                request_id: "v-apply".into(),
                manifest: QUICK.into(),
            })
            .await
            .unwrap_err(),
        viewer
            .start_release(pb::StartReleaseRequest {
                request_id: "v-start".into(),
                service: "demo".into(),
                version: "v3".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        viewer
            .resume(pb::OperatorRequest {
                request_id: "v-resume".into(),
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ];
    for refused in refusals {
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert_eq!(
            refused.message(),
            "dash.viewer.fleet may read fleets and releases, not change them: a change needs \
             a certificate for dash.operator.fleet"
        );
    }
    let after = api.history(pb::HistoryRequest { id }).await.unwrap();
    assert_eq!(
        after.into_inner(),
        history,
        "nothing the viewer asked for happened"
    );
    server.stop().await;
}

/// Whether `check` holds within 10 s, trying every 50 ms.
async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A client trusting `trusted`'s CA, showing the certificate `cert`.
fn showing(trusted: &Ca, cert: &(PathBuf, PathBuf)) -> ClientTls {
    ClientTls {
        ca: Some(trusted.path("ca.pem")),
        cert: Some(cert.0.clone()),
        key: Some(cert.1.clone()),
    }
}

#[test]
fn the_files_are_read_again_once_changed_and_bad_ones_leave_the_last_good_in_force() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (cert, key) = ca.sign("controller", &["localhost"]);
    let mut tls = Reloader::new(files(&cert, &key, &ca.path("ca.pem"))).unwrap();
    let first = tls.current();
    assert!(!tls.check().unwrap(), "nothing changed");
    assert!(Arc::ptr_eq(&first, &tls.current()));

    ca.sign("controller", &["localhost", "controller.example"]);
    assert!(tls.check().unwrap(), "a renewed certificate");
    let renewed = tls.current();
    assert!(!Arc::ptr_eq(&first, &renewed));

    std::fs::write(&cert, "half a certificate").unwrap();
    let e = tls.check().unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("--tls-cert {}", cert.display())),
        "{e}"
    );
    assert!(Arc::ptr_eq(&renewed, &tls.current()), "the last good stay");
    assert!(!tls.check().unwrap(), "not read again until changed again");

    // A file that cannot be read (written in two steps, say) is tried again next time.
    std::fs::remove_file(&cert).unwrap();
    assert!(tls.check().is_err());
    assert!(tls.check().is_err(), "tried again");
    assert!(Arc::ptr_eq(&renewed, &tls.current()));

    ca.sign("controller", &["localhost"]);
    assert!(tls.check().unwrap(), "mended");
    assert!(!Arc::ptr_eq(&renewed, &tls.current()));
}

#[tokio::test]
async fn a_renewed_certificate_and_a_new_client_ca_take_effect_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let next = Ca::new(dir.path(), "next");
    let (cert, key) = ours.sign("controller", &["localhost"]);
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::copy(ours.path("ca.pem"), &client_ca).unwrap();
    let server = Mutual::with(files(&cert, &key, &client_ca), dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    let old_client = ours.sign("old", &["alice.operator.fleet"]);
    let new_client = next.sign("new", &["alice.operator.fleet"]);
    assert!(answered(&url, &showing(&ours, &old_client)).await);
    assert!(!answered(&url, &showing(&next, &old_client)).await);
    let agent = ours.sign("agent", &["usw1-a.us-west.agent.fleet"]);
    let mut open = agent_in_us_west(&url, &ours, &agent, "usw1-a").await;

    // The controller's certificate renewed by the next CA, written over the old files, and
    // the client CA written again as it was (a Secret's update writes all its files anew).
    let (renewed_cert, renewed_key) = next.sign("controller", &["localhost"]);
    std::fs::copy(&renewed_cert, &cert).unwrap();
    std::fs::copy(&renewed_key, &key).unwrap();
    std::fs::remove_file(&client_ca).unwrap();
    std::fs::copy(ours.path("ca.pem"), &client_ca).unwrap();
    let tls = showing(&next, &old_client);
    assert!(
        eventually(|| answered(&url, &tls)).await,
        "clients trusting the next CA get in"
    );
    assert!(!answered(&url, &showing(&ours, &old_client)).await);
    assert!(
        !ended(&mut open, Duration::from_millis(300)).await,
        "open connections carry on"
    );

    // Clients' certificates from the next CA only: those let in before fail it, and go.
    std::fs::copy(next.path("ca.pem"), &client_ca).unwrap();
    assert!(ended(&mut open, Duration::from_secs(10)).await);
    let tls = showing(&next, &new_client);
    assert!(
        eventually(|| answered(&url, &tls)).await,
        "a client of the next CA gets in"
    );
    assert!(!answered(&url, &showing(&next, &old_client)).await);
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let other = Ca::new(dir.path(), "other");
    let (cert, key) = ca.sign("controller", &["localhost"]);
    let lost = ca.sign_serial("lost", &["usw1-a.us-west.agent.fleet"], 7);
    let kept = ca.sign_serial("kept", &["usw1-b.us-west.agent.fleet"], 8);
    let others = other.sign_serial("others", &["usw1-c.us-west.agent.fleet"], 7);
    // Two client CAs, a list for one: the other's certificates are not looked up.
    let both = dir.path().join("both-ca.pem");
    let pems =
        [ca.path("ca.pem"), other.path("ca.pem")].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&both, pems.concat()).unwrap();
    let with_crl = Files {
        client_crl: Some(ca.revoke(&[7])),
        ..files(&cert, &key, &both)
    };
    let server = Mutual::with(with_crl, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    assert!(answered(&url, &showing(&ca, &kept)).await);
    assert!(!answered(&url, &showing(&ca, &lost)).await, "revoked");
    assert!(
        answered(&url, &showing(&ca, &others)).await,
        "the same serial from a CA without a list"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_revoked_while_the_controller_runs_loses_its_stream_and_the_others_keep_theirs()
 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (cert, key) = ca.sign("controller", &["localhost"]);
    let lost = ca.sign_serial("lost", &["usw1-a.us-west.agent.fleet"], 7);
    let kept = ca.sign_serial("kept", &["usw1-b.us-west.agent.fleet"], 8);
    let with_crl = Files {
        client_crl: Some(ca.revoke(&[])),
        ..files(&cert, &key, &ca.path("ca.pem"))
    };
    let server = Mutual::with(with_crl, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    let mut stolen = agent_in_us_west(&url, &ca, &lost, "usw1-a").await;
    let mut honest = agent_in_us_west(&url, &ca, &kept, "usw1-b").await;

    ca.revoke(&[7]);
    assert!(ended(&mut stolen, Duration::from_secs(10)).await);
    assert!(!answered(&url, &showing(&ca, &lost)).await, "revoked");
    assert!(
        !ended(&mut honest, Duration::from_millis(500)).await,
        "the others carry on"
    );
    drop(honest);
    server.stop().await;
}

#[tokio::test]
async fn a_client_whose_certificate_expires_loses_its_stream_then_and_the_others_keep_theirs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (cert, key) = ca.sign("controller", &["localhost"]);
    // Time enough for the server to start and both clients to shake hands on a busy machine.
    let soon = std::time::SystemTime::now() + Duration::from_secs(5);
    let expiring = ca.sign_until("expiring", &["usw1-a.us-west.agent.fleet"], soon);
    let kept = ca.sign("kept", &["usw1-b.us-west.agent.fleet"]);
    let server = Mutual::start(&ca, &cert, &key, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    let mut expired = agent_in_us_west(&url, &ca, &expiring, "usw1-a").await;
    let mut honest = agent_in_us_west(&url, &ca, &kept, "usw1-b").await;
    assert!(
        !ended(&mut expired, Duration::from_millis(500)).await,
        "valid still"
    );
    // Valid through its last second: ended within a second or two after it.
    assert!(ended(&mut expired, Duration::from_secs(8)).await);
    let at = std::time::SystemTime::now();
    assert!(at >= soon, "ended {:?} early", soon.duration_since(at));
    assert!(!answered(&url, &showing(&ca, &expiring)).await, "expired");
    assert!(
        !ended(&mut honest, Duration::from_millis(500)).await,
        "the others carry on"
    );
    drop(honest);
    server.stop().await;
}

#[tokio::test]
async fn metrics_tell_when_the_certificate_expires_and_what_the_listener_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let stranger = Ca::new(dir.path(), "theirs").sign("stranger", &["alice.operator.fleet"]);
    let (cert, key) = ca.sign("controller", &["localhost"]);
    let server = Mutual::start(&ca, &cert, &key, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);

    let pem = std::fs::read(&cert).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let not_after = pem.parse_x509().unwrap().validity().not_after.timestamp();
    let expiry = "fleet_controller_tls_certificate_expiry_seconds";
    assert_eq!(server.metric(expiry).await, not_after as f64);

    assert!(!answered(&url, &showing(&ca, &stranger)).await);
    let refused = "fleet_controller_tls_handshakes_refused_total";
    assert!(server.metric(refused).await >= 1.0);

    std::fs::write(&cert, "half a certificate").unwrap();
    let failed = "fleet_controller_tls_reloads_total{result=\"failed\"}";
    let watched = &server;
    assert!(eventually(|| async move { watched.metric(failed).await > 0.0 }).await);
    assert_eq!(
        server.metric(failed).await,
        1.0,
        "one failed read of the changed files"
    );
    assert_eq!(
        server.metric(expiry).await,
        not_after as f64,
        "the last good stay"
    );
    server.stop().await;
}

#[tokio::test]
async fn clients_that_never_finish_a_handshake_cannot_take_more_than_256_places() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (cert, key) = ca.sign("controller", &["localhost"]);
    let server = Mutual::start(&ca, &cert, &key, dir.path()).await;
    let url = format!("https://localhost:{}", server.port);
    let alice = ca.sign("alice", &["alice.operator.fleet"]);
    let addr = format!("127.0.0.1:{}", server.port);
    // 256 clients that open a connection and never say a word take every handshake place…
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // …so the next, an operator with a good certificate, is closed at once and counted
    // refused, rather than left waiting for the handshake timeout.
    let operator = showing(&ca, &alice);
    let tried = std::time::Instant::now();
    assert!(!answered(&url, &operator).await);
    assert!(
        tried.elapsed() < Duration::from_secs(5),
        "{:?}",
        tried.elapsed()
    );
    let refused = "fleet_controller_tls_handshakes_refused_total";
    assert_eq!(server.metric(refused).await, 1.0);
    // Once they hang up (not a refusal: nothing was said), there is room again.
    drop(silent);
    assert!(eventually(|| answered(&url, &operator)).await);
    assert_eq!(server.metric(refused).await, 1.0);
    server.stop().await;
}
