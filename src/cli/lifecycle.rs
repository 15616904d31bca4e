//! start, pause, resume, and what they share with snapshot and warm starts:
//! opening a workspace under its lock, launching the VMM, delivering
//! secrets and refreshing identity after a restore.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::output::{print_record, record_json, Out};
use super::warm::{self, Boot};
use crate::agent::secrets as agent_secrets;
use crate::agent::{wait_ready, AgentConn};
use crate::digest::sha256_file;
use crate::snapshot::manifest::{
    validate_tag, HostCpu, Manifest, MANIFEST, MEMORY, ROOTFS, VMSTATE,
};
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::control::{self, Op as CtlOp};
use crate::vmm::host;
use crate::workspace::busy;
use crate::workspace::disk::copy_disk;
use crate::workspace::lock::WorkspaceLock;
use crate::workspace::secrets::SecretStore;
use crate::workspace::state::{check, read_exit_record, reconcile, supervisor_alive, Op, Status};
use crate::workspace::store::{StateDir, WorkspaceDir, WorkspaceRecord};

/// How long `start` waits for the VMM to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a control-socket request may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// Lock, read and reconcile: the common opening of every lifecycle command.
pub(crate) fn open(
    state: &StateDir,
    name: &str,
) -> Result<(WorkspaceDir, WorkspaceLock, WorkspaceRecord, Status)> {
    let ws = state.existing(name)?;
    let lock = busy::lock(&ws)?;
    reconciled(ws, lock)
}

pub(crate) fn reconciled(
    ws: WorkspaceDir,
    lock: WorkspaceLock,
) -> Result<(WorkspaceDir, WorkspaceLock, WorkspaceRecord, Status)> {
    let mut rec = ws.read()?;
    let (status, reason) = reconcile(&ws, &rec);
    if status != rec.status {
        // The VMM ended behind our back: record what happened.
        rec.status = status;
        rec.crash_reason = reason;
        rec.vmm_pid = None;
        ws.write(&rec)?;
    }
    Ok((ws, lock, rec, status))
}

#[derive(Args)]
pub struct NameArgs {
    pub name: String,
}

#[derive(Args)]
pub struct StartArgs {
    pub name: String,
    /// Return once the VMM runs, without waiting for the guest agent.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the guest agent (boots are slow on PVM hosts).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Roll back: resume memory, devices and disk from this snapshot tag.
    #[arg(long, value_name = "TAG")]
    from_snapshot: Option<String>,
    /// First start: boot the kernel even when a boot snapshot of an equal
    /// workspace is cached (and do not cache this boot).
    #[arg(long, conflicts_with = "from_snapshot")]
    cold: bool,
}

pub fn start(state: &StateDir, args: StartArgs, out: &Out) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, &args.name)?;
    check(&ws.name, status, Op::Start)?;
    let wait = (!args.no_wait).then(|| Duration::from_secs(args.timeout));
    let t = Instant::now();
    let (launched, boot, how) = match &args.from_snapshot {
        Some(tag) => {
            let dir = snapshot_dir(&ws, tag)?;
            check_snapshot(&dir, &rec)?;
            // Roll the disk back with the memory: both are from that moment.
            copy_disk(&dir.join(ROOTFS), &ws.rootfs())?;
            let l = launch(
                &ws,
                &mut rec,
                Some(&dir),
                wait,
                AfterReady::DeliverSecrets,
                out,
            )?;
            (l, Boot::Snapshot, format!(" from snapshot {tag}"))
        }
        None if status == Status::Created => {
            let first = warm::first_start(state, &ws, &mut rec, wait, args.cold, out)?;
            let how = match (first.boot, &first.key) {
                (Boot::Warm, Some(k)) => format!(" (warm start from boot snapshot {})", &k[..12]),
                (Boot::Cold, Some(k)) if first.cached => {
                    format!(" (cold boot; cached as boot snapshot {})", &k[..12])
                }
                _ => " (cold boot)".to_string(),
            };
            (first.launched, first.boot, how)
        }
        None => {
            let l = launch(&ws, &mut rec, None, wait, AfterReady::DeliverSecrets, out)?;
            (l, Boot::Cold, String::new())
        }
    };
    let mut json = record_json(&ws, &rec, Status::Running, None, launched.vmm_pid);
    json["boot"] = boot.name().into();
    json["running_ms"] = (launched.running_at.duration_since(t).as_millis() as u64).into();
    json["start_ms"] = (t.elapsed().as_millis() as u64).into();
    out.done(
        &format!(
            "workspace {} started{how} in {:.1}s",
            ws.name,
            t.elapsed().as_secs_f64()
        ),
        json,
    );
    Ok(0)
}

