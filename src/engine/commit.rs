//! `commit` and `diff`: a workspace's changes, read on the host from its
//! upper disk, as a new image layer or as a list.
//!
//! A running guest's upper is made consistent by the agent freezing the
//! filesystem (its data and journal on the disk). For a commit the VMM
//! then freezes the disk chain, as a snapshot does, and the guest thaws
//! at once: the layer is read from the frozen chain while it runs on. A
//! diff only reads metadata, so it reads the live chain while the
//! filesystem stays frozen. A halted workspace's agent froze its upper
//! when it powered off, so its chain is read as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::vmm_user::take_back;
use super::{conflict, invalid, open, Engine, Error, IoContext, Reporter, Result, CONTROL_TIMEOUT};
use crate::agent::AgentConn;
use crate::devices::virtio::block::SNAPSHOT_DISK_DIR;
use crate::disk::{link_frozen, Chain};
use crate::ext4::{Ext4, Ext4Error};
use crate::image::building;
use crate::image::commit::{self, CommitInput, LayerBlob};
use crate::image::store::{ImageRecord, ImageStore};
use crate::image::upper::{self, Change, UpperError};
use crate::image::{build::MAX_UNPACKED_BYTES, reference};
use crate::snapshot::scan::{encodings, scan};
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::busy::BusyGuard;
use crate::workspace::secrets::SecretStore;
use crate::workspace::state::Status;
use crate::workspace::store::{WorkspaceDir, WorkspaceRecord};

/// The agent thaws the upper by itself after this, whatever happens here.
const FREEZE_GUARD: Duration = Duration::from_secs(120);

/// What `commit` made.
#[derive(Debug, Clone)]
pub struct Committed {
    pub workspace: String,
    pub image: ImageRecord,
    pub layer: LayerBlob,
    /// Entries in the new layer (files, directories, whiteouts...).
    pub entries: u64,
    pub duration_ms: u64,
    /// How long the guest's writes were held (filesystem frozen), or None
    /// for a halted workspace.
    pub paused_ms: Option<u64>,
}

/// What `diff` found.
#[derive(Debug, Clone)]
pub struct Diff {
    pub workspace: String,
    pub changes: Vec<(Change, String)>,
}

/// How a live guest's upper is read.
#[derive(Clone, Copy, PartialEq)]
enum Hold {
    /// Freeze the disk chain and read it with the guest running again.
    FreezeChain,
    /// Read the live chain while the guest's filesystem stays frozen.
    WhileFrozen,
}

/// The default reference: the source image's repository with a UTC
/// timestamp tag.
fn default_reference(base: &ImageRecord, ws: &str) -> Result<String> {
    let stamp = crate::util::time::now_rfc3339()
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string();
    let repo = base
        .refs
        .first()
        .and_then(|r| reference::parse(r).ok())
        .map(|r| format!("{}/{}", r.registry(), r.repository()))
        .unwrap_or_else(|| format!("localhost/{ws}"));
    reference::normalise(&format!("{repo}:{stamp}")).map_err(Error::from)
}

fn upper_error(ws: &str, e: UpperError) -> Error {
    match e {
        UpperError::Fs(Ext4Error::NeedsRecovery) => conflict(
            ws,
            format!(
                "workspace {ws}'s upper filesystem was not shut down cleanly (its journal needs recovery): start it, then commit or diff it running"
            ),
        ),
        e => Error::Context {
            context: format!("reading workspace {ws}'s changes"),
            source: Box::new(Error::Upper(e)),
        },
    }
}

/// The image a layered workspace was made from.
fn base_image(store: &ImageStore, rec: &WorkspaceRecord) -> Result<ImageRecord> {
    if rec.layout.is_none() {
        return Err(invalid(format!(
            "workspace {} has no layered disks (made from --rootfs, or before layered disks): it has no changes apart from an image",
            rec.name
        )));
    }
    let digest = rec
        .image_digest
        .as_deref()
        .ok_or_else(|| invalid(format!("workspace {} was not made from an image", rec.name)))?;
    store.find(digest)?.ok_or_else(|| Error::NotFound {
        kind: "image",
        name: format!(
            "{} ({digest}, the image of workspace {})",
            rec.image.as_deref().unwrap_or("?"),
            rec.name
        ),
    })
}

