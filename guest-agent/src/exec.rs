//! One exec session: spawn the command (with pipes or a pty), stream its
//! output, forward stdin, signals and window size, and report its exit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_agent::{
    read_frame, write_frame, write_json, ErrorMsg, ExecRequest, FrameError, Kind, ResizeMsg,
    SignalMsg, CHUNK,
};

use crate::reaper;

pub type Writer = Arc<Mutex<File>>;

/// After the process exits, how long its output may take to drain (a
/// background grandchild can hold the pipe open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn send(w: &Writer, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *f, kind, payload)
}

pub fn send_error(w: &Writer, message: String) {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    let _ = write_json(&mut *f, Kind::Error, &ErrorMsg { message });
}

pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Looks a user up by name or number in /etc/passwd.
pub(crate) fn lookup_user(spec: &str) -> Option<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == spec || f[2] == spec) {
            return Some(User {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            });
        }
    }
    // A bare uid without a passwd entry is still a valid identity.
    spec.parse().ok().map(|uid| User {
        uid,
        gid: uid,
        home: "/".into(),
    })
}

/// Finds `prog` the way a shell would, so a missing command is a clean
/// error rather than a failed exec.
fn resolve(prog: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        return executable(std::path::Path::new(prog)).then(|| prog.to_string());
    }
    path.split(':')
        .map(|d| std::path::Path::new(if d.is_empty() { "." } else { d }).join(prog))
        .find(|p| executable(p))
        .map(|p| p.display().to_string())
}

fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

fn open_pty(rows: u16, cols: u16) -> std::io::Result<(File, File)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into our locals; no name/termios.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh from openpty and owned from here on.
    let (m, s) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    if rows > 0 && cols > 0 {
        set_winsize(m.as_raw_fd(), rows, cols);
    }
    Ok((m, s))
}

/// Room for 1 MiB in a command's output pipe (the kernel's default cap
/// for pipe-max-size): a writer then blocks, and we wake, once per MiB
/// instead of every 64 KiB. Pages are still taken only as data comes.
/// Best effort: a smaller pipe only costs context switches.
fn widen_pipe(fd: i32) {
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; no pointers involved.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn pump(mut src: impl Read, kind: Kind, w: Writer, done: std::sync::mpsc::Sender<()>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if send(&w, kind, &buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A pty master reads EIO once the last slave fd is closed.
            Err(_) => break,
        }
    }
    let _ = done.send(());
}

