//! Named image snapshots: base snapshots (a workspace committed whole)
//! and home snapshots share one namespace; personal snapshots live in one
//! namespace per host user, keyed by uid, in a directory only that user
//! can read, with at most one default.
//!
//! Layout: `<state>/snapshot-names/shared/<name>.json` and
//! `<state>/snapshot-names/personal/<uid>/{<name>.json, default}` (0700).
//! Each record names an image in the store by digest: the snapshot's
//! content is an ordinary OCI image (home and personal ones have one layer).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::store::validate_name;
use crate::util::fs::{read_bounded, write_atomic};
use crate::util::lock::{FileLock, LockError};

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("invalid snapshot name {0:?}: use 1-63 lowercase letters, digits and '-', not starting with '-'")]
    InvalidName(String),
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("snapshot name {name} is taken by the {holder}")]
    Taken { name: String, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid snapshot name record: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl NamesError {
    fn io(path: &Path, source: std::io::Error) -> NamesError {
        NamesError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

fn check_name(name: &str) -> Result<(), NamesError> {
    validate_name(name).map_err(|_| NamesError::InvalidName(name.into()))
}

pub const NAMES_DIR: &str = "snapshot-names";
const DEFAULT_FILE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Base,
    Home,
    Personal,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Home => "home",
            Kind::Personal => "personal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedSnapshot {
    pub name: String,
    pub kind: Kind,
    /// The image's manifest digest in the store.
    pub image: String,
    /// The workspace it was taken from.
    pub workspace: String,
    /// Home and personal snapshots: the guest home directory captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Personal snapshots: the host user that owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// Bytes of the snapshot's own layer(s), uncompressed.
    pub bytes: u64,
    pub created: String,
}

/// The registry of names under a state directory.
pub struct Names {
    root: PathBuf,
}

impl Names {
    pub fn new(state_root: &Path) -> Names {
        Names {
            root: state_root.join(NAMES_DIR),
        }
    }

    fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    fn personal(&self, uid: u32) -> PathBuf {
        self.root.join("personal").join(uid.to_string())
    }

    /// The directory of `kind`'s namespace (for `uid` when personal),
    /// made on first use. `personal/` is sticky and open to all (as
    /// `/tmp`), so each user can make their own directory there, 0700;
    /// one that is not owned by `uid` or is open to others is refused
    /// (another user could have made it first, to read what goes in).
    fn dir(&self, kind: Kind, uid: u32) -> Result<PathBuf, NamesError> {
        let make = |dir: &Path, mode: u32| -> Result<(), NamesError> {
            if !dir.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(dir)
                    .map_err(|e| NamesError::io(dir, e))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| NamesError::io(dir, e))?;
            }
            Ok(())
        };
        if kind != Kind::Personal {
            let dir = self.shared();
            make(&dir, 0o755)?;
            return Ok(dir);
        }
        make(&self.root.join("personal"), 0o1777)?;
        let dir = self.personal(uid);
        if !dir.is_dir() {
            make(&dir, 0o700)?;
            // Root acting for a user (a server on their behalf) makes it
            // theirs.
            if nix::unistd::geteuid().is_root() {
                nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid)), None)
                    .map_err(|e| NamesError::io(&dir, e.into()))?;
            }
        }
        Ok(self.existing(kind, uid)?.expect("made above"))
    }

    /// The directory of `kind`'s namespace if it exists; a personal one
    /// only if `uid` owns it and nobody else can open it.
    fn existing(&self, kind: Kind, uid: u32) -> Result<Option<PathBuf>, NamesError> {
        let dir = match kind {
            Kind::Personal => self.personal(uid),
            _ => self.shared(),
        };
        let meta = match std::fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(NamesError::io(&dir, e)),
        };
        if kind == Kind::Personal && (meta.uid() != uid || meta.mode() & 0o077 != 0) {
            return Err(NamesError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::other(format!(
                    "owned by uid {} with mode {:o}, not by uid {uid} with mode 700: not using it",
                    meta.uid(),
                    meta.mode() & 0o7777
                )),
            });
        }
        Ok(Some(dir))
    }

    /// Held while a namespace is read-modified-written.
    pub fn lock(&self, kind: Kind, uid: u32) -> Result<FileLock, NamesError> {
        let dir = self.dir(kind, uid)?;
        Ok(FileLock::acquire(&dir.join("lock"))?)
    }

    /// The snapshot `name` of `kind`'s namespace, if any.
    pub fn get(
        &self,
        kind: Kind,
        uid: u32,
        name: &str,
    ) -> Result<Option<NamedSnapshot>, NamesError> {
        check_name(name)?;
        let Some(dir) = self.existing(kind, uid)? else {
            return Ok(None);
        };
        let path = dir.join(format!("{name}.json"));
        if !path.exists() {
            return Ok(None);
        }
        let data = read_bounded(&path).map_err(|e| NamesError::io(&path, e))?;
        let snap: NamedSnapshot =
            serde_json::from_slice(&data).map_err(|e| NamesError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Some(snap))
    }

    /// Records `snap`; a name already taken in its namespace is refused,
    /// naming what holds it. Call with [`Names::lock`] held.
    pub fn put(&self, snap: &NamedSnapshot, uid: u32) -> Result<(), NamesError> {
        self.check_free(snap.kind, uid, &snap.name)?;
        let path = self
            .dir(snap.kind, uid)?
            .join(format!("{}.json", snap.name));
        let data = serde_json::to_vec_pretty(snap).expect("a record serialises");
        write_atomic(&path, &data).map_err(|e| NamesError::io(&path, e))?;
        // Shared names are for every user of the host; personal ones sit
        // in their owner's 0700 directory.
        if snap.kind != Kind::Personal {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| NamesError::io(&path, e))?;
        }
        Ok(())
    }

    /// Refuses `name` in `kind`'s namespace when it is taken.
    pub fn check_free(&self, kind: Kind, uid: u32, name: &str) -> Result<(), NamesError> {
        match self.get(kind, uid, name)? {
            Some(old) => Err(NamesError::Taken {
                name: name.into(),
                holder: format!(
                    "{} snapshot from workspace {}",
                    old.kind.name(),
                    old.workspace
                ),
            }),
            None => Ok(()),
        }
    }

    pub fn remove(&self, kind: Kind, uid: u32, name: &str) -> Result<NamedSnapshot, NamesError> {
        let snap = self
            .get(kind, uid, name)?
            .ok_or_else(|| NamesError::NotFound {
                what: format!("{} snapshot {name}", kind.name()),
            })?;
        let dir = self.dir(kind, uid)?;
        std::fs::remove_file(dir.join(format!("{name}.json")))
            .map_err(|e| NamesError::io(&dir, e))?;
        if kind == Kind::Personal && self.personal_default(uid)?.as_deref() == Some(name) {
            let _ = std::fs::remove_file(dir.join(DEFAULT_FILE));
        }
        Ok(snap)
    }

    /// Base and home snapshots (everyone's), then `uid`'s personal ones.
    pub fn list(&self, uid: u32) -> Result<Vec<NamedSnapshot>, NamesError> {
        let mut out = Vec::new();
        for kind in [Kind::Base, Kind::Personal] {
            let Some(dir) = self.existing(kind, uid)? else {
                continue;
            };
            let entries = std::fs::read_dir(&dir).map_err(|e| NamesError::io(&dir, e))?;
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_string)
                })
                .collect();
            names.sort();
            for n in names {
                if let Some(s) = self.get(kind, uid, &n)? {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// `uid`'s default personal snapshot.
    pub fn personal_default(&self, uid: u32) -> Result<Option<String>, NamesError> {
        let Some(dir) = self.existing(Kind::Personal, uid)? else {
            return Ok(None);
        };
        let path = dir.join(DEFAULT_FILE);
        match read_bounded(&path) {
            Ok(d) => {
                let name = String::from_utf8_lossy(&d).trim().to_string();
                check_name(&name)?;
                Ok(Some(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NamesError::io(&path, e)),
        }
    }

    pub fn set_personal_default(&self, uid: u32, name: &str) -> Result<(), NamesError> {
        if self.get(Kind::Personal, uid, name)?.is_none() {
            return Err(NamesError::NotFound {
                what: format!("personal snapshot {name}"),
            });
        }
        let path = self.dir(Kind::Personal, uid)?.join(DEFAULT_FILE);
        write_atomic(&path, name.as_bytes()).map_err(|e| NamesError::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, kind: Kind) -> NamedSnapshot {
        NamedSnapshot {
            name: name.into(),
            kind,
            image: "sha256:00".into(),
            workspace: "w".into(),
            home: None,
            owner_uid: None,
            bytes: 1,
            created: "now".into(),
        }
    }

    #[test]
    fn shared_names_clash_personal_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let names = Names::new(dir.path());
        names.put(&snap("dev", Kind::Base), 0).unwrap();
        let e = names.put(&snap("dev", Kind::Home), 0).unwrap_err();
        assert!(
            e.to_string().contains("base snapshot from workspace w"),
            "{e}"
        );
        names.put(&snap("dev", Kind::Personal), 1000).unwrap();
        names.put(&snap("dev", Kind::Personal), 1001).unwrap();
        assert!(names.put(&snap("dev", Kind::Personal), 1000).is_err());
        let mode = std::fs::metadata(dir.path().join("snapshot-names/personal/1000"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Each user lists the shared names and only their own personal ones.
        let kinds: Vec<_> = names.list(1001).unwrap().iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec![Kind::Base, Kind::Personal]);
        assert_eq!(names.list(1002).unwrap().len(), 1);
    }

    #[test]
    fn a_personal_directory_someone_else_owns_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let names = Names::new(dir.path());
        let me = nix::unistd::getuid().as_raw();
        names.put(&snap("p", Kind::Personal), me).unwrap();
        // As if another user had made it first, or opened it up.
        let mine = dir.path().join(format!("snapshot-names/personal/{me}"));
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = names.list(me).unwrap_err();
        assert!(e.to_string().contains("not using it"), "{e}");
        assert!(names.get(Kind::Personal, me, "p").is_err());
        assert!(names.put(&snap("q", Kind::Personal), me).is_err());
        let personal = dir.path().join("snapshot-names/personal");
        let mode = std::fs::metadata(personal).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);
    }

    #[test]
    fn one_default_per_user_and_removal_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let names = Names::new(dir.path());
        assert!(names.set_personal_default(7, "p").is_err());
        names.put(&snap("p", Kind::Personal), 7).unwrap();
        names.put(&snap("q", Kind::Personal), 7).unwrap();
        names.set_personal_default(7, "p").unwrap();
        names.set_personal_default(7, "q").unwrap();
        assert_eq!(names.personal_default(7).unwrap().as_deref(), Some("q"));
        assert_eq!(names.personal_default(8).unwrap(), None);
        names.remove(Kind::Personal, 7, "q").unwrap();
        assert_eq!(names.personal_default(7).unwrap(), None);
    }
}
