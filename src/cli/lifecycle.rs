//! start, pause, resume.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::output::{print_record, Out};
use crate::engine::lifecycle::StartOptions;
use crate::engine::{Boot, Engine};

#[derive(Args)]
pub struct NameArgs {
    pub name: String,
}

#[derive(Args)]
pub struct StartArgs {
    pub name: String,
    /// Return once the VMM runs, without waiting for the guest agent.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the guest agent (boots are slow on PVM hosts).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Roll back: resume memory, devices and disk from this snapshot tag.
    #[arg(long, value_name = "TAG")]
    from_snapshot: Option<String>,
    /// First start: boot the kernel even when a boot snapshot of an equal
    /// workspace is cached (and do not cache this boot).
    #[arg(long, conflicts_with = "from_snapshot")]
    cold: bool,
}

pub fn start(engine: &Engine, args: StartArgs, out: &Out) -> Result<i32> {
    let opts = StartOptions {
        wait: (!args.no_wait).then(|| Duration::from_secs(args.timeout)),
        from_snapshot: args.from_snapshot.clone(),
        cold: args.cold,
    };
    let s = engine.start(&args.name, &opts, out)?;
    let how = match (&args.from_snapshot, s.boot, &s.boot_key) {
        (Some(tag), _, _) => format!(" from snapshot {tag}"),
        (None, Boot::Warm, Some(k)) => format!(" (warm start from boot snapshot {})", &k[..12]),
        (None, Boot::Cold, Some(k)) if s.cached => {
            format!(" (cold boot; cached as boot snapshot {})", &k[..12])
        }
        (None, _, Some(_)) => " (cold boot)".to_string(),
        _ => String::new(),
    };
    let json = crate::render::started(&s);
    out.done(
        &format!(
            "workspace {} started{how} in {:.1}s",
            args.name,
            s.start_ms as f64 / 1e3
        ),
        json,
    );
    Ok(0)
}

pub fn pause(engine: &Engine, args: NameArgs, out: &Out) -> Result<i32> {
    let v = engine.pause(&args.name)?;
    print_record(out, &v, &format!("workspace {} paused", args.name));
    Ok(0)
}

pub fn resume(engine: &Engine, args: NameArgs, out: &Out) -> Result<i32> {
    let v = engine.resume(&args.name)?;
    print_record(out, &v, &format!("workspace {} resumed", args.name));
    Ok(0)
}

#[derive(Args)]
pub struct UpdateArgs {
    name: String,
    #[command(flatten)]
    settings: super::create::SnapshotSettingsArgs,
}

pub fn update(engine: &Engine, args: UpdateArgs, out: &Out) -> Result<i32> {
    let v = engine.update(&args.name, &args.settings.settings())?;
    let rec = &v.record;
    print_record(
        out,
        &v,
        &format!(
            "workspace {}: auto snapshot on stop {}, keeps {}",
            args.name,
            if rec.auto_snapshot_on_stop {
                "on"
            } else {
                "off"
            },
            rec.max_snapshots
        ),
    );
    Ok(0)
}
