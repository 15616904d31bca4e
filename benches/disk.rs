//! Disk benchmark (layer disks and copy-on-write uppers), one JSON line
//! per figure:
//! - `create_ms` on a cached image (its layer disks built, its empty upper
//!   cached) for busybox, Debian minbase and a synthetic image with a
//!   2 GiB file, beside the first create (which builds the empty upper)
//!   and QEMU's counterpart, a qcow2 overlay over the image's largest
//!   layer disk (`qemu-img create -b`);
//! - fork → first exec and rollback → first exec with nothing written and
//!   with 1 GiB written in the guest before the snapshot;
//! - the disk bytes of 10 workspaces plus 10 forks of one image against
//!   one image disk plus what they wrote.
//!
//! Runs per figure: MICROAGENT_BENCH_RUNS, default 3.
//! MICROAGENT_BENCH_DISK_BIG_MIB sets the synthetic image's file (2048).
//! MICROAGENT_BENCH_DISK_PARTS=create,fork,fork_big,shared picks figures.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::oci;
use common::Home;
use serde_json::json;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn runs() -> usize {
    std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Bytes the disk files under `dir` occupy, each inode counted once (hard
/// links are how chains share files). Guest memory (`memory.bin` of
/// snapshots and of the warm-start cache) is not disk.
fn du_bytes(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1", "--exclude=memory.bin"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A layout with one layer holding `/big` of `mib` MiB (non-zero bytes).
fn big_layout(dir: &Path, mib: usize) -> std::path::PathBuf {
    let out = dir.join("big-layout");
    let tree = dir.join("big-tree");
    std::fs::create_dir_all(&tree).unwrap();
    let st = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("of={}", tree.join("big").display()))
        .arg(format!("count={mib}"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut b = tar::Builder::new(Vec::new());
    b.append_path_with_name(tree.join("big"), "big").unwrap();
    let tar = b.into_inner().unwrap();
    let busybox = oci::script_path("image-busybox.sh");
    oci::layout(&out, Some(&busybox), &[tar], json!({}), "latest");
    std::fs::remove_dir_all(&tree).unwrap();
    out
}

fn image_create(home: &Home, label: &str, layout: &Path) {
    let reference = format!("localhost/bench-{label}:latest");
    let image = home.json(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--tag",
        &reference,
    ]);
    let create = |name: &str| {
        let t = Instant::now();
        home.ok(&[
            "create",
            name,
            "--image",
            &reference,
            "--kernel",
            common::vmlinux().to_str().unwrap(),
        ]);
        ms(t.elapsed())
    };
    let first = create(&format!("{label}-0"));
    let cached: Vec<f64> = (1..=runs())
        .map(|i| create(&format!("{label}-{i}")))
        .collect();
    let disk_bytes = image["disk_bytes"].as_u64().unwrap_or(0);
    let extra = json!({"image": label, "disk_mib": disk_bytes >> 20});
    stats::emit(
        "disk",
        "microagent",
        "create_first_ms",
        "ms",
        vec![first],
        extra.clone(),
    );
    stats::emit(
        "disk",
        "microagent",
        "create_ms",
        "ms",
        cached,
        extra.clone(),
    );
    // Images are imported smallest first, so the largest layer disk is
    // this image's own.
    if let Some(base) = std::fs::read_dir(home.dir.path().join("images/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
    {
        let qemu: Vec<f64> = (0..runs())
            .filter_map(|i| {
                let overlay = home.dir.path().join(format!("q{label}{i}.qcow2"));
                let t = Instant::now();
                let st = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(&base)
                    .arg(&overlay)
                    .status()
                    .ok()?;
                st.success().then(|| ms(t.elapsed()))
            })
            .collect();
        if !qemu.is_empty() {
            stats::emit("disk", "qemu", "create_ms", "ms", qemu, extra);
        }
    }
}

/// Fork and rollback to first exec, after `written_mib` MiB written in
/// the guest before the snapshot.
fn fork_and_rollback(home: &Home, written_mib: u32) {
    let src = format!("w{written_mib}");
    ok(home, &image_ws_args(&src, &["--disk-size", "2G"]));
    home.ok(&["start", &src]);
    if written_mib > 0 {
        common::sh(
            home,
            &src,
            // Direct I/O: on a PVM host the guest kernel's page-cache
            // copies are emulated (buffered writes make about 0.2 MB/s).
            &format!(
                "dd if=/dev/zero of=/root/upper bs=4M count={} oflag=direct 2>/dev/null; sync; echo ok",
                written_mib / 4
            ),
        );
    }
    home.ok(&["snapshot", "create", &src, "--tag", "s"]);
    let extra = json!({"written_mib": written_mib, "memory_mib": 256});
    let mut fork = Vec::new();
    for i in 0..runs() {
        let name = format!("{src}-f{i}");
        let t = Instant::now();
        home.ok(&[
            "create",
            &name,
            "--from-snapshot",
            &format!("{src}:s"),
            "--auto-snapshot-on-stop",
            "false",
        ]);
        assert_eq!(home.ok(&["exec", &name, "--", "echo", "hi"]).trim(), "hi");
        fork.push(ms(t.elapsed()));
        home.ok(&["delete", &name, "--yes", "--force"]);
    }
    stats::emit(
        "disk",
        "microagent",
        "fork_to_first_exec_ms",
        "ms",
        fork,
        extra.clone(),
    );
    let mut rollback = Vec::new();
    for _ in 0..runs() {
        home.ok(&["halt", &src]);
        let t = Instant::now();
        home.ok(&["start", &src, "--from-snapshot", "s"]);
        assert_eq!(home.ok(&["exec", &src, "--", "echo", "hi"]).trim(), "hi");
        rollback.push(ms(t.elapsed()));
    }
    stats::emit(
        "disk",
        "microagent",
        "rollback_to_first_exec_ms",
        "ms",
        rollback,
        extra,
    );
    home.ok(&["delete", &src, "--yes", "--force"]);
}

/// `create NAME` of the busybox image (imported first by main), 256 MiB.
fn image_ws_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "create",
        name,
        "--image",
        "localhost/bench-busybox:latest",
        "--kernel",
        common::vmlinux().to_str().unwrap(),
        "--memory",
        "256",
        // Halts here end runs; their automatic snapshots are not measured.
        "--auto-snapshot-on-stop",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn ok(home: &Home, args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    home.ok(&refs)
}

/// 10 workspaces of one image, each writing 1 MiB, and 10 forks of one of
/// them, each writing 1 MiB: their disks against one image plus writes.
fn shared_bytes(home: &Home) {
    let before = du_bytes(home.dir.path());
    let write = |ws: &str| {
        common::sh(
            home,
            ws,
            "dd if=/dev/zero of=/root/mine bs=1M count=1 oflag=direct 2>/dev/null; sync; echo ok",
        );
    };
    for i in 0..10 {
        let name = format!("many{i}");
        ok(home, &image_ws_args(&name, &[]));
        home.ok(&["start", &name]);
        write(&name);
    }
    home.ok(&["snapshot", "create", "many0", "--tag", "s"]);
    for i in 0..10 {
        let name = format!("manyf{i}");
        home.ok(&[
            "create",
            &name,
            "--from-snapshot",
            "many0:s",
            "--auto-snapshot-on-stop",
            "false",
        ]);
        write(&name);
    }
    for i in 0..10 {
        home.ok(&["halt", &format!("many{i}")]);
        home.ok(&["halt", &format!("manyf{i}")]);
    }
    let used = du_bytes(home.dir.path()).saturating_sub(before);
    // One image: its layer disk and the boot disk every workspace shares.
    let image_files = ["images/layers", "cache/bootdisks"].iter().flat_map(|d| {
        std::fs::read_dir(home.dir.path().join(d))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    });
    let base: u64 = image_files
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.blocks() * 512))
        .sum();
    stats::emit(
        "disk",
        "microagent",
        "disk_mib_10_workspaces_10_forks",
        "MiB",
        vec![used as f64 / (1 << 20) as f64],
        json!({"one_image_mib": base >> 20, "written_mib": 20}),
    );
    for i in 0..10 {
        home.ok(&["delete", &format!("many{i}"), "--yes", "--force"]);
        home.ok(&["delete", &format!("manyf{i}"), "--yes", "--force"]);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::kvm_available() {
        eprintln!("disk bench: /dev/kvm is not usable; nothing measured");
        std::process::exit(1);
    }
    // MICROAGENT_BENCH_DISK_PARTS picks figures: create, fork, fork_big,
    // shared (default: all).
    let parts = std::env::var("MICROAGENT_BENCH_DISK_PARTS").unwrap_or_default();
    let part = |p: &str| parts.is_empty() || parts.split(',').any(|x| x == p);
    let home = Home::new();
    let busybox = oci::script_path("image-busybox.sh");
    image_create(&home, "busybox", &busybox);
    if part("create") {
        let debian = oci::script_path("image-debian.sh");
        image_create(&home, "debian", &debian);
        let big_mib = std::env::var("MICROAGENT_BENCH_DISK_BIG_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048);
        let big = big_layout(home.dir.path(), big_mib);
        image_create(&home, "synthetic", &big);
    }
    if part("fork") {
        fork_and_rollback(&home, 0);
    }
    if part("fork_big") {
        // MICROAGENT_BENCH_DISK_WRITTEN_MIB: the upper written before the
        // snapshot (1024; a PVM guest writes about 1 MB/s even direct).
        let written = std::env::var("MICROAGENT_BENCH_DISK_WRITTEN_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        fork_and_rollback(&home, written);
    }
    if part("shared") {
        // Its own home: only the busybox image's layer disk and one boot disk.
        let alone = Home::new();
        alone.ok(&[
            "image",
            "import",
            busybox.to_str().unwrap(),
            "--tag",
            "localhost/bench-busybox:latest",
        ]);
        shared_bytes(&alone);
    }
}
