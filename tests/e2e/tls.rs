//! Mutual TLS between the binaries: `fleet-controller` with `--tls-cert`, `--tls-key` and
//! `--client-ca`; `fleetctl` and `fleet-agent` reaching it with `--ca`, `--tls-cert` and
//! `--tls-key`, each let in only for what its certificate names it (an operator as
//! `<name>.operator.fleet`, a viewer as `<name>.viewer.fleet`, an agent as
//! `<cluster>.<region>.agent.fleet`). Real processes on 127.0.0.1, certificates made by
//! `fleetctl certs`.
#![allow(clippy::unwrap_used)]

use fleet_e2e::bin;
use fleet_proto::connect::ClientTls;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `fleet-controller` on 127.0.0.1:0 with its store in `data`, flags to be added.
fn controller(data: PathBuf) -> Command {
    let mut c = Command::new(bin("fleet-controller"));
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(data);
    c
}

/// TLS settings from files in the order of the flags: the CA's, then a certificate's and its
/// key's.
fn showing(files: &[&Path]) -> ClientTls {
    let file = |i: usize| files.get(i).map(|p| p.to_path_buf());
    ClientTls {
        ca: file(0),
        cert: file(1),
        key: file(2),
    }
}

/// Runs `fleetctl certs ARGS --dir dir` and returns the certificate and key it wrote for
/// `file` (`<file>.pem`, `<file>.key`).
fn certs(dir: &Path, args: &[&str], file: &str) -> [PathBuf; 2] {
    let out = Command::new(bin("fleetctl"))
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env_clear()
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleetctl certs {args:?}: {said}");
    let paths = [
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    ];
    for path in &paths {
        assert!(path.exists(), "{} not written", path.display());
    }
    paths
}

/// A child process killed when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines `child`'s stream writes, as they come.
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line from `rx` containing `text`, within 20 s.
fn first_with(rx: &mpsc::Receiver<String>, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?}: {e}"),
        }
    }
}

