//! The boot cache that warm starts resume: list and prune.

use super::{invalid, Engine, Error, IoContext, Result};
use crate::snapshot::bootcache::{valid_key, BootCache, Entry};

/// What a prune removed.
#[derive(Debug, Clone)]
pub struct Pruned {
    pub removed: Vec<String>,
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

    /// Removes the given entries (full keys; all when empty) and leftovers.
    pub fn cache_prune(&self, keys: &[String]) -> Result<Pruned> {
        let cache = self.boot_cache();
        let (removed, freed_bytes) = cache
            .prune(keys)
            .io_ctx(|| format!("pruning {}", cache.root.display()))?;
        Ok(Pruned {
            removed,
            freed_bytes,
        })
    }
}
