//! The detached VMM of a workspace, in two processes of this binary:
//!
//! - `vmm supervise --workspace-dir D`: started by `launch` in a new
//!   session; runs the VMM as its child (which dies with it) and, when the
//!   child ends for any reason (power-off, halt, error, kill -9), writes
//!   `vmm-exit.json` so the engine can tell halted from crashed and say why.
//! - `vmm serve --workspace-dir D`: boots the workspace's VM and serves its
//!   control socket until the guest powers off or is halted.
//!
//! The directory and snapshot path come from the command line `launch`
//! builds, never from a control request.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use super::{invalid, vmm_user, Context, IoContext, Result};
use crate::devices::virtio::net::NetConfig;
use crate::snapshot::format;
use crate::snapshot::manifest::VMSTATE;
use crate::vmm::cgroup::{self, Limits, Placement};
use crate::vmm::control::{self, ServeInfo};
use crate::vmm::host;
use crate::vmm::jail::{self, RunAs};
use crate::vmm::seccomp;
use crate::vmm::snapshot::VmSnapshot;
use crate::vmm::vcpu::GuestStop;
use crate::vmm::vm::{DiskConfig, DiskFormat, Vm, VmConfig, VsockConfig};
use crate::workspace::state::ExitRecord;
use crate::workspace::store::{now_rfc3339, write_atomic, NetworkMode, WorkspaceDir};
use crate::workspace::volume;

/// Every guest is alone on its vsock, so all can use the first guest CID.
pub const GUEST_CID: u64 = 3;

fn workspace_dir(path: &Path) -> Result<WorkspaceDir> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid(format!("{}: no workspace name", path.display())))?
        .to_string();
    Ok(WorkspaceDir {
        name,
        dir: path.to_path_buf(),
    })
}

/// Last non-empty line the VMM wrote to its log: usually its error.
fn last_log_line(ws: &WorkspaceDir) -> Option<String> {
    // The log has no cap yet (device code may log per guest action): only
    // its end is read.
    let tail = crate::util::fs::read_tail(&ws.vmm_log(), 64 << 10).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// `vmm supervise`: runs the VMM as a child until it ends for any reason,
/// then writes the exit record. Returns the exit code.
pub fn supervise(
    workspace_dir: &Path,
    restore_from: Option<&Path>,
    run_as: Option<RunAs>,
) -> Result<i32> {
    let ws = self::workspace_dir(workspace_dir)?;
    let exe = std::env::current_exe().io_ctx(|| "locating the microagent binary".into())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["vmm", "serve", "--workspace-dir"]).arg(&ws.dir);
    if let Some(snap) = restore_from {
        cmd.arg("--restore-from").arg(snap);
    }
    if let Some(who) = run_as {
        cmd.arg("--run-as").arg(who.to_string());
    }
    let (placement, cgroup_dir) = limits_for(&ws);
    let json = serde_json::to_vec_pretty(&placement).map_err(std::io::Error::other);
    write_atomic(
        &ws.limits_record(),
        &json.io_ctx(|| "encoding the limits".into())?,
    )?;
    // Joined by the VMM itself before exec, so passt, which it starts,
    // is inside too.
    let procs = cgroup_dir
        .as_ref()
        .map(|d| std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_vec()))
        .transpose()
        .map_err(|e| invalid(format!("cgroup path: {e}")))?;
    // The VMM dies with its supervisor: a `kill -9` of the supervisor must
    // never leave a VMM writing the disk with nobody to record its end.
    let supervisor = nix::unistd::getpid();
    // SAFETY: prctl, getppid, open, write and close are async-signal-safe;
    // the closure touches nothing else between fork and exec (the path was
    // made before the fork).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The supervisor may have died before the line above ran.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::other("the VMM supervisor is gone"));
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().io_ctx(|| "starting the VMM".into())?;
    let vmm_pid = child.id();
    let status = child.wait().io_ctx(|| "waiting for the VMM".into());
    if let Some(dir) = &cgroup_dir {
        cgroup::remove(dir);
    }
    let status = status?;
    let (clean, reason) = match (status.code(), status.signal()) {
        // The SIGSYS handler's last words name the syscall.
        (Some(seccomp::EXIT_SECCOMP), _) => (
            false,
            last_log_line(&ws).unwrap_or_else(|| "seccomp violation".into()),
        ),
        (Some(0), _) => (
            true,
            last_log_line(&ws).unwrap_or_else(|| "VMM exited".into()),
        ),
        (Some(code), _) => (
            false,
            format!(
                "VMM exited with status {code}: {}",
                last_log_line(&ws).unwrap_or_else(|| "no message".into())
            ),
        ),
        // A SIGSYS the handler could not take (blocked at the time).
        (None, Some(libc::SIGSYS)) => (
            false,
            match seccomp::audited_violation(vmm_pid) {
                Some(name) => format!("seccomp violation (syscall {name})"),
                None => {
                    "seccomp violation (SIGSYS; the kernel's audit log names no syscall)".into()
                }
            },
        ),
        (None, Some(sig)) => (false, format!("VMM killed by signal {sig}")),
        (None, None) => (false, "VMM ended for an unknown reason".into()),
    };
    let _ = std::fs::remove_file(ws.control_socket());
    let _ = std::fs::remove_file(ws.vsock_socket());
    let record = ExitRecord {
        supervisor_pid: std::process::id() as i32,
        clean,
        reason,
        at: now_rfc3339(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other);
    let json = json.io_ctx(|| "encoding the exit record".into())?;
    write_atomic(&ws.exit_record(), &json)?;
    Ok(if clean { 0 } else { 1 })
}

