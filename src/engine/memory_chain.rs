//! Diff snapshots, the engine's side: which snapshot a running
//! workspace's RAM equalled at its last save or restore (its memory base,
//! in the workspace record), the ids that name memory layers, and linking
//! a parent's layers into a new snapshot so that every snapshot directory
//! stays whole on its own (deleting a parent keeps its files alive through
//! the links; nothing is reference-counted).
//!
//! Safe by construction: the VMM writes a diff only over the layer whose
//! id the request names *and* that it last saved or restored (it logs
//! dirty pages from that moment); the engine names a parent only from a
//! manifest it reads now, and checks the VMM's reported chain against it.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::snapshot::manifest::{memory_layer_file, FileInfo, Manifest, MAX_MEMORY_LAYERS};
use crate::workspace::store::WorkspaceRecord;

/// The snapshot a new snapshot may be a diff over.
pub(crate) struct Parent {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Parent {
    /// Its top layer's id: what the VMM must have last saved or restored.
    pub fn id(&self) -> Option<String> {
        self.manifest.memory_layers.last().cloned()
    }
}

/// `rec`'s memory base, when it still has memory layers (a snapshot from
/// before them, or one deleted meanwhile, has none) and its chain room
/// for one more.
pub(crate) fn parent(rec: &WorkspaceRecord) -> Option<Parent> {
    let dir = rec.memory_base.as_ref()?;
    let manifest = Manifest::read(dir).ok()?;
    let n = manifest.memory_layers.len();
    (n > 0 && n < MAX_MEMORY_LAYERS).then(|| Parent {
        dir: dir.clone(),
        manifest,
    })
}

/// A new memory layer id: 128 random bits, hex.
pub(crate) fn new_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(crate::digest::hex(&bytes))
}

/// Why a diff snapshot's parent could not be linked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("the VMM wrote a diff over memory layers {got:?}, but the parent snapshot {dir} holds {want:?}")]
    Mismatch {
        dir: String,
        got: Vec<String>,
        want: Vec<String>,
    },
    #[error("the parent snapshot {dir} lists no {name} in its manifest")]
    Unlisted { dir: String, name: String },
    #[error("linking {from} to {to}: {source}")]
    Io {
        from: String,
        to: String,
        source: std::io::Error,
    },
}

/// Links `parent`'s memory layers into `dest`, the new snapshot whose
/// layers the VMM reported as `layers` (the parent's, then its own), under
/// their new names. Returns their manifest entries: the parent's, renamed
/// (immutable files are not read again).
pub(crate) fn link_parent(
    parent: &Parent,
    layers: &[String],
    dest: &Path,
) -> Result<Vec<FileInfo>, LinkError> {
    let want = &parent.manifest.memory_layers;
    let (n, pn) = (layers.len(), want.len());
    if n != pn + 1 || &layers[..pn] != want.as_slice() {
        return Err(LinkError::Mismatch {
            dir: parent.dir.display().to_string(),
            got: layers.to_vec(),
            want: want.clone(),
        });
    }
    let mut infos = Vec::new();
    for k in 0..pn {
        let old = memory_layer_file(k, pn);
        let new = memory_layer_file(k, n);
        let mut info = parent
            .manifest
            .file(&old)
            .cloned()
            .ok_or_else(|| LinkError::Unlisted {
                dir: parent.dir.display().to_string(),
                name: old.clone(),
            })?;
        info.name = new.clone();
        let (from, to) = (parent.dir.join(&old), dest.join(&new));
        link_or_copy(&from, &to).map_err(|source| LinkError::Io {
            from: from.display().to_string(),
            to: to.display().to_string(),
            source,
        })?;
        infos.push(info);
    }
    Ok(infos)
}

/// A hard link; a sparse copy where the two are on different filesystems
/// (a boot cache kept elsewhere).
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let src = std::fs::File::open(from)?;
            let dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(to)?;
            crate::util::copy::copy_file_into(&src, &dst).map(|_| ())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_hex() {
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        assert!(crate::snapshot::manifest::valid_memory_id(&a));
        assert_ne!(a, b);
    }
}
