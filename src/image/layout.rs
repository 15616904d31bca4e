//! Reading images from disk: OCI image layouts (a directory, or the
//! `oci-archive` tarball of one) and `docker save` archives. Every blob is
//! copied into the store through digest and size verification; paths named
//! inside the layout are checked never to leave it or pass through symlinks.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::blob::BlobStore;
use super::config::{self, Blob, Manifest};
use super::digest::Digest;
use super::{ImageError, Result, MAX_JSON_BYTES};

/// An image found on disk, its blobs now in the store.
pub struct Found {
    pub manifest_digest: Digest,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    /// A name the archive gives the image, if any.
    pub name: Option<String>,
    pub source: &'static str,
}

/// Joins a relative path from an untrusted document onto `root`, refusing
/// `..`, absolute paths and symlinks anywhere along the way.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    let bad = |why: &str| ImageError::Invalid(format!("path {rel:?} in the archive {why}"));
    let mut out = root.to_path_buf();
    for comp in Path::new(rel).components() {
        match comp {
            Component::Normal(c) => {
                out.push(c);
                let m = std::fs::symlink_metadata(&out).map_err(|_| bad("does not exist"))?;
                if m.file_type().is_symlink() {
                    return Err(bad("passes through a symlink"));
                }
            }
            Component::CurDir => {}
            _ => return Err(bad("leaves the archive")),
        }
    }
    Ok(out)
}

fn read_small(path: &Path, what: &str) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(ImageError::io(path))?.len();
    if len > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            size: len,
            limit: MAX_JSON_BYTES,
        });
    }
    std::fs::read(path).map_err(ImageError::io(path))
}

fn layout_blob(root: &Path, blob: &Blob) -> Result<PathBuf> {
    safe_join(root, &format!("blobs/sha256/{}", blob.digest.hex()))
}

