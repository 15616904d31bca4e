//! Guest physical memory layout, the same shape Firecracker and Cloud
//! Hypervisor use so a stock x86_64 kernel finds everything where the 64-bit
//! boot protocol expects it.

/// GDT and (empty) IDT used only until the kernel installs its own.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables covering the first 1 GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// x86's COMMAND_LINE_SIZE in Linux 6.1.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; the MP table lives in [EBDA_START, 0xa0000).
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
pub const MPTABLE_END: u64 = 0xa0000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// 32-bit MMIO hole: [3 GiB, 4 GiB). RAM beyond 3 GiB continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each, inside the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (0-4 are legacy ISA: PIT, i8042, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin usable for devices.
pub const IRQ_MAX: u32 = 23;
pub const SERIAL_IRQ: u32 = 4;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS and one for the identity map
/// on Intel hosts; both sit at the top of the MMIO gap, away from devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The MP table must fit below 0xa0000 (see mptable.rs), which caps vCPUs.
pub const MAX_VCPUS: u8 = 32;

/// Guest RAM ranges for `mem_bytes` of memory: one region up to 3 GiB, two
/// regions around the MMIO gap above that.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let four_gib = 4u64 << 30;
        assert_eq!(
            ram_ranges(four_gib),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
        let total: u64 = ram_ranges(four_gib).iter().map(|r| r.1).sum();
        assert_eq!(total, four_gib);
    }
}
