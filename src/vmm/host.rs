//! Facts about the host that change how guests must be configured.

use std::path::Path;

use crate::snapshot::cpuid::CpuidLeaf;
use crate::vmm::arch::x86_64::cpuid::{configure, CpuTemplate};

/// PVM ("Pagetable-based Virtual Machine") provides /dev/kvm by software
/// virtualization: guest kernel code runs in KVM's instruction emulator,
/// which needs a restricted CPU and a patched guest (shared/HOST-KVM.md).
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The CPU template used when the user does not pick one.
pub fn default_cpu_template() -> CpuTemplate {
    if is_pvm() {
        CpuTemplate::PvmSafe
    } else {
        CpuTemplate::Host
    }
}

/// Total host RAM in bytes, used to refuse guests that could never fit.
pub fn total_ram_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The TSC frequency KVM gives guests on this host (a throwaway VM and vCPU
/// ask it). Snapshots record it: without TSC scaling a guest cannot move to
/// a host whose TSC runs at another rate.
pub fn guest_tsc_khz() -> Option<u32> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok()
}

/// The CPUID this host would show vCPU 0 of a new guest under `template`:
/// what a restored guest's CPUID is checked against. Read back from a
/// throwaway vCPU, as a snapshot reads it: KVM may adjust what it is given
/// (PVM reports a sparse supported set and shows the guest more).
pub fn guest_cpuid(template: CpuTemplate, vcpus: u8) -> Option<Vec<CpuidLeaf>> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()?;
    configure(&mut cpuid, template, 0, vcpus);
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.set_cpuid2(&cpuid).ok()?;
    let seen = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).ok()?;
    Some(seen.as_slice().iter().map(CpuidLeaf::from).collect())
}

/// What saving and restoring a VM's memory and state needs from KVM, by
/// the name errors and the test switch use.
const SNAPSHOT_CAPS: [(&str, kvm_ioctls::Cap); 8] = [
    ("XSAVE", kvm_ioctls::Cap::Xsave),
    ("XCRS", kvm_ioctls::Cap::Xcrs),
    ("VCPU_EVENTS", kvm_ioctls::Cap::VcpuEvents),
    ("DEBUGREGS", kvm_ioctls::Cap::Debugregs),
    ("IRQCHIP", kvm_ioctls::Cap::Irqchip),
    ("PIT2", kvm_ioctls::Cap::Pit2),
    ("ADJUST_CLOCK", kvm_ioctls::Cap::AdjustClock),
    ("KVMCLOCK_CTRL", kvm_ioctls::Cap::KvmclockCtrl),
];

/// Test switch (documented in the README): capability names, comma
/// separated, that [`snapshot_support`] treats as absent, so a test can
/// stand in a host that lacks them. It only removes; it never adds.
pub const HIDE_CAPS_ENV: &str = "MICROAGENT_TEST_HIDE_KVM_CAPS";

/// Asks this host's KVM whether it can save and restore a VM: the
/// capabilities above and a readable MSR list. Err names what is missing
/// (`KVM_CAP_XSAVE`, `KVM_GET_MSR_INDEX_LIST`, or /dev/kvm itself).
pub fn snapshot_support() -> Result<(), Vec<String>> {
    let hidden: Vec<String> = std::env::var(HIDE_CAPS_ENV)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_uppercase())
        .filter(|s| !s.is_empty())
        .collect();
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| vec![format!("/dev/kvm ({e})")])?;
    let mut missing: Vec<String> = SNAPSHOT_CAPS
        .iter()
        .filter(|(name, cap)| hidden.iter().any(|h| h == name) || !kvm.check_extension(*cap))
        .map(|(name, _)| format!("KVM_CAP_{name}"))
        .collect();
    let msrs_ok = !hidden.iter().any(|h| h == "MSR_INDEX_LIST")
        && kvm
            .get_msr_index_list()
            .is_ok_and(|l| !l.as_slice().is_empty());
    if !msrs_ok {
        missing.push("KVM_GET_MSR_INDEX_LIST".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}
