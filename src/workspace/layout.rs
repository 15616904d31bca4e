//! The disks a workspace boots from and how the guest finds them.
//!
//! The kernel boots a small shared read-only boot disk (erofs: the guest
//! agent and empty mount points), always the first virtio-mmio device, so
//! `root=/dev/vda` names it. The agent, as PID 1, finds every other disk
//! by its virtio-blk serial and builds the workspace's root from them
//! (guest-agent `root.rs`):
//! - an image workspace stacks the image's read-only layer disks
//!   (`microagent-layer-N`, shared with every workspace of those layers)
//!   under its own writable upper (`microagent-upper`, a disk chain);
//! - a `--rootfs` workspace has one writable whole root
//!   (`microagent-root`, a disk chain).
//!
//! Nothing is written into a shared disk, and no workspace disk holds the
//! agent: a new agent is a new boot disk, built once.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::digest::sha256_file_cached;
use crate::snapshot::manifest::DiskRef;
use crate::vmm::vm::{DiskConfig, DiskFormat};

pub const BOOT_SERIAL: &str = "microagent-boot";
pub const UPPER_SERIAL: &str = "microagent-upper";
pub const ROOT_SERIAL: &str = "microagent-root";
/// The kernel command line key that tells the agent how many layer disks
/// there are (0: a whole-disk root).
pub const LAYERS_KEY: &str = "microagent.layers";
/// Where boot disks are kept, under the state directory.
pub const BOOT_DISK_DIR: &str = "cache/bootdisks";

/// One read-only layer disk: its key in the image store (a diff_id, or a
/// merged base's key) and its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDisk {
    pub key: String,
    pub path: PathBuf,
}

impl LayerDisk {
    /// The layer disks an image stacks, lowest first, where its store keeps them.
    pub fn of_image(
        store: &crate::image::store::ImageStore,
        image: &crate::image::store::ImageRecord,
    ) -> Vec<LayerDisk> {
        image
            .layer_disks
            .iter()
            .map(|k| LayerDisk {
                key: k.to_string(),
                path: store.layer_disk(k),
            })
            .collect()
    }
}

/// A workspace's disks beside its own chain. Records written before
/// layered disks have none: their one root disk holds the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// The shared boot disk (the guest agent).
    pub boot_disk: PathBuf,
    /// Image layers, lowest first; empty for a whole-disk (`--rootfs`) root.
    pub layers: Vec<LayerDisk>,
}

impl DiskLayout {
    /// Every disk of the VM, in device order, with `chain` (the
    /// workspace's own) last.
    pub fn disks(&self, chain: &Path) -> Vec<DiskConfig> {
        let ro = |path: &Path, serial: String| DiskConfig {
            path: path.to_path_buf(),
            read_only: true,
            format: DiskFormat::File,
            serial: Some(serial),
            snapshot_dir: None,
        };
        let mut out = vec![ro(&self.boot_disk, BOOT_SERIAL.into())];
        for (i, l) in self.layers.iter().enumerate() {
            out.push(ro(&l.path, format!("microagent-layer-{i}")));
        }
        let own = if self.layers.is_empty() {
            ROOT_SERIAL
        } else {
            UPPER_SERIAL
        };
        out.push(DiskConfig {
            path: chain.to_path_buf(),
            read_only: false,
            format: DiskFormat::Chain,
            serial: Some(own.into()),
            snapshot_dir: None,
        });
        out
    }

    /// Kernel arguments that boot the boot disk and tell the agent the
    /// layout; appended after the user's, so they win.
    pub fn cmdline(&self) -> String {
        format!(
            "root=/dev/vda ro rootfstype=erofs {LAYERS_KEY}={}",
            self.layers.len()
        )
    }

    /// The layer disks pinned by content, for a snapshot's manifest
    /// (hashes are remembered by file identity in `hash_cache`).
    pub fn layer_refs(&self, hash_cache: &Path) -> std::io::Result<Vec<DiskRef>> {
        self.layers
            .iter()
            .map(|l| {
                Ok(DiskRef {
                    key: l.key.clone(),
                    sha256: sha256_file_cached(&l.path, hash_cache)?,
                })
            })
            .collect()
    }

