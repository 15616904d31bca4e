//! One passt process per VM, connected over a socketpair (`--fd`): no
//! socket path to race on, and passt exits when the VMM's end closes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::config::{NetConfig, DNS, GATEWAY, GUEST_IP, PREFIX_LEN};

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("starting passt {0} (the user-mode network; run scripts/build-passt.sh, or set MICROAGENT_PASST): {1}")]
    Spawn(String, std::io::Error),
    #[error("passt exited at start ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("passt did not come up within {0:?}")]
    Timeout(Duration),
    #[error("passt socket: {0}")]
    Socket(std::io::Error),
    #[error("published port {port}: host address {addr} cannot be bound: {source}")]
    PortBusy {
        port: String,
        addr: String,
        source: std::io::Error,
    },
}

/// passt only logs a port it cannot bind and carries on; fail the start
/// instead, naming the port. (Racy by nature, but catches the usual
/// conflict: another workspace or service already has it.)
fn check_ports_free(cfg: &NetConfig) -> Result<(), PasstError> {
    for p in &cfg.ports {
        let addr = std::net::SocketAddrV4::new(p.addr, p.host);
        // The previous passt of this workspace (a rollback) may still be
        // closing its listener: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(_) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(PasstError::PortBusy {
                        port: p.to_string(),
                        addr: addr.to_string(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// A private directory for passt's pid file, which passt writes after it
/// has dropped root for `nobody`: so the directory belongs to nobody then.
struct PidDir(std::path::PathBuf);

use std::os::unix::fs::PermissionsExt;

impl PidDir {
    fn new() -> std::io::Result<PidDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "microagent-passt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // passt run as root writes its PID file either as nobody
            // (older builds switch user first) or as root without
            // CAP_DAC_OVERRIDE (newer ones drop capabilities first): the
            // directory is root's and nobody's group's, and no one else's.
            // SAFETY: getpwnam takes a NUL-terminated name and returns
            // a pointer to static storage or null; read at once.
            let nobody = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
            if !nobody.is_null() {
                // SAFETY: non-null, points to a valid passwd entry.
                let gid = unsafe { (*nobody).pw_gid };
                std::os::unix::fs::chown(&dir, None, Some(gid))?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))?;
            }
        }
        Ok(PidDir(dir))
    }
}

impl Drop for PidDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(10);

fn args(cfg: &NetConfig, fd: i32, pid_file: &std::path::Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--foreground".into(),
        "--quiet".into(),
        "--ipv4-only".into(),
        "--fd".into(),
        fd.to_string(),
        "--pid".into(),
        pid_file.display().to_string(),
        "--address".into(),
        GUEST_IP.to_string(),
        "--netmask".into(),
        PREFIX_LEN.to_string(),
        "--gateway".into(),
        GATEWAY.to_string(),
        "--dns-forward".into(),
        DNS.to_string(),
        "--udp-ports".into(),
        "none".into(),
    ];
    // Debugging aid: MICROAGENT_PASST_DEBUG=DIR makes passt capture every
    // frame to DIR/passt-<pid>.pcap. (Debian 12's passt crashes in its
    // own --debug logging of TCP, so that stays off.)
    if let Some(dir) = std::env::var_os("MICROAGENT_PASST_DEBUG") {
        a.push("--pcap".into());
        a.push(
            std::path::Path::new(&dir)
                .join(format!("passt-{}.pcap", std::process::id()))
                .display()
                .to_string(),
        );
    }
    if cfg.ports.is_empty() {
        a.extend(["--tcp-ports".into(), "none".into()]);
    }
    for p in &cfg.ports {
        a.push("--tcp-ports".into());
        a.push(format!("{}/{}:{}", p.addr, p.host, p.guest));
    }
    a
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// What became of a passt whose socket closed. Its fds close before it
/// becomes a zombie, so give the exit a moment to land (this runs once,
/// when the link goes down).
pub fn exit_reason(child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return format!("passt {}", describe(st)),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return "passt closed its socket".into(),
        }
    }
}

/// Starts passt and waits until it has set up (ports bound), so a busy
/// port fails the start with passt's own message.
pub fn spawn(cfg: &NetConfig) -> Result<(UnixStream, Child), PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
    check_ports_free(cfg)?;
    let pid_dir = PidDir::new().map_err(PasstError::Socket)?;
    let pid_file = pid_dir.0.join("pid");
    let log = match &cfg.passt_log {
        // Not through a link a dropped VMM of an earlier run left.
        Some(p) => File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    };
    // The child end must survive exec: clear FD_CLOEXEC on a dup.
    // SAFETY: dup of an fd we own; the result is owned below.
    let fd = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD, 3) };
    if fd < 0 {
        return Err(PasstError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by F_DUPFD and nothing else owns it.
    let child_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(theirs);
    let binary = crate::paths::passt_binary();
    let mut child = Command::new(&binary)
        .args(args(cfg, fd, &pid_file))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| PasstError::Spawn(binary.display().to_string(), e))?;
    drop(child_fd);
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let log = cfg
                .passt_log
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            return Err(PasstError::Exited {
                status: describe(st),
                log,
            });
        }
        if std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0) {
            break;
        }
        if start.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PasstError::Timeout(READY_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ours.set_nonblocking(true).map_err(PasstError::Socket)?;
    Ok((ours, child))
}
