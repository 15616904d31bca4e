//! `snapshot create|list|delete`, and forking (`create --from-snapshot`).
//!
//! A snapshot is `workspaces/<name>/snapshots/<tag>/{manifest.json,
//! vmstate.bin, memory.bin, rootfs.ext4}`. It is assembled in a temp
//! directory and renamed into place, so a tag either exists whole or not at
//! all.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::lifecycle::{check_snapshot, deliver_secrets, launch, open, snapshot_dir, AfterReady};
use super::output::{print_record, Out};
use crate::agent::secrets as agent_secrets;
use crate::devices::virtio::net::config::PortMap;
use crate::digest::sha256_file;
use crate::snapshot::cpuid::CpuidLeaf;
use crate::snapshot::manifest::{
    validate_tag, FileInfo, Manifest, MANIFEST, MEMORY, ROOTFS, VMSTATE,
};
use crate::snapshot::scan::{scan, MIN_SCANNABLE};
use crate::vmm::control::{self, Op as CtlOp, Request, PROTOCOL_VERSION};
use crate::vmm::host;
use crate::vmm::snapshot::{allocated_bytes, VmSnapshot};
use crate::workspace::busy::{self, BusyGuard};
use crate::workspace::disk::copy_disk;
use crate::workspace::lock::WorkspaceLock;
use crate::workspace::secrets::{SecretStore, Value};
use crate::workspace::state::Status;
use crate::workspace::store::{
    now_rfc3339, NetworkMode, StateDir, StoreError, WorkspaceDir, WorkspaceRecord, RECORD_VERSION,
};

/// Saving guest memory of a large VM can take a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

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

pub fn run(state: &StateDir, cmd: SnapshotCommand, out: &Out) -> Result<i32> {
    match cmd {
        SnapshotCommand::Create(a) => create(state, a, out),
        SnapshotCommand::List(a) => list(state, a, out),
        SnapshotCommand::Delete(a) => delete(state, a, out),
    }
}

fn default_tag() -> String {
    now_rfc3339().replace([':', '-'], "")
}

/// Syncs a snapshot file (written unsynced while the guest was paused)
/// and describes it for the manifest.
fn file_info(dir: &Path, name: &str) -> Result<FileInfo> {
    let path = dir.join(name);
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(FileInfo {
        name: name.to_string(),
        size: std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len(),
        sha256: sha256_file(&path).with_context(|| format!("hashing {}", path.display()))?,
    })
}

/// A secret's bytes were found in a snapshot file: the snapshot is not
/// committed. Names the key and file, never the value.
#[derive(Debug, thiserror::Error)]
#[error("secret {key} found in {file} ({encoding}) after the scrub: a guest process still holds a copy (a variable, /tmp, /dev/shm, a file on disk); remove it and try again")]
pub struct SecretLeak {
    pub key: String,
    pub file: String,
    pub encoding: &'static str,
}

/// Puts the secrets back after a snapshot (whether it succeeded or not),
/// leaving a workspace that was paused paused (its secrets come back on
/// resume). A failure here does not undo the snapshot; it is reported.
fn rehydrate_after_snapshot(ws: &WorkspaceDir, orig_paused: bool, out: &Out) {
    let running = control::request(&ws.control_socket(), CtlOp::Status, Duration::from_secs(15))
        .map(|r| r.state.as_deref() == Some("running"));
    match running {
        Ok(true) if orig_paused => {
            // Woken for the scrub but the snapshot never paused it again.
            let _ = control::request(&ws.control_socket(), CtlOp::Pause, Duration::from_secs(15));
        }
        Ok(true) => {
            if let Err(e) = deliver_secrets(ws, true) {
                if !out.quiet {
                    eprintln!(
                        "warning: workspace {}: secrets not delivered again after the snapshot: {e:#} (run `microagent resume` or `secret set` to retry)",
                        ws.name
                    );
                }
            }
        }
        _ => {}
    }
}

