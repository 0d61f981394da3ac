//! The gRPC listener's TLS (rustls): the controller's certificate, and with a client CA,
//! mutual TLS, where only clients showing a certificate signed by that CA are let in: the
//! agents and the release tooling, not whoever reaches the port.

use std::path::Path;

use anyhow::Context;
use fleet_proto::pem;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The TLS settings of the gRPC listener from PEM files, with client certificates required
/// (mutual TLS: TLS that let in whoever reaches the port would protect nothing a release
/// needs). Each file is read and checked here, and the whole put together once, so that a
/// wrong one is told at start, naming its flag.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(
        pem::certificates(cert, "--tls-cert")?,
        pem::private_key(key, "--tls-key")?,
    );
    let ca = Certificate::from_pem(pem::certificates(client_ca, "--client-ca")?);
    let config = ServerTlsConfig::new().identity(identity).client_ca_root(ca);
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .with_context(|| {
            format!(
                "--tls-cert {}, --tls-key {}, --client-ca {}: not a certificate, its key and a CA that go together",
                cert.display(),
                key.display(),
                client_ca.display()
            )
        })?;
    Ok(config)
}