#[test]
fn fleetctl_and_the_agent_reach_a_controller_that_asks_for_their_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [ca_pem, _] = certs(d, &["ca"], "ca");
    let [server_cert, server_key] = certs(d, &["controller", "--dns", "localhost"], "controller");
    let [client_cert, client_key] = certs(d, &["operator", "alice"], "alice.operator.fleet");
    let [viewer_cert, viewer_key] = certs(d, &["viewer", "grafana"], "grafana.viewer.fleet");
    let agent = ["agent", "--region", "us-west", "--cluster", "us-west"];
    let [agent_cert, agent_key] = certs(d, &agent, "us-west.us-west.agent.fleet");

    let mut controller = controller(d.join("data"))
        .arg("--tls-cert")
        .arg(&server_cert)
        .arg("--tls-key")
        .arg(&server_key)
        .arg("--client-ca")
        .arg(&ca_pem)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines(controller.stdout.take().unwrap());
    let controller = Running(controller);
    let line = first_with(&out, "listening");
    assert!(line.ends_with(" tls=mutual"), "{line}");
    let port = line
        .split("grpc=127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let url = format!("https://localhost:{port}");

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml");
    // `fleetctl VERB` showing `tls`: the CA's file, then the certificate's and key's if any.
    let run = |verb: &[&OsStr], tls: &[&Path]| {
        Command::new(bin("fleetctl"))
            .args(verb)
            .args(["--controller", &url])
            .args(showing(tls).args())
            .env_clear()
            .output()
            .unwrap()
    };
    let fleetctl = |tls: &[&Path]| run(&[OsStr::new("apply"), manifest.as_os_str()], tls);
    let list = |tls: &[&Path]| run(&[OsStr::new("release"), OsStr::new("list")], tls);
    let with = fleetctl(&[&ca_pem, &client_cert, &client_key]);
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    // A viewer reads, and may not apply.
    let read = list(&[&ca_pem, &viewer_cert, &viewer_key]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let apply = fleetctl(&[&ca_pem, &viewer_cert, &viewer_key]);
    assert!(!apply.status.success());
    let said = String::from_utf8_lossy(&apply.stderr);
    assert!(
        said.contains("grafana.viewer.fleet may read fleets and releases, not change them"),
        "{said}"
    );
    // Refused, which another try would not change: told at once, not tried again.
    let refused_at = std::time::Instant::now();
    let without = fleetctl(&[&ca_pem]);
    assert!(!without.status.success());
    let said = String::from_utf8_lossy(&without.stderr);
    assert!(
        said.contains("client certificates, --tls-cert and --tls-key"),
        "{said}"
    );
    // The controller's own word, not a connection cut (which would be tried again).
    assert!(said.contains("CertificateRequired"), "{said}");
    assert!(!said.contains("trying again"), "{said}");
    let as_agent = fleetctl(&[&ca_pem, &agent_cert, &agent_key]);
    assert!(!as_agent.status.success());
    let said = String::from_utf8_lossy(&as_agent.stderr);
    assert!(
        said.contains(
            "the controller refused: a certificate for us-west.us-west.agent.fleet is neither an \
             operator's nor a viewer's"
        ),
        "{said}"
    );
    assert!(!said.contains("trying again"), "{said}");
    // A watch so refused is not followed again for --reconnect-for: a refusal (2), at once.
    let watch = [
        OsStr::new("release"),
        OsStr::new("watch"),
        OsStr::new("demo-1"),
    ];
    let watched = run(&watch, &[&ca_pem]);
    let said = String::from_utf8_lossy(&watched.stderr);
    assert_eq!(watched.status.code(), Some(2), "{said}");
    assert!(said.contains("CertificateRequired"), "{said}");
    assert!(!said.contains("dialling it again"), "{said}");
    let refused_in = refused_at.elapsed();
    assert!(
        refused_in < std::time::Duration::from_secs(5),
        "{refused_in:?}"
    );
    // Dialled over http://, a call and a watch are told to write https://, at once.
    let plain = format!("http://localhost:{port}");
    for verb in [&["release", "list"][..], &["release", "watch", "demo-1"]] {
        let asked = std::time::Instant::now();
        let over_http = Command::new(bin("fleetctl"))
            .args(verb)
            .args(["--controller", &plain])
            .env_clear()
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&over_http.stderr);
        assert_eq!(over_http.status.code(), Some(2), "{verb:?}: {said}");
        assert!(
            said.contains(
                "most likely a controller that speaks TLS: write the controller URL as https://"
            ),
            "{verb:?}: {said}"
        );
        let took = asked.elapsed();
        assert!(
            took < std::time::Duration::from_secs(5),
            "{verb:?}: {took:?}"
        );
    }

    let agent = |cluster: &str| {
        let mut agent = Command::new(bin("fleet-agent"))
            .args([
                "--controller",
                &url,
                "--region",
                "us-west",
                "--cluster",
                cluster,
            ])
            .args(["--proxy-admin", "http://127.0.0.1:9"])
            .args(showing(&[&ca_pem, &agent_cert, &agent_key]).args())
            .env_clear()
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = lines(agent.stderr.take().unwrap());
        (Running(agent), logs)
    };
    let (_ours, logs) = agent("us-west");
    first_with(&logs, "connected to the controller");
    let (_another, logs) = agent("us-west-2");
    let line = first_with(&logs, "the controller refused this agent");
    assert!(
        line.contains(
            "give this agent a certificate for the DNS name us-west-2.us-west.agent.fleet"
        ),
        "{line}"
    );
    drop(controller);
}

#[test]
fn a_controller_asked_for_tls_without_a_client_ca_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = controller(dir.path().join("data"))
        .args(["--tls-cert", "c.pem", "--tls-key", "c.key"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--client-ca"), "{said}");
}

#[test]
fn an_agent_given_a_region_or_cluster_that_is_not_a_name_does_not_start() {
    for (region, cluster) in [("US-West", "usw1-a"), ("us-west", "usw1_a")] {
        let out = Command::new(bin("fleet-agent"))
            .args(["--controller", "http://127.0.0.1:9", "--region", region])
            .args(["--cluster", cluster, "--proxy-admin", "http://127.0.0.1:9"])
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("not a name as the manifest gives them"),
            "{said}"
        );
    }
}
