//! The OCI artifact a snapshot travels as (`snapshot push` / `pull`): an
//! OCI image manifest with `artifactType` [`ARTIFACT_TYPE`], whose config
//! blob is an [`ArtifactConfig`] and whose layers are every blob the
//! snapshot needs: its manifest and VM state, the image's config and
//! layer blobs (as they are, so a registry stores them once for images
//! and snapshots alike), and the zstd chunks of guest memory, of the
//! disk chain's files, of the guest kernel and of the boot disk.
//! Listing all of them as layers is what lets standard tools (`skopeo
//! copy`) move the artifact whole.
//!
//! Everything here is read back from registries: the config is
//! size-bounded and validated before anything is fetched by it.

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::config::{Blob, RunConfig, OCI_MANIFEST};
use super::digest::Digest;
use super::{ImageError, Result};
use crate::snapshot::chunks::ChunkedFile;

pub const ARTIFACT_TYPE: &str = "application/vnd.microagent.snapshot.v1";
pub const CONFIG_TYPE: &str = "application/vnd.microagent.snapshot.config.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.microagent.snapshot.manifest.v1+json";
pub const VMSTATE_TYPE: &str = "application/vnd.microagent.snapshot.vmstate.v1";
pub const CHUNK_TYPE: &str = "application/vnd.microagent.snapshot.chunk.v1+zstd";
pub const VERSION: u32 = 1;
/// Chunk windows: 4 MiB. Measured (README "More than one host") on two
/// snapshots of one 256 MiB busybox guest, the second after 9.9 MB
/// written: 4 MiB windows sent 11.6 + 10.0 MiB in 35 + 20 blobs, 2 MiB
/// 11.6 + 12.3 MiB in 50 + 30, 1 MiB 11.4 + 12.8 MiB in 69 + 48.
/// Larger windows compress better and the guest's changes cluster, so
/// they cost less than the changed windows they send whole.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// The config lists every extent and chunk: bounded, but roomy.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// Snapshot manifests and VM states are small.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
pub const MAX_VMSTATE_BYTES: u64 = 64 << 20;
/// Files one artifact may carry (a chain has at most 255 deltas).
const MAX_FILES: usize = 300;
/// Layers one artifact may list.
const MAX_BLOBS: usize = 1 << 20;

/// How the workspace a snapshot was taken from runs: what a host that
/// never saw it needs to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRun {
    pub image: Option<String>,
    pub image_config: Option<RunConfig>,
    pub cmdline: String,
    pub init: Option<String>,
    pub cpu_template: String,
    /// The workspace's network mode (`user`, `none`).
    pub network: String,
}

/// The image the snapshot's layer disks are built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedImage {
    pub config: Blob,
    pub layers: Vec<Blob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactConfig {
    pub version: u32,
    pub chunk_size: u64,
    pub run: SharedRun,
    /// The snapshot's `manifest.json` and `vmstate.bin`, whole.
    pub manifest: Blob,
    pub vmstate: Blob,
    pub image: Option<SharedImage>,
    /// The guest kernel the snapshot pins (named `vmlinux`).
    pub kernel: ChunkedFile,
    /// The boot disk it pins, under the name the manifest pins it by.
    pub boot_disk: Option<ChunkedFile>,
    /// The snapshot's other files: `memory.bin`, `disk/...`.
    pub files: Vec<ChunkedFile>,
}

/// A file name of a snapshot: a memory layer (`memory.bin`,
/// `memory.K.bin`), or `disk/NAME` where NAME is the chain's `chain.json`
/// or a name a chain accepts for its files.
fn snapshot_file_name(name: &str) -> bool {
    use crate::disk::spec::valid_name;
    crate::snapshot::manifest::is_memory_file(name)
        || name
            .strip_prefix("disk/")
            .is_some_and(|n| n == crate::disk::CHAIN_FILE || valid_name(n))
}

