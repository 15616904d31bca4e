//! Snapshots of a workspace: create, list, delete, and the checks a
//! restore or fork makes before it changes anything.
//!
//! A snapshot is `workspaces/<name>/snapshots/<tag>/{manifest.json,
//! vmstate.bin, memory.bin, disk/}`, where `disk/` is the root disk's
//! frozen copy-on-write chain (hard links, shared with the workspace and
//! other snapshots: see `crate::disk`). It is assembled in a temp
//! directory and renamed into place, so a tag either exists whole or not at
//! all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::launch::deliver_secrets;
use super::memory_chain;
use super::snapshot_files::{
    disk_entry, manifest_files, move_dir, remove_leftovers, remove_staging, snapshot_size,
};
use super::snapshot_query::newest;
use super::snapshot_volumes;
use super::vmm_user::take_back;
use super::{
    conflict, invalid, open, Context, Engine, Error, IoContext, Reporter, Result, CONTROL_TIMEOUT,
};
use crate::agent::secrets as agent_secrets;
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::digest::sha256_file_cached;
use crate::disk::{link_frozen, ChainSpec, CHAIN_FILE};
use crate::snapshot::manifest::{
    memory_layer_file, validate_tag, HostCpu, Manifest, Origin, MANIFEST, MEMORY, ROOTFS, VMSTATE,
};
use crate::snapshot::scan::{scan, MIN_SCANNABLE};
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::control::{self, Op as CtlOp, SnapshotReply};
use crate::vmm::host;
use crate::vmm::snapshot::MemoryIds;
use crate::workspace::busy::BusyGuard;
use crate::workspace::secrets::{SecretStore, Value};
use crate::workspace::state::Status;
use crate::workspace::store::{now_rfc3339, StateDir, WorkspaceDir, WorkspaceRecord};

/// Saving guest memory of a large VM can take a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// One snapshot, as `snapshot list` and `snapshot create` report it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub workspace: String,
    pub manifest: Manifest,
    pub dir: PathBuf,
    /// Allocated bytes of its files (memory.bin and the disk are sparse).
    pub size_bytes: u64,
}

/// What `snapshot create` did.
#[derive(Debug, Clone)]
pub struct Created {
    pub snapshot: SnapshotInfo,
    pub duration_ms: u64,
    /// How long the guest was paused (None when it stays paused).
    pub paused_ms: Option<u64>,
    pub secrets_scrubbed: usize,
    /// Allocated bytes of the snapshot's own memory layer (`memory.bin`):
    /// all of guest memory's non-zero pages, or a diff's.
    pub memory_bytes: u64,
}

/// How a snapshot writes guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotOptions {
    /// All of it; otherwise a diff over the memory the guest was last
    /// saved to or restored from, when that snapshot still stands and its
    /// chain has room.
    pub full: bool,
    /// Copied while a running guest runs on; paused only for the last
    /// dirty pages and the devices.
    pub live: bool,
}

/// The default tag: a UTC timestamp.
pub fn default_tag() -> String {
    now_rfc3339().replace([':', '-'], "")
}

/// The tag that names a workspace's newest snapshot (never a real tag).
pub const LATEST: &str = "latest";

/// Snapshot TAG of a workspace, which must exist; `latest` is its newest.
pub(crate) fn snapshot_dir(ws: &WorkspaceDir, tag: &str) -> Result<PathBuf> {
    validate_tag(tag).map_err(invalid)?;
    if tag == LATEST {
        return newest(ws)
            .map(|s| s.dir)
            .ok_or_else(|| Error::SnapshotNotFound {
                workspace: ws.name.clone(),
                tag: tag.to_string(),
            });
    }
    let dir = ws.snapshots().join(tag);
    if !dir.join(MANIFEST).is_file() {
        return Err(Error::SnapshotNotFound {
            workspace: ws.name.clone(),
            tag: tag.to_string(),
        });
    }
    Ok(dir)
}

