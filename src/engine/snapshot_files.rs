//! The files a snapshot's manifest lists, with their sizes and hashes,
//! and what a snapshot occupies.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Error, IoContext, Result};
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::digest::sha256_file;
use crate::disk::{ChainSpec, CHAIN_FILE};
use crate::snapshot::manifest::{FileInfo, HASH_BLOCKS, HASH_CHAIN, MEMORY, VMSTATE};
use crate::vmm::control::STAGING_PREFIX;
use crate::workspace::disk::content_sha256;
use crate::workspace::store::WorkspaceDir;

/// Allocated bytes of what the snapshot added: memory, state, and its
/// deltas; not the base disk, which every workspace of the image shares.
pub(crate) fn snapshot_size(dir: &Path) -> u64 {
    crate::snapshot::manifest::own_bytes(dir)
}

fn join<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| {
        Err(Error::Io {
            context: "hashing snapshot files".into(),
            source: std::io::Error::other("hashing thread panicked"),
        })
    })
}

/// The manifest's name for a file of the snapshot's disk chain.
pub(crate) fn disk_entry(name: &str) -> String {
    format!("{SNAPSHOT_DISK_DIR}/{name}")
}

/// Content digests of chain files that earlier snapshots of this
/// workspace already hashed (file names are unique, files immutable).
fn known_digests(ws: &WorkspaceDir) -> BTreeMap<String, String> {
    let mut known = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(ws.snapshots()) {
        for e in entries.flatten() {
            if let Ok(spec) = ChainSpec::read(&e.path().join(SNAPSHOT_DISK_DIR)) {
                known.extend(spec.digests);
            }
        }
    }
    known
}

/// Syncs a snapshot file (written unsynced while the guest was paused)
/// and describes it for the manifest. Sparse memory is hashed by content
/// (`HASH_BLOCKS`): only its data extents are read.
fn file_info(dir: &Path, name: &str) -> Result<FileInfo> {
    let path = dir.join(name);
    let sparse = name == MEMORY;
    // The writeback and the hash both take as long as the file is big:
    // run them side by side (the hash reads the page cache).
    let (synced, sha256) = std::thread::scope(|scope| {
        let sync = scope.spawn(|| std::fs::File::open(&path).and_then(|f| f.sync_all()));
        let sha256 = if sparse {
            content_sha256(&path)
        } else {
            sha256_file(&path)
        };
        let synced = sync
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")));
        (synced, sha256)
    });
    synced.io_ctx(|| format!("syncing {}", path.display()))?;
    Ok(FileInfo {
        name: name.to_string(),
        size: std::fs::metadata(&path)
            .io_ctx(|| format!("{}", path.display()))?
            .len(),
        sha256: sha256.io_ctx(|| format!("hashing {}", path.display()))?,
        hash: sparse.then(|| HASH_BLOCKS.to_string()),
    })
}

/// Syncs and hashes memory, state and the chain's files that no earlier
/// snapshot of this workspace hashed (after the guest runs again, one
/// thread per file), records the chain files' digests in the snapshot's
/// `disk/chain.json`, and returns the manifest's file list.
pub(crate) fn manifest_files(
    ws: &WorkspaceDir,
    dest_tmp: &Path,
    disk: &Path,
    mut spec: ChainSpec,
) -> Result<Vec<FileInfo>> {
    // Chain files are immutable and uniquely named: each is hashed once,
    // by the first snapshot that has it.
    let known = known_digests(ws);
    let unhashed: Vec<String> = spec
        .files()
        .filter(|f| !spec.digests.contains_key(*f) && !known.contains_key(*f))
        .map(str::to_string)
        .collect();
    let bs = spec.block_size;
    let (infos, digests) = std::thread::scope(|scope| {
        let workers: Vec<_> = [VMSTATE, MEMORY]
            .iter()
            .map(|f| scope.spawn(|| file_info(dest_tmp, f)))
            .collect();
        let hashers: Vec<_> = unhashed
            .iter()
            .map(|f| {
                let path = disk.join(f);
                scope.spawn(move || {
                    // The delta this snapshot froze was left unsynced
                    // while the guest was paused.
                    std::fs::File::open(&path)
                        .and_then(|f| f.sync_data())
                        .io_ctx(|| format!("syncing {}", path.display()))?;
                    crate::disk::file_sha256(&path, bs)
                        .io_ctx(|| format!("hashing {}", path.display()))
                })
            })
            .collect();
        let infos = workers
            .into_iter()
            .map(|w| join(w.join()))
            .collect::<Result<Vec<FileInfo>>>();
        let digests = hashers
            .into_iter()
            .map(|h| join(h.join()))
            .collect::<Result<Vec<String>>>();
        (infos, digests)
    });
    let mut infos = infos?;
    // The workspace's chain.json naming its new top must be durable before
    // the snapshot that links its old top is: a crash must never leave
    // the workspace writing into a file a snapshot holds.
    let ws_chain = ws.disk_dir().join(CHAIN_FILE);
    crate::util::fs::sync_with_dir(&ws_chain)
        .io_ctx(|| format!("syncing {}", ws_chain.display()))?;
    for (name, digest) in unhashed.iter().zip(digests?) {
        spec.digests.insert(name.clone(), digest);
    }
    for name in spec.files().map(str::to_string).collect::<Vec<_>>() {
        if let Some(d) = known.get(&name) {
            spec.digests.entry(name).or_insert_with(|| d.clone());
        }
    }
    spec.write(disk)
        .map_err(crate::disk::ChainError::from)
        .map_err(crate::workspace::disk::DiskError::from)?;
    infos.extend(chain_infos(disk, &spec, disk_entry)?);
    Ok(infos)
}

