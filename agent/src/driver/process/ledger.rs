//! The process driver's ledger: the instances it runs, kept in a file, so that an agent
//! started after one that died without stopping them (kill -9, a crash) takes over the
//! instances it left running, rather than starting others beside them that nobody would ever
//! stop. An instance is known by its process id and the time the kernel started it, so that a
//! process id used again by another program is never taken for it.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One instance, as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub version: String,
    pub index: u32,
    pub port: u16,
    pub pid: u32,
    /// When the kernel started the process, in clock ticks since boot (`/proc/PID/stat`).
    pub started: u64,
}

impl Entry {
    /// The process is still the one the entry names.
    pub fn alive(&self) -> bool {
        started(self.pid) == Some(self.started)
    }
}

/// The entries in `path`: none if it does not exist; one that cannot be read or parsed is
/// logged and taken as none.
pub(crate) fn read(path: &Path) -> Vec<Entry> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the instances file cannot be read; taking over no instance");
            return Vec::new();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "the instances file is not a list of instances; taking over no instance");
        Vec::new()
    })
}

/// Writes `entries` to `path` whole: to a file beside it, then renamed over it. None: the
/// file is removed (an agent that stopped its instances leaves nothing behind).
pub(crate) fn write(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    if entries.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut beside = path.as_os_str().to_owned();
    beside.push(".new");
    let text = serde_json::to_vec(entries).map_err(std::io::Error::other)?;
    std::fs::write(&beside, text)?;
    std::fs::rename(&beside, path)
}

/// When the kernel started process `pid`, in clock ticks since boot; `None` if there is no
/// such process (or no `/proc`), or it has ended and waits to be reaped (a zombie).
pub(crate) fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses; the fields after the
    // last ')' are the state (3rd) on, and the start time is the 22nd.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_id_and_start_time() {
        let me = std::process::id();
        let since = started(me).unwrap();
        let entry = |pid, started| Entry {
            version: "v1".into(),
            index: 0,
            port: 1,
            pid,
            started,
        };
        assert!(entry(me, since).alive());
        assert!(!entry(me, since + 1).alive(), "another process with the id");
        assert!(!entry(u32::MAX, since).alive(), "no such process");
    }

    #[test]
    fn the_ledger_is_written_whole_and_read_back_and_a_bad_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.json");
        assert!(read(&path).is_empty());
        let entries = [Entry {
            version: "v2".into(),
            index: 1,
            port: 8081,
            pid: 7,
            started: 9,
        }];
        write(&path, &entries).unwrap();
        assert_eq!(read(&path), entries);
        write(&path, &[]).unwrap();
        assert!(!path.exists(), "none kept: no file");
        write(&path, &entries).unwrap();
        std::fs::write(&path, "not json").unwrap();
        assert!(read(&path).is_empty());
    }
}
