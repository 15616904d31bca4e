//! A read-only ext4 reader for the one filesystem we must read on the
//! host: a workspace's upper disk, which the guest wrote and which is
//! therefore untrusted. Every offset, count and length read from it is
//! bounded by the filesystem's own size before it is used.
//!
//! Why our own and not a crate or a tool: `ext4-view` (the kept crate)
//! exposes no mtimes, device numbers, inode numbers or xattrs, and an OCI
//! layer needs all four (whiteouts are 0/0 devices, opaque directories an
//! xattr, hard links an inode number); `debugfs rdump` writes names the
//! guest chose straight into host paths and drops devices and xattrs;
//! mounting (the kernel, or fuse2fs as root) parses guest-written
//! metadata with host privileges.
//!
//! Supported: what `mkfs.ext4` makes by default and the guest kernel
//! writes into it: extents, 64-bit and flex groups, htree directories
//! (read as plain blocks), in-inode and block xattrs. The journal must be
//! clean: the guest agent freezes the filesystem before we read it, and
//! when it powers the guest off.

mod dir;
mod extent;
mod xattr;

pub use dir::DirEntry;
pub use xattr::Xattr;

/// Positional reads of a disk image (a file, or a disk chain).
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
    fn size(&self) -> u64;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, off)
    }
    fn size(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("reading the disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("the filesystem is damaged: {0}")]
    Corrupt(String),
    #[error("the filesystem uses {0}, which this reader does not support")]
    Unsupported(String),
    #[error("the filesystem was not cleanly unmounted (its journal needs recovery)")]
    NeedsRecovery,
}

pub type Result<T> = std::result::Result<T, Ext4Error>;

fn corrupt<T>(what: impl Into<String>) -> Result<T> {
    Err(Ext4Error::Corrupt(what.into()))
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

const MAGIC: u16 = 0xEF53;
pub const ROOT_INO: u32 = 2;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
const INCOMPAT_UNDERSTOOD: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_CASEFOLD;

const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;

/// File types, from an inode's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fifo,
    Char,
    Dir,
    Block,
    File,
    Symlink,
    Socket,
}

impl Kind {
    fn from_mode(mode: u16) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o010000 => Kind::Fifo,
            0o020000 => Kind::Char,
            0o040000 => Kind::Dir,
            0o060000 => Kind::Block,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }
}

/// One inode, as much of it as a layer needs.
#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u32,
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub links: u16,
    flags: u32,
    block: [u8; 60],
    file_acl: u64,
    /// The bytes after the 128-byte base inode (in-inode xattrs live here).
    extra: Vec<u8>,
}

impl Inode {
    /// A device's (major, minor); (0, 0) for an overlayfs whiteout.
    pub fn rdev(&self) -> (u32, u32) {
        let old = u32_at(&self.block, 0);
        if old != 0 {
            return ((old >> 8) & 0xff, old & 0xff);
        }
        let new = u32_at(&self.block, 4);
        ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
    }
}

/// An open filesystem over `R`.
pub struct Ext4<R: ReadAt> {
    dev: R,
    block_size: u64,
    blocks: u64,
    inodes: u32,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    gdt_start: u64,
    groups: u64,
}

