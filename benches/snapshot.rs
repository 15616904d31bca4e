//! Snapshot benchmark, one JSON line per figure: for 256 MiB and 1 GiB
//! guests with 128 MiB touched (file data in the page cache), snapshot
//! create time and pause time, memory.bin allocated size, restore → agent
//! ready, fork → first exec output, and the total PSS of 10 running forks
//! of one tag against one. Where QEMU is installed, its migrate-to-file
//! snapshot and `-incoming` restore of the same guest, in the same run.
//!
//! Runs per figure: MICROAGENT_BENCH_RUNS, default 3 (each needs no boot).
//! Guest sizes: MICROAGENT_BENCH_SNAPSHOT_MIB, default "256,1024".

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/qemu.rs"]
mod qemu;
#[path = "support/stats.rs"]
mod stats;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Home;
use serde_json::json;

const TOUCH_MIB: usize = 128;
const FORKS: usize = 10;
const READY: &str = "BENCH_READY";
/// QEMU runs the init script as PID 1 with nothing mounted: without
/// devtmpfs, `> /dev/null` writes a regular file on the root disk until it
/// is full, and the guest never caches the file (our agent mounts /dev
/// before it runs the script). This bench's earlier runs compared exactly
/// that: QEMU's state file held 76 MiB of a 256 MiB guest, ours 150.
const DEV: &str = "mount -t devtmpfs dev /dev\n";

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn stats(vmm: &str, memory_mib: u64, metric: &str, unit: &str, samples: Vec<f64>) {
    stats::emit(
        "snapshot",
        vmm,
        metric,
        unit,
        samples,
        json!({"memory_mib": memory_mib}),
    );
}

fn allocated_mib(path: &Path) -> f64 {
    let md = std::fs::metadata(path).unwrap();
    (md.blocks() * 512) as f64 / (1 << 20) as f64
}

/// Proportional set size of a process, in MiB.
fn pss_mib(pid: u64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn vmm_pid(home: &Home, ws: &str) -> u64 {
    home.json(&["status", ws])["pid"].as_u64().unwrap()
}

fn ours(memory_mib: u64, runs: usize) {
    let home = Home::new();
    let rootfs =
        common::rootfs_with_big_file(home.dir.path(), TOUCH_MIB, "#!/bin/sh\nexec sleep 100000\n");
    let mem = memory_mib.to_string();
    home.ok(&[
        "create",
        "src",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        common::vmlinux().to_str().unwrap(),
        "--vcpus",
        "1",
        "--memory",
        &mem,
        "--init",
        "/init",
        // Halts here end runs; their automatic snapshots are not measured.
        "--auto-snapshot-on-stop",
        "false",
    ]);
    home.ok(&["start", "src"]);
    // sendfile() into /dev/null: the pages are cached, nothing is copied.
    home.ok(&["exec", "src", "--", "sh", "-c", "cat /big > /dev/null"]);

    let (mut total, mut paused, mut alloc) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let tag = format!("s{r}");
        let t = Instant::now();
        // Whole, as QEMU's is; the diffs come next.
        let v = home.json(&["snapshot", "create", "src", "--tag", &tag, "--full"]);
        total.push(ms(t.elapsed()));
        paused.extend(v["paused_ms"].as_f64());
        alloc.push(allocated_mib(
            &home
                .workspace_dir("src")
                .join("snapshots")
                .join(&tag)
                .join("memory.bin"),
        ));
    }
    stats("microagent", memory_mib, "snapshot_create_ms", "ms", total);
    stats("microagent", memory_mib, "snapshot_pause_ms", "ms", paused);
    stats(
        "microagent",
        memory_mib,
        "memory_bin_allocated_mib",
        "MiB",
        alloc,
    );
    second_and_live(&home, memory_mib, runs);

    let mut restore = Vec::new();
    let mut running = Vec::new();
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for _ in 0..runs {
        home.ok(&["halt", "src"]);
        let t = Instant::now();
        let v = home.json(&["start", "src", "--from-snapshot", "s0"]);
        restore.push(ms(t.elapsed()));
        // The command's own clock: comparable with QEMU's restore, which
        // ends when `cont` returns, not when a guest service answers.
        running.extend(v["running_ms"].as_f64());
        let log =
            std::fs::read_to_string(home.workspace_dir("src").join("vmm.log")).unwrap_or_default();
        let line = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(microagent::vmm::snapshot::RESTORE_PHASES_PREFIX));
        let mut inside = 0.0;
        for part in line.unwrap_or_default().split_whitespace() {
            if let Some((name, v)) = part.split_once('=') {
                let v: f64 = v.parse().unwrap_or(0.0);
                inside += v;
                phases.entry(name.to_string()).or_default().push(v);
            }
        }
        if let Some(total) = v["running_ms"].as_f64() {
            // Process start, reading the state, disk chain checks, the
            // first KVM_RUN and the control round trips.
            phases
                .entry("outside_restore".into())
                .or_default()
                .push(total - inside);
        }
    }
    for (name, samples) in phases {
        stats(
            "microagent",
            memory_mib,
            &format!("restore_phase_{name}_ms"),
            "ms",
            samples,
        );
    }
    stats(
        "microagent",
        memory_mib,
        "restore_to_agent_ready_ms",
        "ms",
        restore,
    );
    stats(
        "microagent",
        memory_mib,
        "restore_to_running_ms",
        "ms",
        running,
    );
    home.ok(&["halt", "src"]);

    let mut fork = Vec::new();
    let mut alone = 0.0;
    for i in 0..FORKS {
        let name = format!("f{i}");
        let t = Instant::now();
        home.ok(&["create", &name, "--from-snapshot", "src:s0"]);
        let out = home.ok(&["exec", &name, "--", "echo", "hi"]);
        assert_eq!(out.trim(), "hi");
        if i < runs {
            fork.push(ms(t.elapsed()));
        }
        if i == 0 {
            alone = pss_mib(vmm_pid(&home, &name));
        }
    }
    stats(
        "microagent",
        memory_mib,
        "fork_to_first_exec_ms",
        "ms",
        fork,
    );
    let total_pss: f64 = (0..FORKS)
        .map(|i| pss_mib(vmm_pid(&home, &format!("f{i}"))))
        .sum();
    stats::emit(
        "snapshot",
        "microagent",
        &format!("forks_{FORKS}_total_pss_mib"),
        "MiB",
        vec![total_pss],
        json!({"memory_mib": memory_mib, "one_fork_alone_mib": (alone * 10.0).round() / 10.0}),
    );
    for i in 0..FORKS {
        home.ok(&["delete", &format!("f{i}"), "--yes", "--force"]);
    }
    home.ok(&["delete", "src", "--yes", "--force"]);
}

