//! PEM files named by a flag, read and checked before anything uses them, so that a wrong one
//! is told at once, naming its flag and path: tonic takes PEM bytes as they are and would
//! skip what it cannot parse, or fail later without saying which file.

use std::path::Path;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The bytes of `path`, which holds one or more certificates and nothing unreadable.
pub fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path, flag)?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        cert.map_err(|e| anyhow::anyhow!("{flag} {}: {e:?}", path.display()))?;
        found += 1;
    }
    anyhow::ensure!(
        found > 0,
        "{flag} {}: no certificate in it (a PEM file with -----BEGIN CERTIFICATE-----)",
        path.display()
    );
    Ok(bytes)
}

/// The bytes of `path`, which holds a private key.
pub fn private_key(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path, flag)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: no private key in it (a PEM file with -----BEGIN PRIVATE KEY-----): {e:?}",
            path.display()
        )
    })?;
    Ok(bytes)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))
}