/// Reads a snapshot's manifest and refuses what cannot run here: another
/// kernel, CPU template, host CPU or TSC rate, or missing files.
pub(crate) fn check_snapshot(
    state: &StateDir,
    dir: &Path,
    rec: &WorkspaceRecord,
) -> Result<Manifest> {
    let tag = dir
        .file_name()
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    let m = Manifest::read(dir).map_err(|e| match e {
        crate::snapshot::manifest::ManifestError::Bad { reason, .. } => Error::SnapshotDamaged {
            message: format!(
                "snapshot {tag} of workspace {}: its manifest ({}) is damaged: {reason}",
                rec.name,
                dir.join(MANIFEST).display()
            ),
        },
        e => Error::Context {
            context: format!("snapshot {tag} of workspace {}", rec.name),
            source: Box::new(e.into()),
        },
    })?;
    let kernel_now = sha256_file_cached(Path::new(&rec.kernel), &state.hash_cache())
        .io_ctx(|| format!("hashing kernel {}", rec.kernel))?;
    let host_cpuid = rec
        .cpu_template
        .parse::<CpuTemplate>()
        .ok()
        .and_then(|t| host::guest_cpuid(t, m.vcpus));
    m.check_compatible(
        &kernel_now,
        &rec.cpu_template,
        &HostCpu::current(),
        host::guest_tsc_khz(),
        host_cpuid.as_deref(),
    )?;
    if m.vcpus != rec.vcpus || m.memory_mib != rec.memory_mib {
        return Err(invalid(format!(
            "snapshot has {} vCPUs and {} MiB, workspace {} has {} and {} MiB",
            m.vcpus, m.memory_mib, rec.name, rec.vcpus, rec.memory_mib
        )));
    }
    // The guest's page cache holds blocks of the shared disks it booted
    // over: they must be the very same bytes.
    let layered = !m.layer_disks.is_empty() || m.boot_disk.is_some();
    let why = match &rec.layout {
        Some(layout) => layout
            .mismatch(&m.layer_disks, m.boot_disk.as_ref(), &state.hash_cache())
            .io_ctx(|| "hashing the workspace's shared disks".into())?,
        None if layered => Some("the workspace has no layered disks".into()),
        None => None,
    };
    if let Some(why) = why {
        return Err(Error::SnapshotDamaged {
            message: format!("snapshot {tag} cannot resume workspace {}: {why}", rec.name),
        });
    }
    snapshot_volumes::check(&m, rec, dir, &tag)?;
    let chain_entry = disk_entry(CHAIN_FILE);
    let mut names = vec![VMSTATE.to_string(), MEMORY.to_string()];
    let layers = m.memory_layers.len();
    names.extend((0..layers.saturating_sub(1)).map(|k| memory_layer_file(k, layers)));
    if m.file(&chain_entry).is_some() {
        let disk = dir.join(SNAPSHOT_DISK_DIR);
        let spec = ChainSpec::read(&disk).map_err(|e| Error::SnapshotDamaged {
            message: format!("snapshot {tag} of workspace {}: {e}", rec.name),
        })?;
        if spec.top.is_some() {
            return Err(Error::SnapshotDamaged {
                message: format!("snapshot disk chain in {} is not frozen", disk.display()),
            });
        }
        names.push(chain_entry);
        names.extend(spec.files().map(disk_entry));
    } else {
        names.push(ROOTFS.to_string());
    }
    for name in &names {
        let name = name.as_str();
        let Some(want) = m.file(name) else {
            return Err(Error::SnapshotDamaged {
                message: format!("snapshot manifest in {} lists no {name}", dir.display()),
            });
        };
        let size = std::fs::metadata(dir.join(name))
            .map(|md| md.len())
            .unwrap_or(u64::MAX);
        if size != want.size {
            return Err(Error::SnapshotDamaged {
                message: format!(
                    "snapshot file {name} is damaged: {size} bytes, manifest says {} ({})",
                    want.size,
                    dir.display()
                ),
            });
        }
    }
    // The VM state and the chain's list are small: check them whole
    // against the manifest, and the state's own format (magic, version,
    // checksum, shape), before anything is changed or started. Memory and
    // disk blocks are read by `snapshot verify` (and on import or pull).
    for name in [VMSTATE.to_string(), disk_entry(CHAIN_FILE)] {
        let Some(want) = m.file(&name) else { continue };
        let path = dir.join(&name);
        let got =
            crate::digest::sha256_file(&path).io_ctx(|| format!("reading {}", path.display()))?;
        if got != want.sha256 {
            return Err(Error::SnapshotDamaged {
                message: format!(
                    "snapshot file {name} is damaged: sha256 {got}, the manifest says {} ({})",
                    want.sha256,
                    dir.display()
                ),
            });
        }
    }
    let bytes = std::fs::read(dir.join(VMSTATE))
        .io_ctx(|| format!("reading {}", dir.join(VMSTATE).display()))?;
    crate::snapshot::format::decode::<crate::vmm::snapshot::VmSnapshot>(&bytes)
        .ctx(|| format!("snapshot {}", dir.display()))?;
    Ok(m)
}

