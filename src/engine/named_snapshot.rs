//! Named image snapshots (seed 001): base snapshots (a workspace's root
//! committed whole), home snapshots (the files a user lists under their
//! home, as a one-layer image) and personal ones (the same, private to
//! the host user who made them, one of them the user's default).
//!
//! A home snapshot is read from the running guest: the agent archives the
//! listed paths (`ArchivePaths`) and the host checks every entry
//! (`workspace::home_capture`) before the layer goes into the store. New
//! workspaces get them as layers stacked over the base image, base, then
//! home, then personal (`resolve_stack`), so a later one's file wins.

use std::path::Path;
use std::time::Instant;

use guest_agent::Request;

use super::commit::{Committed, ScratchFile};
use super::copy::{copy_out, read_archive};
use super::create::{RegistryOptions, RootSource};
use super::{invalid, Engine, Error, IoContext, Reporter, Result};
use crate::digest::sha256_file;
use crate::image::commit::{self, CommitInput};
use crate::image::digest::Digest;
use crate::image::ops as image_ops;
use crate::image::store::{ImageRecord, ImageStore};
use crate::workspace::home_capture::{filter_archive, home_of, parse_list, valid_home};
use crate::workspace::named_snapshots::{Kind, NamedSnapshot, Names, NamesError};
use crate::workspace::store::now_rfc3339;

/// The host user a command runs as: personal snapshots are theirs.
pub fn caller_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// What `snapshot create --home/--personal` takes.
#[derive(Debug, Clone)]
pub struct HomeOptions {
    /// Home or Personal.
    pub kind: Kind,
    pub name: String,
    /// Whose home (default: the image's `User`, else root).
    pub user: Option<String>,
    /// Personal only: make it the caller's default.
    pub set_default: bool,
}

/// What a home or personal snapshot holds.
#[derive(Debug, Clone)]
pub struct HomeMade {
    pub snapshot: NamedSnapshot,
    pub entries: u64,
    /// Listed paths the guest did not have.
    pub missing: Vec<String>,
    /// FIFOs, sockets and device nodes left out.
    pub skipped: Vec<String>,
    pub is_default: bool,
    pub duration_ms: u64,
}

/// Where a kind's lists live in the home.
fn list_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Personal => ".snapshot.personal",
        _ => ".snapshot",
    }
}

/// Reads a small text file the guest handed over (a list, passwd).
fn read_small(path: &Path, what: &str) -> Result<String> {
    let meta = std::fs::symlink_metadata(path).io_ctx(|| what.to_string())?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(invalid(format!(
            "{what} is not a regular file of at most 1 MiB"
        )));
    }
    let data = std::fs::read(path).io_ctx(|| what.to_string())?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// Whether a copy-out failed because the guest has no such path.
fn is_missing(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("os error 2") || text.contains("No such file")
}

impl Engine {
    fn names(&self) -> Names {
        Names::new(&self.state.root)
    }

    /// `snapshot create WS --base NAME`: commits the workspace (its image's
    /// layers plus its changes) as base snapshot `name`.
    pub fn snapshot_base(
        &self,
        workspace: &str,
        name: &str,
        report: &dyn Reporter,
    ) -> Result<(NamedSnapshot, Committed)> {
        let names = self.names();
        let _lock = names.lock(Kind::Base, 0)?;
        names.check_free(Kind::Base, 0, name)?;
        let reference = format!("localhost/snapshot/{name}:latest");
        let made = self.commit(workspace, Some(&reference), report)?;
        let snap = NamedSnapshot {
            name: name.into(),
            kind: Kind::Base,
            image: made.image.digest.to_string(),
            workspace: workspace.into(),
            home: None,
            owner_uid: None,
            bytes: made.layer.uncompressed_bytes,
            created: now_rfc3339(),
        };
        names.put(&snap, 0)?;
        Ok((snap, made))
    }

