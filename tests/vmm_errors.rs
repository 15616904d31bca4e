//! VMM failures: bad input is refused with a clear error before any guest
//! runs, and a guest that KVM cannot run is reported with its exit, RIP and
//! instruction bytes.

mod common;

use common::*;

fn run_err(args: &[&str]) -> (i32, String) {
    let out = vmm_run(args);
    let (_, stderr) = text(&out);
    assert!(!stderr.contains("panicked"), "panic on bad input: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_input_is_refused_with_a_named_value() {
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_kernel, "just text\n".repeat(100)).unwrap();
    let rootfs = dir.path().join("root.ext4");
    mkfs_ext4(&rootfs, "4M", None);
    let nk = not_kernel.to_str().unwrap();
    let rf = rootfs.to_str().unwrap();

    let (code, err) = run_err(&["--kernel", "/nonexistent/vmlinux", "--rootfs", rf]);
    assert_eq!(code, 1);
    assert!(
        err.contains("kernel /nonexistent/vmlinux does not exist"),
        "{err}"
    );

    let (code, err) = run_err(&["--kernel", nk, "--rootfs", rf]);
    assert_eq!(code, 1);
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage") && err.contains(nk),
        "{err}"
    );

    let (code, err) = run_err(&["--kernel", nk, "--rootfs", "/nonexistent/root.ext4"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("disk /nonexistent/root.ext4 does not exist"),
        "{err}"
    );

    for bad in ["0", "33", "100000"] {
        let (code, err) = run_err(&["--kernel", nk, "--rootfs", rf, "--vcpus", bad]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("invalid vCPU count {bad}")), "{err}");
    }
    for bad in ["0", "16", "1000000000"] {
        let (code, err) = run_err(&["--kernel", nk, "--rootfs", rf, "--memory", bad]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("invalid memory size {bad} MiB")),
            "{err}"
        );
    }

    let (code, err) = run_err(&["--kernel", nk, "--vcpus", "two"]);
    assert_eq!(code, 2, "usage errors exit 2: {err}");

    let (code, err) = run_err(&["--kernel", nk, "--cpu-template", "sandybridge"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sandybridge"), "{err}");
}

/// A 64-bit ELF "kernel" whose code KVM cannot run. On PVM hosts the first
/// instruction (popcnt, which the emulator lacks) already fails; on hardware
/// KVM it runs and the code then jumps into identity-mapped address space
/// that is not RAM, where instruction fetch fails.
fn crashing_elf() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    const HDRS: u64 = 64 + 56;
    let mut code = vec![0xf3, 0x48, 0x0f, 0xb8, 0xc3]; // popcnt rax, rbx
    code.extend_from_slice(&[0x48, 0xb8]); // movabs rax, 0x30000000
    code.extend_from_slice(&0x3000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xe0]); // jmp rax
    let total = HDRS + code.len() as u64;

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(LOAD + HDRS).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&0u64.to_le_bytes()); // offset
    elf.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    elf.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    elf.extend_from_slice(&total.to_le_bytes()); // filesz
    elf.extend_from_slice(&total.to_le_bytes()); // memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    assert_eq!(elf.len() as u64, HDRS);
    elf.extend_from_slice(&code);
    elf
}

#[test]
fn internal_error_names_exit_rip_and_instruction_bytes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("crash.elf");
    std::fs::write(&kernel, crashing_elf()).unwrap();
    let out = vmm_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--no-console-stdout",
    ]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("KVM_EXIT_INTERNAL_ERROR"), "{err}");
    assert!(err.contains("suberror 1: emulation failure"), "{err}");
    if is_pvm_host() {
        assert!(err.contains("RIP 0x1000078"), "{err}");
        assert!(err.contains("instruction bytes: f3 48 0f b8 c3"), "{err}");
    } else {
        assert!(err.contains("RIP 0x30000000"), "{err}");
        assert!(err.contains("is not RAM"), "{err}");
    }
}