impl<R: ReadAt> Ext4<R> {
    /// Reads and checks the superblock.
    pub fn open(dev: R) -> Result<Ext4<R>> {
        let mut sb = [0u8; 1024];
        if dev.size() < 2048 {
            return corrupt(format!("{} bytes is too small for ext4", dev.size()));
        }
        dev.read_at(&mut sb, 1024)?;
        if u16_at(&sb, 0x38) != MAGIC {
            return corrupt("no ext4 superblock (bad magic)");
        }
        let log = u32_at(&sb, 0x18);
        if log > 6 {
            return corrupt(format!("block size 1024 << {log}"));
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(&sb, 0x60);
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(Ext4Error::NeedsRecovery);
        }
        let unknown = incompat & !INCOMPAT_UNDERSTOOD;
        if unknown != 0 {
            return Err(Ext4Error::Unsupported(format!(
                "incompatible features {unknown:#x}"
            )));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks = u64::from(u32_at(&sb, 0x04));
        if is64 {
            blocks |= u64::from(u32_at(&sb, 0x150)) << 32;
        }
        if blocks == 0 || blocks.saturating_mul(block_size) > dev.size() {
            return corrupt(format!(
                "{blocks} blocks of {block_size} bytes do not fit the {}-byte disk",
                dev.size()
            ));
        }
        let first_data_block = u64::from(u32_at(&sb, 0x14));
        let blocks_per_group = u64::from(u32_at(&sb, 0x20));
        let inodes_per_group = u32_at(&sb, 0x28);
        let inodes = u32_at(&sb, 0x00);
        let inode_size = if u32_at(&sb, 0x4C) == 0 {
            128
        } else {
            u64::from(u16_at(&sb, 0x58))
        };
        let desc_size = if is64 {
            u64::from(u16_at(&sb, 0xFE))
        } else {
            32
        };
        if blocks_per_group == 0 || blocks_per_group > block_size * 8 || first_data_block >= blocks
        {
            return corrupt(format!("{blocks_per_group} blocks per group"));
        }
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return corrupt(format!("inode size {inode_size}"));
        }
        if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
            return corrupt(format!("group descriptor size {desc_size}"));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        if inodes_per_group == 0 || u64::from(inodes) > groups * u64::from(inodes_per_group) {
            return corrupt(format!(
                "{inodes} inodes in {groups} groups of {inodes_per_group}"
            ));
        }
        Ok(Ext4 {
            dev,
            block_size,
            blocks,
            inodes,
            inodes_per_group,
            inode_size,
            desc_size,
            gdt_start: (first_data_block + 1) * block_size,
            groups,
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Reads `buf.len()` bytes of block `block` from `off` in it; refuses
    /// blocks outside the filesystem.
    pub(crate) fn read_block_part(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let end = block
            .checked_mul(self.block_size)
            .and_then(|s| s.checked_add(buf.len() as u64));
        match end {
            Some(end) if block < self.blocks && end <= self.blocks * self.block_size => {
                self.dev.read_at(buf, block * self.block_size)?;
                Ok(())
            }
            _ => corrupt(format!("block {block} is outside the filesystem")),
        }
    }

    pub(crate) fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.block_size as usize];
        self.read_block_part(block, &mut buf)?;
        Ok(buf)
    }

    /// Reads inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        if ino == 0 || ino > self.inodes {
            return corrupt(format!("inode number {ino}"));
        }
        let group = u64::from((ino - 1) / self.inodes_per_group);
        let index = u64::from((ino - 1) % self.inodes_per_group);
        if group >= self.groups {
            return corrupt(format!("inode {ino} is in group {group}"));
        }
        let mut desc = vec![0u8; self.desc_size as usize];
        let desc_off = self.gdt_start + group * self.desc_size;
        if desc_off + self.desc_size > self.blocks * self.block_size {
            return corrupt("group descriptors past the end");
        }
        self.dev.read_at(&mut desc, desc_off)?;
        let mut table = u64::from(u32_at(&desc, 0x08));
        if self.desc_size >= 64 {
            table |= u64::from(u32_at(&desc, 0x28)) << 32;
        }
        let off = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * self.inode_size))
            .filter(|&o| o + self.inode_size <= self.blocks * self.block_size);
        let Some(off) = off else {
            return corrupt(format!("inode {ino}'s table is outside the filesystem"));
        };
        let mut raw = vec![0u8; self.inode_size as usize];
        self.dev.read_at(&mut raw, off)?;
        let mode = u16_at(&raw, 0);
        let Some(kind) = Kind::from_mode(mode) else {
            return corrupt(format!("inode {ino} has mode {mode:o}"));
        };
        let mut mtime = i64::from(u32_at(&raw, 0x10) as i32);
        let extra_isize = if raw.len() > 128 {
            usize::from(u16_at(&raw, 0x80))
        } else {
            0
        };
        if extra_isize > raw.len() - 128 {
            return corrupt(format!("inode {ino}'s extra size {extra_isize}"));
        }
        if extra_isize >= 0x8C - 0x80 {
            // The extra word's low two bits extend seconds past 2038.
            mtime += i64::from(u32_at(&raw, 0x88) & 3) << 32;
        }
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            ino,
            kind,
            perm: mode & 0o7777,
            uid: u32::from(u16_at(&raw, 0x02)) | (u32::from(u16_at(&raw, 0x78)) << 16),
            gid: u32::from(u16_at(&raw, 0x18)) | (u32::from(u16_at(&raw, 0x7A)) << 16),
            size: u64::from(u32_at(&raw, 0x04)) | (u64::from(u32_at(&raw, 0x6C)) << 32),
            mtime,
            links: u16_at(&raw, 0x1A),
            flags: u32_at(&raw, 0x20),
            block,
            file_acl: u64::from(u32_at(&raw, 0x68)) | (u64::from(u16_at(&raw, 0x76)) << 32),
            extra: raw[128..].to_vec(),
        })
    }

    fn check_layout(&self, inode: &Inode) -> Result<()> {
        if inode.flags & INLINE_DATA_FL != 0 {
            return Err(Ext4Error::Unsupported(format!(
                "inline data (inode {})",
                inode.ino
            )));
        }
        if inode.flags & EXTENTS_FL == 0 && inode.size > 0 {
            return Err(Ext4Error::Unsupported(format!(
                "block maps instead of extents (inode {})",
                inode.ino
            )));
        }
        Ok(())
    }

    /// A reader of a regular file's (or a directory's) bytes, holes and
    /// unwritten extents as zeros, `inode.size` in all.
    pub fn open_file(&self, inode: &Inode) -> Result<FileReader<'_, R>> {
        self.check_layout(inode)?;
        let extents = if inode.size == 0 {
            Vec::new()
        } else {
            extent::map(self, inode, inode.size.div_ceil(self.block_size))?
        };
        Ok(FileReader {
            fs: self,
            extents,
            size: inode.size,
            pos: 0,
            next: 0,
        })
    }

    /// Streams a file's bytes to `sink` (see [`Ext4::open_file`]).
    pub fn read_data(
        &self,
        inode: &Inode,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut reader = self.open_file(inode)?;
        let mut buf = vec![0u8; (1 << 20).min(inode.size.max(1)) as usize];
        loop {
            let n = reader.read_extent(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            sink(&buf[..n])?;
        }
    }

    /// Reads `buf.len()` bytes starting `within` bytes into `block`
    /// (contiguous blocks), bounded by the filesystem.
    fn read_span(&self, block: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let off = block
            .checked_mul(self.block_size)
            .and_then(|o| o.checked_add(within));
        match off {
            Some(off)
                if off
                    .checked_add(buf.len() as u64)
                    .is_some_and(|e| e <= self.blocks * self.block_size) =>
            {
                self.dev.read_at(buf, off)?;
                Ok(())
            }
            _ => corrupt(format!("data at block {block} is outside the filesystem")),
        }
    }

    /// A symlink's target.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        const MAX_TARGET: u64 = 4096;
        if inode.size > MAX_TARGET {
            return corrupt(format!(
                "symlink inode {} is {} bytes long",
                inode.ino, inode.size
            ));
        }
        if inode.flags & EXTENTS_FL == 0 && inode.flags & INLINE_DATA_FL == 0 {
            // A fast symlink: the target is inside the inode.
            if inode.size > 60 {
                return Err(Ext4Error::Unsupported(format!(
                    "block-mapped symlinks (inode {})",
                    inode.ino
                )));
            }
            return Ok(inode.block[..inode.size as usize].to_vec());
        }
        let mut out = Vec::with_capacity(inode.size as usize);
        self.read_data(inode, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// A directory's entries, without `.` and `..`.
    pub fn read_dir(&self, inode: &Inode) -> Result<Vec<DirEntry>> {
        dir::read(self, inode)
    }

    /// Every extended attribute of `inode`, in-inode ones first.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        xattr::read(self, inode)
    }
}

