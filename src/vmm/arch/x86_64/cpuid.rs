//! CPUID the guest sees: KVM's supported set, adjusted per vCPU (APIC id,
//! topology, hypervisor bit) and filtered through a named CPU template.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// A named filter over the host's CPUID. The template is recorded in snapshot
/// manifests: a restore must show the guest the same CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports (minus nested virtualization).
    Host,
    /// Hides what KVM's instruction emulator cannot run in a PVM guest's
    /// kernel (see shared/HOST-KVM.md): cx16, popcnt, the XSAVE family and
    /// everything built on it (AVX, AVX2, AVX-512, FMA, F16C), SMAP, the
    /// ARCH_CAPABILITIES MSR, and the KVM paravirtual features that work by
    /// hypercall (send-IPI, kick/unhalt, sched-yield) plus PV TLB flush: a
    /// PVM guest's first PV IPI never returns from its `vmcall`.
    PvmSafe,
}

impl CpuTemplate {
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::PvmSafe];

    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::PvmSafe => "pvm-safe",
        }
    }

    /// Kernel command-line arguments that back the template up inside the
    /// guest, in case a CPUID bit leaks through another path.
    pub fn cmdline_defence(self) -> &'static str {
        match self {
            CpuTemplate::Host => "",
            CpuTemplate::PvmSafe => {
                "noxsave clearcpuid=cx16,popcnt,xsave,xsaveopt,xsavec,xsaves,avx,avx2,avx512f,smap"
            }
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CpuTemplate::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown CPU template {s:?} (known: host, pvm-safe)"))
    }
}

// Leaf 1 ECX.
const ECX_VMX: u32 = 1 << 5;
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX: AVX2, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL, SMAP.
const L7_EBX_HIDE: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 20)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
// Leaf 7.0 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES and VPCLMULQDQ (VEX-encoded).
const L7_ECX_HIDE: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
// Leaf 7.0 EDX: AVX-512 4VNNIW/4FMAPS/VP2INTERSECT/FP16, ARCH_CAPABILITIES.
const L7_EDX_HIDE: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23) | (1 << 29);
// Leaf 7.1 EAX: AVX-VNNI, AVX512-BF16.
const L7_1_EAX_HIDE: u32 = (1 << 4) | (1 << 5);
// Leaf 0x80000001 ECX: SVM, XOP, FMA4, TOPOEXT (we do not fill 0x8000001e).
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_ECX_XOP: u32 = 1 << 11;
const EXT_ECX_FMA4: u32 = 1 << 16;
const EXT_ECX_TOPOEXT: u32 = 1 << 22;

// Leaf 0x40000001 EAX (KVM features): PV_UNHALT, PV_TLB_FLUSH, PV_SEND_IPI, PV_SCHED_YIELD.
const KVM_PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts one vCPU's copy of the supported CPUID.
pub fn configure(cpuid: &mut CpuId, template: CpuTemplate, vcpu_index: u8, vcpu_count: u8) {
    let apic_id = u32::from(vcpu_index);
    let count = u32::from(vcpu_count);
    let pvm_safe = template == CpuTemplate::PvmSafe;

    // Leaf 0xd describes XSAVE areas; with XSAVE hidden it must vanish too.
    if pvm_safe {
        let kept: Vec<kvm_cpuid_entry2> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function != 0xd)
            .copied()
            .collect();
        if let Ok(filtered) = CpuId::from_entries(&kept) {
            *cpuid = filtered;
        }
    }

    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_VMX;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
                if pvm_safe {
                    e.ecx &= !(ECX_FMA
                        | ECX_CX16
                        | ECX_POPCNT
                        | ECX_XSAVE
                        | ECX_OSXSAVE
                        | ECX_AVX
                        | ECX_F16C);
                }
            }
            (4, _) => {
                // Cores per package - 1; caches above L2 are shared by all vCPUs.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            (6, _) => {
                // No thermal/power management interfaces.
                e.eax = 0;
                e.ecx &= !1;
            }
            (7, 0) if pvm_safe => {
                e.ebx &= !L7_EBX_HIDE;
                e.ecx &= !L7_ECX_HIDE;
                e.edx &= !L7_EDX_HIDE;
            }
            (7, 1) if pvm_safe => e.eax &= !L7_1_EAX_HIDE,
            (0xa, _) => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0xb, _) | (0x1f, _) => {
                // One thread per core, all vCPUs in one package.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = ceil_log2(count);
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            (0x4000_0001, _) if pvm_safe => e.eax &= !KVM_PV_HYPERCALL_FEATURES,
            (0x8000_0001, _) => {
                e.ecx &= !(EXT_ECX_SVM | EXT_ECX_TOPOEXT);
                if pvm_safe {
                    e.ecx &= !(EXT_ECX_XOP | EXT_ECX_FMA4);
                }
            }
            (0x8000_0008, _) => {
                // AMD: number of cores - 1 and the APIC id width.
                e.ecx = (ceil_log2(count).max(1) << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, reg: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: reg,
            ebx: reg,
            ecx: reg,
            edx: reg,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(0xb, 1, 0),
            entry(0xd, 0, u32::MAX),
            entry(0xd, 1, u32::MAX),
            entry(0x4000_0001, 0, u32::MAX),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
    }

    #[test]
    fn pvm_safe_hides_what_the_emulator_cannot_run() {
        let mut c = sample();
        configure(&mut c, CpuTemplate::PvmSafe, 1, 2);
        let l1 = find(&c, 1, 0).unwrap();
        for bit in [ECX_CX16, ECX_POPCNT, ECX_XSAVE, ECX_AVX, ECX_VMX] {
            assert_eq!(l1.ecx & bit, 0, "bit {bit:#x} still set");
        }
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 1, "APIC id of vCPU 1");
        let l7 = find(&c, 7, 0).unwrap();
        assert_eq!(l7.ebx & (1 << 5), 0, "avx2");
        assert_eq!(l7.ebx & (1 << 20), 0, "smap");
        assert!(find(&c, 0xd, 0).is_none() && find(&c, 0xd, 1).is_none());
        let kvm = find(&c, 0x4000_0001, 0).unwrap();
        assert_eq!(kvm.eax & (1 << 11), 0, "PV send-IPI");
        assert_ne!(kvm.eax & 1, 0, "kvmclock stays");
        let l0b = find(&c, 0xb, 1).unwrap();
        assert_eq!((l0b.eax, l0b.ebx, l0b.edx), (1, 2, 1));
    }

    #[test]
    fn host_template_keeps_host_features() {
        let mut c = sample();
        configure(&mut c, CpuTemplate::Host, 0, 1);
        let l1 = find(&c, 1, 0).unwrap();
        assert_ne!(l1.ecx & ECX_POPCNT, 0);
        assert_eq!(
            l1.ecx & ECX_VMX,
            0,
            "nested virtualization is never offered"
        );
        assert!(find(&c, 0xd, 0).is_some());
    }

    #[test]
    fn template_names_round_trip() {
        for t in CpuTemplate::ALL {
            assert_eq!(t.name().parse::<CpuTemplate>().unwrap(), t);
        }
        assert!("sandybridge"
            .parse::<CpuTemplate>()
            .unwrap_err()
            .contains("sandybridge"));
    }
}