/// A second snapshot of the same workspace a second later (a diff over
/// the one before: its time, pause and bytes), then live snapshots while a
/// shell loop in the guest writes a tmpfs file without pause (whole, as
/// QEMU's live migration is: pause and total time).
fn second_and_live(home: &Home, memory_mib: u64, runs: usize) {
    let (mut total, mut paused, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        let v = home.json(&["snapshot", "create", "src", "--tag", &format!("d{r}")]);
        total.push(ms(t.elapsed()));
        paused.extend(v["paused_ms"].as_f64());
        bytes.extend(v["memory_bytes"].as_f64().map(|b| b / (1 << 20) as f64));
    }
    stats(
        "microagent",
        memory_mib,
        "second_snapshot_create_ms",
        "ms",
        total,
    );
    stats(
        "microagent",
        memory_mib,
        "second_snapshot_pause_ms",
        "ms",
        paused,
    );
    stats(
        "microagent",
        memory_mib,
        "second_snapshot_memory_mib",
        "MiB",
        bytes,
    );
    home.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "(i=0; while :; do i=$((i+1)); echo $i > /run/busy; done) > /dev/null 2>&1 &",
    ]);
    let (mut total, mut paused) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let t = Instant::now();
        let v = home.json(&[
            "snapshot",
            "create",
            "src",
            "--tag",
            &format!("l{r}"),
            "--live",
            "--full",
        ]);
        total.push(ms(t.elapsed()));
        paused.extend(v["paused_ms"].as_f64());
    }
    stats(
        "microagent",
        memory_mib,
        "live_snapshot_create_ms",
        "ms",
        total,
    );
    stats(
        "microagent",
        memory_mib,
        "live_snapshot_pause_ms",
        "ms",
        paused,
    );
}

/// A QEMU microvm guest booted on a rootfs with the big file and `init`
/// (a shell script), up to its READY line, QMP connected.
struct QemuGuest {
    dir: tempfile::TempDir,
    kernel: std::path::PathBuf,
    rootfs: std::path::PathBuf,
    args: String,
    vm: std::process::Child,
    qmp: qemu::Qmp,
}

