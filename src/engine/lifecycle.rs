//! start, pause, resume, halt, delete, status and list.

use std::time::{Duration, Instant};

use super::auto_snapshot::AutoSnapshot;
use super::launch::{deliver_secrets, has_secrets, kill_strays, launch, AfterReady};
use super::snapshot::{check_snapshot, snapshot_dir};
use super::warm::{self, Boot};
use super::{
    conflict, open, reconciled, view, written, Engine, IoContext, Reporter, Result, WorkspaceView,
    CONTROL_TIMEOUT,
};
use crate::agent::AgentConn;
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::busy;
use crate::workspace::disk::restore_from;
use crate::workspace::state::{check, supervisor_alive, Op, Status};
use crate::workspace::store::WorkspaceDir;

/// How to start a workspace.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Wait this long for the guest agent; None: return once the VMM runs.
    pub wait: Option<Duration>,
    /// Roll back: resume memory, devices and disk from this snapshot tag.
    pub from_snapshot: Option<String>,
    /// First start: boot even when a boot snapshot of an equal workspace
    /// is cached (and do not cache this boot).
    pub cold: bool,
}

/// What a start did.
#[derive(Debug, Clone)]
pub struct Started {
    pub workspace: WorkspaceView,
    pub boot: Boot,
    /// The boot cache key, when the start used or filled the cache.
    pub boot_key: Option<String>,
    /// With a cold first start: whether its snapshot is now cached.
    pub cached: bool,
    /// Until the VMM answered with its vCPUs running.
    pub running_ms: u64,
    /// Until the start returned (the agent answered, with a wait).
    pub start_ms: u64,
}

/// What a halt did.
#[derive(Debug, Clone)]
pub struct Halted {
    pub workspace: WorkspaceView,
    /// The VMM did not stop within the timeout and was killed.
    pub forced: bool,
    pub auto_snapshot: AutoSnapshot,
}

