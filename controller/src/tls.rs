//! The gRPC listener's TLS (rustls): the controller's certificate, and with a client CA,
//! mutual TLS, where only clients showing a certificate signed by that CA are let in: the
//! agents and the release tooling, not whoever reaches the port.

use std::path::Path;

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The TLS settings of the gRPC listener from PEM files; each is read here, so a wrong path
/// is told at start, naming its flag.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "--client-ca")?));
    }
    Ok(config)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))
}
