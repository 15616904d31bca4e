//! `serve`: the HTTP API over the same engine (see `crate::api`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::api::{self, Listen};
use crate::engine::Engine;

#[derive(Args)]
pub struct ServeArgs {
    /// unix:PATH (default: unix:<state dir>/api.sock, mode 0600) or
    /// ADDR:PORT (loopback only, unless --token-file is given).
    #[arg(long, value_name = "unix:PATH|ADDR:PORT")]
    listen: Option<String>,
    /// A file holding the bearer token every request must carry
    /// (Authorization: Bearer TOKEN); needed off loopback.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// The token in `path`: its first line, which must not be empty.
fn read_token(path: &PathBuf) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        bail!(
            "--token-file {}: the token must be at least 16 characters on its first line",
            path.display()
        );
    }
    Ok(token)
}

pub fn serve(engine: Engine, args: ServeArgs) -> Result<i32> {
    let listen = match &args.listen {
        Some(l) => Listen::parse(l).map_err(anyhow::Error::msg)?,
        None => Listen::Unix(engine.state.root.join("api.sock")),
    };
    let token = args.token_file.as_ref().map(read_token).transpose()?;
    if let Listen::Unix(p) = &listen {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    api::serve(engine, listen, token)?;
    Ok(0)
}
