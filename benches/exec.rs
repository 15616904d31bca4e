//! Exec benchmark on one booted workspace, one JSON line per figure:
//! - `exec NAME -- true` end to end (min/median/max);
//! - where that time goes on our side: CLI process start, and connect +
//!   CONNECT/OK + HELLO + ping through the VMM's vsock to the agent;
//! - stdout streaming throughput in MB/s, from `dd bs=1M` (busybox `head
//!   -c` is itself slower than the stream on PVM), beside the same `dd`
//!   into a pipe inside the guest (the guest's own ceiling);
//! - with `perf` installed (Debian `linux-perf`), what one MiB of that
//!   stream costs the vCPU: KVM exits (hardware KVM), exits to the VMM,
//!   and instructions KVM emulated (PVM hosts emulate guest kernel code:
//!   the cost that dominates there).
//!
//! Runs: MICROAGENT_BENCH_RUNS, default 10 on PVM hosts and 100 elsewhere.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::process::Stdio;
use std::time::{Duration, Instant};

use microagent::agent::AgentConn;

/// Bytes streamed per throughput run: a PVM guest moves about 0.1 MB/s
/// (its kernel is emulated), so 2 MiB there keeps a run near half a minute.
fn stream_bytes() -> usize {
    if common::is_pvm_host() {
        2 << 20
    } else {
        16 << 20
    }
}

fn stats(name: &str, unit: &str, samples: Vec<f64>, extra: serde_json::Value) {
    stats::emit("exec", "microagent", name, unit, samples, extra);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Tracepoints counted on the vCPU thread during the stdout stream.
/// (A virtio interrupt costs two exits to the VMM: the status read and
/// the ack; `kvm_ack_irq` did not count ours on every guest, so it is
/// not used.)
const KVM_EVENTS: [&str; 3] = [
    "kvm:kvm_exit",
    "kvm:kvm_userspace_exit",
    "kvm:kvm_emulate_insn",
];

/// The VMM's vCPU thread for a workspace: the `vcpu0` thread of the
/// process whose command line names its directory.
fn vcpu_thread(ws: &std::path::Path) -> Option<u32> {
    let needle = ws.to_str()?;
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        for t in std::fs::read_dir(p.path().join("task")).ok()?.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "vcpu0" {
                return t.file_name().to_str()?.parse().ok();
            }
        }
    }
    None
}

/// `perf stat` on the thread, CSV to a temp file; None without perf.
fn count_kvm_events(tid: u32) -> Option<(std::process::Child, tempfile::NamedTempFile)> {
    let out = tempfile::NamedTempFile::new().ok()?;
    let child = std::process::Command::new("perf")
        .args(["stat", "-x,", "-o"])
        .arg(out.path())
        .args(["-e", &KVM_EVENTS.join(","), "-t", &tid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // perf needs a moment to attach before the stream starts.
    std::thread::sleep(Duration::from_millis(500));
    Some((child, out))
}

/// Stops `perf stat` (SIGINT makes it print) and reads the counts in
/// KVM_EVENTS' order; None if any is missing (no tracefs, no permission).
fn stop_counting((child, out): (std::process::Child, tempfile::NamedTempFile)) -> Option<Vec<f64>> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).ok()?;
    let _ = child.wait_with_output();
    let text = std::fs::read_to_string(out.path()).ok()?;
    KVM_EVENTS
        .iter()
        .map(|e| {
            text.lines()
                .find(|l| l.split(',').nth(2) == Some(e))
                .and_then(|l| l.split(',').next()?.parse().ok())
        })
        .collect()
}