/// This VMM's cgroup (see `vmm::cgroup`), or why it has none.
fn limits_for(ws: &WorkspaceDir) -> (Placement, Option<std::path::PathBuf>) {
    let limits = ws
        .read()
        .map_err(|e| e.to_string())
        .and_then(|rec| Limits::for_guest(rec.memory_mib));
    match limits {
        Ok(limits) => cgroup::place(&format!("{}-{}", ws.name, std::process::id()), &limits),
        Err(reason) => (Placement::Unavailable { reason }, None),
    }
}

/// The user's arguments, then the root the disk layout boots (a workspace
/// made before layered disks names its own in the user's), then what makes
/// the agent PID 1 (last, so it wins over any `init=` before it), the
/// program it starts and the hostname.
fn guest_cmdline(rec: &crate::workspace::store::WorkspaceRecord) -> String {
    let mut line = rec.cmdline.trim().to_string();
    if let Some(layout) = &rec.layout {
        line.push(' ');
        line.push_str(&layout.cmdline());
    }
    if let Some(v) = volume::cmdline(&rec.volumes) {
        line.push(' ');
        line.push_str(&v);
    }
    line.push_str(&format!(" init={}", crate::agent::AGENT_GUEST_PATH));
    if let Some(init) = &rec.init {
        line.push_str(&format!(" microagent.init={init}"));
    }
    line.push_str(&format!(" microagent.hostname={}", rec.name));
    line
}

/// `vmm serve`: boots the workspace's VM (or restores `restore_from`),
/// jails itself and drops to `run_as`, and serves its control socket
/// until the guest powers off or is halted, and says why it stopped.
pub fn serve(
    workspace_dir: &Path,
    restore_from: Option<&Path>,
    run_as: Option<RunAs>,
) -> Result<GuestStop> {
    let ws = self::workspace_dir(workspace_dir)?;
    // Whatever it creates (sockets, snapshot files, deltas) is its own.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let rec = ws.read()?;
    prepare_seccomp()?;
    let cfg = VmConfig {
        kernel: rec.kernel.clone().into(),
        disks: match &rec.layout {
            Some(layout) => layout.disks(&ws.disk_dir()),
            None => vec![DiskConfig {
                path: ws.disk_dir(),
                read_only: false,
                format: DiskFormat::Chain,
                serial: None,
                snapshot_dir: None,
            }],
        }
        .into_iter()
        .chain(volume::disks(&rec.volumes))
        .collect(),
        vcpus: rec.vcpus,
        mem_mib: rec.memory_mib,
        cmdline: guest_cmdline(&rec),
        cpu_template: rec.cpu_template.parse().map_err(invalid)?,
        pvm: host::is_pvm(),
        console_log: Some(ws.console_log()),
        console_stdout: false,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            socket: ws.vsock_socket(),
        }),
        net: (rec.network == NetworkMode::User).then(|| NetConfig {
            ports: rec.ports.clone(),
            passt_log: Some(ws.dir.join("passt.log")),
        }),
    };
    let vm = match restore_from {
        Some(dir) => {
            let bytes =
                std::fs::read(dir.join(VMSTATE)).io_ctx(|| format!("reading {}", dir.display()))?;
            let snap: VmSnapshot =
                format::decode(&bytes).ctx(|| format!("{}/{VMSTATE}", dir.display()))?;
            Vm::restore(&cfg, &snap, dir).ctx(|| "restoring the VM".into())?
        }
        None => Vm::boot(&cfg).ctx(|| "booting the VM".into())?,
    };
    // Bound while root: a socket left by a crashed run is root's.
    let control_listener = control::bind(&ws.control_socket())
        .io_ctx(|| format!("binding {}", ws.control_socket().display()))?;
    confine(&ws, &rec.volumes, run_as)?;
    let info = ServeInfo {
        cmdline: vm.cmdline.clone(),
        mem_mib: cfg.mem_mib,
        snapshots_dir: ws.snapshots(),
        tsc_khz: vm.tsc_khz(),
    };
    control::spawn_server(control_listener, vm.handle(), info)
        .io_ctx(|| format!("serving {}", ws.control_socket().display()))?;
    vm.run(None).ctx(|| "running the VM".into())
}