/// Snapshot TAG of a workspace, which must exist.
pub fn snapshot_dir(ws: &WorkspaceDir, tag: &str) -> Result<PathBuf> {
    validate_tag(tag).map_err(anyhow::Error::msg)?;
    let dir = ws.snapshots().join(tag);
    if !dir.join(MANIFEST).is_file() {
        bail!("snapshot {tag} of workspace {} does not exist", ws.name);
    }
    Ok(dir)
}

/// Reads a snapshot's manifest and refuses what cannot run here: another
/// kernel, CPU template, host CPU or TSC rate, or missing files.
pub fn check_snapshot(dir: &Path, rec: &WorkspaceRecord) -> Result<Manifest> {
    let m = Manifest::read(dir)?;
    let kernel_now = sha256_file(Path::new(&rec.kernel))
        .with_context(|| format!("hashing kernel {}", rec.kernel))?;
    let host_cpuid = rec
        .cpu_template
        .parse::<CpuTemplate>()
        .ok()
        .and_then(|t| host::guest_cpuid(t, m.vcpus));
    m.check_compatible(
        &kernel_now,
        &rec.cpu_template,
        &HostCpu::current(),
        host::guest_tsc_khz(),
        host_cpuid.as_deref(),
    )?;
    if m.vcpus != rec.vcpus || m.memory_mib != rec.memory_mib {
        bail!(
            "snapshot has {} vCPUs and {} MiB, workspace {} has {} and {} MiB",
            m.vcpus,
            m.memory_mib,
            rec.name,
            rec.vcpus,
            rec.memory_mib
        );
    }
    for name in [VMSTATE, MEMORY, ROOTFS] {
        let want = m
            .file(name)
            .with_context(|| format!("snapshot manifest lists no {name}"))?;
        let size = std::fs::metadata(dir.join(name))
            .map(|md| md.len())
            .unwrap_or(u64::MAX);
        if size != want.size {
            bail!(
                "snapshot file {name} is damaged: {size} bytes, manifest says {}",
                want.size
            );
        }
    }
    // The VM state is small: check it whole (magic, version, checksum,
    // shape) before anything is changed or started.
    let bytes = std::fs::read(dir.join(VMSTATE))
        .with_context(|| format!("reading {}", dir.join(VMSTATE).display()))?;
    crate::snapshot::format::decode::<crate::vmm::snapshot::VmSnapshot>(&bytes)
        .with_context(|| format!("snapshot {}", dir.display()))?;
    Ok(m)
}

/// What `launch` does once the guest agent answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AfterReady {
    /// Deliver the workspace's secrets (the usual case).
    DeliverSecrets,
    /// Leave /run/secrets empty: the caller snapshots first (boot cache).
    NoSecrets,
}

/// Spawns the workspace's VMM (booting, or resuming `restore_from`), waits
/// for its control socket and, with `wait`, for the guest agent, which then
/// gives the guest its identity (hostname, machine-id, clock, entropy:
/// fresh for a restored guest too). Records the workspace as running.
/// A VMM that `launch` started.
pub struct Launched {
    pub vmm_pid: Option<u32>,
    /// When the VMM first answered on its control socket: the VM is built
    /// (booted or restored) and its vCPUs run. The guest agent comes later.
    pub running_at: Instant,
}

