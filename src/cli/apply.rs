//! `apply -f FILE` (and `create -f FILE`): workspaces from a definition.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::output::Out;
use crate::engine::apply::{read_definitions, Action, ApplyOptions, Existing};
use crate::engine::Engine;

#[derive(Args)]
pub struct ApplyArgs {
    /// The definition (YAML; schema: docs/definitions.md).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub registry: super::image::RegistryArgs,
    /// Guest kernel (default: the one scripts/build-kernel.sh built).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
}

pub fn apply(engine: &Engine, args: ApplyArgs, out: &Out) -> Result<i32> {
    run(engine, &args, Existing::KeepEqual, out)
}

pub fn run(engine: &Engine, args: &ApplyArgs, existing: Existing, out: &Out) -> Result<i32> {
    let defs = read_definitions(&args.file)?;
    let opts = ApplyOptions {
        registry: args.registry.options(),
        kernel: args.kernel.clone(),
    };
    let done = engine.apply(&defs, existing, &opts, out)?;
    let lines: Vec<String> = done
        .iter()
        .map(|a| {
            let what = match a.action {
                Action::Created => "created and started".to_string(),
                Action::Unchanged if a.started => "unchanged; started".to_string(),
                Action::Unchanged => "unchanged".to_string(),
            };
            let setup = match a.setup_cached {
                Some(true) => " (setup from its checkpoint)",
                Some(false) => " (setup run and kept as a checkpoint)",
                None => "",
            };
            format!("workspace {}: {what}{setup}", a.name)
        })
        .collect();
    out.done(&lines.join("\n"), json!({ "workspaces": done }));
    Ok(0)
}
