//! Volumes: create, list, remove, snapshot, revert (see
//! `workspace::volume` for the layout). A volume is a disk chain of its
//! own that workspaces attach at create; it outlives them, is never part
//! of a commit, and goes into (and comes back with) their memory
//! snapshots, since the guest's page cache holds its blocks.

use std::path::{Path, PathBuf};

use super::container_snapshot::freeze_in_vm;
use super::{invalid, Engine, Error, IoContext, Reporter, Result};
use crate::disk::{self, Chain, ChainError};
use crate::snapshot::manifest::validate_tag;
use crate::util::lock::FileLock;
use crate::workspace::base::BaseCache;
use crate::workspace::disk::DiskError;
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::{now_rfc3339, StateDir, RECORD_VERSION};
use crate::workspace::volume::{
    self, Consistency, VolumeDir, VolumeMount, VolumeRecord, VolumeSnapshotRecord,
    VOLUME_SNAPSHOT_RECORD,
};

/// Default size of a new volume.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
const MIN_VOLUME_SIZE: u64 = 16 << 20;
const MAX_VOLUME_SIZE: u64 = 16 << 40;

/// A workspace that attaches a volume.
#[derive(Debug, Clone)]
pub struct VolumeUser {
    pub workspace: String,
    pub path: String,
    pub read_only: bool,
    pub status: Status,
    /// Its position among the workspace's volumes (the guest's serial).
    pub index: usize,
}

/// A volume as it is now.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub record: VolumeRecord,
    pub dir: PathBuf,
    /// Bytes its disk holds of its own (the chain's deltas).
    pub allocated_bytes: u64,
    pub users: Vec<VolumeUser>,
    pub snapshots: Vec<VolumeSnapshotRecord>,
}

fn disk_err(e: ChainError) -> Error {
    Error::Disk(DiskError::from(e))
}

fn not_found(name: &str) -> Error {
    Error::NotFound {
        kind: "volume",
        name: name.to_string(),
    }
}

fn snapshot_not_found(volume: &str, tag: &str) -> Error {
    Error::NotFound {
        kind: "volume snapshot",
        name: format!("{volume}:{tag}"),
    }
}

impl Engine {
    fn volume_dir(&self, name: &str) -> Result<VolumeDir> {
        VolumeDir::new(&self.state.root, name).map_err(invalid)
    }

    fn existing_volume(&self, name: &str) -> Result<VolumeDir> {
        let v = self.volume_dir(name)?;
        if !v.exists() {
            return Err(not_found(name));
        }
        Ok(v)
    }

    /// Checks `create -v` mounts and fills in each volume's disk.
    pub(crate) fn resolve_mounts(&self, mounts: &[VolumeMount]) -> Result<Vec<VolumeMount>> {
        volume::validate_mounts(mounts).map_err(invalid)?;
        mounts
            .iter()
            .map(|m| {
                let v = self.existing_volume(&m.volume)?;
                Ok(VolumeMount {
                    disk: v.disk_dir(),
                    ..m.clone()
                })
            })
            .collect()
    }

    fn volume_view(&self, v: &VolumeDir) -> Result<VolumeView> {
        let record = v.read()?;
        let snapshots = v
            .snapshot_tags()
            .iter()
            .filter_map(|t| volume::read_json(&v.snapshot(t).join(VOLUME_SNAPSHOT_RECORD)).ok())
            .collect();
        Ok(VolumeView {
            allocated_bytes: own_bytes(&v.disk_dir()),
            users: volume_users(&self.state, &record.name)?,
            dir: v.dir.clone(),
            record,
            snapshots,
        })
    }

