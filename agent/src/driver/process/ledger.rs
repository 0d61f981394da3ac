//! The process driver's ledger: the instances it runs, kept in a file, so that an agent
//! started after one that died without stopping them (kill -9, a crash) takes over the
//! instances it left running, rather than starting others beside them that nobody would ever
//! stop. An instance is known by its process id, the time the kernel started it and its owner
//! (this agent's user), all in the same boot: a process id used again by another program is
//! not taken for it. (Its command line is kept for people, not matched: a script's shows its
//! interpreter, and some programs rename themselves.) The ledger is taken only from a file of
//! this user's that nobody else may write, and is written so.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's content.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Ledger {
    /// The boot it was written in (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    boot: String,
    instances: Vec<Entry>,
}

/// One instance, as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub version: String,
    pub index: u32,
    pub port: u16,
    pub pid: u32,
    /// When the kernel started the process, in clock ticks since boot (`/proc/PID/stat`).
    pub started: u64,
    /// Its command line, as started (for people).
    #[serde(default)]
    pub command: Vec<String>,
}

impl Entry {
    /// The process is still the one the entry names, and this user's.
    pub fn alive(&self) -> bool {
        let proc = format!("/proc/{}", self.pid);
        let ours = std::fs::metadata(&proc).is_ok_and(|m| m.uid() == euid());
        ours && started(self.pid) == Some(self.started)
    }
}

/// The entries in `path`: none if it does not exist, or was written in another boot; one
/// that cannot be read or parsed, or that another user owns or may write, is logged and taken
/// as none.
pub(crate) fn read(path: &Path) -> Vec<Entry> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the instances file cannot be read; taking over no instance");
            return Vec::new();
        }
    };
    if !meta.is_file() || meta.uid() != euid() || meta.permissions().mode() & 0o022 != 0 {
        tracing::warn!(path = %path.display(), "the instances file is not a file of this user's that only it may write; taking over no instance");
        return Vec::new();
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let ledger: Ledger = serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "the instances file is not a list of instances; taking over no instance");
        Ledger::default()
    });
    match ledger.boot == boot() {
        true => ledger.instances,
        false => Vec::new(),
    }
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
    let ledger = Ledger {
        boot: boot(),
        instances: entries.to_vec(),
    };
    let text = serde_json::to_vec(&ledger).map_err(std::io::Error::other)?;
    // Only this user may write it (whatever the umask), or the next agent would refuse it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&beside)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    std::io::Write::write_all(&mut file, &text)?;
    std::fs::rename(&beside, path)
}

/// The ledger `path` taken for this agent alone: held until the file returned is dropped (or
/// the process ends, however it ends). Two agents on one ledger (two started for one cluster)
/// would take each other's instances, and one stopping would stop the other's: the second is
/// refused, naming the file and the fix.
pub fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = Path::new(&lock);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", lock.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another fleet-agent keeps its instances in {} (it holds {}): two agents for one \
             cluster would fight over its instances and its proxies; stop that one first (an \
             agent for another cluster needs its own --cluster)",
            path.display(),
            lock.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock {}: {e}", lock.display())
        }
    }
}

/// A directory of this user's only, `name` in the temporary directory: made (mode 0700) if
/// it is not there; an error if another user owns it or may enter it.
pub fn private_dir(name: &str) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(name);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    checked_private(dir)
}

/// `dir`, if it is a directory of this user's only (no one else may enter it); else an error.
pub fn checked_private(dir: std::path::PathBuf) -> std::io::Result<std::path::PathBuf> {
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != euid() || meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user's only (mode 0700)",
            dir.display()
        )));
    }
    Ok(dir)
}

pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This boot's id; empty where there is none to read.
fn boot() -> String {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    id.trim().to_string()
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
        let argv: Vec<String> = std::env::args().collect();
        let entry = |pid, started, command: &[String]| Entry {
            version: "v1".into(),
            index: 0,
            port: 1,
            pid,
            started,
            command: command.to_vec(),
        };
        assert!(entry(me, since, &argv).alive());
        assert!(
            !entry(me, since + 1, &argv).alive(),
            "another process with the id"
        );
        assert!(!entry(u32::MAX, since, &argv).alive(), "no such process");
        // PID 1 is root's, not this test's (unless it runs as root, as in a container).
        if euid() != 0 {
            let init = entry(1, started(1).unwrap(), &[]);
            assert!(!init.alive(), "another user's");
        }
    }

    #[test]
    fn a_ledger_is_one_agents_while_it_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.json");
        let first = lock(&path).unwrap();
        let refused = lock(&path).unwrap_err().to_string();
        assert!(
            refused.starts_with(&format!(
                "another fleet-agent keeps its instances in {}",
                path.display()
            )),
            "{refused}"
        );
        assert!(refused.ends_with(
            "stop that one first (an agent for another cluster needs its own --cluster)"
        ));
        drop(first);
        let _second = lock(&path).unwrap();
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
            command: vec!["app".into(), "--port".into(), "8081".into()],
        }];
        write(&path, &entries).unwrap();
        assert_eq!(read(&path), entries);
        // One others may write is not taken.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(read(&path).is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Nor one of another boot.
        let other = serde_json::json!({"boot": "another", "instances": entries});
        std::fs::write(&path, other.to_string()).unwrap();
        assert!(read(&path).is_empty());
        write(&path, &entries).unwrap();
        assert_eq!(read(&path), entries);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only this user's, whatever the umask");
        write(&path, &[]).unwrap();
        assert!(!path.exists(), "none kept: no file");
        write(&path, &entries).unwrap();
        std::fs::write(&path, "not json").unwrap();
        assert!(read(&path).is_empty());
    }
}
