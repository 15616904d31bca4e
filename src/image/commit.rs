//! A new image made of an existing one plus one layer (a workspace's
//! upper, written by `upper::write_layer`): the layer is compressed into
//! the blob store, the config extended by its diff_id and a history entry,
//! a fresh OCI manifest written, and the image built as a pulled one is
//! (its older layers' disks are shared, not rebuilt).

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::build::{self, BuildInput};
use super::config::{Blob, Manifest, OCI_MANIFEST};
use super::digest::{Digest, HashingWriter};
use super::progress::Progress;
use super::store::{ImageRecord, ImageStore};
use super::unpack::decompressor;
use super::{ImageError, Result, MAX_JSON_BYTES};

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// The image a commit starts from and what to call the result.
pub struct CommitInput<'a> {
    /// None: a one-layer image of its own (a home snapshot).
    pub base: Option<&'a ImageRecord>,
    /// A normalised reference for the new image (None: no tag, found by
    /// digest only).
    pub reference: Option<String>,
    /// The history entry's `created_by`.
    pub created_by: String,
}

/// The new layer's blob as it went into the store.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub blob: Blob,
    pub diff_id: Digest,
    pub uncompressed_bytes: u64,
}

/// A layer's media type in an OCI manifest (Docker's types name the same
/// bytes).
fn oci_media_type(media_type: &str) -> &str {
    match media_type {
        DOCKER_LAYER_GZIP => OCI_LAYER_GZIP,
        DOCKER_LAYER_TAR => OCI_LAYER_TAR,
        other => other,
    }
}

/// The OCI manifest of `config` and `layers`, as pushed and as committed
/// (one function, so a committed image pushes with its own digest).
pub fn manifest_json(config: &Blob, layers: &[Blob]) -> Vec<u8> {
    let blob = |b: &Blob, media_type: &str| json!({ "mediaType": media_type, "digest": b.digest.to_string(), "size": b.size });
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": blob(config, OCI_CONFIG),
        "layers": layers
            .iter()
            .map(|l| blob(l, oci_media_type(&l.media_type)))
            .collect::<Vec<_>>(),
    });
    serde_json::to_vec(&doc).expect("a manifest serialises")
}

/// Gzips the uncompressed layer `tar` into the blob store.
fn compress_into_store(store: &ImageStore, tar: &Path) -> Result<(Blob, u64)> {
    let tmp = store.tmp_dir().join(format!(
        "layer-{}-{}.tar.gz",
        std::process::id(),
        super::blob::unique()
    ));
    let result = (|| {
        let src = std::fs::File::open(tar).map_err(ImageError::io(tar))?;
        let uncompressed = src.metadata().map_err(ImageError::io(tar))?.len();
        let out = std::fs::File::create(&tmp).map_err(ImageError::io(&tmp))?;
        let hashing = HashingWriter::new(BufWriter::new(out), u64::MAX);
        // Fast compression: a commit is interactive, and the layer is
        // compressed once however often it is pushed.
        let mut gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::fast());
        std::io::copy(&mut BufReader::new(src).take(uncompressed), &mut gz)
            .map_err(ImageError::io(&tmp))?;
        let hashing = gz.finish().map_err(ImageError::io(&tmp))?;
        let (out, digest, size) = hashing.finish();
        let out = out
            .into_inner()
            .map_err(|e| ImageError::io(&tmp)(e.into_error()))?;
        out.sync_all().map_err(ImageError::io(&tmp))?;
        store.blobs.adopt(&tmp, &digest)?;
        Ok((
            Blob {
                digest,
                size,
                media_type: OCI_LAYER_GZIP.to_string(),
            },
            uncompressed,
        ))
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// The base image's config with one more layer: its diff_id, a history
/// entry, and a new creation time. Everything else (Env, Entrypoint,
/// Cmd, WorkingDir, User, labels) is kept as it was.
pub fn extend_config(base: &[u8], diff_id: &Digest, created_by: &str) -> Result<Vec<u8>> {
    extend_config_at(base, diff_id, created_by, &crate::util::time::now_rfc3339())
}

/// [`extend_config`] as of `now`: the same inputs give the same bytes.
fn extend_config_at(base: &[u8], diff_id: &Digest, created_by: &str, now: &str) -> Result<Vec<u8>> {
    let bad = |why: &str| ImageError::Invalid(format!("the base image's config {why}"));
    let mut cfg: Value = serde_json::from_slice(base).map_err(|e| bad(&e.to_string()))?;
    let obj = cfg.as_object_mut().ok_or_else(|| bad("is not an object"))?;
    obj.insert("created".into(), json!(now));
    let diff_ids = obj
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("has no rootfs.diff_ids"))?;
    diff_ids.push(json!(diff_id.to_string()));
    let history = obj.entry("history").or_insert_with(|| json!([]));
    if let Some(h) = history.as_array_mut() {
        h.push(json!({ "created": now, "created_by": created_by, "comment": "microagent commit" }));
    }
    let bytes = serde_json::to_vec(&cfg).map_err(ImageError::json("image config"))?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(bad("would be too large"));
    }
    Ok(bytes)
}

