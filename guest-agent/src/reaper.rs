//! PID 1 must reap every orphan, but exec sessions need their own child's
//! exit status. One thread reaps everything and hands statuses to whoever
//! registered the pid. Sessions spawn *and* register while holding the
//! table lock, so the reaper can never see a child's exit before its
//! registration, and no stale status can match a reused pid.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use guest_agent::ExitStatus;

/// Who waits for which pid, and how many children were ever spawned: the
/// reaper, finding no child at all, sleeps until that count moves.
#[derive(Default)]
struct Table {
    watchers: HashMap<i32, Sender<ExitStatus>>,
    spawned: u64,
}

fn table() -> &'static (Mutex<Table>, Condvar) {
    static T: OnceLock<(Mutex<Table>, Condvar)> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn lock() -> MutexGuard<'static, Table> {
    table().0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `spawn` (which returns the new child's pid) and registers the pid
/// for its exit status, atomically with respect to the reaper.
pub fn spawn_watched<T>(
    spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
) -> std::io::Result<(T, Receiver<ExitStatus>)> {
    let mut t = lock();
    let (value, pid) = spawn()?;
    let (tx, rx) = channel();
    t.watchers.insert(pid, tx);
    t.spawned += 1;
    table().1.notify_all();
    Ok((value, rx))
}

fn decode(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

/// The reaper thread. With no child at all it blocks until the next spawn
/// instead of polling: every new child comes from `spawn_watched` (orphans
/// are reparented to us only while a child of ours exists, and then
/// `waitpid` blocks). An idle guest thus takes no wake-ups from us, which
/// on a PVM host (guest kernel emulated) was most of an idle guest's CPU.
pub fn spawn() {
    let _ = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            let seen = lock().spawned;
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                // Orphans nobody registered are simply reaped.
                if let Some(tx) = lock().watchers.remove(&pid) {
                    let _ = tx.send(decode(status));
                }
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // A spawn after `seen` was read has moved the count (it
                // spawns and counts under the lock), so none is missed.
                let (m, cv) = table();
                let t = m.lock().unwrap_or_else(|p| p.into_inner());
                let _unused = cv
                    .wait_while(t, |t| t.spawned == seen)
                    .unwrap_or_else(|p| p.into_inner());
            }
        });
}
