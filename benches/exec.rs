//! Exec benchmark on one booted workspace, one JSON line per figure:
//! - `exec NAME -- true` end to end (min/median/max);
//! - where that time goes on our side: CLI process start, and connect +
//!   CONNECT/OK + HELLO + ping through the VMM's vsock to the agent;
//! - stdout streaming throughput in MB/s, from `dd bs=1M` (busybox `head
//!   -c` is itself slower than the stream on PVM), beside the same `dd`
//!   into a pipe inside the guest (the guest's own ceiling).
//!
//! Runs: MICROAGENT_BENCH_RUNS, default 10 on PVM hosts and 100 elsewhere.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::process::Stdio;
use std::time::{Duration, Instant};

use microagent::agent::AgentConn;

const STREAM_BYTES: usize = 16 << 20;

fn stats(name: &str, unit: &str, samples: Vec<f64>, extra: serde_json::Value) {
    stats::emit("exec", "microagent", name, unit, samples, extra);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
    let mut ping = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        if AgentConn::connect(&sock, Duration::from_secs(30))
            .and_then(|c| c.call(&guest_agent::Request::Ping))
            .is_ok()
        {
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

    let mut tput = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = home
            .cmd()
            .args([
                "exec",
                "bench",
                "--",
                "sh",
                "-c",
                &format!(
                    "dd if=/dev/zero bs=1M count={} 2>/dev/null",
                    STREAM_BYTES >> 20
                ),
            ])
            .output();
        if let Ok(o) = out {
            if o.stdout.len() == STREAM_BYTES {
                tput.push(STREAM_BYTES as f64 / 1e6 / t.elapsed().as_secs_f64());
            }
        }
    }
    // The guest alone: the same producer into a pipe, timed inside.
    let mut pipe = Vec::new();
    for _ in 0..3 {
        let script = format!(
            "s=$(date +%s%N); dd if=/dev/zero bs=1M count={} 2>/dev/null | cat >/dev/null; e=$(date +%s%N); echo $((e - s))",
            STREAM_BYTES >> 20
        );
        let out = home.ok(&["exec", "bench", "--", "sh", "-c", &script]);
        if let Ok(ns) = out.trim().parse::<f64>() {
            pipe.push(STREAM_BYTES as f64 / 1e6 / (ns / 1e9));
        }
    }
    stats(
        "in_guest_pipe_throughput",
        "MB/s",
        pipe,
        serde_json::json!({"bytes": STREAM_BYTES}),
    );
    stats(
        "stdout_throughput",
        "MB/s",
        tput,
        serde_json::json!({"bytes": STREAM_BYTES}),
    );
    home.ok(&["halt", "bench"]);
}
