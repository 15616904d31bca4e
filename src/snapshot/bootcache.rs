//! The boot snapshot cache: one snapshot of a freshly booted guest per boot
//! key, from which later first starts of equal workspaces resume instead of
//! booting (see engine::warm).
//!
//! `<state>/cache/boot/<key>/` holds a snapshot in the usual format
//! (manifest.json, vmstate.bin, memory.bin, disk/). Entries are
//! assembled under a temp name and renamed into place, like snapshots.
//! Users of an entry hold `.lock` shared; `cache prune` holds it exclusive.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, MANIFEST};
use crate::util::lock::{FileLock, LockError};

/// Bump when what a boot snapshot holds changes meaning.
// 3: layered disks (boot disk, layer disks, upper) replaced one root disk.
const KEY_VERSION: &str = "microagent boot key 3";

/// Everything a first boot depends on. Two workspaces with equal inputs
/// boot to the same state, except for their identity (hostname,
/// machine-id, RNG), which every start refreshes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInputs<'a> {
    pub kernel_sha256: &'a str,
    /// The image's manifest digest, or the sha256 of a --rootfs file's content.
    pub disk_source: &'a str,
    /// The workspace's root disk size (the image's disk grown to it).
    pub disk_bytes: u64,
    pub agent_sha256: &'a str,
    /// sha256 of the entrypoint spec written into the disk, if any.
    pub entrypoint_sha256: Option<&'a str>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cmdline: &'a str,
    pub init: Option<&'a str>,
    pub cpu_template: &'a str,
    /// `user` or `none`: whether the guest has a NIC.
    pub network: &'a str,
}

impl BootInputs<'_> {
    /// sha256 over a line per input: unambiguous, and readable when debugging.
    pub fn key(&self) -> String {
        let text = format!(
            "{KEY_VERSION}\nkernel {}\ndisk {}\ndisk-bytes {}\nagent {}\nentrypoint {}\nvcpus {}\nmemory-mib {}\ncmdline {:?}\ninit {:?}\ncpu-template {}\nnetwork {}\n",
            self.kernel_sha256,
            self.disk_source,
            self.disk_bytes,
            self.agent_sha256,
            self.entrypoint_sha256.unwrap_or("-"),
            self.vcpus,
            self.memory_mib,
            self.cmdline,
            self.init,
            self.cpu_template,
            self.network,
        );
        crate::digest::hex(&Sha256::digest(text.as_bytes()))
    }
}

/// A boot key is a lowercase sha256; anything else never names an entry
/// (keys come from workspace.json and the command line).
pub fn valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub struct BootCache {
    pub root: PathBuf,
}

/// One cached boot snapshot, as `cache ls` shows it.
pub struct Entry {
    pub key: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub size_bytes: u64,
}