/// Records `dir` as the memory the running guest last equalled; a record
/// that cannot be updated only costs the next snapshot its diff.
pub(crate) fn set_memory_base(ws: &WorkspaceDir, dir: &Path) {
    if let Ok(mut rec) = ws.read() {
        rec.memory_base = Some(dir.to_path_buf());
        let _ = ws.write(&rec);
    }
}

/// Puts the secrets back after a snapshot (whether it succeeded or not),
/// leaving a workspace that was paused paused (its secrets come back on
/// resume). A failure here does not undo the snapshot; it is reported.
fn rehydrate_after_snapshot(ws: &WorkspaceDir, orig_paused: bool, report: &dyn Reporter) {
    let running = control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT)
        .map(|r| r.state.as_deref() == Some("running"));
    match running {
        Ok(true) if orig_paused => {
            // Woken for the scrub but the snapshot never paused it again.
            let _ = control::request(&ws.control_socket(), CtlOp::Pause, CONTROL_TIMEOUT);
        }
        Ok(true) => {
            if let Err(e) = deliver_secrets(ws, true) {
                report.warn(&format!(
                    "workspace {}: secrets not delivered again after the snapshot: {e} (run `microagent resume` or `secret set` to retry)",
                    ws.name
                ));
            }
        }
        _ => {}
    }
}

