//! `manifest.json`: what a snapshot is and what it needs to be restored.
//! Restore and fork refuse a different kernel, CPU template, host CPU or
//! TSC frequency with an error naming both values.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::cpuid::{missing_features, CpuidLeaf};
use super::format::{FORMAT_MAJOR, FORMAT_MINOR, OLDEST_MAJOR};
use crate::util::fs::{read_bounded, write_atomic};

pub const MANIFEST: &str = "manifest.json";
pub const VMSTATE: &str = "vmstate.bin";
pub const MEMORY: &str = "memory.bin";
pub const ROOTFS: &str = "rootfs.ext4";
/// At most this many memory layers under one snapshot (its own included):
/// a restore reads every layer above the bottom one, so the chain is
/// bounded; the snapshot after a full chain is written whole.
pub const MAX_MEMORY_LAYERS: usize = 8;

/// The file of memory layer `k` (bottom first) of a snapshot with `count`
/// layers: the top one, the snapshot's own, is always `memory.bin`; those
/// below are its parents' files, linked as `memory.K.bin`.
pub fn memory_layer_file(k: usize, count: usize) -> String {
    if k + 1 >= count {
        MEMORY.to_string()
    } else {
        format!("memory.{k}.bin")
    }
}

/// Is `name` a memory file some snapshot may hold?
pub fn is_memory_file(name: &str) -> bool {
    name == MEMORY
        || name
            .strip_prefix("memory.")
            .and_then(|r| r.strip_suffix(".bin"))
            .and_then(|k| k.parse::<usize>().ok())
            .is_some_and(|k| k + 1 < MAX_MEMORY_LAYERS && format!("memory.{k}.bin") == name)
}

/// A memory layer's id: 32 lowercase hex digits, made by the engine.
pub fn valid_memory_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub model: String,
}

