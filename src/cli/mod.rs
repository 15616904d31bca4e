//! Command-line front end.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (including a
//! destructive command without --yes and no terminal to ask on); `exec`
//! passes the guest command's own status through.

mod cache;
mod checkpoint;
mod confirm;
mod cp;
mod create;
mod exec;
mod image;
mod inspect;
mod lifecycle;
mod output;
mod secret;
mod snapshot;
mod stop;
mod vmm_run;
mod vmm_serve;
mod warm;

use clap::{Parser, Subcommand};

use crate::workspace::store::StateDir;
use output::Out;

#[derive(Parser)]
#[command(
    name = "microagent",
    version,
    about = "Linux microVMs on KVM: boot, exec, snapshot, fork"
)]
pub struct Cli {
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No output on success.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a workspace (its own copy of a root disk, not started).
    Create(create::CreateArgs),
    /// Start a workspace's VM in a detached VMM process; returns once the
    /// guest agent answers.
    Start(lifecycle::StartArgs),
    /// Pause a running workspace's vCPUs.
    Pause(lifecycle::NameArgs),
    /// Resume a paused workspace.
    Resume(lifecycle::NameArgs),
    /// Stop a workspace's VM (forced after --timeout).
    Halt(stop::HaltArgs),
    /// Delete a workspace with its disk and snapshots.
    Delete(stop::DeleteArgs),
    /// List workspaces.
    #[command(alias = "ls")]
    List(inspect::ListArgs),
    /// Show one workspace.
    Status(lifecycle::NameArgs),
    /// Print a workspace's serial console.
    Logs(inspect::LogsArgs),
    /// Run a command in a running workspace (exit status passes through).
    Exec(exec::ExecArgs),
    /// Interactive shell in a running workspace.
    Shell(exec::ShellArgs),
    /// Copy between host and workspace: cp SRC NAME:DIR | cp NAME:PATH DIR
    Cp(cp::CpArgs),
    /// OCI images: pull, import, ls, rm.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Snapshots: create, list, delete (restore: start --from-snapshot;
    /// fork: create --from-snapshot).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Boot snapshots that first starts resume instead of booting: ls, prune.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Run a setup once per set of inputs and fork from its snapshot:
    /// checkpoint NAME --image REF [--file F]… [--fork NEW] -- COMMAND…
    Checkpoint(checkpoint::CheckpointArgs),
    /// Secrets delivered to /run/secrets: set, ls, rm.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Low-level VMM commands (used by the workspace commands and tests).
    #[command(hide = true, subcommand)]
    Vmm(VmmCommand),
}

#[derive(Subcommand)]
enum VmmCommand {
    /// Boot a kernel in the foreground until the guest powers off.
    Run(vmm_run::RunArgs),
    /// Run and watch a workspace's VMM (spawned by `start`).
    Supervise(vmm_serve::ServeArgs),
    /// Boot a workspace's VM and serve its control socket.
    Serve(vmm_serve::ServeArgs),
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

pub fn run() -> i32 {
    let cli = Cli::parse();
    let out = Out {
        json: cli.json,
        quiet: cli.quiet,
    };
    let state = StateDir::from_env();
    let result = match cli.command {
        Command::Create(a) => create::create(&state, a, &out),
        Command::Start(a) => lifecycle::start(&state, a, &out),
        Command::Pause(a) => lifecycle::pause(&state, a, &out),
        Command::Resume(a) => lifecycle::resume(&state, a, &out),
        Command::Halt(a) => stop::halt(&state, a, &out),
        Command::Delete(a) => stop::delete(&state, a, &out),
        Command::List(a) => inspect::list(&state, a, &out),
        Command::Status(a) => inspect::status(&state, a, &out),
        Command::Logs(a) => inspect::logs(&state, a),
        Command::Exec(a) => exec::exec(&state, a),
        Command::Shell(a) => exec::shell(&state, a),
        Command::Cp(a) => cp::cp(&state, a, &out),
        Command::Image(c) => image::run(&state, c, &out),
        Command::Snapshot(c) => snapshot::run(&state, c, &out),
        Command::Secret(c) => secret::run(&state, c, &out),
        Command::Cache(c) => cache::run(&state, c, &out),
        Command::Checkpoint(a) => checkpoint::checkpoint(&state, a, &out),
        Command::Vmm(VmmCommand::Run(a)) => vmm_run::run(a, cli.json),
        Command::Vmm(VmmCommand::Supervise(a)) => vmm_serve::supervise(a),
        Command::Vmm(VmmCommand::Serve(a)) => vmm_serve::serve(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                let mut v = serde_json::json!({ "error": format!("{e:#}") });
                if let Some(leak) = e
                    .chain()
                    .find_map(|c| c.downcast_ref::<snapshot::SecretLeak>())
                {
                    v["secret_key"] = leak.key.clone().into();
                    v["file"] = leak.file.clone().into();
                }
                println!("{v}");
            }
            eprintln!("microagent: {e:#}");
            if e.downcast_ref::<confirm::NeedsConfirmation>().is_some() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            }
        }
    }
}
