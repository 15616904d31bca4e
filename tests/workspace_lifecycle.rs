//! Workspace lifecycle with real VMs: detached VMMs, the control socket,
//! the state machine, crash detection and recovery, concurrency.

mod common;

use std::time::Duration;

use common::*;

/// Prints a tick every second forever: the console shows whether the guest
/// is running or frozen.
const TICK_INIT: &str = r#"#!/bin/sh
echo WORKSPACE_INIT_OK
mkfifo /run/tick
exec 3<>/run/tick
i=0
while true; do echo "tick $i"; i=$((i+1)); read -t 1 _ <&3; done
"#;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn create(home: &Home, name: &str, rootfs: &std::path::Path) {
    home.ok(&[
        "create",
        name,
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        vmlinux().to_str().unwrap(),
        "--memory",
        "128",
        "--init",
        "/init",
    ]);
}

fn status(home: &Home, name: &str) -> serde_json::Value {
    home.json(&["status", name])
}

fn console_len(home: &Home, name: &str) -> u64 {
    std::fs::metadata(home.workspace_dir(name).join("console.log")).map_or(0, |m| m.len())
}

/// As root, the engine drops each VMM to the `microagent-vmm` system user
/// (made on first use): no root, no capability, and it may write only
/// what the engine gave it (its chain directory, new files in a sticky
/// workspace directory); the records stay root's. Another user's VMM
/// runs as that user.
fn vmm_runs_unprivileged(home: &Home, pid: i64) {
    use std::os::unix::fs::MetadataExt;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        line.split_whitespace()
            .map(|v| u64::from_str_radix(v, if name == "CapEff:" { 16 } else { 10 }).unwrap())
            .collect()
    };
    let me = nix::unistd::Uid::effective();
    if !me.is_root() {
        assert_eq!(field("Uid:"), vec![u64::from(me.as_raw()); 4], "{status}");
        return;
    }
    let vmm = nix::unistd::User::from_name("microagent-vmm")
        .unwrap()
        .expect("the engine made the VMM user");
    let (uid, gid) = (vmm.uid.as_raw(), vmm.gid.as_raw());
    assert_ne!(uid, 0);
    assert_eq!(field("Uid:"), vec![u64::from(uid); 4], "{status}");
    assert_eq!(field("Gid:"), vec![u64::from(gid); 4], "{status}");
    assert_eq!(field("CapEff:"), vec![0], "{status}");
    let ws = home.workspace_dir("builder");
    let md = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap();
    let dir = md(&ws);
    assert_eq!(
        (dir.mode() & 0o7777, dir.uid(), dir.gid()),
        (0o1770, 0, gid),
        "workspace directory: sticky, group-writable for the VMM only"
    );
    let disk = md(&ws.join("disk"));
    assert_eq!((disk.mode() & 0o777, disk.uid()), (0o700, uid));
    let record = md(&ws.join("workspace.json"));
    assert_eq!((record.mode() & 0o777, record.uid()), (0o600, 0));
    assert_eq!(md(&ws.join("console.log")).uid(), uid);
}

/// `status` reports the VMM's cgroup v2 limits, or why there are none
/// (this host keeps memory, cpu and pids on cgroup v1): never silent.
fn limits_reported(home: &Home, pid: i64) {
    let s = status(home, "builder");
    let limits = &s["limits"];
    match limits["state"].as_str() {
        Some("limited") => {
            assert_eq!(limits["memory_max_bytes"], (128u64 + 256) << 20, "{limits}");
            let cg = std::path::Path::new(limits["cgroup"].as_str().unwrap());
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
            assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
            let max = std::fs::read_to_string(cg.join("memory.max")).unwrap();
            assert_eq!(max.trim(), ((128u64 + 256) << 20).to_string());
        }
        Some("unavailable") => {
            let reason = limits["reason"].as_str().unwrap();
            assert!(!reason.is_empty(), "{limits}");
            eprintln!("limits unavailable here: {reason}");
            let (_, text, _) = home.run(&["status", "builder"]);
            assert!(text.contains(&format!("limits:  none: {reason}")), "{text}");
        }
        _ => panic!("status has no limits: {s}"),
    }
}

