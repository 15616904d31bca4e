//! Volumes in memory snapshots. The guest's page cache holds blocks of
//! every volume it has mounted, so a memory snapshot holds each volume's
//! chain frozen at the same paused moment (`vol-N/`, hard links like
//! `disk/`), a rollback puts the volumes back with the memory, and a fork
//! gets copy-on-write clones of them (new volumes, nothing copied).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::{invalid, Error, IoContext, Result};
use crate::disk::{self, ChainSpec, CHAIN_FILE};
use crate::snapshot::manifest::{FileInfo, Manifest, VolumeRef};
use crate::util::lock::FileLock;
use crate::workspace::store::{StateDir, WorkspaceRecord};
use crate::workspace::volume::{self, VolumeDir, VolumeMount, VolumeRecord};

fn damaged(what: &str, e: impl std::fmt::Display) -> Error {
    Error::SnapshotDamaged {
        message: format!("{what}: {e}"),
    }
}

/// The manifest's record of a workspace's volumes.
pub(crate) fn refs(rec: &WorkspaceRecord) -> Vec<VolumeRef> {
    rec.volumes
        .iter()
        .map(|m| VolumeRef {
            volume: m.volume.clone(),
            path: m.path.clone(),
            read_only: m.read_only,
        })
        .collect()
}

/// Links each volume's frozen chain, which the VMM described in
/// `dest/vol-N/`, from the volume's directory; returns their specs.
pub(crate) fn link(rec: &WorkspaceRecord, dest: &Path, what: &str) -> Result<Vec<ChainSpec>> {
    rec.volumes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            disk::link_frozen(&m.disk, &dest.join(volume::snapshot_dir(i)))
                .map_err(|e| damaged(what, format!("volume {}: {e}", m.volume)))
        })
        .collect()
}

/// Makes the volumes' frozen chains durable (their deltas, and each
/// volume's `chain.json` naming its new top), hashes their files and
/// describes them for the manifest as `vol-N/<file>`.
pub(crate) fn files(
    rec: &WorkspaceRecord,
    dest: &Path,
    specs: Vec<ChainSpec>,
) -> Result<Vec<FileInfo>> {
    let mut infos = Vec::new();
    for (i, (m, mut spec)) in rec.volumes.iter().zip(specs).enumerate() {
        let live = m.disk.join(CHAIN_FILE);
        crate::util::fs::sync_with_dir(&live).io_ctx(|| format!("syncing {}", live.display()))?;
        let dir = dest.join(volume::snapshot_dir(i));
        for name in spec.files().map(str::to_string).collect::<Vec<_>>() {
            if spec.digests.contains_key(&name) {
                continue;
            }
            let path = dir.join(&name);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_data())
                .io_ctx(|| format!("syncing {}", path.display()))?;
            let sha = disk::file_sha256(&path, spec.block_size)
                .io_ctx(|| format!("hashing {}", path.display()))?;
            spec.digests.insert(name, sha);
        }
        spec.write(&dir)
            .map_err(disk::ChainError::from)
            .map_err(crate::workspace::disk::DiskError::from)?;
        infos.extend(super::snapshot_files::chain_infos(&dir, &spec, |f| {
            format!("{}/{f}", volume::snapshot_dir(i))
        })?);
    }
    Ok(infos)
}

/// Refuses a snapshot whose volumes the workspace cannot take back: the
/// same number, mount points and modes, in the same order (names may
/// differ: a fork's volumes are clones under new names).
pub(crate) fn check(m: &Manifest, rec: &WorkspaceRecord, dir: &Path, tag: &str) -> Result<()> {
    let want: Vec<(&str, bool)> = m
        .volumes
        .iter()
        .map(|v| (v.path.as_str(), v.read_only))
        .collect();
    let have: Vec<(&str, bool)> = rec
        .volumes
        .iter()
        .map(|v| (v.path.as_str(), v.read_only))
        .collect();
    if want != have {
        let show = |v: &[(&str, bool)]| {
            let items: Vec<String> = v
                .iter()
                .map(|(p, ro)| format!("{p}{}", if *ro { ":ro" } else { "" }))
                .collect();
            format!("[{}]", items.join(", "))
        };
        return Err(invalid(format!(
            "snapshot {tag} was taken with volumes mounted at {}, workspace {} has {}: a memory snapshot resumes only over the same volumes",
            show(&want),
            rec.name,
            show(&have)
        )));
    }
    for i in 0..m.volumes.len() {
        let d = dir.join(volume::snapshot_dir(i));
        let spec = ChainSpec::read(&d).map_err(|e| damaged(&format!("snapshot {tag}"), e))?;
        if spec.top.is_some() {
            return Err(damaged(
                &format!("snapshot {tag}"),
                format!("{} is not frozen", d.display()),
            ));
        }
        for f in spec.files() {
            if !d.join(f).is_file() {
                return Err(damaged(
                    &format!("snapshot {tag}"),
                    format!("{} is missing", d.join(f).display()),
                ));
            }
        }
    }
    Ok(())
}

/// Puts each volume of `rec` back to the moment snapshot `dir` froze it
/// (a rollback: the memory and the volumes go back together).
pub(crate) fn restore(state: &StateDir, rec: &WorkspaceRecord, dir: &Path) -> Result<()> {
    for (i, m) in rec.volumes.iter().enumerate() {
        let v = VolumeDir::new(&state.root, &m.volume).map_err(invalid)?;
        let _lock = FileLock::acquire(&v.lock_path())?;
        disk::recover(&m.disk);
        disk::replace(&dir.join(volume::snapshot_dir(i)), &m.disk)
            .map_err(|e| Error::Disk(e.into()))?;
    }
    Ok(())
}

/// A fork's own volumes: for each volume snapshot `dir` holds, a new
/// volume `<fork>-<volume>` over its frozen chain (nothing copied),
/// mounted where the source had it. Made all or none.
pub(crate) fn fork(
    state: &StateDir,
    m: &Manifest,
    dir: &Path,
    fork_name: &str,
) -> Result<Vec<VolumeMount>> {
    let mut made: Vec<VolumeDir> = Vec::new();
    let result = (|| {
        let mut mounts = Vec::new();
        for (i, src) in m.volumes.iter().enumerate() {
            let name = format!("{fork_name}-{}", src.volume);
            let v = VolumeDir::new(&state.root, &name)
                .map_err(|e| invalid(format!("the fork's copy of volume {}: {e}", src.volume)))?;
            super::volume::private_dir(&volume::volumes_root(&state.root))?;
            match std::fs::DirBuilder::new().mode(0o700).create(&v.dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::AlreadyExists {
                        kind: "volume",
                        name,
                    })
                }
                r => r.io_ctx(|| format!("creating {}", v.dir.display()))?,
            }
            made.push(v.clone());
            let spec = disk::instantiate(&dir.join(volume::snapshot_dir(i)), &v.disk_dir())
                .map_err(|e| Error::Disk(e.into()))?;
            v.write(&VolumeRecord {
                version: crate::workspace::store::RECORD_VERSION,
                name: name.clone(),
                size: spec.size,
                created: crate::workspace::store::now_rfc3339(),
                from_snapshot: Some(format!("{}:{} (memory snapshot)", m.workspace, m.tag)),
            })?;
            mounts.push(VolumeMount {
                volume: name,
                path: src.path.clone(),
                read_only: src.read_only,
                disk: v.disk_dir(),
            });
        }
        Ok(mounts)
    })();
    if result.is_err() {
        for v in made {
            let _ = std::fs::remove_dir_all(&v.dir);
        }
    }
    result
}
