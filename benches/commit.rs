//! Commit benchmark, one JSON line per figure: `commit_ms` (the command's
//! wall time), `commit_paused_ms` (how long the guest's writes were held:
//! the docker-commit-like overhead) and `new_layer_bytes` (compressed and
//! uncompressed), for a busybox workspace that wrote 10 MiB and a larger
//! amount (MICROAGENT_BENCH_COMMIT_BIG_MIB, default 200) into its upper.
//! The bytes are zeros: on a PVM host the guest kernel is emulated, and
//! /dev/urandom there makes under 0.1 MB/s, so random data would measure
//! the guest's entropy pool; zeros still pass through the guest's ext4 and
//! our whole read, tar and gzip path (only the gzip ratio flatters). No
//! QEMU counterpart: QEMU has no image commit.
//!
//! Runs per figure: MICROAGENT_BENCH_RUNS, default 3.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use common::{oci, Home};
use serde_json::json;

fn runs() -> usize {
    std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::kvm_available() {
        eprintln!("commit bench: /dev/kvm is not usable; nothing measured");
        std::process::exit(1);
    }
    let big: u64 = std::env::var("MICROAGENT_BENCH_COMMIT_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let home = Home::new();
    let busybox = oci::script_path("image-busybox.sh");
    let image = "localhost/bench-commit:latest";
    home.ok(&["image", "import", busybox.to_str().unwrap(), "--tag", image]);
    home.ok(&[
        "create",
        "ws",
        "--image",
        image,
        "--kernel",
        common::vmlinux().to_str().unwrap(),
        "--memory",
        "256",
        "--disk-size",
        "2G",
    ]);
    home.ok(&["start", "ws"]);
    let mut written = 0;
    for mib in [10, big] {
        let t = std::time::Instant::now();
        common::sh(
            &home,
            "ws",
            &format!(
                "dd if=/dev/zero of=/root/data-{mib} bs=1M count={mib} conv=fsync 2>/dev/null; rm -f /root/data-{written}; echo ok"
            ),
        );
        eprintln!("guest wrote {mib} MiB in {:?}", t.elapsed());
        written = mib;
        let (mut wall, mut paused, mut size, mut raw) = (vec![], vec![], vec![], vec![]);
        for i in 0..runs() {
            let to = format!("localhost/bench-committed:{mib}-{i}");
            let t = std::time::Instant::now();
            let c = home.json(&["commit", "ws", &to]);
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            paused.push(c["paused_ms"].as_f64().unwrap_or(f64::NAN));
            size.push(c["new_layer"]["size"].as_f64().unwrap_or(0.0));
            raw.push(c["new_layer"]["uncompressed_bytes"].as_f64().unwrap_or(0.0));
            home.ok(&["image", "rm", &to]);
        }
        let extra = json!({"written_mib": mib, "memory_mib": 256});
        stats::emit(
            "commit",
            "microagent",
            "commit_ms",
            "ms",
            wall,
            extra.clone(),
        );
        stats::emit(
            "commit",
            "microagent",
            "commit_paused_ms",
            "ms",
            paused,
            extra.clone(),
        );
        stats::emit(
            "commit",
            "microagent",
            "new_layer_bytes",
            "bytes",
            size,
            extra.clone(),
        );
        stats::emit(
            "commit",
            "microagent",
            "new_layer_uncompressed_bytes",
            "bytes",
            raw,
            extra,
        );
    }
    home.ok(&["delete", "ws", "--yes", "--force"]);
}
