//! Boot benchmark: process start to the guest's init marker, for microagent
//! and (when installed) QEMU `-M microvm` booting the same kernel and root
//! disk with the same CPU features hidden. One JSON line per figure.
//!
//! Runs: MICROAGENT_BENCH_RUNS, default 3 on PVM hosts and 10 elsewhere.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/qemu.rs"]
mod qemu;
#[path = "support/stats.rs"]
mod stats;

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

fn report(vmm: &str, samples: &[Duration]) {
    let ms = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    stats::emit(
        "boot",
        vmm,
        "process_start_to_init_ms",
        "ms",
        ms,
        serde_json::json!({"memory_mib": MEMORY_MIB.parse::<u64>().unwrap()}),
    );
}

fn main() {
    if !common::kvm_available() {
        stats::skipped("boot", "microagent", "/dev/kvm not available");
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
    report("microagent", &ours);

    if !qemu::available() {
        stats::skipped("boot", "qemu-microvm", "qemu-system-x86_64 not installed");
        return;
    }
    // QEMU gets what our VMM adds on its own.
    guest_args.push_str(&qemu::vmm_guest_args(pvm));
    let mut theirs = Vec::new();
    for _ in 0..runs {
        let memory: u64 = MEMORY_MIB.parse().unwrap();
        theirs.extend(time_to_marker(qemu::microvm(
            &kernel,
            &rootfs,
            memory,
            &guest_args,
        )));
    }
    report("qemu-microvm", &theirs);
}
