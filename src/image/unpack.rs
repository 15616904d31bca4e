//! Applies image layers to a directory tree the way an overlay filesystem
//! would see them stacked, refusing anything that could write outside it.
//!
//! Safety rules, each failing with an error naming the entry:
//! - no absolute paths and no `..` components (in names and hard-link targets);
//! - no writes through symlinks: every parent of an entry must be a real
//!   directory, and an existing entry at the target is removed (never
//!   opened) before the new one is created;
//! - hard links only to entries inside the tree, never through symlinks.
//!
//! Whiteouts (`.wh.NAME`) delete lower-layer entries; an opaque marker
//! (`.wh..wh..opq`) hides everything the lower layers put in its directory.
//! Both apply only to lower layers, whatever the entry order in the tar.
//! In overlay form (one tree per layer, for layer disks) they are kept as
//! overlayfs's own: a 0/0 character device and a `trusted.overlay.opaque`
//! xattr.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::digest::{Digest, HashingReader};
use super::{ImageError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Decompresses by content (gzip, zstd or plain tar), not by the announced
/// media type, which registries and tools get wrong.
pub(super) fn decompressor<'a>(reader: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(1 << 16, reader);
    let head = buf
        .fill_buf()
        .map_err(ImageError::io("layer"))?
        .get(..4)
        .map(|h| h.to_vec())
        .unwrap_or_default();
    Ok(match head.as_slice() {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(buf)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::with_buffer(buf).map_err(ImageError::io("zstd layer"))?,
        ),
        _ => Box::new(buf),
    })
}

/// What one layer did, for the caller's accounting.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
}

pub struct Unpacker<'a> {
    root: &'a Path,
    /// Bytes of file content the whole image may unpack to.
    pub budget: u64,
    preserve_owner: bool,
    overlay_form: bool,
}

impl<'a> Unpacker<'a> {
    pub fn new(root: &'a Path, budget: u64) -> Self {
        Unpacker {
            root,
            budget,
            // Only root can give files other owners; others unpack as
            // themselves (ownership inside the guest is then theirs).
            // SAFETY: geteuid has no preconditions and cannot fail.
            preserve_owner: unsafe { libc::geteuid() } == 0,
            overlay_form: false,
        }
    }

    /// Unpacks one layer into its own tree, whiteouts and opaque markers
    /// converted to overlayfs's form instead of applied.
    pub fn overlay_form(root: &'a Path, budget: u64) -> Self {
        Unpacker {
            overlay_form: true,
            ..Unpacker::new(root, budget)
        }
    }

