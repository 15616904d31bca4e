//! The CPUID a snapshot's guest saw, as recorded in its manifest, and the
//! check that this host can show a restored guest every feature it saw.
//! A guest that found AVX-512 at boot and woke on a host without it would
//! fault on its first such instruction, so that is refused up front.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

/// One CPUID leaf as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidLeaf {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidLeaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// Feature-flag registers: (leaf, subleaf, register name). Everything else
/// in CPUID describes topology, caches or sizes, not what may be executed.
const FEATURE_REGS: [(u32, u32, &str); 7] = [
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

fn reg(leaves: &[CpuidLeaf], function: u32, index: u32, name: &str) -> u32 {
    leaves
        .iter()
        .find(|l| l.function == function && l.index == index)
        .map_or(0, |l| match name {
            "eax" => l.eax,
            "ebx" => l.ebx,
            "ecx" => l.ecx,
            _ => l.edx,
        })
}

/// The first feature register in which the snapshot's guest saw bits that
/// `here` (what this host would show a new guest with the same template)
/// lacks: `(leaf, register, missing bits)`.
pub fn missing_features(
    snapshot: &[CpuidLeaf],
    here: &[CpuidLeaf],
) -> Option<(u32, &'static str, u32)> {
    FEATURE_REGS.iter().find_map(|&(f, i, r)| {
        let missing = reg(snapshot, f, i, r) & !reg(here, f, i, r);
        (missing != 0).then_some((f, r, missing))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32) -> CpuidLeaf {
        CpuidLeaf {
            function,
            index: 0,
            eax: 0,
            ebx: 0,
            ecx,
            edx: 0,
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let snap = [leaf(1, 0b1011), leaf(7, 0)];
        assert_eq!(missing_features(&snap, &[leaf(1, 0b1011)]), None);
        // Extra host features are fine; the guest simply does not know them.
        assert_eq!(missing_features(&snap, &[leaf(1, 0b1111)]), None);
        assert_eq!(
            missing_features(&snap, &[leaf(1, 0b0011)]),
            Some((1, "ecx", 0b1000))
        );
    }
}
