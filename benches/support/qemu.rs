//! QEMU `-M microvm` as the benchmarks' point of comparison: the same
//! kernel, root disk and hidden CPU features as our VMM, plus a minimal QMP
//! client for its snapshot (migrate-to-file) side.

// Each bench uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Loops-per-jiffy at the guest kernel's HZ=50 (as our VMM presets it),
/// from the host's CPU clock.
fn host_lpj() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1e6 / 50.0) as u64)
}

/// What our VMM adds to the guest command line on its own (a preset lpj,
/// and on PVM hosts the defences HOST-KVM.md lists); QEMU gets the same.
pub fn vmm_guest_args(pvm: bool) -> String {
    let mut s = String::new();
    if let Some(lpj) = host_lpj() {
        s.push_str(&format!(" lpj={lpj}"));
    }
    if pvm {
        s.push_str(
            " microagent.pvm_syscall noxsave clearcpuid=cx16,popcnt,xsave,xsaveopt,xsavec,xsaves,avx,avx2,avx512f,smap",
        );
    }
    s
}

/// `qemu-system-x86_64 -M microvm` booting `kernel` on `rootfs` (virtio-mmio
/// block), serial on stdout.
pub fn microvm(kernel: &Path, rootfs: &Path, memory_mib: u64, guest_args: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        // Without ACPI QEMU lists the virtio-mmio devices on the kernel
        // command line, which is how our ACPI-less guest kernel finds them.
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(kernel)
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none",
        rootfs.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"])
    .arg("-append")
    // microvm has no i8042 reset: reboot=t lets `reboot -f` end QEMU.
    .arg(format!("console=ttyS0 reboot=t panic=-1 {guest_args}"));
    cmd
}

/// A QMP connection, capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path`, retrying while QEMU starts.
    pub fn connect(path: &Path, timeout: Duration) -> Option<Qmp> {
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return None,
            }
        };
        let writer = stream.try_clone().ok()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        q.read_value()?; // greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Some(q)
    }

    fn read_value(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Runs a command and returns its `return` value (events skipped).
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Option<serde_json::Value> {
        let req = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{req}").ok()?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                eprintln!("qmp {cmd}: {e}");
                return None;
            }
            return v.get("return").cloned();
        }
    }

    /// Polls `query-migrate` until it completes (true) or fails (false).
    pub fn wait_migration(&mut self, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            let Some(v) = self.execute("query-migrate", serde_json::json!({})) else {
                return false;
            };
            match v["status"].as_str() {
                Some("completed") => return true,
                Some("failed") | Some("cancelled") => return false,
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        false
    }

    pub fn status(&mut self) -> Option<String> {
        self.execute("query-status", serde_json::json!({}))?["status"]
            .as_str()
            .map(str::to_string)
    }
}
