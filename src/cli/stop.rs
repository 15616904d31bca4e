//! halt and delete.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::output::Out;
use crate::engine::auto_snapshot::AutoSnapshot;
use crate::engine::Engine;

#[derive(Args)]
pub struct HaltArgs {
    name: String,
    /// Seconds to wait for the VMM to stop before killing it.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

pub fn halt(engine: &Engine, args: HaltArgs, out: &Out) -> Result<i32> {
    let h = engine.halt(&args.name, Duration::from_secs(args.timeout), out)?;
    let mut msg = format!("workspace {} halted", args.name);
    if h.forced {
        msg += &format!(" (forced after {}s)", args.timeout);
    }
    match &h.auto_snapshot {
        AutoSnapshot::Taken {
            created,
            rotated_out,
        } => {
            msg += &format!("; snapshot {}", created.snapshot.manifest.tag);
            if !rotated_out.is_empty() {
                msg += &format!(" (rotated out: {})", rotated_out.join(", "));
            }
        }
        // Already warned about on stderr.
        AutoSnapshot::Failed(_) => msg += "; automatic snapshot failed",
        AutoSnapshot::Skipped => {}
    }
    out.done(&msg, crate::render::halted(&h));
    Ok(0)
}

#[derive(Args)]
pub struct DeleteArgs {
    name: String,
    /// Confirm: deleting removes the workspace's disk and snapshots
    /// (asked on a terminal; refused without one).
    #[arg(long, short)]
    yes: bool,
    /// Delete even if running (the VMM is stopped first) or snapshotting
    /// (the snapshot is ended; it is not kept).
    #[arg(long)]
    force: bool,
}

pub fn delete(engine: &Engine, args: DeleteArgs, out: &Out) -> Result<i32> {
    // Ask only about a workspace that exists.
    engine.exists(&args.name)?;
    super::confirm::confirm(
        &format!(
            "delete removes workspace {} with its disk and snapshots",
            args.name
        ),
        args.yes,
    )?;
    engine.delete(&args.name, args.force)?;
    out.done(
        &format!("workspace {} deleted", args.name),
        serde_json::json!({ "name": args.name, "deleted": true }),
    );
    Ok(0)
}
