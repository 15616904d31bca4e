//! Snapshots with real VMs: the seed 003 transcript, rollback of memory and
//! disk, forks (and forks of forks), identity refresh, and refusals. One
//! cold boot; every other guest comes from restore or fork.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A process whose counter lives in its own memory (a shell variable) and
/// advances only when poked through a FIFO. After a rollback the counter
/// must read the snapshot's value and the next poke must continue from
/// there: the process's memory went back, not only a file.
/// A process that lives in guest memory only: a counter bumped by each
/// line written to /run/poke. Started by exec (detached from the session),
/// so this test's guest boots like exec.rs's and secrets.rs's and shares
/// their boot snapshot.
const START_COUNTER: &str = "mkfifo /run/poke; (exec 3<>/run/poke; i=0; echo $i > /run/counter; while read _ <&3; do i=$((i+1)); echo $i > /run/counter; done) </dev/null >/dev/null 2>&1 &";

fn counter(home: &Home, ws: &str) -> u64 {
    sh(home, ws, "cat /run/counter").parse().unwrap_or(0)
}

/// Pokes the counter once and waits until it has moved: one exec, the
/// wait in shell builtins (every guest process start costs seconds on
/// PVM, so three execs and a host-side poll cost a test minutes).
fn poke(home: &Home, ws: &str) -> u64 {
    // The counter file is rewritten in place, so a read can find it empty.
    let script = "test -e /run/counter || exit 1; \
        b=; while [ -z \"$b\" ]; do read b < /run/counter; done; \
        echo > /run/poke; i=0; \
        while read n < /run/counter; [ -z \"$n\" ] || [ \"$n\" = \"$b\" ]; do \
          i=$((i+1)); [ $i -lt 200000 ] || { echo \"counter stuck at $b\" >&2; exit 1; }; \
        done; echo $n";
    sh(home, ws, script)
        .parse()
        .unwrap_or_else(|e| panic!("{ws}: counter: {e}"))
}

fn host_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The guest's wall clock is within 2 s of the host's. An exec takes
/// seconds on a loaded PVM host, so the guest's reading is compared with
/// the host's clock before and after the exec, not with one later instant.
fn assert_guest_clock(home: &Home, ws: &str) {
    let before = host_now();
    let guest: u64 = sh(home, ws, "date +%s").parse().unwrap();
    let after = host_now();
    assert!(
        guest + 2 >= before && guest <= after + 2,
        "guest clock {guest}, host clock between {before} and {after}"
    );
}

/// The large guest and the crash test each load the 2-core host enough to
/// skew the other's clock and timing checks: they run one after the other
/// (the seed transcript runs beside either).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn snapshot_dir(home: &Home, ws: &str, tag: &str) -> std::path::PathBuf {
    home.workspace_dir(ws).join("snapshots").join(tag)
}

/// Copies a snapshot to a new tag so it can be damaged on purpose.
fn clone_snapshot(home: &Home, ws: &str, from: &str, to: &str) -> std::path::PathBuf {
    let dst = snapshot_dir(home, ws, to);
    copy_snapshot(&snapshot_dir(home, ws, from), &dst);
    dst
}

