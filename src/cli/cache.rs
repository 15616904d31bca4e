//! `cache ls|prune`: the boot snapshots that warm starts resume (see
//! engine::warm and snapshot::bootcache).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{human_size, Out};
use crate::engine::Engine;

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

pub fn run(engine: &Engine, cmd: CacheCommand, out: &Out) -> Result<i32> {
    match cmd {
        CacheCommand::Ls => ls(engine, out),
        CacheCommand::Prune(a) => prune(engine, a, out),
    }
}

fn ls(engine: &Engine, out: &Out) -> Result<i32> {
    let entries = engine.cache_list();
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

fn prune(engine: &Engine, args: PruneArgs, out: &Out) -> Result<i32> {
    let keys = engine.cache_resolve(&args.keys)?;
    let what = if args.keys.is_empty() {
        "cache prune removes every cached boot snapshot".to_string()
    } else {
        format!("cache prune removes {} boot snapshot(s)", keys.len())
    };
    super::confirm::confirm(&what, args.yes)?;
    let p = engine.cache_prune(&keys)?;
    out.done(
        &format!(
            "removed {} boot snapshot(s), {} unused base disk(s) and {} unused layer or boot disk(s), freed {}",
            p.removed.len(),
            p.bases_removed,
            p.shared_disks_removed,
            human_size(p.freed_bytes)
        ),
        json!({"removed": p.removed, "bases_removed": p.bases_removed, "shared_disks_removed": p.shared_disks_removed, "freed_bytes": p.freed_bytes}),
    );
    Ok(0)
}
