//! fleetctl as a library: the verbs, and [`local::LocalFleet`], a whole fleet as processes on
//! this machine, which `fleetctl demo` and the end-to-end tests share.

pub mod agents;
pub mod certs;
pub mod demo;
pub mod fleets;
pub mod local;
pub mod plan_table;
pub mod progress;
pub mod release;
pub mod render;
pub mod retry;
pub mod verbs;
