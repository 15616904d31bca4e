//! halt and delete: stopping a workspace's VMM, and removing the workspace.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use super::lifecycle::{open, reconciled, CONTROL_TIMEOUT};
use super::output::{print_record, Out};
use crate::agent::AgentConn;
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::busy;
use crate::workspace::state::{check, supervisor_alive, Op, Status};
use crate::workspace::store::{StateDir, WorkspaceDir};

#[derive(Args)]
pub struct HaltArgs {
    name: String,
    /// Seconds to wait for the VMM to stop before killing it.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// Stops the VMM: asks over the control socket, then kills the process
/// group if it has not gone within `timeout`. Returns whether it was forced.
fn stop_vmm(ws: &WorkspaceDir, pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // Graceful: the agent syncs, stops processes and powers off. A paused
    // guest cannot do that, and a guest without an agent answering gets
    // the VMM's halt (like pulling the power).
    let paused = control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT)
        .map(|r| r.state.as_deref() == Some("paused"))
        .unwrap_or(true);
    let graceful = !paused
        && AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(2))
            .and_then(|c| c.call(&guest_agent::Request::Shutdown))
            .is_ok();
    if graceful {
        while supervisor_alive(pid, ws) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = control::request(&ws.control_socket(), CtlOp::Halt, CONTROL_TIMEOUT);
    while supervisor_alive(pid, ws) {
        if Instant::now() > deadline {
            // The supervisor leads its own session and process group.
            // SAFETY: kill on a process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let hard = Instant::now() + Duration::from_secs(5);
            while supervisor_alive(pid, ws) && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(20));
            }
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn halt(state: &StateDir, args: HaltArgs, out: &Out) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, &args.name)?;
    check(&ws.name, status, Op::Halt)?;
    let forced = stop_vmm(
        &ws,
        rec.vmm_pid.unwrap_or(0),
        Duration::from_secs(args.timeout),
    );
    let _ = std::fs::remove_file(ws.control_socket());
    rec.status = Status::Halted;
    rec.vmm_pid = None;
    rec.crash_reason = None;
    ws.write(&rec)?;
    let msg = if forced {
        format!(
            "workspace {} halted (forced after {}s)",
            ws.name, args.timeout
        )
    } else {
        format!("workspace {} halted", ws.name)
    };
    print_record(out, &ws, &rec, Status::Halted, None, None, &msg);
    Ok(0)
}

#[derive(Args)]
pub struct DeleteArgs {
    name: String,
    /// Confirm: deleting removes the workspace's disk and snapshots
    /// (asked on a terminal; refused without one).
    #[arg(long, short)]
    yes: bool,
    /// Delete even if running (the VMM is stopped first) or snapshotting
    /// (the snapshot is ended; it is not kept).
    #[arg(long)]
    force: bool,
}

pub fn delete(state: &StateDir, args: DeleteArgs, out: &Out) -> Result<i32> {
    state.existing(&args.name)?;
    super::confirm::confirm(
        &format!(
            "delete removes workspace {} with its disk and snapshots",
            args.name
        ),
        args.yes,
    )?;
    let (ws, _lock, rec, status) = if args.force {
        // Like `docker rm -f`: a snapshot in progress is ended too.
        let ws = state.existing(&args.name)?;
        let lock = busy::lock_evicting(&ws)?;
        reconciled(ws, lock)?
    } else {
        open(state, &args.name)?
    };
    if !args.force {
        check(&ws.name, status, Op::Delete)?;
    }
    if status.is_live() {
        stop_vmm(&ws, rec.vmm_pid.unwrap_or(0), Duration::from_secs(5));
    }
    // Rename first so a crash mid-delete never leaves a half-deleted
    // workspace that still looks valid.
    let doomed = ws
        .dir
        .with_file_name(format!(".deleting-{}-{}", ws.name, std::process::id()));
    std::fs::rename(&ws.dir, &doomed).with_context(|| format!("removing {}", ws.dir.display()))?;
    std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
    out.done(
        &format!("workspace {} deleted", ws.name),
        serde_json::json!({ "name": ws.name, "deleted": true }),
    );
    Ok(0)
}
