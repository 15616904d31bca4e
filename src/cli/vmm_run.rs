//! `microagent vmm run`: boot a kernel in the foreground and exit when the
//! guest powers off. The workspace commands build on the same VMM.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::engine::vmm_process;
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::host;
use crate::vmm::vcpu::GuestStop;
use crate::vmm::vm::{DiskConfig, DiskFormat, VmConfig, VmError, VsockConfig};

#[derive(Args)]
pub struct RunArgs {
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Root disk (ext4 image), attached read-write as /dev/vda.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Extra disk, PATH or PATH:ro; attached in order as /dev/vdb, /dev/vdc, ...
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    disks: Vec<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Kernel arguments appended to the VMM's own (default: quiet root=/dev/vda rw).
    #[arg(long)]
    cmdline: Option<String>,
    /// CPU template (host, pvm-safe); default: pvm-safe on PVM hosts, else host.
    #[arg(long)]
    cpu_template: Option<CpuTemplate>,
    /// Append the serial console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not echo the serial console to stdout.
    #[arg(long)]
    no_console_stdout: bool,
    /// Give the guest a virtio-vsock device (CID 3) fronted by this Unix socket.
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Diagnostic: every SECS seconds print each vCPU's mode, RIP and bytes.
    #[arg(long, value_name = "SECS")]
    dump_state_every: Option<u64>,
}

/// `PATH[:ro]`; a directory is a disk chain (its top decides writability).
fn parse_disk(spec: &str) -> DiskConfig {
    let (path, read_only) = match spec.strip_suffix(":ro") {
        Some(path) => (path, true),
        None => (spec, false),
    };
    disk(path.into(), read_only)
}

fn disk(path: PathBuf, read_only: bool) -> DiskConfig {
    let format = if path.is_dir() {
        DiskFormat::Chain
    } else {
        DiskFormat::File
    };
    DiskConfig {
        path,
        read_only,
        format,
        serial: None,
        snapshot_dir: None,
    }
}

pub fn run(args: RunArgs, json: bool) -> Result<i32> {
    let mut disks = Vec::new();
    if let Some(root) = &args.rootfs {
        disks.push(disk(root.clone(), false));
    }
    disks.extend(args.disks.iter().map(|d| parse_disk(d)));
    let default_cmdline = if args.rootfs.is_some() {
        "quiet root=/dev/vda rw"
    } else {
        "quiet"
    };
    let cfg = VmConfig {
        kernel: args.kernel,
        disks,
        vcpus: u8::try_from(args.vcpus).map_err(|_| VmError::Vcpus(args.vcpus))?,
        mem_mib: args.memory,
        cmdline: args.cmdline.unwrap_or_else(|| default_cmdline.into()),
        cpu_template: args.cpu_template.unwrap_or_else(host::default_cpu_template),
        pvm: host::is_pvm(),
        console_log: args.console_log,
        console_stdout: !args.no_console_stdout && !json,
        vsock: args.vsock.map(|socket| VsockConfig {
            guest_cid: vmm_process::GUEST_CID,
            socket,
        }),
        net: None,
    };
    let started = std::time::Instant::now();
    let (stop, cmdline) = vmm_process::run_foreground(
        &cfg,
        args.dump_state_every.map(std::time::Duration::from_secs),
    )?;
    let (code, kind, reason) = match &stop {
        GuestStop::Reset(why) => (super::EXIT_OK, "poweroff", why.clone()),
        GuestStop::Halted(why) => (super::EXIT_OK, "halted", why.clone()),
        GuestStop::Error(why) => (super::EXIT_FAILURE, "error", why.clone()),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "stop": kind,
                "reason": reason,
                "seconds": started.elapsed().as_secs_f64(),
                "cpu_template": cfg.cpu_template.name(),
                "cmdline": cmdline,
            })
        );
    } else if code == super::EXIT_OK {
        eprintln!("microagent: guest stopped: {reason}");
    } else {
        eprintln!("microagent: guest failed: {reason}");
    }
    Ok(code)
}