/// Turns the uncompressed layer at `tar` (diff_id `diff_id`) into a new
/// image over `input.base`, tagged `input.reference`.
pub fn finish(
    store: &ImageStore,
    tar: &Path,
    diff_id: &Digest,
    input: CommitInput,
    progress: &Progress,
) -> Result<(ImageRecord, LayerBlob)> {
    let _lock = store.lock()?;
    progress.step("compressing the new layer");
    let (layer, uncompressed_bytes) = compress_into_store(store, tar)?;
    let base_config = match input.base {
        Some(base) => config_of(store, base)?,
        None => EMPTY_CONFIG.as_bytes().to_vec(),
    };
    let config_bytes = extend_config(&base_config, diff_id, &input.created_by)?;
    let config = Blob {
        digest: Digest::of_bytes(&config_bytes),
        size: config_bytes.len() as u64,
        media_type: OCI_CONFIG.to_string(),
    };
    let mut layers = input.base.map(|b| b.layers.clone()).unwrap_or_default();
    layers.push(layer.clone());
    let record = build_record(
        store,
        config,
        layers,
        &config_bytes,
        input.reference.into_iter().collect(),
        "commit",
        progress,
    )?;
    Ok((
        record,
        LayerBlob {
            blob: layer,
            diff_id: diff_id.clone(),
            uncompressed_bytes,
        },
    ))
}

/// The config of an image with no layers yet: what a one-layer image
/// (a home snapshot) extends. No Entrypoint, Cmd or User of its own.
const EMPTY_CONFIG: &str =
    r#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;

fn config_of(store: &ImageStore, image: &ImageRecord) -> Result<Vec<u8>> {
    let path = store.image_dir(&image.digest).join("config.json");
    std::fs::read(&path).map_err(ImageError::io(&path))
}

/// Stores `config_bytes` and builds the image of it and `layers` (its
/// manifest is not stored: push makes the same bytes again).
fn build_record(
    store: &ImageStore,
    config: Blob,
    layers: Vec<Blob>,
    config_bytes: &[u8],
    refs: Vec<String>,
    source: &str,
    progress: &Progress,
) -> Result<ImageRecord> {
    store
        .blobs
        .put(&mut &config_bytes[..], &config.digest, config.size)?;
    let manifest_digest = Digest::of_bytes(&manifest_json(&config, &layers));
    build::build(
        store,
        BuildInput {
            manifest_digest,
            manifest: &Manifest { config, layers },
            config_bytes,
            refs,
            source,
        },
        progress,
    )
}

/// `base` with the layers of each of `tops` over it, in order (a later
/// one's file wins): how a workspace gets its home and personal
/// snapshots. The result keeps `base`'s Entrypoint, Cmd, User and Env;
/// its layer disks are the ones already built for each part.
pub fn stack(
    store: &ImageStore,
    base: &ImageRecord,
    tops: &[(&ImageRecord, String)],
    progress: &Progress,
) -> Result<ImageRecord> {
    let _lock = store.lock()?;
    let mut config_bytes = config_of(store, base)?;
    let mut layers = base.layers.clone();
    for (top, created_by) in tops {
        let cfg = super::config::parse_config(&config_of(store, top)?)?;
        for (blob, diff_id) in top.layers.iter().zip(&cfg.diff_ids) {
            // Stamped with the top's own time: the same parts always
            // stack into the same image.
            config_bytes = extend_config_at(&config_bytes, diff_id, created_by, &top.created)?;
            layers.push(blob.clone());
        }
    }
    let config = Blob {
        digest: Digest::of_bytes(&config_bytes),
        size: config_bytes.len() as u64,
        media_type: OCI_CONFIG.to_string(),
    };
    build_record(
        store,
        config,
        layers,
        &config_bytes,
        vec![],
        "stack",
        progress,
    )
}

