//! Shared fixtures for end-to-end tests: the guest kernel (built once per
//! machine by scripts/build-kernel.sh), busybox root disks, and helpers to
//! run the microagent binary.
#![allow(dead_code)]

pub mod oci;
pub mod schema;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn microagent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_microagent"))
}

/// True when VM tests can run. Without /dev/kvm they are skipped loudly, and
/// fail instead when MICROAGENT_REQUIRE_KVM=1 (CI sets it when /dev/kvm exists).
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("MICROAGENT_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("MICROAGENT_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
        }
        eprintln!("!!! SKIPPING VM TEST: /dev/kvm is not available; no guest was booted !!!");
    }
    ok
}

pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Directory of the cached kernel build (vmlinux, bzImage, sha256, ...).
pub fn kernel_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/build-kernel.sh"))
            .output()
            .expect("running scripts/build-kernel.sh");
        assert!(
            out.status.success(),
            "kernel build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("kernel: "))
            .next_back()
            .expect("build-kernel.sh printed no 'kernel:' line");
        PathBuf::from(dir.trim())
    })
}

/// Makes sure an up-to-date static guest agent sits next to the
/// microagent binary under test (where `create` looks for it). Built once
/// per test process: cargo makes it a no-op when nothing changed, and a
/// stale agent would silently test old guest code.
pub fn ensure_agent() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let next_to_bin =
            PathBuf::from(env!("CARGO_BIN_EXE_microagent")).with_file_name("microagent-agent");
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/build-agent.sh"))
            .output()
            .expect("running scripts/build-agent.sh");
        assert!(
            out.status.success() && next_to_bin.is_file(),
            "agent build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

pub fn vmlinux() -> PathBuf {
    kernel_dir().join("vmlinux")
}

pub fn bzimage() -> PathBuf {
    kernel_dir().join("bzImage")
}

/// An init that only idles: the guest agent does the rest. Tests that
/// need nothing else from init share it, so they share one boot snapshot.
pub const IDLE_INIT: &str = "#!/bin/sh\nwhile true; do sleep 3600; done\n";

/// Where fixtures shared by all test processes of one build live
/// (target/tmp): root disks and the boot snapshot cache.
pub fn shared_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An ext4 root disk holding a static busybox and `init` as /init
/// (scripts/make-busybox-rootfs.sh, which the demo uses too), copied into
/// `dir`. Built once per init script and kept in target/tmp, so equal
/// workspaces of different tests have byte-equal disks: equal boot keys,
/// and one cold boot for all of them (warm starts, see README).
pub fn busybox_rootfs(dir: &Path, init: &str) -> PathBuf {
    let script = repo_root().join("scripts/make-busybox-rootfs.sh");
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        init.hash(&mut h);
        std::fs::read(&script).unwrap().hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let shared = shared_dir("rootfs").join(format!("busybox-{key}.ext4"));
    if !shared.is_file() {
        let init_path = dir.join("init.sh");
        std::fs::write(&init_path, init).unwrap();
        let built = dir.join("rootfs.ext4.building");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&built)
            .arg(&init_path)
            .output()
            .expect("running make-busybox-rootfs.sh");
        assert!(
            out.status.success(),
            "make-busybox-rootfs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Atomic, and the first to finish wins: a racing build of the same
        // script is dropped and everyone copies the winner.
        let staged = shared.with_extension(format!("{}", std::process::id()));
        std::fs::copy(&built, &staged).unwrap();
        std::fs::remove_file(&built).unwrap();
        if !shared.is_file() {
            std::fs::rename(&staged, &shared).unwrap();
        } else {
            std::fs::remove_file(&staged).unwrap();
        }
    }
    let image = dir.join("rootfs.ext4");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&shared)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success(), "copying {}", shared.display());
    image
}

/// The suite's shared guest configuration: an idle busybox init, 2 vCPUs,
/// 256 MiB and the default user network. Workspaces created with it have
/// equal boot keys, so the whole suite cold-boots it once and warm-starts
/// it everywhere else.
pub struct SharedConfig {
    rootfs: String,
    kernel: String,
}

impl SharedConfig {
    pub fn new(dir: &Path) -> SharedConfig {
        SharedConfig {
            rootfs: busybox_rootfs(dir, IDLE_INIT).display().to_string(),
            kernel: vmlinux().display().to_string(),
        }
    }

    /// `create NAME …` arguments, then `extra`.
    pub fn create_args<'a>(&'a self, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "create",
            name,
            "--rootfs",
            &self.rootfs,
            "--kernel",
            &self.kernel,
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--init",
            "/init",
        ];
        a.extend_from_slice(extra);
        a
    }
}

/// Builds a busybox disk holding `/big`: `mib` MiB of non-zero bytes the
/// guest can pull into its page cache (the disk path writes guest memory
/// from the host; a guest-side copy loop would take minutes on PVM).
pub fn rootfs_with_big_file(dir: &Path, mib: usize, init_script: &str) -> PathBuf {
    let init = dir.join("init.sh");
    std::fs::write(&init, init_script).unwrap();
    let image = dir.join("big-rootfs.ext4");
    let st = Command::new("bash")
        .arg(repo_root().join("scripts/make-busybox-rootfs.sh"))
        .arg(&image)
        .arg(&init)
        .arg(format!("{}M", mib + 48))
        .status()
        .unwrap();
    assert!(st.success());
    let big = dir.join("big");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect();
    std::fs::write(&big, data).unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} big", big.display()))
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(big).unwrap();
    image
}