pub fn launch(
    ws: &WorkspaceDir,
    rec: &mut WorkspaceRecord,
    restore_from: Option<&Path>,
    wait: Option<Duration>,
    after: AfterReady,
    out: &Out,
) -> Result<Launched> {
    let _ = std::fs::remove_file(ws.exit_record());
    let _ = std::fs::remove_file(ws.control_socket());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.vmm_log())
        .with_context(|| format!("opening {}", ws.vmm_log().display()))?;
    let exe = std::env::current_exe().context("locating the microagent binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "supervise", "--workspace-dir"])
        .arg(&ws.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(dir) = restore_from {
        cmd.arg("--restore-from").arg(dir);
    }
    // SAFETY: setsid is async-signal-safe and the closure touches nothing
    // else; it detaches the VMM from the CLI's session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawning the VMM")?;
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
                    bail!("workspace {} failed to start: {why}", ws.name);
                }
                if Instant::now() > deadline {
                    // SAFETY: kill on a pid we spawned; worst case it is gone.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    bail!(
                        "workspace {} did not start within {}s: {e}",
                        ws.name,
                        START_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let running_at = Instant::now();
    rec.status = Status::Running;
    rec.vmm_pid = Some(pid);
    rec.crash_reason = None;
    ws.write(rec)?;
    if let Some(timeout) = wait {
        let t = Instant::now();
        wait_ready(&ws.vsock_socket(), timeout, || supervisor_alive(pid, ws)).with_context(
            || {
                format!(
                    "workspace {} is running but its guest agent is not answering",
                    ws.name
                )
            },
        )?;
        // Every guest gets its machine-id and host entropy here, so a
        // cold-booted and a warm-started workspace look alike.
        refresh_identity(ws, &rec.name)?;
        // A restored guest's /run/secrets was scrubbed before its memory
        // was saved: deliver the host's current values (replace: nothing
        // stale survives).
        if after == AfterReady::DeliverSecrets && has_secrets(ws)? {
            deliver_secrets(ws, true)?;
        }
        if !out.json && !out.quiet {
            eprintln!("guest agent ready after {:.1}s", t.elapsed().as_secs_f64());
        }
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
        .context("reading host entropy")?;
    let hex = crate::digest::hex(&entropy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let req = guest_agent::Request::Refresh(guest_agent::Refresh {
        hostname: hostname.to_string(),
        unix_time_ns: now,
        entropy_hex: hex[..64].to_string(),
        machine_id: hex[64..96].to_string(),
    });
    // Idempotent, so retried: a loaded host (many forks at once) can make
    // an emulated guest kernel slow to answer.
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        match AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(120))
            .and_then(|c| c.call(&req))
        {
            Ok(r) => break r,
            Err(e) if attempt >= 3 => {
                return Err(e)
                    .with_context(|| format!("refreshing the identity of workspace {}", ws.name))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    if !resp.ok {
        bail!(
            "refreshing the identity of workspace {}: {}",
            ws.name,
            resp.message
        );
    }
    Ok(())
}

fn pause_or_resume(state: &StateDir, name: &str, out: &Out, pause: bool) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, name)?;
    check(&ws.name, status, if pause { Op::Pause } else { Op::Resume })?;
    let op = if pause { CtlOp::Pause } else { CtlOp::Resume };
    let resp = control::request(&ws.control_socket(), op, CONTROL_TIMEOUT)?;
    // A workspace snapshotted while paused had its secrets scrubbed.
    if !pause && has_secrets(&ws)? {
        deliver_secrets(&ws, true)?;
    }
    rec.status = if pause {
        Status::Paused
    } else {
        Status::Running
    };
    ws.write(&rec)?;
    let verb = if pause { "paused" } else { "resumed" };
    print_record(
        out,
        &ws,
        &rec,
        rec.status,
        None,
        resp.pid,
        &format!("workspace {} {verb}", ws.name),
    );
    Ok(0)
}

pub fn pause(state: &StateDir, args: NameArgs, out: &Out) -> Result<i32> {
    pause_or_resume(state, &args.name, out, true)
}

pub fn resume(state: &StateDir, args: NameArgs, out: &Out) -> Result<i32> {
    pause_or_resume(state, &args.name, out, false)
}
