//! The state directory and workspace records (`workspace.json`).
//!
//! Layout (DESIGN.md): `<home>/workspaces/<name>/{workspace.json,
//! rootfs.ext4, console.log, control.sock, vmm.log, vmm-exit.json, lock}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::Status;

/// Records larger than this are not ours: refuse instead of parsing them.
pub use crate::util::fs::read_bounded;
#[cfg(test)]
use crate::util::fs::MAX_RECORD_BYTES;
pub use crate::util::time::{now_rfc3339, rfc3339};
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid workspace name {0:?}: use 1-63 lowercase letters, digits and '-', not starting with '-'")]
    InvalidName(String),
    #[error("workspace {0} does not exist")]
    NotFound(String),
    #[error("workspace {0} already exists")]
    Exists(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid workspace record: {reason}")]
    BadRecord { path: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_string()))
    }
}

/// What `workspace.json` holds. The status here is the last one a CLI
/// command recorded; `state::effective_status` reconciles it with the VMM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkspaceRecord {
    pub version: u32,
    pub name: String,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    /// The image's run settings (env, working dir, user, entrypoint): the
    /// defaults of exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<crate::image::config::RunConfig>,
    /// Where the root disk came from when not from an image.
    pub rootfs_source: Option<String>,
    /// The boot and layer disks beside the workspace's own chain (none:
    /// made before layered disks, one root disk with the agent inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<super::layout::DiskLayout>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: String,
    pub kernel_sha256: String,
    /// Guest arguments appended to the VMM's own.
    pub cmdline: String,
    /// Program the agent starts at boot (the image's init/entrypoint).
    #[serde(default)]
    pub init: Option<String>,
    pub cpu_template: String,
    /// `user` (a NIC behind its own passt) or `none`. Records written
    /// before networking existed have none, which keeps their snapshots'
    /// device set.
    #[serde(default)]
    pub network: NetworkMode,
    /// TCP ports published on the host (never inherited by forks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::devices::virtio::net::config::PortMap>,
    /// What a boot of this workspace's first start depends on (see
    /// snapshot::bootcache); workspaces with equal keys boot identically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_key: Option<String>,
    pub created: String,
    pub status: Status,
    /// Supervisor process of the running VMM, if any.
    pub vmm_pid: Option<i32>,
    /// Why the workspace is crashed, when it is.
    pub crash_reason: Option<String>,
    /// Halt takes a memory snapshot tagged `auto-<UTC>` first (records
    /// from before this setting existed get the default, on).
    #[serde(default = "auto_snapshot_default")]
    pub auto_snapshot_on_stop: bool,
    /// How many `auto-` snapshots halt keeps; the oldest go first.
    #[serde(default = "max_snapshots_default")]
    pub max_snapshots: u32,
    /// While it runs: the snapshot (or boot-cache entry) whose memory the
    /// guest's RAM equalled at its last save or restore, which its next
    /// snapshot may be a diff over. None after a cold boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_base: Option<std::path::PathBuf>,
    /// Volumes it attaches, in disk order (fixed at create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<super::volume::VolumeMount>,
}

fn auto_snapshot_default() -> bool {
    true
}

pub const MAX_SNAPSHOTS_DEFAULT: u32 = 5;
/// More would only be a typo: each one holds the guest's memory.
pub const MAX_SNAPSHOTS_LIMIT: u32 = 1000;

fn max_snapshots_default() -> u32 {
    MAX_SNAPSHOTS_DEFAULT
}

/// A workspace's network.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// User-mode networking through a per-VM passt.
    User,
    /// Loopback only.
    #[default]
    None,
}

impl NetworkMode {
    pub fn name(self) -> &'static str {
        match self {
            NetworkMode::User => "user",
            NetworkMode::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// Remembered sha256 of kernels and agents (`digest::sha256_file_cached`).
    pub fn hash_cache(&self) -> PathBuf {
        self.root.join("cache/hashes")
    }

    /// `$MICROAGENT_HOME`, else /var/lib/microagent for root, else
    /// `$XDG_DATA_HOME/microagent` (or ~/.local/share/microagent).
    pub fn from_env() -> StateDir {
        if let Some(h) = std::env::var_os("MICROAGENT_HOME").filter(|h| !h.is_empty()) {
            return StateDir { root: h.into() };
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return StateDir {
                root: "/var/lib/microagent".into(),
            };
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share")
            });
        StateDir {
            root: data.join("microagent"),
        }
    }

