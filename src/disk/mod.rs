//! Root disks that are never copied: a chain of a read-only base, frozen
//! read-only deltas, and one writable top delta (see `chain`). Every user
//! of a file (a workspace, a snapshot, the base cache) holds its own hard
//! link to it, in its own directory beside its own `chain.json`, so the
//! filesystem's link count is the reference count: deleting a snapshot
//! or a workspace never breaks a fork or a later snapshot that reads
//! through its files, and the last user's delete frees them.

pub mod blockset;
pub mod chain;
pub mod spec;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use chain::{Chain, ChainError};

/// The directory, inside a snapshot, that holds the root disk's chain.
pub const SNAPSHOT_DISK_DIR: &str = "disk";
pub use spec::{ChainSpec, CHAIN_FILE, MERGE_DEPTH, SPEC_VERSION};

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A fresh delta name: unique in any chain it will ever be linked into
/// (time, process and a counter), and `create_delta` refuses a clash.
pub fn new_delta_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "d-{nanos:x}-{:x}-{:x}.delta",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates an empty (all-hole) delta of `size` bytes, durably.
pub(crate) fn create_delta(dir: &Path, name: &str, size: u64) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(name))?;
    f.set_len(size)?;
    f.sync_all()?;
    Ok(f)
}

/// The copy-on-write block for chains stored in `dir`: 4 KiB, or the
/// filesystem's block if larger (an allocated extent must never cover
/// part of one of our blocks).
pub fn block_size_for(dir: &Path) -> std::io::Result<u32> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let fs_block = u32::try_from(st.block_size()).unwrap_or(u32::MAX);
    Ok(fs_block.max(4096).next_power_of_two())
}

/// Hard-links `name` from `src` into `dst`; copies it (keeping holes and
/// allocation exactly, since a delta's allocation is its content) when the
/// two are on different filesystems.
fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(src, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let s = crate::util::fs::open_nofollow(src)?;
            let d = File::options().write(true).create_new(true).open(dst)?;
            let len = s.metadata()?.len();
            d.set_len(len)?;
            copy_extents(&s, &d, &crate::util::copy::data_extents(&s, len)?)?;
            d.sync_all()
        }
        other => other,
    }
}

