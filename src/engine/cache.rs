//! The boot cache that warm starts resume, and the shared base disks:
//! list and prune.

use super::{invalid, Engine, Error, IoContext, Result};
use crate::snapshot::bootcache::{valid_key, BootCache, Entry};
use crate::workspace::base::BaseCache;

/// What a prune removed.
#[derive(Debug, Clone)]
pub struct Pruned {
    pub removed: Vec<String>,
    /// Base disks no workspace, snapshot or boot snapshot links any more.
    pub bases_removed: u64,
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
        if keys.is_empty() {
            let bases = BaseCache::new(&self.state.root);
            let p = bases
                .prune()
                .io_ctx(|| format!("pruning {}", bases.dir.display()))?;
            bases_removed = p.bases;
            freed_bytes += p.bytes;
        }
        Ok(Pruned {
            removed,
            bases_removed,
            freed_bytes,
        })
    }
}