fn edit_manifest(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn seed_transcript_rollback_forks_and_refusals() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());

    // 1. A workspace in a state worth keeping.
    home.ok(&shared.create_args("builder", &[]));
    let (code, _, err) = home.run(&["snapshot", "create", "builder", "--tag", "too-early"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("workspace builder is created; only a running or paused workspace"),
        "{err}"
    );
    home.ok(&["start", "builder"]);
    sh(&home, "builder", START_COUNTER);
    sh(&home, "builder", "echo checkpoint-1 > /root/progress.txt");
    poke(&home, "builder");
    assert_eq!(poke(&home, "builder"), 2);

    // 2. Snapshot: auto-paused, snapshotted, resumed.
    let out = home.ok(&["snapshot", "create", "builder", "--tag", "baseline"]);
    assert!(
        out.starts_with("snapshot baseline created (256 MiB RAM, 2 vCPU) at 20"),
        "{out}"
    );
    assert_eq!(home.json(&["status", "builder"])["status"], "running");
    let (code, _, err) = home.run(&["snapshot", "create", "builder", "--tag", "baseline"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("snapshot baseline already exists in workspace builder"),
        "{err}"
    );
    let list = home.ok(&["snapshot", "list", "builder"]);
    assert!(
        list.starts_with("TAG") && list.contains("baseline"),
        "{list}"
    );
    let listed = home.json(&["snapshot", "list", "builder"]);
    let size = listed[0]["size_bytes"].as_u64().unwrap();
    assert!(size > 0 && size < 512 << 20, "allocated size {size}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(snapshot_dir(&home, "builder", "baseline").join("manifest.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "kernel_sha256",
        "cpu_template",
        "host_cpu",
        "guest_cpuid",
        "format_version",
        "files",
        "created",
    ] {
        assert!(!manifest[key].is_null(), "manifest lacks {key}: {manifest}");
    }
    // memory.bin is sparse: a 256 MiB guest that touched little stores little.
    let mem = snapshot_dir(&home, "builder", "baseline").join("memory.bin");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&mem).unwrap();
    assert_eq!(md.len(), 256 << 20);
    assert!(
        md.blocks() * 512 < 200 << 20,
        "memory.bin not sparse: {} bytes allocated",
        md.blocks() * 512
    );

    // A resume sent straight to the VMM while a snapshot is being written
    // waits for it: every answer is clear, and the snapshot is intact (a
    // fork of it runs, below, with the counter where it was).
    let sock = home.workspace_dir("builder").join("control.sock");
    let mut raced = spawn_snapshot(&home, "builder", "raced");
    let t = Instant::now();
    let mut resumes = 0;
    while raced.try_wait().unwrap().is_none() {
        let answer = control_line(&sock, r#"{"v":2,"op":"resume"}"#);
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["state"], "running", "{answer}");
        resumes += 1;
        assert!(t.elapsed() < Duration::from_secs(300));
    }
    let out = raced.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(resumes > 0);
    assert_eq!(home.json(&["status", "builder"])["status"], "running");

    // A paused workspace is snapshotted in place and stays paused.
    home.ok(&["pause", "builder"]);
    home.ok(&["snapshot", "create", "builder", "--tag", "while-paused"]);
    assert_eq!(home.json(&["status", "builder"])["status"], "paused");
    home.ok(&["resume", "builder"]);

    // Things move on after the snapshot, on disk and in memory.
    sh(&home, "builder", "echo after-snapshot > /root/progress.txt");
    for _ in 0..3 {
        poke(&home, "builder");
    }
    assert_eq!(counter(&home, "builder"), 5);

    // 3. Roll back: memory, devices and disk return to the snapshot.
    home.ok(&["halt", "builder"]);
    home.ok(&["start", "builder", "--from-snapshot", "baseline"]);
    assert_eq!(
        sh(&home, "builder", "cat /root/progress.txt"),
        "checkpoint-1"
    );
    assert_eq!(counter(&home, "builder"), 2, "the counter did not go back");
    assert_eq!(
        poke(&home, "builder"),
        3,
        "the process's own memory did not go back"
    );
    // The wall clock was set from the host after the restore.
    assert_guest_clock(&home, "builder");

    // 4. Fork: fresh identity, private disk, the source does not notice.
    home.ok(&[
        "create",
        "builder-fork",
        "--from-snapshot",
        "builder:baseline",
    ]);
    // (Checks share an exec where they can: each costs seconds on PVM.)
    assert_eq!(
        sh(
            &home,
            "builder-fork",
            "echo fork-only > /root/progress.txt; cat /root/progress.txt; hostname"
        ),
        "fork-only\nbuilder-fork"
    );
    assert_eq!(
        sh(&home, "builder", "cat /root/progress.txt"),
        "checkpoint-1"
    );

    // The snapshot a resume raced restores whole.
    home.ok(&["create", "raced-fork", "--from-snapshot", "builder:raced"]);
    assert_eq!(counter(&home, "raced-fork"), 2);
    assert_eq!(poke(&home, "raced-fork"), 3);
    home.ok(&["delete", "raced-fork", "--yes", "--force"]);

    // Fork of a fork.
    home.ok(&["snapshot", "create", "builder-fork", "--tag", "f1"]);
    home.ok(&["create", "fork2", "--from-snapshot", "builder-fork:f1"]);
    // Forks do not share random streams or machine-ids.
    let ident = "cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1";
    let f2 = sh(
        &home,
        "fork2",
        &format!("cat /root/progress.txt; hostname; {ident}"),
    );
    let f2: Vec<&str> = f2.lines().collect();
    assert_eq!(f2[..2], ["fork-only", "fork2"]);
    let f1 = sh(&home, "builder-fork", ident);
    let f1: Vec<&str> = f1.lines().collect();
    assert_eq!(f1[0].len(), 32, "machine-id {f1:?}");
    assert_ne!(f1[0], f2[2], "machine-ids");
    assert_ne!(f1[1], f2[3], "random bytes");

    // 5. Refusals change nothing and start nothing.
    home.ok(&["snapshot", "create", "fork2", "--tag", "x"]);
    home.ok(&["halt", "fork2"]);
    let bad = clone_snapshot(&home, "builder-fork", "f1", "flipped");
    let mut vmstate = std::fs::read(bad.join("vmstate.bin")).unwrap();
    let mid = vmstate.len() / 2;
    vmstate[mid] ^= 0x01;
    std::fs::write(bad.join("vmstate.bin"), vmstate).unwrap();
    let (code, _, err) = home.run(&["create", "bad1", "--from-snapshot", "builder-fork:flipped"]);
    assert_eq!(code, 1);
    // Named by the manifest's sha256 before the state is even decoded.
    assert!(
        err.contains("snapshot file vmstate.bin is damaged: sha256"),
        "{err}"
    );
    assert!(!home.workspace_dir("bad1").exists());

    let trunc = clone_snapshot(&home, "builder-fork", "f1", "truncated");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(trunc.join("memory.bin"))
        .unwrap();
    f.set_len(64 << 20).unwrap();
    let (code, _, err) = home.run(&[
        "create",
        "bad2",
        "--from-snapshot",
        "builder-fork:truncated",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("memory.bin is damaged"), "{err}");

    let kern = clone_snapshot(&home, "builder-fork", "f1", "otherkernel");
    edit_manifest(&kern, |m| m["kernel_sha256"] = "0".repeat(64).into());
    let (code, _, err) = home.run(&[
        "create",
        "bad3",
        "--from-snapshot",
        "builder-fork:otherkernel",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "kernel sha256 mismatch: snapshot pins {}",
            "0".repeat(64)
        )),
        "{err}"
    );

    let cpu = clone_snapshot(&home, "builder-fork", "f1", "othercpu");
    edit_manifest(&cpu, |m| m["host_cpu"]["vendor"] = "GenuineIntel".into());
    let (code, _, err) = home.run(&["create", "bad4", "--from-snapshot", "builder-fork:othercpu"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("incompatible CPU: snapshot taken on GenuineIntel"),
        "{err}"
    );

    // A damaged manifest is named as the snapshot's, with a stable code.
    let man = clone_snapshot(&home, "builder-fork", "f1", "truncman");
    let text = std::fs::read(man.join("manifest.json")).unwrap();
    std::fs::write(man.join("manifest.json"), &text[..text.len() / 2]).unwrap();
    let (code, out, err) = home.run(&[
        "create",
        "bad6",
        "--from-snapshot",
        "builder-fork:truncman",
        "--json",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("snapshot truncman of workspace builder-fork: its manifest"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "snapshot_damaged", "{v}");
    assert!(!home.workspace_dir("bad6").exists());

    // A guest that saw a CPU feature this host cannot give it is refused.
    let feat = clone_snapshot(&home, "builder-fork", "f1", "otherfeatures");
    let template: microagent::vmm::arch::x86_64::cpuid::CpuTemplate =
        manifest["cpu_template"].as_str().unwrap().parse().unwrap();
    let here = microagent::vmm::host::guest_cpuid(template, 2).unwrap();
    let ebx = here
        .iter()
        .find(|l| l.function == 7 && l.index == 0)
        .map_or(0, |l| l.ebx);
    let absent = (0..32).map(|b| 1u32 << b).find(|b| ebx & b == 0).unwrap();
    edit_manifest(&feat, |m| {
        let leaves = m["guest_cpuid"].as_array_mut().unwrap();
        let leaf7 = leaves
            .iter_mut()
            .find(|l| l["function"] == 7 && l["index"] == 0)
            .expect("the guest saw leaf 7");
        leaf7["ebx"] = (leaf7["ebx"].as_u64().unwrap() | u64::from(absent)).into();
    });
    let (code, _, err) = home.run(&[
        "create",
        "bad5",
        "--from-snapshot",
        "builder-fork:otherfeatures",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "incompatible CPU: the snapshot's guest saw CPUID leaf 0x7 ebx bits {absent:#x}"
        )),
        "{err}"
    );

    // Rollback with a damaged snapshot leaves the halted workspace as it was.
    let disk_before = workspace_disk(&home.workspace_dir("fork2"));
    let flipped = clone_snapshot(&home, "fork2", "x", "y");
    let mut v = std::fs::read(flipped.join("vmstate.bin")).unwrap();
    v[60] ^= 0xff;
    std::fs::write(flipped.join("vmstate.bin"), v).unwrap();
    let (code, _, _) = home.run(&["start", "fork2", "--from-snapshot", "y"]);
    assert_eq!(code, 1);
    assert_eq!(home.json(&["status", "fork2"])["status"], "halted");
    assert!(workspace_disk(&home.workspace_dir("fork2")) == disk_before);
    // The state's sha256 is checked against the manifest on every restore,
    // even where the state itself still decodes.
    let pinned = clone_snapshot(&home, "fork2", "x", "repinned");
    edit_manifest(&pinned, |m| {
        for f in m["files"].as_array_mut().unwrap() {
            if f["name"] == "vmstate.bin" {
                f["sha256"] = "0".repeat(64).into();
            }
        }
    });
    let (code, _, err) = home.run(&["start", "fork2", "--from-snapshot", "repinned"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("snapshot file vmstate.bin is damaged"),
        "{err}"
    );
    assert_eq!(home.json(&["status", "fork2"])["status"], "halted");

    // `snapshot verify` hashes everything again: a sound snapshot passes,
    // one byte of guest memory changed is named.
    let verified = home.json(&["snapshot", "verify", "fork2", "x"]);
    common::schema::assert_schema("snapshot-verify", &verified);
    let names: Vec<&str> = verified["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"memory.bin") && names.contains(&"disk/chain.json"),
        "{names:?}"
    );
    let tampered = clone_snapshot(&home, "fork2", "x", "tampered");
    {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tampered.join("memory.bin"))
            .unwrap();
        // A byte of the kernel image (loaded at 16 MiB).
        let at = 16 << 20;
        let mut b = [0u8; 1];
        mem.read_exact_at(&mut b, at).unwrap();
        mem.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }
    let (code, out, err) = home.run(&["snapshot", "verify", "fork2", "tampered", "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "snapshot_damaged", "{v}");
    assert!(
        err.contains("snapshot tampered of workspace fork2 is damaged: memory.bin does not match its manifest"),
        "{err}"
    );
    assert!(
        !err.contains("vmstate.bin"),
        "only memory.bin differs: {err}"
    );
    home.ok(&["snapshot", "delete", "fork2", "tampered", "--yes"]);
    home.ok(&["snapshot", "delete", "fork2", "repinned", "--yes"]);

    // 6. Forks of one tag at once, each diverging: all write, then all
    // read. (Four: each 2-vCPU restore costs ~8 CPU-seconds on PVM.)
    const FORKS: usize = 4;
    let children: Vec<_> = (0..FORKS)
        .map(|i| {
            home.cmd()
                .args([
                    "create",
                    &format!("many-{i}"),
                    "--from-snapshot",
                    "builder:baseline",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "fork failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..FORKS {
        let ws = format!("many-{i}");
        sh(&home, &ws, &format!("echo {i} > /root/mine"));
    }
    for i in 0..FORKS {
        let ws = format!("many-{i}");
        assert_eq!(
            sh(&home, &ws, "cat /root/mine /root/progress.txt"),
            format!("{i}\ncheckpoint-1")
        );
    }

    // 7. Clean up as the transcript does; deleting a workspace removes its snapshots.
    // Without --yes and without a terminal, nothing is deleted (exit 2).
    let (code, _, err) = home.run(&["snapshot", "delete", "builder", "baseline"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(snapshot_dir(&home, "builder", "baseline").exists());
    home.ok(&["snapshot", "delete", "builder", "baseline", "--yes"]);
    assert!(!snapshot_dir(&home, "builder", "baseline").exists());
    let (code, _, err) = home.run(&["snapshot", "delete", "builder", "baseline", "--yes"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("snapshot baseline of workspace builder does not exist"),
        "{err}"
    );
    home.ok(&["delete", "builder", "--yes", "--force"]);
    assert!(!home.workspace_dir("builder").exists());
}

/// Starts `snapshot create WS --tag TAG` in the background, output piped.
/// A whole-memory snapshot in the background: long enough to be seen
/// `snapshotting` (a diff of a quiet guest takes milliseconds).
fn spawn_snapshot(home: &Home, ws: &str, tag: &str) -> std::process::Child {
    home.cmd()
        .args(["snapshot", "create", ws, "--tag", tag, "--full"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `status` until the workspace reports `snapshotting`.
fn wait_snapshotting(home: &Home, ws: &str, snap: &mut std::process::Child) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = home.json(&["status", ws]);
        if s["status"] == "snapshotting" {
            return s;
        }
        assert!(
            snap.try_wait().unwrap().is_none(),
            "the snapshot ended before status ever said snapshotting: {s}"
        );
        assert!(t.elapsed() < Duration::from_secs(120), "{s}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `start` with the VMM logging digests of guest RAM at each save and
/// right after a restore (`ram digest at save ID: HEX`).
fn start_with_ram_digests(home: &Home, args: &[&str]) {
    let out = home
        .cmd()
        .env("MICROAGENT_VMM_RAM_DIGEST", "1")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The RAM digest the VMM logged `when` ("at save", "after restore") for
/// the memory layer `id`.
fn ram_digest(home: &Home, ws: &str, when: &str, id: &str) -> String {
    let log = std::fs::read_to_string(home.workspace_dir(ws).join("vmm.log")).unwrap();
    let prefix = format!("ram digest {when} {id}: ");
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in vmm.log"))
        .chars()
        .take(64)
        .collect()
}

fn memory_layers(home: &Home, ws: &str, tag: &str) -> Vec<String> {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(snapshot_dir(home, ws, tag).join("manifest.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(m["memory_layers"].clone()).unwrap()
}

/// `kill -9` of a workspace's VMM; returns once it is reported crashed.
fn crash(home: &Home, ws: &str) {
    let pid = home.json(&["status", ws])["pid"].as_i64().unwrap();
    // SAFETY: killing the VMM process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t = Instant::now();
    while home.json(&["status", ws])["status"] != "crashed" {
        assert!(t.elapsed() < Duration::from_secs(10), "never crashed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Does `path` hold data at or after `offset`?
fn data_from(path: &std::path::Path, offset: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a file this function owns; no memory is touched.
    unsafe { libc::lseek(f.as_raw_fd(), offset as i64, libc::SEEK_DATA) >= 0 }
}

/// A guest over 3 GiB (RAM split around the MMIO gap) with 32 MiB of
/// file data cached: sparse memory.bin, the `snapshotting` status and what
/// it refuses, an exec session across a snapshot, five diff snapshots
/// whose restore is byte-identical to a whole snapshot of the same moment,
/// `kill -9` of the VMM mid-snapshot, and the wall clock after restoring a
/// snapshot a minute old.
#[test]
fn large_guest_busy_status_diffs_kill_and_clock() {
    if !kvm_available() {
        return;
    }
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let home = Home::new();
    // 32 MiB of file data: enough to tell touched pages from a 1 GiB
    // guest's size; filing them took 177 s for 128 MiB on PVM.
    const TOUCHED_MIB: u64 = 32;
    let rootfs = rootfs_with_big_file(
        home.dir.path(),
        TOUCHED_MIB as usize,
        "#!/bin/sh\nexec sleep 100000\n",
    );
    home.ok(&[
        "create",
        "big",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        vmlinux().to_str().unwrap(),
        "--vcpus",
        "1",
        "--memory",
        "3328",
        // The guest leaves 2880 MiB of the low region alone (e820
        // reserved): on PVM its boot would spend ~200 s initialising their
        // page structs. Both regions and both memory slots stay in use
        // (64 MiB + 128 MiB below the gap, 256 MiB above), and the split
        // is what this test is about.
        "--cmdline",
        "quiet memmap=2880M$64M",
        "--init",
        "/init",
    ]);
    start_with_ram_digests(&home, &["start", "big"]);
    // Into the page cache: 32 MiB of guest memory now holds file data.
    // busybox `cat` sendfile()s, and into /dev/null that copies nothing, so
    // the emulated guest kernel only files the pages (a `dd` copying them
    // out to user space took 334 s of CI).
    sh(
        &home,
        "big",
        "cat /big > /dev/null; grep -E '^(Cached|MemFree)' /proc/meminfo",
    );

    // An exec session that spans the snapshot.
    let session = home
        .cmd()
        .args([
            "exec",
            "big",
            "--",
            "sh",
            "-c",
            "tickloop=1; for i in 1 2 3 4 5 6 7 8; do echo tick-$i; echo $i >> /run/ticks; sleep 2; done",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while sh(&home, "big", "ps | grep -c [t]ickloop || true") != "1" {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "exec session never started"
        );
    }

    let mut snap = spawn_snapshot(&home, "big", "touched");
    wait_snapshotting(&home, "big", &mut snap);
    // Lifecycle operations are refused at once, naming what runs.
    for args in [
        &["pause", "big"][..],
        &["halt", "big"],
        &["snapshot", "create", "big", "--tag", "second"],
        &["snapshot", "delete", "big", "touched", "--yes"],
    ] {
        let (code, _, err) = home.run(args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("workspace big is snapshotting (tag touched, pid "),
            "{args:?}: {err}"
        );
    }
    let out = snap.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshotted_at = Instant::now();
    assert_eq!(home.json(&["status", "big"])["status"], "running");
    assert!(!snapshot_dir(&home, "big", "second").exists());

    // The session lived through the pause: every tick, in order, exit 0.
    let out = session.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticks: Vec<String> = (1..=8).map(|i| format!("tick-{i}")).collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ticks
    );

    // 3.25 GiB of guest RAM, the file data and what the guest kernel and
    // init touched: the file is as long as RAM but only the touched pages
    // are allocated.
    use std::os::unix::fs::MetadataExt;
    let whole = snapshot_dir(&home, "big", "touched").join("memory.bin");
    let md = std::fs::metadata(&whole).unwrap();
    assert_eq!(md.len(), 3328 << 20);
    let allocated = md.blocks() * 512;
    eprintln!(
        "memory.bin: 3.25 GiB guest, {} MiB allocated",
        allocated >> 20
    );
    assert!(
        (TOUCHED_MIB << 20..(TOUCHED_MIB + 192) << 20).contains(&allocated),
        "memory.bin allocates {allocated} bytes"
    );
    const LOW_RAM: u64 = 3 << 30; // below the MMIO gap; the rest is above
    assert!(data_from(&whole, LOW_RAM), "no page above the MMIO gap");

    // Five diff snapshots, each over the one before, while a fork-free
    // writer changes memory every second; the last taken paused, beside a
    // whole one of the same moment.
    sh(
        &home,
        "big",
        "mkfifo /tmp/tick; (i=0; while :; do i=$((i+1)); echo $i > /run/count; read -t 1 x <> /tmp/tick; done) > /dev/null 2>&1 &",
    );
    let mut high = false;
    for i in 1..=5u64 {
        if i == 5 {
            home.ok(&["pause", "big"]);
        } else {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let tag = format!("d{i}");
        let v = home.json(&["snapshot", "create", "big", "--tag", &tag]);
        assert_eq!(v["memory_layers"], i + 1, "{v}");
        let diff = snapshot_dir(&home, "big", &tag).join("memory.bin");
        let own = v["memory_bytes"].as_u64().unwrap();
        eprintln!("diff {i}: {} KiB, {} ms", own >> 10, v["duration_ms"]);
        assert!(own < allocated / 4, "diff {i} holds {own} bytes");
        high |= data_from(&diff, LOW_RAM);
    }
    assert!(high, "no diff layer holds a page above the MMIO gap");
    let v = home.json(&["snapshot", "create", "big", "--tag", "whole", "--full"]);
    assert_eq!(v["memory_layers"], 1);
    let layers = memory_layers(&home, "big", "d5");
    let at_d5 = ram_digest(&home, "big", "at save", layers.last().unwrap());
    let whole_id = memory_layers(&home, "big", "whole").pop().unwrap();
    assert_eq!(ram_digest(&home, "big", "at save", &whole_id), at_d5);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(snapshot_dir(&home, "big", "whole").join("manifest.json")).unwrap(),
    )
    .unwrap();
    let whole_sha = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "memory.bin")
        .map(|f| f["sha256"].as_str().unwrap().to_string());
    assert_eq!(whole_sha.as_deref(), Some(at_d5.as_str()));
    home.ok(&["resume", "big"]);

    // kill -9 of the VMM mid-snapshot: no tag, nothing half-made, and the
    // workspace is usable (here: rolled back to the good snapshot).
    let mut doomed = spawn_snapshot(&home, "big", "doomed");
    let s = wait_snapshotting(&home, "big", &mut doomed);
    let pid = s["pid"]
        .as_i64()
        .expect("a snapshotting workspace has a VMM pid");
    // SAFETY: killing the VMM process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = doomed.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshot doomed of workspace big failed; nothing was kept"),
        "{err}"
    );
    assert!(!snapshot_dir(&home, "big", "doomed").exists());
    let mut leftovers: Vec<_> = std::fs::read_dir(home.workspace_dir("big").join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    leftovers.sort();
    assert_eq!(
        leftovers,
        ["d1", "d2", "d3", "d4", "d5", "touched", "whole"]
    );
    let t = Instant::now();
    while home.json(&["status", "big"])["status"] != "crashed" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never reported crashed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The five diffs restored: RAM (hashed before any device or vCPU
    // touches it) is byte-identical to the whole snapshot of the moment.
    start_with_ram_digests(&home, &["start", "big", "--from-snapshot", "d5"]);
    assert_eq!(
        ram_digest(&home, "big", "after restore", layers.last().unwrap()),
        at_d5
    );
    // A live snapshot while the restored writer runs on, a seventh layer:
    // its restore is the RAM of its final pause, byte for byte.
    let v = home.json(&["snapshot", "create", "big", "--tag", "live", "--live"]);
    eprintln!("live: {v}");
    assert_eq!(v["memory_layers"], 7, "{v}");
    assert!(v["paused_ms"].as_u64().unwrap() <= v["duration_ms"].as_u64().unwrap());
    let live_id = memory_layers(&home, "big", "live").pop().unwrap();
    let at_live = ram_digest(&home, "big", "at save", &live_id);
    crash(&home, "big");
    start_with_ram_digests(&home, &["start", "big", "--from-snapshot", "live"]);
    assert_eq!(ram_digest(&home, "big", "after restore", &live_id), at_live);
    assert!(sh(&home, "big", "cat /run/count").parse::<u64>().unwrap() > 0);
    crash(&home, "big");

    // Restore a snapshot at least a minute old: the guest clock follows
    // the host, not the snapshot.
    let age = Duration::from_secs(61);
    if let Some(rest) = age.checked_sub(snapshotted_at.elapsed()) {
        std::thread::sleep(rest);
    }
    home.ok(&["start", "big", "--from-snapshot", "touched"]);
    assert_guest_clock(&home, "big");
    // The exec session open at snapshot time has no client after a
    // restore: the agent ends its process instead of letting it run on
    // (left alone it would reach tick 8 within 16 s).
    std::thread::sleep(Duration::from_secs(16));
    assert_eq!(sh(&home, "big", "ps | grep -c [t]ickloop || true"), "0");
    let ticks: u32 = sh(&home, "big", "tail -n 1 /run/ticks").parse().unwrap();
    assert!(
        ticks < 8,
        "the snapshot's exec session ran on to tick {ticks} after restore"
    );

    // delete --force ends a snapshot in progress, as `docker rm -f` ends
    // a running container, and leaves no VMM behind.
    let mut abandoned = spawn_snapshot(&home, "big", "abandoned");
    let s = wait_snapshotting(&home, "big", &mut abandoned);
    let vmm = s["pid"].as_i64().expect("a VMM pid") as i32;
    home.ok(&["delete", "big", "--yes", "--force"]);
    let out = abandoned.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the snapshot finished before delete --force reached it"
    );
    assert!(!home.workspace_dir("big").exists());
    let t = Instant::now();
    // SAFETY: signal 0 only probes whether the process exists.
    while unsafe { libc::kill(vmm, 0) } == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the VMM outlived its deleted workspace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `e2fsck -f -p` (preen, as at boot) of a workspace's disk as the guest
/// would see it (its chain, materialized into a scratch file), then the
/// `sha256sum` line of each of `files` as the guest would print it, read
/// from the preened disk with `debugfs`: the guest's view after a boot,
/// without a cold boot (92 s on PVM). Preen replays the journal and fixes
/// only what an unclean shutdown leaves (the superblock's free counts,
/// which ext4 does not keep current while mounted); anything else fails
/// it with exit 4. Returns the fsck output and the lines.
fn host_fsck(home: &Home, ws: &str, files: &[&str]) -> (String, Vec<String>) {
    let scratch = home.dir.path().join(format!("{ws}-fsck.img"));
    std::fs::write(&scratch, workspace_disk(&home.workspace_dir(ws))).unwrap();
    let out = std::process::Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(&scratch)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code().unwrap_or(8) <= 1,
        "e2fsck -p found damage:\n{text}"
    );
    let sums = files
        .iter()
        .map(|f| {
            let cat = std::process::Command::new("debugfs")
                .args(["-R", &format!("cat {f}")])
                .arg(&scratch)
                .output()
                .unwrap();
            assert!(
                cat.status.success() && !cat.stdout.is_empty(),
                "debugfs cat {f}"
            );
            format!("{}  {f}", microagent::digest::sha256_bytes(&cat.stdout))
        })
        .collect();
    std::fs::remove_file(&scratch).unwrap();
    (text, sums)
}

/// The copy-on-write chain under a crash: `kill -9` of the VMM while the
/// guest writes as fast as it can, with a snapshot's frozen delta below
/// the top. The disk is consistent (host fsck finds nothing to fix) and
/// every file the guest fsynced before the kill is intact on it (read
/// as the guest would after a boot, see `host_fsck`); restoring the
/// snapshot below brings back its own moment.
#[test]
fn kill_during_heavy_writes_keeps_every_fsynced_file() {
    if !kvm_available() {
        return;
    }
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    home.ok(&shared.create_args("crashy", &[]));
    home.ok(&["start", "crashy"]);
    // File data: a MiB of busybox's own bytes, from offset `skip` MiB
    // (the guest kernel's /dev/urandom takes minutes per MiB on PVM).
    let keep = |name: &str, skip: u32| {
        sh(
            &home,
            "crashy",
            &format!(
                "dd if=/bin/busybox of=/root/{name} bs=1M skip={skip} count=1 conv=fsync 2>/dev/null && sha256sum /root/{name}"
            ),
        )
    };
    let first = keep("keep1", 0);
    home.ok(&["snapshot", "create", "crashy", "--tag", "below"]);
    let second = keep("keep2", 1);
    // Unsynced writes, big and many, in flight when the VMM dies.
    let mut writer = home
        .cmd()
        .args([
            "exec",
            "crashy",
            "--",
            "sh",
            "-c",
            "i=0; while true; do dd if=/dev/zero of=/root/junk$((i % 4)) bs=1M count=16 2>/dev/null; i=$((i+1)); done",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let pid = home.json(&["status", "crashy"])["pid"].as_i64().unwrap();
    // SAFETY: sending a signal to the VMM process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = writer.wait();
    let t = Instant::now();
    while home.json(&["status", "crashy"])["status"] != "crashed" {
        assert!(t.elapsed() < Duration::from_secs(20), "never crashed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fsck, sums) = host_fsck(&home, "crashy", &["/root/keep1", "/root/keep2"]);
    assert!(fsck.contains("files"), "{fsck}");
    assert_eq!(sums, [first.clone(), second]);
    // The snapshot below the crashed top still holds its own moment.
    home.ok(&["start", "crashy", "--from-snapshot", "below"]);
    assert_eq!(sh(&home, "crashy", "sha256sum /root/keep1"), first);
    assert_eq!(
        sh(&home, "crashy", "ls /root/keep2 2>&1 || true"),
        "ls: /root/keep2: No such file or directory"
    );
    home.ok(&["delete", "crashy", "--yes", "--force"]);
}
