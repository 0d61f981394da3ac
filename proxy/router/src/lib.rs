//! The routing core of fleet-proxy: a checked, immutable route table and the pure decision
//! of where each request goes (route, rule, split bucket, mirror sample). It does no I/O.
//!
//! A table comes from a [`TableSpec`] (the YAML config file or the JSON body of
//! `PUT /routes`) through [`Table::build`], which reports every problem at once. The data
//! plane holds one `Table` and calls [`Table::decide`] per request.

mod check;
pub mod pace;
mod path;
mod rule;
pub mod spec;
mod split;
mod table;

pub use fleet_yaml::{Diagnostic, Diagnostics, Positions};
pub use rule::{cookie, query_param};
pub use spec::{Compare, TableSpec};
pub use split::{BUCKETS, Bucketing, Split, Sticky, bucket_of};
pub use table::{Cause, Decision, Protocol, RequestView, Route, RouteId, Table, Track, TrackId};

/// Reads a table from YAML or JSON text (JSON is YAML), as `PUT /routes` receives it.
/// On failure, every diagnostic in source order.
pub fn load(src: &str) -> Result<Table, Vec<Diagnostic>> {
    // JSON that is already right (what the agent sends) is read by serde alone, about ten
    // times faster. Anything serde refuses, and any table that fails its checks, is read again
    // below with positions, so diagnostics are always the same.
    if let Ok(spec) = serde_json::from_str::<TableSpec>(src) {
        let mut diags = Diagnostics::default();
        if let Some(table) = Table::build(spec, &Positions::default(), &mut diags)
            && !diags.has_errors()
        {
            return Ok(table);
        }
    }
    let mut loaded = fleet_yaml::load::<TableSpec>(src);
    let table = loaded
        .value
        .take()
        .and_then(|spec| Table::build(spec, &loaded.positions, &mut loaded.diags));
    match table {
        Some(table) if !loaded.diags.has_errors() => Ok(table),
        _ => Err(loaded.diags.into_sorted()),
    }
}

#[cfg(test)]
mod tests;