pub fn mkfs_ext4(image: &Path, size: &str, tree: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.arg("-q").arg("-F");
    if let Some(t) = tree {
        cmd.arg("-d").arg(t);
    }
    let out = cmd
        .arg(image)
        .arg(size)
        .output()
        .expect("running mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `microagent vmm run` to completion and returns its output.
pub fn vmm_run(args: &[&str]) -> Output {
    microagent()
        .arg("vmm")
        .arg("run")
        .args(args)
        .output()
        .expect("running microagent")
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `FACT key=value` lines printed by a test init.
pub fn fact<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("FACT {key}=");
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
}

/// Runs `sh -c SCRIPT` in a workspace, requires success, returns stdout trimmed.
pub fn sh(home: &Home, ws: &str, script: &str) -> String {
    let (code, out, err) = home.run(&["exec", ws, "--", "sh", "-c", script]);
    assert_eq!(code, 0, "exec in {ws} failed: {err}");
    out.trim().to_string()
}

/// A private state directory (`MICROAGENT_HOME`) for one test. Its boot
/// snapshot cache is shared by every test (target/tmp/boot-cache), so the
/// suite cold-boots once per configuration, unless the test asks for its
/// own cache.
pub struct Home {
    pub dir: tempfile::TempDir,
    shared_boot_cache: bool,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
            shared_boot_cache: true,
        }
    }

    /// A home whose boot cache is its own (`<home>/cache/boot`): for
    /// tests of the cache itself.
    pub fn with_private_boot_cache() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
            shared_boot_cache: false,
        }
    }

    pub fn cmd(&self) -> Command {
        ensure_agent();
        let mut c = microagent();
        c.env("MICROAGENT_HOME", self.dir.path());
        if self.shared_boot_cache {
            c.env("MICROAGENT_BOOT_CACHE", shared_dir("boot-cache"));
        } else {
            c.env_remove("MICROAGENT_BOOT_CACHE");
        }
        c
    }

    /// Runs `microagent ARGS` with this home; returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let t = std::time::Instant::now();
        let out = self.cmd().args(args).output().expect("running microagent");
        // Where a VM test's minutes go (shown with --nocapture or on failure).
        if t.elapsed() > std::time::Duration::from_secs(2) {
            eprintln!(
                "[{:>6.1} s] microagent {}",
                t.elapsed().as_secs_f64(),
                args.join(" ")
            );
        }
        let (o, e) = text(&out);
        assert!(!e.contains("panicked"), "microagent panicked: {e}");
        (out.status.code().unwrap_or(-1), o, e)
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, o, e) = self.run(args);
        assert_eq!(code, 0, "microagent {args:?} failed: {e}");
        o
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.ok(&a);
        serde_json::from_str(&o).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {o}"))
    }

    pub fn workspace_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("workspaces").join(name)
    }

    /// Waits until the workspace's console contains `marker`.
    pub fn wait_console(&self, name: &str, marker: &str, timeout: std::time::Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(self.workspace_dir(name).join("console.log"))
                .unwrap_or_default();
            if log.contains(marker) {
                return log;
            }
            assert!(
                start.elapsed() < timeout,
                "{name}: no {marker:?} on the console after {timeout:?}:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

/// The last `n` lines of a file ("" if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Home {
    /// Never leave VMMs behind, whatever the test did. A failing test
    /// first prints each workspace's VMM log and console tail: the
    /// directory is about to go, and CI has nothing else to show.
    fn drop(&mut self) {
        let ws = self.dir.path().join("workspaces");
        if let Ok(entries) = std::fs::read_dir(&ws) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if std::thread::panicking() {
                    eprintln!(
                        "--- workspace {name}: vmm.log ---\n{}\n--- {name}: console.log (tail) ---\n{}",
                        tail(&e.path().join("vmm.log"), 30),
                        tail(&e.path().join("console.log"), 20)
                    );
                }
                let _ = self
                    .cmd()
                    .args(["delete", &name, "--yes", "--force"])
                    .output();
            }
        }
    }
}

/// Sends one raw line to a VMM control socket and returns its answer.
pub fn control_line(sock: &Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// A workspace's root disk as the guest sees it: its copy-on-write chain
/// (`<workspace>/disk`) read whole.
pub fn workspace_disk(ws_dir: &Path) -> Vec<u8> {
    let chain = microagent::disk::Chain::open(&ws_dir.join("disk")).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).unwrap();
    buf
}

/// Copies a snapshot directory (its disk chain files with `cp -a`, which
/// keeps holes as holes and allocated blocks allocated: a delta's
/// allocation is its content) so a test can damage the copy.
pub fn copy_snapshot(src: &Path, dst: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", src.display(), dst.display());
}
