//! A workspace's root disk: a copy-on-write chain in `<workspace>/disk`
//! (see `crate::disk`), made over a shared base, or over a snapshot's
//! frozen chain for forks, rollbacks and warm starts. Whole-disk copies
//! remain only where a base is built (reflink where the filesystem shares
//! extents, otherwise a sparse copy of the data extents).

use std::fs::File;
use std::path::Path;

use super::store::WorkspaceDir;
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::disk::{self, ChainError, ChainSpec, CHAIN_FILE};
pub use crate::util::copy::CopyMethod;
use crate::util::copy::{copy_file_into, data_extents};

/// A snapshot's or a pre-chain workspace's flat root disk (format 1.x).
pub const LEGACY_ROOTFS: &str = "rootfs.ext4";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("copying disk {src} to {dst}: {source}")]
    Copy {
        src: String,
        dst: String,
        source: std::io::Error,
    },
    #[error("growing disk {path} to {size} bytes: {reason}")]
    Grow {
        path: String,
        size: u64,
        reason: String,
    },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("workspace {workspace} has no root disk ({path} is missing)")]
    Missing { workspace: String, path: String },
}

/// The workspace's chain, made whole first: a rollback a crash
/// interrupted is finished, and a workspace made before chains has its
/// flat disk turned into the base of one (linked, not copied).
pub fn ensure_chain(ws: &WorkspaceDir) -> Result<ChainSpec, DiskError> {
    let dir = ws.disk_dir();
    disk::recover(&dir);
    if !dir.join(CHAIN_FILE).is_file() {
        let flat = ws.dir.join(LEGACY_ROOTFS);
        if !flat.is_file() {
            return Err(DiskError::Missing {
                workspace: ws.name.clone(),
                path: dir.join(CHAIN_FILE).display().to_string(),
            });
        }
        disk::create(&dir, &flat, None)?;
        let _ = std::fs::remove_file(&flat);
    }
    Ok(ChainSpec::read(&dir).map_err(ChainError::from)?)
}

/// Sets the workspace's root disk to the moment the snapshot (or boot
/// cache entry) in `snap` froze, under a new empty top: nothing is
/// copied. Snapshots of format 1.x hold a flat `rootfs.ext4`, which
/// becomes the base of the new chain.
pub fn restore_from(snap: &Path, ws: &WorkspaceDir) -> Result<ChainSpec, DiskError> {
    let dir = ws.disk_dir();
    disk::recover(&dir);
    let frozen = snap.join(SNAPSHOT_DISK_DIR);
    let build = |target: &Path| {
        if frozen.join(CHAIN_FILE).is_file() {
            disk::instantiate(&frozen, target)
        } else {
            disk::create(target, &snap.join(LEGACY_ROOTFS), None)
        }
    };
    let spec = if dir.exists() {
        disk::replace_with(&dir, build)?
    } else {
        build(&dir)?
    };
    let _ = std::fs::remove_file(ws.dir.join(LEGACY_ROOTFS));
    Ok(spec)
}

/// sha256 of a disk image's content: its length, then every non-zero 4 KiB
/// block with its offset. Equal content gives an equal hash whether zeros
/// are holes or allocated, and holes are never read.
pub fn content_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 64 * BLOCK];
    for (start, end) in data_extents(&file, len)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], pos)?;
            for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    h.update((pos + (i * BLOCK) as u64).to_le_bytes());
                    h.update(block);
                }
            }
            pos += n as u64;
        }
    }
    Ok(crate::digest::hex(&h.finalize()))
}

/// Copies `src` to `dst` (through a temp file and rename, so `dst` is never
/// half-written), durably, and says how.
pub fn copy_disk(src: &Path, dst: &Path) -> Result<CopyMethod, DiskError> {
    copy_disk_with(src, dst, Sync::Now)
}

/// When a copy reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Now,
    /// The caller fsyncs later, before anything depends on the copy:
    /// a snapshot's copy is made while the guest is paused, and its
    /// writeback need not be.
    Deferred,
}

pub fn copy_disk_with(src: &Path, dst: &Path, sync: Sync) -> Result<CopyMethod, DiskError> {
    let err = |source| DiskError::Copy {
        src: src.display().to_string(),
        dst: dst.display().to_string(),
        source,
    };
    let tmp = dst.with_extension("copying");
    let result = (|| {
        let s = File::open(src)?;
        let d = File::create(&tmp)?;
        let method = copy_file_into(&s, &d)?;
        if sync == Sync::Now {
            d.sync_all()?;
        }
        std::fs::rename(&tmp, dst)?;
        Ok(method)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Grows an ext4 image to `size` bytes (never shrinks) and resizes the
/// filesystem to fill it.
pub fn grow_ext4(path: &Path, size: u64) -> Result<(), DiskError> {
    let err = |reason: String| DiskError::Grow {
        path: path.display().to_string(),
        size,
        reason,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let cur = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if size <= cur {
        return Ok(());
    }
    f.set_len(size).map_err(|e| err(e.to_string()))?;
    drop(f);
    let out = std::process::Command::new("resize2fs")
        .arg("-f")
        .arg(path)
        .output()
        .map_err(|e| err(format!("running resize2fs: {e}")))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn content_hash_ignores_allocation_and_sees_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        let dense = dir.path().join("dense");
        let mut f = File::create(&sparse).unwrap();
        f.set_len(1 << 20).unwrap();
        f.seek(SeekFrom::Start(512 << 10)).unwrap();
        f.write_all(b"marker").unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[512 << 10..(512 << 10) + 6].copy_from_slice(b"marker");
        std::fs::write(&dense, &data).unwrap();
        let a = content_sha256(&sparse).unwrap();
        assert_eq!(a, content_sha256(&dense).unwrap());
        data[(512 << 10) + 5] = b'X';
        std::fs::write(&dense, &data).unwrap();
        assert_ne!(a, content_sha256(&dense).unwrap());
        File::options()
            .write(true)
            .open(&sparse)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        assert_ne!(a, content_sha256(&sparse).unwrap(), "the length counts");
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0x11; 4096]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[0x22; 8192]).unwrap();
        f.sync_all().unwrap();
        let dst = dir.path().join("dst.img");
        let method = copy_disk(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        if method == CopyMethod::Sparse {
            assert!(
                meta.blocks() * 512 < 1 << 20,
                "holes were filled: {} blocks",
                meta.blocks()
            );
        }
        assert!(!dst.with_extension("copying").exists());
    }

    #[test]
    fn missing_source_names_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let e = copy_disk(&dir.path().join("nope"), &dir.path().join("d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("/d:"), "{e}");
    }
}