/// Saves a running or paused VM (vmstate.bin, memory.bin, the disk's
/// frozen chain), moves what the VMM wrote into `dest_tmp` (which must not
/// exist yet), resumes the guest unless `leave_paused`, proves no secret's
/// bytes are in it and writes manifest.json last. The caller renames
/// `dest_tmp` into place. Returns the manifest and how long the guest was
/// paused (None when it stays paused).
#[allow(clippy::too_many_arguments)]
pub(crate) fn capture(
    hash_cache: &Path,
    ws: &WorkspaceDir,
    rec: &WorkspaceRecord,
    dest_tmp: &Path,
    tag: &str,
    secrets: &[(String, Value)],
    leave_paused: bool,
    opts: SnapshotOptions,
    started: Instant,
) -> Result<(Manifest, Option<Duration>)> {
    host::snapshot_support().map_err(|missing| Error::SnapshotUnsupported { missing })?;
    // The VMM writes only into a staging directory it makes itself under
    // the workspace's snapshots directory, and names it in its reply.
    // A diff over the memory this guest was last saved to or restored
    // from, when that snapshot still stands (see `memory_chain`).
    let parent = memory_chain::parent(rec).filter(|_| !opts.full);
    let ids = MemoryIds {
        id: memory_chain::new_id().io_ctx(|| "making a memory layer id".into())?,
        parent: parent.as_ref().and_then(memory_chain::Parent::id),
    };
    let reply: SnapshotReply = match control::snapshot(
        &ws.control_socket(),
        &ids,
        opts.live && !leave_paused,
        SNAPSHOT_TIMEOUT,
    ) {
        Ok(reply) => reply,
        Err(e) => {
            // The VMM may have died mid-save and left its staging directory
            // (its name never reached us); under the workspace lock no other
            // snapshot of this workspace is being made, so any is ours.
            remove_staging(&ws.snapshots());
            return Err(e).ctx(|| format!("saving workspace {}", ws.name));
        }
    };
    let staging = ws.snapshots().join(&reply.staging);
    let moved = move_dir(&staging, dest_tmp)
        .io_ctx(|| format!("moving {} to {}", staging.display(), dest_tmp.display()));
    // The pause began inside the snapshot request; this bounds it from above.
    let mut paused = reply.paused;
    if paused.is_none() && reply.was_running && !leave_paused {
        control::request(&ws.control_socket(), CtlOp::Resume, CONTROL_TIMEOUT)?;
        paused = Some(started.elapsed());
    }
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // The VMM described the frozen chain; its files are linked here (by
    // us: a dropped VMM may not link files it does not own), then all it
    // wrote is checked and made ours.
    let disk = dest_tmp.join(SNAPSHOT_DISK_DIR);
    let what = format!("the VMM's snapshot of workspace {}", ws.name);
    let spec = link_frozen(&ws.disk_dir(), &disk).map_err(|e| Error::SnapshotDamaged {
        message: format!("{what}: {e}"),
    })?;
    let volume_specs = snapshot_volumes::link(rec, dest_tmp, &what)?;
    take_back(dest_tmp, &what)?;
    let layers = reply.memory_layers.len();
    let parent_files = match &parent {
        Some(p) if layers > 1 => memory_chain::link_parent(p, &reply.memory_layers, dest_tmp)
            .map_err(|e| Error::SnapshotDamaged {
                message: format!("{what}: {e}"),
            })?,
        _ => Vec::new(),
    };
    if layers > 1 && parent_files.is_empty() {
        return Err(Error::SnapshotDamaged {
            message: format!("{what}: a diff over memory the engine did not name"),
        });
    }
    // Proof of scrub, before the tag exists: memory (every layer: a
    // parent was proven clean of the secrets of its day), state, and
    // everything the guest wrote since its base (the image and the agent).
    let mut files: Vec<PathBuf> = (0..layers.max(1))
        .map(|k| dest_tmp.join(memory_layer_file(k, layers)))
        .collect();
    files.push(dest_tmp.join(VMSTATE));
    files.extend(spec.deltas.iter().map(|d| disk.join(d)));
    for (i, v) in volume_specs.iter().enumerate() {
        let dir = dest_tmp.join(crate::workspace::volume::snapshot_dir(i));
        files.extend(v.deltas.iter().map(|d| dir.join(d)));
    }
    let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    if let Some(leak) =
        scan(&paths, secrets).io_ctx(|| "searching the snapshot for secrets".into())?
    {
        return Err(Error::SecretLeak {
            key: leak.key,
            file: leak.file,
            encoding: leak.encoding,
        });
    }
    let mut files = manifest_files(ws, dest_tmp, &disk, spec)?;
    files.extend(snapshot_volumes::files(rec, dest_tmp, volume_specs)?);
    files.extend(parent_files);
    let origin = Origin {
        workspace: rec.name.clone(),
        image: rec.image.clone(),
        image_digest: rec.image_digest.clone(),
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        kernel_sha256: rec.kernel_sha256.clone(),
        kernel_cmdline: rec.cmdline.clone(),
        init: rec.init.clone(),
        cpu_template: rec.cpu_template.clone(),
        layer_disks: match &rec.layout {
            Some(l) => l
                .layer_refs(hash_cache)
                .io_ctx(|| "hashing the layer disks".into())?,
            None => vec![],
        },
        boot_disk: match &rec.layout {
            Some(l) => Some(
                l.boot_ref(hash_cache)
                    .io_ctx(|| "hashing the boot disk".into())?,
            ),
            None => None,
        },
    };
    let mut m = Manifest::new(
        tag,
        origin,
        now_rfc3339(),
        reply.tsc_khz,
        reply.guest_cpuid,
        files,
    );
    m.memory_layers = reply.memory_layers;
    m.volumes = snapshot_volumes::refs(rec);
    m.write(dest_tmp)?;
    Ok((m, paused))
}

impl Engine {
    /// Checkpoints a running or paused workspace under `tag` (default: a
    /// UTC timestamp): memory, devices and disk from one paused moment.
    pub fn snapshot_create(
        &self,
        name: &str,
        tag: Option<&str>,
        report: &dyn Reporter,
    ) -> Result<Created> {
        self.snapshot_create_with(name, tag, SnapshotOptions::default(), report)
    }

