//! Forking: a new workspace resumed from another's snapshot, with a
//! private copy of its disk and a fresh identity.

use std::time::Duration;

use super::auto_snapshot::{check_max_snapshots, Settings};
use super::create::RegistryOptions;
use super::launch::{kill_strays, launch, AfterReady};
use super::share_pull::is_registry_reference;
use super::snapshot::{check_snapshot, snapshot_dir};
use super::snapshot_volumes;
use super::{claim_workspace_dir, invalid, written, Engine, Reporter, Result, WorkspaceView};
use crate::devices::virtio::net::config::{check_unique, PortMap};
use crate::util::lock::FileLock;
use crate::workspace::disk::restore_from;
use crate::workspace::secrets::{SecretStore, Value};
use crate::workspace::state::Status;
use crate::workspace::store::{
    now_rfc3339, NetworkMode, WorkspaceDir, WorkspaceRecord, MAX_SNAPSHOTS_DEFAULT, RECORD_VERSION,
};
use crate::workspace::volume::VolumeMount;

/// What a fork asks for.
pub struct ForkOptions<'a> {
    /// The snapshot: `WORKSPACE:TAG`.
    pub from: &'a str,
    /// Wait this long for the guest agent; None: return once the VMM runs.
    pub wait: Option<Duration>,
    /// Secrets that override the source's, key by key.
    pub secret_overrides: &'a [(String, Value)],
    /// The fork's own published ports (the source's are never inherited:
    /// both would want the same host ports).
    pub ports: &'a [PortMap],
    /// Its automatic-snapshot settings (unset: the defaults, not the
    /// source's).
    pub settings: Settings,
    /// Registry access when `from` is a registry reference.
    pub registry: RegistryOptions,
}

impl Engine {
    /// Creates workspace `name` from a snapshot and starts it. On failure
    /// nothing of the new workspace stays behind, its VMM included.
    pub fn fork(
        &self,
        name: &str,
        opts: &ForkOptions,
        report: &dyn Reporter,
    ) -> Result<WorkspaceView> {
        if is_registry_reference(opts.from) {
            return self.fork_from_registry(name, opts, report);
        }
        let (src_name, tag) = opts.from.split_once(':').ok_or_else(|| {
            invalid(format!(
                "--from-snapshot takes WORKSPACE:TAG, got {:?}",
                opts.from
            ))
        })?;
        check_unique(opts.ports).map_err(invalid)?;
        let max_snapshots = opts.settings.max_snapshots.unwrap_or(MAX_SNAPSHOTS_DEFAULT);
        check_max_snapshots(max_snapshots)?;
        let ws = self.state.workspace(name)?;
        let src = self.state.existing(src_name)?;
        let dir = snapshot_dir(&src, tag)?;
        let src_rec = src.read()?;
        let manifest = check_snapshot(&self.state, &dir, &src_rec)?;
        if src_rec.network == NetworkMode::None && !opts.ports.is_empty() {
            return Err(invalid(format!(
                "workspace {src_name} has no network (--network none): a fork of it cannot publish ports"
            )));
        }
        claim_workspace_dir(&self.state, &ws)?;
        let mut volumes = Vec::new();
        let result = (|| -> Result<(WorkspaceRecord, Option<u32>)> {
            let _lock = FileLock::acquire(&ws.lock_path())?;
            restore_from(&dir, &ws)?;
            // Copy-on-write clones of the source's volumes, as they were.
            volumes = snapshot_volumes::fork(&self.state, &manifest, &dir, name)?;
            let mut rec = WorkspaceRecord {
                version: RECORD_VERSION,
                name: name.to_string(),
                created: now_rfc3339(),
                status: Status::Created,
                vmm_pid: None,
                crash_reason: None,
                rootfs_source: Some(format!("{src_name}:{tag}")),
                ports: opts.ports.to_vec(),
                auto_snapshot_on_stop: opts.settings.auto_snapshot_on_stop.unwrap_or(true),
                max_snapshots,
                memory_base: None,
                volumes: volumes.clone(),
                ..src_rec.clone()
            };
            ws.write(&rec)?;
            // The fork gets its source's secrets (current values), then the
            // overrides given by the caller.
            let store = SecretStore::of(&ws);
            SecretStore::of(&src).copy_to(&store)?;
            for (k, v) in opts.secret_overrides {
                store.set(k, v)?;
            }
            let l = launch(
                &self.state,
                &ws,
                &mut rec,
                Some(&dir),
                opts.wait,
                AfterReady::DeliverSecrets,
                report,
            )?;
            Ok((rec, l.vmm_pid))
        })();
        finish(&ws, &volumes, result)
    }
}

impl Engine {
    /// Pulls the snapshot at `opts.from` into workspace `name` and
    /// resumes it there, as a fork (a new identity; the caller's secrets).
    fn fork_from_registry(
        &self,
        name: &str,
        opts: &ForkOptions,
        report: &dyn Reporter,
    ) -> Result<WorkspaceView> {
        check_unique(opts.ports).map_err(invalid)?;
        let max_snapshots = opts.settings.max_snapshots.unwrap_or(MAX_SNAPSHOTS_DEFAULT);
        check_max_snapshots(max_snapshots)?;
        let landed =
            self.pull_snapshot_into(opts.from, Some(name), None, &opts.registry, report)?;
        let ws = landed.ws;
        let result = (|| -> Result<(WorkspaceRecord, Option<u32>)> {
            let _lock = FileLock::acquire(&ws.lock_path())?;
            let mut rec = WorkspaceRecord {
                ports: opts.ports.to_vec(),
                auto_snapshot_on_stop: opts.settings.auto_snapshot_on_stop.unwrap_or(true),
                max_snapshots,
                memory_base: None,
                ..landed.rec
            };
            if rec.network == NetworkMode::None && !opts.ports.is_empty() {
                return Err(invalid(format!(
                    "snapshot {} has no network (--network none): a fork of it cannot publish ports",
                    opts.from
                )));
            }
            ws.write(&rec)?;
            let store = SecretStore::of(&ws);
            for (k, v) in opts.secret_overrides {
                store.set(k, v)?;
            }
            let l = launch(
                &self.state,
                &ws,
                &mut rec,
                Some(&landed.dir),
                opts.wait,
                AfterReady::DeliverSecrets,
                report,
            )?;
            Ok((rec, l.vmm_pid))
        })();
        finish(&ws, &[], result)
    }
}

/// A fork's outcome: its view, or, when it failed, nothing half-made left
/// behind (the VMM, if one started, goes too) and the error.
fn finish(
    ws: &WorkspaceDir,
    volumes: &[VolumeMount],
    result: Result<(WorkspaceRecord, Option<u32>)>,
) -> Result<WorkspaceView> {
    match result {
        Ok((rec, pid)) => Ok(written(ws, &rec, pid)),
        Err(e) => {
            if let Some(pid) = ws.read().ok().and_then(|r| r.vmm_pid) {
                // SAFETY: signalling the VMM process group we started.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            kill_strays(ws);
            let _ = std::fs::remove_dir_all(&ws.dir);
            // The volumes the fork made for itself (a volume's chain is
            // `<volume>/disk`).
            for v in volumes {
                if let Some(dir) = v.disk.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Err(e)
        }
    }
}
