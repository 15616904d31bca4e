//! Built base disks, shared read-only by every workspace made from the same
//! inputs: an empty upper of a size with an entrypoint spec beside it (image
//! workspaces), or a rootfs file's content grown to size; built once and then only
//! hard-linked into each new workspace's chain. A base is in use while any
//! chain links it, so the link count tells `cache prune` which are free.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::util::fs::{read_bounded, write_atomic};

/// What a base is built from; its hash names the base.
pub struct BaseInputs<'a> {
    /// The image's manifest digest, or `sha256:` of a rootfs file's content.
    pub source: &'a str,
    pub agent_sha256: &'a str,
    pub entrypoint_sha256: Option<&'a str>,
    pub size: Option<u64>,
}

impl BaseInputs<'_> {
    pub fn key(&self) -> String {
        let text = format!(
            "microagent base 2\nsource {}\nagent {}\nentrypoint {}\nsize {}\n",
            self.source,
            self.agent_sha256,
            self.entrypoint_sha256.unwrap_or("-"),
            self.size.map_or("-".to_string(), |s| s.to_string()),
        );
        crate::digest::sha256_bytes(text.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("base disk cache {path}: {source}")]
pub struct BaseError {
    pub path: String,
    pub source: std::io::Error,
}

pub struct BaseCache {
    pub dir: PathBuf,
}

/// What `prune` freed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pruned {
    pub bases: u64,
    pub bytes: u64,
}

impl BaseCache {
    pub fn new(state_root: &Path) -> BaseCache {
        BaseCache {
            dir: state_root.join("cache/bases"),
        }
    }

    fn image(&self, key: &str) -> PathBuf {
        self.dir.join(format!("base-{key}.img"))
    }

    fn digest_file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("base-{key}.sha256"))
    }

    /// The base for `key` and its content sha256, built by `build` (given
    /// a new path to write the disk to) if it is not there yet. Builds of
    /// the same key may race: each writes its own file, and the last
    /// rename wins with equal content.
    pub fn get_or_build<E: From<BaseError>>(
        &self,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(PathBuf, String), E> {
        let image = self.image(key);
        if let Some(sha) = self.digest(key).filter(|_| image.is_file()) {
            return Ok((image, sha));
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let err = |source| BaseError {
            path: self.dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!(
            ".building-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let finish = || -> std::io::Result<String> {
            let sha = crate::disk::file_sha256(&tmp, 4096)?;
            let f = std::fs::File::open(&tmp)?;
            f.sync_all()?;
            // Shared by every workspace of these inputs: nobody writes it.
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
            std::fs::rename(&tmp, &image)?;
            write_atomic(&self.digest_file(key), sha.as_bytes())?;
            Ok(sha)
        };
        let result = build(&tmp).and_then(|()| finish().map_err(|e| err(e).into()));
        match result {
            Ok(sha) => Ok((image, sha)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn digest(&self, key: &str) -> Option<String> {
        let bytes = read_bounded(&self.digest_file(key)).ok()?;
        let sha = String::from_utf8(bytes).ok()?;
        (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then_some(sha)
    }

    /// Removes the bases no chain links any more (link count 1: only the
    /// cache's own name), and builds a crash left behind.
    pub fn prune(&self) -> std::io::Result<Pruned> {
        let mut pruned = Pruned::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(pruned);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            let stale_build = name.starts_with(".building-")
                && !Path::new(&format!("/proc/{}", build_pid(&name))).exists();
            let unused = name.ends_with(".img") && meta.nlink() == 1;
            if stale_build || unused {
                std::fs::remove_file(e.path())?;
                if let Some(key) = name
                    .strip_prefix("base-")
                    .and_then(|n| n.strip_suffix(".img"))
                {
                    let _ = std::fs::remove_file(self.digest_file(key));
                }
                pruned.bases += 1;
                pruned.bytes += meta.blocks() * 512;
            }
        }
        Ok(pruned)
    }
}

fn build_pid(name: &str) -> String {
    name.trim_start_matches(".building-")
        .split('-')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_and_prunes_only_what_no_chain_links() {
        let root = tempfile::tempdir().unwrap();
        let cache = BaseCache::new(root.path());
        let inputs = BaseInputs {
            source: "sha256:abc",
            agent_sha256: "def",
            entrypoint_sha256: None,
            size: Some(8192),
        };
        let key = inputs.key();
        let mut builds = 0;
        for _ in 0..2 {
            let (path, sha) = cache
                .get_or_build::<BaseError>(&key, |p| {
                    builds += 1;
                    std::fs::write(p, vec![7u8; 8192]).map_err(|source| BaseError {
                        path: "test".into(),
                        source,
                    })
                })
                .unwrap();
            assert_eq!(sha.len(), 64);
            assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8192]);
        }
        assert_eq!(builds, 1);
        let (path, _) = cache
            .get_or_build::<BaseError>(&key, |_| unreachable!())
            .unwrap();
        let link = root.path().join("ws-base");
        std::fs::hard_link(&path, &link).unwrap();
        assert_eq!(cache.prune().unwrap().bases, 0, "a chain still links it");
        std::fs::remove_file(&link).unwrap();
        assert_eq!(cache.prune().unwrap().bases, 1);
        assert!(!path.exists());
    }
}
