//! `snapshot pull` and `create --from-snapshot REGISTRY/REPO:TAG`: a
//! snapshot artifact (see `share`) becomes a halted workspace holding
//! that snapshot, on a host that may never have seen its image, kernel
//! or boot disk. Every blob is checked against its digest as it arrives
//! (a chunk already in the local chunk store is not fetched again); the
//! files put back together are checked against the snapshot's manifest;
//! and what would refuse to resume here (CPU, TSC rate, CPUID features)
//! is refused before anything is fetched beyond the manifest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::create::RegistryOptions;
use super::snapshot::check_snapshot;
use super::{claim_workspace_dir, invalid, Engine, Error, IoContext, Reporter, Result};
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::image::artifact::{self, ArtifactConfig, MAX_MANIFEST_BYTES, MAX_VMSTATE_BYTES};
use crate::image::blob::BlobStore;
use crate::image::build::{self, BuildInput};
use crate::image::config::{Manifest as ImageManifest, OCI_MANIFEST};
use crate::image::digest::Digest;
use crate::image::registry::Session;
use crate::image::store::ImageStore;
use crate::image::{reference, MAX_JSON_BYTES};
use crate::snapshot::chunks::{self, ChunkedFile};
use crate::snapshot::manifest::{validate_tag, HostCpu, Manifest, MANIFEST, VMSTATE};
use crate::util::lock::FileLock;
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::host;
use crate::workspace::layout::{DiskLayout, LayerDisk, BOOT_DISK_DIR};
use crate::workspace::state::Status;
use crate::workspace::store::{
    now_rfc3339, NetworkMode, WorkspaceDir, WorkspaceRecord, MAX_SNAPSHOTS_DEFAULT, RECORD_VERSION,
};

/// Where pulled chunks are kept, shared by every snapshot pulled here.
pub const CHUNK_STORE: &str = "cache/chunks";
/// Where pulled kernels are kept, by sha256.
pub const KERNEL_STORE: &str = "cache/kernels";

/// What a pull did.
#[derive(Debug, Clone)]
pub struct SnapshotPulled {
    pub workspace: String,
    pub tag: String,
    pub reference: String,
    pub digest: String,
    pub blobs: usize,
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    pub duration_ms: u64,
}

/// A pulled snapshot, in place.
pub(crate) struct Landed {
    pub ws: WorkspaceDir,
    pub rec: WorkspaceRecord,
    pub dir: PathBuf,
    pub pulled: SnapshotPulled,
}

/// A registry reference, as opposed to a local `WORKSPACE:TAG`.
pub fn is_registry_reference(s: &str) -> bool {
    s.contains('/')
}

/// `REPO/NAME:TAG` → `NAME`, the default workspace name of a pull.
fn default_name(reference: &oci_client::Reference) -> String {
    let repo = reference.repository();
    repo.rsplit('/').next().unwrap_or(repo).to_string()
}

impl Engine {
    /// Pulls the snapshot at `reference` into a new halted workspace
    /// (`into`: NAME or NAME:TAG; default: the repository's last name and
    /// the snapshot's own tag).
    pub fn snapshot_pull(
        &self,
        reference: &str,
        into: Option<&str>,
        registry: &RegistryOptions,
        report: &dyn Reporter,
    ) -> Result<SnapshotPulled> {
        let (name, tag) =
            match into.map(|i| i.split_once(':').map_or((i, None), |(n, t)| (n, Some(t)))) {
                Some((n, t)) => (Some(n), t),
                None => (None, None),
            };
        Ok(self
            .pull_snapshot_into(reference, name, tag, registry, report)?
            .pulled)
    }

