//! Reading and removing a workspace's snapshots: list, latest, get,
//! delete, and the helpers halt's rotation shares.

use std::path::Path;

use super::snapshot::{snapshot_dir, SnapshotInfo, LATEST};
use super::snapshot_files::snapshot_size;
use super::{Engine, Error, IoContext, Result};
use crate::snapshot::manifest::{validate_tag, Manifest};
use crate::workspace::busy;
use crate::workspace::store::WorkspaceDir;

impl Engine {
    /// A workspace's snapshots, oldest first (tags starting with `prefix`).
    pub fn snapshot_list(&self, name: &str, prefix: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        Ok(list_in(&self.state.existing(name)?, prefix))
    }

    /// A workspace's newest snapshot.
    pub fn snapshot_latest(&self, name: &str) -> Result<SnapshotInfo> {
        let ws = self.state.existing(name)?;
        newest(&ws).ok_or_else(|| Error::SnapshotNotFound {
            workspace: ws.name.clone(),
            tag: LATEST.to_string(),
        })
    }

    /// One snapshot by tag (`latest`: the newest).
    pub fn snapshot_get(&self, name: &str, tag: &str) -> Result<SnapshotInfo> {
        let ws = self.state.existing(name)?;
        let dir = snapshot_dir(&ws, tag)?;
        let manifest = Manifest::read(&dir)?;
        Ok(SnapshotInfo {
            workspace: ws.name.clone(),
            size_bytes: snapshot_size(&dir),
            manifest,
            dir,
        })
    }

    /// Deletes one snapshot. `confirm` runs under the workspace lock once
    /// the snapshot is known to exist (a prompt cannot race a change).
    pub fn snapshot_delete(
        &self,
        name: &str,
        tag: &str,
        confirm: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        let ws = self.state.existing(name)?;
        // The lock first: a workspace busy snapshotting is refused naming
        // what runs (the tag being made does not exist yet).
        let _lock = busy::lock(&ws)?;
        // A container snapshot (volumes only) shares the tags.
        let container = ws.snapshots().join(tag);
        let dir = match super::container_snapshot::read(&container) {
            Some(_) if validate_tag(tag).is_ok() => container,
            _ => snapshot_dir(&ws, tag)?,
        };
        confirm()?;
        delete_dir(&ws, &dir)
    }
}

/// Snapshots of `ws`, oldest first (tags starting with `prefix`); ones
/// whose manifest cannot be read are left out.
pub(crate) fn list_in(ws: &WorkspaceDir, prefix: Option<&str>) -> Vec<SnapshotInfo> {
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(ws.snapshots()) {
        for e in entries.flatten() {
            let tag = e.file_name().to_string_lossy().into_owned();
            if validate_tag(&tag).is_err() || prefix.is_some_and(|p| !tag.starts_with(p)) {
                continue;
            }
            let Ok(m) = Manifest::read(&e.path()) else {
                continue;
            };
            rows.push(SnapshotInfo {
                workspace: ws.name.clone(),
                size_bytes: snapshot_size(&e.path()),
                manifest: m,
                dir: e.path(),
            });
        }
    }
    rows.sort_by(|a, b| {
        (a.manifest.created.as_str(), a.manifest.tag.as_str())
            .cmp(&(b.manifest.created.as_str(), b.manifest.tag.as_str()))
    });
    rows
}

pub(crate) fn newest(ws: &WorkspaceDir) -> Option<SnapshotInfo> {
    list_in(ws, None).pop()
}

/// Removes snapshot directory `dir` of `ws` (the caller holds the lock):
/// renamed away first, so a crash midway never leaves a half snapshot
/// under its tag.
pub(crate) fn delete_dir(ws: &WorkspaceDir, dir: &Path) -> Result<()> {
    let tag = dir.file_name().unwrap_or_default().to_string_lossy();
    let doomed = ws
        .snapshots()
        .join(format!(".deleting-{tag}-{}", std::process::id()));
    std::fs::rename(dir, &doomed).io_ctx(|| format!("removing {}", dir.display()))?;
    std::fs::remove_dir_all(&doomed).io_ctx(|| format!("removing {}", doomed.display()))
}
