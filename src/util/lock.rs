//! File locks (flock): one holder at a time (or many sharing), across
//! processes. Released when the guard drops or the process dies. Workspaces,
//! the image store, checkpoints and the boot cache each lock their own file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("locking {path}: {source}")]
pub struct LockError {
    pub path: String,
    pub source: std::io::Error,
}

pub struct FileLock {
    _file: File,
}

fn lock_err(path: &Path) -> impl Fn(std::io::Error) -> LockError + '_ {
    move |source| LockError {
        path: path.display().to_string(),
        source,
    }
}

fn open_lock_file(path: &Path) -> Result<File, LockError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(lock_err(path))
}

/// flock with EINTR retried; Ok(false) when LOCK_NB found it held.
fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(e),
        }
    }
}

impl FileLock {
    /// Blocks until the lock is ours.
    pub fn acquire(path: &Path) -> Result<FileLock, LockError> {
        let file = open_lock_file(path)?;
        flock(&file, libc::LOCK_EX).map_err(lock_err(path))?;
        Ok(FileLock { _file: file })
    }

    /// Blocks until no one holds it exclusively; many may share it.
    pub fn acquire_shared(path: &Path) -> Result<FileLock, LockError> {
        let file = open_lock_file(path)?;
        flock(&file, libc::LOCK_SH).map_err(lock_err(path))?;
        Ok(FileLock { _file: file })
    }

    /// The lock if nobody holds it, None otherwise.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, LockError> {
        let file = open_lock_file(path)?;
        let got = flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(lock_err(path))?;
        Ok(got.then_some(FileLock { _file: file }))
    }
}
