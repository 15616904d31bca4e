//! sha256 of files and bytes, as lowercase hex.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// `sha256_file`, remembered in `cache_dir` under the file's identity:
/// device, inode, size, mtime and ctime (as git's index does; ctime
/// cannot be set back, so any change to the file names a new entry).
/// Kernels and the agent are hashed on every create, restore and fork;
/// this reads each version once.
pub fn sha256_file_cached(path: &Path, cache_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let id = format!(
        "{:x}-{:x}-{:x}-{}.{}-{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    let entry = cache_dir.join(&id);
    if let Ok(text) = std::fs::read_to_string(&entry) {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(text);
        }
    }
    let sha = sha256_file(path)?;
    // The file may have changed while it was read: remember the hash only
    // if its identity still holds.
    let after = std::fs::metadata(path)?;
    if (after.size(), after.mtime_nsec(), after.ctime_nsec())
        == (m.size(), m.mtime_nsec(), m.ctime_nsec())
        && std::fs::create_dir_all(cache_dir).is_ok()
    {
        let tmp = cache_dir.join(format!(".{id}.{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, sha.as_bytes()));
        if written.is_ok() && std::fs::rename(&tmp, &entry).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(sha)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_hash_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (file, cache) = (dir.path().join("f"), dir.path().join("cache"));
        std::fs::write(&file, b"abc").unwrap();
        let first = super::sha256_file_cached(&file, &cache).unwrap();
        assert_eq!(first, super::sha256_bytes(b"abc"));
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        assert_eq!(super::sha256_file_cached(&file, &cache).unwrap(), first);
        std::fs::write(&file, b"abd").unwrap();
        assert_eq!(
            super::sha256_file_cached(&file, &cache).unwrap(),
            super::sha256_bytes(b"abd")
        );
    }

    #[test]
    fn known_digest() {
        assert_eq!(
            super::sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
