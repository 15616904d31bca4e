//! Command-line front end. Exit codes: 0 success, 1 failure, 2 usage error.

mod vmm_run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "microagent",
    version,
    about = "Linux microVMs on KVM: boot, exec, snapshot, fork"
)]
pub struct Cli {
    /// Machine-readable output (one JSON document on stdout).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Low-level VMM commands (used by the workspace commands and tests).
    #[command(hide = true, subcommand)]
    Vmm(VmmCommand),
}

#[derive(Subcommand)]
enum VmmCommand {
    /// Boot a kernel in the foreground until the guest powers off.
    Run(vmm_run::RunArgs),
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;

pub fn run() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vmm(VmmCommand::Run(args)) => vmm_run::run(args, cli.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("microagent: {e:#}");
            }
            EXIT_FAILURE
        }
    }
}
