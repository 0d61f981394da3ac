//! Who a client of the mutual-TLS listener is: the names its certificate is for.
//!
//! The client CA lets in every certificate it signed; the names decide what each may do.
//! - An agent speaks only for the cluster its certificate names, as
//!   `<cluster>.<region>.agent.fleet` ([`names::agent`]): a stolen agent certificate cannot
//!   report, or take desired state, for any other cluster.
//! - The release API is for operators and their tools, whose certificates name them as
//!   `<name>.operator.fleet`; `<name>` is recorded as the actor of what they do, whatever the
//!   request says, so the history tells who acted. An agent's certificate is no operator's.
//! - Viewers (dashboards, on-call people who should look but not touch), named
//!   `<name>.viewer.fleet`, may read fleets and releases and follow them, and change nothing.
//!
//! The names are the DNS names among the certificate's subject alternative names, compared
//! without regard to case, and exactly: a wildcard certificate speaks for no one. On a plain
//! listener there is no certificate and every client is let in, as the network is trusted.

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use fleet_proto::names::{self, OPERATOR_DOMAIN, VIEWER_DOMAIN};

/// The operator a changing request comes from under mutual TLS, as the release service's
/// `may_change` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator(pub String);

/// Who may use the release API, as a certificate names them: put in each request's
/// extensions by [`release_api_gate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Operator(String),
    Viewer(String),
}

/// The DNS names of a DER certificate's subject alternative names, in lower case.
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's subject alternative names: {e}"))?;
    Ok(san
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect())
}

/// Whether a certificate for `names` may speak for `cluster` in `region`; the error says which
/// name it needs.
pub fn check_agent(names: &[String], region: &str, cluster: &str) -> Result<(), String> {
    let wanted = names::agent(region, cluster);
    if names.contains(&wanted) {
        return Ok(());
    }
    Err(format!(
        "a certificate for {} cannot speak for cluster {cluster:?} in region {region:?}: \
         give this agent a certificate for the DNS name {wanted}",
        shown(names)
    ))
}

/// What a certificate for `names` may do on the release API (`alice.operator.fleet`: operate
/// as `alice`); an operator's name wins over a viewer's. The error says what the release API
/// needs.
pub fn role(names: &[String]) -> Result<Role, String> {
    let named = |domain: &str| {
        names
            .iter()
            .filter_map(|name| name.strip_suffix(domain)?.strip_suffix('.'))
            .find(|label| fleet_yaml::is_dns_label(label))
            .map(str::to_owned)
    };
    if let Some(name) = named(OPERATOR_DOMAIN) {
        return Ok(Role::Operator(name));
    }
    if let Some(name) = named(VIEWER_DOMAIN) {
        return Ok(Role::Viewer(name));
    }
    Err(format!(
        "a certificate for {} is neither an operator's nor a viewer's: the release API needs a \
         certificate for <name>.{OPERATOR_DOMAIN} (say alice.{OPERATOR_DOMAIN}), or \
         <name>.{VIEWER_DOMAIN} to read only, signed by the controller's client CA",
        shown(names)
    ))
}

/// Why viewer `name` may not change anything, and the fix.
pub fn read_only(name: &str) -> String {
    format!(
        "{} may read fleets and releases, not change them: a change needs a certificate for {}",
        names::viewer(name),
        names::operator(name)
    )
}

fn shown(names: &[String]) -> String {
    if names.is_empty() {
        "no DNS name".into()
    } else {
        names.join(", ")
    }
}

/// The names of the certificate a client showed, when the listener is `mutual` TLS; `None`
/// on a plain one.
pub fn peer_names<T>(request: &Request<T>, mutual: bool) -> Result<Option<Vec<String>>, Status> {
    if !mutual {
        return Ok(None);
    }
    let peer = request.extensions().get::<crate::tls::Peer>();
    let leaf = peer
        .and_then(|peer| peer.certs.as_deref()?.first())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    dns_names(leaf).map(Some).map_err(Status::unauthenticated)
}

