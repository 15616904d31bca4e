//! Boot benchmark: process start to the guest's init marker, for microagent
//! and (when installed) QEMU `-M microvm` booting the same kernel and root
//! disk with the same CPU features hidden. One JSON line per figure.
//!
//! Runs: MICROAGENT_BENCH_RUNS, default 3 on PVM hosts and 10 elsewhere.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INIT: &str = "#!/bin/sh\necho MICROAGENT_INIT_OK\nreboot -f\n";
const MARKER: &str = "MICROAGENT_INIT_OK";
const MEMORY_MIB: &str = "256";

/// Spawns `cmd`, returns the time until MARKER appears on its stdout, and
/// reaps it (killing it if it does not exit by itself shortly after).
fn time_to_marker(mut cmd: Command) -> Option<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.contains(MARKER) {
            found = Some(start.elapsed());
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    found
}

fn report(vmm: &str, samples: &mut [Duration], runs: usize) {
    if samples.is_empty() {
        println!(r#"{{"bench":"boot","vmm":"{vmm}","error":"no run reached init","runs":{runs}}}"#);
        return;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        r#"{{"bench":"boot","vmm":"{vmm}","metric":"process_start_to_init_ms","runs":{},"min":{:.1},"median":{:.1},"max":{:.1},"pvm_host":{}}}"#,
        samples.len(),
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        common::is_pvm_host()
    );
}

/// Loops-per-jiffy at the guest kernel's HZ=100, from the host's CPU clock.
fn host_lpj() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1e6 / 100.0) as u64)
}

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    if !common::kvm_available() {
        println!(r#"{{"bench":"boot","error":"/dev/kvm not available"}}"#);
        return;
    }
    let pvm = common::is_pvm_host();
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if pvm { 3 } else { 10 });
    let dir = tempfile::tempdir().unwrap();
    let rootfs = common::busybox_rootfs(dir.path(), INIT);
    let kernel = common::vmlinux();
    // The same guest-side arguments for both VMMs; each adds its own
    // console and device arguments.
    let mut guest_args = String::from("quiet root=/dev/vda rw init=/init");

    let mut ours = Vec::new();
    for _ in 0..runs {
        let mut cmd = common::microagent();
        cmd.args(["vmm", "run", "--memory", MEMORY_MIB, "--kernel"])
            .arg(&kernel)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["--cmdline", &guest_args]);
        ours.extend(time_to_marker(cmd));
    }
    report("microagent", &mut ours, runs);

    if !qemu_available() {
        println!(
            r#"{{"bench":"boot","vmm":"qemu-microvm","skipped":"qemu-system-x86_64 not installed"}}"#
        );
        return;
    }
    // QEMU gets what our VMM adds on its own: a preset lpj and the PVM defences.
    if let Some(lpj) = host_lpj() {
        guest_args.push_str(&format!(" lpj={lpj}"));
    }
    if pvm {
        guest_args.push_str(
            " microagent.pvm_syscall noxsave clearcpuid=cx16,popcnt,xsave,xsaveopt,xsavec,xsaves,avx,avx2,avx512f,smap",
        );
    }
    let mut theirs = Vec::new();
    for _ in 0..runs {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            // Without ACPI QEMU lists the virtio-mmio devices on the kernel
            // command line, which is how our ACPI-less guest kernel finds them.
            "microvm,acpi=off",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            MEMORY_MIB,
        ])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-append")
        .arg(format!("console=ttyS0 reboot=t panic=-1 {guest_args}"));
        theirs.extend(time_to_marker(cmd));
    }
    report("qemu-microvm", &mut theirs, runs);
}
