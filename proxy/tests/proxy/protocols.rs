//! HTTP/2 with prior knowledge, gRPC trailers, Upgrade tunnels, TLS with SNI and ALPN.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Backend, Mode, Proxy, client, h2_client, send, stable_h2c_proxy, tracks};

async fn proxy_with(extra: &str) -> (Proxy, [Backend; 3]) {
    let b = [
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    ];
    let yaml = format!(
        "{extra}{}routes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        tracks(b[0].addr, b[1].addr, b[2].addr)
    );
    (Proxy::start(&yaml).await, b)
}

#[tokio::test]
async fn h2c_clients_are_served_over_http2_end_to_end() {
    let (proxy, b) = proxy_with("").await;
    let client = h2_client();
    for _ in 0..3 {
        let req = Request::get(proxy.url("/")).body(Full::default()).unwrap();
        let (status, h, body) = send(&client, req).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "stable"));
        assert_eq!(h["x-seen-version"], "HTTP/2.0");
        assert_eq!(h["x-seen-forwarded-host"], proxy.addr.to_string());
        assert_eq!(h["x-seen-authority"], proxy.addr.to_string());
    }
    // `protocol: auto` asked the backend once whether it speaks HTTP/2, on a connection of
    // its own; the requests shared one more.
    assert_eq!(b[0].conns(), 2);
    proxy.stop().await;
}

/// An HTTP/2 backend is asked for the host routing used, as an HTTP/1.1 one reads it in
/// `Host`: an HTTP/1.1 client's `Host` becomes its `:authority`.
#[tokio::test]
async fn an_http2_backend_gets_the_clients_host_as_its_authority() {
    let (proxy, _backend) = stable_h2c_proxy("").await;
    let req = Request::get(proxy.url("/"))
        .header("host", "shop.test")
        .body(Full::default())
        .unwrap();
    let (status, h, _) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["x-seen-version"], "HTTP/2.0");
    assert_eq!(h["x-seen-authority"], "shop.test");
    assert!(
        !h.contains_key("x-seen-host"),
        "only one of the two is sent"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn grpc_responses_keep_their_trailers() {
    let (proxy, _b) = proxy_with("").await;
    let req = Request::post(proxy.url("/pkg.Service/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x00")))
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-te"], "trailers");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "stable");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
    // A failure in the trailers of an HTTP/2 backend's answer is counted too.
    let req = Request::post(proxy.url("/pkg.Service/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-grpc-status", "14")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x00")))
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(
        resp.headers()["x-seen-version"],
        "HTTP/2.0",
        "an HTTP/2 backend"
    );
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    let stats = crate::support::stats(&proxy).await;
    let stable = crate::support::series(&stats, "stable", "primary");
    assert_eq!(stable["grpc_errors"], 1, "{stats}");
    proxy.stop().await;
}

/// A WebSocket handshake through the proxy at `addr`: the stream, switched.
async fn websocket(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "closed during the handshake: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s
}

async fn echoes(s: &mut TcpStream, message: &[u8]) {
    s.write_all(message).await.unwrap();
    let mut echo = vec![0u8; message.len()];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, message);
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_tunnel_that_echoes() {
    let (proxy, _b) = proxy_with("").await;
    let mut s = websocket(proxy.addr).await;
    for message in [&b"hello"[..], b"again, through the same tunnel"] {
        echoes(&mut s, message).await;
    }
    drop(s);
    proxy.stop().await;
}

/// A tunnel is an open connection: counted open, under `max_connections`, and closed
/// after `upstream.read_timeout` without a byte either way.
#[tokio::test]
async fn a_tunnel_holds_its_connection_until_it_ends_or_idles() {
    let limits = "limits: { max_connections: 1 }\nupstream: { read_timeout: 2s }\n";
    let (proxy, _b) = proxy_with(limits).await;
    let mut s = websocket(proxy.addr).await;
    echoes(&mut s, b"hello").await;
    let global = || async { crate::support::stats(&proxy).await["proxy"].clone() };
    assert_eq!(global().await["connections_open"], 1);
    // The one place under the limit is the tunnel's: another connection is closed at once.
    let mut other = TcpStream::connect(proxy.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let refused = tokio::time::timeout(Duration::from_secs(5), other.read(&mut byte)).await;
    assert!(matches!(refused, Ok(Ok(0) | Err(_))), "{refused:?}");
    assert_eq!(global().await["connections_rejected"], 1);
    // Bytes keep it open past read_timeout; quiet closes it.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        echoes(&mut s, b"still here").await;
    }
    // The proxy's last byte went out after this; the tunnel cannot close before 2 s from it.
    let started = std::time::Instant::now();
    echoes(&mut s, b"last").await;
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1990),
        "{:?}",
        started.elapsed()
    );
    crate::support::eventually(Duration::from_secs(5), || async {
        global().await["connections_open"] == 0
    })
    .await;
    proxy.stop().await;
}

