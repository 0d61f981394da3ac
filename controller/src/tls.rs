//! The gRPC listener's TLS (rustls), always mutual: the controller's certificate, and only
//! clients showing a certificate the client CA signed, and not revoked by `--client-crl`, get
//! in: the agents and the release tooling, not whoever reaches the port. What each may do then
//! is [`crate::identity`]'s.
//!
//! The files are read again whenever one changes ([`Reloader`]), so a renewed certificate, a
//! new CA bundle or a new revocation list takes effect without a restart: on the next
//! handshake, while open connections carry on. Settings that do not work together are
//! reported, naming the flag, and the last good ones stay in force.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use fleet_proto::pem;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How often the files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of the listener's TLS settings, by flag.
#[derive(Clone, Debug)]
pub struct Files {
    /// `--tls-cert`: the controller's certificate chain.
    pub cert: PathBuf,
    /// `--tls-key`: its private key.
    pub key: PathBuf,
    /// `--client-ca`: the CA (or CAs) whose certificates clients must show.
    pub client_ca: PathBuf,
    /// `--client-crl`: revocation lists of the client CA, if any.
    pub client_crl: Option<PathBuf>,
}

impl Files {
    /// Reads every file and puts the settings together, naming the flag of a wrong one.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let chain = pem::certificate_chain(&self.cert, "--tls-cert")?;
        let key = pem::private_key_der(&self.key, "--tls-key")?;
        let mut roots = RootCertStore::empty();
        for ca in pem::certificate_chain(&self.client_ca, "--client-ca")? {
            roots.add(ca).with_context(|| {
                format!(
                    "--client-ca {}: not a CA certificate rustls can use",
                    self.client_ca.display()
                )
            })?;
        }
        let crls = match &self.client_crl {
            Some(path) => pem::revocation_lists(path, "--client-crl")?,
            None => Vec::new(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .with_crls(crls)
            .build()
            .with_context(|| match &self.client_crl {
                Some(crl) => format!(
                    "--client-ca {}, --client-crl {}: not a CA and its revocation lists",
                    self.client_ca.display(),
                    crl.display()
                ),
                None => format!("--client-ca {}: not a usable CA", self.client_ca.display()),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .with_context(|| {
                format!(
                    "--tls-cert {}, --tls-key {}: not a certificate and its key",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// What the files are now, to tell a change: each one's inode (a Kubernetes Secret's files
    /// change by a symbolic link moving to new ones), size and modification time.
    fn stamp(&self) -> Vec<Option<(u64, u64, SystemTime)>> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .chain(&self.client_crl)
            .map(|path| {
                let m = std::fs::metadata(path).ok()?;
                Some((m.ino(), m.len(), m.modified().ok()?))
            })
            .collect()
    }
}

/// The settings in force, read again from their [`Files`] when they change.
pub struct Reloader {
    files: Files,
    stamp: Vec<Option<(u64, u64, SystemTime)>>,
    current: Arc<ArcSwap<ServerConfig>>,
}

impl Reloader {
    /// Reads the files; a wrong one is an error naming its flag.
    pub fn new(files: Files) -> anyhow::Result<Reloader> {
        let stamp = files.stamp();
        let config = files.server_config()?;
        Ok(Reloader {
            files,
            stamp,
            current: Arc::new(ArcSwap::new(config)),
        })
    }

    /// The settings in force, for handshakes.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reads the files again if any changed since last time: `Ok(true)` when new settings are
    /// now in force, `Ok(false)` when nothing changed, an error (the old settings staying)
    /// when the new files do not work; they are not read again until they change again.
    pub fn check(&mut self) -> anyhow::Result<bool> {
        let stamp = self.files.stamp();
        if stamp == self.stamp {
            return Ok(false);
        }
        self.stamp = stamp;
        self.current.store(self.files.server_config()?);
        Ok(true)
    }

    /// Accepts TLS connections on `listener` with the settings in force at each handshake,
    /// and looks at the files every [`RELOAD_EVERY`], until `shutdown` turns true.
    pub fn incoming(
        mut self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut reload = tokio::time::interval(RELOAD_EVERY);
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => {
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(handshake(TlsAcceptor::from(self.current()), tcp, tx.clone()));
                        }
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = reload.tick() => match self.check() {
                        Ok(true) => tracing::info!(files = ?self.files, "TLS files read again; new connections use them"),
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = format!("{e:#}"), "TLS files changed but do not work; the last good ones stay in force"),
                    },
                    _ = stopped(&mut shutdown) => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    to: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    let peer = tcp.peer_addr().ok();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let _ = to.send(Ok(tls)).await;
        }
        Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
    }
}