/// Reads a verified small blob (manifest or index) from a layout.
fn layout_json(root: &Path, blob: &Blob, what: &str) -> Result<Vec<u8>> {
    if blob.size > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: format!("{what} {}", blob.digest),
            size: blob.size,
            limit: MAX_JSON_BYTES,
        });
    }
    let bytes = read_small(&layout_blob(root, blob)?, what)?;
    let actual = Digest::of_bytes(&bytes);
    if actual != blob.digest {
        return Err(ImageError::DigestMismatch {
            digest: blob.digest.to_string(),
            actual: actual.hex().to_string(),
        });
    }
    if bytes.len() as u64 != blob.size {
        return Err(ImageError::SizeMismatch {
            digest: blob.digest.to_string(),
            expected: blob.size,
            actual: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

fn copy_blob(root: &Path, store: &BlobStore, blob: &Blob) -> Result<()> {
    if store.has(&blob.digest, blob.size) {
        return Ok(());
    }
    let path = layout_blob(root, blob)?;
    let mut f = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
    store.put(&mut f, &blob.digest, blob.size)?;
    Ok(())
}

pub fn is_oci_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file() && dir.join("index.json").is_file()
}

/// Reads an OCI image layout. `ref_name` picks among several images by their
/// `org.opencontainers.image.ref.name` annotation.
pub fn read_oci_layout(
    root: &Path,
    ref_name: Option<&str>,
    store: &BlobStore,
    source: &'static str,
) -> Result<Found> {
    let index_bytes = read_small(&safe_join(root, "index.json")?, "index.json")?;
    let entries = config::parse_index(&index_bytes)?;
    let entry = match ref_name {
        Some(name) => entries
            .iter()
            .find(|e| e.ref_name.as_deref() == Some(name))
            .ok_or_else(|| {
                ImageError::NotFound(format!("{name} (the layout names: {})", names(&entries)))
            })?,
        None if entries.len() == 1 => &entries[0],
        None => {
            let named: Vec<_> = entries.iter().filter(|e| e.ref_name.is_some()).collect();
            if entries.is_empty() {
                return Err(ImageError::Invalid("index.json lists no images".into()));
            }
            config::select_platform(&entries).map_err(|_| {
                ImageError::Invalid(format!(
                    "the layout holds {} images; pick one with --ref-name ({})",
                    entries.len(),
                    if named.is_empty() {
                        "none is named".into()
                    } else {
                        names(&entries)
                    }
                ))
            })?
        }
    };
    let name = entry.ref_name.clone();
    let mut top = entry.manifest.clone();
    let mut bytes = layout_json(root, &top, "manifest")?;
    // A nested index (multi-platform image): take linux/amd64.
    if config::is_index(&bytes) {
        let nested = config::parse_index(&bytes)?;
        top = config::select_platform(&nested)?.manifest.clone();
        bytes = layout_json(root, &top, "manifest")?;
    }
    let manifest = config::parse_manifest(&bytes)?;
    copy_blob(root, store, &manifest.config)?;
    let config_bytes = store.read_small(&manifest.config.digest, MAX_JSON_BYTES)?;
    for layer in &manifest.layers {
        copy_blob(root, store, layer)?;
    }
    Ok(Found {
        manifest_digest: top.digest,
        manifest,
        config_bytes,
        name,
        source,
    })
}

fn names(entries: &[config::IndexEntry]) -> String {
    let n: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.ref_name.as_deref())
        .collect();
    n.join(", ")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads an extracted `docker save` archive (its `manifest.json`), turning
/// it into an OCI-style manifest whose blobs are the archive's files.
pub fn read_docker_archive(root: &Path, store: &BlobStore) -> Result<Found> {
    let bytes = read_small(&safe_join(root, "manifest.json")?, "manifest.json")?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&bytes).map_err(ImageError::json("docker archive manifest.json"))?;
    let [entry] = entries.as_slice() else {
        return Err(ImageError::Invalid(format!(
            "docker archive holds {} images; microagent imports archives of one",
            entries.len()
        )));
    };
    if entry.layers.len() > config::MAX_LAYERS {
        return Err(ImageError::Invalid(format!(
            "{} layers (at most {})",
            entry.layers.len(),
            config::MAX_LAYERS
        )));
    }
    let config_path = safe_join(root, &entry.config)?;
    let config_bytes = read_small(&config_path, "image config")?;
    let config_blob = Blob {
        digest: Digest::of_bytes(&config_bytes),
        size: config_bytes.len() as u64,
        media_type: "application/vnd.docker.container.image.v1+json".into(),
    };
    store.put(
        &mut &config_bytes[..],
        &config_blob.digest,
        config_blob.size,
    )?;
    let mut layers = Vec::new();
    for rel in &entry.layers {
        let path = safe_join(root, rel)?;
        let digest =
            Digest::from_hex(crate::digest::sha256_file(&path).map_err(ImageError::io(&path))?)?;
        let size = std::fs::metadata(&path)
            .map_err(ImageError::io(&path))?
            .len();
        let mut f = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
        store.put(&mut f, &digest, size)?;
        let media_type = if is_gzip(&path) {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        layers.push(Blob {
            digest,
            size,
            media_type: media_type.into(),
        });
    }
    let manifest_json = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": config::DOCKER_MANIFEST,
        "config": { "mediaType": config_blob.media_type, "digest": config_blob.digest.to_string(), "size": config_blob.size },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size })).collect::<Vec<_>>(),
    });
    let manifest_bytes =
        serde_json::to_vec(&manifest_json).map_err(ImageError::json("synthesised manifest"))?;
    Ok(Found {
        manifest_digest: Digest::of_bytes(&manifest_bytes),
        manifest: Manifest {
            config: config_blob,
            layers,
        },
        config_bytes,
        name: entry.repo_tags.as_ref().and_then(|t| t.first().cloned()),
        source: "docker-archive",
    })
}

fn is_gzip(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == [0x1f, 0x8b]
}
