//! VMM core, end to end: real guests on /dev/kvm with our kernel.
//!
//! Guest boots cost about a minute on PVM hosts, so one boot checks many
//! things at once (see shared/HOST-KVM.md).

mod common;

use common::*;

/// Init for the shared boot: real userspace commands (fork, exec, system
/// calls), facts about the guest, and the disk checks.
const DISK_CHECK_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo MICROAGENT_INIT_OK
echo "FACT cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "FACT online=$(cat /sys/devices/system/cpu/online)"
echo "FACT memtotal_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
mkdir -p /mnt/data /mnt/ro
if mount -t ext4 /dev/vdb /mnt/data; then
  echo hello-from-guest > /mnt/data/from-guest.txt
  umount /mnt/data && echo "FACT data_disk=written"
fi
if mount -t ext4 -o ro /dev/vdc /mnt/ro; then
  echo "FACT ro_disk_reads=$(cat /mnt/ro/marker.txt)"
  umount /mnt/ro
fi
if dd if=/dev/zero of=/dev/vdc bs=512 count=1 2>/dev/null; then
  echo "FACT ro_disk=writable"
else
  echo "FACT ro_disk=refused"
fi
echo MICROAGENT_DONE
reboot -f
"#;

#[test]
fn guest_boots_with_smp_memory_and_disks() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path(), DISK_CHECK_INIT);
    let data = dir.path().join("data.ext4");
    mkfs_ext4(&data, "16M", None);
    let ro_tree = dir.path().join("ro-tree");
    std::fs::create_dir_all(&ro_tree).unwrap();
    std::fs::write(ro_tree.join("marker.txt"), "read-only-marker").unwrap();
    let ro = dir.path().join("ro.ext4");
    mkfs_ext4(&ro, "8M", Some(&ro_tree));
    let ro_before = std::fs::read(&ro).unwrap();
    let console = dir.path().join("console.log");

    let vcpus: u8 = 2;
    let out = vmm_run(&[
        "--kernel",
        vmlinux().to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--disk",
        data.to_str().unwrap(),
        "--disk",
        &format!("{}:ro", ro.display()),
        "--vcpus",
        &vcpus.to_string(),
        "--memory",
        "1024",
        "--console-log",
        console.to_str().unwrap(),
        "--no-console-stdout",
        "--cmdline",
        "quiet root=/dev/vda rw init=/init",
    ]);
    let (_, stderr) = text(&out);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        out.status.success(),
        "VMM failed: {stderr}\nconsole:\n{log}"
    );
    assert!(
        stderr.contains("i8042 reset"),
        "power-off not reported: {stderr}"
    );
    assert!(log.contains("MICROAGENT_INIT_OK"), "init never ran:\n{log}");
    assert!(
        log.contains("MICROAGENT_DONE"),
        "init did not finish:\n{log}"
    );

    assert_eq!(
        fact(&log, "cpus"),
        Some(vcpus.to_string().as_str()),
        "{log}"
    );
    let expected_online = if vcpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", vcpus - 1)
    };
    assert_eq!(
        fact(&log, "online"),
        Some(expected_online.as_str()),
        "{log}"
    );
    let mem_kb: u64 = fact(&log, "memtotal_kb").unwrap().parse().unwrap();
    assert!(
        (900_000..1_048_576).contains(&mem_kb),
        "MemTotal {mem_kb} kB for a 1 GiB guest"
    );

    // Write + flush reached the host file: read it back with debugfs.
    assert_eq!(fact(&log, "data_disk"), Some("written"), "{log}");
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /from-guest.txt"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "hello-from-guest"
    );

    // The read-only disk reads but refuses writes, and is unchanged.
    assert_eq!(
        fact(&log, "ro_disk_reads"),
        Some("read-only-marker"),
        "{log}"
    );
    assert_eq!(fact(&log, "ro_disk"), Some("refused"), "{log}");
    assert!(
        std::fs::read(&ro).unwrap() == ro_before,
        "read-only disk was modified"
    );
}

const LARGE_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo MICROAGENT_INIT_OK
echo "FACT cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "FACT memtotal_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
echo "FACT high_ram=$(grep -c '^100000000-.* : System RAM' /proc/iomem)"
echo MICROAGENT_DONE
reboot -f
"#;

/// 4 vCPUs and 4 GiB: RAM is split around the 3-4 GiB MMIO gap and the
/// guest must see both parts. Heavy on PVM hosts (minutes): run with
/// `cargo test --test vmm_boot -- --ignored`.
#[test]
#[ignore]
fn large_guest_above_mmio_gap() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path(), LARGE_INIT);
    let console = dir.path().join("console.log");
    let out = vmm_run(&[
        "--kernel",
        vmlinux().to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--vcpus",
        "4",
        "--memory",
        "4096",
        "--console-log",
        console.to_str().unwrap(),
        "--no-console-stdout",
        "--cmdline",
        "quiet root=/dev/vda rw init=/init",
    ]);
    let (_, stderr) = text(&out);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        out.status.success(),
        "VMM failed: {stderr}\nconsole:\n{log}"
    );
    assert_eq!(fact(&log, "cpus"), Some("4"), "{log}");
    let mem_kb: u64 = fact(&log, "memtotal_kb").unwrap().parse().unwrap();
    assert!(mem_kb > 3_900_000, "MemTotal {mem_kb} kB for a 4 GiB guest");
    assert_eq!(
        fact(&log, "high_ram"),
        Some("1"),
        "RAM above 4 GiB not registered:\n{log}"
    );
}
