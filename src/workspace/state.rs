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

/// True if `pid` is alive and is this workspace's VMM supervisor (not a
/// recycled pid).
pub fn supervisor_alive(pid: i32, ws: &WorkspaceDir) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty cmdline: it is gone for our purposes.
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = ws.dir.as_os_str().as_encoded_bytes();
    args.iter().any(|a| *a == b"supervise") && args.contains(&dir)
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
