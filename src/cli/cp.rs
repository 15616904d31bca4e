//! `cp`: copy files and directories between the host and a running
//! workspace, as tar streams over the guest agent. Modes are preserved.
//!
//! `cp SRC NAME:DIR` puts SRC (file or directory) inside DIR in the guest
//! (DIR is created if missing); `cp NAME:PATH DIR` puts PATH inside the
//! host directory DIR.

use std::path::Path;

use anyhow::{bail, Result};
use clap::Args;

use crate::engine::Engine;
use crate::workspace::store::validate_name;

#[derive(Args)]
pub struct CpArgs {
    /// HOST_PATH or NAME:GUEST_PATH
    src: String,
    /// NAME:GUEST_DIR or HOST_DIR
    dst: String,
}

/// `name:path` when `name` is a valid workspace name and the path is absolute.
fn split_remote(s: &str) -> Option<(&str, &str)> {
    let (name, path) = s.split_once(':')?;
    (validate_name(name).is_ok() && path.starts_with('/')).then_some((name, path))
}

pub fn cp(engine: &Engine, args: CpArgs, out: &super::output::Out) -> Result<i32> {
    match (split_remote(&args.src), split_remote(&args.dst)) {
        (None, Some((name, dir))) => engine.copy_in(Path::new(&args.src), name, dir)?,
        (Some((name, path)), None) => engine.copy_out(name, path, Path::new(&args.dst))?,
        (Some(_), Some(_)) => {
            bail!("copying between two workspaces is not supported; go through the host")
        }
        (None, None) => bail!("one side of cp must be NAME:/absolute/path"),
    }
    // Like cp(1), silent on success unless --json asks.
    if out.json {
        println!(
            "{}",
            serde_json::json!({"source": args.src, "destination": args.dst})
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::split_remote;

    #[test]
    fn remote_paths() {
        assert_eq!(split_remote("builder:/root"), Some(("builder", "/root")));
        assert_eq!(split_remote("./a:b"), None);
        assert_eq!(split_remote("builder:relative"), None);
        assert_eq!(split_remote("/tmp/x"), None);
        assert_eq!(split_remote("Bad:/x"), None);
    }
}
