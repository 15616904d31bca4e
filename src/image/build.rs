//! Turns verified blobs into the image's cached root disk: layers unpacked
//! in order into a scratch tree, then `mkfs.ext4 -d` (e2fsprogs) builds the
//! disk from it, sized to the content. The build happens under `tmp/` and
//! becomes visible by renaming its directory, so a failure leaves no image.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::config::{self, Manifest};
use super::digest::Digest;
use super::progress::Progress;
use super::store::{ImageRecord, ImageStore, DISK_FILE, RECORD_VERSION};
use super::unpack::Unpacker;
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

/// Builds (or finds already built) the image's disk and record. Call with
/// the store lock held.
pub fn build(store: &ImageStore, input: BuildInput, progress: &Progress) -> Result<ImageRecord> {
    let final_dir = store.image_dir(&input.manifest_digest);
    if store.disk(&input.manifest_digest).is_file() {
        if let Ok(rec) = store.read(&input.manifest_digest) {
            return store.tag(&rec.digest, &input.refs);
        }
    }
    let cfg = config::parse_config(input.config_bytes)?;
    config::check_pair(input.manifest, &cfg)?;

    let tmp = store.tmp_dir().join(format!(
        "build-{}-{}-{}",
        input.manifest_digest.short(),
        std::process::id(),
        super::blob::unique()
    ));
    // The tree holds the image's setuid files while it is built: the build
    // directory is the user's alone, so no one else can run them.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)
            .map_err(ImageError::io(&tmp))?;
    }
    let scratch = Scratch(tmp.clone());
    let tree = tmp.join("tree");
    std::fs::create_dir(&tree).map_err(ImageError::io(&tree))?;
    set_root_mode(&tree)?;

    let mut unpacker = Unpacker::new(&tree, MAX_UNPACKED_BYTES);
    let n = input.manifest.layers.len();
    for (i, layer) in input.manifest.layers.iter().enumerate() {
        progress.step(&format!(
            "unpacking layer {}/{n} {}",
            i + 1,
            layer.digest.short()
        ));
        let path = store.blobs.path(&layer.digest);
        let file = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
        unpacker
            .apply(file, &layer.digest.to_string(), Some(&cfg.diff_ids[i]))
            .map_err(|e| match e {
                ImageError::DiffIdMismatch {
                    digest,
                    expected,
                    actual,
                    ..
                } => ImageError::DiffIdMismatch {
                    index: i,
                    digest,
                    expected,
                    actual,
                },
                e => e,
            })?;
    }
    let (content_bytes, inodes) = measure(&tree)?;
    progress.step(&format!(
        "building ext4 root disk ({} MiB of files, {inodes} inodes)",
        content_bytes >> 20
    ));
    let out = tmp.join("out");
    std::fs::create_dir(&out).map_err(ImageError::io(&out))?;
    let disk = out.join(DISK_FILE);
    let disk_bytes = mkfs(&tree, &disk, content_bytes, inodes)?;
    std::fs::remove_dir_all(&tree).map_err(ImageError::io(&tree))?;

    let config_path = out.join("config.json");
    std::fs::write(&config_path, input.config_bytes).map_err(ImageError::io(&config_path))?;
    let rec = ImageRecord {
        version: RECORD_VERSION,
        digest: input.manifest_digest.clone(),
        refs: vec![],
        source: input.source.to_string(),
        config_digest: input.manifest.config.digest.clone(),
        layers: input.manifest.layers.clone(),
        run: cfg.run,
        content_bytes,
        disk_bytes,
        created: crate::util::time::now_rfc3339(),
    };
    let bytes = serde_json::to_vec_pretty(&rec).map_err(ImageError::json("image record"))?;
    let record = out.join("image.json");
    crate::util::fs::write_atomic(&record, &bytes).map_err(ImageError::io(&record))?;
    // A leftover directory without a disk is an interrupted older build.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(ImageError::io(&final_dir))?;
    }
    std::fs::rename(&out, &final_dir).map_err(ImageError::io(&final_dir))?;
    drop(scratch);
    store.tag(&rec.digest, &input.refs)
}

fn set_root_mode(tree: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io(tree))
}

/// Bytes the tree's files occupy in 4 KiB blocks (hard links once) and its
/// inode count.
pub(super) fn measure(tree: &Path) -> Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(ImageError::io(&dir))? {
            let entry = entry.map_err(ImageError::io(&dir))?;
            let m = entry.metadata().map_err(ImageError::io(entry.path()))?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes + 1))
}

/// Runs mkfs.ext4 -d with room for the content, its metadata and the
/// journal; returns the disk's size.
pub(super) fn mkfs(tree: &Path, disk: &Path, content: u64, inodes: u64) -> Result<u64> {
    let inode_count = inodes + inodes / 4 + 1024;
    // Content + 10% (directories, extents) + inode tables + 64 MiB for the
    // journal and group descriptors.
    let mut size = content + content / 10 + inode_count * 256 + (64 << 20);
    size = size.div_ceil(1 << 20) << 20;
    let mut last_err = String::new();
    for _ in 0..3 {
        let _ = std::fs::remove_file(disk);
        let out = Command::new("mkfs.ext4")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "rootfs",
            ])
            .arg("-N")
            .arg(inode_count.to_string())
            .arg("-d")
            .arg(tree)
            .arg(disk)
            .arg(format!("{}k", size >> 10))
            .output()
            .map_err(|e| ImageError::Mkfs {
                path: disk.to_path_buf(),
                reason: format!("cannot run mkfs.ext4 (apt-get install e2fsprogs): {e}"),
            })?;
        if out.status.success() {
            return Ok(size);
        }
        last_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // Our estimate can be short for trees of many tiny files: grow and retry.
        size += size / 2;
    }
    let _ = std::fs::remove_file(disk);
    Err(ImageError::Mkfs {
        path: disk.to_path_buf(),
        reason: last_err,
    })
}
