//! `snapshot push`: a snapshot to any OCI registry as one artifact (see
//! `crate::image::artifact`), sending only the blobs the registry lacks.
//! The image's layers go as the image's own blobs; memory, the disk
//! chain's files, the kernel and the boot disk go as content-addressed
//! zstd chunks, so a later snapshot of the same workspace sends little
//! more than the windows that changed. Pulling is in `share_pull`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use super::create::RegistryOptions;
use super::snapshot::{check_snapshot, snapshot_dir};
use super::snapshot_files::disk_entry;
use super::{invalid, Engine, IoContext, Reporter, Result};
use crate::disk::CHAIN_FILE;
use crate::image::artifact::{
    self, ArtifactConfig, SharedImage, SharedRun, CHUNK_SIZE, CHUNK_TYPE, CONFIG_TYPE,
    MANIFEST_TYPE, VERSION, VMSTATE_TYPE,
};
use crate::image::config::{Blob, OCI_MANIFEST};
use crate::image::digest::Digest;
use crate::image::progress::Progress;
use crate::image::registry::Session;
use crate::image::store::ImageStore;
use crate::image::{reference, ImageError};
use crate::snapshot::chunks::{self, Chunk, ChunkedFile};
use crate::snapshot::manifest::{MANIFEST, VMSTATE};

/// What a push did.
#[derive(Debug, Clone)]
pub struct SnapshotPushed {
    pub workspace: String,
    pub tag: String,
    pub reference: String,
    /// The artifact manifest's digest: `REPO@DIGEST` pulls exactly this.
    pub digest: String,
    pub blobs: usize,
    pub blobs_pushed: usize,
    /// Bytes of every blob the artifact lists (compressed chunks).
    pub bytes_total: u64,
    /// Bytes this push uploaded (what the registry lacked).
    pub bytes_pushed: u64,
    pub chunks: usize,
    pub duration_ms: u64,
}

/// Uploads what the registry lacks, once per push, counting.
struct Uploader<'a> {
    session: &'a Session,
    progress: &'a Progress,
    seen: HashSet<Digest>,
    done: SnapshotPushed,
}

impl Uploader<'_> {
    fn bytes(&mut self, data: &[u8], media_type: &str, what: &str) -> Result<Blob> {
        let blob = Blob {
            digest: Digest::of_bytes(data),
            size: data.len() as u64,
            media_type: media_type.to_string(),
        };
        self.send(&blob, what, false, |s| {
            s.push_bytes(bytes::Bytes::copy_from_slice(data), &blob.digest)
        })?;
        Ok(blob)
    }

    fn file(&mut self, path: &Path, blob: &Blob, what: &str) -> Result<()> {
        let progress = self.progress;
        self.send(blob, what, true, |s| {
            s.push_file(path, blob, progress, what)
        })
    }

    fn chunk(&mut self, c: &Chunk) -> Result<()> {
        let blob = Blob {
            digest: Digest::from_hex(c.sha256.clone())?,
            size: c.data.len() as u64,
            media_type: CHUNK_TYPE.into(),
        };
        self.done.chunks += 1;
        self.send(&blob, "chunk", false, |s| {
            s.push_bytes(bytes::Bytes::copy_from_slice(&c.data), &blob.digest)
        })
    }

    fn send(
        &mut self,
        blob: &Blob,
        what: &str,
        reports_itself: bool,
        push: impl FnOnce(&Session) -> crate::image::Result<()>,
    ) -> Result<()> {
        if !self.seen.insert(blob.digest.clone()) {
            return Ok(());
        }
        self.done.blobs += 1;
        self.done.bytes_total += blob.size;
        if self.session.has_blob(&blob.digest)? {
            self.progress
                .blob(what, &blob.digest.to_string(), blob.size)
                .done(true);
            return Ok(());
        }
        push(self.session)?;
        if !reports_itself {
            self.progress
                .blob(what, &blob.digest.to_string(), blob.size)
                .done(false);
        }
        self.done.blobs_pushed += 1;
        self.done.bytes_pushed += blob.size;
        Ok(())
    }

    /// Cuts `path` into chunks, uploading each the registry lacks.
    fn chunked(&mut self, path: &Path, name: &str) -> Result<ChunkedFile> {
        let mut failed = None;
        let file = chunks::cut(path, name, CHUNK_SIZE, &mut |c| {
            self.chunk(c).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                std::io::Error::other(msg)
            })
        });
        match (file, failed) {
            (_, Some(e)) => Err(e),
            (file, None) => file.io_ctx(|| format!("reading {}", path.display())),
        }
    }
}