    /// Creates volume `name`: an empty ext4 disk of `size` bytes (default
    /// 1 GiB), or, with `from` (`VOLUME:TAG`), a new chain over that volume
    /// snapshot (nothing copied; its size is the snapshot's).
    pub fn volume_create(
        &self,
        name: &str,
        size: Option<u64>,
        from: Option<&str>,
    ) -> Result<VolumeView> {
        let v = self.volume_dir(name)?;
        if let Some(s) = size {
            if !(MIN_VOLUME_SIZE..=MAX_VOLUME_SIZE).contains(&s) {
                return Err(invalid(format!(
                    "volume size {s} bytes is outside 16 MiB to 16 TiB"
                )));
            }
        }
        let source = match from {
            Some(spec) => {
                if size.is_some() {
                    return Err(invalid("--size and --from-snapshot do not go together: a volume made from a snapshot has its size"));
                }
                let (vol, tag) = spec.split_once(':').ok_or_else(|| {
                    invalid(format!("--from-snapshot {spec:?}: expected VOLUME:TAG"))
                })?;
                validate_tag(tag).map_err(invalid)?;
                let src = self.existing_volume(vol)?;
                let dir = src.snapshot(tag);
                if !dir.join(VOLUME_SNAPSHOT_RECORD).is_file() {
                    return Err(snapshot_not_found(vol, tag));
                }
                Some(dir.join(disk::SNAPSHOT_DISK_DIR))
            }
            None => None,
        };
        if v.dir.exists() {
            return Err(Error::AlreadyExists {
                kind: "volume",
                name: name.to_string(),
            });
        }
        let root = volume::volumes_root(&self.state.root);
        private_dir(&root)?;
        let tmp = root.join(format!(".creating-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let built = (|| -> Result<VolumeRecord> {
            private_dir(&tmp)?;
            let disk_dir = tmp.join("disk");
            let spec = match &source {
                Some(frozen) => disk::instantiate(frozen, &disk_dir).map_err(disk_err)?,
                None => {
                    let size = size.unwrap_or(DEFAULT_VOLUME_SIZE);
                    let key = crate::digest::sha256_bytes(
                        format!("microagent empty volume 1\nsize {size}\n").as_bytes(),
                    );
                    let (base, sha) = BaseCache::new(&self.state.root).get_or_build(&key, |p| {
                        crate::workspace::layout::mkfs_ext4(p, size, "volume", None)
                            .map_err(Error::from)
                    })?;
                    disk::create(&disk_dir, &base, Some(sha)).map_err(disk_err)?
                }
            };
            let rec = VolumeRecord {
                version: RECORD_VERSION,
                name: name.to_string(),
                size: spec.size,
                created: now_rfc3339(),
                from_snapshot: from.map(str::to_string),
            };
            volume::write_json(&tmp.join(volume::VOLUME_RECORD), &rec)?;
            Ok(rec)
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, &v.dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            if v.dir.exists() {
                return Err(Error::AlreadyExists {
                    kind: "volume",
                    name: name.to_string(),
                });
            }
            return Err(e).io_ctx(|| format!("creating {}", v.dir.display()));
        }
        self.volume_view(&v)
    }

    /// Every volume, by name.
    pub fn volume_list(&self) -> Result<Vec<VolumeView>> {
        volume::list(&self.state.root)
            .iter()
            .map(|n| self.volume_view(&self.volume_dir(n)?))
            .collect()
    }

    pub fn volume_inspect(&self, name: &str) -> Result<VolumeView> {
        self.volume_view(&self.existing_volume(name)?)
    }

    /// Removes a volume and its snapshots; refused while any workspace
    /// attaches it (delete those workspaces first). Workspace snapshots
    /// that captured it keep their own links to its blocks.
    pub fn volume_remove(&self, name: &str) -> Result<()> {
        let v = self.existing_volume(name)?;
        let _lock = FileLock::acquire(&v.lock_path())?;
        let users = volume_users(&self.state, name)?;
        if !users.is_empty() {
            return Err(Error::InUse {
                kind: "volume",
                name: name.to_string(),
                users: users
                    .iter()
                    .map(|u| {
                        format!(
                            "workspace {} ({}, at {})",
                            u.workspace,
                            u.status.name(),
                            u.path
                        )
                    })
                    .collect(),
            });
        }
        let doomed = v
            .dir
            .with_file_name(format!(".deleting-{name}-{}", std::process::id()));
        std::fs::rename(&v.dir, &doomed).io_ctx(|| format!("removing {}", v.dir.display()))?;
        std::fs::remove_dir_all(&doomed).io_ctx(|| format!("removing {}", doomed.display()))
    }

    /// Takes snapshot `tag` of volume `name`: the chain's top is frozen
    /// (nothing copied). A running workspace using it has the volume's
    /// filesystem frozen in the guest meanwhile (FIFREEZE: its dirty data
    /// and journal are written first); a paused one stays paused (what
    /// its page cache has not written is not in the snapshot, as after a
    /// power cut).
    pub fn volume_snapshot(
        &self,
        name: &str,
        tag: &str,
        report: &dyn Reporter,
    ) -> Result<VolumeSnapshotRecord> {
        validate_tag(tag).map_err(invalid)?;
        let v = self.existing_volume(name)?;
        // Locks are taken workspace first, then volumes (as a start does).
        // A workspace that starts after this look claims the volume's
        // lock first, so it waits for the snapshot.
        let live = volume_users(&self.state, name)?
            .into_iter()
            .find(|u| u.status.is_live());
        let opened = live
            .as_ref()
            .map(|u| super::open(&self.state, &u.workspace))
            .transpose()?;
        let _lock = FileLock::acquire(&v.lock_path())?;
        let dest = v.snapshot(tag);
        if dest.exists() {
            return Err(Error::AlreadyExists {
                kind: "volume snapshot",
                name: format!("{name}:{tag}"),
            });
        }
        private_dir(&v.snapshots())?;
        let tmp = v
            .snapshots()
            .join(format!(".creating-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        private_dir(&tmp)?;
        let made = match (&live, &opened) {
            (Some(u), Some(o)) => {
                report.step(&format!(
                    "freezing volume {name} in workspace {}",
                    u.workspace
                ));
                let into = tmp.join(disk::SNAPSHOT_DISK_DIR);
                match freeze_in_vm(&o.ws, o.status, &[(u.index, &v, into.clone())]) {
                    Ok(Some(c)) => Ok((c, Some(u.workspace.clone()))),
                    // It stopped meanwhile: nothing runs on the disk now.
                    Ok(None) => freeze_detached(&v.disk_dir(), &into)
                        .map(|()| (Consistency::Detached, None)),
                    Err(e) => Err(e),
                }
            }
            _ => freeze_detached(&v.disk_dir(), &tmp.join(disk::SNAPSHOT_DISK_DIR))
                .map(|()| (Consistency::Detached, None)),
        }
        .and_then(|(consistency, workspace)| {
            let rec = VolumeSnapshotRecord {
                tag: tag.to_string(),
                volume: name.to_string(),
                created: now_rfc3339(),
                consistency,
                workspace,
            };
            volume::write_json(&tmp.join(VOLUME_SNAPSHOT_RECORD), &rec)?;
            std::fs::rename(&tmp, &dest).io_ctx(|| format!("creating {}", dest.display()))?;
            Ok(rec)
        });
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Volume `name` locked, and its snapshot `tag`, which must exist.
    fn locked_snapshot(&self, name: &str, tag: &str) -> Result<(VolumeDir, FileLock, PathBuf)> {
        validate_tag(tag).map_err(invalid)?;
        let v = self.existing_volume(name)?;
        let lock = FileLock::acquire(&v.lock_path())?;
        let snap = v.snapshot(tag);
        if !snap.join(VOLUME_SNAPSHOT_RECORD).is_file() {
            return Err(snapshot_not_found(name, tag));
        }
        Ok((v, lock, snap))
    }

    /// Sets volume `name` back to its snapshot `tag` (a new empty top
    /// over that frozen chain; the chain it had is dropped). Refused while
    /// a workspace using it runs: its page cache would disagree.
    pub fn volume_revert(&self, name: &str, tag: &str) -> Result<VolumeView> {
        let (v, _lock, snap) = self.locked_snapshot(name, tag)?;
        if let Some(u) = volume_users(&self.state, name)?
            .iter()
            .find(|u| u.status.is_live())
        {
            return Err(super::conflict(
                &u.workspace,
                format!(
                    "volume {name} is attached to workspace {}, which is {}: halt it before reverting the volume",
                    u.workspace,
                    u.status.name()
                ),
            ));
        }
        let dir = v.disk_dir();
        disk::recover(&dir);
        disk::replace(&snap.join(disk::SNAPSHOT_DISK_DIR), &dir).map_err(disk_err)?;
        self.volume_view(&v)
    }

    /// Deletes snapshot `tag` of volume `name` (volumes made from it keep
    /// their links to its blocks).
    pub fn volume_snapshot_delete(&self, name: &str, tag: &str) -> Result<()> {
        let (v, _lock, snap) = self.locked_snapshot(name, tag)?;
        let doomed = v
            .snapshots()
            .join(format!(".deleting-{tag}-{}", std::process::id()));
        std::fs::rename(&snap, &doomed).io_ctx(|| format!("removing {}", snap.display()))?;
        std::fs::remove_dir_all(&doomed).io_ctx(|| format!("removing {}", doomed.display()))
    }
}

/// Every workspace that attaches volume `name`, with its status now.
pub(crate) fn volume_users(state: &StateDir, name: &str) -> Result<Vec<VolumeUser>> {
    let mut users = Vec::new();
    for ws_name in state.list()? {
        let ws = state.workspace(&ws_name)?;
        let Ok(rec) = ws.read() else { continue };
        for (index, m) in rec.volumes.iter().enumerate() {
            if m.volume == name {
                users.push(VolumeUser {
                    workspace: ws_name.clone(),
                    path: m.path.clone(),
                    read_only: m.read_only,
                    status: reconcile(&ws, &rec).0,
                    index,
                });
            }
        }
    }
    Ok(users)
}

/// Held while a workspace with these volumes starts: no volume is
/// used by two running VMs (two kernels writing one ext4 would
/// corrupt it). Refuses when another live workspace has one attached.
pub(crate) fn claim_volumes(
    state: &StateDir,
    workspace: &str,
    mounts: &[VolumeMount],
) -> Result<Vec<FileLock>> {
    let mut locks = Vec::new();
    for m in mounts {
        let v = VolumeDir::new(&state.root, &m.volume).map_err(invalid)?;
        if !v.exists() {
            return Err(not_found(&m.volume));
        }
        locks.push(FileLock::acquire(&v.lock_path())?);
        if let Some(u) = volume_users(state, &m.volume)?
            .into_iter()
            .find(|u| u.workspace != workspace && u.status.is_live())
        {
            return Err(super::conflict(
                workspace,
                format!(
                    "volume {} is in use by running workspace {} (at {}): halt it first",
                    m.volume, u.workspace, u.path
                ),
            ));
        }
    }
    Ok(locks)
}

pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .io_ctx(|| format!("creating {}", dir.display()))
}

/// Freezes the chain in `disk` (no VM has it open) into `into`, linked
/// and durable.
pub(crate) fn freeze_detached(disk_dir: &Path, into: &Path) -> Result<()> {
    disk::recover(disk_dir);
    let mut chain = Chain::open(disk_dir).map_err(disk_err)?;
    private_dir(into)?;
    chain.freeze(Some(into)).map_err(disk_err)?;
    chain
        .sync_frozen()
        .io_ctx(|| format!("syncing {}", disk_dir.display()))?;
    let spec = disk::link_frozen(disk_dir, into).map_err(disk_err)?;
    spec.write(into)
        .map_err(ChainError::from)
        .map_err(disk_err)?;
    Ok(())
}

/// Allocated bytes of a chain's deltas and top (not its shared base).
fn own_bytes(disk_dir: &Path) -> u64 {
    let Ok(spec) = disk::ChainSpec::read(disk_dir) else {
        return 0;
    };
    spec.files()
        .filter(|f| *f != spec.base)
        .map(|f| crate::util::copy::allocated_bytes(&disk_dir.join(f)))
        .sum()
}
