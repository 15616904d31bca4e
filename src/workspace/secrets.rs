//! Host-side secret values of a workspace: `<workspace>/secrets/<KEY>`,
//! files of mode 0600 in a 0700 directory, outside every snapshot
//! directory. Values are never logged, printed, or written into records
//! or manifests; in memory they are held in `Zeroizing` buffers.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use guest_agent::{valid_secret_key, MAX_FRAME, MAX_SECRETS};
use zeroize::Zeroizing;

use super::store::WorkspaceDir;

/// A value must fit in one agent frame.
pub const MAX_VALUE: usize = MAX_FRAME;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("invalid secret key {0:?}: use 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'")]
    InvalidKey(String),
    #[error("secret {key} is {len} bytes; the limit is {MAX_VALUE}")]
    TooLarge { key: String, len: usize },
    #[error("secret {0} is empty")]
    Empty(String),
    #[error("workspace {name} already has {MAX_SECRETS} secrets")]
    TooMany { name: String },
    #[error("secret {key} does not exist in workspace {name}")]
    NotFound { name: String, key: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub type Value = Zeroizing<Vec<u8>>;

/// Reads a value from a file (or `-` for stdin), bounded, into a wiped buffer.
pub fn read_value_file(key: &str, path: &Path) -> Result<Value, SecretError> {
    if !valid_secret_key(key) {
        return Err(SecretError::InvalidKey(key.to_string()));
    }
    let mut v = Zeroizing::new(Vec::new());
    let limit = MAX_VALUE as u64 + 1;
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut v)
            .map_err(io(path))?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut v))
            .map_err(io(path))?;
    }
    check_value(key, &v)?;
    Ok(v)
}

fn check_value(key: &str, value: &[u8]) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Empty(key.to_string()));
    }
    if value.len() > MAX_VALUE {
        return Err(SecretError::TooLarge {
            key: key.to_string(),
            len: value.len(),
        });
    }
    Ok(())
}

pub struct SecretStore {
    name: String,
    dir: PathBuf,
}

impl SecretStore {
    pub fn of(ws: &WorkspaceDir) -> SecretStore {
        SecretStore {
            name: ws.name.clone(),
            dir: ws.dir.join("secrets"),
        }
    }

    fn ensure_dir(&self) -> Result<(), SecretError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        // An existing directory keeps its mode: force 0700.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&self.dir))
    }

    fn path(&self, key: &str) -> Result<PathBuf, SecretError> {
        if !valid_secret_key(key) {
            return Err(SecretError::InvalidKey(key.to_string()));
        }
        Ok(self.dir.join(key))
    }

    pub fn keys(&self) -> Result<Vec<String>, SecretError> {
        let mut keys = Vec::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(io(&self.dir))?;
                    let k = e.file_name().to_string_lossy().into_owned();
                    if valid_secret_key(&k) {
                        keys.push(k);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&self.dir)(e)),
        }
        keys.sort();
        Ok(keys)
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), SecretError> {
        let path = self.path(key)?;
        check_value(key, value)?;
        if !path.exists() && self.keys()?.len() >= MAX_SECRETS {
            return Err(SecretError::TooMany {
                name: self.name.clone(),
            });
        }
        self.ensure_dir()?;
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(value)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    pub fn get(&self, key: &str) -> Result<Value, SecretError> {
        let path = self.path(key)?;
        let mut f = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SecretError::NotFound {
                name: self.name.clone(),
                key: key.to_string(),
            },
            _ => io(&path)(e),
        })?;
        let mut v = Zeroizing::new(Vec::new());
        Read::by_ref(&mut f)
            .take(MAX_VALUE as u64 + 1)
            .read_to_end(&mut v)
            .map_err(io(&path))?;
        if v.len() > MAX_VALUE {
            return Err(SecretError::TooLarge {
                key: key.to_string(),
                len: v.len(),
            });
        }
        Ok(v)
    }

    /// Every secret, sorted by key.
    pub fn all(&self) -> Result<Vec<(String, Value)>, SecretError> {
        self.keys()?
            .into_iter()
            .map(|k| {
                let v = self.get(&k)?;
                Ok((k, v))
            })
            .collect()
    }

    pub fn remove(&self, key: &str) -> Result<(), SecretError> {
        let path = self.path(key)?;
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SecretError::NotFound {
                name: self.name.clone(),
                key: key.to_string(),
            },
            _ => io(&path)(e),
        })
    }

    /// Copies every secret into `other` (a fork inherits its source's set).
    pub fn copy_to(&self, other: &SecretStore) -> Result<(), SecretError> {
        for (k, v) in self.all()? {
            other.set(&k, &v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn values_are_private_files_and_keys_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = WorkspaceDir {
            name: "builder".into(),
            dir: tmp.path().to_path_buf(),
        };
        let s = SecretStore::of(&ws);
        assert!(s.keys().unwrap().is_empty());
        s.set("API_TOKEN", b"hunter2-hunter2").unwrap();
        s.set("db.pass", b"x").unwrap();
        assert_eq!(s.keys().unwrap(), ["API_TOKEN", "db.pass"]);
        assert_eq!(&*s.get("API_TOKEN").unwrap(), b"hunter2-hunter2");
        let dir_mode = std::fs::metadata(tmp.path().join("secrets"))
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let file_mode = std::fs::metadata(tmp.path().join("secrets/API_TOKEN"))
            .unwrap()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        assert!(matches!(
            s.set("../x", b"v"),
            Err(SecretError::InvalidKey(_))
        ));
        assert!(matches!(s.set("k", b""), Err(SecretError::Empty(_))));
        let err = s.remove("nope").unwrap_err().to_string();
        assert_eq!(err, "secret nope does not exist in workspace builder");
        s.remove("db.pass").unwrap();
        assert_eq!(s.keys().unwrap(), ["API_TOKEN"]);
    }
}