fn main() {
    if !common::kvm_available() {
        stats::skipped("exec", "microagent", "/dev/kvm not available");
        return;
    }
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::is_pvm_host() { 10 } else { 100 });
    let home = common::Home::new();
    let rootfs = common::busybox_rootfs(
        home.dir.path(),
        "#!/bin/sh\nwhile true; do sleep 3600; done\n",
    );
    home.ok(&[
        "create",
        "bench",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        common::vmlinux().to_str().unwrap(),
        "--memory",
        "256",
        "--init",
        "/init",
        // Halts here end runs; their automatic snapshots are not measured.
        "--auto-snapshot-on-stop",
        "false",
    ]);
    home.ok(&["start", "bench"]);

    let mut cli = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let ok = home
            .cmd()
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            cli.push(ms(t.elapsed()));
        }
    }
    stats("cli_process_start_ms", "ms", cli, serde_json::json!({}));

    let sock = home.workspace_dir("bench").join("vsock.sock");
    let ping_once =
        || AgentConn::request(&sock, Duration::from_secs(30), &guest_agent::Request::Ping);
    // Untimed: the first session after boot also pays for the guest's
    // post-boot work.
    let _ = ping_once();
    let mut ping = Vec::new();
    for _ in 0..runs {
        // Latency as one caller sees it: the guest has finished tearing
        // down the previous session (on PVM that teardown is emulated
        // kernel work that a back-to-back connection would wait behind).
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        if ping_once().is_ok() {
            ping.push(ms(t.elapsed()));
        }
    }
    stats(
        "vsock_handshake_and_ping_ms",
        "ms",
        ping,
        serde_json::json!({}),
    );

    let mut exec = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let ok = home
            .cmd()
            .args(["exec", "bench", "--", "true"])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            exec.push(ms(t.elapsed()));
        }
    }
    stats("exec_true_ms", "ms", exec, serde_json::json!({}));

    let stream = stream_bytes();
    let vcpu = vcpu_thread(&home.workspace_dir("bench"));
    let mut tput = Vec::new();
    let mut per_mib: Vec<Vec<f64>> = vec![Vec::new(); KVM_EVENTS.len()];
    for _ in 0..3 {
        let counting = vcpu.and_then(count_kvm_events);
        let t = Instant::now();
        let out = home
            .cmd()
            .args([
                "exec",
                "bench",
                "--",
                "sh",
                "-c",
                &format!("dd if=/dev/zero bs=1M count={} 2>/dev/null", stream >> 20),
            ])
            .output();
        let counts = counting.and_then(stop_counting);
        if let Ok(o) = out {
            if o.stdout.len() == stream {
                tput.push(stream as f64 / 1e6 / t.elapsed().as_secs_f64());
                for (i, n) in counts.iter().flatten().enumerate() {
                    per_mib[i].push(*n / (stream >> 20) as f64);
                }
            }
        }
    }
    for (event, samples) in KVM_EVENTS.iter().zip(per_mib) {
        if !samples.is_empty() {
            let metric = format!("stdout_{}_per_mib", event.trim_start_matches("kvm:kvm_"));
            stats(
                &metric,
                "count",
                samples,
                serde_json::json!({"event": event}),
            );
        }
    }
    // The guest alone: the same producer into a pipe, timed inside.
    let mut pipe = Vec::new();
    for _ in 0..3 {
        // /proc/uptime (10 ms steps): busybox `date` may lack %N.
        let script = format!(
            "s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=1M count={} 2>/dev/null | cat >/dev/null; e=$(cut -d' ' -f1 /proc/uptime); echo $s $e",
            stream >> 20
        );
        let out = home.ok(&["exec", "bench", "--", "sh", "-c", &script]);
        let times: Vec<f64> = out
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if let [s, e] = times[..] {
            if e > s {
                pipe.push(stream as f64 / 1e6 / (e - s));
            }
        }
    }
    stats(
        "in_guest_pipe_throughput",
        "MB/s",
        pipe,
        serde_json::json!({"bytes": stream}),
    );
    stats(
        "stdout_throughput",
        "MB/s",
        tput,
        serde_json::json!({"bytes": stream}),
    );
    home.ok(&["halt", "bench"]);
}
