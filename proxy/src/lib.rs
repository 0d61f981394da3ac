//! fleet-proxy: the regional data plane. A thin hyper service around the route table of
//! `fleet-proxy-router`: it accepts connections, asks the table where each request goes,
//! forwards it, mirrors a sample, and counts every outcome.

pub mod admin;
pub mod background;
pub mod body;
pub mod config;
pub mod conn;
pub mod framing;
pub mod grpc;
pub mod memory;
pub mod mirror;
pub mod reload;
pub mod server;
pub mod service;
pub mod state;
pub mod stats;
pub mod tls;
pub mod upstream;

pub use server::Server;

/// Locks `m`. A panic while it was held leaves data that is still whole (counters, queues,
/// maps updated in one step), so the proxy carries on with it rather than failing every
/// request after.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`], unless another thread holds `m`: then `None`, at once.
pub(crate) fn try_lock<T>(m: &std::sync::Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}
