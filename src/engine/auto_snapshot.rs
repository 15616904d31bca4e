//! Automatic snapshots on halt, with rotation, and the per-workspace
//! settings that drive them (`create --auto-snapshot-on-stop`,
//! `--max-snapshots`, `update`).
//!
//! Only tags starting with `auto-` are ever rotated: a tag a person or a
//! script chose is theirs to delete.

use super::snapshot::{Created, SnapshotOptions};
use super::snapshot_query::{delete_dir, list_in};
use super::{invalid, open, Engine, Reporter, Result, WorkspaceView};
use crate::workspace::state::Status;
use crate::workspace::store::{now_rfc3339, WorkspaceDir, WorkspaceRecord, MAX_SNAPSHOTS_LIMIT};

/// Tags of automatic snapshots start with this.
pub const AUTO_PREFIX: &str = "auto-";

/// What `update` changes (None: unchanged).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub auto_snapshot_on_stop: Option<bool>,
    pub max_snapshots: Option<u32>,
}

/// Refuses a `max_snapshots` that cannot be meant.
pub fn check_max_snapshots(n: u32) -> Result<()> {
    if !(1..=MAX_SNAPSHOTS_LIMIT).contains(&n) {
        return Err(invalid(format!(
            "max_snapshots {n} is out of range: keep 1 to {MAX_SNAPSHOTS_LIMIT} automatic snapshots (or turn auto_snapshot_on_stop off)"
        )));
    }
    Ok(())
}

/// What halt's automatic snapshot did.
#[derive(Debug, Clone)]
pub enum AutoSnapshot {
    /// The setting is off, or the workspace was not running or paused.
    Skipped,
    Taken {
        created: Box<Created>,
        /// Older automatic tags deleted by rotation.
        rotated_out: Vec<String>,
    },
    /// The snapshot failed (nothing of it was kept); halt went on.
    Failed(String),
}

/// `auto-<UTC time>`, made unique among `ws`'s tags (two halts within
/// one second get `-2`, `-3`...).
fn auto_tag(ws: &WorkspaceDir) -> String {
    let base = format!("{AUTO_PREFIX}{}", now_rfc3339().replace([':', '-'], ""));
    let taken = |t: &str| ws.snapshots().join(t).exists();
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|t| !taken(t))
        .expect("an unused suffix")
}

/// Deletes the oldest `auto-` snapshots of `ws` beyond `keep` (the caller
/// holds the lock); returns their tags.
fn rotate(ws: &WorkspaceDir, keep: u32, report: &dyn Reporter) -> Vec<String> {
    let autos = list_in(ws, Some(AUTO_PREFIX));
    let excess = autos.len().saturating_sub(keep as usize);
    let mut gone = Vec::new();
    for s in autos.into_iter().take(excess) {
        match delete_dir(ws, &s.dir) {
            Ok(()) => gone.push(s.manifest.tag),
            Err(e) => report.warn(&format!(
                "rotating out snapshot {} of workspace {}: {e}",
                s.manifest.tag, ws.name
            )),
        }
    }
    gone
}

impl Engine {
    /// Halt's first step (the caller holds the lock): a memory snapshot
    /// when the setting is on and the guest is running or paused, then
    /// rotation. A failure is reported and returned, never raised: the
    /// halt must still happen.
    pub(crate) fn auto_snapshot(
        &self,
        ws: &WorkspaceDir,
        rec: &WorkspaceRecord,
        status: Status,
        report: &dyn Reporter,
    ) -> AutoSnapshot {
        if !rec.auto_snapshot_on_stop || !matches!(status, Status::Running | Status::Paused) {
            return AutoSnapshot::Skipped;
        }
        if let Err(missing) = crate::vmm::host::snapshot_support() {
            let why = format!("this host cannot snapshot: {}", missing.join("; "));
            report.warn(&format!("automatic snapshot of {} skipped: {why}", ws.name));
            return AutoSnapshot::Failed(why);
        }
        let tag = auto_tag(ws);
        report.step(&format!("taking automatic snapshot {tag}"));
        match self.snapshot_locked(ws, rec, status, &tag, SnapshotOptions::default(), report) {
            Ok(created) => AutoSnapshot::Taken {
                created: Box::new(created),
                rotated_out: rotate(ws, rec.max_snapshots, report),
            },
            Err(e) => {
                let why = e.to_string();
                report.warn(&format!(
                    "automatic snapshot of {} failed (halting anyway): {why}",
                    ws.name
                ));
                AutoSnapshot::Failed(why)
            }
        }
    }

    /// Changes a workspace's snapshot settings, in any state.
    pub fn update(&self, name: &str, settings: &Settings) -> Result<WorkspaceView> {
        if let Some(n) = settings.max_snapshots {
            check_max_snapshots(n)?;
        }
        let super::Opened {
            ws,
            lock: _lock,
            mut rec,
            ..
        } = open(&self.state, name)?;
        if let Some(on) = settings.auto_snapshot_on_stop {
            rec.auto_snapshot_on_stop = on;
        }
        if let Some(n) = settings.max_snapshots {
            rec.max_snapshots = n;
        }
        ws.write(&rec)?;
        Ok(super::view(ws, rec))
    }
}
