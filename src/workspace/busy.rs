//! `busy.json`: which long operation holds a workspace's lock right now.
//!
//! Short lifecycle operations queue behind each other on the lock. A
//! snapshot can hold it for seconds to minutes, so while one runs the
//! workspace reports `snapshotting` and other lifecycle operations are
//! refused at once instead of waiting behind it. The marker names the
//! holder's pid: one left behind by a killed process is ignored (and the
//! next holder overwrites it).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{now_rfc3339, read_bounded, write_atomic, StoreError, WorkspaceDir};
use crate::util::lock::{FileLock, LockError};

/// How often a waiting operation re-checks whether the holder is busy.
const POLL: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Busy {
    /// What is running, as a status word: `snapshotting`.
    pub op: String,
    /// What it works on (the snapshot tag).
    pub detail: String,
    pub pid: u32,
    pub since: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BusyError {
    #[error(
        "workspace {name} is {op} ({detail}, pid {pid}, since {since}); try again when it finishes"
    )]
    Busy {
        name: String,
        op: String,
        detail: String,
        pid: u32,
        since: String,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn marker_path(ws: &WorkspaceDir) -> PathBuf {
    ws.dir.join("busy.json")
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// The long operation running on `ws`, if its holder is alive.
pub fn current(ws: &WorkspaceDir) -> Option<Busy> {
    let bytes = read_bounded(&marker_path(ws)).ok()?;
    let busy: Busy = serde_json::from_slice(&bytes).ok()?;
    pid_alive(busy.pid).then_some(busy)
}

/// Takes the workspace lock, waiting behind short operations but refusing
/// at once while a long one (a snapshot) holds it.
pub fn lock(ws: &WorkspaceDir) -> Result<FileLock, BusyError> {
    loop {
        if let Some(lock) = FileLock::try_acquire(&ws.lock_path())? {
            return Ok(lock);
        }
        if let Some(b) = current(ws) {
            return Err(BusyError::Busy {
                name: ws.name.clone(),
                op: b.op,
                detail: b.detail,
                pid: b.pid,
                since: b.since,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// How long `lock_evicting` keeps trying before it reports the holder.
const EVICT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `pid` runs this same program: a marker's pid could have been
/// reused by an unrelated process, which must never be killed.
fn runs_this_program(pid: u32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe"));
    let ours = std::fs::read_link("/proc/self/exe");
    matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
}

/// Takes the workspace lock for `delete --force`: a long operation holding
/// it (a snapshot) is killed first, which releases its lock. Whatever it
/// half-made lives inside the workspace that is about to go. A holder that
/// is not a microagent process is never killed: that is refused as busy.
pub fn lock_evicting(ws: &WorkspaceDir) -> Result<FileLock, BusyError> {
    let deadline = std::time::Instant::now() + EVICT_TIMEOUT;
    loop {
        match lock(ws) {
            Err(BusyError::Busy { pid, .. })
                if std::time::Instant::now() < deadline && runs_this_program(pid) =>
            {
                if let Ok(p) = i32::try_from(pid) {
                    // SAFETY: signals a live process checked to be one of
                    // ours just above.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(POLL);
            }
            other => return other,
        }
    }
}

/// Marks `ws` busy until dropped. The caller must hold the workspace lock.
pub struct BusyGuard {
    path: PathBuf,
}

impl BusyGuard {
    pub fn mark(ws: &WorkspaceDir, op: &str, detail: &str) -> Result<BusyGuard, StoreError> {
        let busy = Busy {
            op: op.to_string(),
            detail: detail.to_string(),
            pid: std::process::id(),
            since: now_rfc3339(),
        };
        let path = marker_path(ws);
        let json = serde_json::to_vec(&busy).expect("Busy serialises");
        write_atomic(&path, &json)?;
        Ok(BusyGuard { path })
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(dir: &std::path::Path) -> WorkspaceDir {
        WorkspaceDir {
            name: "builder".into(),
            dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn a_busy_holder_is_refused_and_a_dead_one_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = ws(tmp.path());
        let held = lock(&ws).unwrap();
        let guard = BusyGuard::mark(&ws, "snapshotting", "tag baseline").unwrap();
        let err = lock(&ws).err().expect("refused while busy").to_string();
        assert!(
            err.starts_with("workspace builder is snapshotting (tag baseline, pid "),
            "{err}"
        );
        assert_eq!(current(&ws).unwrap().op, "snapshotting");
        drop(guard);
        assert!(current(&ws).is_none());

        // A marker left by a process that no longer exists means nothing.
        let stale = Busy {
            op: "snapshotting".into(),
            detail: "tag x".into(),
            pid: u32::MAX - 1,
            since: now_rfc3339(),
        };
        std::fs::write(marker_path(&ws), serde_json::to_vec(&stale).unwrap()).unwrap();
        assert!(current(&ws).is_none());
        drop(held);
        assert!(lock(&ws).is_ok());
    }

    #[test]
    fn only_this_program_counts_as_an_evictable_holder() {
        // A marker's pid reused by another program must never be killed.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(!runs_this_program(other.id()));
        assert!(runs_this_program(std::process::id()));
        assert!(!runs_this_program(u32::MAX - 1));
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