    /// The boot disk pinned by content, keyed by its file name.
    pub fn boot_ref(&self, hash_cache: &Path) -> std::io::Result<DiskRef> {
        Ok(DiskRef {
            key: self
                .boot_disk
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: sha256_file_cached(&self.boot_disk, hash_cache)?,
        })
    }

    /// Why a snapshot pinned to `layers` and `boot` cannot resume over this
    /// layout: other layers, or the same keys with other bytes (a layer
    /// disk rebuilt since, or built by another host). None when it can.
    pub fn mismatch(
        &self,
        layers: &[DiskRef],
        boot: Option<&DiskRef>,
        hash_cache: &Path,
    ) -> std::io::Result<Option<String>> {
        if let Some(what) = self.missing() {
            return Ok(Some(format!("its {what} is gone")));
        }
        let keys: Vec<&str> = layers.iter().map(|l| l.key.as_str()).collect();
        if keys
            != self
                .layers
                .iter()
                .map(|l| l.key.as_str())
                .collect::<Vec<_>>()
        {
            return Ok(Some(format!(
                "it stands on layer disks [{}], the workspace on [{}]",
                keys.join(", "),
                self.layer_keys().join(", ")
            )));
        }
        for (want, have) in layers.iter().zip(self.layer_refs(hash_cache)?) {
            if want.sha256 != have.sha256 {
                return Ok(Some(format!(
                    "layer disk {} has sha256 {}, the snapshot was taken over {}",
                    want.key, have.sha256, want.sha256
                )));
            }
        }
        let Some(boot) = boot else {
            return Ok(Some("it was taken without a boot disk".into()));
        };
        let have = self.boot_ref(hash_cache)?;
        if have.sha256 != boot.sha256 {
            return Ok(Some(format!(
                "the boot disk {} has sha256 {}, the snapshot was taken over {} ({})",
                self.boot_disk.display(),
                have.sha256,
                boot.sha256,
                boot.key
            )));
        }
        Ok(None)
    }

    /// The layer keys, as snapshots and references record them.
    pub fn layer_keys(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.key.clone()).collect()
    }

    /// A disk this layout needs that is gone (a removed image's layer).
    pub fn missing(&self) -> Option<String> {
        if !self.boot_disk.is_file() {
            return Some(format!("boot disk {}", self.boot_disk.display()));
        }
        self.layers
            .iter()
            .find(|l| !l.path.is_file())
            .map(|l| format!("layer disk {} ({})", l.key, l.path.display()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("building {what} at {path}: {reason}")]
pub struct BuildError {
    pub what: &'static str,
    pub path: String,
    pub reason: String,
}

fn build_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(String) -> BuildError + 'a {
    move |reason| BuildError {
        what,
        path: path.display().to_string(),
        reason,
    }
}

/// The boot disk for this agent binary: `<state>/cache/bootdisks/<sha256>.erofs`,
/// with the agent at `guest_path` (the kernel's `init=`), built once (under
/// a temporary name, then renamed) and shared.
pub fn boot_disk(
    state_root: &Path,
    agent: &Path,
    agent_sha256: &str,
    guest_path: &str,
) -> Result<PathBuf, BuildError> {
    let dir = state_root.join(BOOT_DISK_DIR);
    let disk = dir.join(format!("{agent_sha256}.erofs"));
    if disk.is_file() {
        return Ok(disk);
    }
    let err = build_err("the boot disk", &disk);
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".boot-")
        .tempdir_in(&dir)
        .map_err(|e| err(e.to_string()))?;
    let since = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    let tree = tmp.path().join("tree");
    let agent_in_tree = tree.join(guest_path.trim_start_matches('/'));
    (|| -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for d in ["proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(tree.join(d))?;
        }
        std::fs::create_dir_all(agent_in_tree.parent().unwrap_or(&tree))?;
        std::fs::copy(agent, &agent_in_tree)?;
        std::fs::set_permissions(&agent_in_tree, std::fs::Permissions::from_mode(0o755))
    })()
    .map_err(|e| err(e.to_string()))?;
    let built = tmp.path().join("boot.erofs");
    crate::image::layer_disk::mkfs_erofs(&tree, &built, since).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&built, &disk).map_err(|e| err(e.to_string()))?;
    drop(err);
    Ok(disk)
}

