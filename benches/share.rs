//! Sharing snapshots through a registry, one JSON line per figure:
//! `push_bytes` and `push_ms` for a first snapshot of a busybox workspace
//! (256 MiB) and for a second one after the guest wrote ~9.5 MiB (five
//! copies of busybox: page cache and disk delta both change); beside
//! them, as the baseline, `tar --sparse | zstd -3` of the same snapshot
//! directory (`vmm: "tar|zstd"`; bytes and ms, what copying the
//! directory by hand would send), and of the directory with what another
//! host also needs to resume it, which the artifact carries too: the
//! kernel, the boot disk and the image's layer blobs (`vmm:
//! "tar|zstd+deps"`). Then `pull_ms` (`snapshot pull` into an
//! empty state directory) and `pull_fork_exec_ms` (`create
//! --from-snapshot REF` into an empty state directory, then `exec --
//! true`), each from a fresh state directory per run. No QEMU
//! counterpart: QEMU has no registry.
//!
//! Runs per figure: MICROAGENT_BENCH_RUNS, default 3.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::process::Command;
use std::time::Instant;

use common::oci::{self, Registry};
use common::Home;
use serde_json::json;

fn runs() -> usize {
    std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `tar --sparse -c DIR EXTRA… | zstd -3 -T1`: (compressed bytes, ms).
fn tar_zstd(dir: &std::path::Path, extra: &[String]) -> (f64, f64) {
    let t = Instant::now();
    let extra: Vec<String> = extra.iter().map(|p| format!("'{p}'")).collect();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar --sparse -cf - -C '{}' . {} 2>/dev/null | zstd -3 -T1 -q -c | wc -c",
            dir.display(),
            extra.join(" ")
        ))
        .output()
        .expect("tar | zstd");
    let bytes = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    (bytes, ms(t))
}

/// The files besides the snapshot another host needs: the workspace's
/// kernel and boot disk, and its image's layer blobs.
fn dependencies(home: &Home) -> Vec<String> {
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let rec = read(home.workspace_dir("ws").join("workspace.json"));
    let mut out = vec![
        rec["kernel"].as_str().unwrap().to_string(),
        rec["layout"]["boot_disk"].as_str().unwrap().to_string(),
    ];
    let digest = rec["image_digest"].as_str().unwrap();
    let images = home.dir.path().join("images");
    let image = read(
        images
            .join(digest.trim_start_matches("sha256:"))
            .join("image.json"),
    );
    for l in image["layers"].as_array().unwrap() {
        let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
        out.push(images.join("blobs/sha256").join(hex).display().to_string());
    }
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::kvm_available() {
        eprintln!("share bench: /dev/kvm is not usable; nothing measured");
        std::process::exit(1);
    }
    let registry = Registry::start();
    let creds = registry.creds();
    let a = Home::new();
    let busybox = oci::script_path("image-busybox.sh");
    a.ok(&[
        "image",
        "import",
        busybox.to_str().unwrap(),
        "--tag",
        "localhost/busybox:latest",
    ]);
    a.ok(&[
        "create",
        "ws",
        "--image",
        "localhost/busybox:latest",
        "--memory",
        "256",
    ]);
    a.ok(&["start", "ws"]);
    let mut last_ref = String::new();
    for (tag, change) in [
        ("first", ""),
        (
            "second",
            "for i in 1 2 3 4 5; do cat /bin/busybox; done > /root/big && sync",
        ),
    ] {
        if !change.is_empty() {
            a.ok(&["exec", "ws", "--", "sh", "-c", change]);
        }
        a.ok(&["snapshot", "create", "ws", "--tag", tag]);
        let extra = json!({"snapshot": tag, "memory_mib": 256});
        let dir = a.workspace_dir("ws").join("snapshots").join(tag);
        for (vmm, deps) in [("tar|zstd", vec![]), ("tar|zstd+deps", dependencies(&a))] {
            let (bytes, took) = tar_zstd(&dir, &deps);
            stats::emit(
                "share",
                vmm,
                "push_bytes",
                "bytes",
                vec![bytes],
                extra.clone(),
            );
            stats::emit("share", vmm, "push_ms", "ms", vec![took], extra.clone());
        }
        let dest = format!("{}/bench/ws:{tag}", registry.addr);
        let t = Instant::now();
        let p = a.json(&[
            "snapshot",
            "push",
            &format!("ws:{tag}"),
            &dest,
            "--creds",
            &creds,
        ]);
        let took = ms(t);
        stats::emit(
            "share",
            "microagent",
            "push_bytes",
            "bytes",
            vec![p["bytes_pushed"].as_f64().unwrap_or(f64::NAN)],
            extra.clone(),
        );
        stats::emit("share", "microagent", "push_ms", "ms", vec![took], extra);
        last_ref = dest;
    }
    a.ok(&["halt", "ws"]);
    let (mut pull, mut fork) = (vec![], vec![]);
    for _ in 0..runs() {
        let b = Home::with_private_boot_cache();
        let t = Instant::now();
        b.ok(&["snapshot", "pull", &last_ref, "pulled", "--creds", &creds]);
        pull.push(ms(t));
        drop(b);
        let c = Home::with_private_boot_cache();
        let t = Instant::now();
        c.ok(&[
            "create",
            "f",
            "--from-snapshot",
            &last_ref,
            "--creds",
            &creds,
        ]);
        c.ok(&["exec", "f", "--", "true"]);
        fork.push(ms(t));
    }
    let extra = json!({"snapshot": "second", "memory_mib": 256});
    stats::emit("share", "microagent", "pull_ms", "ms", pull, extra.clone());
    stats::emit(
        "share",
        "microagent",
        "pull_fork_exec_ms",
        "ms",
        fork,
        extra,
    );
}