impl HostCpu {
    pub fn current() -> HostCpu {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        HostCpu {
            vendor: field("vendor_id"),
            model: field("model name"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// What `sha256` is taken over. Absent: every byte of the file.
    /// [`HASH_BLOCKS`]: its length, then each non-zero 4 KiB block with its
    /// offset (sparse memory; holes are never read, allocation does not
    /// count). [`HASH_CHAIN`]: a disk chain file's length and the blocks
    /// it holds with their bytes (allocation is its content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Allocated bytes of what a snapshot (or boot-cache entry) in `dir` holds
/// of its own: memory, state, manifest and its disk deltas. The base disk
/// is shared with the workspaces of its image, so it is not counted.
pub fn own_bytes(dir: &Path) -> u64 {
    use crate::util::copy::allocated_bytes;
    let own: u64 = [VMSTATE, MEMORY, ROOTFS, MANIFEST]
        .iter()
        .map(|f| allocated_bytes(&dir.join(f)))
        .sum();
    let disk = dir.join(crate::disk::SNAPSHOT_DISK_DIR);
    let deltas = crate::disk::ChainSpec::read(&disk).map_or(0, |spec| {
        spec.deltas
            .iter()
            .map(|d| allocated_bytes(&disk.join(d)))
            .sum()
    });
    own + deltas
}

/// See [`FileInfo::hash`].
pub const HASH_BLOCKS: &str = "sha256-nonzero-4k-blocks";
/// See [`FileInfo::hash`].
pub const HASH_CHAIN: &str = "sha256-chain-blocks";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub tag: String,
    pub workspace: String,
    pub created: String,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel_sha256: String,
    pub kernel_cmdline: String,
    pub init: Option<String>,
    pub cpu_template: String,
    pub host_cpu: HostCpu,
    pub tsc_khz: Option<u32>,
    /// vCPU 0's CPUID as the guest saw it (format 1.1 on; empty before).
    #[serde(default)]
    pub guest_cpuid: Vec<CpuidLeaf>,
    /// The read-only layer disks under the snapshot's upper, lowest first
    /// (empty: a whole-disk root, or a snapshot made before layered disks).
    /// The guest's page cache holds their blocks: a restore needs these
    /// exact bytes, so each is pinned by its sha256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_disks: Vec<DiskRef>,
    /// The boot disk the guest booted from, pinned the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_disk: Option<DiskRef>,
    /// The ids of the memory layers restoring this snapshot stacks, bottom
    /// first, its own last (files: [`memory_layer_file`]). Empty: made
    /// before memory ids; `memory.bin` is whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_layers: Vec<String>,
    /// The workspace's volumes, in disk order: the guest's page cache
    /// holds their blocks too, so the snapshot holds each one's frozen
    /// chain (`vol-N/`) and a restore needs the same mount points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRef>,
    pub format_version: String,
    pub files: Vec<FileInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid snapshot manifest: {reason}")]
    Bad { path: String, reason: String },
}

/// What a snapshot records of the workspace it was taken from.
#[derive(Debug, Clone)]
pub struct Origin {
    pub workspace: String,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel_sha256: String,
    pub kernel_cmdline: String,
    pub init: Option<String>,
    pub cpu_template: String,
    pub layer_disks: Vec<DiskRef>,
    pub boot_disk: Option<DiskRef>,
}

/// A volume a snapshot captured: its name then, and where the guest had
/// it mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    pub volume: String,
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A shared read-only disk a snapshot stands on: its key (a layer's key in
/// the image store, or the boot disk's file name) and its content's sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    pub key: String,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CompatError {
    #[error("kernel sha256 mismatch: snapshot pins {snapshot}, workspace has {workspace}")]
    Kernel { snapshot: String, workspace: String },
    #[error("CPU template mismatch: snapshot uses {snapshot}, workspace uses {workspace}")]
    Template { snapshot: String, workspace: String },
    #[error("incompatible CPU: snapshot taken on {snapshot}, this host is {host}")]
    Cpu { snapshot: String, host: String },
    #[error("TSC frequency mismatch: snapshot guest ran at {snapshot} kHz, this host gives {host} kHz (no TSC scaling here)")]
    Tsc { snapshot: u32, host: u32 },
    #[error("incompatible CPU: the snapshot's guest saw CPUID leaf {leaf:#x} {register} bits {missing:#x} that this host cannot give it")]
    CpuFeatures {
        leaf: u32,
        register: &'static str,
        missing: u32,
    },
    #[error("snapshot format {found} is not supported (this build reads {OLDEST_MAJOR}.x to {FORMAT_MAJOR}.x)")]
    Format { found: String },
}

impl Manifest {
    pub fn new(
        tag: &str,
        origin: Origin,
        created: String,
        tsc_khz: Option<u32>,
        guest_cpuid: Vec<CpuidLeaf>,
        files: Vec<FileInfo>,
    ) -> Self {
        Manifest {
            tag: tag.to_string(),
            workspace: origin.workspace,
            created,
            image: origin.image,
            image_digest: origin.image_digest,
            vcpus: origin.vcpus,
            memory_mib: origin.memory_mib,
            kernel_sha256: origin.kernel_sha256,
            kernel_cmdline: origin.kernel_cmdline,
            init: origin.init,
            cpu_template: origin.cpu_template,
            layer_disks: origin.layer_disks,
            boot_disk: origin.boot_disk,
            host_cpu: HostCpu::current(),
            tsc_khz,
            guest_cpuid,
            memory_layers: Vec::new(),
            volumes: Vec::new(),
            format_version: format!("{FORMAT_MAJOR}.{FORMAT_MINOR}"),
            files,
        }
    }

    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST);
        let bytes = read_bounded(&path).map_err(|source| ManifestError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ManifestError::Bad {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Bad {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json).map_err(|source| ManifestError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Can this snapshot run with `kernel_sha256`/`template` on this host?
    pub fn check_compatible(
        &self,
        kernel_sha256: &str,
        template: &str,
        host: &HostCpu,
        host_tsc_khz: Option<u32>,
        host_cpuid: Option<&[CpuidLeaf]>,
    ) -> Result<(), CompatError> {
        let major = self
            .format_version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u16>().ok());
        if !major.is_some_and(|m| (OLDEST_MAJOR..=FORMAT_MAJOR).contains(&m)) {
            return Err(CompatError::Format {
                found: self.format_version.clone(),
            });
        }
        if self.kernel_sha256 != kernel_sha256 {
            return Err(CompatError::Kernel {
                snapshot: self.kernel_sha256.clone(),
                workspace: kernel_sha256.to_string(),
            });
        }
        if self.cpu_template != template {
            return Err(CompatError::Template {
                snapshot: self.cpu_template.clone(),
                workspace: template.to_string(),
            });
        }
        if self.host_cpu != *host {
            return Err(CompatError::Cpu {
                snapshot: format!("{} {}", self.host_cpu.vendor, self.host_cpu.model),
                host: format!("{} {}", host.vendor, host.model),
            });
        }
        if let (Some(s), Some(h)) = (self.tsc_khz, host_tsc_khz) {
            // KVM reports the TSC rounded to kHz; allow for that.
            if s.abs_diff(h) > s / 10_000 + 1 {
                return Err(CompatError::Tsc {
                    snapshot: s,
                    host: h,
                });
            }
        }
        if let Some(here) = host_cpuid {
            if let Some((leaf, register, missing)) = missing_features(&self.guest_cpuid, here) {
                return Err(CompatError::CpuFeatures {
                    leaf,
                    register,
                    missing,
                });
            }
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> Option<&FileInfo> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Tags: 1-63 of letters, digits, '.', '_', '-', not starting with '.' or '-'.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&tag.len())
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid snapshot tag {tag:?}: use 1-63 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            tag: "baseline".into(),
            workspace: "builder".into(),
            created: "2026-06-11T08:52:44Z".into(),
            image: None,
            image_digest: None,
            vcpus: 2,
            memory_mib: 512,
            kernel_sha256: "aaa".into(),
            kernel_cmdline: "quiet".into(),
            init: None,
            cpu_template: "pvm-safe".into(),
            host_cpu: HostCpu {
                vendor: "AuthenticAMD".into(),
                model: "EPYC".into(),
            },
            tsc_khz: Some(1_996_248),
            guest_cpuid: vec![CpuidLeaf {
                function: 7,
                index: 0,
                eax: 0,
                ebx: 1 << 16, // AVX-512F
                ecx: 0,
                edx: 0,
            }],
            layer_disks: vec![],
            boot_disk: None,
            memory_layers: Vec::new(),
            volumes: Vec::new(),
            format_version: "1.1".into(),
            files: vec![],
        }
    }

    #[test]
    fn incompatibilities_name_both_values() {
        let m = manifest();
        let host = m.host_cpu.clone();
        assert!(m
            .check_compatible("aaa", "pvm-safe", &host, Some(1_996_248), None)
            .is_ok());
        assert_eq!(
            m.check_compatible("bbb", "pvm-safe", &host, None, None)
                .unwrap_err()
                .to_string(),
            "kernel sha256 mismatch: snapshot pins aaa, workspace has bbb"
        );
        assert!(m
            .check_compatible("aaa", "host", &host, None, None)
            .unwrap_err()
            .to_string()
            .contains("pvm-safe"));
        let intel = HostCpu {
            vendor: "GenuineIntel".into(),
            model: "Xeon".into(),
        };
        let e = m
            .check_compatible("aaa", "pvm-safe", &intel, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AuthenticAMD EPYC") && e.contains("GenuineIntel Xeon"),
            "{e}"
        );
        assert!(matches!(
            m.check_compatible("aaa", "pvm-safe", &host, Some(2_400_000), None),
            Err(CompatError::Tsc { .. })
        ));
        // A host that cannot show the guest a feature it saw at boot.
        let here = [CpuidLeaf {
            ebx: 0,
            ..m.guest_cpuid[0]
        }];
        assert_eq!(
            m.check_compatible("aaa", "pvm-safe", &host, None, Some(&here))
                .unwrap_err()
                .to_string(),
            "incompatible CPU: the snapshot's guest saw CPUID leaf 0x7 ebx bits 0x10000 that this host cannot give it"
        );
        assert!(m
            .check_compatible("aaa", "pvm-safe", &host, None, Some(&m.guest_cpuid))
            .is_ok());
        let mut older = m.clone();
        older.format_version = "1.3".into();
        assert!(older
            .check_compatible("aaa", "pvm-safe", &host, None, None)
            .is_ok());
        let mut future = m.clone();
        future.format_version = "3.0".into();
        assert!(matches!(
            future.check_compatible("aaa", "pvm-safe", &host, None, None),
            Err(CompatError::Format { .. })
        ));
    }

    #[test]
    fn tags() {
        for ok in ["baseline", "20260611T085244Z", "v1.2_rc-3"] {
            assert!(validate_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(64)] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
    }
}