    /// `snapshot create WS --home NAME` (or `--personal NAME`): the files
    /// the owner lists in the running guest, as a one-layer image.
    pub fn snapshot_home(
        &self,
        workspace: &str,
        opts: &HomeOptions,
        report: &dyn Reporter,
    ) -> Result<HomeMade> {
        let started = Instant::now();
        if opts.kind == Kind::Base {
            return Err(invalid("a base snapshot is a commit: use snapshot_base"));
        }
        let uid = caller_uid();
        let names = self.names();
        let _lock = names.lock(opts.kind, uid)?;
        names.check_free(opts.kind, uid, &opts.name)?;
        let store = ImageStore::new(&self.state.root);
        let rec = self.state.existing(workspace)?.read()?;
        let image_user = match rec.image_digest.as_deref() {
            Some(d) => store.find(d)?.and_then(|i| i.run.user),
            None => None,
        };
        let user = opts.user.clone().or(image_user).unwrap_or_default();

        std::fs::create_dir_all(store.tmp_dir()).io_ctx(|| "the image store".into())?;
        let scratch = tempfile::Builder::new()
            .prefix("home-")
            .tempdir_in(store.tmp_dir())
            .io_ctx(|| "a scratch directory".into())?;
        report.step(&format!(
            "finding {}'s home in workspace {workspace}",
            shown_user(&user)
        ));
        copy_out(&self.state, workspace, "/etc/passwd", scratch.path())?;
        let passwd = read_small(&scratch.path().join("passwd"), "the guest's /etc/passwd")?;
        let home = home_of(&passwd, &user).ok_or_else(|| {
            invalid(format!(
                "user {} is not in workspace {workspace}'s /etc/passwd: pass --user with a user that is",
                shown_user(&user)
            ))
        })?;
        if !valid_home(&home) {
            return Err(invalid(format!(
                "user {}'s home in workspace {workspace} is {home:?}, not a directory a snapshot can hold",
                shown_user(&user)
            )));
        }

        let dir = format!("{home}/{}", list_dir(opts.kind));
        let read_list = |file: &str, required: bool| -> Result<Vec<String>> {
            let guest = format!("{dir}/{file}");
            let local = scratch.path().join(file);
            match copy_out(&self.state, workspace, &guest, scratch.path()) {
                Ok(()) => {}
                Err(e) if !required && is_missing(&e) => return Ok(Vec::new()),
                Err(e) if is_missing(&e) => {
                    return Err(invalid(format!(
                        "workspace {workspace} has no {guest}: list the files and folders to capture there, one per line, relative to {home}"
                    )))
                }
                Err(e) => return Err(e),
            }
            let text = read_small(&local, &guest)?;
            parse_list(&text, &guest, &home).map_err(invalid)
        };
        let includes = read_list("includes.txt", true)?;
        let excludes = read_list("excludes.txt", false)?;
        if includes.is_empty() {
            return Err(invalid(format!(
                "{dir}/includes.txt lists nothing to capture"
            )));
        }

        report.step(&format!("reading {} listed paths", includes.len()));
        let tar = ScratchFile(commit::scratch_tar(&store)?);
        let request = Request::ArchivePaths {
            includes: includes.clone(),
            excludes: excludes.clone(),
        };
        let got = read_archive(&self.state, workspace, &request, |stream| {
            let out = std::fs::File::create(&tar.0)?;
            filter_archive(stream, std::io::BufWriter::new(out), &includes, &excludes)
        })?;
        let missing: Vec<String> = includes
            .iter()
            .filter(|i| !got.present.contains(i))
            .cloned()
            .collect();
        if got.present.is_empty() {
            return Err(invalid(format!(
                "none of the paths {dir}/includes.txt lists exist in workspace {workspace}"
            )));
        }
        let diff_id = Digest::from_hex(sha256_file(&tar.0).io_ctx(|| "the new layer".into())?)
            .map_err(|e| invalid(e.to_string()))?;
        let reference = match opts.kind {
            Kind::Personal => None,
            _ => Some(format!("localhost/home/{}:latest", opts.name)),
        };
        let (image, layer) = commit::finish(
            &store,
            &tar.0,
            &diff_id,
            CommitInput {
                base: None,
                reference,
                created_by: format!(
                    "microagent snapshot create {workspace} --{} {}",
                    opts.kind.name(),
                    opts.name
                ),
            },
            report.image_progress(),
        )?;
        let snap = NamedSnapshot {
            name: opts.name.clone(),
            kind: opts.kind,
            image: image.digest.to_string(),
            workspace: workspace.into(),
            home: Some(home),
            owner_uid: (opts.kind == Kind::Personal).then_some(uid),
            bytes: layer.uncompressed_bytes,
            created: now_rfc3339(),
        };
        names.put(&snap, uid)?;
        let is_default = opts.kind == Kind::Personal && opts.set_default;
        if is_default {
            names.set_personal_default(uid, &opts.name)?;
        }
        Ok(HomeMade {
            snapshot: snap,
            entries: got.entries,
            missing,
            skipped: got.skipped,
            is_default,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Base and home snapshots, and the caller's personal ones, with the
    /// caller's default personal snapshot.
    pub fn named_snapshots(&self) -> Result<(Vec<NamedSnapshot>, Option<String>)> {
        let uid = caller_uid();
        let names = self.names();
        Ok((names.list(uid)?, names.personal_default(uid)?))
    }

    /// Removes a named snapshot (its image stays in the store until
    /// `image rm`; workspaces made from it keep working).
    pub fn named_snapshot_delete(&self, name: &str, personal: bool) -> Result<NamedSnapshot> {
        let kind = if personal { Kind::Personal } else { Kind::Base };
        let uid = caller_uid();
        let names = self.names();
        let _lock = names.lock(kind, uid)?;
        match names.remove(kind, uid, name) {
            Err(NamesError::NotFound { .. }) if self.state.existing(name).is_ok() => {
                Err(invalid(format!(
                    "{name} is a workspace, not a named snapshot: snapshot delete {name} TAG deletes one of its snapshots"
                )))
            }
            r => Ok(r?),
        }
    }

    pub fn set_personal_default(&self, name: &str) -> Result<()> {
        let uid = caller_uid();
        let names = self.names();
        let _lock = names.lock(Kind::Personal, uid)?;
        Ok(names.set_personal_default(uid, name)?)
    }

    /// The named snapshot `name` of `kind` and its image.
    pub(crate) fn named_image(
        &self,
        kind: Kind,
        name: &str,
    ) -> Result<(NamedSnapshot, ImageRecord)> {
        let snap = self
            .names()
            .get(kind, caller_uid(), name)?
            .filter(|s| s.kind == kind)
            .ok_or_else(|| Error::NotFound {
                kind: match kind {
                    Kind::Base => "base snapshot",
                    Kind::Home => "home snapshot",
                    Kind::Personal => "personal snapshot",
                },
                name: name.into(),
            })?;
        let image = ImageStore::new(&self.state.root)
            .find(&snap.image)?
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                name: format!("{} (of {} snapshot {name})", snap.image, kind.name()),
            })?;
        Ok((snap, image))
    }

    /// The image a workspace of `source` boots: the image or base
    /// snapshot, with the home snapshot `home` and (if `personal`) the
    /// caller's default personal snapshot stacked over it. With any
    /// stacked, also how to show it (`BASE + home:H + personal:P`).
    pub(crate) fn root_image(
        &self,
        source: &RootSource,
        registry: &RegistryOptions,
        home: Option<&str>,
        personal: bool,
        report: &dyn Reporter,
    ) -> Result<(ImageRecord, Option<String>)> {
        let store = ImageStore::new(&self.state.root);
        let base = match source {
            RootSource::BaseSnapshot(name) if !name.starts_with("oci://") => {
                self.named_image(Kind::Base, name)?.1
            }
            RootSource::BaseSnapshot(r) | RootSource::Image(r) => {
                let image = r.strip_prefix("oci://").unwrap_or(r);
                image_ops::ensure(
                    &store,
                    image,
                    &registry.pull_options(),
                    report.image_progress(),
                )?
                .record
            }
            RootSource::Rootfs(p) => {
                return Err(invalid(format!(
                    "{} is a root disk, not an image: nothing can be stacked over it",
                    p.display()
                )))
            }
        };
        let base_shown = base
            .refs
            .first()
            .cloned()
            .unwrap_or_else(|| base.digest.to_string());
        let (image, applied) = self.resolve_stack(base, home, personal, report)?;
        let shown =
            (!applied.is_empty()).then(|| format!("{base_shown} + {}", applied.join(" + ")));
        Ok((image, shown))
    }

    /// `base` with the home snapshot `home` (if named) and the caller's
    /// default personal snapshot (if `personal` and one is set) stacked
    /// over it, in that order. Returns the image to create from and the
    /// snapshots applied (`KIND:NAME`).
    fn resolve_stack(
        &self,
        base: ImageRecord,
        home: Option<&str>,
        personal: bool,
        report: &dyn Reporter,
    ) -> Result<(ImageRecord, Vec<String>)> {
        let mut tops = Vec::new();
        let mut applied = Vec::new();
        if let Some(h) = home {
            tops.push(self.named_image(Kind::Home, h)?.1);
            applied.push(format!("home:{h}"));
        }
        if personal {
            if let Some(p) = self.names().personal_default(caller_uid())? {
                tops.push(self.named_image(Kind::Personal, &p)?.1);
                applied.push(format!("personal:{p}"));
            }
        }
        if tops.is_empty() {
            return Ok((base, applied));
        }
        let store = ImageStore::new(&self.state.root);
        let parts: Vec<(&ImageRecord, String)> = tops
            .iter()
            .zip(&applied)
            .map(|(t, a)| (t, format!("microagent {a}")))
            .collect();
        let stacked = commit::stack(&store, &base, &parts, report.image_progress())?;
        Ok((stacked, applied))
    }
}

fn shown_user(user: &str) -> &str {
    if user.is_empty() {
        "root"
    } else {
        user
    }
}

/// One row of `snapshot list` over every kind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatalogRow {
    /// base, home, personal, memory or container.
    pub kind: &'static str,
    /// A named snapshot's name, or `WORKSPACE:TAG`.
    pub name: String,
    /// What it was taken from (a workspace) or holds (volumes).
    pub source: String,
    pub size_bytes: u64,
    pub created: String,
    /// The caller's default personal snapshot.
    pub default: bool,
}

