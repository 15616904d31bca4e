//! Volumes: named disks that outlive the workspaces using them, each a
//! copy-on-write chain (`crate::disk`) over a shared empty ext4 base.
//!
//! Layout: `<state>/volumes/<name>/{volume.json, lock, disk/,
//! snapshots/<tag>/{snapshot.json, disk/}}`. A volume snapshot's `disk/` is
//! a frozen chain whose files are hard links, as a workspace snapshot's.
//!
//! A workspace names the volumes it attaches (`VolumeMount`, in its
//! record, in order); the guest finds volume i by the virtio-blk serial
//! `microagent-vol-i` and mounts it where `microagent.volumes` says.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::store::{validate_name, StoreError};
use crate::util::fs::{read_bounded, write_atomic};

pub const VOLUME_RECORD: &str = "volume.json";
pub const VOLUME_SNAPSHOT_RECORD: &str = "snapshot.json";
/// Kernel command line key: the guest mount points, in disk order.
pub const VOLUMES_KEY: &str = "microagent.volumes";
/// Volumes one workspace may attach (each is a virtio device and an IRQ).
pub const MAX_VOLUMES: usize = 4;
const MAX_MOUNT_PATH: usize = 128;
/// Guest directories a volume may not hide.
const RESERVED: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The serial the guest finds a workspace's volume `index` by.
pub fn serial(index: usize) -> String {
    format!("microagent-vol-{index}")
}

/// Where a workspace snapshot (and the VMM's staging directory) keeps
/// the frozen chain of the workspace's volume `index`.
pub fn snapshot_dir(index: usize) -> String {
    format!("vol-{index}")
}

/// One volume a workspace attaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub volume: String,
    /// Absolute path in the guest.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    /// The volume's chain directory on the host.
    pub disk: PathBuf,
}

/// Parses `VOL:/path[:ro]` (the disk is filled in by the engine).
pub fn parse_mount(spec: &str) -> Result<VolumeMount, String> {
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (spec.strip_suffix(":rw").unwrap_or(spec), false),
    };
    let Some((volume, path)) = rest.split_once(':') else {
        return Err(format!(
            "volume {spec:?}: expected VOLUME:/PATH[:ro], e.g. data:/var/lib/data"
        ));
    };
    validate_name(volume).map_err(|_| {
        format!("volume {spec:?}: invalid volume name {volume:?}: use 1-63 lowercase letters, digits and '-'")
    })?;
    validate_mount_path(path).map_err(|e| format!("volume {spec:?}: {e}"))?;
    Ok(VolumeMount {
        volume: volume.to_string(),
        path: path.to_string(),
        read_only,
        disk: PathBuf::new(),
    })
}

/// A guest mount point: absolute, plain (letters, digits, `._-/`, no `.`
/// or `..` component, so it needs no quoting on the kernel command line
/// and cannot climb), not `/` and not under /proc, /sys or /dev.
pub fn validate_mount_path(path: &str) -> Result<(), String> {
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !path.starts_with('/') || !plain || path.len() > MAX_MOUNT_PATH {
        return Err(format!(
            "mount path {path:?} must be absolute, at most {MAX_MOUNT_PATH} bytes of letters, digits, '.', '_', '-' and '/'"
        ));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("a volume cannot be mounted on /".into());
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!("mount path {path:?} has a '.' or '..' component"));
    }
    let norm = format!("/{}", parts.join("/"));
    if let Some(r) = RESERVED
        .iter()
        .find(|r| norm == **r || norm.starts_with(&format!("{r}/")))
    {
        return Err(format!(
            "mount path {path:?} is under {r}, which the guest kernel owns"
        ));
    }
    Ok(())
}

/// Checks a workspace's list of mounts: at most [`MAX_VOLUMES`], no
/// volume or mount point twice.
pub fn validate_mounts(mounts: &[VolumeMount]) -> Result<(), String> {
    if mounts.len() > MAX_VOLUMES {
        return Err(format!(
            "{} volumes (a workspace attaches at most {MAX_VOLUMES})",
            mounts.len()
        ));
    }
    for (i, m) in mounts.iter().enumerate() {
        validate_mount_path(&m.path)?;
        if let Some(o) = mounts[..i].iter().find(|o| o.volume == m.volume) {
            return Err(format!(
                "volume {} is attached twice ({} and {})",
                m.volume, o.path, m.path
            ));
        }
        if let Some(o) = mounts[..i]
            .iter()
            .find(|o| o.path.trim_end_matches('/') == m.path.trim_end_matches('/'))
        {
            return Err(format!(
                "{} and {} are both mounted on {}",
                o.volume, m.volume, m.path
            ));
        }
    }
    Ok(())
}

/// The VM's disks for these mounts, after the workspace's own: chains in
/// each volume's directory, each frozen into its own directory of a
/// snapshot ([`snapshot_dir`]).
pub fn disks(mounts: &[VolumeMount]) -> Vec<crate::vmm::vm::DiskConfig> {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| crate::vmm::vm::DiskConfig {
            path: m.disk.clone(),
            read_only: m.read_only,
            format: crate::vmm::vm::DiskFormat::Chain,
            serial: Some(serial(i)),
            snapshot_dir: Some(snapshot_dir(i)),
        })
        .collect()
}

