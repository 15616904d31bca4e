//! Content-addressed blob storage (`images/blobs/sha256/<hex>`). A blob only
//! gets its final name after its size and sha256 matched what the manifest
//! announced, so whatever is in the store can be trusted and a failed or
//! hostile download leaves nothing behind.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::digest::{Digest, HashingWriter};
use super::{ImageError, Result};

pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn new(images_root: &Path) -> BlobStore {
        BlobStore {
            dir: images_root.join("blobs/sha256"),
        }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// True when a verified blob of that digest and size is stored.
    pub fn has(&self, digest: &Digest, size: u64) -> bool {
        std::fs::metadata(self.path(digest)).is_ok_and(|m| m.len() == size)
    }

    /// Starts writing a blob that must turn out to have `digest` and `size`.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter> {
        std::fs::create_dir_all(&self.dir).map_err(ImageError::io(&self.dir))?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            digest.short(),
            std::process::id(),
            unique()
        ));
        let file = File::create(&tmp).map_err(ImageError::io(&tmp))?;
        Ok(BlobWriter {
            out: Some(HashingWriter::new(file, size)),
            tmp,
            dest: self.path(digest),
            digest: digest.clone(),
            size,
        })
    }

    /// Copies a blob from `src` into the store, verifying it.
    pub fn put(&self, src: &mut dyn Read, digest: &Digest, size: u64) -> Result<PathBuf> {
        if self.has(digest, size) {
            return Ok(self.path(digest));
        }
        let mut w = self.writer(digest, size)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(ImageError::io(&w.tmp))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.commit()
    }

    /// Moves `file` (on the store's filesystem, already hashed to
    /// `digest` by the caller that wrote it) into the store.
    pub fn adopt(&self, file: &Path, digest: &Digest) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(ImageError::io(&self.dir))?;
        let dest = self.path(digest);
        std::fs::rename(file, &dest).map_err(ImageError::io(&dest))?;
        Ok(dest)
    }

    /// Reads a small stored JSON blob, refusing anything over `limit`.
    pub fn read_small(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let len = std::fs::metadata(&path)
            .map_err(ImageError::io(&path))?
            .len();
        if len > limit {
            return Err(ImageError::TooLarge {
                what: format!("blob {digest}"),
                size: len,
                limit,
            });
        }
        std::fs::read(&path).map_err(ImageError::io(&path))
    }
}

/// A blob being written; dropped without `commit` it removes its temp file.
pub struct BlobWriter {
    out: Option<HashingWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    digest: Digest,
    size: u64,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer used after commit");
        out.write_all(data).map_err(|e| {
            if out.count() + data.len() as u64 > self.size {
                ImageError::SizeMismatch {
                    digest: self.digest.to_string(),
                    expected: self.size,
                    actual: out.count() + data.len() as u64,
                }
            } else {
                ImageError::Io {
                    path: self.tmp.clone(),
                    source: e,
                }
            }
        })
    }

    pub fn written(&self) -> u64 {
        self.out.as_ref().map_or(0, |o| o.count())
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        let (file, actual, count) = self.out.take().expect("committed twice").finish();
        if count != self.size {
            return Err(ImageError::SizeMismatch {
                digest: self.digest.to_string(),
                expected: self.size,
                actual: count,
            });
        }
        if actual != self.digest {
            return Err(ImageError::DigestMismatch {
                digest: self.digest.to_string(),
                actual: actual.hex().to_string(),
            });
        }
        file.sync_all().map_err(ImageError::io(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(ImageError::io(&self.dest))?;
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.out.is_some() || !self.dest.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A process-unique suffix for temp names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (NEXT.fetch_add(1, Ordering::Relaxed) << 32) ^ nanos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_blob_is_stored_and_bad_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let data = b"layer bytes";
        let d = Digest::of_bytes(data);
        store.put(&mut &data[..], &d, data.len() as u64).unwrap();
        assert!(store.has(&d, data.len() as u64));

        let wrong = Digest::of_bytes(b"something else");
        let err = store
            .put(&mut &data[..], &wrong, data.len() as u64)
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        let err = store.put(&mut &data[..], &wrong, 3).unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        let err = store.put(&mut &data[..], &wrong, 100).unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![d.hex().to_string()]);
    }
}
