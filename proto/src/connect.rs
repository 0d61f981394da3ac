//! How the agent and fleetctl reach the controller: plain HTTP/2 for `http://` URLs, TLS for
//! `https://` ones (rustls), trusting the CA given or else the system's roots, and showing a
//! client certificate when one is given, for a controller that asks for one (mutual TLS).

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
    fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// A channel to the controller at `url`, connected.
pub async fn channel(url: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    endpoint(url, tls)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the controller at {url}"))
}

/// The endpoint for `url`, TLS set up as `tls` says; every file is read here, so a wrong path
/// is told before any connection is tried.
pub fn endpoint(url: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned()).with_context(|| {
        format!("controller URL \"{url}\" is not a URL; write it as https://host:7070")
    })?;
    if !url.starts_with("https://") {
        anyhow::ensure!(
            !tls.is_set(),
            "--ca, --tls-cert and --tls-key are for TLS, but the controller URL \"{url}\" is not https://: write it as https://…"
        );
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "--ca")?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            config = config.identity(identity);
        }
        (None, None) => {}
        (Some(_), None) => {
            anyhow::bail!("--tls-cert needs --tls-key: give the key of the certificate")
        }
        (None, Some(_)) => {
            anyhow::bail!("--tls-key needs --tls-cert: give the certificate of the key")
        }
    }
    endpoint
        .tls_config(config)
        .with_context(|| format!("setting up TLS for {url}"))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))
}