/// The kernel argument that tells the agent where to mount each volume
/// (`/data,/cache:ro`), if there are any.
pub fn cmdline(mounts: &[VolumeMount]) -> Option<String> {
    (!mounts.is_empty()).then(|| {
        let list: Vec<String> = mounts
            .iter()
            .map(|m| format!("{}{}", m.path, if m.read_only { ":ro" } else { "" }))
            .collect();
        format!("{VOLUMES_KEY}={}", list.join(","))
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub version: u32,
    pub name: String,
    /// Bytes, as the guest sees the disk.
    pub size: u64,
    pub created: String,
    /// `VOLUME:TAG` it was made from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
}

/// How a volume snapshot was made consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// No running workspace had it attached.
    Detached,
    /// Its workspace's guest froze the filesystem (FIFREEZE) for it.
    Frozen,
    /// Its workspace was paused: what the guest had not written yet is
    /// not in it (as after a power cut).
    Paused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSnapshotRecord {
    pub tag: String,
    pub volume: String,
    pub created: String,
    pub consistency: Consistency,
    /// The running workspace it was taken from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

pub fn volumes_root(state_root: &Path) -> PathBuf {
    state_root.join("volumes")
}

#[derive(Debug, Clone)]
pub struct VolumeDir {
    pub name: String,
    pub dir: PathBuf,
}

impl VolumeDir {
    pub fn new(state_root: &Path, name: &str) -> Result<VolumeDir, String> {
        validate_name(name).map_err(|_| {
            format!("invalid volume name {name:?}: use 1-63 lowercase letters, digits and '-', not starting with '-'")
        })?;
        Ok(VolumeDir {
            name: name.to_string(),
            dir: volumes_root(state_root).join(name),
        })
    }

    pub fn record_path(&self) -> PathBuf {
        self.dir.join(VOLUME_RECORD)
    }
    pub fn disk_dir(&self) -> PathBuf {
        self.dir.join("disk")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
    pub fn snapshot(&self, tag: &str) -> PathBuf {
        self.snapshots().join(tag)
    }

    pub fn exists(&self) -> bool {
        self.record_path().is_file()
    }

    pub fn read(&self) -> Result<VolumeRecord, StoreError> {
        read_json(&self.record_path())
    }

    pub fn write(&self, rec: &VolumeRecord) -> Result<(), StoreError> {
        write_json(&self.record_path(), rec)
    }

    /// Tags of its snapshots whose record reads, sorted.
    pub fn snapshot_tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = std::fs::read_dir(self.snapshots())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|t| !t.starts_with('.'))
            .filter(|t| self.snapshot(t).join(VOLUME_SNAPSHOT_RECORD).is_file())
            .collect();
        tags.sort();
        tags
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let bytes = read_bounded(path).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::BadRecord {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("records serialize");
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Names of every volume whose record exists, sorted.
pub fn list(state_root: &Path) -> Vec<String> {
    let root = volumes_root(state_root);
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_name(n).is_ok() && root.join(n).join(VOLUME_RECORD).is_file())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_specs_parse_and_bad_ones_name_the_problem() {
        let m = parse_mount("data:/var/lib/data").unwrap();
        assert_eq!(
            (m.volume.as_str(), m.path.as_str(), m.read_only),
            ("data", "/var/lib/data", false)
        );
        assert!(parse_mount("cache:/c:ro").unwrap().read_only);
        for (bad, why) in [
            ("data", "expected VOLUME:/PATH"),
            ("Data:/x", "invalid volume name"),
            ("data:relative", "must be absolute"),
            ("data:/", "cannot be mounted on /"),
            ("data:/a/../etc", "'..'"),
            ("data:/proc/x", "under /proc"),
            ("data:/dev", "under /dev"),
            ("data:/a b", "must be absolute"),
            ("data:/a,b", "must be absolute"),
        ] {
            let e = parse_mount(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(validate_mount_path("/devices").is_ok());
    }

    #[test]
    fn a_workspace_attaches_each_volume_once_on_distinct_paths() {
        let m = |v: &str, p: &str| parse_mount(&format!("{v}:{p}")).unwrap();
        assert!(validate_mounts(&[m("a", "/a"), m("b", "/b")]).is_ok());
        assert!(validate_mounts(&[m("a", "/a"), m("a", "/b")])
            .unwrap_err()
            .contains("attached twice"));
        assert!(validate_mounts(&[m("a", "/a"), m("b", "/a/")])
            .unwrap_err()
            .contains("both mounted"));
        let five: Vec<_> = (0..5)
            .map(|i| m(&format!("v{i}"), &format!("/v{i}")))
            .collect();
        assert!(validate_mounts(&five).unwrap_err().contains("at most 4"));
        assert_eq!(
            cmdline(&[m("a", "/a"), parse_mount("b:/b:ro").unwrap()]).unwrap(),
            "microagent.volumes=/a,/b:ro"
        );
        assert_eq!(cmdline(&[]), None);
    }
}