/// Reads one file's bytes in order; see [`Ext4::open_file`].
pub struct FileReader<'a, R: ReadAt> {
    fs: &'a Ext4<R>,
    extents: Vec<extent::Extent>,
    size: u64,
    pos: u64,
    /// The first extent that may still cover `pos`.
    next: usize,
}

impl<R: ReadAt> FileReader<'_, R> {
    fn read_extent(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let bs = self.fs.block_size;
        while self
            .extents
            .get(self.next)
            .is_some_and(|e| (e.logical + e.len) * bs <= self.pos)
        {
            self.next += 1;
        }
        let want = (buf.len() as u64).min(self.size - self.pos);
        let n = match self.extents.get(self.next) {
            Some(e) if e.logical * bs <= self.pos => {
                let n = want.min((e.logical + e.len) * bs - self.pos) as usize;
                if e.unwritten {
                    buf[..n].fill(0);
                } else {
                    let into = self.pos - e.logical * bs;
                    self.fs
                        .read_span(e.physical + into / bs, into % bs, &mut buf[..n])?;
                }
                n
            }
            // A hole, up to the next extent or the end.
            other => {
                let until = other.map_or(self.size, |e| e.logical * bs);
                let n = want.min(until - self.pos) as usize;
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: ReadAt> std::io::Read for FileReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_extent(buf).map_err(|e| match e {
            Ext4Error::Io(e) => e,
            e => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
