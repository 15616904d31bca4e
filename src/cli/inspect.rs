//! list, status, logs: commands that only read.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::lifecycle::NameArgs;
use super::output::Out;
use crate::engine::{Engine, WorkspaceView};
use crate::vmm::cgroup::Placement;

#[derive(Args)]
pub struct ListArgs {
    /// Only workspaces with this status.
    #[arg(long)]
    status: Option<String>,
    /// Only workspaces made from this image (its reference as given to
    /// create, or a prefix of its digest such as sha256:3f2a).
    #[arg(long)]
    image: Option<String>,
    /// Only workspaces whose name starts with this.
    #[arg(long)]
    prefix: Option<String>,
}

impl ListArgs {
    fn wants(&self, v: &WorkspaceView) -> bool {
        let (rec, status) = (&v.record, v.status.name());
        let image_ok = self.image.as_deref().is_none_or(|want| {
            rec.image.as_deref() == Some(want)
                || rec
                    .image_digest
                    .as_deref()
                    .is_some_and(|d| want.len() >= 12 && d.starts_with(want))
        });
        self.status.as_deref().is_none_or(|s| s == status)
            && image_ok
            && self
                .prefix
                .as_deref()
                .is_none_or(|p| rec.name.starts_with(p))
    }
}

pub fn list(engine: &Engine, args: ListArgs, out: &Out) -> Result<i32> {
    let rows: Vec<WorkspaceView> = engine
        .list()?
        .into_iter()
        .filter(|v| args.wants(v))
        .collect();
    if out.json {
        let v: Vec<_> = rows.iter().map(crate::render::workspace).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    println!(
        "{:<24} {:<9} {:<32} {:>5} {:>7} CREATED",
        "NAME", "STATUS", "IMAGE", "VCPUS", "MEMORY"
    );
    for l in &rows {
        let rec = &l.record;
        let image = rec
            .image
            .clone()
            .or_else(|| rec.rootfs_source.clone())
            .unwrap_or_default();
        println!(
            "{:<24} {:<9} {:<32} {:>5} {:>6}M {}",
            rec.name,
            l.status.name(),
            image,
            rec.vcpus,
            rec.memory_mib,
            rec.created
        );
    }
    Ok(0)
}

pub fn status(engine: &Engine, args: NameArgs, out: &Out) -> Result<i32> {
    let l = engine.status(&args.name)?;
    let rec = &l.record;
    let v = crate::render::workspace_status(&l);
    if out.json {
        println!("{v}");
    } else {
        // `w: crashed: seccomp violation (syscall mkdir)`
        match &l.crash_reason {
            Some(r) => println!("{}: {}: {r}", rec.name, l.status),
            None => println!("{}: {}", rec.name, l.status),
        }
        println!("  vcpus:   {}", rec.vcpus);
        println!("  memory:  {} MiB", rec.memory_mib);
        println!(
            "  auto snapshot on stop: {} (keeps {})",
            if rec.auto_snapshot_on_stop {
                "on"
            } else {
                "off"
            },
            rec.max_snapshots
        );
        if let Some(p) = l.pid {
            println!("  pid:     {p}");
        }
        match (&l.network_state, rec.network.name()) {
            (Some(state), mode) => println!("  network: {mode} ({state})"),
            (None, mode) => println!("  network: {mode}"),
        }
        match &l.limits {
            Some(Placement::Limited { cgroup, limits }) => println!(
                "  limits:  memory {} MiB, cpu weight {}, pids {} (cgroup {cgroup})",
                limits.memory_max_bytes >> 20,
                limits.cpu_weight,
                limits.pids_max
            ),
            Some(Placement::Unavailable { reason }) => println!("  limits:  none: {reason}"),
            None => {}
        }
        for m in &rec.volumes {
            println!(
                "  volume:  {} at {}{}",
                m.volume,
                m.path,
                if m.read_only { " (read-only)" } else { "" }
            );
        }
        if !rec.ports.is_empty() {
            let ports: Vec<String> = rec.ports.iter().map(|p| p.to_string()).collect();
            println!("  ports:   {}", ports.join(", "));
        }
        println!("  kernel:  {} (sha256 {})", rec.kernel, rec.kernel_sha256);
        println!("  created: {}", rec.created);
    }
    Ok(0)
}

#[derive(Args)]
pub struct LogsArgs {
    name: String,
    /// Keep printing as the console grows, until the VMM stops.
    #[arg(short, long)]
    follow: bool,
}

pub fn logs(engine: &Engine, args: LogsArgs) -> Result<i32> {
    let path = engine.console_log(&args.name)?;
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut stdout = std::io::stdout().lock();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if file.is_none() {
            file = std::fs::File::open(&path).ok();
        }
        if let Some(f) = file.as_mut() {
            f.seek(SeekFrom::Start(pos))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                if stdout.write_all(&buf[..n]).is_err() {
                    return Ok(0); // Reader went away (e.g. `| head`).
                }
            }
            let _ = stdout.flush();
        }
        if !args.follow {
            return Ok(0);
        }
        if !engine.vmm_alive(&args.name)? {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