impl ArtifactConfig {
    pub fn parse(bytes: &[u8]) -> Result<ArtifactConfig> {
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ImageError::TooLarge {
                what: "snapshot artifact config".into(),
                size: bytes.len() as u64,
                limit: MAX_CONFIG_BYTES,
            });
        }
        let c: ArtifactConfig =
            serde_json::from_slice(bytes).map_err(ImageError::json("snapshot artifact config"))?;
        c.validate()
            .map_err(|e| ImageError::Invalid(format!("snapshot artifact config: {e}")))?;
        Ok(c)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "version {} (this build reads {VERSION})",
                self.version
            ));
        }
        if !self.chunk_size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&self.chunk_size) {
            return Err(format!(
                "chunk size {} is not a power of two from 64 KiB to 64 MiB",
                self.chunk_size
            ));
        }
        if self.files.len() > MAX_FILES {
            return Err(format!("{} files (at most {MAX_FILES})", self.files.len()));
        }
        if self.manifest.size > MAX_MANIFEST_BYTES || self.vmstate.size > MAX_VMSTATE_BYTES {
            return Err("the snapshot manifest or VM state is too large".into());
        }
        let run = &self.run;
        if run.cmdline.len() > 4096 || run.cmdline.chars().any(char::is_control) {
            return Err(
                "the kernel command line is over 4096 bytes or holds control characters".into(),
            );
        }
        if let Some(init) = &run.init {
            if !init.starts_with('/') || init.len() > 4096 || init.contains(char::is_whitespace) {
                return Err(format!(
                    "init {init:?} is not an absolute path without spaces"
                ));
            }
        }
        if run
            .cpu_template
            .parse::<crate::vmm::arch::x86_64::cpuid::CpuTemplate>()
            .is_err()
        {
            return Err(format!("unknown CPU template {:?}", run.cpu_template));
        }
        if !matches!(run.network.as_str(), "user" | "none") {
            return Err(format!("unknown network mode {:?}", run.network));
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.files {
            if !snapshot_file_name(&f.name) {
                return Err(format!("file name {:?} is not a snapshot file", f.name));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("file {} is named twice", f.name));
            }
        }
        if self.kernel.name != "vmlinux" {
            return Err(format!("kernel file named {:?}", self.kernel.name));
        }
        if let Some(b) = &self.boot_disk {
            if !crate::disk::spec::valid_name(&b.name) {
                return Err(format!(
                    "boot disk name {:?} is not a plain file name",
                    b.name
                ));
            }
        }
        self.chunked().try_for_each(|f| f.validate(self.chunk_size))
    }

    /// Every chunked file: the snapshot's, the kernel, the boot disk.
    pub fn chunked(&self) -> impl Iterator<Item = &ChunkedFile> {
        self.files
            .iter()
            .chain(std::iter::once(&self.kernel))
            .chain(self.boot_disk.iter())
    }

    /// Every blob the artifact needs, each once, in push order: the
    /// snapshot manifest and state, the image's config and layers, then
    /// the chunks in file order.
    pub fn blobs(&self) -> Result<Vec<Blob>> {
        let mut out = vec![self.manifest.clone(), self.vmstate.clone()];
        if let Some(image) = &self.image {
            out.push(image.config.clone());
            out.extend(image.layers.iter().cloned());
        }
        let mut seen: std::collections::HashSet<Digest> =
            out.iter().map(|b| b.digest.clone()).collect();
        for f in self.chunked() {
            for c in &f.chunks {
                let digest = Digest::from_hex(c.sha256.to_ascii_lowercase())?;
                if seen.insert(digest.clone()) {
                    out.push(Blob {
                        digest,
                        size: c.size,
                        media_type: CHUNK_TYPE.into(),
                    });
                }
            }
        }
        if out.len() > MAX_BLOBS {
            return Err(ImageError::Invalid(format!(
                "snapshot artifact lists {} blobs (at most {MAX_BLOBS})",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The artifact's manifest: `config` (the [`ArtifactConfig`] blob) and
/// every blob as a layer, with the snapshot's tag and creation time as
/// annotations.
pub fn manifest_json(config: &Blob, blobs: &[Blob], tag: &str, created: &str) -> Vec<u8> {
    let blob = |b: &Blob| json!({ "mediaType": b.media_type, "digest": b.digest.to_string(), "size": b.size });
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": blob(config),
        "layers": blobs.iter().map(blob).collect::<Vec<_>>(),
        "annotations": {
            "org.opencontainers.image.created": created,
            "dev.microagent.snapshot.tag": tag,
        },
    });
    serde_json::to_vec(&doc).expect("a manifest serialises")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    #[serde(default)]
    artifact_type: Option<String>,
    config: RawDescriptor,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
}

/// Reads an artifact manifest (already size-bounded and digest-checked):
/// its config blob and its layers. Refuses what is not a snapshot, naming
/// what it is instead.
pub fn parse_manifest(bytes: &[u8]) -> Result<(Blob, Vec<Blob>)> {
    let m: RawManifest =
        serde_json::from_slice(bytes).map_err(ImageError::json("snapshot artifact manifest"))?;
    if m.schema_version != 2 {
        return Err(ImageError::Invalid(format!(
            "snapshot artifact manifest: schemaVersion {}",
            m.schema_version
        )));
    }
    let kind = m.artifact_type.as_deref().unwrap_or(&m.config.media_type);
    if kind != ARTIFACT_TYPE || m.config.media_type != CONFIG_TYPE {
        return Err(ImageError::Invalid(format!(
            "not a microagent snapshot: its artifact type is {kind:?} (an image? use image pull), expected {ARTIFACT_TYPE}"
        )));
    }
    if m.layers.len() > MAX_BLOBS {
        return Err(ImageError::Invalid(format!(
            "snapshot artifact lists {} blobs (at most {MAX_BLOBS})",
            m.layers.len()
        )));
    }
    let blob = |d: RawDescriptor| -> Result<Blob> {
        Ok(Blob {
            digest: Digest::parse(&d.digest)?,
            size: d.size,
            media_type: d.media_type,
        })
    };
    let config = blob(m.config)?;
    if config.size > MAX_CONFIG_BYTES {
        return Err(ImageError::TooLarge {
            what: "snapshot artifact config".into(),
            size: config.size,
            limit: MAX_CONFIG_BYTES,
        });
    }
    let layers = m.layers.into_iter().map(blob).collect::<Result<Vec<_>>>()?;
    Ok((config, layers))
}

/// Checks that the manifest lists every blob the config needs, with the
/// same size: what is fetched is only ever what the manifest announced.
pub fn check_listed(config: &ArtifactConfig, layers: &[Blob]) -> Result<Vec<Blob>> {
    let listed: std::collections::HashMap<&Digest, u64> =
        layers.iter().map(|b| (&b.digest, b.size)).collect();
    let needed = config.blobs()?;
    for b in &needed {
        match listed.get(&b.digest) {
            Some(size) if *size == b.size => {}
            Some(size) => {
                return Err(ImageError::SizeMismatch {
                    digest: b.digest.to_string(),
                    expected: b.size,
                    actual: *size,
                })
            }
            None => {
                return Err(ImageError::Invalid(format!(
                    "snapshot artifact: blob {} is used but not listed in its manifest",
                    b.digest
                )))
            }
        }
    }
    Ok(needed)
}
