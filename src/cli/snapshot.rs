//! `snapshot create|list|delete|verify` (restore: `start --from-snapshot`; fork:
//! `create --from-snapshot`).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{human_size, Out};
use crate::engine::Engine;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Checkpoint a running or paused workspace: memory, devices, disk.
    Create(CreateArgs),
    /// List a workspace's snapshots.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Delete one snapshot.
    #[command(alias = "rm")]
    Delete(DeleteArgs),
    /// Hash every file of a snapshot again and compare with its manifest
    /// (exit 1 naming each file that differs).
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    name: String,
    tag: String,
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Tag (default: a UTC timestamp).
    #[arg(long)]
    tag: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    name: String,
    /// Only tags that start with this.
    #[arg(long)]
    prefix: Option<String>,
}

#[derive(Args)]
pub struct DeleteArgs {
    name: String,
    tag: String,
    /// Confirm (asked on a terminal; refused without one).
    #[arg(long, short)]
    yes: bool,
}

pub fn run(engine: &Engine, cmd: SnapshotCommand, out: &Out) -> Result<i32> {
    match cmd {
        SnapshotCommand::Create(a) => create(engine, a, out),
        SnapshotCommand::List(a) => list(engine, a, out),
        SnapshotCommand::Delete(a) => delete(engine, a, out),
        SnapshotCommand::Verify(a) => verify(engine, a, out),
    }
}

fn create(engine: &Engine, args: CreateArgs, out: &Out) -> Result<i32> {
    let c = engine.snapshot_create(&args.name, args.tag.as_deref(), out)?;
    let m = &c.snapshot.manifest;
    let scrubbed = match c.secrets_scrubbed {
        0 => String::new(),
        n => format!("; {n} secret(s) scrubbed, none found in it"),
    };
    out.done(
        &format!(
            "snapshot {} created ({} MiB RAM, {} vCPU) at {}{scrubbed}",
            m.tag, m.memory_mib, m.vcpus, m.created
        ),
        crate::render::snapshot_created(&c),
    );
    Ok(0)
}

fn list(engine: &Engine, args: ListArgs, out: &Out) -> Result<i32> {
    let rows = engine.snapshot_list(&args.name, args.prefix.as_deref())?;
    if out.json {
        println!(
            "{}",
            serde_json::Value::Array(rows.iter().map(crate::render::snapshot_entry).collect())
        );
        return Ok(0);
    }
    println!("{:<24} {:>9} {:<21} IMAGE", "TAG", "SIZE", "CREATED");
    for s in &rows {
        let m = &s.manifest;
        println!(
            "{:<24} {:>9} {:<21} {}",
            m.tag,
            human_size(s.size_bytes),
            m.created,
            m.image.clone().unwrap_or_default()
        );
    }
    Ok(0)
}

fn delete(engine: &Engine, args: DeleteArgs, out: &Out) -> Result<i32> {
    let what = format!(
        "snapshot delete removes snapshot {} of workspace {}",
        args.tag, args.name
    );
    engine.snapshot_delete(&args.name, &args.tag, &|| {
        super::confirm::confirm(&what, args.yes)
    })?;
    out.done(
        &format!("snapshot {} of workspace {} deleted", args.tag, args.name),
        json!({"workspace": args.name, "tag": args.tag, "deleted": true}),
    );
    Ok(0)
}

fn verify(engine: &Engine, args: VerifyArgs, out: &Out) -> Result<i32> {
    let v = engine.snapshot_verify(&args.name, &args.tag)?;
    let bytes: u64 = v.files.iter().map(|f| f.size).sum();
    out.done(
        &format!(
            "snapshot {} of workspace {} verified: {} files, {} match their manifest",
            v.tag,
            v.workspace,
            v.files.len(),
            human_size(bytes)
        ),
        crate::render::snapshot_verified(&v),
    );
    Ok(0)
}