/// A place in the store's tmp directory for a commit's uncompressed layer.
/// Those of commits whose process is gone (killed) are removed first.
pub fn scratch_tar(store: &ImageStore) -> Result<PathBuf> {
    let dir = store.tmp_dir();
    std::fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
    for entry in std::fs::read_dir(&dir)
        .map_err(ImageError::io(&dir))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("commit-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid {
            let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH);
            if gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(dir.join(format!(
        "commit-{}-{}.tar",
        std::process::id(),
        super::blob::unique()
    )))
}

fn normalise(raw: &[u8]) -> &[u8] {
    let mut p = raw;
    while let Some(rest) = p.strip_prefix(b"./").or_else(|| p.strip_prefix(b"/")) {
        p = rest;
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    p
}

fn remove_tree(set: &mut BTreeSet<Vec<u8>>, path: &[u8]) {
    set.remove(path);
    let mut prefix = path.to_vec();
    prefix.push(b'/');
    let below: Vec<Vec<u8>> = set
        .range(prefix.clone()..)
        .take_while(|p| p.starts_with(&prefix))
        .cloned()
        .collect();
    for p in below {
        set.remove(&p);
    }
}

/// Every path the image's merged layers hold (relative, no leading `/`),
/// whiteouts applied: what `diff` compares a workspace's upper with.
pub fn lower_paths(store: &ImageStore, rec: &ImageRecord) -> Result<BTreeSet<Vec<u8>>> {
    let mut set = BTreeSet::new();
    for layer in &rec.layers {
        let path = store.blobs.path(&layer.digest);
        let file = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
        let mut archive = tar::Archive::new(decompressor(BufReader::new(file))?);
        let (mut added, mut opaque, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        let bad = |e: std::io::Error| ImageError::io(&path)(e);
        for entry in archive.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let raw = entry.path_bytes();
            let p = normalise(&raw);
            let (parent, name) = match p.iter().rposition(|&b| b == b'/') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (&p[..0], p),
            };
            if name == b".wh..wh..opq" {
                opaque.push(parent.to_vec());
            } else if let Some(hidden) = name.strip_prefix(b".wh.") {
                let mut w = parent.to_vec();
                if !w.is_empty() {
                    w.push(b'/');
                }
                w.extend_from_slice(hidden);
                gone.push(w);
            } else if !p.is_empty() {
                added.push(p.to_vec());
            }
        }
        for d in opaque {
            let keep = set.contains(&d);
            remove_tree(&mut set, &d);
            if keep {
                set.insert(d);
            }
        }
        for w in gone {
            remove_tree(&mut set, &w);
        }
        set.extend(added);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_gains_one_layer_and_keeps_the_rest() {
        let base = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"WorkingDir":"/w"},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created_by":"base"}]}"#;
        let d = Digest::of_bytes(b"x");
        let out: Value =
            serde_json::from_slice(&extend_config(base, &d, "microagent commit ws").unwrap())
                .unwrap();
        assert_eq!(out["config"]["Env"][0], "A=1");
        assert_eq!(out["config"]["WorkingDir"], "/w");
        assert_eq!(out["rootfs"]["diff_ids"][1], d.to_string());
        assert_eq!(out["history"][1]["created_by"], "microagent commit ws");
        assert!(extend_config(b"[]", &d, "x").is_err());
    }

    #[test]
    fn docker_layer_types_become_oci_ones() {
        let b = |t: &str| Blob {
            digest: Digest::of_bytes(t.as_bytes()),
            size: 1,
            media_type: t.into(),
        };
        let m: Value = serde_json::from_slice(&manifest_json(
            &b(OCI_CONFIG),
            &[b(DOCKER_LAYER_GZIP), b(OCI_LAYER_GZIP)],
        ))
        .unwrap();
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER_GZIP);
        assert_eq!(m["layers"][1]["mediaType"], OCI_LAYER_GZIP);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_paths() {
        let mut set: BTreeSet<Vec<u8>> = ["a", "a/b", "a/b/c", "ab", "d", "d/e"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        remove_tree(&mut set, b"a");
        let left: Vec<_> = set
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert_eq!(left, ["ab", "d", "d/e"]);
        assert_eq!(normalise(b"./x/y/"), b"x/y");
    }
}
