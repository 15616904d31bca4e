//! /run/secrets: a tmpfs (0700) of root-owned 0400 files, never the root
//! disk. Values arrive as raw frames, are written once and their buffers
//! wiped; scrubbing overwrites each file's bytes in place (tmpfs pages are
//! guest memory) before unlinking it. The guest kernel runs with
//! `init_on_free=1`, so pages freed by this or by any process are zeroed.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use guest_agent::{read_frame, valid_secret_key, Kind, SecretMeta, MAX_SECRETS, SECRETS_DIR};

/// Overwrites `buf` in a way the compiler may not optimise away.
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference into `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

fn dir() -> &'static Path {
    Path::new(SECRETS_DIR)
}

/// Mounts the tmpfs unless /run/secrets already is a mount point.
fn ensure_mounted() -> Result<(), String> {
    std::fs::create_dir_all(dir()).map_err(|e| format!("{SECRETS_DIR}: {e}"))?;
    let here = std::fs::metadata(dir()).map_err(|e| e.to_string())?.dev();
    let parent = std::fs::metadata("/run").map_err(|e| e.to_string())?.dev();
    if here == parent {
        crate::init::mount_tmpfs(SECRETS_DIR, "mode=0700,size=16m")?;
    }
    Ok(())
}

fn path(key: &str) -> Result<PathBuf, String> {
    if !valid_secret_key(key) {
        return Err(format!("invalid secret key {key:?}"));
    }
    Ok(dir().join(key))
}

/// Overwrites a secret file's bytes with zeros, then unlinks it.
fn scrub_file(p: &Path) -> Result<(), String> {
    let len = match std::fs::metadata(p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", p.display())),
    };
    // Make it writable by us (root ignores modes, but be explicit).
    let mut f = OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    let zeros = vec![0u8; len as usize];
    f.write_all(&zeros)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", p.display()))?;
    drop(f);
    std::fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Scrubs every secret (and any half-written temp file).
pub fn scrub_all() -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Ok(());
    };
    for e in entries.flatten() {
        scrub_file(&e.path())?;
    }
    Ok(())
}

pub fn remove(keys: &[String]) -> Result<(), String> {
    for k in keys {
        scrub_file(&path(k)?)?;
    }
    Ok(())
}

fn write_secret(key: &str, value: &[u8]) -> Result<(), String> {
    let dest = path(key)?;
    scrub_file(&dest)?;
    let tmp = dir().join(format!(".{key}.tmp"));
    let _ = scrub_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(value)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))
}

/// Reads one value frame per secret from `reader` and installs it.
pub fn put(secrets: &[SecretMeta], replace: bool, reader: &mut impl Read) -> Result<(), String> {
    if secrets.len() > MAX_SECRETS {
        return Err(format!("more than {MAX_SECRETS} secrets"));
    }
    ensure_mounted()?;
    if replace {
        let keep: Vec<&str> = secrets.iter().map(|s| s.key.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name.as_str()) {
                    scrub_file(&e.path())?;
                }
            }
        }
    }
    for s in secrets {
        let mut frame = read_frame(reader).map_err(|e| format!("secret {}: {e}", s.key))?;
        let result = if frame.kind != Kind::Stdin || frame.payload.len() != s.len as usize {
            Err(format!(
                "secret {}: expected {} bytes of value, got a {:?} frame of {}",
                s.key,
                s.len,
                frame.kind,
                frame.payload.len()
            ))
        } else {
            write_secret(&s.key, &frame.payload)
        };
        wipe(&mut frame.payload);
        result?;
    }
    Ok(())
}