/// Builds an empty upper disk of `size` bytes at `disk` (ext4, with
/// `upper/` and `work/` for overlayfs), and the image's entrypoint spec in
/// `meta/`, outside the tree the workspace sees.
pub fn build_upper(disk: &Path, size: u64, entrypoint: Option<&Path>) -> Result<(), BuildError> {
    let err = build_err("an upper disk", disk);
    let tree = tempfile::Builder::new()
        .prefix(".upper-tree-")
        .tempdir_in(disk.parent().unwrap_or(Path::new(".")))
        .map_err(|e| err(e.to_string()))?;
    (|| -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for d in ["upper", "work", "meta"] {
            std::fs::create_dir(tree.path().join(d))?;
        }
        std::fs::set_permissions(tree.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(
            tree.path().join("upper"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        if let Some(spec) = entrypoint {
            std::fs::copy(spec, tree.path().join("meta/entrypoint.json"))?;
        }
        Ok(())
    })()
    .map_err(|e| err(e.to_string()))?;
    mkfs_ext4(disk, size, "upper", Some(tree.path()))
}

/// Makes `disk` an ext4 filesystem of `size` bytes (rounded up to a MiB)
/// labelled `label`, holding `tree` if given, built so copy-on-write
/// chains over it stay small.
pub fn mkfs_ext4(
    disk: &Path,
    size: u64,
    label: &str,
    tree: Option<&Path>,
) -> Result<(), BuildError> {
    let err = build_err("an ext4 disk", disk);
    // Every workspace's disk is a copy-on-write top over this base, so any
    // block the guest kernel writes for its own housekeeping is paid once
    // per workspace. The file is made sparse first so mkfs can discard
    // instead of writing zeros; inode tables are marked zeroed now
    // (lazy_itable_init=0), or the guest's ext4lazyinit would rewrite
    // them (4 MiB per GiB) into every workspace's delta; the journal is
    // left unwritten (it reads as zeros in a fresh sparse file) and kept
    // at 16 MiB, bounding what journal wrap-around adds to a long-lived
    // workspace's delta (mkfs would pick 32 MiB at 1 GiB).
    std::fs::File::create(disk)
        .and_then(|f| f.set_len(size.div_ceil(1 << 20) << 20))
        .map_err(|e| err(e.to_string()))?;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", label,
    ])
    .args(["-E", "lazy_itable_init=0,lazy_journal_init=1"])
    // Below 256 MiB mkfs's own journal size is already smaller.
    .args(if size >= 256 << 20 {
        &["-J", "size=16"][..]
    } else {
        &[]
    });
    if let Some(tree) = tree {
        cmd.arg("-d").arg(tree);
    }
    let out = cmd.arg(disk).output().map_err(|e| {
        err(format!(
            "cannot run mkfs.ext4 (apt-get install e2fsprogs): {e}"
        ))
    })?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_by_serial_with_the_chain_last() {
        let l = DiskLayout {
            boot_disk: "/b.erofs".into(),
            layers: vec![
                LayerDisk {
                    key: "sha256:a".into(),
                    path: "/a.erofs".into(),
                },
                LayerDisk {
                    key: "sha256:c".into(),
                    path: "/c.erofs".into(),
                },
            ],
        };
        let d = l.disks(Path::new("/ws/disk"));
        let serials: Vec<_> = d.iter().map(|d| d.serial.clone().unwrap()).collect();
        assert_eq!(
            serials,
            [
                "microagent-boot",
                "microagent-layer-0",
                "microagent-layer-1",
                "microagent-upper"
            ]
        );
        assert!(d[..3]
            .iter()
            .all(|d| d.read_only && d.format == DiskFormat::File));
        assert!(!d[3].read_only && d[3].format == DiskFormat::Chain);
        assert!(serials.iter().all(|s| s.len() <= 20));
        assert!(l.cmdline().ends_with("microagent.layers=2"));
        let whole = DiskLayout {
            boot_disk: "/b".into(),
            layers: vec![],
        };
        assert_eq!(
            whole.disks(Path::new("/d"))[1].serial.as_deref(),
            Some(ROOT_SERIAL)
        );
    }
}