/// The release API's gate: under mutual TLS only operators and viewers pass, each request
/// carrying its [`Role`]. Every call that changes something passes the release service's
/// `may_change` first, which refuses a viewer.
pub fn release_api_gate(
    mutual: bool,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request| {
        if let Some(names) = peer_names(&request, mutual)? {
            let role = role(&names).map_err(|e| {
                tracing::warn!(%e, "release API call refused");
                Status::permission_denied(e)
            })?;
            request.extensions_mut().insert(role);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_names_are_the_certificates_dns_names_in_lower_case() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["Usw1-A.US-West.agent.fleet".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "ops@example.com".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            dns_names(cert.der()).unwrap(),
            names(&["usw1-a.us-west.agent.fleet"])
        );
        let e = dns_names(b"not a certificate").unwrap_err();
        assert!(
            e.starts_with("the client certificate cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn an_agent_speaks_only_for_the_cluster_its_certificate_names() {
        let usw1 = names(&["controller.example", "usw1-a.us-west.agent.fleet"]);
        assert_eq!(check_agent(&usw1, "us-west", "usw1-a"), Ok(()));
        assert!(
            check_agent(&usw1, "us-west", "USW1-A").is_err(),
            "another cluster's name, by case (the hello is refused before)"
        );
        assert_eq!(
            check_agent(&usw1, "us-west", "usw1-b").unwrap_err(),
            "a certificate for controller.example, usw1-a.us-west.agent.fleet cannot speak for \
             cluster \"usw1-b\" in region \"us-west\": give this agent a certificate for the DNS \
             name usw1-b.us-west.agent.fleet"
        );
        assert!(
            check_agent(&usw1, "eu-west", "usw1-a").is_err(),
            "nor for its cluster in another region"
        );
        let wildcard = names(&["*.us-west.agent.fleet"]);
        assert!(check_agent(&wildcard, "us-west", "usw1-a").is_err());
        let operator = names(&["alice.operator.fleet"]);
        assert!(check_agent(&operator, "us-west", "usw1-a").is_err());
    }

    #[test]
    fn operators_and_viewers_are_named_under_their_domains() {
        assert_eq!(
            role(&names(&["laptop.example", "alice.operator.fleet"])),
            Ok(Role::Operator("alice".into()))
        );
        assert_eq!(
            role(&names(&["grafana.viewer.fleet"])),
            Ok(Role::Viewer("grafana".into()))
        );
        assert_eq!(
            role(&names(&["bob.viewer.fleet", "bob.operator.fleet"])),
            Ok(Role::Operator("bob".into())),
            "an operator may also read"
        );
        for neither in [
            &["usw1-a.us-west.agent.fleet"][..],
            &["operator.fleet"],
            &["*.operator.fleet"],
            &["*.viewer.fleet"],
            &["a.b.operator.fleet"],
            &["a.b.viewer.fleet"],
            &["aliceoperator.fleet"],
            &[],
        ] {
            let e = role(&names(neither)).unwrap_err();
            assert!(
                e.ends_with(
                    "is neither an operator's nor a viewer's: the release API needs a \
                     certificate for <name>.operator.fleet (say alice.operator.fleet), or \
                     <name>.viewer.fleet to read only, signed by the controller's client CA"
                ),
                "{neither:?}: {e}"
            );
        }
        assert!(
            role(&[])
                .unwrap_err()
                .starts_with("a certificate for no DNS name")
        );
    }

    #[test]
    fn on_a_plain_listener_everyone_passes_unnamed() {
        let mut gate = release_api_gate(false);
        let passed = gate(Request::new(())).unwrap();
        assert!(passed.extensions().get::<Role>().is_none());
        assert_eq!(peer_names(&Request::new(()), false).unwrap(), None);
        let e = peer_names(&Request::new(()), true).unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::Unauthenticated,
            "mutual, yet no certificate"
        );
    }
}
