//! The gRPC listener's TLS (rustls), always mutual: the controller's certificate, and only
//! clients showing a certificate the client CA signed, and not revoked by `--client-crl`, get
//! in: the agents and the release tooling, not whoever reaches the port. What each may do then
//! is [`crate::identity`]'s.
//!
//! The files are read again whenever one changes ([`Reloader`]), so a renewed certificate, a
//! new CA bundle or a new revocation list takes effect without a restart: from the next
//! handshake on, and for the connections open, whose clients' certificates are checked again
//! against the new settings; those that fail (a revoked agent's) are closed, the rest carry on.
//! Settings that do not work together are reported, naming the flag, and the last good ones
//! stay in force.
//!
//! Revocation: a client's certificate is looked up in the lists of the CA that signed it; only
//! the client's own certificate is (not intermediate CAs), and a CA given no list has none of
//! its certificates revoked. Every list must come from one of the client CAs.

mod accept;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use fleet_proto::pem;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

pub(crate) use accept::RELOAD_EVERY;
pub use accept::{Peer, Reloader, Status};

/// The files of the listener's TLS settings, by flag.
#[derive(Clone, Debug)]
pub struct Files {
    /// `--tls-cert`: the controller's certificate chain.
    pub cert: PathBuf,
    /// `--tls-key`: its private key.
    pub key: PathBuf,
    /// `--client-ca`: the CA (or CAs) whose certificates clients must show.
    pub client_ca: PathBuf,
    /// `--client-crl`: revocation lists of the client CAs, if any.
    pub client_crl: Option<PathBuf>,
}

/// The listener's settings as read from the [`Files`].
struct Settings {
    config: Arc<ServerConfig>,
    /// How the clients' certificates are checked: again, for the connections open, when the
    /// settings change.
    verifier: Arc<dyn ClientCertVerifier>,
    /// When the controller's certificate expires, in seconds since the Unix epoch.
    expiry: i64,
}

/// What a file was when last looked at: inode (a Kubernetes Secret's files change by a
/// symbolic link moving to new ones), size, modification time and status change time (which
/// a copy that keeps the modification time still moves); `None` when missing.
pub(crate) type Stamp = Option<(u64, u64, SystemTime, (i64, i64))>;

/// The stamps of the files at `paths`, to tell a change.
pub(crate) fn stamps<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Vec<Stamp> {
    paths.into_iter().map(|path| stamp(path)).collect()
}

/// The stamp of the file at `path`.
fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.modified().ok()?,
        (m.ctime(), m.ctime_nsec()),
    ))
}

impl Files {
    /// Reads every file and puts the settings together, naming the flag of a wrong one.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        self.load().map(|settings| settings.config)
    }

    /// [`Files::server_config`], with its parts that outlive a handshake.
    fn load(&self) -> anyhow::Result<Settings> {
        let chain = pem::certificate_chain(&self.cert, "--tls-cert")?;
        let expiry = not_after(&chain[0])
            .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", self.cert.display()))?;
        let key = pem::private_key_der(&self.key, "--tls-key")?;
        let cas = pem::certificate_chain(&self.client_ca, "--client-ca")?;
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots.add(ca.clone()).with_context(|| {
                format!(
                    "--client-ca {}: not a CA certificate rustls can use",
                    self.client_ca.display()
                )
            })?;
        }
        let crls = match &self.client_crl {
            Some(path) => {
                let crls = pem::revocation_lists(path, "--client-crl")?;
                issued_by_the_cas(&crls, &cas, path)?;
                crls
            }
            None => Vec::new(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
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
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain, key)
            .with_context(|| {
                format!(
                    "--tls-cert {}, --tls-key {}: not a certificate and its key",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Settings {
            config: Arc::new(config),
            verifier,
            expiry,
        })
    }

    /// The files' stamps, to tell a change.
    fn stamps(&self) -> Vec<Stamp> {
        stamps(
            [&self.cert, &self.key, &self.client_ca]
                .into_iter()
                .chain(&self.client_crl),
        )
    }
}

/// Refuses a revocation list that none of the client CAs issued: given by mistake (another
/// CA's), it would revoke nothing while seeming to.
fn issued_by_the_cas(
    crls: &[CertificateRevocationListDer<'_>],
    cas: &[CertificateDer<'_>],
    path: &Path,
) -> anyhow::Result<()> {
    let subjects = cas
        .iter()
        .filter_map(|ca| x509_parser::parse_x509_certificate(ca).ok())
        .map(|(_, ca)| ca.subject().as_raw().to_vec())
        .collect::<Vec<_>>();
    for crl in crls {
        let (_, crl) = x509_parser::parse_x509_crl(crl)
            .map_err(|e| anyhow::anyhow!("--client-crl {}: {e}", path.display()))?;
        let issuer = crl.issuer();
        anyhow::ensure!(
            subjects.iter().any(|s| s == issuer.as_raw()),
            "--client-crl {}: a list issued by \"{issuer}\", which is none of --client-ca's CAs; \
             give the lists of the CAs that sign the clients' certificates",
            path.display()
        );
    }
    Ok(())
}

/// When the certificate `der` expires, in seconds since the Unix epoch.
fn not_after(der: &[u8]) -> Result<i64, x509_parser::nom::Err<x509_parser::error::X509Error>> {
    x509_parser::parse_x509_certificate(der).map(|(_, cert)| cert.validity().not_after.timestamp())
}
