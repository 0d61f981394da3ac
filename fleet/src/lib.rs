//! The fleet manifest: its model, validation and wave planning. Pure: no I/O, no clock.
//!
//! [`load`] reads a manifest's text into a checked [`Manifest`] or every problem in it;
//! [`plan::plan`] turns a manifest, a release request and a start time into a timeline.

mod check;
pub mod model;
pub mod plan;
pub mod schedule;
pub mod steps;
pub mod wire;

pub use check::duration;
pub use fleet_yaml::{Diagnostic, Severity};
pub use model::Manifest;

/// A manifest that passed validation, with the warnings it still deserves.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub manifest: Manifest,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates a manifest. On failure, every diagnostic found (errors and warnings),
/// in source order.
pub fn load(src: &str) -> Result<Loaded, Vec<Diagnostic>> {
    load_as(src, Rules::Now)
}

/// [`load`] for a manifest taken before (a stored fleet, a running release's): a rule made
/// stricter since ([`Rules::Kept`]) only warns, so that a controller upgraded over its store
/// still opens it.
pub fn load_kept(src: &str) -> Result<Loaded, Vec<Diagnostic>> {
    load_as(src, Rules::Kept)
}

/// Where the field `path` (named as diagnostics name one: `regions[0].clusters`) is in the
/// manifest `src`: its line and column, or its nearest ancestor's; for diagnostics made of a
/// manifest after it loaded.
pub fn position(src: &str, path: &str) -> (usize, usize) {
    let pos = fleet_yaml::load::<wire::Manifest>(src).positions.of(path);
    (pos.line, pos.column)
}

/// Which rules a manifest is checked by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// Every rule: for what is applied or started now.
    Now,
    /// For what was taken before: rules made stricter since warn instead (durations in months
    /// or years, or over 30 days).
    Kept,
}

fn load_as(src: &str, rules: Rules) -> Result<Loaded, Vec<Diagnostic>> {
    let mut loaded = fleet_yaml::load::<wire::Manifest>(src);
    let manifest = loaded
        .value
        .as_ref()
        .and_then(|w| check::manifest(w, &loaded.positions, &mut loaded.diags, rules));
    let failed = loaded.diags.has_errors();
    let diags = loaded.diags.into_sorted();
    match manifest {
        Some(manifest) if !failed => Ok(Loaded {
            manifest,
            warnings: diags,
        }),
        _ => Err(diags),
    }
}

/// `manifest` with `strategy` — a strategy written as the manifest writes one, in YAML or
/// JSON — in force for every region, instead of the manifest's, its waves' and its regions'.
/// For a release that overrides the strategy; the diagnostics point into `strategy`'s text.
pub fn with_strategy(
    manifest: &Manifest,
    strategy: &str,
    rules: Rules,
) -> Result<Manifest, Vec<Diagnostic>> {
    let fleet_yaml::Loaded {
        value,
        positions,
        mut diags,
    } = fleet_yaml::load::<wire::Strategy>(strategy);
    let checked = value.as_ref().and_then(|w| {
        check::strategy::check(w, "", &mut check::Ctx::new(&positions, &mut diags, rules))
    });
    match checked {
        Some(strategy) if !diags.has_errors() => {
            let mut m = manifest.clone();
            m.strategy = strategy;
            m.waves.iter_mut().for_each(|w| w.strategy = None);
            m.regions.iter_mut().for_each(|r| r.strategy = None);
            Ok(m)
        }
        _ => Err(diags.into_sorted()),
    }
}

/// The JSON Schema of the manifest, for editors.
pub fn schema() -> serde_json::Value {
    fleet_yaml::schema_of::<wire::Manifest>()
}
