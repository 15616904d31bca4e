//! `image pull|import|push|ls|rm`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::output::Out;
use crate::engine::create::RegistryOptions;
use crate::engine::Engine;
use crate::image::ops::Ready;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry and build its root disk.
    Pull(PullArgs),
    /// Import an OCI layout directory, an oci-archive or a docker-archive tarball.
    Import(ImportArgs),
    /// Push a local image to a registry (only the blobs it lacks).
    Push(PushArgs),
    /// List local images.
    #[command(alias = "list")]
    Ls,
    /// Remove a local image (workspaces made from it keep their disks).
    #[command(alias = "remove")]
    Rm(RmArgs),
}

/// Registry access options, shared by `image pull` and `create --image`.
#[derive(Args, Clone, Default)]
pub struct RegistryArgs {
    /// Registry credentials USER:PASSWORD (default: ~/.docker/config.json).
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "MICROAGENT_REGISTRY_CREDS",
        hide_env_values = true
    )]
    pub creds: Option<String>,
    /// Reach this registry over plain HTTP (loopback registries always are).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
}

impl RegistryArgs {
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            creds: self.creds.clone(),
            insecure_registries: self.insecure_registry.clone(),
        }
    }
}

#[derive(Args)]
pub struct PullArgs {
    /// Image reference (docker.io/library/alpine:3.20, alpine, repo@sha256:…).
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
pub struct ImportArgs {
    path: PathBuf,
    /// Name the image locally (default: the name inside the archive).
    #[arg(long, value_name = "REF")]
    tag: Option<String>,
    /// Which image of a layout holding several (its ref.name annotation).
    #[arg(long)]
    ref_name: Option<String>,
}

#[derive(Args)]
pub struct PushArgs {
    /// Local image: reference, digest or ID.
    image: String,
    /// Where to push (default: the image's own reference).
    dest: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
pub struct RmArgs {
    /// Reference, digest or ID.
    image: String,
}

pub fn run(engine: &Engine, cmd: ImageCommand, out: &Out) -> Result<i32> {
    match cmd {
        ImageCommand::Pull(a) => {
            let ready = engine.image_pull(&a.reference, &a.registry.options(), out)?;
            report(out, "pulled", &ready);
        }
        ImageCommand::Import(a) => {
            let ready =
                engine.image_import(&a.path, a.tag.as_deref(), a.ref_name.as_deref(), out)?;
            report(out, "imported", &ready);
        }
        ImageCommand::Push(a) => {
            let (rec, p) =
                engine.image_push(&a.image, a.dest.as_deref(), &a.registry.options(), out)?;
            let v = crate::render::image_pushed(&rec, &p);
            out.done(
                &format!(
                    "pushed {} to {}@{} ({} blobs sent, {} already there, {})",
                    rec.id(),
                    p.reference,
                    p.manifest_digest,
                    p.blobs_pushed,
                    p.blobs_skipped,
                    mib(p.bytes_pushed)
                ),
                v,
            );
        }
        ImageCommand::Ls => {
            let records = engine.image_list()?;
            let building = engine.image_building();
            if out.json {
                let all = building
                    .iter()
                    .map(crate::render::image_building)
                    .chain(records.iter().map(crate::render::image));
                println!("{}", Value::Array(all.collect()));
            } else if !out.quiet {
                println!(
                    "{:<14} {:<9} {:<10} {:<10} {:<20} REFERENCES",
                    "ID", "STATE", "CONTENT", "DISK", "CREATED"
                );
                for b in &building {
                    println!(
                        "{:<14} {:<9} {:<10} {:<10} {:<20} {} (from {})",
                        "-", "building", "-", "-", b.since, b.reference, b.source
                    );
                }
                for r in &records {
                    println!(
                        "{:<14} {:<9} {:<10} {:<10} {:<20} {}",
                        r.id(),
                        "ready",
                        mib(r.content_bytes),
                        mib(r.disk_bytes),
                        r.created,
                        if r.refs.is_empty() {
                            "<none>".to_string()
                        } else {
                            r.refs.join(", ")
                        }
                    );
                }
            }
        }
        ImageCommand::Rm(a) => {
            let rec = engine.image_remove(&a.image)?;
            out.done(
                &format!("removed image {}", rec.digest),
                crate::render::image(&rec),
            );
        }
    }
    Ok(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1 << 20) as f64)
}

fn report(out: &Out, verb: &str, ready: &Ready) {
    let r = &ready.record;
    let v = crate::render::image_fetched(ready);
    out.done(
        &format!(
            "{verb} {} ({}, {} layers, {} of files, disk {}){} in {:.1}s",
            r.refs.first().map_or(r.digest.to_string(), |s| s.clone()),
            r.id(),
            r.layers.len(),
            mib(r.content_bytes),
            mib(r.disk_bytes),
            if ready.cached { ", already built" } else { "" },
            ready.seconds
        ),
        v,
    );
}
