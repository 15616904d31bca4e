//! `checkpoint`: run a setup once per set of inputs and fork from its
//! snapshot (see engine::checkpoint).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::image::RegistryArgs;
use super::output::Out;
use crate::engine::checkpoint::{CheckpointOptions, TAG};
use crate::engine::Engine;
use crate::workspace::store::NetworkMode;

#[derive(Args)]
pub struct CheckpointArgs {
    /// Checkpoint name; its snapshots live in workspaces NAME-<key>.
    name: String,
    /// OCI image the setup runs in (pulled when not in the local store).
    #[arg(long)]
    image: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// A host file the setup needs: copied into --workdir before the setup
    /// runs, and its content is part of the key (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Fork a new workspace NEW from the checkpoint (hit or miss).
    #[arg(long, value_name = "NEW")]
    fork: Option<String>,
    /// Keep this many checkpoints of NAME (the newest); older ones are
    /// deleted after a miss.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    #[arg(long, value_enum, default_value_t = NetworkMode::User)]
    network: NetworkMode,
    /// Guest kernel (default as for `create`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Directory in the guest where the files land and the setup runs.
    #[arg(long, default_value = "/work")]
    workdir: String,
    /// The setup command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn checkpoint(engine: &Engine, args: CheckpointArgs, out: &Out) -> Result<i32> {
    let opts = CheckpointOptions {
        image: args.image.clone(),
        registry: args.registry.options(),
        files: args.files.clone(),
        fork: args.fork.clone(),
        keep: args.keep,
        vcpus: args.vcpus,
        memory: args.memory,
        network: args.network,
        kernel: args.kernel.clone(),
        workdir: args.workdir.clone(),
        command: args.command.clone(),
    };
    // The setup's output goes to our stderr: stdout stays ours for the result.
    let c = engine.checkpoint(
        &args.name,
        &opts,
        &Prefixed(out, &args.name),
        &mut std::io::stderr(),
    )?;
    let cache = if c.hit { "hit" } else { "miss" };
    let mut human = format!(
        "checkpoint {}: cache {cache} (key {}), snapshot {}",
        args.name,
        &c.key[..12],
        c.snapshot
    );
    match c.setup_ms {
        Some(ms) => human.push_str(&format!(", setup ran in {:.1} s", ms as f64 / 1e3)),
        None => human.push_str(&format!(
            ", found in {} ms",
            c.total_ms - c.fork_ms.unwrap_or(0)
        )),
    }
    if let (Some(new), Some(ms)) = (&args.fork, c.fork_ms) {
        human.push_str(&format!("; forked {new} in {:.1} s", ms as f64 / 1e3));
    }
    if !c.pruned.is_empty() {
        human.push_str(&format!("; pruned {}", c.pruned.join(", ")));
    }
    out.done(
        &human,
        json!({
            "name": args.name,
            "key": c.key,
            "cache": cache,
            "workspace": c.workspace,
            "tag": TAG,
            "snapshot": c.snapshot,
            "setup_ms": c.setup_ms,
            "fork": args.fork,
            "fork_ms": c.fork_ms,
            "total_ms": c.total_ms,
            "pruned": c.pruned,
        }),
    );
    Ok(0)
}

/// Steps read "checkpoint NAME: ...".
struct Prefixed<'a>(&'a Out, &'a str);

impl crate::engine::Reporter for Prefixed<'_> {
    fn warn(&self, message: &str) {
        self.0.warn(&format!("checkpoint {}: {message}", self.1));
    }
    fn step(&self, message: &str) {
        self.0.step(&format!("checkpoint {}: {message}", self.1));
    }
    fn image_progress(&self) -> &crate::image::progress::Progress {
        self.0.image_progress()
    }
}