    pub fn workspaces(&self) -> PathBuf {
        self.root.join("workspaces")
    }

    pub fn workspace(&self, name: &str) -> Result<WorkspaceDir, StoreError> {
        validate_name(name)?;
        Ok(WorkspaceDir {
            name: name.to_string(),
            dir: self.workspaces().join(name),
        })
    }

    /// An existing workspace, or NotFound.
    pub fn existing(&self, name: &str) -> Result<WorkspaceDir, StoreError> {
        let ws = self.workspace(name)?;
        if !ws.record_path().is_file() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(ws)
    }

    /// Names of all workspaces, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.workspaces();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok())
            .filter(|n| dir.join(n).join("workspace.json").is_file())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[derive(Debug, Clone)]
pub struct WorkspaceDir {
    pub name: String,
    pub dir: PathBuf,
}

impl WorkspaceDir {
    pub fn record_path(&self) -> PathBuf {
        self.dir.join("workspace.json")
    }
    /// The root disk's copy-on-write chain (see `workspace::disk`).
    pub fn disk_dir(&self) -> PathBuf {
        self.dir.join("disk")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// Host end of the guest's vsock (`CONNECT <port>` protocol).
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("vmm-exit.json")
    }
    /// Where the running VMM's resource limits are (`vmm::cgroup`).
    pub fn limits_record(&self) -> PathBuf {
        self.dir.join("limits.json")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub fn read(&self) -> Result<WorkspaceRecord, StoreError> {
        let path = self.record_path();
        let bytes = read_bounded(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(self.name.clone()),
            _ => io_err(&path)(e),
        })?;
        let rec: WorkspaceRecord =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadRecord {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if rec.version != RECORD_VERSION || rec.name != self.name {
            return Err(StoreError::BadRecord {
                path: path.display().to_string(),
                reason: format!("version {} name {:?}", rec.version, rec.name),
            });
        }
        Ok(rec)
    }

    pub fn write(&self, rec: &WorkspaceRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(rec).map_err(|e| StoreError::BadRecord {
            path: self.record_path().display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.record_path(), &json)
    }
}

/// Temp file in the same directory, fsync, rename, fsync the directory:
/// readers see the old content or the new, never half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    crate::util::fs::write_atomic(path, data).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        for ok in ["builder", "builder-fork", "a", "0", &"x".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Builder",
            "a_b",
            "-a",
            "a/b",
            "..",
            "a.b",
            &"x".repeat(64),
            "caf\u{e9}",
        ] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid workspace name"), "{bad}: {err}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_781_167_964), "2026-06-11T08:52:44Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn records_round_trip_atomically_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir {
            root: dir.path().to_path_buf(),
        };
        let ws = state.workspace("demo").unwrap();
        std::fs::create_dir_all(&ws.dir).unwrap();
        let rec = WorkspaceRecord {
            version: RECORD_VERSION,
            name: "demo".into(),
            image: None,
            image_digest: None,
            image_config: None,
            rootfs_source: Some("/tmp/r.ext4".into()),
            layout: None,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k".into(),
            kernel_sha256: "ab".into(),
            cmdline: "quiet".into(),
            init: None,
            cpu_template: "host".into(),
            network: NetworkMode::User,
            ports: vec![],
            boot_key: None,
            created: now_rfc3339(),
            status: Status::Created,
            vmm_pid: None,
            crash_reason: None,
            auto_snapshot_on_stop: true,
            max_snapshots: 5,
            memory_base: None,
            volumes: vec![],
        };
        ws.write(&rec).unwrap();
        assert_eq!(ws.read().unwrap(), rec);
        assert_eq!(state.list().unwrap(), vec!["demo".to_string()]);
        std::fs::write(ws.record_path(), b"{not json").unwrap();
        assert!(ws
            .read()
            .unwrap_err()
            .to_string()
            .contains("not a valid workspace record"));
        std::fs::write(
            ws.record_path(),
            vec![b' '; (MAX_RECORD_BYTES + 10) as usize],
        )
        .unwrap();
        assert!(ws.read().is_err());
        assert!(matches!(
            state.existing("nope"),
            Err(StoreError::NotFound(_))
        ));
    }
}
