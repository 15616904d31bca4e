//! `snapshot create|list|delete|verify` (restore: `start --from-snapshot`; fork:
//! `create --from-snapshot`).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{human_size, Out};
use crate::engine::snapshot::SnapshotOptions;
use crate::engine::Engine;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Checkpoint a running or paused workspace: memory, devices, disk.
    Create(CreateArgs),
    /// List a workspace's snapshots.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Delete one snapshot: WORKSPACE TAG, or a base, home or personal
    /// snapshot's name.
    #[command(alias = "rm")]
    Delete(DeleteArgs),
    /// Hash every file of a snapshot again and compare with its manifest
    /// (exit 1 naming each file that differs).
    Verify(VerifyArgs),
    /// Push a snapshot to an OCI registry as one artifact (memory and disk
    /// as content-addressed chunks; only what the registry lacks is sent).
    Push(PushArgs),
    /// Pull a snapshot from a registry into a new halted workspace (fork
    /// it with create --from-snapshot, or create --from-snapshot REF).
    Pull(PullArgs),
    /// Set a halted workspace's volumes to a container snapshot
    /// (`create NAME --volumes`) of the same volume names, in order.
    RestoreVolumes(RestoreVolumesArgs),
    /// Make one of your personal snapshots the default that every new
    /// workspace you create gets.
    Default(DefaultArgs),
}

#[derive(Args)]
pub struct DefaultArgs {
    /// A personal snapshot of yours.
    pub name: String,
}

#[derive(Args)]
pub struct RestoreVolumesArgs {
    name: String,
    /// The container snapshot: [WORKSPACE:]TAG (default: this workspace's).
    #[arg(long, value_name = "[WORKSPACE:]TAG")]
    from: String,
}

#[derive(Args)]
pub struct PushArgs {
    /// The snapshot: WORKSPACE:TAG (TAG may be `latest`).
    snapshot: String,
    /// Where to: REGISTRY/REPOSITORY:TAG.
    dest: String,
    #[command(flatten)]
    registry: super::image::RegistryArgs,
}

#[derive(Args)]
pub struct PullArgs {
    /// REGISTRY/REPOSITORY:TAG (or @sha256:...).
    reference: String,
    /// The new workspace, and optionally the tag to keep the snapshot as
    /// (default: the repository's last name and the snapshot's own tag).
    #[arg(value_name = "NAME[:TAG]")]
    into: Option<String>,
    #[command(flatten)]
    registry: super::image::RegistryArgs,
}

#[derive(Args)]
pub struct VerifyArgs {
    name: String,
    tag: String,
}

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    /// Tag (default: a UTC timestamp).
    #[arg(long)]
    tag: Option<String>,
    /// Write all of guest memory, not a diff over the memory this guest was
    /// last saved to or restored from (a new chain starts here).
    #[arg(long)]
    full: bool,
    /// Copy memory while the guest runs on, pausing it only for the pages
    /// it dirtied during the copy and the device state (see `paused_ms`).
    #[arg(long)]
    live: bool,
    /// A container snapshot: all of the workspace's volumes together, no
    /// memory (a running guest freezes their filesystems meanwhile).
    #[arg(long, conflicts_with_all = ["full", "live"])]
    volumes: bool,
    /// A base snapshot named SNAP: the workspace's root committed whole
    /// (its image's layers plus one of its changes).
    #[arg(long, value_name = "SNAP", conflicts_with_all = ["full", "live", "volumes", "tag"])]
    pub base: Option<String>,
    /// A home snapshot named SNAP: the files and folders listed in the
    /// running guest's ~/.snapshot/includes.txt, minus excludes.txt.
    #[arg(long, value_name = "SNAP", conflicts_with_all = ["full", "live", "volumes", "tag", "base"])]
    pub home: Option<String>,
    /// A personal snapshot named SNAP (~/.snapshot.personal/ lists),
    /// private to you.
    #[arg(long, value_name = "SNAP", conflicts_with_all = ["full", "live", "volumes", "tag", "base", "home"])]
    pub personal: Option<String>,
    /// With --personal: make it your default.
    #[arg(long, requires = "personal")]
    pub set_personal_default: bool,
    /// With --home/--personal: whose home (default: the image's User).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    /// A workspace: its memory snapshots (without: every kind).
    name: Option<String>,
    /// Only tags that start with this.
    #[arg(long)]
    prefix: Option<String>,
    /// List its container snapshots (`create --volumes`) instead.
    #[arg(long)]
    volumes: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// A workspace (with TAG), or a base, home or personal snapshot.
    pub name: String,
    tag: Option<String>,
    /// NAME is one of your personal snapshots.
    #[arg(long, conflicts_with = "tag")]
    pub personal: bool,
    /// Confirm (asked on a terminal; refused without one).
    #[arg(long, short)]
    pub yes: bool,
}

