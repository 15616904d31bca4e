//! Turns verified blobs into an image: one shared read-only layer disk per
//! layer (`layer_disk`), built once per diff_id, and the image's record.
//! Builds happen under `tmp/`; a layer disk and the record each become
//! visible by one rename, so a failure leaves no image.

use std::path::PathBuf;

use super::config::{self, Manifest};
use super::digest::Digest;
use super::layer_disk::{build_layer_disk, plan};
use super::progress::Progress;
use super::store::{ImageRecord, ImageStore, RECORD_VERSION};
use super::{ImageError, Result};

/// Upper bound on an image's unpacked file content (a decompression bomb
/// must not fill the host's disk).
pub const MAX_UNPACKED_BYTES: u64 = 64 << 30;

pub struct BuildInput<'a> {
    pub manifest_digest: Digest,
    pub manifest: &'a Manifest,
    pub config_bytes: &'a [u8],
    pub refs: Vec<String>,
    pub source: &'a str,
}

/// Removes a scratch directory however the build ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds (or finds already built) the image's layer disks and record.
/// Call with the store lock held.
pub fn build(store: &ImageStore, input: BuildInput, progress: &Progress) -> Result<ImageRecord> {
    let final_dir = store.image_dir(&input.manifest_digest);
    if let Ok(rec) = store.read(&input.manifest_digest) {
        if store.complete(&rec) {
            return store.tag(&rec.digest, &input.refs);
        }
    }
    let cfg = config::parse_config(input.config_bytes)?;
    config::check_pair(input.manifest, &cfg)?;
    if input.manifest.layers.is_empty() {
        return Err(ImageError::Invalid(format!(
            "image {} has no layers: nothing to boot",
            input.manifest_digest
        )));
    }

    let tmp = store.tmp_dir().join(format!(
        "build-{}-{}-{}",
        input.manifest_digest.short(),
        std::process::id(),
        super::blob::unique()
    ));
    std::fs::create_dir_all(&tmp).map_err(ImageError::io(&tmp))?;
    let scratch = Scratch(tmp.clone());

    let groups = plan(&cfg.diff_ids);
    let n = groups.len();
    let mut content_bytes = 0;
    let mut disk_bytes = 0;
    let mut budget = MAX_UNPACKED_BYTES;
    for (i, g) in groups.iter().enumerate() {
        let disk = store.layer_disk(&g.key);
        if let Ok(m) = std::fs::metadata(&disk) {
            progress.step(&format!(
                "layer disk {}/{n} {} (shared)",
                i + 1,
                g.key.short()
            ));
            disk_bytes += m.len();
            continue;
        }
        let what = if g.first == g.last {
            format!("layer {}", input.manifest.layers[g.first].digest.short())
        } else {
            format!("layers 1-{} merged", g.last + 1)
        };
        progress.step(&format!("building layer disk {}/{n}: {what}", i + 1));
        let paths: Vec<_> = (g.first..=g.last)
            .map(|l| store.blobs.path(&input.manifest.layers[l].digest))
            .collect();
        let layers: Vec<_> = (g.first..=g.last)
            .map(|l| (paths[l - g.first].as_path(), &cfg.diff_ids[l]))
            .collect();
        let part = tmp.join(format!("layer-{i}.erofs"));
        let (size, content) =
            build_layer_disk(&layers, &tmp.join(format!("tree-{i}")), &part, budget).map_err(
                |e| match e {
                    ImageError::DiffIdMismatch {
                        digest,
                        expected,
                        actual,
                        ..
                    } => ImageError::DiffIdMismatch {
                        index: g.first,
                        digest,
                        expected,
                        actual,
                    },
                    e => e,
                },
            )?;
        budget = budget.saturating_sub(content);
        content_bytes += content;
        disk_bytes += size;
        store.install_layer_disk(&part, &g.key)?;
    }

    let out = tmp.join("out");
    std::fs::create_dir(&out).map_err(ImageError::io(&out))?;
    let config_path = out.join("config.json");
    std::fs::write(&config_path, input.config_bytes).map_err(ImageError::io(&config_path))?;
    let rec = ImageRecord {
        version: RECORD_VERSION,
        digest: input.manifest_digest.clone(),
        refs: vec![],
        source: input.source.to_string(),
        config_digest: input.manifest.config.digest.clone(),
        layers: input.manifest.layers.clone(),
        layer_disks: groups.iter().map(|g| g.key.clone()).collect(),
        run: cfg.run,
        content_bytes,
        disk_bytes,
        created: crate::util::time::now_rfc3339(),
    };
    let bytes = serde_json::to_vec_pretty(&rec).map_err(ImageError::json("image record"))?;
    let record = out.join("image.json");
    crate::util::fs::write_atomic(&record, &bytes).map_err(ImageError::io(&record))?;
    // A leftover directory is an interrupted or older build.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(ImageError::io(&final_dir))?;
    }
    std::fs::rename(&out, &final_dir).map_err(ImageError::io(&final_dir))?;
    drop(scratch);
    store.tag(&rec.digest, &input.refs)
}