/// Runs `read` over the workspace's upper filesystem, made consistent as
/// `hold` says; returns what it returned and how long guest writes were
/// held.
fn with_upper<T>(
    ws: &WorkspaceDir,
    status: Status,
    hold: Hold,
    read: impl FnOnce(&Ext4<Chain>) -> Result<T>,
) -> Result<(T, Option<Duration>)> {
    let open_fs = |chain: Chain| Ext4::open(chain).map_err(|e| upper_error(&ws.name, e.into()));
    if status == Status::Halted {
        let chain = read_only_chain(&ws.disk_dir())?;
        return Ok((read(&open_fs(chain)?)?, None));
    }
    // Under the workspace lock, a staging directory is one a killed
    // commit or snapshot left.
    super::snapshot_files::remove_staging(&ws.snapshots());
    let sock = ws.control_socket();
    let paused = status == Status::Paused;
    if paused {
        // The agent must run to freeze its filesystem.
        control::request(&sock, CtlOp::Resume, CONTROL_TIMEOUT)?;
    }
    let started = Instant::now();
    let result = (|| {
        let frozen = AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(10))
            .and_then(|c| c.freeze_upper(FREEZE_GUARD))
            .map_err(|e| Error::Context {
                context: format!("freezing workspace {}'s filesystem", ws.name),
                source: Box::new(e.into()),
            })?;
        match hold {
            Hold::WhileFrozen => {
                let out = read_only_chain(&ws.disk_dir()).and_then(|c| read(&open_fs(c)?));
                frozen.thaw()?;
                Ok((out?, started.elapsed()))
            }
            Hold::FreezeChain => {
                let staging = control::freeze_disk(&sock, CONTROL_TIMEOUT);
                frozen.thaw()?;
                let held = started.elapsed();
                let staging = Staging(ws.snapshots().join(staging?));
                let disk = staging.0.join(SNAPSHOT_DISK_DIR);
                let what = format!("the VMM's frozen disk of workspace {}", ws.name);
                link_frozen(&ws.disk_dir(), &disk).map_err(|e| Error::SnapshotDamaged {
                    message: format!("{what}: {e}"),
                })?;
                take_back(&staging.0, &what)?;
                let chain = read_only_chain(&disk)?;
                Ok((read(&open_fs(chain)?)?, held))
            }
        }
    })();
    if paused {
        let _ = control::request(&sock, CtlOp::Pause, CONTROL_TIMEOUT);
    }
    result.map(|(out, held)| (out, Some(held)))
}

fn read_only_chain(dir: &Path) -> Result<Chain> {
    Chain::open_read_only(dir).map_err(|e| Error::Disk(e.into()))
}

