//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns its CPUs, IOAPIC and IRQ routing.

use crate::devices::GuestMemoryMmap;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, IRQ_MAX, MAX_VCPUS, MPTABLE_END, MPTABLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table (1..={MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("MP table of {0} bytes does not fit below 0xa0000")]
    TooBig(u64),
    #[error("writing the MP table: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQ_SOURCE_INT: u8 = 0;
const MP_IRQ_SOURCE_NMI: u8 = 1;
const MP_IRQ_SOURCE_EXTINT: u8 = 3;
/// CPU signature and feature flags for family 6 with FPU and APIC.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: all of these are packed C structs of integers: every byte pattern
// is a valid value and there is no padding.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Serialises the MP configuration table body (everything after the MPC header).
fn entries(num_cpus: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for cpu in 0..num_cpus {
        let e = MpcCpu {
            type_: 0,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        out.extend_from_slice(e.as_slice());
    }
    let bus = MpcBus {
        type_: 1,
        busid: 0,
        bustype: *b"ISA   ",
    };
    out.extend_from_slice(bus.as_slice());
    let ioapic_id = num_cpus + 1;
    let ioapic = MpcIoapic {
        type_: 2,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_ADDR,
    };
    out.extend_from_slice(ioapic.as_slice());
    for irq in 0..=IRQ_MAX as u8 {
        let src = MpcIntsrc {
            type_: 3,
            irqtype: MP_IRQ_SOURCE_INT,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        out.extend_from_slice(src.as_slice());
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of all.
    for (irqtype, dstapic, dstirq) in [
        (MP_IRQ_SOURCE_EXTINT, 0u8, 0u8),
        (MP_IRQ_SOURCE_NMI, 0xff, 1),
    ] {
        let lint = MpcIntsrc {
            type_: 4,
            irqtype,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: 0,
            dstapic,
            dstirq,
        };
        out.extend_from_slice(lint.as_slice());
    }
    out
}

pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let body = entries(num_cpus);
    let mpf_size = std::mem::size_of::<MpfIntel>() as u64;
    let mpc_size = std::mem::size_of::<MpcTable>() as u64;
    let total = mpf_size + mpc_size + body.len() as u64;
    if MPTABLE_START + total > MPTABLE_END {
        return Err(MptableError::TooBig(total));
    }

    let mpc_addr = MPTABLE_START + mpf_size;
    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: mpc_addr as u32,
        length: 1,
        specification: 4,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice()).wrapping_neg();

    let mut mpc = MpcTable {
        signature: *b"PCMP",
        length: (mpc_size as usize + body.len()) as u16,
        spec: 4,
        oem: *b"MICROAGT",
        productid: *b"MICROVM     ",
        lapic: APIC_ADDR,
        ..Default::default()
    };
    mpc.checksum = checksum(mpc.as_slice())
        .wrapping_add(checksum(&body))
        .wrapping_neg();

    mem.write_obj(mpf, GuestAddress(MPTABLE_START))?;
    mem.write_obj(mpc, GuestAddress(mpc_addr))?;
    mem.write_slice(&body, GuestAddress(mpc_addr + mpc_size))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let m = mem();
        setup_mptable(&m, 4).unwrap();
        let mut mpf = [0u8; 16];
        m.read_slice(&mut mpf, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(checksum(&mpf), 0);
        let mpc: MpcTable = m.read_obj(GuestAddress(MPTABLE_START + 16)).unwrap();
        let len = mpc.length as usize;
        let mut table = vec![0u8; len];
        m.read_slice(&mut table, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(checksum(&table), 0);
        let cpus = table[44..].chunks(20).take(4).filter(|c| c[0] == 0).count();
        assert_eq!(cpus, 4);
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(matches!(
            setup_mptable(&mem(), 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(setup_mptable(&mem(), MAX_VCPUS).is_ok());
        assert!(matches!(
            setup_mptable(&mem(), MAX_VCPUS + 1),
            Err(MptableError::TooManyCpus(_))
        ));
    }
}
