//! `fleetctl certs`: the certificates of a fleet under mutual TLS, made with rcgen and named
//! as the controller checks them (`fleet_proto::names`): a CA, the controller's certificate,
//! and one per agent, operator and viewer. For a fleet without a PKI of its own; one that has
//! one (cert-manager, step, a corporate CA) gives the same names from there.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Args, Subcommand};
use fleet_proto::names;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The longest validity `--days` gives.
const MAX_DAYS: u32 = 3650;

/// Make the certificates of a fleet under mutual TLS.
///
/// `ca` makes a CA in `--dir` (ca.pem, ca.key); the others are signed by it and named as the
/// controller expects: the controller's for the names agents and tools dial it by, an
/// agent's as `<cluster>.<region>.agent.fleet`, an operator's as `<name>.operator.fleet`, a
/// viewer's (reads, changes nothing) as `<name>.viewer.fleet`. Each goes to `<name>.pem`
/// and `<name>.key` (the key readable by its owner only); nothing is overwritten.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  fleetctl certs ca
  fleetctl certs controller --dns fleet.example.com
  fleetctl certs agent --region us-west --cluster usw1-a
  fleetctl certs operator alice
  fleetctl certs viewer grafana")]
pub struct Certs {
    #[command(subcommand)]
    what: What,
    /// Where the CA is, and where the certificates go.
    #[arg(long, default_value = "fleet-certs", global = true)]
    dir: PathBuf,
    /// How long the certificate is valid, in days. Default: 3650 for a CA, 365 otherwise.
    #[arg(long, global = true)]
    days: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum What {
    /// A new CA: ca.pem (the controller's --client-ca, every client's --ca) and ca.key (keep
    /// it secret: it signs the rest).
    Ca,
    /// The controller's certificate, for the DNS names and addresses clients dial it by.
    Controller {
        /// A DNS name clients dial the controller by (repeat for more).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address clients dial the controller by (repeat for more).
        #[arg(long = "ip", value_name = "ADDRESS")]
        ips: Vec<std::net::IpAddr>,
    },
    /// An agent's certificate: it may speak for that cluster of that region only.
    Agent {
        #[arg(long)]
        region: String,
        /// The agent's `--cluster`: the manifest cluster's `agent`, by default its name.
        #[arg(long)]
        cluster: String,
    },
    /// An operator's or a tool's certificate: it may do everything, recorded as NAME.
    Operator { name: String },
    /// A viewer's certificate: it may read fleets and releases, and change nothing.
    Viewer { name: String },
}

impl Certs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let authority = Authority {
            dir: self.dir,
            days: self.days,
        };
        let written = match &self.what {
            What::Ca => authority.ca()?,
            What::Controller { dns, ips } => {
                if dns.is_empty() && ips.is_empty() {
                    bail!(
                        "the controller's certificate needs the names clients dial it by: give \
                         --dns NAME or --ip ADDRESS, e.g. --dns fleet.example.com"
                    );
                }
                authority.server("controller", dns, ips)?
            }
            What::Agent { region, cluster } => {
                label("--region", region)?;
                label("--cluster", cluster)?;
                authority.client(&names::agent(region, cluster))?
            }
            What::Operator { name } => {
                label("NAME", name)?;
                authority.client(&names::operator(name))?
            }
            What::Viewer { name } => {
                label("NAME", name)?;
                authority.client(&names::viewer(name))?
            }
        };
        for path in written {
            println!("wrote {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// A CA in `dir` and what it signs, valid for `days` (else the defaults).
pub struct Authority {
    pub dir: PathBuf,
    pub days: Option<u32>,
}

impl Authority {
    /// Makes the CA: `ca.pem`, `ca.key`.
    pub fn ca(&self) -> anyhow::Result<Vec<PathBuf>> {
        // A name of its own: a certificate another CA signed is then told as of an unknown
        // issuer, not as one whose signature is bad (found by the issuer's name, checked
        // with the wrong key).
        let tag: u32 = rand::random();
        let name = format!("Fleet CA {} {tag:08x}", Utc::now().date_naive());
        let mut params = self.params(&name, 3650)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        self.write("ca", &cert.pem(), &key.serialize_pem())
    }

    /// A server certificate for `dns` names and `ips`, as `<file>.pem`, `<file>.key`.
    pub fn server(
        &self,
        file: &str,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> anyhow::Result<Vec<PathBuf>> {
        let mut sans = Vec::new();
        for name in dns {
            let mut labels = name.strip_prefix("*.").unwrap_or(name).split('.');
            let ip = name.parse::<std::net::IpAddr>().is_ok();
            if ip || !labels.all(fleet_yaml::is_dns_label) {
                bail!(
                    "--dns {name:?} is not a DNS name: give lowercase names such as \
                     fleet.example.com (or *.example.com), and addresses with --ip"
                );
            }
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.leaf(file, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A certificate for a client named `name`, as `<name>.pem`, `<name>.key`.
    pub fn client(&self, name: &str) -> anyhow::Result<Vec<PathBuf>> {
        let san = SanType::DnsName(name.try_into()?);
        self.leaf(name, vec![san], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A certificate signed by the CA in `--dir`, written as `<file>.pem` and `<file>.key`.
    fn leaf(
        &self,
        file: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<Vec<PathBuf>> {
        let issuer = self.issuer()?;
        let mut params = self.params(file, 365)?;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        self.write(file, &cert.pem(), &key.serialize_pem())
    }

    /// The CA in `--dir`, to sign with.
    fn issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let [cert, key] = self.files("ca");
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| {
                format!(
                    "reading the CA's {}: make a CA first with `fleetctl certs ca --dir {}`",
                    path.display(),
                    self.dir.display()
                )
            })
        };
        let key = KeyPair::from_pem(&read(&key)?).context("ca.key is not a PEM private key")?;
        Issuer::from_ca_cert_pem(&read(&cert)?, key).context("ca.pem is not a PEM CA certificate")
    }

    /// Parameters valid for `--days` (or `default_days`) from now, and from an hour before
    /// (for clocks a little behind), with a random serial number (so that a revocation list
    /// can name this one) and `name` as the common name.
    fn params(&self, name: &str, default_days: u32) -> anyhow::Result<CertificateParams> {
        let days = self.days.unwrap_or(default_days);
        if !(1..=MAX_DAYS).contains(&days) {
            bail!("--days {days}: give from 1 to {MAX_DAYS} (ten years)");
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86_400 * u64::from(days))).into();
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        Ok(params)
    }

    /// Where `file`'s certificate and key are: `<dir>/<file>.pem`, `<dir>/<file>.key`.
    pub fn files(&self, file: &str) -> [PathBuf; 2] {
        let path = |ext: &str| self.dir.join(format!("{file}.{ext}"));
        [path("pem"), path("key")]
    }

    /// Writes `<file>.pem` and `<file>.key` (owner-only), refusing to overwrite either.
    fn write(&self, file: &str, cert: &str, key: &str) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("making {}", self.dir.display()))?;
        let paths = self.files(file);
        for path in &paths {
            if path.exists() {
                bail!(
                    "{} exists already: nothing was written; remove it to make it anew, or give \
                     another --dir",
                    path.display()
                );
            }
        }
        // The key first, the certificate only once it is written: never one without the
        // other, and neither over a file (or a link) that appeared since the check.
        write_new(&paths[1], key, 0o600)?;
        if let Err(e) = write_new(&paths[0], cert, 0o644) {
            // Ours is gone already (write_new removes a half-written file); one that appeared
            // meanwhile is someone else's.
            let _ = std::fs::remove_file(&paths[1]);
            return Err(e);
        }
        Ok(paths.to_vec())
    }
}

/// Writes `text` to a new file of `mode` (a private key: readable by its owner only, from
/// the moment it exists); a half-written one is removed.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| {
            file.write_all(text.as_bytes()).inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            })
        });
    written.with_context(|| format!("writing {}", path.display()))
}