impl Engine {
    /// Pushes snapshot `tag` of workspace `name` to `dest` (a registry
    /// reference), uploading only the blobs the registry does not have.
    pub fn snapshot_push(
        &self,
        name: &str,
        tag: &str,
        dest: &str,
        registry: &RegistryOptions,
        report: &dyn Reporter,
    ) -> Result<SnapshotPushed> {
        let start = Instant::now();
        let ws = self.state.existing(name)?;
        let dir = snapshot_dir(&ws, tag)?;
        let rec = ws.read()?;
        // What cannot resume here is not sent anywhere either.
        let m = check_snapshot(&self.state, &dir, &rec)?;
        if m.file(&disk_entry(CHAIN_FILE)).is_none() {
            return Err(invalid(format!(
                "snapshot {tag} of workspace {name} has a flat root disk (made before disk chains): take a new snapshot to push"
            )));
        }
        if !m.volumes.is_empty() {
            let names: Vec<&str> = m.volumes.iter().map(|v| v.volume.as_str()).collect();
            return Err(invalid(format!(
                "snapshot {tag} of workspace {name} holds volumes ({}): snapshots with volume data stay on this host (push a workspace without volumes, or commit an image)",
                names.join(", ")
            )));
        }
        let dest = reference::parse(&reference::normalise(dest)?)?;
        report.step(&format!(
            "pushing snapshot {name}:{} to {}",
            m.tag,
            dest.whole()
        ));
        let session = Session::open(&dest, &registry.pull_options(), true)?;
        let mut up = Uploader {
            session: &session,
            progress: report.image_progress(),
            seen: HashSet::new(),
            done: SnapshotPushed {
                workspace: name.to_string(),
                tag: m.tag.clone(),
                reference: dest.whole(),
                digest: String::new(),
                blobs: 0,
                blobs_pushed: 0,
                bytes_total: 0,
                bytes_pushed: 0,
                chunks: 0,
                duration_ms: 0,
            },
        };
        let read = |p: &Path| std::fs::read(p).io_ctx(|| format!("reading {}", p.display()));
        let manifest = up.bytes(&read(&dir.join(MANIFEST))?, MANIFEST_TYPE, "manifest")?;
        let vmstate = up.bytes(&read(&dir.join(VMSTATE))?, VMSTATE_TYPE, "vmstate")?;
        let image = match &rec.image_digest {
            Some(d) => Some(self.push_image(&mut up, &Digest::parse(d)?)?),
            None => None,
        };
        let mut files = Vec::new();
        for f in m.files.iter().filter(|f| f.name != VMSTATE) {
            files.push(up.chunked(&dir.join(&f.name), &f.name)?);
        }
        let kernel = up.chunked(Path::new(&rec.kernel), "vmlinux")?;
        let boot_disk = match (&m.boot_disk, &rec.layout) {
            (Some(b), Some(layout)) => Some(up.chunked(&layout.boot_disk, &b.key)?),
            _ => None,
        };
        let config = ArtifactConfig {
            version: VERSION,
            chunk_size: CHUNK_SIZE,
            run: SharedRun {
                image: rec.image.clone(),
                image_config: rec.image_config.clone(),
                cmdline: rec.cmdline.clone(),
                init: rec.init.clone(),
                cpu_template: rec.cpu_template.clone(),
                network: rec.network.name().to_string(),
            },
            manifest,
            vmstate,
            image,
            kernel,
            boot_disk,
            files,
        };
        let config_json =
            serde_json::to_vec(&config).map_err(|e| ImageError::Invalid(e.to_string()))?;
        let config_blob = up.bytes(&config_json, CONFIG_TYPE, "snapshot-config")?;
        let body = artifact::manifest_json(&config_blob, &config.blobs()?, &m.tag, &m.created);
        let digest = session.push_manifest(body, OCI_MANIFEST)?;
        let mut done = up.done;
        done.digest = digest.to_string();
        done.duration_ms = start.elapsed().as_millis() as u64;
        Ok(done)
    }

    /// The image's config and layer blobs, from the local store.
    fn push_image(&self, up: &mut Uploader, digest: &Digest) -> Result<SharedImage> {
        let store = ImageStore::new(&self.state.root);
        let irec = store.read(digest).map_err(|_| {
            invalid(format!(
                "image {digest} of this snapshot is no longer in the local store: pull it again to push the snapshot"
            ))
        })?;
        let config_path = store.image_dir(&irec.digest).join("config.json");
        let config = Blob {
            digest: irec.config_digest.clone(),
            size: std::fs::metadata(&config_path)
                .io_ctx(|| format!("{}", config_path.display()))?
                .len(),
            media_type: crate::image::commit::OCI_CONFIG.into(),
        };
        up.file(&config_path, &config, "config")?;
        for layer in &irec.layers {
            up.file(&store.blobs.path(&layer.digest), layer, "layer")?;
        }
        Ok(SharedImage {
            config,
            layers: irec.layers,
        })
    }
}
