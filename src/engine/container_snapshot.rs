//! Container snapshots: all of a workspace's volumes captured together
//! (one moment for all of them), kept under the workspace's snapshot
//! tags as `snapshots/<tag>/{container.json, vol-N/}`, and applied only
//! to a halted workspace that attaches volumes of the same names in the
//! same order. Also the freeze of volumes inside a running VM, which
//! volume snapshots share.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::snapshot::default_tag;
use super::vmm_user::take_back;
use super::volume::{freeze_detached, private_dir};
use super::{conflict, invalid, open, Engine, Error, IoContext, Reporter, Result, CONTROL_TIMEOUT};
use crate::agent::{AgentConn, FrozenFs};
use crate::disk;
use crate::snapshot::manifest::validate_tag;
use crate::util::lock::FileLock;
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::state::Status;
use crate::workspace::store::{now_rfc3339, StateDir, WorkspaceDir};
use crate::workspace::volume::{self, read_json, write_json, Consistency, VolumeDir};

pub const CONTAINER_RECORD: &str = "container.json";
/// How long a guest's filesystems may stay frozen for a snapshot.
const FREEZE_GUARD: Duration = Duration::from_secs(60);

/// What a container snapshot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSnapshot {
    pub tag: String,
    pub workspace: String,
    pub created: String,
    pub consistency: Consistency,
    /// Volume names, in the workspace's disk order (`vol-N/` is the Nth).
    pub volumes: Vec<String>,
}

/// A staging directory the VMM made, removed however the snapshot ends.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Freezes volumes `(index, volume, into)` of the running or paused
/// workspace `ws_name` in one moment: a running guest freezes each
/// filesystem (FIFREEZE) first, then the VMM freezes the chains while
/// the vCPUs are paused; each frozen chain ends up linked in its `into`.
/// None when the workspace is not running (nothing holds the disks).
/// The caller holds the workspace's lock (taken before the volumes').
pub(crate) fn freeze_in_vm(
    ws: &WorkspaceDir,
    status: Status,
    vols: &[(usize, &VolumeDir, PathBuf)],
) -> Result<Option<Consistency>> {
    if !status.is_live() {
        return Ok(None);
    }
    let sock = ws.control_socket();
    let paused = control::request(&sock, CtlOp::Status, CONTROL_TIMEOUT)?
        .state
        .as_deref()
        == Some("paused");
    let mut frozen: Vec<FrozenFs> = Vec::new();
    if !paused {
        for (index, v, _) in vols {
            let f = AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(10))
                .and_then(|c| c.freeze_volume(*index as u32, FREEZE_GUARD))
                .map_err(|e| Error::Context {
                    context: format!("freezing volume {} in workspace {}", v.name, ws.name),
                    source: Box::new(e.into()),
                })?;
            frozen.push(f);
        }
    }
    let staging = control::freeze_disk(&sock, CONTROL_TIMEOUT);
    for f in frozen {
        f.thaw()?;
    }
    let staging = StagingDir(ws.snapshots().join(staging?));
    let what = format!("the VMM's frozen volumes of workspace {}", ws.name);
    for (index, v, _) in vols {
        let from = staging.0.join(volume::snapshot_dir(*index));
        disk::link_frozen(&v.disk_dir(), &from).map_err(|e| Error::SnapshotDamaged {
            message: format!("{what}: volume {}: {e}", v.name),
        })?;
    }
    take_back(&staging.0, &what)?;
    for (index, v, into) in vols {
        let from = staging.0.join(volume::snapshot_dir(*index));
        std::fs::rename(&from, into).io_ctx(|| format!("moving {}", from.display()))?;
        // The VMM left the volume's new chain.json unsynced.
        let live = v.disk_dir().join(disk::CHAIN_FILE);
        crate::util::fs::sync_with_dir(&live).io_ctx(|| format!("syncing {}", live.display()))?;
    }
    Ok(Some(if paused {
        Consistency::Paused
    } else {
        Consistency::Frozen
    }))
}

fn volume_dirs(state: &StateDir, names: &[String]) -> Result<Vec<VolumeDir>> {
    names
        .iter()
        .map(|n| {
            let v = VolumeDir::new(&state.root, n).map_err(invalid)?;
            if !v.exists() {
                return Err(Error::NotFound {
                    kind: "volume",
                    name: n.clone(),
                });
            }
            Ok(v)
        })
        .collect()
}

/// `[WORKSPACE:]TAG` of a container snapshot, defaulting to `target`.
fn container_dir(
    state: &StateDir,
    target: &str,
    from: &str,
) -> Result<(PathBuf, ContainerSnapshot)> {
    let (ws_name, tag) = from.split_once(':').unwrap_or((target, from));
    validate_tag(tag).map_err(invalid)?;
    let ws = state.existing(ws_name)?;
    let dir = ws.snapshots().join(tag);
    if !dir.join(CONTAINER_RECORD).is_file() {
        return Err(Error::NotFound {
            kind: "container snapshot",
            name: format!("{ws_name}:{tag}"),
        });
    }
    let rec: ContainerSnapshot = read_json(&dir.join(CONTAINER_RECORD))?;
    Ok((dir, rec))
}

