//! Reloads: the config file is read again when it changes or on SIGHUP; the table and TLS
//! certificates are swapped only if the whole file checks out, else the old ones stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::config::{Listener, digest};
use crate::server::TlsSlot;
use crate::state::{Origin, Shared};

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
    // In force: the text the proxy started from, and its certificates as they are now.
    let mut applied = Sources {
        text: shared.settings.source,
        tls: tls_sources(&shared.settings.listeners),
    };
    // Certificate and key files named by a file that was refused: their change reads it again.
    let mut waiting = Vec::new();
    let mut seen = fingerprint(&path, &applied, &waiting);
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
        let now = fingerprint(&path, &applied, &waiting);
        if !forced && !retry && now == seen {
            continue;
        }
        seen = now;
        // Reading, checking and building a large table is CPU work: off the traffic threads,
        // and behind them for the CPU.
        let (shared, file, tls, last) =
            (shared.clone(), path.clone(), tls.clone(), applied.clone());
        let outcome =
            crate::background::run("reload", move || reload(&shared, &file, &tls, &last)).await;
        // No thread could start (the machine is short of threads for now): try again on the
        // next tick. A reload that panicked would panic again on the same file: wait for a
        // change. Either way the table in force stays.
        retry = outcome
            .as_ref()
            .is_err_and(|e| e.downcast_ref::<std::io::Error>().is_some());
        match outcome {
            Ok(next) => {
                if !next.applied.same_files(&applied) {
                    // Other certificate files in force: their stamps are not known yet, so
                    // the next tick reads them (and finds them as this reload did).
                    seen.1.clear();
                } else {
                    // The file and the certificates in force as they were before this read;
                    // the files a refused file names as they were before their last check
                    // (`again` covers one that came while the file was checked).
                    seen.1.truncate(applied.paths().count());
                    seen.1.extend(next.waiting.iter().map(|(_, stamp)| *stamp));
                }
                retry |= next.again;
                applied = next.applied;
                waiting = next.waiting.into_iter().map(|(path, _)| path).collect();
            }
            Err(e) => tracing::error!(error = %e, retry, "could not reload the config"),
        }
    }
}

/// What a reload put in force, as digests: the file's text, and for each listener every
/// certificate and key file it names (`None`: unreadable). Two reads that give the same
/// sources change nothing: a `touch`, the same text written again or a SIGHUP with nothing
/// new leaves the table in force alone, which may have come through `PUT /routes` since; a
/// renewed certificate alone swaps its listener's certificates and leaves the table alone.
#[derive(Clone, Debug, PartialEq)]
struct Sources {
    text: u64,
    tls: Vec<Files>,
}

/// One listener's certificate and key files, with their digests.
type Files = Vec<(PathBuf, Option<u64>)>;

impl Sources {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.tls.iter().flatten().map(|(p, _)| p)
    }

    fn same_files(&self, other: &Sources) -> bool {
        self.paths().eq(other.paths())
    }
}

fn tls_sources(listeners: &[Listener]) -> Vec<Files> {
    listeners.iter().map(files).collect()
}

fn files(listener: &Listener) -> Files {
    let read = |p: &PathBuf| (p.clone(), std::fs::read(p).ok().map(|b| digest(&b)));
    let paths = listener.tls.iter().flat_map(|(cert, key)| [cert, key]);
    paths.map(read).collect()
}

/// For each listener bound at start, the listener of a reread file whose certificates it takes:
/// the one at the same address (the first at start takes the first in the file, and so on, as
/// `127.0.0.1:0` may be written more than once), if both terminate TLS. None for a listener
/// the file moved, dropped or stripped of TLS: that waits for a restart, and its certificates
/// in force stay rather than being paired with another listener's, or with none.
fn counterparts<'a>(started: &[Listener], file: &'a [Listener]) -> Vec<Option<&'a Listener>> {
    started
        .iter()
        .enumerate()
        .map(|(i, listener)| {
            let same = |l: &&Listener| l.addr == listener.addr;
            let nth = started[..i].iter().filter(same).count();
            let there = file.iter().filter(same).nth(nth)?;
            (!listener.tls.is_empty() && !there.tls.is_empty()).then_some(there)
        })
        .collect()
}

/// What tells a file changed without reading it: its inode (an editor or `mv` may put a new
/// file in place), size, modification time, and status change time (a `chmod` that makes an
/// unreadable certificate readable).
type Stamp = Option<(u64, u64, Option<SystemTime>, (i64, i64))>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let changed = (m.ctime(), m.ctime_nsec());
    Some((m.ino(), m.len(), m.modified().ok(), changed))
}

/// The stamps of the config file, of the certificates and keys in force and of those a
/// refused file names.
fn fingerprint(path: &Path, applied: &Sources, waiting: &[PathBuf]) -> (Stamp, Vec<Stamp>) {
    let certs = applied.paths().chain(waiting).map(|p| stamp(p)).collect();
    (stamp(path), certs)
}

/// What a reload leaves in force, and what to watch beyond it.
struct Outcome {
    applied: Sources,
    /// The certificate and key files a refused file could not load, stamped before they were
    /// last tried: a certificate it names may not be there yet, and its coming should read
    /// the file again as an edit would.
    waiting: Vec<(PathBuf, Stamp)>,
    /// The file was refused for certificates that load now (they came while it was
    /// checked): read it again at the next tick.
    again: bool,
}

