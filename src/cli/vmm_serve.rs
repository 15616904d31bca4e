//! The detached VMM of a workspace, in two processes of this binary:
//!
//! - `vmm supervise --workspace-dir D`: started by `microagent start` in a
//!   new session; runs the VMM as its child and, when the child ends for any
//!   reason (power-off, halt, error, kill -9), writes `vmm-exit.json` so the
//!   CLI can tell halted from crashed and say why.
//! - `vmm serve --workspace-dir D`: boots the workspace's VM and serves its
//!   control socket until the guest powers off or is halted.

use crate::devices::virtio::net::NetConfig;
use crate::workspace::store::NetworkMode;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use crate::snapshot::format;
use crate::vmm::control::{self, ServeInfo};
use crate::vmm::host;
use crate::vmm::snapshot::VmSnapshot;
use crate::vmm::vm::{DiskConfig, Vm, VmConfig, VsockConfig};
use crate::workspace::state::ExitRecord;
use crate::workspace::store::{now_rfc3339, write_atomic, WorkspaceDir};

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    workspace_dir: PathBuf,
    /// Resume from this snapshot directory instead of booting.
    #[arg(long)]
    restore_from: Option<PathBuf>,
}

fn workspace_dir(path: &Path) -> Result<WorkspaceDir> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("workspace directory has no name")?
        .to_string();
    Ok(WorkspaceDir {
        name,
        dir: path.to_path_buf(),
    })
}

/// Last non-empty line the VMM wrote to its log: usually its error.
fn last_log_line(ws: &WorkspaceDir) -> Option<String> {
    let text = std::fs::read_to_string(ws.vmm_log()).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

pub fn supervise(args: ServeArgs) -> Result<i32> {
    let ws = workspace_dir(&args.workspace_dir)?;
    let exe = std::env::current_exe().context("locating the microagent binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["vmm", "serve", "--workspace-dir"]).arg(&ws.dir);
    if let Some(snap) = &args.restore_from {
        cmd.arg("--restore-from").arg(snap);
    }
    // The VMM dies with its supervisor: a `kill -9` of the supervisor must
    // never leave a VMM writing the disk with nobody to record its end.
    let supervisor = nix::unistd::getpid();
    // SAFETY: prctl and getppid are async-signal-safe; the closure touches
    // nothing else between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The supervisor may have died before the line above ran.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::other("the VMM supervisor is gone"));
            }
            Ok(())
        });
    }
    let status = cmd.status().context("starting the VMM")?;
    let (clean, reason) = match (status.code(), status.signal()) {
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
    write_atomic(&ws.exit_record(), &serde_json::to_vec_pretty(&record)?)?;
    Ok(if clean { 0 } else { 1 })
}

/// The user's arguments, then what makes the agent PID 1 (last, so it wins
/// over any `init=` before it), the program it starts and the hostname.
fn guest_cmdline(rec: &crate::workspace::store::WorkspaceRecord) -> String {
    let mut line = format!(
        "{} init={}",
        rec.cmdline.trim(),
        crate::agent::AGENT_GUEST_PATH
    );
    if let Some(init) = &rec.init {
        line.push_str(&format!(" microagent.init={init}"));
    }
    line.push_str(&format!(" microagent.hostname={}", rec.name));
    line
}

pub fn serve(args: ServeArgs) -> Result<i32> {
    let ws = workspace_dir(&args.workspace_dir)?;
    let rec = ws.read()?;
    let cfg = VmConfig {
        kernel: rec.kernel.clone().into(),
        disks: vec![DiskConfig {
            path: ws.rootfs(),
            read_only: false,
        }],
        vcpus: rec.vcpus,
        mem_mib: rec.memory_mib,
        cmdline: guest_cmdline(&rec),
        cpu_template: rec.cpu_template.parse().map_err(anyhow::Error::msg)?,
        pvm: host::is_pvm(),
        console_log: Some(ws.console_log()),
        console_stdout: false,
        vsock: Some(VsockConfig {
            guest_cid: super::vmm_run::GUEST_CID,
            socket: ws.vsock_socket(),
        }),
        net: (rec.network == NetworkMode::User).then(|| NetConfig {
            ports: rec.ports.clone(),
            passt_log: Some(ws.dir.join("passt.log")),
        }),
    };
    let vm = match &args.restore_from {
        Some(dir) => {
            let bytes = std::fs::read(dir.join("vmstate.bin"))
                .with_context(|| format!("reading {}", dir.display()))?;
            let snap: VmSnapshot =
                format::decode(&bytes).with_context(|| format!("{}/vmstate.bin", dir.display()))?;
            Vm::restore(&cfg, &snap, &dir.join("memory.bin")).context("restoring the VM")?
        }
        None => Vm::boot(&cfg).context("booting the VM")?,
    };
    let info = ServeInfo {
        cmdline: vm.cmdline.clone(),
        mem_mib: cfg.mem_mib,
        root_disk: cfg.disks.first().map(|d| d.path.clone()),
        snapshots_dir: ws.snapshots(),
        tsc_khz: vm.tsc_khz(),
    };
    control::spawn_server(&ws.control_socket(), vm.handle(), info)
        .with_context(|| format!("serving {}", ws.control_socket().display()))?;
    let stop = vm.run(None).context("running the VM")?;
    if stop.is_clean() {
        println!("guest stopped: {}", stop.reason());
        Ok(0)
    } else {
        println!("guest failed: {}", stop.reason());
        Ok(1)
    }
}
