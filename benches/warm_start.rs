//! Cold start vs warm start, side by side in one run, one JSON line each
//! plus their ratio: `create` + `start` + the first `exec` output, for a
//! workspace whose boot key has no cached boot snapshot (`start --cold`)
//! and for one that resumes the cached boot of an equal workspace.
//!
//! Runs: MICROAGENT_BENCH_RUNS, default 3 on PVM hosts (a cold boot takes
//! about a minute there) and 10 elsewhere.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::time::Instant;

fn stats(name: &str, samples: Vec<f64>) -> Option<f64> {
    stats::emit(
        "warm_start",
        "microagent",
        name,
        "ms",
        samples,
        serde_json::json!({}),
    )
}

/// create + start (+ --cold) + first exec output, in ms; None on failure.
fn start_to_first_exec(home: &common::Home, rootfs: &str, name: &str, cold: bool) -> Option<f64> {
    let t = Instant::now();
    let kernel = common::vmlinux();
    let created = home
        .cmd()
        .args(["create", name, "--rootfs", rootfs, "--memory", "256"])
        .args(["--init", "/init", "--kernel"])
        .arg(&kernel)
        .output()
        .ok()?;
    if !created.status.success() {
        eprintln!(
            "create {name}: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        return None;
    }
    let mut start = home.cmd();
    start.args(["start", name]);
    if cold {
        start.arg("--cold");
    }
    let started = start.output().ok()?;
    if !started.status.success() {
        eprintln!("start {name}: {}", String::from_utf8_lossy(&started.stderr));
        return None;
    }
    let out = home
        .cmd()
        .args(["exec", name, "--", "echo", "first"])
        .output()
        .ok()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = home
        .cmd()
        .args(["delete", name, "--yes", "--force"])
        .output();
    (out.status.success() && out.stdout == b"first\n").then_some(ms)
}

fn main() {
    if !common::kvm_available() {
        stats::skipped("warm_start", "microagent", "/dev/kvm not available");
        return;
    }
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::is_pvm_host() { 3 } else { 10 });
    let home = common::Home::new();
    let rootfs = common::busybox_rootfs(
        home.dir.path(),
        "#!/bin/sh\nwhile true; do sleep 3600; done\n",
    );
    let rootfs = rootfs.to_str().unwrap();
    // Fill the cache once (not measured), then alternate cold and warm so
    // host noise hits both alike.
    let _ = start_to_first_exec(&home, rootfs, "prime", false);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        cold.extend(start_to_first_exec(
            &home,
            rootfs,
            &format!("cold{i}"),
            true,
        ));
        warm.extend(start_to_first_exec(
            &home,
            rootfs,
            &format!("warm{i}"),
            false,
        ));
    }
    let c = stats("cold_start_to_first_exec_ms", cold);
    let w = stats("warm_start_to_first_exec_ms", warm);
    if let (Some(c), Some(w)) = (c, w) {
        stats::emit(
            "warm_start",
            "microagent",
            "cold_over_warm_median",
            "x",
            vec![c / w],
            serde_json::json!({}),
        );
    }
}
