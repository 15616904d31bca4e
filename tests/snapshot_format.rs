//! Snapshot files written by earlier builds stay readable: a real
//! vmstate.bin and manifest.json of format 1.0 (a 1 vCPU, 1 GiB guest,
//! taken on our PVM host) are kept in tests/fixtures/. Any change to the
//! body must bump the format; if it breaks these, it must bump the major
//! and keep refusing old files with a clear error instead.

use microagent::snapshot::format::{decode, FormatError, FORMAT_MAJOR};
use microagent::snapshot::manifest::{HostCpu, Manifest};
use microagent::vmm::snapshot::{DeviceState, VmSnapshot};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn format_1_0_vmstate_still_decodes() {
    let bytes = std::fs::read(fixture("vmstate-1.0.bin")).unwrap();
    let snap: VmSnapshot = decode(&bytes).expect("a 1.0 vmstate.bin must stay readable");
    assert_eq!(snap.vcpu_count, 1);
    assert_eq!(snap.vcpus.len(), 1);
    assert_eq!(snap.mem_mib, 1024);
    assert!(!snap.vcpus[0].cpuid.is_empty());
    assert!(!snap.vcpus[0].msrs.is_empty());
    let ram: u64 = snap.memory.iter().map(|r| r.size).sum();
    assert_eq!(ram, 1 << 30);
    assert!(snap
        .devices
        .iter()
        .any(|(_, d)| matches!(d, DeviceState::Serial(_))));
    assert!(
        snap.devices
            .iter()
            .filter(|(_, d)| matches!(d, DeviceState::Virtio(_)))
            .count()
            >= 2,
        "blk and vsock transports"
    );
}

#[test]
fn an_unknown_major_is_refused_by_name() {
    let mut bytes = std::fs::read(fixture("vmstate-1.0.bin")).unwrap();
    bytes[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes());
    let Err(err) = decode::<VmSnapshot>(&bytes) else {
        panic!("format {} accepted", FORMAT_MAJOR + 1);
    };
    assert_eq!(
        err,
        FormatError::UnsupportedMajor {
            found: FORMAT_MAJOR + 1
        }
    );
    assert!(err.to_string().contains(&format!(
        "vmstate format {}.x is not supported",
        FORMAT_MAJOR + 1
    )));
}

#[test]
fn format_1_0_manifest_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("manifest-1.0.json"),
        dir.path().join("manifest.json"),
    )
    .unwrap();
    let m = Manifest::read(dir.path()).unwrap();
    assert_eq!(m.format_version, "1.0");
    assert!(m.guest_cpuid.is_empty(), "1.0 did not record CPUID");
    let host = HostCpu {
        vendor: "AuthenticAMD".into(),
        model: "AMD EPYC".into(),
    };
    // Same kernel, template, CPU and TSC: compatible, CPUID unchecked.
    m.check_compatible(
        &m.kernel_sha256,
        "pvm-safe",
        &host,
        Some(1_996_248),
        Some(&[]),
    )
    .unwrap();
}