#[test]
fn full_lifecycle_with_two_workspaces_crash_and_recovery() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let rootfs = busybox_rootfs(home.dir.path(), TICK_INIT);
    create(&home, "builder", &rootfs);
    create(&home, "second", &rootfs);

    // Documented JSON fields of a created workspace.
    let s = status(&home, "builder");
    assert_eq!(s["status"], "created");
    for field in [
        "name",
        "vcpus",
        "memory_mib",
        "kernel_sha256",
        "created",
        "cpu_template",
        "dir",
    ] {
        assert!(!s[field].is_null(), "status --json lacks {field}: {s}");
    }
    assert_eq!(s["memory_mib"], 128);
    // Guest data is private: the workspace directory is 0700.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.workspace_dir("builder"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "workspace dir mode {mode:o}");
    }
    // Each workspace has its own copy-on-write chain over a shared base.
    let chain =
        microagent::disk::ChainSpec::read(&home.workspace_dir("builder").join("disk")).unwrap();
    assert!(chain.deltas.is_empty() && chain.top.is_some(), "{chain:?}");

    // Two workspaces running at once, both guests reaching userspace.
    // --no-wait: these checks are about the VMM, not the guest agent.
    let started = home.json(&["start", "builder", "--no-wait"]);
    assert_eq!(started["status"], "running");
    home.ok(&["start", "second", "--no-wait"]);
    let list = home.json(&["list"]);
    let running: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["status"] == "running")
        .collect();
    assert_eq!(running.len(), 2, "{list}");
    assert_ne!(running[0]["pid"], running[1]["pid"]);
    home.wait_console("builder", "tick 1", BOOT_TIMEOUT);
    home.wait_console("second", "tick 1", BOOT_TIMEOUT);
    let (_, logs, _) = home.run(&["logs", "builder"]);
    assert!(logs.contains("WORKSPACE_INIT_OK"), "logs: {logs}");

    // Pause freezes the guest; resume lets it go on.
    assert_eq!(home.json(&["pause", "builder"])["status"], "paused");
    assert_eq!(status(&home, "builder")["status"], "paused");
    let frozen = console_len(&home, "builder");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        console_len(&home, "builder"),
        frozen,
        "guest ran while paused"
    );
    let (code, _, err) = home.run(&["pause", "builder"]);
    assert_eq!(code, 1);
    assert!(err.contains("workspace builder is paused"), "{err}");
    assert_eq!(home.json(&["resume", "builder"])["status"], "running");
    let resumed = std::time::Instant::now();
    while console_len(&home, "builder") == frozen {
        assert!(
            resumed.elapsed() < Duration::from_secs(60),
            "guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Illegal transitions name the workspace and its state.
    let (code, _, err) = home.run(&["delete", "builder", "--yes"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("workspace builder is running; halt it first"),
        "{err}"
    );
    let (code, _, err) = home.run(&["start", "builder"]);
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");

    // kill -9 of the VMM: crashed, with the reason; start recovers.
    let pid = status(&home, "builder")["pid"]
        .as_i64()
        .expect("running workspace has a pid");
    vmm_runs_unprivileged(&home, pid);
    limits_reported(&home, pid);
    // SAFETY: sending a signal to the VMM process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t = std::time::Instant::now();
    let crashed = loop {
        let s = status(&home, "builder");
        if s["status"] == "crashed" {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never crashed: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        crashed["crash_reason"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{crashed}"
    );
    assert!(
        !home.workspace_dir("builder").join("control.sock").exists(),
        "stale socket left"
    );
    assert_eq!(
        home.json(&["start", "builder", "--no-wait"])["status"],
        "running"
    );

    // No control request names a path: one that tries is refused and
    // nothing is written anywhere.
    let elsewhere = tempfile::tempdir().unwrap();
    let sock = home.workspace_dir("builder").join("control.sock");
    for line in [
        format!(
            r#"{{"v":2,"op":"snapshot","dir":"{}"}}"#,
            elsewhere.path().display()
        ),
        format!(
            r#"{{"v":1,"op":"snapshot","dir":"{}","with_disk":true}}"#,
            elsewhere.path().display()
        ),
    ] {
        let answer = control_line(&sock, &line);
        assert_eq!(answer["ok"], false, "{line} -> {answer}");
        let why = answer["error"].as_str().unwrap();
        assert!(
            why.contains("unknown field") || why.contains("version 1"),
            "{why}"
        );
    }
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    // (The VMM's snapshots directory exists, made for it, and is empty.)
    let snapshots = home.workspace_dir("builder").join("snapshots");
    assert!(std::fs::read_dir(&snapshots).map_or(true, |mut d| d.next().is_none()));
    assert_eq!(status(&home, "builder")["status"], "running");

    // kill -9 of the supervisor: the VMM dies with it (never an orphan
    // writing the disk), status says crashed and why, and the next start
    // runs exactly one VMM.
    let dir = home.workspace_dir("builder");
    let supervisor = vmm_processes(&dir)
        .into_iter()
        .find(|(_, role)| role == "supervise")
        .expect("a supervisor runs")
        .0;
    // SAFETY: sending a signal to the supervisor this test started.
    unsafe { libc::kill(supervisor, libc::SIGKILL) };
    let t = std::time::Instant::now();
    while !vmm_processes(&dir).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the VMM outlived its supervisor: {:?}",
            vmm_processes(&dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = status(&home, "builder");
    assert_eq!(s["status"], "crashed", "{s}");
    assert!(
        s["crash_reason"].as_str().unwrap().contains("supervisor"),
        "{s}"
    );
    assert_eq!(
        home.json(&["start", "builder", "--no-wait"])["status"],
        "running"
    );
    let procs = vmm_processes(&dir);
    let roles: Vec<&str> = procs.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        (
            roles.iter().filter(|r| **r == "serve").count(),
            roles.iter().filter(|r| **r == "supervise").count()
        ),
        (1, 1),
        "{procs:?}"
    );

    // The other workspace was never disturbed.
    assert_eq!(status(&home, "second")["status"], "running");

    // The VMM is confined: every thread of it runs under a seccomp filter
    // (mode 2) with no_new_privs.
    let vmm = status(&home, "second")["pid"].as_i64().unwrap();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).unwrap())
        .collect();
    assert!(tasks.len() >= 4, "main, 2 vCPUs, control: {}", tasks.len());
    for st in &tasks {
        let name = st.lines().next().unwrap_or_default();
        assert!(st.contains("\nSeccomp:\t2\n"), "{name}: no filter");
        assert!(st.contains("\nNoNewPrivs:\t1\n"), "{name}: no no_new_privs");
    }
    // As root it is also jailed: its own mount namespace, whose root holds
    // only the path to its workspace directory.
    if nix::unistd::Uid::effective().is_root() {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(ns(&vmm.to_string()), ns("self"), "no mount namespace");
        let jail = std::path::PathBuf::from(format!("/proc/{vmm}/root"));
        let top: Vec<_> = std::fs::read_dir(&jail)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let ws = std::fs::canonicalize(home.workspace_dir("second")).unwrap();
        let first = ws.components().nth(1).unwrap().as_os_str().to_owned();
        assert_eq!(top, vec![first], "the jail's root holds more");
        let seen = jail.join(ws.strip_prefix("/").unwrap());
        assert!(seen.join("console.log").is_file(), "{}", seen.display());
        assert!(!jail.join("proc/self").exists() && !jail.join("dev/kvm").exists());
    }

    // Halt, start again, halt, delete.
    assert_eq!(home.json(&["halt", "builder"])["status"], "halted");
    assert_eq!(status(&home, "builder")["status"], "halted");

    // A call outside the filter kills the VMM, and status names it. The
    // test switch leaves tgkill, which pause needs, out of the filters.
    let out = home
        .cmd()
        .env("MICROAGENT_TEST_SECCOMP_DENY", "tgkill")
        .args(["start", "builder", "--no-wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A pause that lands before the vCPU threads exist fails without
    // kicking them; the next one kicks.
    let t = std::time::Instant::now();
    while status(&home, "builder")["status"] != "crashed" {
        let (code, _, err) = home.run(&["pause", "builder"]);
        assert_eq!(code, 1, "pause went through without tgkill: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never crashed: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, text, _) = home.run(&["status", "builder"]);
    assert!(
        text.starts_with("builder: crashed: seccomp violation (syscall tgkill)\n"),
        "{text}"
    );
    assert_eq!(
        home.json(&["start", "builder", "--no-wait"])["status"],
        "running"
    );
    home.ok(&["halt", "builder"]);
    home.ok(&["halt", "second"]);
    let (code, _, err) = home.run(&["halt", "second"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("workspace second is halted; it is not running"),
        "{err}"
    );
    assert_eq!(home.json(&["delete", "builder", "--yes"])["deleted"], true);
    home.ok(&["delete", "second", "--yes"]);
    assert!(vmm_processes(&dir).is_empty());
    assert!(!home.workspace_dir("builder").exists());
    let (code, _, err) = home.run(&["status", "builder"]);
    assert_eq!(code, 1);
    assert!(err.contains("workspace builder does not exist"), "{err}");
}

/// Processes serving `dir` (supervisors and VMMs), found in /proc by their
/// arguments (`vmm supervise|serve --workspace-dir DIR`), never by pattern.
fn vmm_processes(dir: &std::path::Path) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let serves_dir = args
            .windows(2)
            .any(|w| w[0] == "--workspace-dir" && w[1] == dir.to_str().unwrap());
        if serves_dir && args.get(1).map(String::as_str) == Some("vmm") {
            found.push((pid, args.get(2).cloned().unwrap_or_default()));
        }
    }
    found
}

#[test]
fn twenty_concurrent_starts_make_exactly_one_vmm() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let rootfs = busybox_rootfs(home.dir.path(), TICK_INIT);
    create(&home, "racer", &rootfs);
    // All twenty processes are started before any is waited for.
    let spawned: Vec<_> = (0..20)
        .map(|_| {
            home.cmd()
                .args(["start", "racer", "--no-wait"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = spawned
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one start wins");
    for o in outputs.iter().filter(|o| !o.status.success()) {
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("workspace racer is running; it is already running"),
            "{err}"
        );
    }
    let procs = vmm_processes(&home.workspace_dir("racer"));
    let serves = procs.iter().filter(|(_, role)| role == "serve").count();
    let supervisors = procs.iter().filter(|(_, role)| role == "supervise").count();
    assert_eq!((serves, supervisors), (1, 1), "{procs:?}");
    home.ok(&["halt", "racer"]);
    assert!(vmm_processes(&home.workspace_dir("racer")).is_empty());
}

#[test]
fn names_unknown_workspaces_and_confirmation() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("r.ext4");
    mkfs_ext4(&rootfs, "4M", None);
    for bad in ["Builder", "-x", "a_b", "a/b", ""] {
        let (code, _, err) = home.run(&[
            "create",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            "/bin/sh",
            "--",
            bad,
        ]);
        assert_eq!(code, 1, "{bad}: {err}");
        assert!(err.contains("invalid workspace name"), "{bad}: {err}");
    }
    for cmd in ["start", "status", "pause", "resume", "halt", "logs"] {
        let (code, _, err) = home.run(&[cmd, "ghost"]);
        assert_eq!(code, 1, "{cmd}");
        assert!(
            err.contains("workspace ghost does not exist"),
            "{cmd}: {err}"
        );
    }
    let (code, out, _) = home.run(&["status", "ghost", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("ghost"));
    let (code, _, err) = home.run(&[
        "create",
        "w",
        "--rootfs",
        "/nonexistent.ext4",
        "--kernel",
        "/bin/sh",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rootfs /nonexistent.ext4 does not exist"),
        "{err}"
    );
    let (code, _, err) = home.run(&[
        "create",
        "w",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        "/bin/sh",
        "--vcpus",
        "0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid vCPU count 0"), "{err}");
    assert!(
        !home.workspace_dir("w").exists(),
        "a refused create left a directory"
    );
    home.ok(&[
        "create",
        "w",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        "/bin/sh",
    ]);
    let (code, _, err) = home.run(&["delete", "w"]);
    assert_eq!(code, 2, "destructive without --yes and no terminal");
    assert!(err.contains("--yes"), "{err}");
    assert!(home.workspace_dir("w").exists());
    let (code, _, _) = home.run(&["frobnicate"]);
    assert_eq!(code, 2, "usage errors exit 2");
    assert_eq!(home.json(&["list"]).as_array().unwrap().len(), 1);

    // A host whose KVM cannot save VM state: snapshot create fails with
    // snapshot_unsupported, naming what is missing, before it writes
    // anything (even before it looks at the workspace's state). The test
    // switch only hides capabilities from the real probe of /dev/kvm.
    let before: Vec<_> = std::fs::read_dir(home.workspace_dir("w"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = home
        .cmd()
        .env("MICROAGENT_TEST_HIDE_KVM_CAPS", "XSAVE")
        .args(["snapshot", "create", "w", "--tag", "t", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "snapshot_unsupported", "{v}");
    let missing = v["error"]["missing"].as_array().unwrap();
    if kvm_available() {
        assert_eq!(missing, &[serde_json::json!("KVM_CAP_XSAVE")], "{v}");
    } else {
        assert!(!missing.is_empty(), "{v}");
    }
    let after: Vec<_> = std::fs::read_dir(home.workspace_dir("w"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a refused snapshot wrote something");
}