impl BootCache {
    /// `$MICROAGENT_BOOT_CACHE` if set (lets several state directories,
    /// such as the test suite's, share boots), else `<state>/cache/boot`.
    pub fn new(state_root: &Path) -> BootCache {
        let root = std::env::var_os("MICROAGENT_BOOT_CACHE")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| state_root.join("cache/boot"));
        BootCache { root }
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The entry for `key` if one is complete (its manifest is written last).
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let dir = self.entry_dir(key);
        (valid_key(key) && dir.join(MANIFEST).is_file()).then_some(dir)
    }

    fn lock(&self, exclusive: bool) -> Result<FileLock, LockError> {
        let _ = std::fs::create_dir_all(&self.root);
        let path = self.root.join(".lock");
        if exclusive {
            FileLock::acquire(&path)
        } else {
            FileLock::acquire_shared(&path)
        }
    }

    /// Held while an entry is read or written: prune waits for it.
    pub fn use_lock(&self) -> Result<FileLock, LockError> {
        self.lock(false)
    }

    /// A fresh temp directory for a new entry, inside the cache so the
    /// final rename stays on one filesystem.
    pub fn temp_dir(&self, key: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.root)?;
        let dir = self
            .root
            .join(format!(".tmp-{}-{}", &key[..12], std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// Moves a finished temp directory into place. Returns false (and
    /// removes `tmp`) when another start cached the same key first.
    pub fn commit(&self, tmp: &Path, key: &str) -> std::io::Result<bool> {
        let dest = self.entry_dir(key);
        if dest.exists() {
            let _ = std::fs::remove_dir_all(tmp);
            return Ok(false);
        }
        match std::fs::rename(tmp, &dest) {
            Ok(()) => Ok(true),
            Err(_) if dest.exists() => {
                let _ = std::fs::remove_dir_all(tmp);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes an entry (renamed away first, so it vanishes at once).
    pub fn remove(&self, key: &str) -> std::io::Result<()> {
        let dir = self.entry_dir(key);
        let doomed = self
            .root
            .join(format!(".deleting-{}-{}", &key[..12], std::process::id()));
        std::fs::rename(&dir, &doomed)?;
        std::fs::remove_dir_all(&doomed)
    }

    pub fn list(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for e in entries.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            if !valid_key(&key) {
                continue;
            }
            let Ok(manifest) = Manifest::read(&e.path()) else {
                continue;
            };
            out.push(Entry {
                size_bytes: entry_size(&e.path()),
                key,
                dir: e.path(),
                manifest,
            });
        }
        out.sort_by(|a, b| a.manifest.created.cmp(&b.manifest.created));
        out
    }

    /// Removes every entry whose key is in `keys` (all when `keys` is
    /// empty) and any temp directory left by a killed start. Waits for
    /// starts that are using the cache. Returns (removed keys, bytes freed).
    pub fn prune(&self, keys: &[String]) -> std::io::Result<(Vec<String>, u64)> {
        let _lock = self.lock(true).map_err(|e| e.source)?;
        let mut removed = Vec::new();
        let mut freed = 0;
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok((removed, 0));
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with(".tmp-") || name.starts_with(".deleting-");
            let wanted = valid_key(&name) && (keys.is_empty() || keys.contains(&name));
            if !(leftover || wanted) {
                continue;
            }
            freed += entry_size(&e.path());
            std::fs::remove_dir_all(e.path())?;
            if wanted {
                removed.push(name);
            }
        }
        Ok((removed, freed))
    }
}

/// Allocated bytes of an entry's own files (see `manifest::own_bytes`).
fn entry_size(dir: &Path) -> u64 {
    super::manifest::own_bytes(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> BootInputs<'static> {
        BootInputs {
            kernel_sha256: "k1",
            disk_source: "sha256:img",
            disk_bytes: 1 << 30,
            agent_sha256: "a1",
            entrypoint_sha256: None,
            vcpus: 1,
            memory_mib: 256,
            cmdline: "quiet root=/dev/vda rw",
            init: None,
            cpu_template: "pvm-safe",
            network: "user",
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = inputs().key();
        assert!(valid_key(&base));
        assert_eq!(base, inputs().key(), "the key is deterministic");
        let variants = [
            BootInputs {
                kernel_sha256: "k2",
                ..inputs()
            },
            BootInputs {
                disk_source: "sha256:other",
                ..inputs()
            },
            BootInputs {
                disk_bytes: 2 << 30,
                ..inputs()
            },
            BootInputs {
                agent_sha256: "a2",
                ..inputs()
            },
            BootInputs {
                entrypoint_sha256: Some("e"),
                ..inputs()
            },
            BootInputs {
                vcpus: 2,
                ..inputs()
            },
            BootInputs {
                memory_mib: 512,
                ..inputs()
            },
            BootInputs {
                cmdline: "quiet root=/dev/vda ro",
                ..inputs()
            },
            BootInputs {
                init: Some("/sbin/init"),
                ..inputs()
            },
            BootInputs {
                cpu_template: "host",
                ..inputs()
            },
        ];
        let mut keys: Vec<String> = variants.iter().map(|v| v.key()).collect();
        assert!(keys.iter().all(|k| *k != base));
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), variants.len(), "no two inputs collide");
    }

    #[test]
    fn keys_are_validated_before_naming_paths() {
        assert!(!valid_key("../etc"));
        assert!(!valid_key(&"A".repeat(64)));
        assert!(!valid_key(&"a".repeat(63)));
        let c = BootCache {
            root: PathBuf::from("/nonexistent"),
        };
        assert!(c.lookup("..").is_none());
    }
}
