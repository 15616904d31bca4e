//! A workspace's upper disk read as an OCI layer: the `upper/` directory
//! overlayfs wrote (ext4, read on the host with `crate::ext4`), its
//! whiteouts (0/0 character devices) turned into `.wh.` entries and its
//! opaque directories (`trusted.overlay.opaque=y`) into `.wh..wh..opq`.
//! The same walk lists the changes for `microagent diff`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;

use crate::ext4::{Ext4, Ext4Error, Inode, Kind, ReadAt, ROOT_INO};

use super::digest::{Digest, HashingWriter};

/// Where overlayfs keeps the upper tree on the upper disk.
const UPPER_DIR: &[u8] = b"upper";
/// Top-level directories that are never part of a layer: API filesystems,
/// runtime state, and what microagent itself put there.
pub const EXCLUDED_DIRS: &[&str] = &["proc", "sys", "dev", "run", "tmp", ".microagent"];
/// Files the guest agent writes at every boot (the workspace's identity).
pub const EXCLUDED_FILES: &[&str] = &["etc/hostname", "etc/machine-id", "etc/resolv.conf"];
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// overlayfs's own xattrs describe the upper, not the files: never copied.
const OVERLAY_XATTR: &str = "trusted.overlay.";
const MAX_PATH: usize = 4096;
const MAX_ENTRIES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpperError {
    #[error("the workspace's upper disk: {0}")]
    Fs(#[from] Ext4Error),
    #[error("the workspace's upper disk: {0}")]
    Bad(String),
    #[error("writing the layer: {0}")]
    Io(#[from] std::io::Error),
    #[error("the layer would be over {limit} bytes")]
    TooLarge { limit: u64 },
}

pub type Result<T> = std::result::Result<T, UpperError>;

/// One thing the upper holds, at a path relative to the root.
pub enum Item<'a> {
    /// The lower file at this path is deleted.
    Whiteout,
    /// A directory; `opaque` hides everything below it in lower layers.
    Dir { inode: &'a Inode, opaque: bool },
    /// Anything else (file, symlink, device, fifo).
    Node { inode: &'a Inode },
}

fn excluded(path: &[u8]) -> bool {
    EXCLUDED_DIRS.iter().any(|d| path == d.as_bytes())
        || EXCLUDED_FILES.iter().any(|f| path == f.as_bytes())
}

/// Walks the upper tree depth first, parents before children, calling
/// `visit` with each path (relative, `/`-separated) and what is there.
pub fn walk<R: ReadAt>(
    fs: &Ext4<R>,
    visit: &mut dyn FnMut(&[u8], Item) -> Result<()>,
) -> Result<()> {
    let root = fs.inode(ROOT_INO)?;
    let Some(upper) = fs
        .read_dir(&root)?
        .into_iter()
        .find(|e| e.name == UPPER_DIR)
    else {
        // Never booted: nothing changed.
        return Ok(());
    };
    let upper = fs.inode(upper.ino)?;
    if upper.kind != Kind::Dir {
        return Err(UpperError::Bad("upper/ is not a directory".into()));
    }
    let mut seen_dirs = HashSet::from([upper.ino]);
    let mut count = 0u64;
    let mut stack = vec![(Vec::new(), upper)];
    while let Some((dir_path, dir)) = stack.pop() {
        let mut entries = fs.read_dir(&dir)?;
        // A stable order: layers of the same changes come out the same.
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut subdirs = Vec::new();
        for e in entries {
            count += 1;
            if count > MAX_ENTRIES {
                return Err(UpperError::Bad(format!("more than {MAX_ENTRIES} entries")));
            }
            let mut path = dir_path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&e.name);
            if path.len() > MAX_PATH {
                return Err(UpperError::Bad(format!(
                    "a path longer than {MAX_PATH} bytes under {}",
                    String::from_utf8_lossy(&dir_path)
                )));
            }
            if excluded(&path) {
                continue;
            }
            let inode = fs.inode(e.ino)?;
            match inode.kind {
                Kind::Char if inode.rdev() == (0, 0) => visit(&path, Item::Whiteout)?,
                Kind::Dir => {
                    if !seen_dirs.insert(inode.ino) {
                        return Err(UpperError::Bad(format!(
                            "directory {} is linked twice",
                            String::from_utf8_lossy(&path)
                        )));
                    }
                    let opaque = fs
                        .xattrs(&inode)?
                        .iter()
                        .any(|x| x.name == OPAQUE_XATTR && x.value == b"y");
                    visit(
                        &path,
                        Item::Dir {
                            inode: &inode,
                            opaque,
                        },
                    )?;
                    subdirs.push((path, inode));
                }
                _ => visit(&path, Item::Node { inode: &inode })?,
            }
        }
        // Reversed onto the stack, so directories come out in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// What `write_layer` made.
#[derive(Debug, Clone)]
pub struct WrittenLayer {
    /// sha256 of the uncompressed tar: the config's diff_id.
    pub diff_id: Digest,
    pub size: u64,
    pub entries: u64,
}

fn os(path: &[u8]) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(path))
}

fn header(inode: &Inode, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(u32::from(inode.perm));
    h.set_uid(u64::from(inode.uid));
    h.set_gid(u64::from(inode.gid));
    h.set_mtime(u64::try_from(inode.mtime).unwrap_or(0));
    h.set_size(0);
    h
}

/// The empty regular file OCI uses for whiteouts and opaque markers.
fn empty_file() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_mtime(0);
    h
}

/// A PAX record: "<len> <key>=<value>\n", where len counts itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// The xattrs a layer carries for `inode` (security.capability, user.*),
/// as one PAX header entry before it.
fn append_xattrs<R: ReadAt, W: Write>(
    fs: &Ext4<R>,
    inode: &Inode,
    tar: &mut tar::Builder<W>,
) -> Result<()> {
    let mut records = Vec::new();
    for x in fs.xattrs(inode)? {
        if x.name.starts_with(OVERLAY_XATTR) || x.name.starts_with("system.") {
            continue;
        }
        if x.name.starts_with("user.") || x.name.starts_with("security.") {
            records.extend(pax_record(&format!("SCHILY.xattr.{}", x.name), &x.value));
        }
    }
    if records.is_empty() {
        return Ok(());
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("PaxHeader")?;
    h.set_mode(0o644);
    h.set_size(records.len() as u64);
    h.set_cksum();
    tar.append(&h, records.as_slice())?;
    Ok(())
}

/// Writes the upper as an uncompressed OCI layer tar into `out`, refusing
/// to go past `limit` bytes. Hard-linked files become tar hard links.
pub fn write_layer<R: ReadAt, W: Write>(fs: &Ext4<R>, out: W, limit: u64) -> Result<WrittenLayer> {
    let mut tar = tar::Builder::new(HashingWriter::new(out, u64::MAX));
    let mut links: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut entries = 0u64;
    let mut emit =
        |path: &[u8], item: Item, tar: &mut tar::Builder<HashingWriter<W>>| -> Result<()> {
            entries += 1;
            match item {
                Item::Whiteout => {
                    let (parent, name) = split(path);
                    let mut wh = parent.to_vec();
                    wh.extend_from_slice(b".wh.");
                    wh.extend_from_slice(name);
                    tar.append_data(&mut empty_file(), os(&wh), std::io::empty())?;
                }
                Item::Dir { inode, opaque } => {
                    append_xattrs(fs, inode, tar)?;
                    let mut h = header(inode, tar::EntryType::Directory);
                    tar.append_data(&mut h, os(path), std::io::empty())?;
                    if opaque {
                        let mut marker = path.to_vec();
                        marker.extend_from_slice(b"/.wh..wh..opq");
                        tar.append_data(&mut empty_file(), os(&marker), std::io::empty())?;
                    }
                }
                Item::Node { inode } => {
                    if inode.kind != Kind::Dir && inode.links > 1 {
                        if let Some(first) = links.get(&inode.ino) {
                            let mut h = header(inode, tar::EntryType::Link);
                            tar.append_link(&mut h, os(path), os(first))?;
                            return Ok(());
                        }
                        links.insert(inode.ino, path.to_vec());
                    }
                    // Headers and padding are small; file bodies are what grow.
                    let body = if inode.kind == Kind::File {
                        inode.size
                    } else {
                        0
                    };
                    if tar.get_ref().count().saturating_add(body) > limit {
                        return Err(UpperError::TooLarge { limit });
                    }
                    append_xattrs(fs, inode, tar)?;
                    append_node(fs, inode, path, tar)?;
                }
            }
            Ok(())
        };
    walk(fs, &mut |path, item| emit(path, item, &mut tar))?;
    tar.finish()?;
    let (_, diff_id, size) = tar.into_inner()?.finish();
    Ok(WrittenLayer {
        diff_id,
        size,
        entries,
    })
}

fn append_node<R: ReadAt, W: Write>(
    fs: &Ext4<R>,
    inode: &Inode,
    path: &[u8],
    tar: &mut tar::Builder<W>,
) -> Result<()> {
    let kind = match inode.kind {
        Kind::File => {
            let mut h = header(inode, tar::EntryType::Regular);
            h.set_size(inode.size);
            tar.append_data(&mut h, os(path), fs.open_file(inode)?)?;
            return Ok(());
        }
        Kind::Symlink => {
            let target = fs.read_link(inode)?;
            let mut h = header(inode, tar::EntryType::Symlink);
            tar.append_link(&mut h, os(path), os(&target))?;
            return Ok(());
        }
        Kind::Char => tar::EntryType::Char,
        Kind::Block => tar::EntryType::Block,
        Kind::Fifo => tar::EntryType::Fifo,
        // Sockets are runtime objects, and tar cannot hold them.
        Kind::Socket | Kind::Dir => return Ok(()),
    };
    let mut h = header(inode, kind);
    let (major, minor) = inode.rdev();
    h.set_device_major(major)?;
    h.set_device_minor(minor)?;
    tar.append_data(&mut h, os(path), std::io::empty())?;
    Ok(())
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// One line of `microagent diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Change {
    #[serde(rename = "A")]
    Added,
    #[serde(rename = "C")]
    Changed,
    #[serde(rename = "D")]
    Deleted,
}

/// What changed against the image, as `docker diff` lists it: every path
/// in the upper, `C` where the image has it, `A` where it does not, `D`
/// for whiteouts. `lower` is the image's set of paths.
pub fn changes<R: ReadAt>(
    fs: &Ext4<R>,
    lower: &BTreeSet<Vec<u8>>,
) -> Result<Vec<(Change, String)>> {
    let mut out = Vec::new();
    walk(fs, &mut |path, item| {
        let change = match item {
            Item::Whiteout => Change::Deleted,
            _ if lower.contains(path) => Change::Changed,
            _ => Change::Added,
        };
        out.push((change, format!("/{}", String::from_utf8_lossy(path))));
        Ok(())
    })?;
    Ok(out)
}

/// The upper disk is a chain of deltas; the reader reads through it.
impl ReadAt for crate::disk::Chain {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        crate::disk::Chain::read_at(self, buf, off)
    }
    fn size(&self) -> u64 {
        crate::disk::Chain::size(self)
    }
}

#[cfg(test)]
mod tests;
