//! `snapshot verify`: every file a snapshot's manifest lists, hashed again
//! the way the manifest says and compared, so tampering or bit rot is
//! named before anything resumes from it. Restores check the small files
//! (manifest, chain.json, vmstate.bin) every time; this reads everything.

use std::path::Path;

use super::snapshot::snapshot_dir;
use super::snapshot_files::disk_entry;
use super::{Engine, Error, Result};
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::digest::sha256_file;
use crate::disk::ChainSpec;
use crate::snapshot::manifest::{FileInfo, Manifest, HASH_BLOCKS, HASH_CHAIN};
use crate::workspace::disk::content_sha256;

/// One file of a verified snapshot.
#[derive(Debug, Clone)]
pub struct VerifiedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct Verified {
    pub workspace: String,
    pub tag: String,
    pub files: Vec<VerifiedFile>,
}

/// What `info`'s file hashes to now, by the manifest's method; Err names
/// how it differs.
fn check_file(
    dir: &Path,
    info: &FileInfo,
    block_size: Option<u32>,
) -> std::result::Result<(), String> {
    // Names come from the manifest: nothing outside the snapshot.
    let inside = info
        .name
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..");
    if !inside {
        return Err("is not a file of the snapshot".into());
    }
    let path = dir.join(&info.name);
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("cannot be read ({e})"))?
        .len();
    if size != info.size {
        return Err(format!("is {size} bytes, the manifest says {}", info.size));
    }
    let got = match info.hash.as_deref() {
        None => sha256_file(&path),
        Some(HASH_BLOCKS) => content_sha256(&path),
        Some(HASH_CHAIN) => match block_size {
            Some(bs) => crate::disk::file_sha256(&path, bs),
            None => return Err("is a disk chain file, but the snapshot has no chain".into()),
        },
        Some(other) => return Err(format!("has an unknown hash method {other:?}")),
    }
    .map_err(|e| format!("cannot be read ({e})"))?;
    if got != info.sha256 {
        return Err(format!(
            "does not match its manifest (sha256 {got}, the manifest says {})",
            info.sha256
        ));
    }
    Ok(())
}

/// Hashes every file `m` lists in snapshot directory `dir` again (one
/// thread per file) and compares; Err names every file that differs.
pub(crate) fn verify_files(dir: &Path, m: &Manifest) -> std::result::Result<(), String> {
    let chain = ChainSpec::read(&dir.join(SNAPSHOT_DISK_DIR)).ok();
    let block_size = chain.as_ref().map(|s| s.block_size);
    let results: Vec<std::result::Result<(), String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = m
            .files
            .iter()
            .map(|f| scope.spawn(|| check_file(dir, f, block_size)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("hashing it panicked".into()))
            })
            .collect()
    });
    let bad: Vec<String> = m
        .files
        .iter()
        .zip(&results)
        .filter_map(|(f, r)| r.as_ref().err().map(|why| format!("{} {why}", f.name)))
        .collect();
    if !bad.is_empty() {
        return Err(bad.join("; "));
    }
    // The chain lists only files the manifest pins.
    if let Some(spec) = &chain {
        for f in spec.files() {
            if m.file(&disk_entry(f)).is_none() {
                return Err(format!(
                    "its disk chain names {f}, which the manifest does not pin"
                ));
            }
        }
    }
    Ok(())
}

impl Engine {
    /// Hashes every file of snapshot `tag` of workspace `name` again (one
    /// thread per file) and compares with its manifest. Err
    /// (`snapshot_damaged`) names every file that differs.
    pub fn snapshot_verify(&self, name: &str, tag: &str) -> Result<Verified> {
        let ws = self.state.existing(name)?;
        let dir = snapshot_dir(&ws, tag)?;
        let damaged = |what: String| Error::SnapshotDamaged {
            message: format!("snapshot {tag} of workspace {name} is damaged: {what}"),
        };
        let m = Manifest::read(&dir).map_err(|e| damaged(e.to_string()))?;
        verify_files(&dir, &m).map_err(damaged)?;
        Ok(Verified {
            workspace: ws.name.clone(),
            tag: m.tag.clone(),
            files: m
                .files
                .iter()
                .map(|f| VerifiedFile {
                    name: f.name.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        })
    }
}
