//! list, status, logs: commands that only read.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::lifecycle::NameArgs;
use super::output::{record_json, Out};
use crate::vmm::control::{self, Op as CtlOp};
use crate::workspace::busy;
use crate::workspace::state::{reconcile, supervisor_alive, Status};
use crate::workspace::store::{StateDir, WorkspaceDir, WorkspaceRecord};

struct Live {
    status: Status,
    crash_reason: Option<String>,
    pid: Option<u32>,
    /// From the running VMM: "up", or "down: why" (passt gone).
    network_state: Option<String>,
}

/// Status as it really is, asking the VMM when one should be running.
fn live(ws: &WorkspaceDir, rec: &WorkspaceRecord) -> Live {
    let (mut status, crash_reason) = reconcile(ws, rec);
    let mut pid = None;
    let mut network_state = None;
    if status.is_live() {
        if let Ok(resp) =
            control::request(&ws.control_socket(), CtlOp::Status, Duration::from_secs(5))
        {
            pid = resp.pid;
            network_state = resp.network;
            status = match resp.state.as_deref() {
                Some("paused") => Status::Paused,
                _ => Status::Running,
            };
        }
        if busy::current(ws).is_some_and(|b| b.op == "snapshotting") {
            status = Status::Snapshotting;
        }
    }
    Live {
        status,
        crash_reason,
        pid,
        network_state,
    }
}

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
    fn wants(&self, rec: &crate::workspace::store::WorkspaceRecord, status: &str) -> bool {
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

pub fn list(state: &StateDir, args: ListArgs, out: &Out) -> Result<i32> {
    let mut rows = Vec::new();
    for name in state.list()? {
        let ws = state.workspace(&name)?;
        let Ok(rec) = ws.read() else { continue };
        let l = live(&ws, &rec);
        if !args.wants(&rec, l.status.name()) {
            continue;
        }
        rows.push((ws, rec, l));
    }
    if out.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(ws, rec, l)| record_json(ws, rec, l.status, l.crash_reason.as_deref(), l.pid))
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    println!(
        "{:<24} {:<9} {:<32} {:>5} {:>7} CREATED",
        "NAME", "STATUS", "IMAGE", "VCPUS", "MEMORY"
    );
    for (_, rec, l) in &rows {
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

pub fn status(state: &StateDir, args: NameArgs, out: &Out) -> Result<i32> {
    let ws = state.existing(&args.name)?;
    let rec = ws.read()?;
    let l = live(&ws, &rec);
    let mut v = record_json(&ws, &rec, l.status, l.crash_reason.as_deref(), l.pid);
    v["network_state"] = l.network_state.clone().into();
    if out.json {
        println!("{v}");
    } else {
        println!("{}: {}", rec.name, l.status);
        if let Some(r) = &l.crash_reason {
            println!("  reason:  {r}");
        }
        println!("  vcpus:   {}", rec.vcpus);
        println!("  memory:  {} MiB", rec.memory_mib);
        if let Some(p) = l.pid {
            println!("  pid:     {p}");
        }
        match (&l.network_state, rec.network.name()) {
            (Some(state), mode) => println!("  network: {mode} ({state})"),
            (None, mode) => println!("  network: {mode}"),
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

pub fn logs(state: &StateDir, args: LogsArgs) -> Result<i32> {
    let ws = state.existing(&args.name)?;
    let path = ws.console_log();
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
        let rec = ws.read()?;
        if !rec.status.is_live() || !supervisor_alive(rec.vmm_pid.unwrap_or(0), &ws) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
