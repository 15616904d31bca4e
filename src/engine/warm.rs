//! Warm starts: a workspace's first start resumes a cached snapshot of a
//! guest that booted from the same inputs, instead of booting.
//!
//! The first start of a boot key cold-boots, waits for the agent, has it
//! sync, snapshots that pristine guest into the boot cache (before any
//! secret is delivered), resumes it and delivers the secrets. Later first
//! starts with that key copy the cached disk, resume the cached memory and
//! refresh the identity, exactly as a fork does. A damaged entry is removed
//! and the start falls back to a cold boot, with a warning.

use std::path::Path;
use std::time::{Duration, Instant};

use super::launch::{deliver_secrets, has_secrets, launch, AfterReady, Launched};
use super::snapshot::{capture, check_snapshot};
use super::{Error, IoContext, Reporter, Result};
use crate::snapshot::bootcache::{valid_key, BootCache};
use crate::workspace::disk::{ensure_chain, restore_from};
use crate::workspace::state::Status;
use crate::workspace::store::{StateDir, WorkspaceDir, WorkspaceRecord};

/// How a start brought its guest up (reported as `boot` in `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Booted the kernel.
    Cold,
    /// Resumed the boot cache's snapshot of an equal workspace.
    Warm,
    /// Resumed one of the workspace's own snapshots (`--from-snapshot`).
    Snapshot,
}

impl Boot {
    pub fn name(self) -> &'static str {
        match self {
            Boot::Cold => "cold",
            Boot::Warm => "warm",
            Boot::Snapshot => "snapshot",
        }
    }
}

/// What a first start did, for the caller's message and JSON.
pub struct FirstStart {
    pub launched: Launched,
    pub boot: Boot,
    pub key: Option<String>,
    /// With a cold boot: whether its snapshot is now in the cache.
    pub cached: bool,
}

/// The first start of a workspace (status `created`). Without `wait` the
/// agent is never awaited, so there is nothing to snapshot or restore into:
/// such starts, and `cold`, boot without the cache.
pub fn first_start(
    state: &StateDir,
    ws: &WorkspaceDir,
    rec: &mut WorkspaceRecord,
    wait: Option<Duration>,
    cold: bool,
    report: &dyn Reporter,
) -> Result<FirstStart> {
    let key = rec.boot_key.clone().filter(|k| valid_key(k));
    let (Some(key), Some(_), false) = (key, wait, cold) else {
        let launched = launch(
            state,
            ws,
            rec,
            None,
            wait,
            AfterReady::DeliverSecrets,
            report,
        )?;
        return Ok(FirstStart {
            launched,
            boot: Boot::Cold,
            key: None,
            cached: false,
        });
    };
    let cache = BootCache::new(&state.root);
    if let Some(dir) = cache.lookup(&key) {
        match warm_start(state, &cache, &dir, ws, rec, wait, report) {
            Ok(launched) => {
                return Ok(FirstStart {
                    launched,
                    boot: Boot::Warm,
                    key: Some(key),
                    cached: true,
                })
            }
            Err(e) => {
                let removed = match cache.remove(&key) {
                    Ok(()) => "removed it".to_string(),
                    Err(r) => format!("could not remove it: {r}"),
                };
                report.warn(&format!(
                        "boot snapshot {} ({}) is unusable: {e}; {removed}; cold-booting workspace {} instead",
                        &key[..12],
                        dir.display(),
                        ws.name
                    ));
            }
        }
    }
    let launched = launch(state, ws, rec, None, wait, AfterReady::NoSecrets, report)?;
    let cached = match cache_boot(state, &cache, &key, ws, rec) {
        Ok(stored) => {
            // Whoever stored the entry, its ids say whether the next
            // snapshot's diff over it fits.
            rec.memory_base = Some(cache.entry_dir(&key));
            ws.write(rec)?;
            stored
        }
        Err(e) => {
            // The workspace runs (capture resumes it on every path after
            // the pause); only the next start loses the shortcut.
            report.warn(&format!(
                "workspace {} booted, but its boot snapshot was not cached: {e}",
                ws.name
            ));
            false
        }
    };
    if has_secrets(ws)? {
        deliver_secrets(ws, true)?;
    }
    Ok(FirstStart {
        launched,
        boot: Boot::Cold,
        key: Some(key),
        cached,
    })
}

/// Resumes the cached boot snapshot in `dir` as this workspace. On failure
/// the workspace is as before: created, with its own disk, no VMM.
fn warm_start(
    state: &StateDir,
    cache: &BootCache,
    dir: &Path,
    ws: &WorkspaceDir,
    rec: &mut WorkspaceRecord,
    wait: Option<Duration>,
    report: &dyn Reporter,
) -> Result<Launched> {
    let _use = cache.use_lock()?;
    check_snapshot(state, dir, rec)?;
    // A created workspace's own disk is its base under an empty top: on
    // failure it is made again from the base, kept linked meanwhile. Every
    // step swaps whole chains, so a crash never leaves the disk missing.
    let own = ensure_chain(ws)?;
    let keep = ws.dir.join(&own.base);
    let _ = std::fs::remove_file(&keep);
    std::fs::hard_link(ws.disk_dir().join(&own.base), &keep)
        .io_ctx(|| format!("keeping {}", keep.display()))?;
    let result = restore_from(dir, ws).map_err(Error::from).and_then(|_| {
        launch(
            state,
            ws,
            rec,
            Some(dir),
            wait,
            AfterReady::DeliverSecrets,
            report,
        )
    });
    match result {
        Ok(launched) => {
            let _ = std::fs::remove_file(&keep);
            Ok(launched)
        }
        Err(e) => {
            if let Some(pid) = ws.read().ok().and_then(|r| r.vmm_pid) {
                // SAFETY: signalling the VMM process group we started.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let digest = own.digests.get(&own.base).cloned();
            let rebuilt = crate::disk::replace_with(&ws.disk_dir(), |t| {
                crate::disk::create(t, &keep, digest)
            });
            let _ = std::fs::remove_file(&keep);
            if let Err(r) = rebuilt {
                report.warn(&format!(
                    "workspace {}: its own disk could not be made again after the failed warm start: {r}",
                    ws.name
                ));
            }
            rec.status = Status::Created;
            rec.vmm_pid = None;
            rec.crash_reason = None;
            ws.write(rec)?;
            Err(e)
        }
    }
}

/// Snapshots the just-booted guest (synced by the identity refresh, no
/// secrets yet) into the cache. Ok(false) when an equal start cached first.
fn cache_boot(
    state: &StateDir,
    cache: &BootCache,
    key: &str,
    ws: &WorkspaceDir,
    rec: &WorkspaceRecord,
) -> Result<bool> {
    let _use = cache.use_lock()?;
    if cache.lookup(key).is_some() {
        return Ok(false);
    }
    let tmp = cache
        .temp_dir(key)
        .io_ctx(|| format!("creating a temp directory in {}", cache.root.display()))?;
    let tag = format!("boot-{}", &key[..12]);
    match capture(
        &state.hash_cache(),
        ws,
        rec,
        &tmp,
        &tag,
        &[],
        false,
        super::snapshot::SnapshotOptions {
            full: true,
            live: false,
        },
        Instant::now(),
    ) {
        Ok(_) => cache
            .commit(&tmp, key)
            .io_ctx(|| format!("storing boot snapshot {}", &key[..12])),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
