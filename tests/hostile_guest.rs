//! A hostile program inside a real guest against the VMM's bounds: for 60
//! seconds it floods vsock with connection requests to host ports nobody
//! listens on (every one makes the VMM queue a reset), spams the console,
//! and through /dev/mem kicks queues no device has and breaks the network
//! device: reset and re-driven over rings of garbage, and activated with
//! rings outside guest memory (guest-agent/src/bin/hostile/). Afterwards the VMM's own
//! memory (its RSS outside guest RAM) and the workspace's logs have grown
//! by no more than their bounds, and the VMM still serves: control,
//! exec, a snapshot. Prints the figures as one JSON line. One warm start
//! (the suite's shared boot snapshot).

mod common;

use std::path::{Path, PathBuf};

use common::*;

const GUEST_MIB: u64 = 256;

/// The VMM's resident memory outside guest RAM (the one mapping of
/// exactly the guest's size), in KiB: what a guest could make the host
/// hold beyond what it was given.
fn vmm_own_rss_kib(pid: i64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total = 0;
    let mut guest_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                guest_ram = e - s == GUEST_MIB << 20;
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:") {
            if !guest_ram {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    total
}

/// Bytes of the workspace's logs (console, its rotated copy, VMM, passt).
fn log_bytes(ws: &Path) -> u64 {
    ["console.log", "console.log.1", "vmm.log", "passt.log"]
        .iter()
        .filter_map(|f| std::fs::metadata(ws.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn hostile_binary() -> PathBuf {
    ensure_agent();
    let p = PathBuf::from(env!("CARGO_BIN_EXE_microagent")).with_file_name("microagent-hostile");
    assert!(
        p.is_file(),
        "scripts/build-agent.sh did not build {}",
        p.display()
    );
    p
}

#[test]
fn a_hostile_guest_leaves_the_host_bounded_and_the_vmm_serving() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    home.ok(&shared.create_args("h", &[]));
    home.ok(&["start", "h"]);
    let ws = home.workspace_dir("h");
    let status = home.json(&["status", "h"]);
    let pid = status["pid"].as_i64().expect("a running VMM's pid");
    home.ok(&["cp", hostile_binary().to_str().unwrap(), "h:/"]);
    // Settled: the copy's exec session is over.
    let rss_before = vmm_own_rss_kib(pid);
    let logs_before = log_bytes(&ws);

    let out = home.ok(&["exec", "h", "--", "/microagent-hostile", "60"]);
    let did: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("the hostile program's report {out:?}: {e}");
    });
    let rss_after = vmm_own_rss_kib(pid);
    let logs_after = log_bytes(&ws);
    let vm_rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| {
            v.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .unwrap();
    println!(
        "{}",
        serde_json::json!({
            "figure": "hostile_guest",
            "hostile": did,
            "vmm_own_rss_kib_before": rss_before,
            "vmm_own_rss_kib_after": rss_after,
            "vmm_rss_kib_after": vm_rss_kib,
            "log_bytes_before": logs_before,
            "log_bytes_after": logs_after,
        })
    );
    assert!(did["vsock_requests"].as_u64().unwrap() > 0, "{did}");
    assert!(did["console_bytes"].as_u64().unwrap() > 0, "{did}");
    assert_eq!(did["mmio_error"], serde_json::Value::Null, "{did}");
    assert!(did["mmio_devices"].as_u64().unwrap() >= 3, "{did}");
    assert!(did["mmio_kicks"].as_u64().unwrap() > 0, "{did}");
    assert!(did["bogus_activations"].as_u64().unwrap() > 8, "{did}");

    // Bounded: the reset queue and per-connection buffers are capped, the
    // console log rotates at its cap (one rotated copy), device logging
    // is rate-limited.
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "the VMM's own RSS grew from {rss_before} to {rss_after} KiB"
    );
    let cap = microagent::devices::serial::CONSOLE_LOG_CAP;
    assert!(
        logs_after <= 2 * cap + (1 << 20),
        "logs hold {logs_after} bytes (console cap {cap})"
    );
    // The refused activations were logged within the device's budget.
    let vmm_log = std::fs::read_to_string(ws.join("vmm.log")).unwrap();
    let refused = vmm_log.matches("queue 0 invalid; needs reset").count();
    assert!(
        (1..=8).contains(&refused) && vmm_log.contains("are suppressed"),
        "{refused} refusals logged: {vmm_log}"
    );

    // Still serving: control, exec, and a snapshot of the same guest.
    assert_eq!(home.json(&["status", "h"])["status"], "running");
    assert_eq!(sh(&home, "h", "echo alive"), "alive");
    let snap = home.json(&["snapshot", "create", "h", "--tag", "after"]);
    assert_eq!(snap["tag"], "after", "{snap}");
}
