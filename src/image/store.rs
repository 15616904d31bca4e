//! The local image store under `$MICROAGENT_HOME/images`:
//! `blobs/sha256/<hex>` (verified blobs), `layers/<hex>.erofs` (read-only
//! layer disks, keyed by diff_id and shared by every image that has the
//! layer), `<manifest hex>/{image.json, config.json}` (one record per
//! image), `tmp/` (builds in progress; each part becomes visible by one
//! rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blob::BlobStore;
use super::config::{Blob, RunConfig};
use super::digest::Digest;
use super::{reference, ImageError, Result};
use crate::util::fs::{read_bounded, write_atomic};
use crate::util::lock::FileLock;

/// 2: layer disks (1 had one flattened rootfs.ext4; such an image is
/// pulled or imported again).
pub const RECORD_VERSION: u32 = 2;
const RECORD_FILE: &str = "image.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub version: u32,
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// Normalised references that point at this image.
    pub refs: Vec<String>,
    /// Where it came from: registry, oci-layout, oci-archive, docker-archive.
    pub source: String,
    pub config_digest: Digest,
    pub layers: Vec<Blob>,
    /// The layer disks the image stacks, lowest first (keys in `layers/`).
    #[serde(default)]
    pub layer_disks: Vec<Digest>,
    pub run: RunConfig,
    /// Bytes of file content in the unpacked tree.
    pub content_bytes: u64,
    /// Bytes of the image's layer disks.
    pub disk_bytes: u64,
    pub created: String,
}

impl ImageRecord {
    pub fn id(&self) -> &str {
        self.digest.short()
    }
}

pub struct ImageStore {
    pub root: PathBuf,
    pub blobs: BlobStore,
}

impl ImageStore {
    pub fn new(state_root: &Path) -> ImageStore {
        let root = state_root.join("images");
        ImageStore {
            blobs: BlobStore::new(&root),
            root,
        }
    }

    /// Serialises builds, tagging and removal across processes.
    pub fn lock(&self) -> Result<FileLock> {
        std::fs::create_dir_all(&self.root).map_err(ImageError::io(&self.root))?;
        FileLock::acquire(&self.root.join(".lock")).map_err(|e| ImageError::Invalid(e.to_string()))
    }

    pub fn image_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.hex())
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// The read-only layer disk with this key (a diff_id, or a merged
    /// base's key).
    pub fn layer_disk(&self, key: &Digest) -> PathBuf {
        self.layers_dir().join(format!("{}.erofs", key.hex()))
    }

    /// Moves a finished layer disk into place, read-only.
    pub fn install_layer_disk(&self, built: &Path, key: &Digest) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.layers_dir();
        std::fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
        std::fs::set_permissions(built, std::fs::Permissions::from_mode(0o444))
            .map_err(ImageError::io(built))?;
        let dest = self.layer_disk(key);
        std::fs::rename(built, &dest).map_err(ImageError::io(&dest))
    }

    /// A record of the current version whose layer disks are all present.
    pub fn complete(&self, rec: &ImageRecord) -> bool {
        rec.version == RECORD_VERSION
            && !rec.layer_disks.is_empty()
            && rec.layer_disks.iter().all(|k| self.layer_disk(k).is_file())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn read(&self, digest: &Digest) -> Result<ImageRecord> {
        let path = self.image_dir(digest).join(RECORD_FILE);
        let bytes = read_bounded(&path).map_err(ImageError::io(&path))?;
        let rec: ImageRecord =
            serde_json::from_slice(&bytes).map_err(ImageError::json(path.display().to_string()))?;
        if rec.digest != *digest {
            return Err(ImageError::Invalid(format!(
                "{} describes {}, not {digest}",
                path.display(),
                rec.digest
            )));
        }
        Ok(rec)
    }

    pub fn write(&self, rec: &ImageRecord) -> Result<()> {
        let path = self.image_dir(&rec.digest).join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(rec).map_err(ImageError::json("image record"))?;
        write_atomic(&path, &bytes).map_err(ImageError::io(&path))
    }

    /// Every complete image (a current record and all its layer disks).
    pub fn records(&self) -> Result<Vec<ImageRecord>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(ImageError::io(&self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(digest) = Digest::from_hex(name) else {
                continue;
            };
            if let Ok(rec) = self.read(&digest) {
                if self.complete(&rec) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created));
        Ok(out)
    }

    /// Finds an image by reference (normalised), full digest, or an ID
    /// prefix of at least 12 hex digits.
    pub fn find(&self, query: &str) -> Result<Option<ImageRecord>> {
        let records = self.records()?;
        if let Ok(d) = Digest::parse(query) {
            return Ok(records.into_iter().find(|r| r.digest == d));
        }
        if query.len() >= 12 && query.len() <= 64 && query.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = records
                .iter()
                .filter(|r| r.digest.hex().starts_with(query))
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
        }
        let wanted = reference::normalise(query)?;
        Ok(records.into_iter().find(|r| {
            r.refs.contains(&wanted)
                || r.refs.iter().any(|x| {
                    // `repo@digest` finds the image whatever tag it came under.
                    wanted.split_once('@').is_some_and(|(repo, d)| {
                        d == r.digest.to_string() && x.starts_with(&format!("{repo}:"))
                    })
                })
                || wanted
                    .split_once('@')
                    .is_some_and(|(_, d)| d == r.digest.to_string())
        }))
    }

    /// Points `refs` at `digest`, taking them away from any other image.
    /// Call with the store lock held.
    pub fn tag(&self, digest: &Digest, refs: &[String]) -> Result<ImageRecord> {
        for mut other in self.records()? {
            if other.digest != *digest && other.refs.iter().any(|r| refs.contains(r)) {
                other.refs.retain(|r| !refs.contains(r));
                self.write(&other)?;
            }
        }
        let mut rec = self.read(digest)?;
        for r in refs {
            if !rec.refs.contains(r) {
                rec.refs.push(r.clone());
            }
        }
        self.write(&rec)?;
        Ok(rec)
    }

    /// Removes an image, and the blobs and layer disks no other image
    /// uses and `keep` does not name (those of workspaces and snapshots:
    /// the caller has refused to remove an image they use). Call with the
    /// lock held.
    pub fn remove(&self, rec: &ImageRecord, keep: &dyn Fn(&Digest) -> bool) -> Result<()> {
        let dir = self.image_dir(&rec.digest);
        std::fs::remove_dir_all(&dir).map_err(ImageError::io(&dir))?;
        let others = self.records()?;
        let in_use = |d: &Digest| {
            others
                .iter()
                .any(|o| o.config_digest == *d || o.layers.iter().any(|l| l.digest == *d))
        };
        let mine = std::iter::once(&rec.config_digest).chain(rec.layers.iter().map(|l| &l.digest));
        for d in mine {
            if !in_use(d) {
                let _ = std::fs::remove_file(self.blobs.path(d));
            }
        }
        for k in &rec.layer_disks {
            if !keep(k) && !others.iter().any(|o| o.layer_disks.contains(k)) {
                let _ = std::fs::remove_file(self.layer_disk(k));
            }
        }
        Ok(())
    }
}
