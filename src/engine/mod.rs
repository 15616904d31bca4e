//! The engine: every workspace operation as a typed function over the state
//! directory. Front ends (`cli`, later the HTTP API) parse, call these and
//! render; the engine never prints. Progress and warnings go through a
//! [`Reporter`]; failures are [`Error`]s with a stable [`Code`].
//!
//! Calls go down: engine -> {workspace, image, snapshot, agent, vmm client}.

pub mod apply;
pub mod auto_snapshot;
pub mod cache;
pub mod checkpoint;
pub mod commit;
pub mod container_snapshot;
pub mod copy;
pub mod create;
mod error;
pub mod exec;
pub mod fork;
pub mod image;
pub mod launch;
pub mod lifecycle;
mod memory_chain;
pub mod named_snapshot;
mod references;
pub mod secrets;
pub mod share;
pub mod share_pull;
pub mod snapshot;
mod snapshot_files;
mod snapshot_query;
pub mod snapshot_verify;
mod snapshot_volumes;
pub mod vmm_process;
pub mod vmm_user;
pub mod volume;
mod warm;

use std::time::Duration;

pub use error::{conflict, invalid, Code, Context, Error, IoContext, Result};
pub use warm::Boot;

use crate::image::progress::Progress;
use crate::util::lock::FileLock;
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::busy;
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::{StateDir, WorkspaceDir, WorkspaceRecord};

/// How long a control-socket request may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// What an operation tells its caller while it runs.
pub trait Reporter: Sync {
    /// Something went wrong that did not stop the operation.
    fn warn(&self, message: &str);
    /// A step of a long operation, for people watching.
    fn step(&self, message: &str);
    /// Where image pulls draw their per-layer progress.
    fn image_progress(&self) -> &Progress;
}

/// A reporter that drops everything (tests, benches, nested operations).
pub struct Silent(Progress);

impl Default for Silent {
    fn default() -> Self {
        Silent(Progress::Silent)
    }
}

impl Reporter for Silent {
    fn warn(&self, _: &str) {}
    fn step(&self, _: &str) {}
    fn image_progress(&self) -> &Progress {
        &self.0
    }
}

/// The engine over one state directory.
pub struct Engine {
    pub state: StateDir,
}

/// A workspace as it really is right now.
#[derive(Debug, Clone)]
pub struct WorkspaceView {
    pub dir: WorkspaceDir,
    pub record: WorkspaceRecord,
    pub status: Status,
    pub crash_reason: Option<String>,
    /// The VMM supervisor's pid while one runs.
    pub pid: Option<u32>,
    /// From the running VMM: "up", or "down: why" (passt gone).
    pub network_state: Option<String>,
    /// The running VMM's cgroup limits, or why it has none.
    pub limits: Option<crate::vmm::cgroup::Placement>,
}

impl Engine {
    pub fn new(state: StateDir) -> Engine {
        Engine { state }
    }

    pub fn from_env() -> Engine {
        Engine::new(StateDir::from_env())
    }
}

/// Creates a new workspace's directory; `already_exists` if the name is
/// taken (also when another create or fork wins the race for it).
pub(crate) fn claim_workspace_dir(state: &StateDir, ws: &WorkspaceDir) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // Guest memory, disks, snapshots and console output: the user's alone.
    let private = || {
        let mut b = std::fs::DirBuilder::new();
        b.mode(0o700);
        b
    };
    private()
        .recursive(true)
        .create(state.workspaces())
        .io_ctx(|| format!("creating {}", state.workspaces().display()))?;
    match private().create(&ws.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(crate::workspace::store::StoreError::Exists(ws.name.clone()).into())
        }
        Err(e) => Err(e).io_ctx(|| format!("creating {}", ws.dir.display())),
    }
}

/// A workspace opened for a lifecycle operation: locked and reconciled.
pub(crate) struct Opened {
    pub ws: WorkspaceDir,
    pub lock: FileLock,
    pub rec: WorkspaceRecord,
    pub status: Status,
}

/// Lock, read and reconcile: the common opening of every lifecycle operation.
pub(crate) fn open(state: &StateDir, name: &str) -> Result<Opened> {
    let ws = state.existing(name)?;
    let lock = busy::lock(&ws)?;
    reconciled(ws, lock)
}

pub(crate) fn reconciled(ws: WorkspaceDir, lock: FileLock) -> Result<Opened> {
    let mut rec = ws.read()?;
    let (status, reason) = reconcile(&ws, &rec);
    if status != rec.status {
        // The VMM ended behind our back: record what happened.
        rec.status = status;
        rec.crash_reason = reason;
        rec.vmm_pid = None;
        ws.write(&rec)?;
    }
    Ok(Opened {
        ws,
        lock,
        rec,
        status,
    })
}

/// Status as it really is, asking the VMM when one should be running.
pub(crate) fn view(ws: WorkspaceDir, rec: WorkspaceRecord) -> WorkspaceView {
    let (mut status, crash_reason) = reconcile(&ws, &rec);
    let mut pid = None;
    let mut network_state = None;
    if status.is_live() {
        if let Ok(resp) =
            control::request(&ws.control_socket(), CtlOp::Status, Duration::from_secs(5))
        {
            pid = resp.pid;
            network_state = resp.network;
            status = match resp.state.as_deref() {
                Some("paused") => Status::Paused,
                _ => Status::Running,
            };
        }
        if busy::current(&ws).is_some_and(|b| b.op == "snapshotting") {
            status = Status::Snapshotting;
        }
    }
    if busy::current(&ws).is_some_and(|b| b.op == "committing") {
        status = Status::Committing;
    }
    let limits = status
        .is_live()
        .then(|| crate::util::fs::read_bounded(&ws.limits_record()).ok())
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok());
    WorkspaceView {
        dir: ws,
        record: rec,
        status,
        crash_reason,
        pid,
        network_state,
        limits,
    }
}

/// A view of a record this operation just wrote (no VMM round trip).
pub(crate) fn written(ws: &WorkspaceDir, rec: &WorkspaceRecord, pid: Option<u32>) -> WorkspaceView {
    WorkspaceView {
        dir: ws.clone(),
        record: rec.clone(),
        status: rec.status,
        crash_reason: rec.crash_reason.clone(),
        pid,
        network_state: None,
        limits: None,
    }
}