impl From<Sources> for Outcome {
    fn from(applied: Sources) -> Self {
        Outcome {
            applied,
            waiting: Vec::new(),
            again: false,
        }
    }
}

/// Reads the file and what it names; puts in force what changed since `last`, if the whole
/// file checks out.
fn reload(shared: &Shared, path: &Path, tls: &[Option<TlsSlot>], last: &Sources) -> Outcome {
    let file = path.display().to_string();
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            shared.stats.global.table_rejected.fetch_add(1, Relaxed);
            tracing::error!(file, error = %e, "cannot read config; keeping the table in force");
            return last.clone().into();
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let (settings, table) = match crate::config::check_certs(&src, dir) {
        Ok(checked) => checked,
        Err(crate::config::Refused { diags, certs }) => {
            shared.stats.global.table_rejected.fetch_add(1, Relaxed);
            for d in &diags {
                tracing::error!(diagnostic = %d.in_file(&file), "config problem");
            }
            tracing::error!(
                file,
                errors = diags.len(),
                "config rejected; keeping the table in force"
            );
            // Stamped first, then tried: a change after the stamp reads the file again at
            // the next tick, one before it is seen by this try.
            let files = certs.iter().flat_map(|(cert, key)| [cert, key]);
            let waiting: Vec<_> = files.map(|p| (p.clone(), stamp(p))).collect();
            let load = |(cert, key): &(PathBuf, PathBuf)| crate::tls::load_cert(cert, key);
            let again = !certs.is_empty() && certs.iter().all(|pair| load(pair).is_ok());
            return Outcome {
                applied: last.clone(),
                waiting,
                again,
            };
        }
    };
    let counterparts = counterparts(&shared.settings.listeners, &settings.listeners);
    let kept = last
        .tls
        .iter()
        .cloned()
        .chain(std::iter::repeat_with(Files::new));
    let mut next = Sources {
        text: settings.source,
        tls: (counterparts.iter().zip(kept))
            .map(|(there, kept)| there.map_or(kept, files))
            .collect(),
    };
    if next == *last {
        tracing::info!(
            file,
            "config and certificates unchanged; the table in force stays"
        );
        return next.into();
    }
    let fixed = shared.settings.fixed_at_start_changed(&settings);
    if next.text != last.text && !fixed.is_empty() {
        tracing::warn!(
            file,
            changed = %fixed.join(", "),
            "settings read at start only changed; they take effect on restart"
        );
    }
    for (i, (slot, there)) in tls.iter().zip(&counterparts).enumerate() {
        // A listener without TLS at start has none until a restart, and one the file moved
        // or stripped of TLS keeps its certificates until then (warned above).
        let (Some(slot), Some(listener)) = (slot, there) else {
            continue;
        };
        if last.tls.get(i) == next.tls.get(i) {
            continue;
        }
        match crate::tls::server_config(&listener.tls) {
            Ok(config) => {
                slot.store(config);
                tracing::info!(file, listener = %listener.addr, "certificates reloaded");
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(file, listener = %listener.addr, error, "keeping old certificates");
                // Not in force: the next look tries them again.
                next.tls[i] = last.tls.get(i).cloned().unwrap_or_default();
            }
        }
    }
    if next.text != last.text
        && let Err(e) = shared.install(table, None, Origin::File)
    {
        // The file's table is a placeholder once one came through `PUT /routes`.
        tracing::info!(file, "{e}");
    }
    next.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(addr: &str, cert: Option<&str>) -> Listener {
        let tls = cert.map(|c| {
            (
                PathBuf::from(format!("{c}.pem")),
                PathBuf::from(format!("{c}.key")),
            )
        });
        Listener {
            addr: addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}")),
            tls: tls.into_iter().collect(),
        }
    }

    fn certs(pairs: Vec<Option<&Listener>>) -> Vec<Option<String>> {
        let name = |l: &Listener| l.tls[0].0.display().to_string();
        pairs.into_iter().map(|l| l.map(name)).collect()
    }

    #[test]
    fn listeners_take_certificates_by_address_not_by_place() {
        let started = [
            listener("127.0.0.1:8443", Some("a")),
            listener("127.0.0.1:8080", None),
            listener("127.0.0.1:9443", Some("b")),
            listener("127.0.0.1:0", Some("c")),
            listener("127.0.0.1:0", Some("d")),
        ];
        let file = [
            listener("127.0.0.1:0", None),
            listener("127.0.0.1:8080", Some("e")),
            listener("127.0.0.1:8443", Some("a2")),
            listener("127.0.0.1:0", Some("d2")),
        ];
        let expected = [Some("a2.pem"), None, None, None, Some("d2.pem")];
        let expected: Vec<_> = expected.iter().map(|c| c.map(String::from)).collect();
        // 8443 moved down the list; 8080 gained TLS (a restart's business); 9443 is gone; the
        // first `:0` lost TLS, the second took new certificates.
        assert_eq!(certs(counterparts(&started, &file)), expected);
    }
}
