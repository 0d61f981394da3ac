//! How the agent and fleetctl reach the controller: plain HTTP/2 for `http://` URLs, TLS for
//! `https://` ones (rustls), trusting the CA given or else the system's roots, and showing a
//! client certificate when one is given, for a controller that asks for one (mutual TLS).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pem;

/// What to do when the controller cannot be reached or lets the client in, told with every
/// such failure.
pub const HINT: &str = "set --controller or FLEET_CONTROLLER; for TLS, --ca, and for a controller that asks for client certificates, --tls-cert and --tls-key";

/// The TLS side of a connection to the controller, as the flags give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file of the CA that signed the controller's certificate (`--ca`).
    pub ca: Option<PathBuf>,
    /// PEM files of this client's certificate and key (`--tls-cert`, `--tls-key`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The flags that give these settings to fleetctl or fleet-agent (`--ca FILE`, …), those
    /// set only.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let flags = [
            ("--ca", &self.ca),
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
        ];
        let set = flags
            .into_iter()
            .filter_map(|(f, p)| Some((f, p.as_ref()?)));
        set.flat_map(|(flag, path)| [flag.into(), path.into()])
            .collect()
    }
}

/// `said` and the errors beneath it, each said once: a transport error's sources often
/// repeat its words ("tcp connect error: tcp connect error: …").
pub fn said_once(
    mut said: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(e) = source {
        let words = e.to_string();
        if !said.contains(&words) {
            said = format!("{said}: {words}");
        }
        source = e.source();
    }
    said
}

/// A channel to the controller at `url`, connected.
pub async fn channel(url: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    Ok(dial(url, tls).await?)
}

/// [`channel`], telling a controller away for a moment from settings that cannot work: the
/// error says whether another try may get through ([`Unreached::passing`]).
pub async fn dial(url: &str, tls: &ClientTls) -> Result<Channel, Unreached> {
    let endpoint = endpoint(url, tls).map_err(|e| Unreached {
        said: format!("{e:#}"),
        passing: false,
    })?;
    // The endpoint's own timeout covers the TCP connect only, not the TLS handshake after.
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(Unreached {
            said: format!(
                "cannot reach the controller at {url} ({}): {}",
                match not_tls(&e) {
                    true =>
                        "what answers there does not speak TLS: for a controller without TLS, use an http:// URL; else check the port",
                    false => HINT,
                },
                said_once(e.to_string(), std::error::Error::source(&e))
            ),
            passing: passing(&e),
        }),
        Err(_) => Err(Unreached {
            said: format!(
                "cannot reach the controller at {url}: no connection within {CONNECT_TIMEOUT:?} ({HINT})"
            ),
            passing: true,
        }),
    }
}

/// Why the controller could not be dialled.
#[derive(Debug)]
pub struct Unreached {
    said: String,
    /// Another try may get through: the connection was refused, reset, closed or timed out
    /// (a controller restarting, or handing its lead over), rather than a setting that
    /// cannot work (a bad URL or file, a name that does not resolve, a certificate refused).
    pub passing: bool,
}

impl std::fmt::Display for Unreached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.said)
    }
}

impl std::error::Error for Unreached {}

/// Whether `error`, by itself or an error beneath it, is a connection that failed the way a
/// controller away for a moment makes it fail: refused, reset, closed early or timed out
/// (its pings unanswered, too), or a call the controller did not take up as it stopped
/// (HTTP/2 `REFUSED_STREAM`, or a `GOAWAY` without error). A TLS failure is not (rustls's
/// errors come as `InvalidData`; a controller without TLS, dialled over `https://`, sends its
/// HTTP/2 SETTINGS frame, which rustls finds is not TLS), nor a name not resolved. A
/// connection cut during the TLS handshake is.
pub fn passing(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    for e in chain(error) {
        if let Some(io) = io_error(e) {
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | NotConnected
                    | UnexpectedEof
                    | TimedOut
            );
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_closed() || h.is_incomplete_message() || h.is_canceled() || h.is_timeout())
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return reason == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && reason == Some(h2::Reason::NO_ERROR));
        }
    }
    false
}

