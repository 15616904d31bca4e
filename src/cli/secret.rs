//! `secret set|ls|rm`: a workspace's secrets. Values come from a file, an
//! environment variable or stdin, never from the command line, and are
//! never printed. A running workspace gets the change at once.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::lifecycle::{deliver_secrets, open};
use super::output::Out;
use crate::agent::secrets as agent_secrets;
use crate::workspace::secrets::{read_value_file, SecretStore, MAX_VALUE};
use crate::workspace::state::Status;
use crate::workspace::store::StateDir;

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Set a secret (delivered to /run/secrets/KEY in the guest).
    Set(SetArgs),
    /// List a workspace's secret keys (never values).
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Remove a secret (scrubbed from a running guest at once).
    Rm(RmArgs),
}

#[derive(Args)]
pub struct SetArgs {
    name: String,
    key: String,
    /// Read the value from this file.
    #[arg(long, conflicts_with = "from_env")]
    from_file: Option<PathBuf>,
    /// Read the value from this environment variable.
    #[arg(long)]
    from_env: Option<String>,
}

#[derive(Args)]
pub struct LsArgs {
    name: String,
}

#[derive(Args)]
pub struct RmArgs {
    name: String,
    key: String,
}

pub fn run(state: &StateDir, cmd: SecretCommand, out: &Out) -> Result<i32> {
    match cmd {
        SecretCommand::Set(a) => set(state, a, out),
        SecretCommand::Ls(a) => ls(state, a, out),
        SecretCommand::Rm(a) => rm(state, a, out),
    }
}

fn set(state: &StateDir, args: SetArgs, out: &Out) -> Result<i32> {
    let value = match (&args.from_file, &args.from_env) {
        (Some(f), _) => read_value_file(&args.key, f)?,
        (None, Some(var)) => {
            let Some(v) = std::env::var_os(var) else {
                bail!("secret {}: environment variable {var} is not set", args.key);
            };
            let v = Zeroizing::new(v.into_encoded_bytes());
            if v.len() > MAX_VALUE {
                bail!(
                    "secret {} is {} bytes; the limit is {MAX_VALUE}",
                    args.key,
                    v.len()
                );
            }
            v
        }
        (None, None) => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!(
                    "secret {}: give the value with --from-file, --from-env, or on stdin",
                    args.key
                );
            }
            read_value_file(&args.key, std::path::Path::new("-"))?
        }
    };
    // Under the workspace lock: never in the middle of a snapshot, whose
    // memory must not see the value.
    let (ws, _lock, _rec, status) = open(state, &args.name)?;
    SecretStore::of(&ws).set(&args.key, &value)?;
    let delivered = status == Status::Running;
    if delivered {
        deliver_secrets(&ws, false)?;
    }
    out.done(
        &format!(
            "secret {} set in workspace {}{}",
            args.key,
            ws.name,
            if delivered { " (delivered)" } else { "" }
        ),
        json!({"workspace": ws.name, "key": args.key, "delivered": delivered}),
    );
    Ok(0)
}

fn ls(state: &StateDir, args: LsArgs, out: &Out) -> Result<i32> {
    let ws = state.existing(&args.name)?;
    let keys = SecretStore::of(&ws).keys()?;
    if out.json {
        println!("{}", json!({"workspace": ws.name, "keys": keys}));
    } else {
        for k in keys {
            println!("{k}");
        }
    }
    Ok(0)
}

fn rm(state: &StateDir, args: RmArgs, out: &Out) -> Result<i32> {
    let (ws, _lock, _rec, status) = open(state, &args.name)?;
    SecretStore::of(&ws).remove(&args.key)?;
    let scrubbed = status == Status::Running;
    if scrubbed {
        agent_secrets::remove(&ws, std::slice::from_ref(&args.key))?;
    }
    out.done(
        &format!("secret {} removed from workspace {}", args.key, ws.name),
        json!({"workspace": ws.name, "key": args.key, "removed": true, "scrubbed_in_guest": scrubbed}),
    );
    Ok(0)
}