/// Boots `init` under QEMU; None (after printing why) if it never gets ready.
fn qemu_guest(memory_mib: u64, pvm: bool, init: &str) -> Option<QemuGuest> {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = common::rootfs_with_big_file(dir.path(), TOUCH_MIB, init);
    let kernel = common::vmlinux();
    let args = format!(
        "quiet root=/dev/vda rw init=/init{}",
        qemu::vmm_guest_args(pvm)
    );
    let qmp_path = dir.path().join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut vm = qemu::microvm(&kernel, &rootfs, memory_mib, &args)
        .args(["-qmp", &qmp_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = vm.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(READY));
    let qmp = ready
        .then(|| qemu::Qmp::connect(&qmp_path, Duration::from_secs(10)))
        .flatten();
    let Some(qmp) = qmp else {
        println!(
            "{}",
            json!({"bench": "snapshot", "vmm": "qemu-microvm", "memory_mib": memory_mib, "error": "guest never became ready"})
        );
        let _ = vm.kill();
        let _ = vm.wait();
        return None;
    };
    Some(QemuGuest {
        dir,
        kernel,
        rootfs,
        args,
        vm,
        qmp,
    })
}

/// QEMU's live migration (precopy) of the same guest while a shell loop
/// in it writes a tmpfs file without pause, as ours does: its own
/// `downtime` figure as the pause. A guest of its own, so the busy loop
/// is not in the state files the restore figures use.
fn theirs_live(memory_mib: u64, runs: usize, pvm: bool) {
    let init = format!(
        "#!/bin/sh\n{DEV}mount -t tmpfs tmp /tmp\ncat /big > /dev/null\n(i=0; while :; do i=$((i+1)); echo $i > /tmp/busy; done) &\necho {READY}\nexec sleep 100000\n"
    );
    let Some(QemuGuest {
        dir,
        mut vm,
        mut qmp,
        ..
    }) = qemu_guest(memory_mib, pvm, &init)
    else {
        return;
    };
    let (mut total, mut paused) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let t = Instant::now();
        migrate_to_file(&mut qmp, &dir.path().join(format!("live{r}")));
        total.push(ms(t.elapsed()));
        let info = qmp.execute("query-migrate", json!({})).unwrap_or_default();
        paused.extend(info["downtime"].as_f64());
        // A finished migration leaves the source in postmigrate; cont runs it on.
        qmp.execute("cont", json!({})).unwrap();
    }
    let _ = vm.kill();
    let _ = vm.wait();
    stats(
        "qemu-microvm",
        memory_mib,
        "live_snapshot_create_ms",
        "ms",
        total,
    );
    stats(
        "qemu-microvm",
        memory_mib,
        "live_snapshot_pause_ms",
        "ms",
        paused,
    );
}

/// QEMU's snapshot: its migration stream into `file`, waited for.
fn migrate_to_file(qmp: &mut qemu::Qmp, file: &std::path::Path) {
    let uri = format!("exec:cat > {}", file.display());
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    assert!(
        qmp.wait_migration(Duration::from_secs(300)),
        "migration to {} failed",
        file.display()
    );
}

