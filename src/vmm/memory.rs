//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO gap and
//! registered with KVM as one memory slot per region, and which of its
//! pages changed since a point (for diff snapshots).

use crate::devices::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::arch::x86_64::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("allocating {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(
        "registering guest memory slot {slot} ({size:#x} bytes at {addr:#x}) with KVM: {source}"
    )]
    Register {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("reading KVM's dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("reading /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
}

pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
}

/// Registers each region as a KVM slot; with `log_dirty`, KVM records the
/// pages the guest writes (see [`take_dirty`]). Registering an existing
/// slot again only changes its flags.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let addr = region.start_addr().0;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::NoHostAddress(addr))?;
        let slot = slot as u32;
        let size = region.len();
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` is owned by `mem`, which the VM
        // keeps alive for as long as the VM fd exists (both live in `Vm`, and
        // the memory is dropped after the VM fd).
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
            slot,
            addr,
            size,
            source,
        })?;
    }
    Ok(())
}

/// The pages written since the last call (or since dirty logging began),
/// one bitmap per region (bit i: page i): the guest's writes from KVM's
/// dirty log, OR'd with the VMM's own (virtio buffers and rings) from the
/// regions' bitmaps. Reading clears both. Only while nothing writes
/// guest memory (vCPUs parked, devices locked) is the result exact.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MemoryError> {
    let mut out = take_vmm_dirty(mem);
    for (slot, (region, ours)) in mem.iter().zip(out.iter_mut()).enumerate() {
        let guest = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog {
                slot: slot as u32,
                source,
            })?;
        ours.resize(ours.len().max(guest.len()), 0);
        for (w, g) in ours.iter_mut().zip(guest) {
            *w |= g;
        }
    }
    Ok(out)
}

/// The pages the VMM itself wrote since the last call, one bitmap per
/// region; reading clears them.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter().map(|r| vmm_bitmap(r).get_and_reset()).collect()
}

/// Forgets the VMM's own writes so far (dirty logging starts now).
pub fn clear_vmm_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        vmm_bitmap(region).reset();
    }
}

/// A region's record of the VMM's own writes (the mapping's bitmap, not
/// the trait's per-slice view).
fn vmm_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
    mapping.bitmap()
}

/// The pages of `mem`'s private file mappings that have been written since
/// they were mapped (present and anonymous, or swapped out), one bitmap
/// per region, from `/proc/self/pagemap` (one 64-bit entry per page: bit
/// 63 present, 62 swapped, 61 file-backed or shared).
pub fn written_since_mapped(
    mem: &GuestMemoryMmap,
    pagemap: &std::fs::File,
) -> Result<Vec<Vec<u64>>, MemoryError> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const BATCH: usize = 8192;
    let mut out = Vec::new();
    for region in mem.iter() {
        let addr = region.start_addr().0;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::NoHostAddress(addr))? as u64;
        let pages = region.len() / PAGE;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let mut raw = vec![0u8; BATCH * 8];
        let mut page = 0u64;
        while page < pages {
            let n = ((pages - page) as usize).min(BATCH);
            let at = (host / PAGE + page) * 8;
            pagemap
                .read_exact_at(&mut raw[..n * 8], at)
                .map_err(MemoryError::Pagemap)?;
            for (i, e) in raw[..n * 8].chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                let (present, swapped, file) = (e >> 63 & 1, e >> 62 & 1, e >> 61 & 1);
                if (present == 1 && file == 0) || swapped == 1 {
                    let p = page + i as u64;
                    bits[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            page += n as u64;
        }
        out.push(bits);
    }
    Ok(out)
}