/// Jails the VMM and drops root to `run_as` (see `vmm::jail`). Still one
/// thread: both must come before the control and vCPU threads, which
/// inherit them. The drop needs the jail: outside it the VMM user could
/// not reach its workspace through the state directory.
fn confine(
    ws: &WorkspaceDir,
    rec_volumes: &[volume::VolumeMount],
    run_as: Option<RunAs>,
) -> Result<()> {
    let root = nix::unistd::Uid::effective().is_root();
    let jailed = jail::wanted();
    if jailed {
        if let Some(who) = run_as {
            vmm_user::give_workspace(ws, who)
                .io_ctx(|| format!("giving {} to the VMM user {who}", ws.dir.display()))?;
            for m in rec_volumes {
                vmm_user::give_volume(&m.disk, who)
                    .io_ctx(|| format!("giving volume {} to the VMM user {who}", m.volume))?;
            }
        }
        let volumes: Vec<PathBuf> = rec_volumes.iter().map(|m| m.disk.clone()).collect();
        jail::enter(&ws.dir, &volumes).map_err(|e| invalid(e.to_string()))?;
    } else if root {
        eprintln!(
            "warning: {}=0: the VMM runs in the host's mount namespace, as root",
            jail::JAIL_ENV
        );
    }
    match (run_as, jailed) {
        (Some(who), true) => jail::drop_to(who).map_err(|e| invalid(e.to_string())),
        (Some(_), false) => {
            eprintln!("warning: the VMM keeps root too: outside its jail its user could not reach the workspace");
            Ok(())
        }
        (None, _) if root => {
            eprintln!(
                "warning: {}=root: the VMM keeps root",
                vmm_user::VMM_USER_ENV
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Builds the VMM's seccomp filters, which its threads install once the
/// VM is set up; `MICROAGENT_VMM_SECCOMP` can turn them off or to logging
/// only, which the VMM's log then says.
pub fn prepare_seccomp() -> Result<()> {
    let mode = seccomp::mode();
    let what = match mode {
        seccomp::Mode::Off => "off: the VMM runs unconfined",
        seccomp::Mode::Log => "logging only: calls outside them go through",
        seccomp::Mode::Enforce => "",
    };
    if !what.is_empty() {
        eprintln!("warning: {}: seccomp filters {what}", seccomp::SECCOMP_ENV);
    }
    seccomp::prepare(mode).map_err(|e| invalid(e.to_string()))
}

/// `vmm run`: boots `cfg` in this process and runs it until the guest
/// stops; returns why, and the full kernel command line it booted with.
pub fn run_foreground(
    cfg: &VmConfig,
    dump_state_every: Option<std::time::Duration>,
) -> Result<(GuestStop, String)> {
    prepare_seccomp()?;
    let vm = Vm::boot(cfg).ctx(|| "booting the VM".into())?;
    let cmdline = vm.cmdline.clone();
    let stop = vm.run(dump_state_every).ctx(|| "running the VM".into())?;
    Ok((stop, cmdline))
}
