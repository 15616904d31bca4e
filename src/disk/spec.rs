//! `chain.json`: what a disk chain is made of. It sits beside the files it
//! names, in the directory that holds them (a workspace's `disk/`, or a
//! snapshot's), and names only plain files in that directory. It is read
//! back from snapshots, so it is validated as untrusted input.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util::fs::{read_bounded, write_atomic};

pub const CHAIN_FILE: &str = "chain.json";
pub const SPEC_VERSION: u32 = 1;
/// Deltas a chain may hold. Chains deeper than [`MERGE_DEPTH`] are merged
/// when a workspace is started from them; this is the limit on what is
/// read back at all.
pub const MAX_DELTAS: usize = 255;
/// Above this many deltas, a new chain made from a snapshot first merges
/// them into one (see `chain::instantiate`).
pub const MERGE_DEPTH: usize = 16;
const MAX_SIZE: u64 = 16 << 40;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid disk chain: {reason}")]
    Bad { path: String, reason: String },
}

/// A disk: `base`, then `deltas` oldest first, then the writable `top`
/// (none in a snapshot, whose chain is frozen). A block is read from the
/// newest file that holds it; a delta holds exactly its allocated blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSpec {
    pub version: u32,
    /// The disk's size in bytes, as the guest sees it.
    pub size: u64,
    /// Copy-on-write granularity in bytes: at least the host filesystem's
    /// block, so an allocated extent never covers part of a block.
    pub block_size: u32,
    pub base: String,
    pub deltas: Vec<String>,
    pub top: Option<String>,
    /// Content sha256 of files already hashed (the base when it was built,
    /// deltas when a snapshot froze them): immutable files are hashed once.
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}

/// A name a chain may give one of its files: plain, in its own directory.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name != CHAIN_FILE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ChainSpec {
    /// Every file of the chain, base first.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.base.as_str())
            .chain(self.deltas.iter().map(String::as_str))
            .chain(self.top.as_deref())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.version != SPEC_VERSION {
            return Err(format!(
                "version {} (this build reads {SPEC_VERSION})",
                self.version
            ));
        }
        if self.size == 0 || self.size % 512 != 0 || self.size > MAX_SIZE {
            return Err(format!(
                "size {} is not a positive multiple of 512 up to 16 TiB",
                self.size
            ));
        }
        if !self.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&self.block_size) {
            return Err(format!(
                "block size {} is not a power of two from 4 KiB to 1 MiB",
                self.block_size
            ));
        }
        if self.deltas.len() > MAX_DELTAS {
            return Err(format!(
                "{} deltas (at most {MAX_DELTAS})",
                self.deltas.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for name in self.files() {
            if !valid_name(name) {
                return Err(format!("file name {name:?} is not a plain file name"));
            }
            if !seen.insert(name) {
                return Err(format!("file {name} is named twice"));
            }
        }
        for (name, digest) in &self.digests {
            if !seen.contains(name.as_str()) {
                return Err(format!("digest for {name:?}, which is not in the chain"));
            }
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("digest of {name} is not a sha256: {digest:?}"));
            }
        }
        Ok(())
    }

    pub fn read(dir: &Path) -> Result<ChainSpec, SpecError> {
        let path = dir.join(CHAIN_FILE);
        let bad = |reason: String| SpecError::Bad {
            path: path.display().to_string(),
            reason,
        };
        let bytes = read_bounded(&path).map_err(|source| SpecError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let spec: ChainSpec = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        spec.validate().map_err(bad)?;
        Ok(spec)
    }

    /// Replaces `dir/chain.json` atomically and durably.
    pub fn write(&self, dir: &Path) -> Result<(), SpecError> {
        self.write_to(dir, true)
    }

    /// Like [`ChainSpec::write`], without waiting for the disk (a crash
    /// may keep the previous `chain.json`): for a paused guest, whose
    /// chain is made durable before anything depends on it.
    pub fn write_unsynced(&self, dir: &Path) -> Result<(), SpecError> {
        self.write_to(dir, false)
    }

    fn write_to(&self, dir: &Path, sync: bool) -> Result<(), SpecError> {
        let path = dir.join(CHAIN_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| SpecError::Bad {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let written = if sync {
            write_atomic(&path, &json)
        } else {
            crate::util::fs::write_atomic_unsynced(&path, &json)
        };
        written.map_err(|source| SpecError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ChainSpec {
        ChainSpec {
            version: SPEC_VERSION,
            size: 1 << 20,
            block_size: 4096,
            base: "base.ext4".into(),
            deltas: vec!["d1.delta".into()],
            top: Some("d2.delta".into()),
            digests: BTreeMap::new(),
        }
    }

    #[test]
    fn refuses_paths_duplicates_and_odd_sizes() {
        assert_eq!(spec().validate(), Ok(()));
        for name in ["../x", "a/b", ".hidden", "", "chain.json", "a b"] {
            let mut s = spec();
            s.deltas[0] = name.into();
            assert!(s.validate().is_err(), "{name:?} accepted");
        }
        let mut s = spec();
        s.top = Some("d1.delta".into());
        assert!(s.validate().unwrap_err().contains("twice"));
        let mut s = spec();
        s.size = 1000;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.block_size = 512;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.digests.insert("other".into(), "0".repeat(64));
        assert!(s.validate().is_err());
    }

    #[test]
    fn round_trips_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        spec().write(dir.path()).unwrap();
        assert_eq!(ChainSpec::read(dir.path()).unwrap(), spec());
        let mut v = serde_json::to_value(spec()).unwrap();
        v["extra"] = 1.into();
        std::fs::write(dir.path().join(CHAIN_FILE), v.to_string()).unwrap();
        let e = ChainSpec::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("extra") && e.contains("chain.json"), "{e}");
    }
}
