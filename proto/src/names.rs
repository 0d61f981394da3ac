//! The names a client's certificate must carry, under mutual TLS, for what it may do: part of
//! the contract, as the controller checks them and `fleetctl certs` makes them.

/// The domain under which agents' certificates are named.
pub const AGENT_DOMAIN: &str = "agent.fleet";
/// The domain under which operators' certificates are named.
pub const OPERATOR_DOMAIN: &str = "operator.fleet";
/// The domain under which viewers' certificates are named.
pub const VIEWER_DOMAIN: &str = "viewer.fleet";

/// The name an agent's certificate must carry to speak for `cluster` (the manifest cluster's
/// `agent`, by default its name) in `region`: both lowercase DNS labels, as the hello is
/// checked to have them, so that no two clusters share a name.
pub fn agent(region: &str, cluster: &str) -> String {
    format!("{cluster}.{region}.{AGENT_DOMAIN}")
}

/// The name of operator `name`'s certificate: it may change releases, as `name`.
pub fn operator(name: &str) -> String {
    format!("{name}.{OPERATOR_DOMAIN}")
}

/// The name of viewer `name`'s certificate: it may read releases, not change them.
pub fn viewer(name: &str) -> String {
    format!("{name}.{VIEWER_DOMAIN}")
}
