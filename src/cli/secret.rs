//! `secret set|ls|rm`: a workspace's secrets. Values come from a file, an
//! environment variable or stdin, never from the command line, and are
//! never printed. A running workspace gets the change at once.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::output::Out;
use crate::engine::Engine;
use crate::workspace::secrets::{read_value_file, MAX_VALUE};

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

pub fn run(engine: &Engine, cmd: SecretCommand, out: &Out) -> Result<i32> {
    match cmd {
        SecretCommand::Set(a) => set(engine, a, out),
        SecretCommand::Ls(a) => ls(engine, a, out),
        SecretCommand::Rm(a) => rm(engine, a, out),
    }
}

fn set(engine: &Engine, args: SetArgs, out: &Out) -> Result<i32> {
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
    let delivered = engine.secret_set(&args.name, &args.key, &value)?;
    out.done(
        &format!(
            "secret {} set in workspace {}{}",
            args.key,
            args.name,
            if delivered { " (delivered)" } else { "" }
        ),
        json!({"workspace": args.name, "key": args.key, "delivered": delivered}),
    );
    Ok(0)
}

fn ls(engine: &Engine, args: LsArgs, out: &Out) -> Result<i32> {
    let keys = engine.secret_keys(&args.name)?;
    if out.json {
        println!("{}", json!({"workspace": args.name, "keys": keys}));
    } else {
        for k in keys {
            println!("{k}");
        }
    }
    Ok(0)
}

fn rm(engine: &Engine, args: RmArgs, out: &Out) -> Result<i32> {
    let scrubbed = engine.secret_remove(&args.name, &args.key)?;
    out.done(
        &format!("secret {} removed from workspace {}", args.key, args.name),
        json!({"workspace": args.name, "key": args.key, "removed": true, "scrubbed_in_guest": scrubbed}),
    );
    Ok(0)
}
