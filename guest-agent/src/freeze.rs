//! Freezing a filesystem (FIFREEZE): the upper, so the host can read the
//! workspace's changes from its disk, whole and with a clean journal
//! (`microagent commit` and `diff`), or a volume, for a consistent volume
//! snapshot. The freeze lasts as long as the
//! host's connection: the next frame, the connection closing, or a
//! timeout (a host that died must not leave the guest's writes blocked
//! forever) thaws it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::read_frame;

/// _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
/// A freeze never outlasts this, whatever the host asked.
const MAX_FREEZE: Duration = Duration::from_secs(600);

fn ioctl(fs: &File, op: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: FIFREEZE and FITHAW take an ignored int argument; the fd is
    // a directory of the filesystem, open for the life of `fs`.
    if unsafe { libc::ioctl(fs.as_raw_fd(), op as _, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Freezes the upper (its dirty data and journal are written first, and
/// the journal is left clean). Used at power-off too, never thawed then.
pub fn freeze(fs: &File) -> std::io::Result<()> {
    ioctl(fs, FIFREEZE)
}

fn thaw(fs: &File) {
    // EINVAL when the watchdog thawed it already.
    let _ = ioctl(fs, FITHAW);
}

/// Serves one freeze request on `fs` (a directory of the filesystem):
/// freeze, answer, wait for the host's next frame (or EOF, or the
/// timeout), thaw, answer.
pub fn serve(
    fs: &'static File,
    timeout_s: u32,
    mut reader: File,
    reply: impl Fn(Result<String, String>),
) {
    if let Err(e) = freeze(fs) {
        reply(Err(format!("freezing the filesystem: {e}")));
        return;
    }
    reply(Ok("frozen".into()));
    let done = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(u64::from(timeout_s)).min(MAX_FREEZE);
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Acquire) {
                if start.elapsed() >= limit {
                    thaw(fs);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let _ = read_frame(&mut reader);
    done.store(true, Ordering::Release);
    thaw(fs);
    let _ = watchdog.join();
    reply(Ok("thawed".into()));
}
