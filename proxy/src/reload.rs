//! Reloads: the config file is read again when it changes or on SIGHUP; the table and TLS
//! certificates are swapped only if the whole file checks out, else the old ones stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::server::TlsSlot;
use crate::state::Shared;

/// Listens for SIGHUP; call before serving, so that an early SIGHUP cannot kill the process.
pub fn hangups() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; file changes still reload");
            None
        }
    }
}

pub async fn watch(
    shared: Arc<Shared>,
    path: PathBuf,
    tls: Vec<Option<TlsSlot>>,
    mut hangup: Option<Signal>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = fingerprint(&path, &shared);
    // Set when no thread could start for the last reload: the next tick tries again.
    let mut retry = false;
    loop {
        let forced = tokio::select! {
            _ = crate::server::stopped(&mut stop) => return,
            _ = tokio::time::sleep(shared.settings.watch_interval) => false,
            Some(()) = async { hangup.as_mut()?.recv().await } => true,
        };
        // A few `stat`s, on this thread, rather than reading the file every second on a
        // thread of the blocking pool: that thread never got old enough to end, and a
        // process of more than one thread makes the kernel take and drop a reference on
        // the socket at every call (`fput`: 0.35% of the proxy's CPU time under wrk).
        let now = fingerprint(&path, &shared);
        if !forced && !retry && now == seen {
            continue;
        }
        seen = now;
        // Reading, checking and building a large table is CPU work: off the traffic threads,
        // and behind them for the CPU.
        let (shared, path, tls) = (shared.clone(), path.clone(), tls.clone());
        let outcome = crate::background::run("reload", move || reload(&shared, &path, &tls)).await;
        // No thread could start (the machine is short of threads for now): try again on the
        // next tick. A reload that panicked would panic again on the same file: wait for a
        // change. Either way the table in force stays.
        retry = outcome
            .as_ref()
            .is_err_and(|e| e.downcast_ref::<std::io::Error>().is_some());
        if let Err(e) = outcome {
            tracing::error!(error = %e, retry, "could not reload the config");
        }
    }
}

/// What tells a file changed without reading it: its inode (an editor or `mv` may put a new
/// file in place), size and modification time.
type Stamp = Option<(u64, u64, Option<SystemTime>)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()))
}

/// The stamps of the config file and of the certificates and keys it names.
fn fingerprint(path: &Path, shared: &Shared) -> (Stamp, Vec<Stamp>) {
    let certs = shared
        .settings
        .listeners
        .iter()
        .flat_map(|l| l.tls.iter())
        .flat_map(|(c, k)| [c, k])
        .map(|p| stamp(p))
        .collect();
    (stamp(path), certs)
}

fn reload(shared: &Shared, path: &Path, tls: &[Option<TlsSlot>]) {
    let file = path.display().to_string();
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(file, error = %e, "cannot read config; keeping the table in force");
            return;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    match crate::config::check(&src, dir) {
        Ok((settings, table)) => {
            let addrs = |s: &crate::config::Settings| {
                (
                    s.admin,
                    s.listeners.iter().map(|l| l.addr).collect::<Vec<_>>(),
                )
            };
            if addrs(&settings) != addrs(&shared.settings) {
                tracing::warn!(
                    file,
                    "listener addresses changed; they take effect on restart"
                );
            }
            for (slot, listener) in tls.iter().zip(&settings.listeners) {
                let Some(slot) = slot else { continue };
                match crate::tls::server_config(&listener.tls) {
                    Ok(config) => slot.store(config),
                    Err(e) => {
                        tracing::error!(file, error = %format!("{e:#}"), "keeping old certificates")
                    }
                }
            }
            let _ = shared.install(table, None);
        }
        Err(diags) => {
            shared.stats.global.table_rejected.fetch_add(1, Relaxed);
            for d in &diags {
                tracing::error!(diagnostic = %d.in_file(&file), "config problem");
            }
            tracing::error!(
                file,
                errors = diags.len(),
                "config rejected; keeping the table in force"
            );
        }
    }
}
