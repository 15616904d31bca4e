//! Writing guest memory for a save: whole, as a diff over the memory the
//! guest was last saved to or restored from, and live (`--live`): copied
//! while the guest runs, in passes that each write the pages dirtied
//! during the one before, so the pause holds only the last dirty set and
//! the device state.
//!
//! Live passes read pages the guest may be writing: a page changed while
//! it is copied is dirty again (KVM's log and the VMM's bitmaps are read
//! and cleared atomically), so the pass after, or the paused one, writes
//! it again. Pages are written with `pwrite` from the mapping (the kernel
//! copies them; no Rust reference to memory the guest changes).

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::layers::{self, MemoryLayer, PageRuns};
use super::{MemoryIds, RegionSnap, SaveError, PAGE};
use crate::devices::bus::lock;
use crate::devices::GuestMemoryMmap;
use crate::snapshot::manifest::MAX_MEMORY_LAYERS;
use crate::vmm::handle::VmHandle;
use crate::vmm::memory;

/// Live passes stop once a pass finds at most this many dirty pages
/// (4 MiB: written in a few milliseconds while paused)...
const SETTLED_PAGES: u64 = 1024;
/// ...or after this many passes (a guest dirtying faster than we copy
/// never settles; the pause then holds what the last pass found).
const MAX_PASSES: usize = 8;

/// What the live passes did before the pause.
pub struct PreCopy {
    below: Vec<MemoryLayer>,
    diff: bool,
    /// Every page written so far (one bitmap per region).
    written: Vec<Vec<u64>>,
    pub passes: usize,
    pub pages: u64,
}

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn or_into(acc: &mut Vec<Vec<u64>>, more: &[Vec<u64>]) {
    acc.resize(acc.len().max(more.len()), Vec::new());
    for (a, m) in acc.iter_mut().zip(more) {
        a.resize(a.len().max(m.len()), 0);
        for (x, y) in a.iter_mut().zip(m) {
            *x |= y;
        }
    }
}

/// Each region's place in the memory file (regions packed in order).
fn region_snaps(mem: &GuestMemoryMmap) -> Vec<RegionSnap> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let snap = RegionSnap {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            snap
        })
        .collect()
}

/// Host address and length of each region, in file order.
fn spans(mem: &GuestMemoryMmap) -> Result<Vec<(*const u8, u64)>, SaveError> {
    mem.iter()
        .map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0))?;
            Ok((host as *const u8, r.len()))
        })
        .collect()
}

fn is_zero(page: *const u8) -> bool {
    // SAFETY: `page` points at PAGE mapped bytes of guest memory (callers
    // step through a region's mapping); memcmp only reads them.
    unsafe { libc::memcmp(page.cast(), super::ZERO_PAGE.as_ptr().cast(), PAGE) == 0 }
}

fn pwrite_all(
    file: &File,
    mut ptr: *const u8,
    mut len: usize,
    mut off: u64,
) -> Result<(), SaveError> {
    while len > 0 {
        // SAFETY: [ptr, ptr+len) lies inside a mapping of guest memory that
        // outlives the call; the kernel copies from it.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), len, off as libc::off_t) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SaveError::Memory(e));
        }
        if n == 0 {
            return Err(SaveError::Memory(std::io::ErrorKind::WriteZero.into()));
        }
        // SAFETY: n <= len: still inside the same mapping.
        ptr = unsafe { ptr.add(n as usize) };
        len -= n as usize;
        off += n as u64;
    }
    Ok(())
}