/// `error` and every error beneath it, in order.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Every error beneath `s`, in order.
fn beneath(s: &tonic::Status) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::error::Error::source(s).into_iter().flat_map(chain)
}

/// The io error `e` is or holds: h2 keeps the io error it failed with beneath it, without
/// giving it as its source.
fn io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    (e.downcast_ref::<std::io::Error>())
        .or_else(|| e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io))
}

/// The rustls error `e` is, or that its io error holds (rustls's errors come as
/// `InvalidData`).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    (io_error(e).and_then(|io| io.get_ref()))
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .or_else(|| e.downcast_ref::<rustls::Error>())
}

/// Whether a call failed in TLS (a certificate refused by either side: expired, revoked,
/// from another CA, missing), by a [`rustls::Error`] beneath it, or because a controller that
/// speaks TLS was dialled over `http://` ([`spoke_tls`]). Not a passing failure: a stream
/// that ends so is not followed again, as a call so refused is not made again.
pub fn tls_failed(s: &tonic::Status) -> bool {
    spoke_tls(s)
        || beneath(s).any(|e| {
            // Beneath hyper's "connection error" the alert may come as words only.
            let said = e.to_string();
            let alert =
                said.contains("received fatal alert") || said.contains("invalid peer certificate");
            alert || rustls_error(e).is_some()
        })
}

/// What to do when [`spoke_tls`]: the URL's scheme.
pub const SPOKE_TLS: &str = "what answers there does not speak HTTP/2 in the clear, most likely a controller that speaks TLS: write the controller URL as https://…, with --ca (for a controller that asks for client certificates, also --tls-cert and --tls-key); else check the host and port";

/// Whether a call over `http://` was cut because what answered does not speak HTTP/2 in the
/// clear, most likely because it speaks TLS: its first bytes, a TLS record (the alert a TLS
/// server sends on a client that does not speak TLS: `15 03 03 00 02 …`), read as an HTTP/2
/// frame's header, make a frame larger than any allowed (h2 ends the connection with
/// `FRAME_SIZE_ERROR`, of its own accord). An HTTP/1.1-only server's answer does the same.
/// Either way another try would not change it.
pub fn spoke_tls(s: &tonic::Status) -> bool {
    let h2 = beneath(s).find_map(|e| e.downcast_ref::<h2::Error>());
    h2.is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR) && h2.is_go_away() && !h2.is_remote()
    })
}

/// Whether `error`, by itself or an error beneath it, is a TLS handshake answered with bytes
/// that are not TLS: a controller without TLS dialled over `https://` (its HTTP/2 server sends
/// its SETTINGS frame first), or another server.
fn not_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    chain(error).find_map(rustls_error).is_some_and(|tls| {
        matches!(
            tls,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
        )
    })
}

/// Whether a call that failed with `s` may be made again once the controller is back: the
/// controller said it is unavailable (stopping, starting over), or the connection failed as
/// [`passing`] says. Not a refusal, nor a call cut by TLS.
pub fn call_passing(s: &tonic::Status) -> bool {
    match std::error::Error::source(s) {
        Some(below) => passing(below),
        None => s.code() == tonic::Code::Unavailable,
    }
}

/// Whether `s` says that what answered does not speak gRPC at all (a web server, a proxy, an
/// admin port): an answer without gRPC's framing or status. An answer of 502–504 is left out:
/// a load balancer in front of a controller that is away says so.
pub fn not_grpc(s: &tonic::Status) -> bool {
    let said = s.message();
    let balancer = ["502", "503", "504"]
        .iter()
        .any(|code| said.contains(&format!("with status: {code} ")));
    let framing =
        said.starts_with("protocol error: received message with invalid compression flag");
    let mapped = said.starts_with("grpc-status header missing, mapped from HTTP status code")
        && s.code() != tonic::Code::Unavailable;
    (framing && !balancer) || mapped
}