    /// Applies one (possibly compressed) layer. `diff_id`, from the image
    /// config, is checked against the uncompressed stream.
    pub fn apply(
        &mut self,
        layer: impl Read,
        layer_digest: &str,
        diff_id: Option<&Digest>,
    ) -> Result<LayerStats> {
        let mut hashing = HashingReader::new(decompressor(layer)?);
        let stats = self.apply_tar(&mut hashing, layer_digest)?;
        let (actual, _) = hashing.finish().map_err(ImageError::io(layer_digest))?;
        if let Some(expected) = diff_id {
            if &actual != expected {
                return Err(ImageError::DiffIdMismatch {
                    index: 0,
                    digest: layer_digest.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(stats)
    }

    fn apply_tar(&mut self, tar: &mut dyn Read, layer: &str) -> Result<LayerStats> {
        let mut archive = tar::Archive::new(tar);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_preserve_ownerships(self.preserve_owner);
        archive.set_unpack_xattrs(true);
        let mut created: HashSet<PathBuf> = HashSet::new();
        let mut opaque: Vec<PathBuf> = Vec::new();
        let mut whiteouts: Vec<PathBuf> = Vec::new();
        let mut stats = LayerStats::default();
        let entries = archive.entries().map_err(ImageError::io(layer))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad_tar(layer, e))?;
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
                digest: layer.to_string(),
                entry: name.clone(),
                reason,
            };
            let rel = relative_path(&raw).map_err(&unsafe_entry)?;
            stats.entries += 1;
            let Some(file_name) = rel.file_name().map(|f| f.to_string_lossy().into_owned()) else {
                // The layer's root directory itself: nothing to create.
                continue;
            };
            let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            self.ensure_parents(&parent, &mut created)
                .map_err(&unsafe_entry)?;
            if file_name == OPAQUE_MARKER {
                opaque.push(parent);
                continue;
            }
            if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
                // `.wh..` would name the parent itself.
                if matches!(hidden, "" | "." | "..") {
                    return Err(unsafe_entry(format!("whiteout of {hidden:?}")));
                }
                let victim = parent.join(hidden);
                if self.overlay_form {
                    whiteouts.push(victim);
                } else if !created.contains(&victim) {
                    remove_any(&self.root.join(&victim))
                        .map_err(|e| unsafe_entry(e.to_string()))?;
                }
                continue;
            }
            let size = entry.header().entry_size().unwrap_or(0);
            if size > self.budget {
                return Err(ImageError::TooLarge {
                    what: format!("unpacked image (at {name:?} in layer {layer})"),
                    size,
                    limit: self.budget,
                });
            }
            self.budget -= size;
            stats.bytes += size;
            let target = self.root.join(&rel);
            let kind = entry.header().entry_type();
            let existing = std::fs::symlink_metadata(&target).ok();
            match existing {
                Some(m) if m.is_dir() && kind == EntryType::Directory => {}
                Some(_) => remove_any(&target).map_err(|e| unsafe_entry(e.to_string()))?,
                None => {}
            }
            match kind {
                EntryType::Link => {
                    let link = entry
                        .link_name_bytes()
                        .ok_or_else(|| unsafe_entry("hard link without a target".into()))?
                        .into_owned();
                    let src = relative_path(&link)
                        .map_err(|r| unsafe_entry(format!("hard link target: {r}")))?;
                    self.check_no_symlink_parents(&src)
                        .map_err(|r| unsafe_entry(format!("hard link target: {r}")))?;
                    let src_path = self.root.join(&src);
                    match std::fs::symlink_metadata(&src_path) {
                        Ok(m) if m.is_dir() => {
                            return Err(unsafe_entry("hard link to a directory".into()))
                        }
                        Ok(_) => {}
                        Err(_) => {
                            let scope = if self.overlay_form {
                                "this layer (a layer disk cannot link into another)"
                            } else {
                                "the image"
                            };
                            return Err(unsafe_entry(format!(
                                "hard link to {:?}, which is not in {scope}",
                                src.display()
                            )));
                        }
                    }
                    std::fs::hard_link(&src_path, &target)
                        .map_err(|e| unsafe_entry(format!("hard link: {e}")))?;
                }
                EntryType::Regular
                | EntryType::Continuous
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Char
                | EntryType::Block
                | EntryType::Fifo => {
                    entry
                        .unpack(&target)
                        .map_err(|e| unsafe_entry(format!("unpacking: {e}")))?;
                }
                // Metadata-only records (pax/GNU headers are folded into the
                // entries by the tar crate); anything else has no place in
                // a root filesystem.
                EntryType::XGlobalHeader | EntryType::XHeader => continue,
                other => {
                    return Err(unsafe_entry(format!("unsupported entry type {other:?}")));
                }
            }
            // Ancestors count as this layer's too: an opaque marker above
            // must keep the path to this entry while hiding lower siblings.
            let mut p = rel.as_path();
            while created.insert(p.to_path_buf()) {
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => break,
                }
            }
        }
        if self.overlay_form {
            // A whiteout of an entry this layer also has keeps the entry.
            for victim in whiteouts.iter().filter(|v| !created.contains(*v)) {
                overlay_whiteout(&self.root.join(victim))
                    .map_err(ImageError::io(self.root.join(victim)))?;
            }
            for dir in &opaque {
                overlay_opaque(&self.root.join(dir))
                    .map_err(ImageError::io(self.root.join(dir)))?;
            }
        } else {
            for dir in opaque {
                self.hide_lower(&dir, &created)?;
            }
        }
        Ok(stats)
    }

    /// Creates missing parent directories and refuses symlinked ones.
    fn ensure_parents(&self, parent: &Path, created: &mut HashSet<PathBuf>) -> Result<(), String> {
        let mut cur = PathBuf::new();
        for comp in parent.components() {
            cur.push(comp);
            let full = self.root.join(&cur);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "its parent {:?} is a symlink; writing through symlinks is refused",
                        cur.display()
                    ))
                }
                Ok(_) => return Err(format!("its parent {:?} is not a directory", cur.display())),
                Err(_) => {
                    std::fs::create_dir(&full).map_err(|e| format!("creating parent: {e}"))?;
                    created.insert(cur.clone());
                }
            }
        }
        Ok(())
    }

    fn check_no_symlink_parents(&self, path: &Path) -> Result<(), String> {
        let mut cur = PathBuf::new();
        if let Some(parent) = path.parent() {
            for comp in parent.components() {
                cur.push(comp);
                let m = std::fs::symlink_metadata(self.root.join(&cur))
                    .map_err(|_| format!("{:?} does not exist", cur.display()))?;
                if !m.is_dir() {
                    return Err(format!("{:?} is not a real directory", cur.display()));
                }
            }
        }
        Ok(())
    }

    /// Removes what lower layers left under `dir`, keeping this layer's own.
    fn hide_lower(&self, dir: &Path, created: &HashSet<PathBuf>) -> Result<()> {
        let full = self.root.join(dir);
        let Ok(rd) = std::fs::read_dir(&full) else {
            return Ok(());
        };
        for child in rd {
            let child = child.map_err(ImageError::io(&full))?;
            let rel = dir.join(child.file_name());
            if created.contains(&rel) {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    self.hide_lower(&rel, created)?;
                }
            } else {
                remove_any(&child.path()).map_err(ImageError::io(child.path()))?;
            }
        }
        Ok(())
    }
}

/// overlayfs's whiteout: a character device 0/0 hides the lower entry.
fn overlay_whiteout(path: &Path) -> std::io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(std::io::Error::from)
}

/// overlayfs's opaque directory: lower layers' entries in it are hidden.
fn overlay_opaque(dir: &Path) -> std::io::Result<()> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("NUL in path"))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value pointer and length describe a 1-byte buffer.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn bad_tar(layer: &str, e: std::io::Error) -> ImageError {
    ImageError::Invalid(format!("layer {layer} is not a valid tar stream: {e}"))
}

/// A tar name as a path relative to the root, refusing absolute names and
/// `..`. `./` prefixes and empty components are dropped.
fn relative_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.contains(&0) {
        return Err("NUL in name".into());
    }
    let mut out = PathBuf::new();
    for comp in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in path".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(out)
}

/// Removes a file, symlink or whole directory without following symlinks.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
