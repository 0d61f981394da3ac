//! PEM files named by a flag, read and checked before anything uses them, so that a wrong one
//! is told at once, naming its flag and path: tonic takes PEM bytes as they are and would
//! skip what it cannot parse, or fail later without saying which file.

use std::path::Path;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// The bytes of `path`, which holds one or more certificates and nothing unreadable.
pub fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path, flag)?;
    parse_certificates(&bytes, path, flag)?;
    Ok(bytes)
}

/// The certificates `path` holds: one or more, and nothing unreadable.
pub fn certificate_chain(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    parse_certificates(&read(path, flag)?, path, flag)
}

fn parse_certificates(
    bytes: &[u8],
    path: &Path,
    flag: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    parse_all(bytes, path, flag, "certificate", "CERTIFICATE")
}

/// Every `T` in `bytes`, one or more, and nothing unreadable; a `what` that PEM marks as
/// `-----BEGIN {label}-----`.
fn parse_all<T: PemObject>(
    bytes: &[u8],
    path: &Path,
    flag: &str,
    what: &str,
    label: &str,
) -> anyhow::Result<Vec<T>> {
    let all = T::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e:?}", path.display()))?;
    anyhow::ensure!(
        !all.is_empty(),
        "{flag} {}: no {what} in it (a PEM file with -----BEGIN {label}-----)",
        path.display()
    );
    Ok(all)
}

/// The bytes of `path`, which holds a private key.
pub fn private_key(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path, flag)?;
    parse_private_key(&bytes, path, flag)?;
    Ok(bytes)
}

/// The private key `path` holds.
pub fn private_key_der(path: &Path, flag: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    parse_private_key(&read(path, flag)?, path, flag)
}

fn parse_private_key(
    bytes: &[u8],
    path: &Path,
    flag: &str,
) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: no private key in it (a PEM file with -----BEGIN PRIVATE KEY-----): {e:?}",
            path.display()
        )
    })
}

/// The certificate revocation lists `path` holds: one or more, and nothing unreadable.
pub fn revocation_lists(
    path: &Path,
    flag: &str,
) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = read(path, flag)?;
    parse_all(&bytes, path, flag, "revocation list", "X509 CRL")
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))
}