/// QEMU microvm: boot the same guest, touch the same 128 MiB, then
/// `stop` + `migrate exec:cat > FILE` (its snapshot; the disk is not
/// copied) and `-incoming exec:cat FILE` + `cont` (its restore).
fn theirs(memory_mib: u64, runs: usize, pvm: bool) {
    let init = format!("#!/bin/sh\n{DEV}cat /big > /dev/null\necho {READY}\nexec sleep 100000\n");
    let Some(QemuGuest {
        dir,
        kernel,
        rootfs,
        args,
        mut vm,
        mut qmp,
    }) = qemu_guest(memory_mib, pvm, &init)
    else {
        return;
    };
    let (mut total, mut alloc) = (Vec::new(), Vec::new());
    let state = |r: usize| dir.path().join(format!("state{r}"));
    for r in 0..runs {
        let t = Instant::now();
        qmp.execute("stop", json!({})).unwrap();
        migrate_to_file(&mut qmp, &state(r));
        total.push(ms(t.elapsed()));
        alloc.push(allocated_mib(&state(r)));
        // A finished migration leaves the source in postmigrate; cont runs it on.
        qmp.execute("cont", json!({})).unwrap();
    }
    let _ = vm.kill();
    let _ = vm.wait();
    // QEMU's VM is stopped for the whole migration: create time is pause time.
    stats(
        "qemu-microvm",
        memory_mib,
        "snapshot_create_ms",
        "ms",
        total.clone(),
    );
    stats("qemu-microvm", memory_mib, "snapshot_pause_ms", "ms", total);
    stats(
        "qemu-microvm",
        memory_mib,
        "memory_bin_allocated_mib",
        "MiB",
        alloc,
    );

    // A QEMU restoring the first state file, QMP at `qmp_path`.
    let restore_from = state(0);
    // `private_disk`: writes go to a temp overlay (`-snapshot`), like our
    // forks' private disk copies; without it, only one QEMU can hold the
    // image's write lock and the others cannot `cont`.
    let incoming = |state: &std::path::Path, qmp_path: &std::path::Path, private_disk: bool| {
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
        let mut cmd = qemu::microvm(&kernel, &rootfs, memory_mib, &args);
        if private_disk {
            cmd.arg("-snapshot");
        }
        cmd.args(["-qmp", &qmp_arg, "-incoming"])
            .arg(format!("exec:cat {}", state.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut restore = Vec::new();
    for r in 0..runs {
        let qmp_path = dir.path().join(format!("qmp-in{r}.sock"));
        let t = Instant::now();
        let mut vm = incoming(&restore_from, &qmp_path, false);
        let mut q = qemu::Qmp::connect(&qmp_path, Duration::from_secs(10)).expect("QMP");
        assert!(
            q.wait_migration(Duration::from_secs(300)),
            "incoming failed"
        );
        q.execute("cont", json!({})).unwrap();
        while q.status().as_deref() != Some("running") {
            std::thread::sleep(Duration::from_millis(1));
        }
        restore.push(ms(t.elapsed()));
        let _ = vm.kill();
        let _ = vm.wait();
    }
    stats(
        "qemu-microvm",
        memory_mib,
        "restore_to_running_ms",
        "ms",
        restore,
    );

    // QEMU's nearest thing to our forks: ten `-incoming` restores of one
    // state file, all running. Each reads the state into memory of its
    // own, so nothing is shared; the same PSS figure as ours.
    let mut forks = Vec::new();
    let mut alone = 0.0;
    for i in 0..FORKS {
        let qmp_path = dir.path().join(format!("qmp-fork{i}.sock"));
        let vm = incoming(&restore_from, &qmp_path, true);
        let pid = u64::from(vm.id());
        forks.push(vm);
        let Some(mut q) = qemu::Qmp::connect(&qmp_path, Duration::from_secs(10)) else {
            break;
        };
        if !q.wait_migration(Duration::from_secs(300)) || q.execute("cont", json!({})).is_none() {
            // Counted as not running: no figure rather than a wrong one.
            if let Some(mut vm) = forks.pop() {
                let _ = vm.kill();
                let _ = vm.wait();
            }
            break;
        }
        if i == 0 {
            alone = pss_mib(pid);
        }
    }
    let running = forks.len();
    let total: f64 = forks.iter().map(|vm| pss_mib(u64::from(vm.id()))).sum();
    for mut vm in forks {
        let _ = vm.kill();
        let _ = vm.wait();
    }
    stats::emit(
        "snapshot",
        "qemu-microvm",
        &format!("forks_{FORKS}_total_pss_mib"),
        "MiB",
        if running == FORKS {
            vec![total]
        } else {
            vec![]
        },
        json!({"memory_mib": memory_mib, "one_fork_alone_mib": (alone * 10.0).round() / 10.0}),
    );
}

fn main() {
    if !common::kvm_available() {
        stats::skipped("snapshot", "microagent", "/dev/kvm not available");
        return;
    }
    let pvm = common::is_pvm_host();
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .clamp(1, FORKS);
    // MICROAGENT_BENCH_QEMU=0: ours only (QEMU's figures do not change
    // with our code).
    let have_qemu =
        qemu::available() && std::env::var("MICROAGENT_BENCH_QEMU").map_or(true, |v| v != "0");
    // MICROAGENT_BENCH_SNAPSHOT_MIB=256,1024 (the default) picks the sizes.
    let sizes: Vec<u64> = std::env::var("MICROAGENT_BENCH_SNAPSHOT_MIB")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| vec![256, 1024]);
    for memory_mib in sizes {
        ours(memory_mib, runs);
        if have_qemu {
            theirs(memory_mib, runs, pvm);
            theirs_live(memory_mib, runs, pvm);
        } else {
            stats::skipped(
                "snapshot",
                "qemu-microvm",
                "qemu-system-x86_64 not installed",
            );
        }
    }
}