/// vCPU 0's CPUID, from the vmstate.bin the VMM just wrote.
fn guest_cpuid(dir: &Path) -> Result<Vec<CpuidLeaf>> {
    let bytes = std::fs::read(dir.join(VMSTATE))?;
    let snap: VmSnapshot = crate::snapshot::format::decode(&bytes)?;
    Ok(snap
        .vcpus
        .first()
        .map(|v| v.cpuid.iter().map(CpuidLeaf::from).collect())
        .unwrap_or_default())
}

pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Temp directories of snapshot creates or deletes that were killed midway.
/// Only called under the workspace lock, so none of them is in use.
fn remove_leftovers(snapshots: &Path) {
    let Ok(entries) = std::fs::read_dir(snapshots) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".creating-") || name.starts_with(".deleting-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Saves a running or paused VM into `tmp` (vmstate.bin, memory.bin, the
/// disk copied while paused, manifest.json last), resumes it unless
/// `leave_paused`, and proves no secret's bytes are in it. The caller
/// renames `tmp` into place. Returns the manifest and how long the guest
/// was paused (None when it stays paused).
pub(crate) fn capture(
    ws: &WorkspaceDir,
    rec: &WorkspaceRecord,
    tmp: &Path,
    tag: &str,
    secrets: &[(String, Value)],
    leave_paused: bool,
    started: std::time::Instant,
) -> Result<(Manifest, Option<Duration>)> {
    let req = Request {
        v: PROTOCOL_VERSION,
        op: CtlOp::Snapshot,
        dir: Some(tmp.display().to_string()),
        // The VMM copies the disk while it writes memory, both while
        // paused: memory and disk are from the same moment.
        with_disk: true,
    };
    let resp = control::request_with(&ws.control_socket(), req, SNAPSHOT_TIMEOUT)?;
    let was_running = resp.was.as_deref() == Some("running");
    // The pause began inside the snapshot request; this bounds it from above.
    let mut paused = None;
    if was_running && !leave_paused {
        control::request(&ws.control_socket(), CtlOp::Resume, Duration::from_secs(15))?;
        paused = Some(started.elapsed());
    }
    // Proof of scrub, before the tag exists.
    let files = [tmp.join(MEMORY), tmp.join(VMSTATE), tmp.join(ROOTFS)];
    let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    if let Some(leak) = scan(&paths, secrets).context("searching the snapshot for secrets")? {
        return Err(SecretLeak {
            key: leak.key,
            file: leak.file,
            encoding: leak.encoding,
        }
        .into());
    }
    // Synced and hashed after the guest runs again, one thread per file
    // (memory.bin and the disk are hundreds of MiB), before the manifest
    // that commits them.
    let files = std::thread::scope(|scope| {
        let workers: Vec<_> = [VMSTATE, MEMORY, ROOTFS]
            .iter()
            .map(|f| scope.spawn(|| file_info(tmp, f)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let m = Manifest::new(
        tag,
        rec,
        now_rfc3339(),
        host::guest_tsc_khz(),
        guest_cpuid(tmp)?,
        files,
    );
    m.write(tmp)?;
    Ok((m, paused))
}

fn create(state: &StateDir, args: CreateArgs, out: &Out) -> Result<i32> {
    let tag = args.tag.clone().unwrap_or_else(default_tag);
    validate_tag(&tag).map_err(anyhow::Error::msg)?;
    let (ws, _lock, rec, status) = open(state, &args.name)?;
    match status {
        Status::Running | Status::Paused => {}
        s => bail!(
            "workspace {} is {s}; only a running or paused workspace can be snapshotted (start it first)",
            ws.name
        ),
    }
    let dest = ws.snapshots().join(&tag);
    if dest.exists() {
        bail!("snapshot {tag} already exists in workspace {}", ws.name);
    }
    let _busy = BusyGuard::mark(&ws, "snapshotting", &format!("tag {tag}"))?;
    std::fs::create_dir_all(ws.snapshots())?;
    remove_leftovers(&ws.snapshots());
    let tmp = ws
        .snapshots()
        .join(format!(".creating-{tag}-{}", std::process::id()));
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let secrets = SecretStore::of(&ws).all()?;
    let orig_paused = status == Status::Paused;
    for (key, value) in &secrets {
        if value.len() < MIN_SCANNABLE && !out.quiet {
            eprintln!(
                "warning: secret {key} is shorter than {MIN_SCANNABLE} bytes: it is scrubbed, but too short to prove absent by searching the snapshot"
            );
        }
    }
    let started = std::time::Instant::now();
    let result = (|| -> Result<(Manifest, Option<Duration>)> {
        if !secrets.is_empty() {
            // The agent must run to scrub; a paused guest is woken for it
            // and is paused again by the snapshot itself.
            if orig_paused {
                control::request(&ws.control_socket(), CtlOp::Resume, Duration::from_secs(15))?;
            }
            agent_secrets::scrub(&ws)
                .context("scrubbing secrets before guest memory is written")?;
        }
        let (m, paused) = capture(&ws, &rec, &tmp, &tag, &secrets, orig_paused, started)?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming into {}", dest.display()))?;
        // The tag exists once its name is on disk too.
        std::fs::File::open(ws.snapshots())
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", ws.snapshots().display()))?;
        Ok((m, paused))
    })();
    if !secrets.is_empty() {
        rehydrate_after_snapshot(&ws, orig_paused, out);
    }
    let (m, paused) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!(
                "snapshot {tag} of workspace {} failed; nothing was kept",
                ws.name
            )));
        }
    };
    let size: u64 = [VMSTATE, MEMORY, ROOTFS, MANIFEST]
        .iter()
        .map(|f| allocated_bytes(&dest.join(f)))
        .sum();
    let scrubbed = match secrets.len() {
        0 => String::new(),
        n => format!("; {n} secret(s) scrubbed, none found in it"),
    };
    out.done(
        &format!(
            "snapshot {tag} created ({} MiB RAM, {} vCPU) at {}{scrubbed}",
            m.memory_mib, m.vcpus, m.created
        ),
        json!({
            "workspace": ws.name,
            "tag": tag,
            "created": m.created,
            "vcpus": m.vcpus,
            "memory_mib": m.memory_mib,
            "size_bytes": size,
            "dir": dest.display().to_string(),
            "duration_ms": started.elapsed().as_millis() as u64,
            "paused_ms": paused.map(|d| d.as_millis() as u64),
            "secrets_scrubbed": secrets.len(),
        }),
    );
    Ok(0)
}

fn list(state: &StateDir, args: ListArgs, out: &Out) -> Result<i32> {
    let ws = state.existing(&args.name)?;
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(ws.snapshots()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_tag(&name).is_err()
                || args.prefix.as_deref().is_some_and(|p| !name.starts_with(p))
            {
                continue;
            }
            let Ok(m) = Manifest::read(&e.path()) else {
                continue;
            };
            let size: u64 = [VMSTATE, MEMORY, ROOTFS, MANIFEST]
                .iter()
                .map(|f| allocated_bytes(&e.path().join(f)))
                .sum();
            rows.push((m, size));
        }
    }
    rows.sort_by(|a, b| a.0.created.cmp(&b.0.created).then(a.0.tag.cmp(&b.0.tag)));
    if out.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(m, size)| {
                json!({
                    "tag": m.tag, "size_bytes": size, "created": m.created,
                    "image": m.image, "vcpus": m.vcpus, "memory_mib": m.memory_mib,
                    "kernel_sha256": m.kernel_sha256,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    println!("{:<24} {:>9} {:<21} IMAGE", "TAG", "SIZE", "CREATED");
    for (m, size) in &rows {
        let rec = ws.read().ok();
        let image = m
            .image
            .clone()
            .or_else(|| rec.and_then(|r| r.rootfs_source))
            .unwrap_or_default();
        println!(
            "{:<24} {:>9} {:<21} {image}",
            m.tag,
            human_size(*size),
            m.created
        );
    }
    Ok(0)
}

fn delete(state: &StateDir, args: DeleteArgs, out: &Out) -> Result<i32> {
    let ws = state.existing(&args.name)?;
    // The lock first: a workspace busy snapshotting is refused naming
    // what runs (the tag being made does not exist yet). The prompt, if
    // any, is answered under the lock, so the tag cannot change meanwhile.
    let _lock = busy::lock(&ws)?;
    let dir = snapshot_dir(&ws, &args.tag)?;
    super::confirm::confirm(
        &format!(
            "snapshot delete removes snapshot {} of workspace {}",
            args.tag, ws.name
        ),
        args.yes,
    )?;
    let doomed = ws
        .snapshots()
        .join(format!(".deleting-{}-{}", args.tag, std::process::id()));
    std::fs::rename(&dir, &doomed)?;
    std::fs::remove_dir_all(&doomed)?;
    out.done(
        &format!("snapshot {} of workspace {} deleted", args.tag, ws.name),
        json!({"workspace": ws.name, "tag": args.tag, "deleted": true}),
    );
    Ok(0)
}

/// What `create NEW --from-snapshot SRC:TAG` asks for.
pub struct ForkArgs<'a> {
    pub name: &'a str,
    pub from: &'a str,
    pub wait: Option<Duration>,
    pub secret_overrides: &'a [(String, Value)],
    /// The fork's own published ports (the source's are never inherited:
    /// both would want the same host ports).
    pub ports: &'a [PortMap],
}

/// `create NEW --from-snapshot SRC:TAG`: a new workspace resumed from the
/// snapshot's memory, with a private copy of its disk and a fresh identity.
pub fn fork(state: &StateDir, args: ForkArgs, out: &Out) -> Result<i32> {
    let ForkArgs {
        name,
        from,
        wait,
        secret_overrides,
        ports,
    } = args;
    let (src_name, tag) = from
        .split_once(':')
        .with_context(|| format!("--from-snapshot takes WORKSPACE:TAG, got {from:?}"))?;
    let ws = state.workspace(name)?;
    let src = state.existing(src_name)?;
    let dir = snapshot_dir(&src, tag)?;
    let src_rec = src.read()?;
    check_snapshot(&dir, &src_rec)?;
    if src_rec.network == NetworkMode::None && !ports.is_empty() {
        bail!("workspace {src_name} has no network (--network none): a fork of it cannot publish ports");
    }
    std::fs::create_dir_all(state.workspaces())?;
    match std::fs::create_dir(&ws.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::Exists(name.into()).into())
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", ws.dir.display())),
    }
    let result = (|| -> Result<(WorkspaceRecord, Option<u32>)> {
        let _lock = WorkspaceLock::acquire(&ws.lock_path())?;
        copy_disk(&dir.join(ROOTFS), &ws.rootfs())?;
        let mut rec = WorkspaceRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            created: now_rfc3339(),
            status: Status::Created,
            vmm_pid: None,
            crash_reason: None,
            rootfs_source: Some(format!("{src_name}:{tag}")),
            ports: ports.to_vec(),
            ..src_rec.clone()
        };
        ws.write(&rec)?;
        // The fork gets its source's secrets (current values), then the
        // overrides given on the command line.
        let store = SecretStore::of(&ws);
        SecretStore::of(&src).copy_to(&store)?;
        for (k, v) in secret_overrides {
            store.set(k, v)?;
        }
        let l = launch(
            &ws,
            &mut rec,
            Some(&dir),
            wait,
            AfterReady::DeliverSecrets,
            out,
        )?;
        Ok((rec, l.vmm_pid))
    })();
    match result {
        Ok((rec, pid)) => {
            print_record(
                out,
                &ws,
                &rec,
                Status::Running,
                None,
                pid,
                &format!("workspace {name} forked from {src_name}:{tag}"),
            );
            Ok(0)
        }
        Err(e) => {
            // Nothing half-made stays behind; the VMM (if any) goes too.
            if let Ok(rec) = ws.read() {
                if let Some(pid) = rec.vmm_pid {
                    // SAFETY: signalling the VMM process group we started.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            }
            let _ = std::fs::remove_dir_all(&ws.dir);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_default_tags() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1536 << 20), "1.5GiB");
        let t = default_tag();
        assert!(validate_tag(&t).is_ok(), "{t}");
        assert!(t.ends_with('Z') && t.contains('T'));
    }
}