/// What to say of a call answered by something that does not speak gRPC ([`not_grpc`]).
pub const NOT_GRPC: &str = "what answers at the controller URL does not speak gRPC: check the URL's host and port (the controller's gRPC listener, 7070 by default; not a proxy's or an admin port)";

/// A connection to the controller is pinged every this long (HTTP/2 PING), and dropped when a
/// ping goes unanswered for as long: a path that died without a word (a host gone, a
/// firewall or NAT that forgot the flow) is noticed in seconds, not after TCP's minutes of
/// retries, so that an agent dials again and hears the latest desired state (an abort, say).
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long dialling the controller may take, TLS handshake included ([`channel`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint for `url`, TLS set up as `tls` says; every file is read here, so a wrong path
/// is told before any connection is tried.
pub fn endpoint(url: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    endpoint_pinging(url, tls, KEEPALIVE, KEEPALIVE)
}

/// [`endpoint`], pinging every `keepalive` and waiting `timeout` for the answer (tests use
/// short ones).
pub fn endpoint_pinging(
    url: &str,
    tls: &ClientTls,
    keepalive: Duration,
    timeout: Duration,
) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| {
            format!("controller URL \"{url}\" is not a URL; write it as https://host:7070")
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true);
    http_url(url, &CONTROLLER_URL)?;
    if endpoint.uri().scheme_str() != Some("https") {
        anyhow::ensure!(
            !tls.is_set(),
            "--ca, --tls-cert and --tls-key are for TLS, but the controller URL \"{url}\" is not https://: write it as https://…"
        );
        return Ok(endpoint);
    }
    let config = tls_config(tls, &CONTROLLER_FLAGS)?;
    let without_ca = tls.ca.is_none();
    endpoint.tls_config(config).with_context(|| match without_ca {
        true => format!("setting up TLS for {url} with the system's CA roots (give --ca to trust a CA of your own)"),
        false => format!("setting up TLS for {url}"),
    })
}

/// What an http:// or https:// URL names, for [`http_url`]'s errors.
pub struct UrlOf {
    /// How the URL was given: `controller URL`, or a flag.
    pub given_as: &'static str,
    /// What listens there, with its article.
    pub server: &'static str,
    /// Its usual port, for the fix.
    pub port: u16,
    /// Whether the URL must name the port (else it is the scheme's, 80 or 443).
    pub needs_port: bool,
}

const CONTROLLER_URL: UrlOf = UrlOf {
    given_as: "controller URL",
    server: "a controller",
    port: 7070,
    needs_port: false,
};

/// Checks that `url` is an http:// or https:// URL with a host, and a port (if it gives
/// one) that a server could listen on; the error names it as `of` says, and the fix.
pub fn http_url(url: &str, of: &UrlOf) -> anyhow::Result<()> {
    let UrlOf {
        given_as,
        server,
        port: usual,
        needs_port,
    } = of;
    let uri = url.parse::<tonic::transport::Uri>().ok();
    let uri = uri.filter(|u| matches!(u.scheme_str(), Some("http" | "https")));
    anyhow::ensure!(
        uri.as_ref().is_some_and(|u| u.host().is_some()),
        "{given_as} \"{url}\" is not an http:// or https:// URL with a host; write it as \
         https://host:{usual} (http:// for {server} without TLS)"
    );
    // A port past 65535 is taken by the parser, and would be tried until the retries end.
    let authority = uri.as_ref().and_then(|u| u.authority()).map(|a| a.as_str());
    let port = authority
        .and_then(|a| a.rsplit_once(':'))
        .map(|(_, port)| port);
    // The fix keeps what was right: the scheme, and the host.
    let scheme = uri.as_ref().and_then(|u| u.scheme_str()).unwrap_or("https");
    let host = uri.as_ref().and_then(|u| u.host()).unwrap_or("host");
    anyhow::ensure!(
        port.is_none_or(|p| p.contains(']') || p.parse::<u16>().is_ok_and(|p| p > 0)),
        "{given_as} \"{url}\" has no port {server} could listen on (1 to 65535); write it as \
         {scheme}://{host}:{usual}, say"
    );
    anyhow::ensure!(
        !needs_port || uri.as_ref().is_some_and(|u| u.port().is_some()),
        "{given_as} \"{url}\" names no port: write it as {scheme}://{host}:{usual}, say"
    );
    Ok(())
}

/// The flags that give a [`ClientTls`]'s files, to name them in errors.
pub struct TlsFlags {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

/// fleetctl's and the agent's flags for reaching the controller.
pub const CONTROLLER_FLAGS: TlsFlags = TlsFlags {
    ca: "--ca",
    cert: "--tls-cert",
    key: "--tls-key",
};

/// The TLS settings `tls` gives: its CA, or else the system's roots, and its certificate and
/// key, if any. Every file is read and checked here; an error names its flag (`flags`).
pub fn tls_config(tls: &ClientTls, flags: &TlsFlags) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(pem::certificates(ca, flags.ca)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(
                pem::certificates(cert, flags.cert)?,
                pem::private_key(key, flags.key)?,
            );
            Ok(config.identity(identity))
        }
        (None, None) => Ok(config),
        (Some(_), None) => {
            anyhow::bail!(
                "{} needs {}: give the key of the certificate",
                flags.cert,
                flags.key
            )
        }
        (None, Some(_)) => {
            anyhow::bail!(
                "{} needs {}: give the certificate of the key",
                flags.key,
                flags.cert
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cut_by_a_refused_certificate_is_told_apart_from_a_cut_connection() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let cut_by_tls = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let s = tonic::Status::from_error(Box::new(cut_by_tls));
        assert!(tls_failed(&s), "{s:?}");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let s = tonic::Status::from_error(Box::new(reset));
        assert!(!tls_failed(&s), "{s:?}");
        assert!(!tls_failed(&tonic::Status::unavailable("stopping")));
    }

    /// Test-only: an error saying `said`, over `below`.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Test-only: a web server on 127.0.0.1 that answers every request `status` with a text
    /// body, over HTTP/1.1 or h2c; its URL.
    async fn web_server(status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = move |_| async move {
                    let mut r = hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"hello from v1\n"),
                    ));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(r)
                };
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                tokio::spawn(async move {
                    let _ = builder
                        .serve_connection(io, hyper::service::service_fn(answer))
                        .await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn an_answer_that_is_not_grpc_is_told_apart_and_a_balancers_503_is_not() {
        for (status, not) in [(200, true), (404, true), (405, true), (503, false)] {
            let url = web_server(status).await;
            let channel = channel(&url, &ClientTls::default()).await.unwrap();
            let mut client = crate::v1::release_service_client::ReleaseServiceClient::new(channel);
            let request = crate::v1::ListReleasesRequest::default();
            let s = client.list_releases(request).await.unwrap_err();
            assert_eq!(not_grpc(&s), not, "{status}: {s:?}");
        }
    }

    #[test]
    fn a_controller_url_is_http_or_https_with_a_host() {
        let plain = ClientTls::default();
        for url in [
            "http://127.0.0.1:7070",
            "https://controller.example:7070",
            "http://[::1]:7070",
            "http://[::1]",
            "https://controller.example",
        ] {
            assert!(endpoint(url, &plain).is_ok(), "{url}");
        }
        for (url, fix) in [
            ("http://127.0.0.1:99999", "http://127.0.0.1:7070"),
            ("http://127.0.0.1:0", "http://127.0.0.1:7070"),
            ("http://[::1]:70000", "http://[::1]:7070"),
            (
                "https://controller.example:0",
                "https://controller.example:7070",
            ),
        ] {
            let e = endpoint(url, &plain).err().map(|e| e.to_string());
            let said = format!("controller URL \"{url}\" has no port a controller could listen on");
            let fixed = format!("write it as {fix}, say");
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.starts_with(&said) && e.ends_with(&fixed)),
                "{url}: {e:?}"
            );
        }
        for url in [
            "ftp://127.0.0.1:7070",
            "localhost:7070",
            "unix:///run/fleet.sock",
        ] {
            let e = endpoint(url, &plain).err().map(|e| e.to_string());
            let said = format!("controller URL \"{url}\" is not an http:// or https:// URL");
            assert!(
                e.as_deref().is_some_and(|e| e.starts_with(&said)),
                "{url}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_controller_away_is_dialled_again_and_one_that_cannot_be_spoken_to_is_not() {
        let url = |scheme: &str, listener: &tokio::net::TcpListener| {
            let port = listener.local_addr().unwrap().port();
            format!("{scheme}://localhost:{port}")
        };
        // A CA of the test's own: nothing depends on the machine's roots.
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let tls = ClientTls {
            ca: Some(ca_file),
            ..ClientTls::default()
        };
        // Nothing listens: refused.
        let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nothing = url("http", &free);
        drop(free);
        let refused = dial(&nothing, &ClientTls::default()).await.unwrap_err();
        assert!(refused.passing, "{refused}");
        assert!(
            refused.to_string().contains("Connection refused"),
            "{refused}"
        );
        // Each connection closed unread (a standby that knows no leader): the handshake cut.
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = url("https", &closing);
        tokio::spawn(async move {
            while let Ok((connection, _)) = closing.accept().await {
                drop(connection);
            }
        });
        let cut = dial(&closed, &tls).await.unwrap_err();
        assert!(cut.passing, "{cut}");
        // A server that answers, but not with TLS: another try would only fail the same way.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let answering = url("https", &plain);
        tokio::spawn(async move {
            while let Ok((mut connection, _)) = plain.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = connection
                    .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    .await;
            }
        });
        let not_tls = dial(&answering, &tls).await.unwrap_err();
        assert!(!not_tls.passing, "{not_tls}");
        assert!(
            not_tls
                .to_string()
                .contains("what answers there does not speak TLS"),
            "{not_tls}"
        );
        // A URL that cannot work.
        let bad = dial("no url", &ClientTls::default()).await.unwrap_err();
        assert!(!bad.passing, "{bad}");
    }

    #[test]
    fn a_call_is_made_again_after_a_cut_connection_or_a_controller_unavailable_only() {
        let with = |code, below: std::io::Error| {
            let mut s = tonic::Status::new(code, "failed");
            s.set_source(std::sync::Arc::new(below));
            s
        };
        let io = std::io::Error::from;
        use std::io::ErrorKind::{ConnectionReset, InvalidData};
        use tonic::Code::{Internal, NotFound, Unavailable, Unknown};
        assert!(call_passing(&tonic::Status::new(
            Unavailable,
            "starting over"
        )));
        assert!(call_passing(&with(Unknown, io(ConnectionReset))));
        assert!(call_passing(&with(Unavailable, io(ConnectionReset))));
        // A stream the controller refused as it stopped, or a connection h2 lost.
        let h2 = |e: h2::Error| {
            let mut s = tonic::Status::new(Unavailable, "failed");
            s.set_source(std::sync::Arc::new(e));
            s
        };
        assert!(call_passing(&h2(h2::Reason::REFUSED_STREAM.into())));
        assert!(!call_passing(&h2(h2::Reason::PROTOCOL_ERROR.into())));
        // A TLS alert (rustls's errors come as InvalidData), or an answer.
        assert!(!call_passing(&with(Unavailable, io(InvalidData))));
        assert!(!call_passing(&tonic::Status::new(Internal, "failed")));
        assert!(!call_passing(&tonic::Status::new(NotFound, "no release")));
    }

    #[test]
    fn each_cause_is_said_once() {
        let refused = Layer("Connection refused (os error 111)", None);
        let inner = Layer("tcp connect error", Some(Box::new(refused)));
        let outer = Layer("tcp connect error", Some(Box::new(inner)));
        assert_eq!(
            said_once("transport error".into(), Some(&outer)),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }
}