fn copy_extents(src: &File, dst: &File, extents: &[(u64, u64)]) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for &(start, end) in extents {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Links every file of `spec` from `src` into the existing directory `dst`.
pub(crate) fn link_files(src: &Path, spec: &ChainSpec, dst: &Path) -> Result<(), ChainError> {
    for name in spec.files() {
        let to = dst.join(name);
        link_or_copy(&src.join(name), &to).map_err(io_at(&to))?;
    }
    Ok(())
}

/// Completes the snapshot disk `Chain::freeze` described in `dst` (its
/// `chain.json`): hard-links the frozen files there from the workspace's
/// chain directory `src`. Frozen files never change, so this may come
/// after the guest runs again; it is the engine's part, not the VMM's.
pub fn link_frozen(src: &Path, dst: &Path) -> Result<ChainSpec, ChainError> {
    let spec = ChainSpec::read(dst)?;
    link_files(src, &spec, dst)?;
    Ok(spec)
}

fn sync_dir(dir: &Path) -> Result<(), ChainError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Builds a chain directory in `<dir>.new` with `fill`, then renames it
/// to `dir` (which must not exist), so `dir` is whole or absent.
fn build_dir(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<ChainSpec, ChainError>,
) -> Result<ChainSpec, ChainError> {
    let tmp = sibling(dir, "new");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir(&tmp)
        .map_err(io_at(&tmp))
        .and_then(|()| fill(&tmp))
        .and_then(|spec| {
            sync_dir(&tmp)?;
            std::fs::rename(&tmp, dir).map_err(io_at(dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(spec)
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn sibling(dir: &Path, what: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "disk".to_string(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}.{what}"))
}

/// A new chain in `dir`: `base` (linked, never copied unless across
/// filesystems) under an empty top. `base_sha256` is its content hash if
/// known.
pub fn create(
    dir: &Path,
    base: &Path,
    base_sha256: Option<String>,
) -> Result<ChainSpec, ChainError> {
    let base_name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let size = std::fs::metadata(base).map_err(io_at(base))?.len();
    build_dir(dir, |tmp| {
        let mut spec = ChainSpec {
            version: SPEC_VERSION,
            size,
            block_size: block_size_for(tmp).map_err(io_at(tmp))?,
            base: base_name.clone(),
            deltas: Vec::new(),
            top: Some(new_delta_name()),
            digests: Default::default(),
        };
        if let Some(d) = base_sha256 {
            spec.digests.insert(base_name.clone(), d);
        }
        spec.validate().map_err(|reason| ChainError::Damaged {
            path: base.display().to_string(),
            reason,
        })?;
        link_or_copy(base, &tmp.join(&base_name)).map_err(io_at(base))?;
        top_and_spec(tmp, spec)
    })
}

fn top_and_spec(dir: &Path, spec: ChainSpec) -> Result<ChainSpec, ChainError> {
    if let Some(top) = &spec.top {
        create_delta(dir, top, spec.size).map_err(io_at(&dir.join(top)))?;
    }
    spec.write(dir)?;
    Ok(spec)
}

/// A new writable chain in `dir` (which must not exist) over the frozen
/// chain in `from` (a snapshot's): links to its files and an empty top.
/// Deltas past [`MERGE_DEPTH`] are first merged into one new delta, so
/// chains stay shallow however many snapshots they descend from; the
/// merge copies only the deltas' blocks, never the base.
pub fn instantiate(from: &Path, dir: &Path) -> Result<ChainSpec, ChainError> {
    let src = ChainSpec::read(from)?;
    build_dir(dir, |tmp| {
        let mut spec = ChainSpec {
            top: Some(new_delta_name()),
            ..src.clone()
        };
        if let Some(old) = src.top.as_deref() {
            // A live chain (a halted workspace's): its top is frozen too.
            spec.deltas.push(old.to_string());
        }
        let linked = ChainSpec {
            top: src.top.clone(),
            ..src.clone()
        };
        if spec.deltas.len() > MERGE_DEPTH {
            link_or_copy(&from.join(&src.base), &tmp.join(&src.base)).map_err(io_at(tmp))?;
            let merged = merge(from, &spec, tmp)?;
            for d in &spec.deltas {
                spec.digests.remove(d);
            }
            spec.deltas = vec![merged];
        } else {
            link_files(from, &linked, tmp)?;
        }
        top_and_spec(tmp, spec)
    })
}

/// Merges `spec.deltas` (in `from`) into one new delta in `into`; returns
/// its name. Newer blocks win.
fn merge(from: &Path, spec: &ChainSpec, into: &Path) -> Result<String, ChainError> {
    let name = new_delta_name();
    let out_path = into.join(&name);
    let out = create_delta(into, &name, spec.size).map_err(io_at(&out_path))?;
    let bs = u64::from(spec.block_size);
    let mut done = blockset::BlockSet::default();
    for d in spec.deltas.iter().rev() {
        let path = from.join(d);
        let f = File::open(&path).map_err(io_at(&path))?;
        let have = chain::blocks_of(&f, spec.size, bs).map_err(io_at(&path))?;
        let mut todo = Vec::new();
        for (s, e) in have.ranges() {
            let mut b = s;
            while b < e {
                let (taken, until) = done.run_at(b, e);
                if !taken {
                    todo.push((b * bs, (until * bs).min(spec.size)));
                }
                b = until;
            }
        }
        copy_extents(&f, &out, &todo).map_err(io_at(&path))?;
        for (s, e) in have.ranges() {
            done.insert(s, e);
        }
    }
    out.sync_all().map_err(io_at(&out_path))?;
    Ok(name)
}

/// Replaces the chain in `dir` by a new one over the frozen chain in
/// `from` (a rollback). See [`replace_with`].
pub fn replace(from: &Path, dir: &Path) -> Result<ChainSpec, ChainError> {
    replace_with(dir, |fresh| instantiate(from, fresh))
}

/// Replaces the chain in `dir` by the one `build` makes in a directory
/// that does not exist yet: the new chain is built beside the old and
/// swapped in by renames; [`recover`] finishes a swap a crash interrupted.
pub fn replace_with(
    dir: &Path,
    build: impl FnOnce(&Path) -> Result<ChainSpec, ChainError>,
) -> Result<ChainSpec, ChainError> {
    let fresh = sibling(dir, "next");
    let _ = std::fs::remove_dir_all(&fresh);
    let spec = build(&fresh)?;
    let old = sibling(dir, "old");
    let _ = std::fs::remove_dir_all(&old);
    std::fs::rename(dir, &old).map_err(io_at(dir))?;
    std::fs::rename(&fresh, dir).map_err(io_at(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(spec)
}

/// Puts `dir` back after a crash during [`replace`]: if it is missing, the
/// new chain (if complete) or else the old one takes its place.
pub fn recover(dir: &Path) {
    if dir.join(CHAIN_FILE).is_file() {
        let _ = std::fs::remove_dir_all(sibling(dir, "old"));
        return;
    }
    for what in ["next", "old"] {
        let cand = sibling(dir, what);
        if cand.join(CHAIN_FILE).is_file() && std::fs::rename(&cand, dir).is_ok() {
            return;
        }
    }
}

/// Content hash of one chain file as the chain reads it: its length, the
/// blocks it holds, and their bytes (an allocated block of zeros is
/// content: it hides what is below it).
pub fn file_sha256(path: &Path, block_size: u32) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let bs = u64::from(block_size);
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (s, e) in chain::blocks_of(&f, len, bs)?.ranges() {
        let (start, end) = (s * bs, (e * bs).min(len));
        h.update(start.to_le_bytes());
        h.update(end.to_le_bytes());
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], pos)?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(crate::digest::hex(&h.finalize()))
}

/// Allocated bytes of the chain files in `dir` (shared files counted in
/// full: they are shared, not free).
pub fn allocated_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .map(|e| crate::util::copy::allocated_bytes(&e.path()))
            .sum()
    })
}

#[cfg(test)]
mod tests;
