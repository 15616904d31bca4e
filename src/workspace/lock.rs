//! Per-workspace lifecycle lock (flock): one lifecycle operation at a time,
//! across processes. Released when the guard drops or the process dies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("locking {path}: {source}")]
pub struct LockError {
    pub path: String,
    pub source: std::io::Error,
}

pub struct WorkspaceLock {
    _file: File,
}

impl WorkspaceLock {
    /// Blocks until the lock is ours.
    pub fn acquire(path: &Path) -> Result<WorkspaceLock, LockError> {
        let err = |source| LockError {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(WorkspaceLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(err(e));
            }
        }
    }
}