/// The manifest's entries for the frozen chain in `dir` (its chain.json
/// already written with every file's digest): chain.json, synced and
/// hashed whole, then each file by its digest; named `entry(file)`.
pub(crate) fn chain_infos(
    dir: &Path,
    spec: &ChainSpec,
    entry: impl Fn(&str) -> String,
) -> Result<Vec<FileInfo>> {
    let mut infos = vec![file_info(dir, CHAIN_FILE).map(|mut i| {
        i.name = entry(CHAIN_FILE);
        i
    })?];
    for name in spec.files() {
        let path = dir.join(name);
        infos.push(FileInfo {
            name: entry(name),
            size: std::fs::metadata(&path)
                .io_ctx(|| format!("{}", path.display()))?
                .len(),
            sha256: spec.digests.get(name).cloned().unwrap_or_default(),
            hash: Some(HASH_CHAIN.to_string()),
        });
    }
    Ok(infos)
}

/// Removes the entries of `snapshots` whose names start with one of
/// `prefixes`.
fn remove_prefixed(snapshots: &Path, prefixes: &[&str]) {
    let Ok(entries) = std::fs::read_dir(snapshots) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Temp directories of snapshot creates or deletes that were killed midway.
/// Only called under the workspace lock, so none of them is in use.
pub(super) fn remove_leftovers(snapshots: &Path) {
    remove_prefixed(snapshots, &[".creating-", ".deleting-", STAGING_PREFIX]);
}

/// Staging directories the VMM made; under the workspace lock.
pub(crate) fn remove_staging(snapshots: &Path) {
    remove_prefixed(snapshots, &[STAGING_PREFIX]);
}

/// Renames directory `from` to `to` (which may be an empty directory); on
/// another filesystem (a boot cache set elsewhere), copies it (see
/// `copy_tree`) and removes `from`.
pub(super) fn move_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(from, to)?;
            std::fs::remove_dir_all(from)
        }
        other => other,
    }
}

/// Copies directory `from` into `to` (created if missing), subdirectories
/// too (a snapshot's `disk/`). Files keep their holes and their allocated
/// blocks exactly (a delta's allocation is its content); unsynced: the
/// caller syncs them.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        } else {
            let src = std::fs::File::open(entry.path())?;
            let dst = std::fs::File::create(dst)?;
            crate::util::copy::copy_file_into(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The cross-filesystem fallback of `move_dir` copies `disk/` too, and
    /// an allocated block of zeros stays allocated (it hides the block
    /// below it in the chain).
    #[test]
    fn copied_snapshot_trees_keep_subdirectories_and_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir_all(from.join("disk")).unwrap();
        std::fs::write(from.join("vmstate.bin"), b"state").unwrap();
        let delta = std::fs::File::create(from.join("disk/d.delta")).unwrap();
        delta.set_len(1 << 20).unwrap();
        delta.write_all_at(&[0u8; 4096], 8192).unwrap();
        copy_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("vmstate.bin")).unwrap(), b"state");
        let copied = std::fs::File::open(to.join("disk/d.delta")).unwrap();
        assert_eq!(
            crate::util::copy::data_extents(&copied, 1 << 20).unwrap(),
            vec![(8192, 12288)]
        );
    }
}
