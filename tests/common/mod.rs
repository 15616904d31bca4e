//! Shared fixtures for end-to-end tests: the guest kernel (built once per
//! machine by scripts/build-kernel.sh), busybox root disks, and helpers to
//! run the microagent binary.
#![allow(dead_code)]

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

pub fn vmlinux() -> PathBuf {
    kernel_dir().join("vmlinux")
}

pub fn bzimage() -> PathBuf {
    kernel_dir().join("bzImage")
}

/// Builds an ext4 root disk holding a static busybox and `init` as /init
/// (scripts/make-busybox-rootfs.sh, which the demo uses too).
pub fn busybox_rootfs(dir: &Path, init: &str) -> PathBuf {
    let init_path = dir.join("init.sh");
    std::fs::write(&init_path, init).unwrap();
    let image = dir.join("rootfs.ext4");
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/make-busybox-rootfs.sh"))
        .arg(&image)
        .arg(&init_path)
        .output()
        .expect("running make-busybox-rootfs.sh");
    assert!(
        out.status.success(),
        "make-busybox-rootfs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
