//! YAML configuration files read like a compiler reads source: every problem reported at once,
//! each with its line, column, field path and a fix.
//!
//! [`load`] parses a document into a tree that remembers positions ([`yaml`]), checks its
//! structure against the JSON Schema of the target serde type ([`shape`]), and deserializes it.
//! Callers then run their own semantic checks, locating fields through [`Positions`].

pub mod diag;
pub mod shape;
pub mod yaml;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

pub use diag::{Diagnostic, Diagnostics, Severity, did_you_mean, suggest};
pub use shape::Positions;
pub use yaml::Pos;

/// A document read into `T`, or not, with what was found on the way.
#[derive(Debug)]
pub struct Loaded<T> {
    /// `Some` when the document could be read as a `T`, even if some fields were rejected
    /// (see `diags`); semantic checks may add more errors.
    pub value: Option<T>,
    pub positions: Positions,
    pub diags: Diagnostics,
}

/// A DNS label (RFC 1123), as Kubernetes names its objects: at most 63 lowercase letters,
/// digits and '-', a letter or digit at each end. The manifest's check and the agent's
/// Kubernetes driver both use it.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !b.is_empty() && b.len() <= 63 && b.iter().all(inner) && b[0] != b'-' && b[b.len() - 1] != b'-'
}

/// A version Fleet releases: an image tag that is also a Kubernetes label value (the
/// Kubernetes driver finds its pods by it), at most 63 letters, digits, '_', '.' and '-', a
/// letter or digit at each end. The controller's check of a start and the driver's use it.
pub fn is_version(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    let end = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
    b.len() <= 63 && b.iter().all(inner) && end(b.first()) && end(b.last())
}

/// `value` of `field` as a version to release ([`is_version`]), or what is wrong with it and
/// the fix. The controller's check of a start and fleetctl's of a plan use it.
pub fn check_version(field: &str, value: &str) -> Result<(), String> {
    match (value.is_empty(), is_version(value)) {
        (true, _) => Err(format!(
            "{field} is empty: give the version to release, e.g. v2"
        )),
        (false, true) => Ok(()),
        (false, false) => Err(format!(
            "{field} {value:?} is not a version: at most 63 letters, digits, '_', '.' and '-', a letter or digit at each end (an image tag that is also a Kubernetes label value), e.g. v2 or 1.4.0-rc.1"
        )),
    }
}

/// The first unit of a duration's text that is months or years (`M`, `month`, `y`, `yr`,
/// …), which humantime takes: they have no fixed length, and `5M` is too easily meant as five
/// minutes. The manifest's and the proxy's checks refuse them.
pub fn vague_unit(duration: &str) -> Option<&str> {
    const VAGUE: [&str; 8] = ["M", "month", "months", "y", "yr", "yrs", "year", "years"];
    (duration.split(|c: char| !c.is_ascii_alphabetic())).find(|u| VAGUE.contains(u))
}

/// An HTTP token (RFC 9110 §5.6.2), as cookie and header names must be; both the manifest's
/// and the proxy's checks use it. A `match` rather than a search of the allowed bytes: every
/// route of a large table names its cookie, and the search ran for a tenth of a build.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// The JSON Schema of `T`, as editors and the structural check use it.
pub fn schema_of<T: JsonSchema>() -> serde_json::Value {
    schemars::schema_for!(T).to_value()
}

/// Reads `src` as a `T`: syntax, then structure against `T`'s schema, then serde.
pub fn load<T: DeserializeOwned + JsonSchema>(src: &str) -> Loaded<T> {
    let mut diags = Diagnostics::default();
    let node = match yaml::parse(src) {
        Ok(node) => node,
        Err(e) => {
            diags.error(e.pos, "", format!("not valid YAML: {}", e.message), e.help);
            return Loaded {
                value: None,
                positions: Positions::default(),
                diags,
            };
        }
    };
    let (json, positions) = shape::check(&node, &schema_of::<T>(), &mut diags);
    // Unknown fields and repeated keys were left out of `json`, so it may still be readable
    // after errors; then the caller's semantic checks can report their problems too.
    let value = serde_json::from_value(json).ok();
    if value.is_none() && !diags.has_errors() {
        // The structural check should have caught whatever serde refused; report, never panic.
        diags.error(
            node.pos,
            "",
            "the document does not have the expected shape",
            "",
        );
    }
    Loaded {
        value,
        positions,
        diags,
    }
}
