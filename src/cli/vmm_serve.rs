//! `vmm supervise` and `vmm serve`: the two processes of a workspace's
//! detached VMM (see engine::vmm_process).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::engine::vmm_process;
use crate::vmm::jail::RunAs;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    workspace_dir: PathBuf,
    /// Resume from this snapshot directory instead of booting.
    #[arg(long)]
    restore_from: Option<PathBuf>,
    /// Drop root to this UID:GID once the VM is built and jailed.
    #[arg(long)]
    run_as: Option<RunAs>,
}

pub fn supervise(args: ServeArgs) -> Result<i32> {
    Ok(vmm_process::supervise(
        &args.workspace_dir,
        args.restore_from.as_deref(),
        args.run_as,
    )?)
}

/// The last line of the VMM's log says why it ended (the supervisor reads
/// it into the exit record).
pub fn serve(args: ServeArgs) -> Result<i32> {
    let stop = vmm_process::serve(
        &args.workspace_dir,
        args.restore_from.as_deref(),
        args.run_as,
    )?;
    if stop.is_clean() {
        println!("guest stopped: {}", stop.reason());
        Ok(0)
    } else {
        println!("guest failed: {}", stop.reason());
        Ok(1)
    }
}