/// Checks that `value` (of `flag`) is a lowercase DNS label, as the controller requires of
/// the names it finds in certificates.
fn label(flag: &str, value: &str) -> anyhow::Result<()> {
    if fleet_yaml::is_dns_label(value) {
        return Ok(());
    }
    bail!(
        "{flag} {value:?} is not a name the controller accepts: use lowercase letters, digits \
         and '-' (at most 63, a letter or digit at each end)"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The common name and the validity of the certificate `<file>.pem` in `dir`.
    fn made(dir: &Path, file: &str) -> (String, SystemTime, SystemTime) {
        let pem = std::fs::read(dir.join(format!("{file}.pem"))).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let name = cert.subject().iter_common_name().next().unwrap();
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().try_into().unwrap())
        };
        let validity = cert.validity();
        let name = name.as_str().unwrap().to_string();
        (name, time(validity.not_before), time(validity.not_after))
    }

    #[test]
    fn each_ca_has_a_name_of_its_own_and_days_count_from_now() {
        let dir = tempfile::tempdir().unwrap();
        let authority = |name: &str, days| Authority {
            dir: dir.path().join(name),
            days,
        };
        let (one, two) = (authority("one", Some(2)), authority("two", None));
        one.ca().unwrap();
        two.ca().unwrap();
        let names = [&one, &two].map(|a| made(&a.dir, "ca").0);
        assert!(
            names.iter().all(|n| n.starts_with("Fleet CA ")),
            "{names:?}"
        );
        assert_ne!(names[0], names[1]);
        one.client("alice.operator.fleet").unwrap();
        let now = SystemTime::now();
        let (_, from, to) = made(&one.dir, "alice.operator.fleet");
        let (hour, minute) = (Duration::from_secs(3600), Duration::from_secs(60));
        let after = to.duration_since(now).unwrap();
        assert!(
            after <= 48 * hour && after > 48 * hour - minute,
            "{after:?}"
        );
        let before = now.duration_since(from).unwrap();
        assert!(before >= hour && before < hour + minute, "{before:?}");
        let (_, _, to) = made(&two.dir, "ca");
        let years = to.duration_since(now).unwrap();
        assert!(years > 3650 * 24 * hour - minute, "{years:?}");
    }
}
