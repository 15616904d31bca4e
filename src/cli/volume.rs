//! `volume create|ls|inspect|rm|snapshot|revert|rm-snapshot`: named disks
//! that outlive workspaces (attached with `create -v VOL:/PATH[:ro]`).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::confirm::confirm;
use super::create::parse_size;
use super::output::{human_size, Out};
use crate::engine::Engine;
use crate::render;

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: an empty ext4 disk, or a copy-on-write clone of a
    /// volume snapshot (--from-snapshot VOL:TAG).
    Create(CreateArgs),
    /// List volumes, the workspaces attaching them and their snapshots.
    #[command(alias = "list")]
    Ls,
    /// Show one volume.
    Inspect(NameArgs),
    /// Remove a volume and its snapshots (refused while a workspace
    /// attaches it).
    Rm(RmArgs),
    /// Snapshot a volume (its running workspace's guest freezes the
    /// filesystem meanwhile; nothing is copied).
    Snapshot(SnapshotArgs),
    /// Set a volume back to one of its snapshots (its workspace halted).
    Revert(TagArgs),
    /// Delete one of a volume's snapshots.
    RmSnapshot(TagArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Size (e.g. 512M, 2G; default 1G).
    #[arg(long)]
    size: Option<String>,
    /// Start from a volume snapshot: VOLUME:TAG (its size).
    #[arg(long, value_name = "VOLUME:TAG", conflicts_with = "size")]
    from_snapshot: Option<String>,
}

#[derive(Args)]
pub struct NameArgs {
    name: String,
}

#[derive(Args)]
pub struct RmArgs {
    name: String,
    /// Do not ask.
    #[arg(long, short)]
    yes: bool,
}

#[derive(Args)]
pub struct SnapshotArgs {
    name: String,
    #[arg(long)]
    tag: String,
}

#[derive(Args)]
pub struct TagArgs {
    name: String,
    tag: String,
}

pub fn run(engine: &Engine, cmd: VolumeCommand, out: &Out) -> Result<i32> {
    match cmd {
        VolumeCommand::Create(a) => {
            let size = a.size.as_deref().map(parse_size).transpose()?;
            let v = engine.volume_create(&a.name, size, a.from_snapshot.as_deref())?;
            out.done(
                &format!("volume {} created ({})", a.name, human_size(v.record.size)),
                render::volume(&v),
            );
        }
        VolumeCommand::Ls => {
            let vols = engine.volume_list()?;
            if out.json {
                println!(
                    "{}",
                    json!(vols.iter().map(render::volume).collect::<Vec<_>>())
                );
            } else if !out.quiet {
                println!(
                    "{:<20} {:>9} {:>9} {:<30} SNAPSHOTS",
                    "NAME", "SIZE", "USED", "ATTACHED"
                );
                for v in &vols {
                    let users: Vec<String> = v
                        .users
                        .iter()
                        .map(|u| format!("{}:{}", u.workspace, u.path))
                        .collect();
                    let tags: Vec<&str> = v.snapshots.iter().map(|s| s.tag.as_str()).collect();
                    println!(
                        "{:<20} {:>9} {:>9} {:<30} {}",
                        v.record.name,
                        human_size(v.record.size),
                        human_size(v.allocated_bytes),
                        if users.is_empty() {
                            "-".into()
                        } else {
                            users.join(",")
                        },
                        if tags.is_empty() {
                            "-".into()
                        } else {
                            tags.join(",")
                        }
                    );
                }
            }
        }
        VolumeCommand::Inspect(a) => {
            let v = engine.volume_inspect(&a.name)?;
            let pretty = serde_json::to_string_pretty(&render::volume(&v))?;
            out.done(&pretty, render::volume(&v));
        }
        VolumeCommand::Rm(a) => {
            engine.volume_inspect(&a.name)?;
            confirm(
                &format!("remove volume {} and its snapshots", a.name),
                a.yes,
            )?;
            engine.volume_remove(&a.name)?;
            out.done(
                &format!("volume {} removed", a.name),
                json!({"volume": a.name, "removed": true}),
            );
        }
        VolumeCommand::Snapshot(a) => {
            let s = engine.volume_snapshot(&a.name, &a.tag, out)?;
            out.done(
                &format!(
                    "volume {} snapshot {} taken ({})",
                    a.name,
                    a.tag,
                    render::consistency(s.consistency)
                ),
                render::volume_snapshot(&s),
            );
        }
        VolumeCommand::Revert(a) => {
            let v = engine.volume_revert(&a.name, &a.tag)?;
            out.done(
                &format!("volume {} reverted to snapshot {}", a.name, a.tag),
                render::volume(&v),
            );
        }
        VolumeCommand::RmSnapshot(a) => {
            engine.volume_snapshot_delete(&a.name, &a.tag)?;
            out.done(
                &format!("volume {} snapshot {} deleted", a.name, a.tag),
                json!({"volume": a.name, "tag": a.tag, "removed": true}),
            );
        }
    }
    Ok(0)
}