impl Engine {
    /// Every snapshot the caller can use: base and home snapshots, their
    /// own personal ones, then each workspace's memory and container
    /// snapshots.
    pub fn snapshot_catalog(&self) -> Result<Vec<CatalogRow>> {
        let (named, default) = self.named_snapshots()?;
        let mut rows: Vec<CatalogRow> = named
            .into_iter()
            .map(|s| CatalogRow {
                kind: s.kind.name(),
                default: s.kind == Kind::Personal && default.as_deref() == Some(&s.name),
                name: s.name,
                source: format!("workspace {}", s.workspace),
                size_bytes: s.bytes,
                created: s.created,
            })
            .collect();
        // Another user's workspaces are not theirs to read (0700).
        let workspaces = match self.state.list() {
            Ok(w) => w,
            Err(crate::workspace::store::StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        for ws in workspaces {
            for s in self.snapshot_list(&ws, None)? {
                rows.push(CatalogRow {
                    kind: "memory",
                    name: format!("{ws}:{}", s.manifest.tag),
                    source: s
                        .manifest
                        .image
                        .clone()
                        .unwrap_or_else(|| format!("workspace {ws}")),
                    size_bytes: s.size_bytes,
                    created: s.manifest.created.clone(),
                    default: false,
                });
            }
            for c in self.container_snapshot_list(&ws, None)? {
                rows.push(CatalogRow {
                    kind: "container",
                    name: format!("{ws}:{}", c.tag),
                    source: format!("volumes {}", c.volumes.join(", ")),
                    size_bytes: 0,
                    created: c.created,
                    default: false,
                });
            }
        }
        Ok(rows)
    }
}