impl Engine {
    /// Captures all of workspace `name`'s volumes together under `tag`
    /// (default: a UTC timestamp).
    pub fn container_snapshot_create(
        &self,
        name: &str,
        tag: Option<&str>,
        report: &dyn Reporter,
    ) -> Result<ContainerSnapshot> {
        let tag = tag.map(str::to_string).unwrap_or_else(default_tag);
        validate_tag(&tag).map_err(invalid)?;
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = open(&self.state, name)?;
        if rec.volumes.is_empty() {
            return Err(invalid(format!(
                "workspace {name} attaches no volumes: a container snapshot holds a workspace's volumes"
            )));
        }
        let names: Vec<String> = rec.volumes.iter().map(|m| m.volume.clone()).collect();
        let vols = volume_dirs(&self.state, &names)?;
        let _locks = vols
            .iter()
            .map(|v| FileLock::acquire(&v.lock_path()))
            .collect::<Result<Vec<_>, _>>()?;
        let dest = ws.snapshots().join(&tag);
        if dest.exists() {
            return Err(Error::SnapshotExists {
                workspace: name.to_string(),
                tag,
            });
        }
        private_dir(&ws.snapshots())?;
        let tmp = ws
            .snapshots()
            .join(format!(".creating-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        private_dir(&tmp)?;
        let made = (|| {
            let intos: Vec<(usize, &VolumeDir, PathBuf)> = vols
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v, tmp.join(volume::snapshot_dir(i))))
                .collect();
            report.step(&format!(
                "capturing {} volume(s) of workspace {name}",
                vols.len()
            ));
            let consistency = match freeze_in_vm(&ws, status, &intos)? {
                Some(c) => c,
                None => {
                    for (_, v, into) in &intos {
                        freeze_detached(&v.disk_dir(), into)?;
                    }
                    Consistency::Detached
                }
            };
            let c = ContainerSnapshot {
                tag: tag.clone(),
                workspace: name.to_string(),
                created: now_rfc3339(),
                consistency,
                volumes: names.clone(),
            };
            write_json(&tmp.join(CONTAINER_RECORD), &c)?;
            std::fs::rename(&tmp, &dest).io_ctx(|| format!("creating {}", dest.display()))?;
            Ok(c)
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Workspace `name`'s container snapshots, oldest first (tags
    /// starting with `prefix`).
    pub fn container_snapshot_list(
        &self,
        name: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<ContainerSnapshot>> {
        let ws = self.state.existing(name)?;
        let mut rows: Vec<ContainerSnapshot> = std::fs::read_dir(ws.snapshots())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let tag = e.file_name().to_string_lossy().into_owned();
                validate_tag(&tag).is_ok() && prefix.is_none_or(|p| tag.starts_with(p))
            })
            .filter_map(|e| read(&e.path()))
            .collect();
        rows.sort_by(|a, b| (&a.created, &a.tag).cmp(&(&b.created, &b.tag)));
        Ok(rows)
    }

    /// Sets the volumes of halted workspace `name` to container snapshot
    /// `from` (`[WORKSPACE:]TAG`), which must hold volumes of exactly the
    /// names it attaches, in the same order.
    pub fn container_snapshot_restore(&self, name: &str, from: &str) -> Result<ContainerSnapshot> {
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = open(&self.state, name)?;
        let (dir, snap) = container_dir(&self.state, name, from)?;
        let have: Vec<String> = rec.volumes.iter().map(|m| m.volume.clone()).collect();
        if have != snap.volumes {
            return Err(invalid(format!(
                "container snapshot {}:{} holds volumes [{}]; workspace {name} attaches [{}]: it restores only to the same volume names in the same order",
                snap.workspace,
                snap.tag,
                snap.volumes.join(", "),
                have.join(", ")
            )));
        }
        if status.is_live() || status == Status::Committing {
            return Err(conflict(
                &ws.name,
                format!(
                    "workspace {name} is {}: halt it before restoring its volumes",
                    status.name()
                ),
            ));
        }
        let vols = volume_dirs(&self.state, &have)?;
        for (i, v) in vols.iter().enumerate() {
            let _lock = FileLock::acquire(&v.lock_path())?;
            if let Some(u) = super::volume::volume_users(&self.state, &v.name)?
                .into_iter()
                .find(|u| u.status.is_live())
            {
                return Err(conflict(
                    name,
                    format!(
                        "volume {} is in use by running workspace {}: halt it first",
                        v.name, u.workspace
                    ),
                ));
            }
            let d = v.disk_dir();
            disk::recover(&d);
            disk::replace(&dir.join(volume::snapshot_dir(i)), &d)
                .map_err(|e| Error::Disk(e.into()))?;
        }
        Ok(snap)
    }
}

/// The container snapshot in `dir`, if it is one.
pub(crate) fn read(dir: &Path) -> Option<ContainerSnapshot> {
    read_json(&dir.join(CONTAINER_RECORD)).ok()
}
