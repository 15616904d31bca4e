//! Guest memory as layers: a whole image at the bottom (`memory.bin` of a
//! full snapshot), then diffs holding only the pages dirtied since the
//! layer below was taken. A restore maps the bottom privately and reads
//! each diff's pages over it, in order (folded on restore: no background
//! merge; the chain is capped at `MAX_MEMORY_LAYERS`, after which the next
//! snapshot is whole again).
//!
//! Which pages a diff holds is recorded as page runs in the VM state, not
//! inferred from the file's allocation: a dirtied page that is now all
//! zeros stays a hole in the file and must still cover the page below.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{RegionSnap, PAGE};
use crate::devices::GuestMemoryMmap;

/// One memory layer of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// Names this layer's content; made by the engine, one per snapshot.
    pub id: String,
    /// The pages (indexes into the memory file, 4 KiB each) this layer
    /// holds, as `(first, count)` runs in ascending order. None: every
    /// page (the bottom, whole image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageRuns>,
}

/// `(first page, count)` runs of a memory file's pages.
pub type PageRuns = Vec<(u64, u64)>;

/// Runs of set bits of `words` (bit i = page i), shifted by `first_page`.
pub(super) fn bit_runs(words: &[u64], pages: u64, first_page: u64, out: &mut Vec<(u64, u64)>) {
    let bit = |i: u64| {
        words
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    };
    let mut i = 0;
    while i < pages {
        if words.get((i / 64) as usize) == Some(&0) {
            i += 64 - i % 64;
            continue;
        }
        if !bit(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && bit(i) {
            i += 1;
        }
        out.push((first_page + start, i - start));
    }
}

/// Checks a diff layer's runs against the memory layout: ascending, not
/// overlapping, each inside one region. They come from a state file
/// whose checksum the manifest pins, but are bounds all the same.
fn check_runs(runs: &[(u64, u64)], regions: &[RegionSnap]) -> Result<(), String> {
    let mut next = 0u64;
    for &(first, count) in runs {
        let end = first.checked_add(count).ok_or("page run overflows")?;
        if count == 0 || first < next {
            return Err(format!("page run {first}+{count} is empty or out of order"));
        }
        let inside = regions.iter().any(|r| {
            let (lo, hi) = (
                r.file_offset / PAGE as u64,
                (r.file_offset + r.size) / PAGE as u64,
            );
            first >= lo && end <= hi
        });
        if !inside {
            return Err(format!("page run {first}+{count} is outside guest memory"));
        }
        next = end;
    }
    Ok(())
}

/// Reads the pages `runs` names from the diff layer at `path` into `mem`
/// (laid out as `regions` says, already checked against the layout).
pub fn apply(
    mem: &GuestMemoryMmap,
    regions: &[RegionSnap],
    path: &Path,
    runs: &[(u64, u64)],
) -> Result<(), String> {
    check_runs(runs, regions)?;
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != total {
        return Err(format!(
            "{} is {len} bytes, memory is {total}",
            path.display()
        ));
    }
    for &(first, count) in runs {
        let off = first * PAGE as u64;
        let (r, region) = regions
            .iter()
            .zip(mem.iter())
            .find(|(r, _)| off >= r.file_offset && off < r.file_offset + r.size)
            .ok_or("page run outside guest memory")?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(off - r.file_offset))
            .map_err(|e| e.to_string())?;
        // SAFETY: `check_runs` put the run inside this region's mapping,
        // which `mem` owns; no vCPU or device runs during a restore.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, (count as usize) * PAGE) };
        file.read_exact_at(dst, off)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Set (to anything) in the VMM's environment, it logs a digest of guest
/// RAM at each save and right after each restore (before any device or
/// vCPU touches it): how tests prove a restore byte-identical.
pub const RAM_DIGEST_ENV: &str = "MICROAGENT_VMM_RAM_DIGEST";

/// Logs `ram digest WHEN ID: HEX` when [`RAM_DIGEST_ENV`] is set.
pub fn log_ram_digest(mem: &GuestMemoryMmap, when: &str, id: &str) {
    if std::env::var_os(RAM_DIGEST_ENV).is_some() {
        eprintln!("ram digest {when} {id}: {}", ram_digest(mem));
    }
}

/// Guest RAM hashed as a whole `memory.bin` of it is (the manifest's
/// `sha256-nonzero-4k-blocks`): the memory file's length, then each
/// non-zero page with its offset in the file.
pub fn ram_digest(mem: &GuestMemoryMmap) -> String {
    use sha2::{Digest, Sha256};
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut h = Sha256::new();
    h.update(total.to_le_bytes());
    let mut offset = 0u64;
    for region in mem.iter() {
        let size = region.len();
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            return String::new();
        };
        // SAFETY: the region maps `size` bytes at `host` while `mem` lives;
        // callers hold the VM still (paused, or not yet running).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, size as usize) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            if page != &super::ZERO_PAGE[..] {
                h.update((offset + (i * PAGE) as u64).to_le_bytes());
                h.update(page);
            }
        }
        offset += size;
    }
    crate::digest::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_runs_coalesce_and_skip_empty_words() {
        let mut words = vec![0u64; 4];
        words[0] = 0b1110_0001;
        words[1] = 1 << 63;
        words[2] = 1;
        words[3] = u64::MAX;
        let mut out = Vec::new();
        bit_runs(&words, 200, 1000, &mut out);
        // Bits 127 and 128 are one run across a word edge; 192..200 ends
        // at the region's page count, not the word's end.
        assert_eq!(out, vec![(1000, 1), (1005, 3), (1127, 2), (1192, 8)]);
    }

    /// Diff layers over a guest split around the MMIO gap (where another
    /// VMM once corrupted diff snapshots): pages changed on both sides,
    /// one zeroed, one at each region's edge; bottom + diffs must equal
    /// the memory they were taken from, byte for byte.
    #[test]
    fn diff_layers_round_trip_across_the_mmio_gap() {
        use crate::vmm::arch::x86_64::layout::ram_ranges;
        use crate::vmm::memory;
        use vm_memory::{Bytes, GuestAddress};
        let mem_mib = 4096;
        let mem = memory::create(mem_mib).unwrap();
        let ranges = ram_ranges(mem_mib << 20);
        let (low, low_size) = ranges[0];
        let (high, high_size) = ranges[1];
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(low + 0x10_0000))
            .unwrap();
        mem.write_slice(&[9u8; PAGE], GuestAddress(high + 0x20_0000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bottom = dir.path().join("memory.0.bin");
        let regions =
            super::super::live::write_memory(&mem, &File::create(&bottom).unwrap()).unwrap();
        memory::take_vmm_dirty(&mem);

        let mut files = Vec::new();
        let edits: [&[(u64, u8)]; 2] = [
            &[
                (low + 0x10_0000 + PAGE as u64, 0), // zeroed: must cover the 7s
                (low + low_size - PAGE as u64, 1),
                (high, 2),
            ],
            &[(high + high_size - PAGE as u64, 3), (high + 0x20_0000, 4)],
        ];
        for (k, edit) in edits.iter().enumerate() {
            for &(addr, byte) in edit.iter() {
                mem.write_slice(&[byte; PAGE], GuestAddress(addr)).unwrap();
            }
            let dirty = memory::take_vmm_dirty(&mem);
            let path = dir.path().join(format!("diff{k}"));
            let (r, runs) =
                super::super::live::write_diff(&mem, &dirty, &File::create(&path).unwrap())
                    .unwrap();
            assert_eq!(r, regions);
            assert_eq!(runs.len(), edit.len().min(3));
            files.push((path, runs));
        }
        // Sparse: the zeroed page is a hole, yet held by the runs.
        assert!(crate::util::copy::allocated_bytes(&files[0].0) <= 2 * PAGE as u64 + 8192);

        let snap = super::super::tests::snapshot_of(mem_mib, regions.clone());
        let restored = super::super::map_memory(&bottom, &snap).unwrap();
        for (path, runs) in &files {
            apply(&restored, &regions, path, runs).unwrap();
        }
        assert_eq!(ram_digest(&restored), ram_digest(&mem));
        let mut page = [1u8; 8];
        restored
            .read_slice(&mut page, GuestAddress(low + 0x10_0000 + PAGE as u64))
            .unwrap();
        assert_eq!(page, [0; 8]);
        // Runs that do not fit the layout are refused before any read.
        let bad = vec![((low_size / PAGE as u64) - 1, 2)];
        assert!(apply(&restored, &regions, &files[0].0, &bad).is_err());
    }

    #[test]
    fn runs_must_be_ordered_and_inside_a_region() {
        let regions = [
            RegionSnap {
                guest_addr: 0,
                size: 16 * PAGE as u64,
                file_offset: 0,
            },
            RegionSnap {
                guest_addr: 1 << 32,
                size: 16 * PAGE as u64,
                file_offset: 16 * PAGE as u64,
            },
        ];
        assert!(check_runs(&[(0, 2), (14, 2), (16, 16)], &regions).is_ok());
        assert!(check_runs(&[(15, 2)], &regions).is_err(), "crosses the gap");
        assert!(check_runs(&[(4, 2), (3, 1)], &regions).is_err());
        assert!(check_runs(&[(4, 0)], &regions).is_err());
        assert!(check_runs(&[(u64::MAX, 2)], &regions).is_err());
        assert!(check_runs(&[(30, 4)], &regions).is_err());
    }
}
