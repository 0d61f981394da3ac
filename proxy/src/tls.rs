//! TLS termination: several certificates per listener, chosen by SNI; ALPN h2 and http/1.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Reads a PEM chain and key into a key rustls can serve.
pub fn load_cert(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key_der =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    // `from_der` also checks that the key belongs to the certificate.
    let key = CertifiedKey::from_der(chain, key_der, &provider).with_context(|| {
        format!(
            "{} and {} do not make a usable pair",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(key))
}

/// Builds the server config of one listener from its `(cert, key)` paths.
pub fn server_config(certs: &[(PathBuf, PathBuf)]) -> anyhow::Result<Arc<ServerConfig>> {
    let keys = certs
        .iter()
        .map(|(c, k)| load_cert(c, k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The first certificate valid for the client's SNI name; the first of all without one.
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello.server_name().and_then(|name| {
            let name = ServerName::try_from(name).ok()?;
            self.keys.iter().find(|k| {
                k.cert.first().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
        });
        by_name.or_else(|| self.keys.first()).cloned()
    }
}
