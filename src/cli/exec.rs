//! `exec` and `shell`: run a command in a workspace through its guest agent.
//! stdout/stderr stream separately as they come; stdin is forwarded with
//! -i (EOF included); the guest's exit status becomes ours (128+N for a
//! death by signal N); SIGINT/SIGTERM/SIGHUP/SIGQUIT are forwarded to the
//! guest process; -t gives it a pty that follows our window size.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use clap::Args;
use guest_agent::{ExecRequest, CHUNK};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios;

use crate::engine::exec::{ExecInput, ExecSession, Output, EXIT_LOST};
use crate::engine::Engine;

#[derive(Args)]
pub struct ExecArgs {
    name: String,
    /// Forward stdin to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a pseudo-terminal.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the guest.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (name or uid) to run as.
    #[arg(short, long)]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct ShellArgs {
    name: String,
    /// Shell to run.
    #[arg(long, default_value = "/bin/sh")]
    shell: String,
}

/// Restores the terminal when dropped.
struct RawMode(Option<termios::Termios>);

impl RawMode {
    fn enter(on: bool) -> RawMode {
        if !on {
            return RawMode(None);
        }
        let stdin = std::io::stdin();
        let Ok(orig) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSANOW, orig);
        }
    }
}

fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

fn parse_env(kv: &[String]) -> Result<Vec<(String, String)>> {
    kv.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("invalid --env {s:?}: expected KEY=VALUE"),
        })
        .collect()
}

pub fn exec(engine: &Engine, args: ExecArgs) -> Result<i32> {
    let req = ExecRequest {
        argv: args.command.clone(),
        env: parse_env(&args.env)?,
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        stdin: args.interactive,
        rows: 0,
        cols: 0,
    };
    run(engine, &args.name, req)
}

pub fn shell(engine: &Engine, args: ShellArgs) -> Result<i32> {
    let req = ExecRequest {
        argv: vec![args.shell],
        tty: is_tty(libc::STDIN_FILENO),
        stdin: true,
        ..Default::default()
    };
    run(engine, &args.name, req)
}

fn run(engine: &Engine, name: &str, mut req: ExecRequest) -> Result<i32> {
    if req.tty {
        if let Some((rows, cols)) = window_size() {
            req.rows = rows;
            req.cols = cols;
        }
    }
    // Signals are taken by one thread and forwarded, never delivered.
    let mut forwarded = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGWINCH,
    ] {
        forwarded.add(s);
    }
    forwarded.thread_block().context("blocking signals")?;
    let tty = req.tty;
    let interactive = req.stdin;
    let mut session = engine.exec(name, req)?;
    let _raw = RawMode::enter(tty && is_tty(libc::STDIN_FILENO));
    if interactive {
        let input = session.input();
        std::thread::spawn(move || forward_stdin(input));
    }
    {
        let input = session.input();
        std::thread::spawn(move || forward_signals(forwarded, input, tty));
    }
    Ok(receive(&mut session))
}

fn forward_stdin(input: ExecInput) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                input.stdin(&[]);
                return;
            }
            Ok(n) => {
                if !input.stdin(&buf[..n]) {
                    return;
                }
            }
        }
    }
}

fn forward_signals(set: SigSet, input: ExecInput, tty: bool) {
    while let Ok(sig) = set.wait() {
        let ok = if sig == Signal::SIGWINCH {
            match window_size() {
                Some((rows, cols)) if tty => input.resize(rows, cols),
                _ => true,
            }
        } else {
            input.signal(sig as i32)
        };
        if !ok {
            return;
        }
    }
}

/// Streams output until the command ends; returns the exit code to use.
fn receive(session: &mut ExecSession) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    loop {
        match session.next_output() {
            Output::Stdout(b) => {
                // A closed stdout (e.g. `| head`) must not stop the session.
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Output::Stderr(b) => {
                let _ = err.write_all(&b);
            }
            Output::Exit(code) => {
                let _ = out.flush();
                return code;
            }
            Output::Failed(msg, code) => {
                let _ = out.flush();
                eprintln!("microagent: {msg}");
                return code;
            }
            Output::Lost(why) => {
                let _ = out.flush();
                eprintln!("microagent: connection to the guest agent lost: {why}");
                return EXIT_LOST;
            }
        }
    }
}
