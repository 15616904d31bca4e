//! PID 1 must reap every orphan, but exec sessions need their own child's
//! exit status. One thread reaps everything and hands statuses to whoever
//! registered the pid. Sessions spawn *and* register while holding the
//! table lock, so the reaper can never see a child's exit before its
//! registration, and no stale status can match a reused pid.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use guest_agent::ExitStatus;

fn table() -> &'static Mutex<HashMap<i32, Sender<ExitStatus>>> {
    static T: OnceLock<Mutex<HashMap<i32, Sender<ExitStatus>>>> = OnceLock::new();
    T.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<i32, Sender<ExitStatus>>> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `spawn` (which returns the new child's pid) and registers the pid
/// for its exit status, atomically with respect to the reaper.
pub fn spawn_watched<T>(
    spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
) -> std::io::Result<(T, Receiver<ExitStatus>)> {
    let mut t = lock();
    let (value, pid) = spawn()?;
    let (tx, rx) = channel();
    t.insert(pid, tx);
    Ok((value, rx))
}

fn decode(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

pub fn spawn() {
    let _ = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                // Orphans nobody registered are simply reaped.
                if let Some(tx) = lock().remove(&pid) {
                    let _ = tx.send(decode(status));
                }
            } else {
                // No children right now.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
}
