//! Saving and restoring one vCPU's architectural state.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSR_IA32_TSC_DEADLINE must be written after the TSC itself.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// Why a vCPU's state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0} CPUID entries (1 to {KVM_MAX_CPUID_ENTRIES} allowed)")]
    CpuidCount(usize),
    #[error("{what}: {len} entries do not fit KVM's array")]
    TooMany { what: &'static str, len: usize },
    #[error("KVM refused MSR {index:#x} ({set} of {total} set)")]
    MsrRefused {
        index: u32,
        set: usize,
        total: usize,
    },
}

fn e(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Reads every MSR in `list` that KVM will give us for this vCPU. KVM stops
/// at the first MSR it refuses, so refused ones are dropped and the rest
/// read again.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut wanted: Vec<u32> = list.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            what: "MSR list",
            len: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(e("reading MSRs"))?;
        if n == wanted.len() {
            let mut out = msrs.as_slice().to_vec();
            // The TSC deadline is only meaningful after the TSC is set.
            out.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
            return Ok(out);
        }
        wanted.remove(n);
    }
}

pub fn save(fd: &mut VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    // Completes any I/O the last exit left half-done (a pending MMIO or port
    // read lands in the registers), without running guest code.
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    Ok(VcpuState {
        index,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("reading CPUID"))?
            .as_slice()
            .to_vec(),
        regs: fd.get_regs().map_err(e("reading registers"))?,
        sregs: fd.get_sregs().map_err(e("reading sregs"))?,
        xsave: fd.get_xsave().map_err(e("reading xsave"))?,
        xcrs: fd.get_xcrs().map_err(e("reading xcrs"))?,
        lapic: fd.get_lapic().map_err(e("reading LAPIC"))?,
        msrs: read_msrs(fd, msr_list)?,
        mp_state: fd.get_mp_state().map_err(e("reading mp_state"))?,
        events: fd.get_vcpu_events().map_err(e("reading vcpu events"))?,
        debugregs: fd.get_debug_regs().map_err(e("reading debug registers"))?,
    })
}

/// Creates vCPU `state.index` and loads its state. Validation of the
/// untrusted state is KVM's own (each ioctl rejects invalid values) plus
/// the checks here.
pub fn restore(vm: &VmFd, state: &VcpuState) -> Result<VcpuFd, VcpuStateError> {
    let fd = vm
        .create_vcpu(u64::from(state.index))
        .map_err(e("creating vCPU"))?;
    if state.cpuid.is_empty() || state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(VcpuStateError::CpuidCount(state.cpuid.len()));
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooMany {
        what: "CPUID",
        len: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(e("setting CPUID"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(e("setting mp_state"))?;
    fd.set_regs(&state.regs).map_err(e("setting registers"))?;
    fd.set_sregs(&state.sregs).map_err(e("setting sregs"))?;
    // SAFETY: no KVM_CAP_XSAVE2 was enabled on this VM, so KVM reads exactly
    // size_of::<kvm_xsave>() bytes, all of which `state.xsave` owns.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(e("setting xsave"))?;
    fd.set_xcrs(&state.xcrs).map_err(e("setting xcrs"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(e("setting debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(e("setting LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuStateError::TooMany {
        what: "MSRs",
        len: state.msrs.len(),
    })?;
    let n = fd.set_msrs(&msrs).map_err(e("setting MSRs"))?;
    if n != state.msrs.len() {
        let refused = state.msrs.get(n).map_or(0, |m| m.index);
        return Err(VcpuStateError::MsrRefused {
            index: refused,
            set: n,
            total: state.msrs.len(),
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(e("setting vcpu events"))?;
    Ok(fd)
}