    pub(crate) fn pull_snapshot_into(
        &self,
        reference: &str,
        name: Option<&str>,
        tag: Option<&str>,
        registry: &RegistryOptions,
        report: &dyn Reporter,
    ) -> Result<Landed> {
        let start = Instant::now();
        let reference = reference::parse(&reference::normalise(reference)?)?;
        let name = name.map_or_else(|| default_name(&reference), str::to_string);
        let ws = self.state.workspace(&name)?;
        if ws.record_path().is_file() {
            return Err(crate::workspace::store::StoreError::Exists(name).into());
        }
        if let Some(t) = tag {
            validate_tag(t).map_err(invalid)?;
        }
        report.step(&format!("pulling snapshot {}", reference.whole()));
        let session = Session::open(&reference, &registry.pull_options(), false)?;
        let (body, digest) = session.pull_manifest(&[OCI_MANIFEST])?;
        let (config_blob, layers) = artifact::parse_manifest(&body)?;
        let chunk_dir = self.state.root.join(CHUNK_STORE);
        // Chunks are guest memory: the user's alone, like the state
        // directory (made here with it when a pull is its first use).
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&chunk_dir)
                .io_ctx(|| format!("creating {}", chunk_dir.display()))?;
        }
        let chunk_store = BlobStore::new(&chunk_dir);
        let progress = report.image_progress();
        session.fetch(&chunk_store, &config_blob, "snapshot-config", progress)?;
        let config = ArtifactConfig::parse(
            &chunk_store.read_small(&config_blob.digest, artifact::MAX_CONFIG_BYTES)?,
        )?;
        let needed = artifact::check_listed(&config, &layers)?;
        session.fetch(&chunk_store, &config.manifest, "manifest", progress)?;
        let manifest_bytes = chunk_store.read_small(&config.manifest.digest, MAX_MANIFEST_BYTES)?;
        let m: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| Error::SnapshotDamaged {
                message: format!(
                    "{}: the snapshot manifest is not valid: {e}",
                    reference.whole()
                ),
            })?;
        validate_tag(&m.tag).map_err(invalid)?;
        check_runs_here(&m, &config)?;
        for f in &config.files {
            match m.file(&f.name) {
                Some(info) if info.size == f.size => {}
                Some(info) => {
                    return Err(damaged(
                        &reference,
                        format!(
                            "{} is {} bytes, its manifest says {}",
                            f.name, f.size, info.size
                        ),
                    ))
                }
                None => {
                    return Err(damaged(
                        &reference,
                        format!("it carries {}, which its manifest does not list", f.name),
                    ))
                }
            }
        }
        self.check_room(&reference, &config, &needed, &chunk_store)?;
        let tag = tag.unwrap_or(&m.tag).to_string();

        // A pull that was killed leaves a directory without a record; its
        // lock is free once its process is gone. Clear it, so pulling
        // again resumes (the chunks it fetched are kept in the store).
        if ws.dir.is_dir() && !ws.record_path().is_file() {
            if let Ok(Some(_stale)) = FileLock::try_acquire(&ws.lock_path()) {
                let _ = std::fs::remove_dir_all(&ws.dir);
            }
        }
        claim_workspace_dir(&self.state, &ws)?;
        let _lock = FileLock::acquire(&ws.lock_path())?;
        let result = (|| -> Result<Landed> {
            let image = match &config.image {
                Some(img) => Some(self.pulled_image(&session, img, report)?),
                None => None,
            };
            let mut fetched = (0, 0u64);
            for b in needed.iter().filter(|b| {
                b.media_type == artifact::CHUNK_TYPE || b.media_type == artifact::VMSTATE_TYPE
            }) {
                if !chunk_store.has(&b.digest, b.size) {
                    fetched.0 += 1;
                    fetched.1 += b.size;
                }
                session.fetch(&chunk_store, b, "chunk", progress)?;
            }
            report.step("assembling the snapshot's files");
            let kernel = self.pulled_kernel(&m, &config, &chunk_store)?;
            let boot_disk = self.pulled_boot_disk(&m, &config, &chunk_store)?;
            let tmp = ws.snapshots().join(format!(".pull-{tag}"));
            let dir = ws.snapshots().join(&tag);
            std::fs::create_dir_all(tmp.join(SNAPSHOT_DISK_DIR))
                .io_ctx(|| format!("creating {}", tmp.display()))?;
            std::fs::write(tmp.join(MANIFEST), &manifest_bytes)
                .io_ctx(|| format!("writing {}", tmp.display()))?;
            let vmstate = chunk_store.read_small(&config.vmstate.digest, MAX_VMSTATE_BYTES)?;
            std::fs::write(tmp.join(VMSTATE), vmstate)
                .io_ctx(|| format!("writing {}", tmp.display()))?;
            for f in &config.files {
                assemble(&tmp.join(&f.name), f, config.chunk_size, &chunk_store)?;
            }
            super::snapshot_verify::verify_files(&tmp, &m)
                .map_err(|why| damaged(&reference, why))?;
            let rec = WorkspaceRecord {
                version: RECORD_VERSION,
                name: name.clone(),
                image: config.run.image.clone(),
                image_digest: image.as_ref().map(|(d, _)| d.to_string()),
                image_config: config.run.image_config.clone(),
                rootfs_source: Some(reference.whole()),
                layout: boot_disk.map(|boot_disk| DiskLayout {
                    boot_disk,
                    layers: image.map(|(_, l)| l).unwrap_or_default(),
                }),
                vcpus: m.vcpus,
                memory_mib: m.memory_mib,
                kernel: kernel.display().to_string(),
                kernel_sha256: m.kernel_sha256.clone(),
                cmdline: config.run.cmdline.clone(),
                init: config.run.init.clone(),
                cpu_template: config.run.cpu_template.clone(),
                network: serde_json::from_value::<NetworkMode>(config.run.network.clone().into())
                    .map_err(|_| invalid(format!("network mode {:?}", config.run.network)))?,
                ports: vec![],
                boot_key: None,
                volumes: Vec::new(),
                created: now_rfc3339(),
                status: Status::Halted,
                vmm_pid: None,
                crash_reason: None,
                auto_snapshot_on_stop: true,
                max_snapshots: MAX_SNAPSHOTS_DEFAULT,
                memory_base: None,
            };
            ws.write(&rec)?;
            std::fs::rename(&tmp, &dir).io_ctx(|| format!("renaming {}", tmp.display()))?;
            check_snapshot(&self.state, &dir, &rec)?;
            crate::workspace::disk::restore_from(&dir, &ws)?;
            Ok(Landed {
                ws: ws.clone(),
                rec,
                dir,
                pulled: SnapshotPulled {
                    workspace: name.clone(),
                    tag: tag.clone(),
                    reference: reference.whole(),
                    digest: digest.to_string(),
                    blobs: needed.len(),
                    blobs_fetched: fetched.0,
                    bytes_fetched: fetched.1,
                    duration_ms: start.elapsed().as_millis() as u64,
                },
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&ws.dir);
        }
        result
    }

    /// Refuses a pull the state directory's filesystem has no room for
    /// (the chunks to fetch, and the data the files will hold), before
    /// anything is fetched: a hostile artifact could otherwise declare
    /// terabytes of zeros, and an honest one would fail half-way.
    fn check_room(
        &self,
        reference: &oci_client::Reference,
        config: &ArtifactConfig,
        needed: &[crate::image::config::Blob],
        chunk_store: &BlobStore,
    ) -> Result<()> {
        let data: u64 = config
            .chunked()
            .flat_map(|f| f.extents.iter().map(|e| e[1] - e[0]))
            .sum();
        let fetch: u64 = needed
            .iter()
            .filter(|b| !chunk_store.has(&b.digest, b.size))
            .map(|b| b.size)
            .sum();
        let mut at = self.state.root.as_path();
        while !at.exists() {
            at = at.parent().unwrap_or(Path::new("/"));
        }
        let fs = nix::sys::statvfs::statvfs(at)
            .map_err(std::io::Error::from)
            .io_ctx(|| format!("statvfs {}", at.display()))?;
        let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
        if data.saturating_add(fetch) > free {
            return Err(invalid(format!(
                "{} needs {} bytes ({fetch} to fetch, {data} of files), {} has {free} free",
                reference.whole(),
                data.saturating_add(fetch),
                at.display()
            )));
        }
        Ok(())
    }

    /// The snapshot's image in the local store, built from the artifact's
    /// config and layer blobs unless it is there: its digest and layer
    /// disks.
    fn pulled_image(
        &self,
        session: &Session,
        img: &artifact::SharedImage,
        report: &dyn Reporter,
    ) -> Result<(Digest, Vec<LayerDisk>)> {
        let store = ImageStore::new(&self.state.root);
        let progress = report.image_progress();
        let manifest_digest = Digest::of_bytes(&crate::image::commit::manifest_json(
            &img.config,
            &img.layers,
        ));
        let _lock = store.lock()?;
        session.fetch(&store.blobs, &img.config, "config", progress)?;
        for layer in &img.layers {
            session.fetch(&store.blobs, layer, "layer", progress)?;
        }
        let config_bytes = store.blobs.read_small(&img.config.digest, MAX_JSON_BYTES)?;
        let irec = build::build(
            &store,
            BuildInput {
                manifest_digest,
                manifest: &ImageManifest {
                    config: img.config.clone(),
                    layers: img.layers.clone(),
                },
                config_bytes: &config_bytes,
                refs: vec![],
                source: "snapshot",
            },
            progress,
        )?;
        let layers = LayerDisk::of_image(&store, &irec);
        Ok((irec.digest, layers))
    }

    /// The kernel the snapshot pins: kept by sha256 in the state dir.
    fn pulled_kernel(
        &self,
        m: &Manifest,
        config: &ArtifactConfig,
        store: &BlobStore,
    ) -> Result<PathBuf> {
        let pin = &m.kernel_sha256;
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("the snapshot pins kernel sha256 {pin:?}")));
        }
        let dir = self.state.root.join(KERNEL_STORE);
        let dest = dir.join(format!("{}.vmlinux", pin.to_ascii_lowercase()));
        place_pinned(
            &dest,
            &config.kernel,
            config.chunk_size,
            store,
            pin,
            "kernel",
        )?;
        Ok(dest)
    }

    /// The boot disk the snapshot pins, under the name it pins it by.
    fn pulled_boot_disk(
        &self,
        m: &Manifest,
        config: &ArtifactConfig,
        store: &BlobStore,
    ) -> Result<Option<PathBuf>> {
        let (Some(pin), Some(file)) = (&m.boot_disk, &config.boot_disk) else {
            return match (&m.boot_disk, &config.boot_disk) {
                (None, None) => Ok(None),
                _ => Err(invalid(
                    "the snapshot's boot disk and its manifest disagree",
                )),
            };
        };
        if pin.key != file.name {
            return Err(invalid(format!(
                "boot disk {} is pinned as {}",
                file.name, pin.key
            )));
        }
        let dest = self.state.root.join(BOOT_DISK_DIR).join(&file.name);
        place_pinned(
            &dest,
            file,
            config.chunk_size,
            store,
            &pin.sha256,
            "boot disk",
        )?;
        Ok(Some(dest))
    }
}

