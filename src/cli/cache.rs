//! `cache ls|prune`: the boot snapshots that warm starts resume (see
//! cli::warm and workspace::bootcache).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::Out;
use super::snapshot::human_size;
use crate::workspace::bootcache::{valid_key, BootCache};
use crate::workspace::store::StateDir;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List cached boot snapshots with their keys and sizes.
    #[command(alias = "list")]
    Ls,
    /// Remove cached boot snapshots (all, or the given keys or key
    /// prefixes); the next first start of such a workspace cold-boots.
    Prune(PruneArgs),
}

#[derive(Args)]
pub struct PruneArgs {
    /// Keys (or unique prefixes of at least 8 characters) to remove; none: all.
    keys: Vec<String>,
    /// Confirm (asked on a terminal; refused without one).
    #[arg(long, short)]
    yes: bool,
}

pub fn run(state: &StateDir, cmd: CacheCommand, out: &Out) -> Result<i32> {
    let cache = BootCache::new(&state.root);
    match cmd {
        CacheCommand::Ls => ls(&cache, out),
        CacheCommand::Prune(a) => prune(&cache, a, out),
    }
}

fn ls(cache: &BootCache, out: &Out) -> Result<i32> {
    let entries = cache.list();
    if out.json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({
                    "key": e.key,
                    "size_bytes": e.size_bytes,
                    "created": e.manifest.created,
                    "image": e.manifest.image,
                    "vcpus": e.manifest.vcpus,
                    "memory_mib": e.manifest.memory_mib,
                    "kernel_sha256": e.manifest.kernel_sha256,
                    "dir": e.dir.display().to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    if out.quiet {
        return Ok(0);
    }
    println!(
        "{:<14} {:>9} {:<21} {:>5} {:>7}  IMAGE",
        "KEY", "SIZE", "CREATED", "VCPUS", "MEMORY"
    );
    for e in &entries {
        println!(
            "{:<14} {:>9} {:<21} {:>5} {:>6}M  {}",
            &e.key[..12],
            human_size(e.size_bytes),
            e.manifest.created,
            e.manifest.vcpus,
            e.manifest.memory_mib,
            e.manifest.image.as_deref().unwrap_or("(rootfs file)")
        );
    }
    Ok(0)
}

/// Expands prefixes to full keys; a prefix must name exactly one entry.
fn resolve(cache: &BootCache, wanted: &[String]) -> Result<Vec<String>> {
    let keys: Vec<String> = cache.list().into_iter().map(|e| e.key).collect();
    wanted
        .iter()
        .map(|w| {
            if w.len() < 8 || !valid_key(&format!("{w:0<64}")) {
                bail!("boot cache key {w:?}: give at least 8 lowercase hex characters");
            }
            let hits: Vec<&String> = keys.iter().filter(|k| k.starts_with(w.as_str())).collect();
            match hits.as_slice() {
                [one] => Ok((*one).clone()),
                [] => bail!("no boot snapshot with key {w} in {}", cache.root.display()),
                _ => bail!("boot cache key prefix {w} is ambiguous"),
            }
        })
        .collect()
}

fn prune(cache: &BootCache, args: PruneArgs, out: &Out) -> Result<i32> {
    let keys = resolve(cache, &args.keys)?;
    let what = if args.keys.is_empty() {
        "cache prune removes every cached boot snapshot".to_string()
    } else {
        format!("cache prune removes {} boot snapshot(s)", keys.len())
    };
    super::confirm::confirm(&what, args.yes)?;
    let (removed, freed) = cache.prune(&keys)?;
    out.done(
        &format!(
            "removed {} boot snapshot(s), freed {}",
            removed.len(),
            human_size(freed)
        ),
        json!({"removed": removed, "freed_bytes": freed}),
    );
    Ok(0)
}