/// A drain waits for a tunnel as for any request in flight, up to `drain_timeout`.
/// A tunnel whose client keeps sending but takes nothing of what comes back (here the echo
/// of what it sends) is closed once `send_timeout` passes with its bytes waiting, however long
/// `read_timeout` is, as nginx's `send_timeout` on an upgraded connection.
#[tokio::test]
async fn a_tunnel_whose_client_takes_nothing_is_closed_after_send_timeout() {
    let (proxy, _b) =
        proxy_with("limits: { send_timeout: 300ms }\nupstream: { read_timeout: 30s }\n").await;
    let mut s = websocket(proxy.addr).await;
    let chunk = vec![b'x'; 64 * 1024];
    let writing = async { while s.write_all(&chunk).await.is_ok() {} };
    tokio::time::timeout(Duration::from_secs(10), writing)
        .await
        .expect("the tunnel was closed under the writes");
    proxy.stop().await;
}

#[tokio::test]
async fn a_drain_waits_for_an_open_tunnel() {
    let (mut proxy, _b) = proxy_with("drain_timeout: 20s\n").await;
    let mut s = websocket(proxy.addr).await;
    let stopping = proxy.begin_stop();
    // Well past the listeners' close, the tunnel still carries bytes and holds the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    echoes(&mut s, b"draining").await;
    assert!(
        !stopping.is_finished(),
        "the drain did not wait for the tunnel"
    );
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the drain ends when the tunnel does")
        .unwrap()
        .unwrap();
}

struct Certs {
    dir: std::path::PathBuf,
    a: rcgen::CertifiedKey<rcgen::KeyPair>,
    b: rcgen::CertifiedKey<rcgen::KeyPair>,
}

fn certs() -> Certs {
    let dir = std::env::temp_dir().join(format!(
        "fleet-proxy-tls-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).unwrap();
    for (name, c) in [("a", &a), ("b", &b)] {
        std::fs::write(dir.join(format!("{name}.pem")), c.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{name}.key")),
            c.signing_key.serialize_pem(),
        )
        .unwrap();
    }
    Certs { dir, a, b }
}

fn tls_client(certs: &Certs, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    connector(
        vec![certs.a.cert.der().clone(), certs.b.cert.der().clone()],
        alpn,
    )
}

fn connector(
    trusted: Vec<rustls_pki_types::CertificateDer<'static>>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_picks_the_certificate_by_sni_and_negotiates_h2_by_alpn() {
    let certs = certs();
    let b = [
        Backend::start("stable", Mode::Normal).await,
        Backend::start("canary", Mode::Normal).await,
        Backend::start("shadow", Mode::Normal).await,
    ];
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: [ {{ cert: a.pem, key: a.key }}, {{ cert: b.pem, key: b.key }} ]\nadmin: 127.0.0.1:0\n{}routes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        tracks(b[0].addr, b[1].addr, b[2].addr)
    );
    let proxy = Proxy::start_in(&yaml, &certs.dir, None).await;
    for (name, want) in [("a.test", &certs.a), ("b.test", &certs.b)] {
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let tls = tls_client(&certs, &[b"http/1.1"])
            .connect(name.try_into().unwrap(), tcp)
            .await
            .unwrap();
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(served.as_ref(), want.cert.der().as_ref(), "{name}");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(
                Request::get("/")
                    .header("host", name)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-seen-proto"], "https");
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"stable"
        );
    }
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let tls = tls_client(&certs, &[b"h2", b"http/1.1"])
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("https://a.test/")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

/// A client that sends no name (an IP address is never sent as SNI) gets the first
/// certificate; one that offers no protocol the proxy speaks is refused in the handshake
/// (RFC 7301 §3.2), not answered in a protocol it did not ask for.
#[tokio::test]
async fn tls_without_sni_gets_the_first_certificate_and_a_foreign_alpn_is_refused() {
    let certs = certs();
    // The first certificate is valid for the address the client dials.
    let first = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(certs.dir.join("ip.pem"), first.cert.pem()).unwrap();
    std::fs::write(certs.dir.join("ip.key"), first.signing_key.serialize_pem()).unwrap();
    let stable = Backend::start("stable", Mode::Normal).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: [ {{ cert: ip.pem, key: ip.key }}, {{ cert: a.pem, key: a.key }} ]\nadmin: 127.0.0.1:0\ntracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        stable.addr
    );
    let proxy = Proxy::start_in(&yaml, &certs.dir, None).await;
    let trusted = vec![first.cert.der().clone(), certs.a.cert.der().clone()];
    let ip = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let tls = connector(trusted.clone(), &[b"http/1.1"])
        .connect(ip.clone(), tcp)
        .await
        .expect("the first certificate, valid for the address");
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        first.cert.der().as_ref()
    );
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let refused = connector(trusted, &[b"spdy/3"]).connect(ip, tcp).await;
    let error = refused.expect_err("no protocol in common").to_string();
    assert!(error.contains("NoApplicationProtocol"), "{error}");
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

/// A client that chose HTTP/2 by ALPN still owes the preface within `header_read_timeout`,
/// as every other client owes its first bytes: one that finishes the handshake and sends
/// nothing is closed then, not after two idle timeouts.
#[tokio::test]
async fn a_tls_client_that_chose_http2_and_sends_nothing_is_closed_after_header_read_timeout() {
    let certs = certs();
    let stable = Backend::start("stable", Mode::Normal).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ cert: a.pem, key: a.key }}\nadmin: 127.0.0.1:0\nlimits: {{ header_read_timeout: 300ms }}\ntracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n",
        stable.addr
    );
    let proxy = Proxy::start_in(&yaml, &certs.dir, None).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = tls_client(&certs, &[b"h2"])
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let (certs, stable, _, proxy) = watching_a_tls_file().await;
    let trusted = std::sync::Mutex::new(vec![certs.a.cert.der().clone()]);
    let served = || served_cert(proxy.addr, trusted.lock().unwrap().clone());
    assert_eq!(
        served().await.unwrap().as_ref(),
        certs.a.cert.der().as_ref()
    );
    // A table put since, which a renewed certificate alone must leave in force.
    let (status, _) = crate::support::put(
        &proxy.admin_url("/routes"),
        &format!(
            r#"{{"tracks":{{"stable":{{"backends":["{}"]}}}},"routes":[{{"name":"pushed","split":{{"stable":10000}}}}]}}"#,
            stable.addr
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let renewed = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    let (key, renewed) = (renewed.signing_key, renewed.cert);
    trusted.lock().unwrap().push(renewed.der().clone());
    std::fs::write(certs.dir.join("a.key"), key.serialize_pem()).unwrap();
    std::fs::write(certs.dir.join("a.pem"), renewed.pem()).unwrap();
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        served()
            .await
            .is_some_and(|c| c.as_ref() == renewed.der().as_ref())
    })
    .await;
    let (_, _, table) = crate::support::get(&proxy.admin_url("/routes"))
        .await
        .unwrap();
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table["version"], 2, "{table}");
    assert_eq!(table["routes"][0]["name"], "pushed", "{table}");
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

