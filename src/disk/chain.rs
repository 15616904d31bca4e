//! An open disk chain: reads fall through from the top delta to the first
//! file that holds the block (the base last, zeros past its end); writes go
//! to the top delta, copying a block up from below when a write covers only
//! part of it.
//!
//! Why this is crash-safe without a map of our own: a delta holds exactly
//! the blocks allocated in its file, and the filesystem's journal keeps
//! allocation and data consistent. A block is only ever written whole the
//! first time (copy-up), so after a crash a block is either absent (reads
//! fall through to the old data) or present with what was written;
//! `flush` (fdatasync) makes every completed write durable.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::blockset::BlockSet;
use super::spec::{ChainSpec, SpecError, CHAIN_FILE};
use super::{create_delta, new_delta_name};
use crate::util::copy::data_extents;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Damaged { path: String, reason: String },
    #[error("disk chain in {dir} has no writable top: it is a snapshot's")]
    Frozen { dir: String },
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Io {
        path: path.display().to_string(),
        source,
    }
}

struct Layer {
    file: File,
    blocks: BlockSet,
}

/// The blocks `file` holds: its data extents, widened to whole blocks.
pub(crate) fn blocks_of(file: &File, size: u64, block_size: u64) -> std::io::Result<BlockSet> {
    let mut set = BlockSet::default();
    for (start, end) in data_extents(file, size)? {
        set.insert(start / block_size, end.div_ceil(block_size));
    }
    Ok(set)
}

pub struct Chain {
    dir: PathBuf,
    spec: ChainSpec,
    base: File,
    base_len: u64,
    /// Frozen deltas, oldest first.
    lower: Vec<Layer>,
    top: Option<Layer>,
    /// Set by `freeze`, which leaves the frozen delta's data and the new
    /// `chain.json` to the page cache (the guest is paused meanwhile);
    /// cleared once they are durable. See [`Chain::sync_frozen`].
    frozen_unsynced: AtomicBool,
}

impl Chain {
    /// Opens the chain described by `dir/chain.json`, its top writable.
    pub fn open(dir: &Path) -> Result<Chain, ChainError> {
        Chain::open_mode(dir, true)
    }

    /// Opens a chain only to read it (a halted workspace's, whose files
    /// are not to be written): its top is read as one more frozen delta.
    pub fn open_read_only(dir: &Path) -> Result<Chain, ChainError> {
        let mut chain = Chain::open_mode(dir, false)?;
        if let Some(top) = chain.top.take() {
            chain.lower.push(top);
        }
        Ok(chain)
    }

