//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO gap and
//! registered with KVM as one memory slot per region.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let addr = region.start_addr().0;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::NoHostAddress(addr))?;
        let slot = slot as u32;
        let size = region.len();
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
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
