//! Writing a snapshot where the control socket's reply can name it: a
//! fresh staging directory under the VMM's own snapshots directory, files
//! created `O_EXCL | O_NOFOLLOW` relative to it, never a path from a
//! request.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

use super::{Request, Response, Server, STAGING_PREFIX};
use crate::snapshot::cpuid::CpuidLeaf;
use crate::snapshot::manifest::{valid_memory_id, MEMORY, VMSTATE};
use crate::vmm::snapshot::{MemoryIds, SaveError};
use crate::vmm::vm::RunState;

/// Why a snapshot could not be staged.
#[derive(Debug, thiserror::Error)]
enum StageError {
    #[error("{what} {name}: {source}")]
    Create {
        what: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error(transparent)]
    Encode(#[from] crate::snapshot::format::FormatError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A new file in `dir`: never an existing one, never through a symlink.
fn create_new(dir: &File, name: &str) -> Result<File, StageError> {
    let fd = openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|source| StageError::Create {
        what: "creating",
        name: name.into(),
        source,
    })?;
    Ok(File::from(fd))
}

/// Makes a new staging directory under the snapshots directory and opens it.
fn make_staging(server: &Server) -> Result<(String, File), StageError> {
    let root = &server.info.snapshots_dir;
    std::fs::create_dir_all(root).map_err(io_at(root))?;
    let root_fd = File::open(root).map_err(io_at(root))?;
    let name = format!(
        "{STAGING_PREFIX}{}-{}",
        std::process::id(),
        server.staged.fetch_add(1, Ordering::Relaxed)
    );
    let create = |what| {
        let name = name.clone();
        move |source| StageError::Create { what, name, source }
    };
    mkdirat(&root_fd, name.as_str(), Mode::from_bits_truncate(0o700))
        .map_err(create("creating"))?;
    let fd = openat(
        &root_fd,
        name.as_str(),
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(create("opening"))?;
    Ok((name, File::from(fd)))
}

fn write_staged(
    server: &Server,
    dir: &File,
    name: &str,
    ids: &MemoryIds,
    live: bool,
) -> Result<Staged, StageError> {
    let (vm, info) = (&server.vm, &server.info);
    let memory = create_new(dir, MEMORY)?;
    let staging = info.snapshots_dir.join(name);
    let (snap, paused) = vm.save(memory, &staging, &info.cmdline, info.mem_mib, ids, live)?;
    let bytes = crate::snapshot::format::encode(&snap)?;
    create_new(dir, VMSTATE)?
        .write_all(&bytes)
        .map_err(io_at(Path::new(VMSTATE)))?;
    let cpuid = snap
        .vcpus
        .first()
        .map(|v| v.cpuid.iter().map(CpuidLeaf::from).collect())
        .unwrap_or_default();
    let layers = snap.memory_layers.iter().map(|l| l.id.clone()).collect();
    Ok(Staged {
        cpuid,
        layers,
        paused,
    })
}

/// What a staged snapshot reports back.
struct Staged {
    cpuid: Vec<CpuidLeaf>,
    layers: Vec<String>,
    /// Live: how long the VM was paused before it resumed itself.
    paused: Option<Duration>,
}

/// The memory ids a snapshot request names, checked.
fn memory_ids(req: &Request) -> Result<MemoryIds, String> {
    let id = req
        .memory_id
        .clone()
        .filter(|id| valid_memory_id(id))
        .ok_or("snapshot failed: the request names no valid memory id")?;
    let parent = match &req.memory_parent {
        Some(p) if !valid_memory_id(p) => {
            return Err("snapshot failed: the request's memory parent is not a valid id".into())
        }
        p => p.clone(),
    };
    Ok(MemoryIds { id, parent })
}

pub(super) fn save(server: &Server, req: &Request) -> Response {
    let vm = &server.vm;
    let ids = match memory_ids(req) {
        Ok(ids) => ids,
        Err(e) => return Response::err(e),
    };
    let was = vm.state();
    let (name, dir) = match make_staging(server) {
        Ok(x) => x,
        Err(e) => return Response::err(format!("snapshot failed: {e}")),
    };
    match write_staged(server, &dir, &name, &ids, req.live) {
        Ok(Staged {
            cpuid,
            layers,
            paused,
        }) => {
            let mut r = Response::ok(vm.state());
            r.paused_us = paused.map(|d| d.as_micros() as u64);
            r.was = Some(
                if was == RunState::Paused {
                    "paused"
                } else {
                    "running"
                }
                .into(),
            );
            r.staging = Some(name);
            r.tsc_khz = server.info.tsc_khz;
            r.guest_cpuid = Some(cpuid);
            r.memory_layers = Some(layers);
            r
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(server.info.snapshots_dir.join(&name));
            if was == RunState::Running {
                vm.resume();
            }
            Response::err(format!("snapshot failed: {e}"))
        }
    }
}

pub(super) fn freeze_staged(server: &Server) -> Response {
    let (name, _dir) = match make_staging(server) {
        Ok(x) => x,
        Err(e) => return Response::err(format!("freezing the disk failed: {e}")),
    };
    let staging = server.info.snapshots_dir.join(&name);
    match server.vm.freeze_disks(&staging) {
        Ok(()) => {
            let mut r = Response::ok(server.vm.state());
            r.staging = Some(name);
            r
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Response::err(format!("freezing the disk failed: {e}"))
        }
    }
}