pub fn run(req: ExecRequest, mut reader: File, w: Writer) {
    let Some(prog) = req.argv.first().cloned() else {
        send_error(&w, "empty command".into());
        return;
    };
    let user = match req.user.as_deref() {
        Some(u) => match lookup_user(u) {
            Some(x) => Some(x),
            None => {
                send_error(&w, format!("unknown user {u:?}"));
                return;
            }
        },
        None => None,
    };
    let home = user
        .as_ref()
        .map_or("/root".to_string(), |u| u.home.clone());
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home.clone()),
        ("HOSTNAME".into(), crate::init::hostname()),
    ];
    if req.tty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    // Set by the VMM on PVM hosts, where AVX state is not preserved across
    // guest context switches: every command must inherit it.
    if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
        env.push(("GLIBC_TUNABLES".into(), t));
    }
    for (k, v) in &req.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH.to_string(), |(_, v)| v.clone());
    let Some(resolved) = resolve(&prog, &path) else {
        send_error(&w, format!("{prog}: command not found"));
        return;
    };
    let cwd = req
        .cwd
        .clone()
        .unwrap_or(if user.is_some() { home } else { "/".into() });
    if !std::path::Path::new(&cwd).is_dir() {
        send_error(&w, format!("working directory {cwd}: no such directory"));
        return;
    }

    let mut cmd = Command::new(&resolved);
    cmd.arg0(&prog)
        .args(&req.argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(&cwd);
    if let Some(u) = &user {
        cmd.uid(u.uid).gid(u.gid);
    }
    let mut master = None;
    if req.tty {
        let (m, s) = match open_pty(req.rows, req.cols) {
            Ok(p) => p,
            Err(e) => {
                send_error(&w, format!("allocating a pty: {e}"));
                return;
            }
        };
        let (Ok(s1), Ok(s2)) = (s.try_clone(), s.try_clone()) else {
            send_error(&w, "duplicating the pty".into());
            return;
        };
        cmd.stdin(Stdio::from(s))
            .stdout(Stdio::from(s1))
            .stderr(Stdio::from(s2));
        // SAFETY: setsid and ioctl are async-signal-safe; the child makes
        // the pty (its stdin) its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        master = Some(m);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe: the command gets its own
        // session, away from the agent's.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let spawned = reaper::spawn_watched(|| {
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        Ok((child, pid))
    });
    let (mut child, exit_rx) = match spawned {
        Ok(x) => x,
        Err(e) => {
            send_error(&w, format!("{prog}: {e}"));
            return;
        }
    };
    let pid = child.id() as i32;
    // The parent's copies of the pty slave are in `cmd`: drop them so the
    // master sees EOF when the process is done.
    drop(cmd);

    let (done_tx, done_rx) = channel();
    let mut pumps = 0;
    let mut stdin: Option<Box<dyn Write + Send>> = None;
    let mut master_fd = -1;
    if let Some(m) = master {
        master_fd = m.as_raw_fd();
        if let Ok(out) = m.try_clone() {
            let (w2, d2) = (w.clone(), done_tx.clone());
            std::thread::spawn(move || pump(out, Kind::Stdout, w2, d2));
            pumps += 1;
        }
        stdin = Some(Box::new(m));
    } else {
        if let Some(out) = child.stdout.take() {
            widen_pipe(out.as_raw_fd());
            let (w2, d2) = (w.clone(), done_tx.clone());
            std::thread::spawn(move || pump(out, Kind::Stdout, w2, d2));
            pumps += 1;
        }
        if let Some(err) = child.stderr.take() {
            widen_pipe(err.as_raw_fd());
            let (w2, d2) = (w.clone(), done_tx.clone());
            std::thread::spawn(move || pump(err, Kind::Stderr, w2, d2));
            pumps += 1;
        }
        if let Some(i) = child.stdin.take() {
            stdin = Some(Box::new(i));
        }
    }

    // Host -> process: stdin, signals, resizes. If the host goes away the
    // process is killed: an exec does not outlive its client.
    let exited = Arc::new(AtomicBool::new(false));
    let exited2 = exited.clone();
    std::thread::spawn(move || loop {
        match read_frame(&mut reader) {
            Ok(f) => match f.kind {
                Kind::Stdin if f.payload.is_empty() => stdin = None,
                Kind::Stdin => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&f.payload).is_err() {
                            stdin = None;
                        }
                    }
                }
                Kind::Signal => {
                    if let Ok(SignalMsg { signal }) = f.json() {
                        if (1..=64).contains(&signal) && !exited2.load(Ordering::SeqCst) {
                            // SAFETY: kill with a validated signal number.
                            unsafe { libc::kill(pid, signal) };
                        }
                    }
                }
                Kind::Resize if master_fd >= 0 => {
                    if let Ok(ResizeMsg { rows, cols }) = f.json() {
                        set_winsize(master_fd, rows, cols);
                    }
                }
                _ => {}
            },
            Err(FrameError::Eof) | Err(FrameError::Io(_)) => {
                if !exited2.load(Ordering::SeqCst) {
                    // SAFETY: the process (and its session) is still ours.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                return;
            }
            // A malformed frame is ignored; the session goes on.
            Err(_) => {}
        }
    });

    let status = exit_rx.recv().unwrap_or(guest_agent::ExitStatus::Code(255));
    exited.store(true, Ordering::SeqCst);
    for _ in 0..pumps {
        if done_rx.recv_timeout(DRAIN_TIMEOUT).is_err() {
            break;
        }
    }
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    let _ = write_json(&mut *f, Kind::Exit, &status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_resolve_like_a_shell() {
        assert_eq!(
            resolve("sh", DEFAULT_PATH)
                .as_deref()
                .map(|p| p.ends_with("/sh")),
            Some(true)
        );
        assert_eq!(resolve("definitely-not-a-command", DEFAULT_PATH), None);
        assert_eq!(resolve("/bin/sh", "").as_deref(), Some("/bin/sh"));
        assert_eq!(resolve("/etc/passwd", ""), None, "not executable");
    }

    #[test]
    fn users_by_name_or_number() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user("0").unwrap().uid, 0);
        assert_eq!(lookup_user("4242").unwrap().uid, 4242);
        assert!(lookup_user("no-such-user-here").is_none());
    }
}