pub fn run(engine: &Engine, cmd: SnapshotCommand, out: &Out) -> Result<i32> {
    match cmd {
        SnapshotCommand::Create(a) => create(engine, a, out),
        SnapshotCommand::List(a) => list(engine, a, out),
        SnapshotCommand::Delete(a) => delete(engine, a, out),
        SnapshotCommand::Verify(a) => verify(engine, a, out),
        SnapshotCommand::Push(a) => push(engine, a, out),
        SnapshotCommand::Pull(a) => pull(engine, a, out),
        SnapshotCommand::Default(a) => super::named_snapshot::set_default(engine, a, out),
        SnapshotCommand::RestoreVolumes(a) => {
            let c = engine.container_snapshot_restore(&a.name, &a.from)?;
            out.done(
                &format!(
                    "workspace {}: volumes {} restored from {}:{}",
                    a.name,
                    c.volumes.join(", "),
                    c.workspace,
                    c.tag
                ),
                crate::render::container_snapshot(&c),
            );
            Ok(0)
        }
    }
}

fn create_container(engine: &Engine, args: CreateArgs, out: &Out) -> Result<i32> {
    let c = engine.container_snapshot_create(&args.name, args.tag.as_deref(), out)?;
    out.done(
        &format!(
            "container snapshot {} of workspace {} created: volumes {} ({})",
            c.tag,
            args.name,
            c.volumes.join(", "),
            crate::render::consistency(c.consistency)
        ),
        crate::render::container_snapshot(&c),
    );
    Ok(0)
}

fn create(engine: &Engine, args: CreateArgs, out: &Out) -> Result<i32> {
    if args.base.is_some() || args.home.is_some() || args.personal.is_some() {
        return super::named_snapshot::create(engine, args, out);
    }
    if args.volumes {
        return create_container(engine, args, out);
    }
    let opts = SnapshotOptions {
        full: args.full,
        live: args.live,
    };
    let c = engine.snapshot_create_with(&args.name, args.tag.as_deref(), opts, out)?;
    let m = &c.snapshot.manifest;
    let scrubbed = match c.secrets_scrubbed {
        0 => String::new(),
        n => format!("; {n} secret(s) scrubbed, none found in it"),
    };
    out.done(
        &format!(
            // The seed 003 transcript's words; layers are in --json.
            "snapshot {} created ({} MiB RAM, {} vCPU) at {}{scrubbed}",
            m.tag, m.memory_mib, m.vcpus, m.created
        ),
        crate::render::snapshot_created(&c),
    );
    Ok(0)
}

fn list(engine: &Engine, args: ListArgs, out: &Out) -> Result<i32> {
    let Some(name) = args.name else {
        if args.volumes || args.prefix.is_some() {
            anyhow::bail!("--volumes and --prefix list one workspace's snapshots: name it");
        }
        return super::named_snapshot::list_all(engine, out);
    };
    if args.volumes {
        let rows = engine.container_snapshot_list(&name, args.prefix.as_deref())?;
        if out.json {
            println!(
                "{}",
                serde_json::Value::Array(
                    rows.iter().map(crate::render::container_snapshot).collect()
                )
            );
            return Ok(0);
        }
        println!("{:<24} {:<21} {:<9} VOLUMES", "TAG", "CREATED", "STATE");
        for c in &rows {
            println!(
                "{:<24} {:<21} {:<9} {}",
                c.tag,
                c.created,
                crate::render::consistency(c.consistency),
                c.volumes.join(", ")
            );
        }
        return Ok(0);
    }
    let rows = engine.snapshot_list(&name, args.prefix.as_deref())?;
    if out.json {
        println!(
            "{}",
            serde_json::Value::Array(rows.iter().map(crate::render::snapshot_entry).collect())
        );
        return Ok(0);
    }
    // The seed 003 transcript's columns; `snapshot list` with no
    // workspace has the KIND column.
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
    let Some(tag) = &args.tag else {
        return super::named_snapshot::delete(engine, args, out);
    };
    let what = format!(
        "snapshot delete removes snapshot {tag} of workspace {}",
        args.name
    );
    engine.snapshot_delete(&args.name, tag, &|| {
        super::confirm::confirm(&what, args.yes)
    })?;
    out.done(
        &format!("snapshot {tag} of workspace {} deleted", args.name),
        json!({"workspace": args.name, "tag": tag, "deleted": true}),
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

fn push(engine: &Engine, args: PushArgs, out: &Out) -> Result<i32> {
    let Some((name, tag)) = args.snapshot.split_once(':') else {
        anyhow::bail!("snapshot push takes WORKSPACE:TAG, got {:?}", args.snapshot);
    };
    let p = engine.snapshot_push(name, tag, &args.dest, &args.registry.options(), out)?;
    out.done(
        &format!(
            "pushed snapshot {name}:{} to {}@{} ({} of {} blobs sent, {} of {}, in {:.1}s)",
            p.tag,
            p.reference,
            p.digest,
            p.blobs_pushed,
            p.blobs,
            human_size(p.bytes_pushed),
            human_size(p.bytes_total),
            p.duration_ms as f64 / 1000.0
        ),
        crate::render::snapshot_pushed(&p),
    );
    Ok(0)
}

fn pull(engine: &Engine, args: PullArgs, out: &Out) -> Result<i32> {
    let p = engine.snapshot_pull(
        &args.reference,
        args.into.as_deref(),
        &args.registry.options(),
        out,
    )?;
    out.done(
        &format!(
            "pulled {} as {}:{} ({} of {} blobs fetched, {}, in {:.1}s)",
            p.reference,
            p.workspace,
            p.tag,
            p.blobs_fetched,
            p.blobs,
            human_size(p.bytes_fetched),
            p.duration_ms as f64 / 1000.0
        ),
        crate::render::snapshot_pulled(&p),
    );
    Ok(0)
}