    fn open_mode(dir: &Path, writable: bool) -> Result<Chain, ChainError> {
        let spec = ChainSpec::read(dir)?;
        let bs = u64::from(spec.block_size);
        let open_layer = |name: &str, write: bool| -> Result<Layer, ChainError> {
            let path = dir.join(name);
            let file = File::options()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_at(&path))?;
            let len = file.metadata().map_err(io_at(&path))?.len();
            if len != spec.size {
                return Err(ChainError::Damaged {
                    path: path.display().to_string(),
                    reason: format!("delta is {len} bytes, the disk is {}", spec.size),
                });
            }
            let blocks = blocks_of(&file, spec.size, bs).map_err(io_at(&path))?;
            Ok(Layer { file, blocks })
        };
        let base_path = dir.join(&spec.base);
        let base = crate::util::fs::open_nofollow(&base_path).map_err(io_at(&base_path))?;
        let base_len = base.metadata().map_err(io_at(&base_path))?.len();
        let lower = spec
            .deltas
            .iter()
            .map(|d| open_layer(d, false))
            .collect::<Result<Vec<_>, _>>()?;
        let top = spec
            .top
            .as_deref()
            .map(|t| open_layer(t, writable))
            .transpose()?;
        Ok(Chain {
            dir: dir.to_path_buf(),
            spec,
            base,
            base_len,
            lower,
            top,
            frozen_unsynced: AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u64 {
        self.spec.size
    }

    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    pub fn writable(&self) -> bool {
        self.top.is_some()
    }

    fn bs(&self) -> u64 {
        u64::from(self.spec.block_size)
    }

    /// Layer `level` counted from the newest (0 is the top when there is one).
    fn layer(&self, level: usize) -> Option<&Layer> {
        match &self.top {
            Some(top) if level == 0 => Some(top),
            Some(_) => self.lower.iter().rev().nth(level - 1),
            None => self.lower.iter().rev().nth(level),
        }
    }

    /// Fills `buf` from `off`, looking from layer `level` downwards.
    fn read_from(&self, level: usize, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let Some(layer) = self.layer(level) else {
            let avail = self.base_len.saturating_sub(off).min(buf.len() as u64) as usize;
            self.base.read_exact_at(&mut buf[..avail], off)?;
            buf[avail..].fill(0);
            return Ok(());
        };
        let bs = self.bs();
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let (present, until) = layer.blocks.run_at(pos / bs, end.div_ceil(bs));
            let run_end = (until * bs).min(end);
            let part = &mut buf[(pos - off) as usize..(run_end - off) as usize];
            if present {
                layer.file.read_exact_at(part, pos)?;
            } else {
                self.read_from(level + 1, part, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off`; the caller keeps them inside the disk.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.check_range(off, buf.len())?;
        self.read_from(0, buf, off)
    }

    fn check_range(&self, off: u64, len: usize) -> std::io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.spec.size => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len} bytes at {off} are past the disk's end"),
            )),
        }
    }

    /// Writes `data` at `off` into the top delta.
    pub fn write_at(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
        self.check_range(off, data.len())?;
        if self.top.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the disk chain is read-only",
            ));
        }
        let (bs, size) = (self.bs(), self.spec.size);
        let block_end = |b: u64| ((b + 1) * bs).min(size);
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / bs;
            let top = self
                .top
                .as_ref()
                .ok_or_else(|| std::io::Error::other("no top"))?;
            let (present, until) = top.blocks.run_at(b, end.div_ceil(bs));
            if present {
                let run_end = (until * bs).min(end);
                top.file
                    .write_all_at(&data[(pos - off) as usize..(run_end - off) as usize], pos)?;
                pos = run_end;
            } else if pos == b * bs && end >= block_end(b) {
                // Whole absent blocks go straight to the top.
                let mut last = b;
                while last + 1 < until && end >= block_end(last + 1) {
                    last += 1;
                }
                let run_end = block_end(last);
                top.file
                    .write_all_at(&data[(pos - off) as usize..(run_end - off) as usize], pos)?;
                self.mark(b, last + 1);
                pos = run_end;
            } else {
                // Part of an absent block: copy it up whole, then patch.
                let start = b * bs;
                let mut block = vec![0u8; (block_end(b) - start) as usize];
                self.read_from(0, &mut block, start)?;
                let upto = end.min(block_end(b));
                block[(pos - start) as usize..(upto - start) as usize]
                    .copy_from_slice(&data[(pos - off) as usize..(upto - off) as usize]);
                let top = self
                    .top
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("no top"))?;
                top.file.write_all_at(&block, start)?;
                self.mark(b, b + 1);
                pos = upto;
            }
        }
        Ok(())
    }

    fn mark(&mut self, start: u64, end: u64) {
        if let Some(top) = self.top.as_mut() {
            top.blocks.insert(start, end);
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        // What the guest wrote before a snapshot is below what it writes
        // after: it must be durable first, and chain.json must name the
        // top it is flushing.
        self.sync_frozen()?;
        match &self.top {
            Some(top) => top.file.sync_data(),
            None => Ok(()),
        }
    }

    /// Whether the last freeze still waits for [`Chain::sync_frozen`].
    pub fn freeze_pending_sync(&self) -> bool {
        self.frozen_unsynced.load(Ordering::Acquire)
    }

    /// Makes the last freeze durable: the frozen delta's data, then
    /// `chain.json`. `flush` does it first; the engine does it too (through
    /// the files) before it commits a snapshot that links them.
    pub fn sync_frozen(&self) -> std::io::Result<()> {
        if !self.frozen_unsynced.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(frozen) = self.lower.last() {
            frozen.file.sync_data()?;
        }
        crate::util::fs::sync_with_dir(&self.dir.join(CHAIN_FILE))?;
        self.frozen_unsynced.store(false, Ordering::Release);
        Ok(())
    }

    /// Freezes the top delta (it joins the read-only deltas) and continues
    /// on a new empty one; `chain.json` says so before this returns. With
    /// `spec_into`, the frozen chain's `chain.json` is also written into
    /// that directory; [`super::link_frozen`] then hard-links its files
    /// there: that is a snapshot's disk, made without copying a byte. The
    /// links are left to the caller (the engine, not the jailed VMM: a
    /// chain may hold files of other owners, which the kernel's
    /// protected_hardlinks refuses to link for an unprivileged VMM user).
    /// The caller must have stopped all I/O (the guest is paused).
    pub fn freeze(&mut self, spec_into: Option<&Path>) -> Result<ChainSpec, ChainError> {
        let Some(old_top) = self.spec.top.clone() else {
            return Err(ChainError::Frozen {
                dir: self.dir.display().to_string(),
            });
        };
        // An earlier freeze not yet durable must be before this one
        // writes chain.json again.
        self.sync_frozen()
            .map_err(io_at(&self.dir.join(CHAIN_FILE)))?;
        let name = new_delta_name();
        let new_path = self.dir.join(&name);
        let new_file = create_delta(&self.dir, &name, self.spec.size).map_err(io_at(&new_path))?;
        let mut next = self.spec.clone();
        next.deltas.push(old_top);
        next.top = Some(name);
        // Not synced here: the old top's data and this chain.json reach
        // the disk after the guest runs again (sync_frozen), before any
        // flush of the new top and before the snapshot is committed. A
        // crash before then loses only writes the guest never flushed,
        // as it would have without the snapshot.
        if let Err(e) = next.write_unsynced(&self.dir) {
            let _ = std::fs::remove_file(&new_path);
            return Err(e.into());
        }
        self.frozen_unsynced.store(true, Ordering::Release);
        // chain.json names the new top: the running chain must agree.
        if let Some(top) = self.top.take() {
            self.lower.push(top);
        }
        self.top = Some(Layer {
            file: new_file,
            blocks: BlockSet::default(),
        });
        self.spec = next;
        let frozen = ChainSpec {
            top: None,
            ..self.spec.clone()
        };
        if let Some(dst) = spec_into {
            // The engine rewrites it with digests, synced, before commit.
            frozen.write_unsynced(dst)?;
        }
        Ok(frozen)
    }
}