/// A directory the VMM staged; removed however the commit ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scratch file removed however the commit ends.
/// A scratch file removed however the operation ends.
pub(crate) struct ScratchFile(pub PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Which file of the layer holds `value` (in one of the encodings the scan
/// searches), for the refusal's message.
fn path_holding(tar: &Path, value: &[u8]) -> Option<String> {
    use std::io::Read;
    let patterns = encodings(value);
    let mut archive = tar::Archive::new(std::fs::File::open(tar).ok()?);
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let mut data = Vec::new();
        entry.by_ref().take(256 << 20).read_to_end(&mut data).ok()?;
        let name = entry.path_bytes();
        if patterns.iter().any(|(_, p)| {
            memchr::memmem::find(&data, p).is_some() || memchr::memmem::find(&name, p).is_some()
        }) {
            return Some(format!("/{}", String::from_utf8_lossy(&name)));
        }
    }
    None
}

impl Engine {
    /// Commits a running, paused or halted workspace's changes as a new
    /// image: its image's layers plus one.
    pub fn commit(
        &self,
        name: &str,
        reference: Option<&str>,
        report: &dyn Reporter,
    ) -> Result<Committed> {
        let started = Instant::now();
        let store = ImageStore::new(&self.state.root);
        let reference = reference.map(reference::normalise).transpose()?;
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = open(&self.state, name)?;
        match status {
            Status::Running | Status::Paused | Status::Halted => {}
            s => {
                return Err(conflict(
                    &ws.name,
                    format!(
                        "workspace {} is {s}; only a running, paused or halted workspace can be committed",
                        ws.name
                    ),
                ))
            }
        }
        let base = base_image(&store, &rec)?;
        let reference = match reference {
            Some(r) => r,
            None => default_reference(&base, &ws.name)?,
        };
        let _busy = BusyGuard::mark(&ws, "committing", &reference)?;
        let _building = building::mark(&store, &reference, &format!("workspace {}", ws.name))?;
        let secrets = SecretStore::of(&ws).all()?;
        report.step(&format!("reading workspace {}'s changes", ws.name));
        let tar = ScratchFile(commit::scratch_tar(&store)?);
        let (written, held) = with_upper(&ws, status, Hold::FreezeChain, |fs| {
            let out =
                std::fs::File::create(&tar.0).io_ctx(|| format!("creating {}", tar.0.display()))?;
            let mut out = std::io::BufWriter::new(out);
            let w = upper::write_layer(fs, &mut out, MAX_UNPACKED_BYTES)
                .map_err(|e| upper_error(&ws.name, e))?;
            std::io::Write::flush(&mut out).io_ctx(|| format!("writing {}", tar.0.display()))?;
            Ok(w)
        })?;
        // Secrets never go into an image.
        report.step("searching the new layer for secrets");
        if let Some(leak) = scan(&[tar.0.as_path()], &secrets)
            .io_ctx(|| "searching the new layer for secrets".into())?
        {
            let value = secrets.iter().find(|(k, _)| *k == leak.key).map(|(_, v)| v);
            let path = value
                .and_then(|v| path_holding(&tar.0, v.as_ref()))
                .unwrap_or_else(|| "a file".into());
            return Err(Error::SecretInLayer {
                workspace: ws.name.clone(),
                key: leak.key,
                path,
                encoding: leak.encoding,
            });
        }
        let (image, layer) = commit::finish(
            &store,
            &tar.0,
            &written.diff_id,
            CommitInput {
                base: Some(&base),
                reference: Some(reference),
                created_by: format!("microagent commit {}", ws.name),
            },
            report.image_progress(),
        )?;
        Ok(Committed {
            workspace: ws.name.clone(),
            image,
            layer,
            entries: written.entries,
            duration_ms: started.elapsed().as_millis() as u64,
            paused_ms: held.map(|d| d.as_millis() as u64),
        })
    }

    /// What changed in a workspace against its image (`docker diff`).
    pub fn diff(&self, name: &str) -> Result<Diff> {
        let store = ImageStore::new(&self.state.root);
        let super::Opened {
            ws,
            lock: _lock,
            rec,
            status,
        } = open(&self.state, name)?;
        match status {
            Status::Running | Status::Paused | Status::Halted => {}
            Status::Created => {
                return Ok(Diff {
                    workspace: ws.name.clone(),
                    changes: Vec::new(),
                })
            }
            s => {
                return Err(conflict(
                    &ws.name,
                    format!("workspace {} is {s}; start it to see its changes", ws.name),
                ))
            }
        }
        let base = base_image(&store, &rec)?;
        let lower = commit::lower_paths(&store, &base)?;
        let (changes, _) = with_upper(&ws, status, Hold::WhileFrozen, |fs| {
            upper::changes(fs, &lower).map_err(|e| upper_error(&ws.name, e))
        })?;
        Ok(Diff {
            workspace: ws.name.clone(),
            changes,
        })
    }
}
