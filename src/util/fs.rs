//! Small files written whole or not at all, and read with a bound.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Records, manifests and markers are small; anything bigger is not ours.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Opens `path` for reading, refusing a symbolic link as its last
/// component: workspace directories are writable by the jailed VMM's
/// user, which must not point a root-run read at another file.
pub fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads a small file, refusing anything over MAX_RECORD_BYTES.
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_nofollow(path)?;
    let mut buf = Vec::new();
    f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_RECORD_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

/// The last `max` bytes of a file (all of it if smaller): logs a guest can
/// make grow are read from their end, never whole.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_nofollow(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Temp file in the same directory, fsync, rename, fsync the directory:
/// readers see the old content or the new, never half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_replacing(path, data, true)
}

/// Replaces `path` by one rename like [`write_atomic`], without waiting for
/// the disk: a crash leaves the old or the new content, but perhaps the
/// old. [`sync_with_dir`] makes it durable later.
pub fn write_atomic_unsynced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_replacing(path, data, false)
}

/// Makes a file and its directory entry durable.
pub fn sync_with_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

fn write_replacing(path: &Path, data: &[u8], sync: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        // Records, manifests and chain specs describe guest data: private
        // whatever the caller's umask. Never through a link another user
        // (the jailed VMM's) planted at the temporary name.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if sync {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(super::read_tail(&p, 4).unwrap(), b"6789");
        assert_eq!(super::read_tail(&p, 100).unwrap(), b"0123456789");
    }

    #[test]
    fn links_planted_at_our_names_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let rec = dir.path().join("rec.json");
        std::os::unix::fs::symlink(&victim, &rec).unwrap();
        assert!(super::read_bounded(&rec).is_err());
        assert!(super::read_tail(&rec, 4).is_err());
        let tmp = dir
            .path()
            .join(format!(".rec.json.tmp.{}", std::process::id()));
        std::fs::remove_file(&rec).unwrap();
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(super::write_atomic(&rec, b"new").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