/// Stops the VMM: asks the agent to power off, then the VMM to halt, and
/// kills the process group if it has not gone within `timeout`; then makes
/// sure no process of this workspace's VMM is left. Returns whether it was
/// forced.
fn stop_vmm(ws: &WorkspaceDir, pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // Graceful: the agent syncs, stops processes and powers off. A paused
    // guest cannot do that, and a guest without an agent answering gets
    // the VMM's halt (like pulling the power).
    let paused = control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT)
        .map(|r| r.state.as_deref() == Some("paused"))
        .unwrap_or(true);
    let graceful = !paused
        && AgentConn::request(
            &ws.vsock_socket(),
            Duration::from_secs(2),
            &guest_agent::Request::Shutdown,
        )
        .is_ok();
    if graceful {
        while supervisor_alive(pid, ws) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = control::request(&ws.control_socket(), CtlOp::Halt, CONTROL_TIMEOUT);
    let mut forced = false;
    while supervisor_alive(pid, ws) {
        if Instant::now() > deadline {
            // The supervisor leads its own session and process group.
            // SAFETY: kill on a process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            forced = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever is left (a VMM whose supervisor died) goes too.
    kill_strays(ws);
    forced
}

impl Engine {
    pub fn start(&self, name: &str, opts: &StartOptions, report: &dyn Reporter) -> Result<Started> {
        let super::Opened {
            ws,
            lock: _lock,
            mut rec,
            status,
        } = open(&self.state, name)?;
        check(&ws.name, status, Op::Start)?;
        let t = Instant::now();
        let (launched, boot, key, cached) = match &opts.from_snapshot {
            Some(tag) => {
                let dir = snapshot_dir(&ws, tag)?;
                check_snapshot(&self.state, &dir, &rec)?;
                // Roll the disk back with the memory: both are from that moment.
                restore_from(&dir, &ws)?;
                super::snapshot_volumes::restore(&self.state, &rec, &dir)?;
                let l = launch(
                    &self.state,
                    &ws,
                    &mut rec,
                    Some(&dir),
                    opts.wait,
                    AfterReady::DeliverSecrets,
                    report,
                )?;
                (l, Boot::Snapshot, None, false)
            }
            None if status == Status::Created => {
                let first =
                    warm::first_start(&self.state, &ws, &mut rec, opts.wait, opts.cold, report)?;
                (first.launched, first.boot, first.key, first.cached)
            }
            None => {
                let l = launch(
                    &self.state,
                    &ws,
                    &mut rec,
                    None,
                    opts.wait,
                    AfterReady::DeliverSecrets,
                    report,
                )?;
                (l, Boot::Cold, None, false)
            }
        };
        Ok(Started {
            workspace: written(&ws, &rec, launched.vmm_pid),
            boot,
            boot_key: key,
            cached,
            running_ms: launched.running_at.duration_since(t).as_millis() as u64,
            start_ms: t.elapsed().as_millis() as u64,
        })
    }

    fn pause_or_resume(&self, name: &str, pause: bool) -> Result<WorkspaceView> {
        let super::Opened {
            ws,
            lock: _lock,
            mut rec,
            status,
        } = open(&self.state, name)?;
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
        Ok(written(&ws, &rec, resp.pid))
    }

    pub fn pause(&self, name: &str) -> Result<WorkspaceView> {
        self.pause_or_resume(name, true)
    }

    pub fn resume(&self, name: &str) -> Result<WorkspaceView> {
        self.pause_or_resume(name, false)
    }

    /// Stops a running or paused workspace, forced after `timeout`; first
    /// takes its automatic snapshot when that setting is on (a failed one
    /// is reported in the result, and the halt goes on).
    pub fn halt(&self, name: &str, timeout: Duration, report: &dyn Reporter) -> Result<Halted> {
        let super::Opened {
            ws,
            lock: _lock,
            mut rec,
            status,
        } = open(&self.state, name)?;
        check(&ws.name, status, Op::Halt)?;
        let auto_snapshot = self.auto_snapshot(&ws, &rec, status, report);
        let forced = stop_vmm(&ws, rec.vmm_pid.unwrap_or(0), timeout);
        let _ = std::fs::remove_file(ws.control_socket());
        rec.status = Status::Halted;
        rec.vmm_pid = None;
        rec.crash_reason = None;
        ws.write(&rec)?;
        Ok(Halted {
            workspace: written(&ws, &rec, None),
            forced,
            auto_snapshot,
        })
    }

    /// Deletes a workspace with its disk and snapshots. With `force`, a
    /// running VMM is stopped and a snapshot in progress is ended (like
    /// `docker rm -f`). Never leaves a VMM of the workspace running.
    pub fn delete(&self, name: &str, force: bool) -> Result<()> {
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = if force {
            let ws = self.state.existing(name)?;
            let lock = busy::lock_evicting(&ws)?;
            reconciled(ws, lock)?
        } else {
            open(&self.state, name)?
        };
        if !force {
            check(&ws.name, status, Op::Delete)?;
        }
        if status.is_live() {
            stop_vmm(&ws, rec.vmm_pid.unwrap_or(0), Duration::from_secs(5));
        } else {
            // A crashed workspace's VMM may have outlived its supervisor.
            kill_strays(&ws);
        }
        if !crate::workspace::state::vmm_processes(&ws).is_empty() {
            return Err(conflict(
                &ws.name,
                format!(
                    "workspace {} still has VMM processes that could not be stopped",
                    ws.name
                ),
            ));
        }
        // Rename first so a crash mid-delete never leaves a half-deleted
        // workspace that still looks valid.
        let doomed = ws
            .dir
            .with_file_name(format!(".deleting-{}-{}", ws.name, std::process::id()));
        std::fs::rename(&ws.dir, &doomed).io_ctx(|| format!("removing {}", ws.dir.display()))?;
        std::fs::remove_dir_all(&doomed).io_ctx(|| format!("removing {}", doomed.display()))?;
        Ok(())
    }

    /// Ok when workspace `name` exists (`not_found` otherwise).
    pub fn exists(&self, name: &str) -> Result<()> {
        self.state.existing(name)?;
        Ok(())
    }

    /// One workspace as it really is.
    pub fn status(&self, name: &str) -> Result<WorkspaceView> {
        let ws = self.state.existing(name)?;
        let rec = ws.read()?;
        Ok(view(ws, rec))
    }

    /// Every workspace whose record can be read, as it really is.
    pub fn list(&self) -> Result<Vec<WorkspaceView>> {
        let mut rows = Vec::new();
        for name in self.state.list()? {
            let ws = self.state.workspace(&name)?;
            let Ok(rec) = ws.read() else { continue };
            rows.push(view(ws, rec));
        }
        Ok(rows)
    }

    /// True while the workspace's VMM supervisor runs (for `logs -f`).
    pub fn vmm_alive(&self, name: &str) -> Result<bool> {
        let ws = self.state.existing(name)?;
        let rec = ws.read()?;
        Ok(rec.status.is_live() && supervisor_alive(rec.vmm_pid.unwrap_or(0), &ws))
    }

    /// The workspace's serial console log.
    pub fn console_log(&self, name: &str) -> Result<std::path::PathBuf> {
        Ok(self.state.existing(name)?.console_log())
    }
}
