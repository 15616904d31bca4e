//! Launching a workspace's VMM (boot or restore), waiting for its guest
//! agent, and what every ready guest gets: identity, clock, entropy and
//! its secrets.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Context, Error, IoContext, Reporter, Result, CONTROL_TIMEOUT};
use crate::agent::secrets as agent_secrets;
use crate::agent::{wait_ready, AgentConn};
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::secrets::SecretStore;
use crate::workspace::state::{read_exit_record, supervisor_alive, vmm_processes, Status};
use crate::workspace::store::{WorkspaceDir, WorkspaceRecord};

/// How long `start` waits for the VMM to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What `launch` does once the guest agent answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AfterReady {
    /// Deliver the workspace's secrets (the usual case).
    DeliverSecrets,
    /// Leave /run/secrets empty: the caller snapshots first (boot cache).
    NoSecrets,
}

/// A VMM that `launch` started.
pub struct Launched {
    pub vmm_pid: Option<u32>,
    /// When the VMM first answered on its control socket: the VM is built
    /// (booted or restored) and its vCPUs run. The guest agent comes later.
    pub running_at: Instant,
}

/// Kills whatever VMM processes of this workspace are still alive (an
/// orphan of a killed supervisor, a half-started launch). Identified by
/// /proc (our binary, this workspace directory), never by pattern.
pub(crate) fn kill_strays(ws: &WorkspaceDir) {
    for pid in vmm_processes(ws) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !vmm_processes(ws).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns the workspace's VMM (booting, or resuming `restore_from`), waits
/// for its control socket and, with `wait`, for the guest agent, which then
/// gives the guest its identity (hostname, machine-id, clock, entropy:
/// fresh for a restored guest too). Records the workspace as running.
pub fn launch(
    state: &crate::workspace::store::StateDir,
    ws: &WorkspaceDir,
    rec: &mut WorkspaceRecord,
    restore_from: Option<&Path>,
    wait: Option<Duration>,
    after: AfterReady,
    report: &dyn Reporter,
) -> Result<Launched> {
    // Never two VMMs on one disk: a VMM that outlived its supervisor (it
    // should not: it dies with it) is ended before another starts.
    kill_strays(ws);
    // Held until the record says Running: no other start takes a volume
    // this VM is about to write.
    let volumes = super::volume::claim_volumes(state, &ws.name, &rec.volumes)?;
    // Finishes a rollback a crash cut short; turns a pre-chain flat disk
    // into a chain's base.
    crate::workspace::disk::ensure_chain(ws)?;
    let _ = std::fs::remove_file(ws.exit_record());
    let _ = std::fs::remove_file(ws.control_socket());
    let run_as = super::vmm_user::resolve()?;
    // Not through a link: the jailed VMM's user can create names here.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(ws.vmm_log())
        .io_ctx(|| format!("opening {}", ws.vmm_log().display()))?;
    let exe = std::env::current_exe().io_ctx(|| "locating the microagent binary".into())?;
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "supervise", "--workspace-dir"])
        .arg(&ws.dir)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .io_ctx(|| "duplicating the VMM log".into())?,
        )
        .stderr(log);
    if let Some(dir) = restore_from {
        cmd.arg("--restore-from").arg(dir);
    }
    if let Some(who) = run_as {
        cmd.arg("--run-as").arg(who.to_string());
    }
    // SAFETY: setsid is async-signal-safe and the closure touches nothing
    // else; it detaches the VMM from the caller's session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().io_ctx(|| "spawning the VMM".into())?;
    let pid = child.id() as i32;
    // The supervisor outlives us; it is reaped by init once we exit.
    drop(child);

    let deadline = Instant::now() + START_TIMEOUT;
    let vmm_pid = loop {
        match control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT) {
            Ok(resp) => break resp.pid,
            Err(e) => {
                if !supervisor_alive(pid, ws) {
                    let why = read_exit_record(ws)
                        .map(|r| r.reason)
                        .unwrap_or_else(|| "the VMM exited".into());
                    rec.status = Status::Crashed;
                    rec.crash_reason = Some(why.clone());
                    rec.vmm_pid = None;
                    ws.write(rec)?;
                    return Err(Error::StartFailed {
                        workspace: ws.name.clone(),
                        reason: why,
                    });
                }
                if Instant::now() > deadline {
                    // SAFETY: kill on a process group we spawned; worst case it is gone.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    return Err(e).ctx(|| {
                        format!(
                            "workspace {} did not start within {}s",
                            ws.name,
                            START_TIMEOUT.as_secs()
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let running_at = Instant::now();
    rec.status = Status::Running;
    rec.vmm_pid = Some(pid);
    rec.crash_reason = None;
    // Its next snapshot may be a diff over the memory it resumed.
    rec.memory_base = restore_from.map(Path::to_path_buf);
    ws.write(rec)?;
    drop(volumes);
    if let Some(timeout) = wait {
        let t = Instant::now();
        if let Err(e) = wait_ready(&ws.vsock_socket(), timeout, || supervisor_alive(pid, ws)) {
            // A VMM that died says why in its exit record.
            if !supervisor_alive(pid, ws) {
                if let Some(exit) = read_exit_record(ws).filter(|r| r.supervisor_pid == pid) {
                    return Err(Error::StartFailed {
                        workspace: ws.name.clone(),
                        reason: exit.reason,
                    });
                }
            }
            return Err(e).ctx(|| {
                format!(
                    "workspace {} is running but its guest agent is not answering",
                    ws.name
                )
            });
        }
        // Every guest gets its machine-id and host entropy here, so a
        // cold-booted and a warm-started workspace look alike.
        refresh_identity(ws, &rec.name)?;
        // A restored guest's /run/secrets was scrubbed before its memory
        // was saved: deliver the host's current values (replace: nothing
        // stale survives).
        if after == AfterReady::DeliverSecrets && has_secrets(ws)? {
            deliver_secrets(ws, true)?;
        }
        report.step(&format!(
            "guest agent ready after {:.1}s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(Launched {
        vmm_pid,
        running_at,
    })
}

pub(crate) fn has_secrets(ws: &WorkspaceDir) -> Result<bool> {
    Ok(!SecretStore::of(ws).keys()?.is_empty())
}

/// Delivers the host's secrets into a running guest, retried like the
/// identity refresh (a loaded PVM host can make the guest slow to answer).
pub(crate) fn deliver_secrets(ws: &WorkspaceDir, replace: bool) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match agent_secrets::deliver(ws, replace) {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 3 => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Hostname, clock, entropy and machine-id for a guest that was resumed
/// from a snapshot (a fork must not share its source's identity or RNG).
fn refresh_identity(ws: &WorkspaceDir, hostname: &str) -> Result<()> {
    let mut entropy = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
        .io_ctx(|| "reading host entropy".into())?;
    let hex = crate::digest::hex(&entropy);
    let request = || {
        // Read at the last moment: the guest sets its clock to this, so
        // it is behind by however long the request takes to arrive.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        guest_agent::Request::Refresh(guest_agent::Refresh {
            hostname: hostname.to_string(),
            unix_time_ns: now,
            entropy_hex: hex[..64].to_string(),
            machine_id: hex[64..96].to_string(),
        })
    };
    // Idempotent, so retried: a loaded host (many forks at once) can make
    // an emulated guest kernel slow to answer.
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        match AgentConn::request(&ws.vsock_socket(), Duration::from_secs(120), &request()) {
            Ok(r) => break r,
            Err(e) if attempt >= 3 => {
                return Err(e).ctx(|| format!("refreshing the identity of workspace {}", ws.name))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    if !resp.ok {
        return Err(Error::Agent(crate::agent::AgentError::Remote(resp.message)))
            .ctx(|| format!("refreshing the identity of workspace {}", ws.name));
    }
    Ok(())
}
