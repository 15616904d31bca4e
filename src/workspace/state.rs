//! The workspace state machine, and reconciling the recorded status with
//! what the VMM process is actually doing.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::store::{read_bounded, WorkspaceDir, WorkspaceRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Paused,
    Halted,
    Crashed,
    /// Reported while a snapshot holds the workspace (never recorded:
    /// the record keeps running/paused; see workspace::busy).
    Snapshotting,
    /// Reported while a commit holds the workspace (never recorded
    /// either; the workspace may be running, paused or halted).
    Committing,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Halted => "halted",
            Status::Crashed => "crashed",
            Status::Snapshotting => "snapshotting",
            Status::Committing => "committing",
        }
    }

    /// A VMM process exists for this workspace.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Status::Running | Status::Paused | Status::Snapshotting
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Pause,
    Resume,
    Halt,
    Delete,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("workspace {name} is {status}; {hint}")]
pub struct TransitionError {
    pub name: String,
    pub status: Status,
    pub hint: &'static str,
}

/// Whether `op` is legal from `status`; the error says what to do instead.
pub fn check(name: &str, status: Status, op: Op) -> Result<(), TransitionError> {
    use Status::*;
    let hint = match (op, status) {
        (_, Snapshotting) => "a snapshot is being taken; try again when it finishes",
        (_, Committing) => "a commit is being made; try again when it finishes",
        (Op::Start, Created | Halted | Crashed) => return Ok(()),
        (Op::Start, Running | Paused) => "it is already running (halt it first to restart)",
        (Op::Pause, Running) => return Ok(()),
        (Op::Pause, Paused) => "it is already paused",
        (Op::Pause, _) => "only a running workspace can be paused",
        (Op::Resume, Paused) => return Ok(()),
        (Op::Resume, Running) => "it is not paused",
        (Op::Resume, _) => "only a paused workspace can be resumed (use start)",
        (Op::Halt, Running | Paused) => return Ok(()),
        (Op::Halt, _) => "it is not running",
        (Op::Delete, Running | Paused) => "halt it first, or delete with --force",
        (Op::Delete, _) => return Ok(()),
    };
    Err(TransitionError {
        name: name.to_string(),
        status,
        hint,
    })
}

/// Written by the VMM supervisor when the VMM process ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitRecord {
    /// Supervisor pid this record belongs to (guards against stale records).
    pub supervisor_pid: i32,
    /// True when the VMM ended on purpose: guest power-off or halt.
    pub clean: bool,
    pub reason: String,
    pub at: String,
}

pub fn read_exit_record(ws: &WorkspaceDir) -> Option<ExitRecord> {
    let bytes = read_bounded(&ws.exit_record()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The role of one of a workspace's VMM processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmRole {
    /// `vmm supervise`: spawned by start, parent of the VMM.
    Supervisor,
    /// `vmm serve`: owns the KVM fds.
    Vmm,
}

/// What `pid` is to this workspace, read from /proc: it must run our binary
/// (/proc/PID/exe is named `microagent`) with `vmm supervise|serve
/// --workspace-dir DIR` for exactly this DIR. A recycled pid, a zombie (no
/// cmdline) or another program is None.
pub fn vmm_role(pid: i32, ws: &WorkspaceDir) -> Option<VmmRole> {
    if pid <= 0 {
        return None;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe_name = exe.file_name()?.to_string_lossy().into_owned();
    // A rebuilt binary shows as "microagent (deleted)".
    if exe_name.trim_end_matches(" (deleted)") != "microagent" {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = ws.dir.as_os_str().as_encoded_bytes();
    let names_dir = args
        .windows(2)
        .any(|w| w[0] == b"--workspace-dir" && w[1] == dir);
    let is_vmm = args.windows(2).position(|w| w[0] == b"vmm");
    match (names_dir, is_vmm.map(|i| args[i + 1])) {
        (true, Some(b"supervise")) => Some(VmmRole::Supervisor),
        (true, Some(b"serve")) => Some(VmmRole::Vmm),
        _ => None,
    }
}

/// True if `pid` is alive and is this workspace's VMM supervisor (not a
/// recycled pid).
pub fn supervisor_alive(pid: i32, ws: &WorkspaceDir) -> bool {
    vmm_role(pid, ws) == Some(VmmRole::Supervisor)
}

/// Every live process that is this workspace's supervisor or VMM.
pub fn vmm_processes(ws: &WorkspaceDir) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| vmm_role(*pid, ws).is_some())
        .collect()
}

/// The status as it really is: a record saying "running" whose VMM is gone
/// is halted (clean exit) or crashed (anything else), with the reason.
pub fn reconcile(ws: &WorkspaceDir, rec: &WorkspaceRecord) -> (Status, Option<String>) {
    if !rec.status.is_live() {
        return (rec.status, rec.crash_reason.clone());
    }
    let pid = rec.vmm_pid.unwrap_or(0);
    if supervisor_alive(pid, ws) {
        return (rec.status, None);
    }
    match read_exit_record(ws).filter(|e| e.supervisor_pid == pid) {
        Some(e) if e.clean => (Status::Halted, None),
        Some(e) => (Status::Crashed, Some(e.reason)),
        None => (
            Status::Crashed,
            Some(format!(
                "VMM supervisor (pid {pid}) vanished without an exit record"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_lifecycle() {
        use Status::*;
        assert!(check("b", Created, Op::Start).is_ok());
        assert!(check("b", Crashed, Op::Start).is_ok());
        assert!(check("b", Running, Op::Pause).is_ok());
        assert!(check("b", Paused, Op::Resume).is_ok());
        assert!(check("b", Paused, Op::Halt).is_ok());
        assert!(check("b", Halted, Op::Delete).is_ok());
        let e = check("builder", Running, Op::Delete).unwrap_err();
        assert_eq!(
            e.to_string(),
            "workspace builder is running; halt it first, or delete with --force"
        );
        assert_eq!(
            check("builder", Running, Op::Start)
                .unwrap_err()
                .to_string(),
            "workspace builder is running; it is already running (halt it first to restart)"
        );
        assert!(check("b", Halted, Op::Pause).is_err());
        assert!(check("b", Created, Op::Halt).is_err());
        assert!(check("b", Running, Op::Resume).is_err());
    }

    #[test]
    fn status_serialises_lowercase() {
        assert_eq!(
            serde_json::to_string(&Status::Crashed).unwrap(),
            "\"crashed\""
        );
    }
}