/// Writes the pages `select` picks (all of them when None) at their
/// places in `file`, coalescing runs; all-zero pages are skipped when
/// `skip_zero` (a fresh file, where a hole already reads as zeros).
fn write_pages(
    mem: &GuestMemoryMmap,
    select: Option<&[Vec<u64>]>,
    file: &File,
    skip_zero: bool,
) -> Result<(), SaveError> {
    let mut offset = 0u64;
    for (i, (host, size)) in spans(mem)?.into_iter().enumerate() {
        let pages = size / PAGE as u64;
        let words = select.map(|s| s.get(i).map(Vec::as_slice).unwrap_or(&[]));
        let wanted = |p: u64| match words {
            None => true,
            Some(w) => w
                .get((p / 64) as usize)
                .is_some_and(|x| x >> (p % 64) & 1 == 1),
        };
        // SAFETY (both adds): p < pages keeps every pointer inside the
        // region's mapping of `size` bytes.
        let at = |p: u64| unsafe { host.add((p as usize) * PAGE) };
        let keep = |p: u64| wanted(p) && !(skip_zero && is_zero(at(p)));
        let mut p = 0;
        while p < pages {
            if words.is_some_and(|w| w.get((p / 64) as usize) == Some(&0)) && p % 64 == 0 {
                p += 64;
                continue;
            }
            if !keep(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && keep(p) {
                p += 1;
            }
            let len = ((p - start) as usize) * PAGE;
            pwrite_all(file, at(start), len, offset + start * PAGE as u64)?;
        }
        offset += size;
    }
    Ok(())
}

impl VmHandle {
    /// The live passes, while the guest runs: the first writes all of
    /// memory (or, for a diff, what changed since the baseline), each next
    /// one what changed during the one before, until few pages change.
    pub fn precopy(&self, file: &File, ids: &MemoryIds) -> Result<PreCopy, SaveError> {
        let mut lineage = lock(&self.lineage);
        let below = std::mem::take(&mut lineage.layers);
        let since = self.dirty_since_baseline(&mut lineage)?;
        drop(lineage);
        let diff = since.is_some() && diff_ok(&below, ids);
        let mut written = Vec::new();
        match since {
            Some(first) if diff => {
                write_pages(&self.mem, Some(&first), file, true)?;
                written = first;
            }
            // Every write from here on is logged; the copy may tear pages
            // the guest writes meanwhile, which the next pass rewrites.
            _ => write_pages(&self.mem, None, file, true)?,
        }
        let mut passes = 1;
        let mut last = u64::MAX;
        while passes < MAX_PASSES {
            let dirty = memory::take_dirty(&self.vm_fd, &self.mem)?;
            let n = count(&dirty);
            write_pages(&self.mem, Some(&dirty), file, false)?;
            or_into(&mut written, &dirty);
            passes += 1;
            if n <= SETTLED_PAGES || n >= last {
                break;
            }
            last = n;
        }
        let pages = count(&written);
        Ok(PreCopy {
            below,
            diff,
            written,
            passes,
            pages,
        })
    }

    /// The pages written since the baseline (the last save or restore),
    /// None when there is none (a cold boot's first save); KVM's dirty log
    /// runs from here on. After a save, the dirty log. After a restore,
    /// before the first save, the mapping's anonymous pages: memory is a
    /// private mapping of the snapshot's file, so exactly the pages the
    /// guest or the VMM wrote since (and those a diff's restore read in:
    /// a superset, so still exact content) have left the page cache.
    /// Logging only from the first save on spares a restored guest that is
    /// never snapshotted (a fork) the cost of the dirty log's faults.
    fn dirty_since_baseline(
        &self,
        lineage: &mut crate::vmm::handle::Lineage,
    ) -> Result<Option<Vec<Vec<u64>>>, SaveError> {
        if lineage.logging {
            return Ok(Some(memory::take_dirty(&self.vm_fd, &self.mem)?));
        }
        // Logging first: what is written after it is logged, what was
        // written before is in the pagemap.
        memory::register(&self.vm_fd, &self.mem, true)?;
        memory::clear_vmm_dirty(&self.mem);
        lineage.logging = true;
        match lineage.pagemap.take() {
            Some(pagemap) => Ok(Some(memory::written_since_mapped(&self.mem, &pagemap)?)),
            None => Ok(None),
        }
    }

    /// Writes guest memory with vCPUs parked and devices locked: whole, or
    /// as a diff when `ids.parent` is the layer the guest's RAM equalled at
    /// the last save or restore and the chain has room; after live passes
    /// (`pre`), only what changed since the last one. Then (re)starts
    /// dirty logging from this moment.
    pub(super) fn save_memory(
        &self,
        file: &File,
        ids: &MemoryIds,
        pre: Option<PreCopy>,
    ) -> Result<(Vec<RegionSnap>, Vec<MemoryLayer>), SaveError> {
        let mut lineage = lock(&self.lineage);
        // Taken now: whatever happens next, the old baseline is gone (a
        // failed save leaves none, so the next save is whole).
        let below = std::mem::take(&mut lineage.layers);
        let dirty = self.dirty_since_baseline(&mut lineage)?;
        let own = |pages| MemoryLayer {
            id: ids.id.clone(),
            pages,
        };
        let fresh = pre.is_none();
        let layers = match (pre, dirty) {
            (Some(mut pre), Some(last)) => {
                write_pages(&self.mem, Some(&last), file, false)?;
                or_into(&mut pre.written, &last);
                if pre.diff {
                    let mut all = pre.below;
                    all.push(own(Some(runs(&self.mem, &pre.written))));
                    all
                } else {
                    vec![own(None)]
                }
            }
            (None, Some(dirty)) if diff_ok(&below, ids) => {
                write_pages(&self.mem, Some(&dirty), file, true)?;
                let mut all = below;
                all.push(own(Some(runs(&self.mem, &dirty))));
                all
            }
            _ => {
                write_pages(&self.mem, None, file, fresh)?;
                vec![own(None)]
            }
        };
        let regions = region_snaps(&self.mem);
        let total = regions.iter().map(|r| r.size).sum();
        // Not synced here: that would hold the guest paused through the
        // writeback. The snapshot is committed only after its files are synced.
        file.set_len(total).map_err(SaveError::Memory)?;
        lineage.layers = layers.clone();
        layers::log_ram_digest(&self.mem, "at save", &ids.id);
        Ok((regions, layers))
    }
}

/// All of guest memory into `file` (new and empty), zero pages left as
/// holes; returns each region's place in the file.
#[cfg(test)]
pub(super) fn write_memory(
    mem: &GuestMemoryMmap,
    file: &File,
) -> Result<Vec<RegionSnap>, SaveError> {
    write_pages(mem, None, file, true)?;
    let regions = region_snaps(mem);
    file.set_len(regions.iter().map(|r| r.size).sum())
        .map_err(SaveError::Memory)?;
    Ok(regions)
}

/// The pages set in `dirty` into `file` (new and empty) as a diff layer;
/// returns each region's place in the file and the layer's runs.
#[cfg(test)]
pub(super) fn write_diff(
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
    file: &File,
) -> Result<(Vec<RegionSnap>, PageRuns), SaveError> {
    write_pages(mem, Some(dirty), file, true)?;
    let regions = region_snaps(mem);
    file.set_len(regions.iter().map(|r| r.size).sum())
        .map_err(SaveError::Memory)?;
    Ok((regions, runs(mem, dirty)))
}

/// May a save write a diff over `below` (the layers the guest's RAM
/// equalled at the last save or restore)?
fn diff_ok(below: &[MemoryLayer], ids: &MemoryIds) -> bool {
    ids.parent.is_some()
        && below.last().map(|l| &l.id) == ids.parent.as_ref()
        && below.len() < MAX_MEMORY_LAYERS
}

/// The runs of pages set in `bitmaps` (one per region), in file pages.
fn runs(mem: &GuestMemoryMmap, bitmaps: &[Vec<u64>]) -> PageRuns {
    let mut out = Vec::new();
    let mut offset = 0u64;
    for (i, r) in mem.iter().enumerate() {
        let words = bitmaps.get(i).map(Vec::as_slice).unwrap_or(&[]);
        layers::bit_runs(words, r.len() / PAGE as u64, offset / PAGE as u64, &mut out);
        offset += r.len();
    }
    out
}