    /// `snapshot_create`, choosing how memory is written.
    pub fn snapshot_create_with(
        &self,
        name: &str,
        tag: Option<&str>,
        opts: SnapshotOptions,
        report: &dyn Reporter,
    ) -> Result<Created> {
        let tag = tag.map(str::to_string).unwrap_or_else(default_tag);
        validate_tag(&tag).map_err(invalid)?;
        if tag == LATEST {
            return Err(invalid(format!(
                "snapshot tag {LATEST:?} is reserved: it names a workspace's newest snapshot"
            )));
        }
        // Refused before anything is written (the lock file, the busy
        // marker, the snapshot) when this host cannot do it at all.
        host::snapshot_support().map_err(|missing| Error::SnapshotUnsupported { missing })?;
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = open(&self.state, name)?;
        self.snapshot_locked(&ws, &rec, status, &tag, opts, report)
    }

    /// `snapshot_create` once the workspace is locked (halt's automatic
    /// snapshot holds the lock across the snapshot and the power-off).
    pub(crate) fn snapshot_locked(
        &self,
        ws: &WorkspaceDir,
        rec: &WorkspaceRecord,
        status: Status,
        tag: &str,
        opts: SnapshotOptions,
        report: &dyn Reporter,
    ) -> Result<Created> {
        let tag = tag.to_string();
        match status {
            Status::Running | Status::Paused => {}
            s => {
                return Err(conflict(
                    &ws.name,
                    format!(
                        "workspace {} is {s}; only a running or paused workspace can be snapshotted (start it first)",
                        ws.name
                    ),
                ))
            }
        }
        let dest = ws.snapshots().join(&tag);
        if dest.exists() {
            return Err(Error::SnapshotExists {
                workspace: ws.name.clone(),
                tag: tag.clone(),
            });
        }
        let _busy = BusyGuard::mark(ws, "snapshotting", &format!("tag {tag}"))?;
        std::fs::create_dir_all(ws.snapshots())
            .io_ctx(|| format!("creating {}", ws.snapshots().display()))?;
        remove_leftovers(&ws.snapshots());
        let tmp = ws
            .snapshots()
            .join(format!(".creating-{tag}-{}", std::process::id()));
        let secrets = SecretStore::of(ws).all()?;
        let orig_paused = status == Status::Paused;
        for (key, value) in &secrets {
            if value.len() < MIN_SCANNABLE {
                report.warn(&format!(
                    "secret {key} is shorter than {MIN_SCANNABLE} bytes: it is scrubbed, but too short to prove absent by searching the snapshot"
                ));
            }
        }
        let started = Instant::now();
        let result = (|| -> Result<(Manifest, Option<Duration>)> {
            if !secrets.is_empty() {
                // The agent must run to scrub; a paused guest is woken for it
                // and is paused again by the snapshot itself.
                if orig_paused {
                    control::request(&ws.control_socket(), CtlOp::Resume, CONTROL_TIMEOUT)?;
                }
                agent_secrets::scrub(ws)
                    .ctx(|| "scrubbing secrets before guest memory is written".into())?;
            }
            let (m, paused) = capture(
                &self.state.hash_cache(),
                ws,
                rec,
                &tmp,
                &tag,
                &secrets,
                orig_paused,
                opts,
                started,
            )?;
            std::fs::rename(&tmp, &dest).io_ctx(|| format!("renaming into {}", dest.display()))?;
            // The tag exists once its name is on disk too.
            std::fs::File::open(ws.snapshots())
                .and_then(|d| d.sync_all())
                .io_ctx(|| format!("syncing {}", ws.snapshots().display()))?;
            // The next snapshot may be a diff over this one.
            set_memory_base(ws, &dest);
            Ok((m, paused))
        })();
        if !secrets.is_empty() {
            rehydrate_after_snapshot(ws, orig_paused, report);
        }
        let (m, paused) = result.map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            Error::Context {
                context: format!(
                    "snapshot {tag} of workspace {} failed; nothing was kept",
                    ws.name
                ),
                source: Box::new(e),
            }
        })?;
        Ok(Created {
            memory_bytes: crate::util::copy::allocated_bytes(&dest.join(MEMORY)),
            snapshot: SnapshotInfo {
                workspace: ws.name.clone(),
                size_bytes: snapshot_size(&dest),
                manifest: m,
                dir: dest,
            },
            duration_ms: started.elapsed().as_millis() as u64,
            paused_ms: paused.map(|d| d.as_millis() as u64),
            secrets_scrubbed: secrets.len(),
        })
    }
}