/// The certificate a TLS listener serves for `a.test`, if one of `roots` vouches for it.
async fn served_cert(
    addr: std::net::SocketAddr,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
) -> Option<rustls_pki_types::CertificateDer<'static>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(roots, &[b"http/1.1"])
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].clone())
}

/// A config whose one TLS listener serves `{name}.pem`, watched every 20 ms, with one
/// `stable` track at `stable`.
fn watched_tls(name: &str, stable: std::net::SocketAddr) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ cert: {name}.pem, key: {name}.key }}\nadmin: 127.0.0.1:0\nwatch_interval: 20ms\ntracks:\n  stable: {{ backends: [\"{stable}\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
    )
}

/// A new certificate for `a.test` as `{name}.key` then `{name}.pem` in `dir`.
fn write_cert(dir: &std::path::Path, name: &str) -> rustls_pki_types::CertificateDer<'static> {
    let c = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    std::fs::write(
        dir.join(format!("{name}.key")),
        c.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), c.cert.pem()).unwrap();
    c.cert.der().clone()
}

/// A proxy started from a file it watches, `proxy.yaml` in a directory of certificates,
/// serving `a.pem` on its TLS listener; with that file and the backend.
async fn watching_a_tls_file() -> (Certs, Backend, std::path::PathBuf, Proxy) {
    let certs = certs();
    let stable = Backend::start("stable", Mode::Normal).await;
    let config = certs.dir.join("proxy.yaml");
    let yaml = watched_tls("a", stable.addr);
    std::fs::write(&config, &yaml).unwrap();
    let proxy = Proxy::start_in(&yaml, &certs.dir, Some(&config)).await;
    (certs, stable, config, proxy)
}

#[tokio::test]
async fn a_certificate_named_after_start_is_watched_too() {
    let (certs, stable, config, proxy) = watching_a_tls_file().await;
    let yaml = |name: &str| watched_tls(name, stable.addr);
    let write = |name: &str| write_cert(&certs.dir, name);
    // The file now names other files; then those are renewed in place.
    let second = write("c");
    std::fs::write(&config, yaml("c")).unwrap();
    let third = {
        crate::support::eventually(std::time::Duration::from_secs(10), || async {
            served_cert(proxy.addr, vec![second.clone()]).await.as_ref() == Some(&second)
        })
        .await;
        write("c")
    };
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        served_cert(proxy.addr, vec![third.clone()]).await.as_ref() == Some(&third)
    })
    .await;
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