fn damaged(reference: &oci_client::Reference, why: String) -> Error {
    Error::SnapshotDamaged {
        message: format!("snapshot {} is damaged: {why}", reference.whole()),
    }
}

/// Refuses, before anything large is fetched, a snapshot this host cannot
/// resume: format, CPU template, host CPU, TSC rate, CPUID features. The
/// kernel comes with the snapshot, so it always matches its pin.
fn check_runs_here(m: &Manifest, config: &ArtifactConfig) -> Result<()> {
    if m.cpu_template != config.run.cpu_template {
        return Err(invalid(format!(
            "the snapshot's CPU template is {} but its workspace used {}",
            m.cpu_template, config.run.cpu_template
        )));
    }
    let host_cpuid = m
        .cpu_template
        .parse::<CpuTemplate>()
        .ok()
        .and_then(|t| host::guest_cpuid(t, m.vcpus));
    m.check_compatible(
        &m.kernel_sha256,
        &m.cpu_template,
        &HostCpu::current(),
        host::guest_tsc_khz(),
        host_cpuid.as_deref(),
    )?;
    Ok(())
}

/// Writes `file` at `dest` from chunks in `store`.
fn assemble(dest: &Path, file: &ChunkedFile, chunk_size: u64, store: &BlobStore) -> Result<()> {
    chunks::assemble(dest, file, chunk_size, &mut |c| {
        let digest = Digest::from_hex(c.sha256.to_ascii_lowercase())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        store
            .read_small(&digest, c.size)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .io_ctx(|| format!("assembling {}", dest.display()))
}

/// Puts a shared file (kernel, boot disk) at `dest` unless a file with
/// the pinned content is there; one with other content is an error, not
/// replaced (it may be in use).
fn place_pinned(
    dest: &Path,
    file: &ChunkedFile,
    chunk_size: u64,
    store: &BlobStore,
    pin: &str,
    what: &str,
) -> Result<()> {
    let sha =
        |p: &Path| crate::digest::sha256_file(p).io_ctx(|| format!("hashing {}", p.display()));
    if dest.is_file() {
        let have = sha(dest)?;
        if have != pin {
            return Err(invalid(format!(
                "{what} {} here has sha256 {have}, the snapshot pins {pin}",
                dest.display()
            )));
        }
        return Ok(());
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).io_ctx(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".pull-{}-{}",
        std::process::id(),
        crate::image::blob::unique()
    ));
    let placed = (|| {
        assemble(&tmp, file, chunk_size, store)?;
        let got = sha(&tmp)?;
        if got != pin {
            return Err(invalid(format!(
                "the {what} that arrived has sha256 {got}, the snapshot pins {pin}"
            )));
        }
        std::fs::rename(&tmp, dest).io_ctx(|| format!("placing {}", dest.display()))
    })();
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_references_are_told_from_local_snapshots() {
        assert!(super::is_registry_reference("127.0.0.1:5000/team/app:v1"));
        assert!(!super::is_registry_reference("builder:baseline"));
    }
}
