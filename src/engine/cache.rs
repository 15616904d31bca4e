//! The boot cache that warm starts resume, and the shared base disks:
//! list and prune.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::share_pull::{CHUNK_STORE, KERNEL_STORE};
use super::{invalid, Engine, Error, IoContext, Result};
use crate::image::store::ImageStore;
use crate::snapshot::bootcache::{valid_key, BootCache, Entry};
use crate::workspace::base::BaseCache;
use crate::workspace::layout::BOOT_DISK_DIR;

/// What a prune removed.
#[derive(Debug, Clone)]
pub struct Pruned {
    pub removed: Vec<String>,
    /// Base disks no workspace, snapshot or boot snapshot links any more.
    pub bases_removed: u64,
    /// Layer and boot disks no image, workspace or snapshot names any more.
    pub shared_disks_removed: u64,
    pub freed_bytes: u64,
}

impl Engine {
    fn boot_cache(&self) -> BootCache {
        BootCache::new(&self.state.root)
    }

    /// Cached boot snapshots, oldest first.
    pub fn cache_list(&self) -> Vec<Entry> {
        self.boot_cache().list()
    }

    /// Expands key prefixes (at least 8 hex characters, each naming exactly
    /// one entry) to full keys.
    pub fn cache_resolve(&self, wanted: &[String]) -> Result<Vec<String>> {
        let cache = self.boot_cache();
        let keys: Vec<String> = cache.list().into_iter().map(|e| e.key).collect();
        wanted
            .iter()
            .map(|w| {
                if w.len() < 8 || !valid_key(&format!("{w:0<64}")) {
                    return Err(invalid(format!(
                        "boot cache key {w:?}: give at least 8 lowercase hex characters"
                    )));
                }
                let hits: Vec<&String> =
                    keys.iter().filter(|k| k.starts_with(w.as_str())).collect();
                match hits.as_slice() {
                    [one] => Ok((*one).clone()),
                    [] => Err(Error::NotFound {
                        kind: "boot snapshot",
                        name: w.clone(),
                    }),
                    _ => Err(invalid(format!("boot cache key prefix {w} is ambiguous"))),
                }
            })
            .collect()
    }

    /// Removes the given entries (full keys; all when empty) and leftovers;
    /// a full prune also removes the base disks nothing uses any more.
    pub fn cache_prune(&self, keys: &[String]) -> Result<Pruned> {
        let cache = self.boot_cache();
        let (removed, mut freed_bytes) = cache
            .prune(keys)
            .io_ctx(|| format!("pruning {}", cache.root.display()))?;
        let mut bases_removed = 0;
        let mut shared_disks_removed = 0;
        if keys.is_empty() {
            let bases = BaseCache::new(&self.state.root);
            let p = bases
                .prune()
                .io_ctx(|| format!("pruning {}", bases.dir.display()))?;
            bases_removed = p.bases;
            freed_bytes += p.bytes;
            let (n, bytes) = self.prune_shared_disks()?;
            shared_disks_removed = n;
            freed_bytes += bytes;
        }
        Ok(Pruned {
            removed,
            bases_removed,
            shared_disks_removed,
            freed_bytes,
        })
    }

    /// Removes layer disks that no image, workspace or snapshot names, boot
    /// disks that no workspace or snapshot names (the current agent's is
    /// rebuilt by the next create), pulled kernels no workspace boots, and
    /// the chunk store (a transfer cache: pulled snapshots hold their own
    /// files). Boot snapshots were removed first.
    fn prune_shared_disks(&self) -> Result<(u64, u64)> {
        let images = ImageStore::new(&self.state.root);
        // Under the store lock: no build or removal runs meanwhile.
        let _lock = images.lock()?;
        let refs = super::references::collect(&self.state)?;
        let mut wanted: HashSet<String> = refs.layers;
        for rec in images.records()? {
            wanted.extend(rec.layer_disks.iter().map(|k| k.to_string()));
        }
        let mut removed = (0, 0);
        let mut sweep = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Result<()> {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return Ok(());
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let shared = name.ends_with(".erofs") || name.ends_with(".vmlinux");
                if !shared || keep(&name) {
                    continue;
                }
                let bytes = e.metadata().map_or(0, |m| m.blocks() * 512);
                std::fs::remove_file(e.path())
                    .io_ctx(|| format!("removing {}", e.path().display()))?;
                removed.0 += 1;
                removed.1 += bytes;
            }
            Ok(())
        };
        sweep(&images.layers_dir(), &|name| {
            let hex = name.trim_end_matches(".erofs");
            wanted.contains(&format!("sha256:{hex}"))
        })?;
        sweep(&self.state.root.join(BOOT_DISK_DIR), &|name| {
            refs.boot_disks.contains(name)
        })?;
        let kernels = self.state.root.join(KERNEL_STORE);
        sweep(&kernels, &|name| {
            refs.kernels
                .contains(&kernels.join(name).display().to_string())
        })?;
        let chunks = self.state.root.join(CHUNK_STORE);
        if chunks.exists() {
            removed.1 += crate::disk::allocated_bytes(&chunks.join("blobs/sha256"));
            std::fs::remove_dir_all(&chunks).io_ctx(|| format!("removing {}", chunks.display()))?;
        }
        Ok(removed)
    }
}