#[tokio::test]
async fn a_file_refused_for_a_certificate_not_there_yet_is_read_again_when_it_comes() {
    let (certs, stable, config, proxy) = watching_a_tls_file().await;
    let yaml = |name: &str| watched_tls(name, stable.addr);
    // The file now names a certificate that is not there yet: refused, the old one serves.
    // Written whole, by a rename: a tick may not see it half written.
    let next = certs.dir.join("proxy.yaml.next");
    std::fs::write(&next, yaml("d")).unwrap();
    std::fs::rename(&next, &config).unwrap();
    let rejected = || async {
        let stats = crate::support::stats(&proxy).await;
        stats["proxy"]["table_rejected"].as_u64().unwrap()
    };
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        rejected().await == 1
    })
    .await;
    let a = certs.a.cert.der().clone();
    assert_eq!(served_cert(proxy.addr, vec![a.clone()]).await, Some(a));
    // Watching for it reads nothing again while nothing changes: ten ticks, no new refusal.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(rejected().await, 1);
    // It comes, key first, as a certificate manager writes it; the file is not touched again.
    let d = write_cert(&certs.dir, "d");
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        served_cert(proxy.addr, vec![d.clone()]).await.as_ref() == Some(&d)
    })
    .await;
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

#[tokio::test]
async fn a_listener_the_file_moves_or_strips_of_tls_keeps_its_certificates_until_a_restart() {
    let (certs, stable, config, proxy) = watching_a_tls_file().await;
    let a = certs.a.cert.der().clone();
    let c = write_cert(&certs.dir, "c");
    let admin = proxy.admin_url("/routes");
    let admin = admin.as_str();
    let applied = move |route: &'static str| async move {
        let (_, _, table) = crate::support::get(admin).await.unwrap();
        let table: serde_json::Value = serde_json::from_str(&table).unwrap();
        table["routes"][0]["name"] == route
    };
    let listeners = [
        // TLS taken off the listener (to be done by a load balancer after the next restart).
        "  - 127.0.0.1:0\n",
        // A plain listener written first: the TLS one is second, now with another certificate.
        "  - 127.0.0.1:0\n  - addr: 127.0.0.1:0\n    tls: { cert: c.pem, key: c.key }\n",
    ];
    for (listen, route) in listeners.into_iter().zip(["plain", "second"]) {
        let yaml = format!(
            "listen:\n{listen}admin: 127.0.0.1:0\nwatch_interval: 20ms\ntracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ name: {route}, split: {{ stable: 10000 }} }}\n",
            stable.addr
        );
        let next = certs.dir.join("proxy.yaml.next");
        std::fs::write(&next, yaml).unwrap();
        std::fs::rename(&next, &config).unwrap();
        crate::support::eventually(std::time::Duration::from_secs(10), || applied(route)).await;
        // The table is the file's; the listener bound at start still serves its certificate,
        // neither none (every handshake refused) nor the certificate of another listener.
        let served = served_cert(proxy.addr, vec![a.clone(), c.clone()]).await;
        assert_eq!(served.as_ref(), Some(&a), "after the {route} file");
    }
    proxy.stop().await;
    std::fs::remove_dir_all(&certs.dir).unwrap();
}

#[tokio::test]
async fn bodies_stream_both_ways_without_being_buffered() {
    let (proxy, _b) = proxy_with("").await;
    // Response: the first chunk arrives while the backend still holds back the second.
    let started = std::time::Instant::now();
    let resp = crate::support::client()
        .request(
            Request::get(proxy.url("/drip"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "the first chunk waited for the second"
    );
    // Request: each chunk comes back before the next one is sent.
    let (tx, req_body) = crate::support::ChanBody::new();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<crate::support::ChanBody>();
    let req = Request::post(proxy.url("/echo")).body(req_body).unwrap();
    let sending = tokio::spawn(async move { client.request(req).await });
    tx.send(Bytes::from_static(b"ping 1")).await.unwrap();
    let mut echo = sending.await.unwrap().unwrap().into_body();
    for i in 1..=3 {
        let got = echo.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(got, Bytes::from(format!("ping {i}")));
        if i < 3 {
            tx.send(Bytes::from(format!("ping {}", i + 1)))
                .await
                .unwrap();
        }
    }
    drop(tx);
    assert!(echo.frame().await.is_none());
    proxy.stop().await;
}
