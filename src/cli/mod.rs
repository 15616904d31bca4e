//! Command-line front end.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (including a
//! destructive command without --yes and no terminal to ask on); `exec`
//! passes the guest command's own status through.

mod apply;
mod cache;
mod checkpoint;
mod commit;
mod confirm;
mod cp;
mod create;
mod exec;
mod image;
mod inspect;
mod lifecycle;
mod named_snapshot;
mod output;
mod secret;
mod serve;
mod snapshot;
mod stop;
mod vmm_run;
mod vmm_serve;
mod volume;

use clap::{Parser, Subcommand};

use crate::engine::{Code, Engine};
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
    /// Create a workspace (its own copy of a root disk, not started), or
    /// with -f every workspace of a definition file (started).
    Create(create::CreateArgs),
    /// Make the workspaces of a definition file exist and run: equal ones
    /// are left alone, changed ones refused naming what changed.
    Apply(apply::ApplyArgs),
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
    /// Change a workspace's settings (automatic snapshots on halt).
    Update(lifecycle::UpdateArgs),
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
    /// Save a workspace's changes as a new image: its image's layers plus
    /// one (commit NAME [REF]).
    Commit(commit::CommitArgs),
    /// List what changed in a workspace against its image (A, C, D).
    Diff(commit::DiffArgs),
    /// Serve the HTTP API (docs/openapi.json) until SIGTERM; workspaces
    /// keep running when it stops.
    Serve(serve::ServeArgs),
    /// Secrets delivered to /run/secrets: set, ls, rm.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Volumes: disks that outlive workspaces (create -v VOL:/PATH):
    /// create, ls, inspect, rm, snapshot, revert, rm-snapshot.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
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
    let out = Out::new(cli.json, cli.quiet);
    let engine = Engine::from_env();
    let result = match cli.command {
        Command::Create(a) => create::create(&engine, a, &out),
        Command::Apply(a) => apply::apply(&engine, a, &out),
        Command::Start(a) => lifecycle::start(&engine, a, &out),
        Command::Pause(a) => lifecycle::pause(&engine, a, &out),
        Command::Resume(a) => lifecycle::resume(&engine, a, &out),
        Command::Halt(a) => stop::halt(&engine, a, &out),
        Command::Delete(a) => stop::delete(&engine, a, &out),
        Command::List(a) => inspect::list(&engine, a, &out),
        Command::Status(a) => inspect::status(&engine, a, &out),
        Command::Update(a) => lifecycle::update(&engine, a, &out),
        Command::Logs(a) => inspect::logs(&engine, a),
        Command::Exec(a) => exec::exec(&engine, a),
        Command::Shell(a) => exec::shell(&engine, a),
        Command::Cp(a) => cp::cp(&engine, a, &out),
        Command::Image(c) => image::run(&engine, c, &out),
        Command::Snapshot(c) => snapshot::run(&engine, c, &out),
        Command::Secret(c) => secret::run(&engine, c, &out),
        Command::Volume(c) => volume::run(&engine, c, &out),
        Command::Cache(c) => cache::run(&engine, c, &out),
        Command::Checkpoint(a) => checkpoint::checkpoint(&engine, a, &out),
        Command::Commit(a) => commit::commit(&engine, a, &out),
        Command::Diff(a) => commit::diff(&engine, a, &out),
        Command::Serve(a) => serve::serve(engine, a),
        Command::Vmm(VmmCommand::Run(a)) => vmm_run::run(a, cli.json),
        Command::Vmm(VmmCommand::Supervise(a)) => vmm_serve::supervise(a),
        Command::Vmm(VmmCommand::Serve(a)) => vmm_serve::serve(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e, cli.json),
    }
}

/// Prints a failure (as the documented error body with --json) and picks
/// the exit code: 2 for a missing confirmation, a failed checkpoint
/// setup's own status, else 1.
fn fail(e: &anyhow::Error, json: bool) -> i32 {
    let engine_error = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::engine::Error>());
    let message = message(e);
    if json {
        let body = match engine_error {
            // Context added by the front end stays in the message.
            Some(err) => {
                let mut v = err.to_json();
                v["error"]["message"] = message.clone().into();
                v
            }
            None => serde_json::json!({"error": {
                "code": Code::InvalidInput.as_str(),
                "message": message,
            }}),
        };
        println!("{body}");
    }
    eprintln!("microagent: {message}");
    match engine_error.map(|err| (err.code(), err.root())) {
        Some((Code::ConfirmationRequired, _)) => EXIT_USAGE,
        Some((_, crate::engine::Error::SetupFailed { exit_code, .. })) if *exit_code != 0 => {
            *exit_code
        }
        _ => EXIT_FAILURE,
    }
}

/// The error and its causes in one line. Most of our errors already name
/// their cause in their own message; a cause is added only when it is not
/// there yet, so nothing is said twice.
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::message;
    use crate::engine::{Context, Error, IoContext};

    #[test]
    fn messages_name_each_cause_once() {
        let io: Result<(), std::io::Error> = Err(std::io::Error::other("disk on fire"));
        let e: Result<(), Error> = io.io_ctx(|| "copying vda".into());
        let e = e.ctx(|| "snapshot t of workspace w".into()).unwrap_err();
        let e = anyhow::Error::from(e).context("front end");
        assert_eq!(
            message(&e),
            "front end: snapshot t of workspace w: copying vda: disk on fire"
        );
    }
}
