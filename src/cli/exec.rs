//! `exec` and `shell`: run a command in a workspace through its guest agent.
//! stdout/stderr stream separately as they come; stdin is forwarded with
//! -i (EOF included); the guest's exit status becomes ours (128+N for a
//! death by signal N); SIGINT/SIGTERM/SIGHUP/SIGQUIT are forwarded to the
//! guest process; -t gives it a pty that follows our window size.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use guest_agent::{
    read_frame, write_frame, write_json, ExecRequest, ExitStatus, Kind, Request, ResizeMsg,
    SignalMsg, CHUNK,
};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios;

use crate::agent::{error_text, AgentConn};
use crate::image::config::RunConfig;
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::StateDir;

/// Exit codes for failures that are not the command's own (as Docker).
const EXIT_CANNOT_EXEC: i32 = 126;
const EXIT_NOT_FOUND: i32 = 127;
/// The agent connection broke before the command's status arrived (as ssh).
const EXIT_LOST: i32 = 255;

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

pub fn exec(state: &StateDir, args: ExecArgs) -> Result<i32> {
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
    run(state, &args.name, req)
}

pub fn shell(state: &StateDir, args: ShellArgs) -> Result<i32> {
    let req = ExecRequest {
        argv: vec![args.shell],
        tty: is_tty(libc::STDIN_FILENO),
        stdin: true,
        ..Default::default()
    };
    run(state, &args.name, req)
}

/// The image's Env, WorkingDir and User are exec's defaults; the command
/// line's -e, -w and -u win.
fn apply_image_defaults(req: &mut ExecRequest, image: &RunConfig) {
    let mut env: Vec<(String, String)> = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| !req.env.iter().any(|(rk, _)| rk == k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.append(&mut req.env);
    req.env = env;
    if req.cwd.is_none() {
        req.cwd = image.working_dir.clone();
    }
    if req.user.is_none() {
        req.user = image.user.clone();
    }
}

fn run(state: &StateDir, name: &str, mut req: ExecRequest) -> Result<i32> {
    let ws = state.existing(name)?;
    let rec = ws.read()?;
    let (status, _) = reconcile(&ws, &rec);
    match status {
        Status::Running => {}
        Status::Paused => bail!("workspace {name} is paused; resume it first"),
        s => bail!("workspace {name} is {s}; start it first"),
    }
    if let Some(image) = &rec.image_config {
        apply_image_defaults(&mut req, image);
    }
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

    let conn = AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(30))
        .with_context(|| format!("workspace {name}"))?;
    let mut stream = conn.stream;
    stream.set_read_timeout(None)?;
    let tty = req.tty;
    let interactive = req.stdin;
    write_json(&mut stream, Kind::Request, &Request::Exec(req))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));

    let _raw = RawMode::enter(tty && is_tty(libc::STDIN_FILENO));
    if interactive {
        let w = writer.clone();
        std::thread::spawn(move || forward_stdin(w));
    }
    {
        let w = writer.clone();
        std::thread::spawn(move || forward_signals(forwarded, w, tty));
    }
    Ok(receive(&mut stream))
}

fn send(w: &Mutex<UnixStream>, kind: Kind, payload: &[u8]) -> bool {
    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *s, kind, payload).is_ok()
}

fn forward_stdin(w: Arc<Mutex<UnixStream>>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // An empty STDIN frame is EOF.
                send(&w, Kind::Stdin, &[]);
                return;
            }
            Ok(n) => {
                if !send(&w, Kind::Stdin, &buf[..n]) {
                    return;
                }
            }
        }
    }
}

fn forward_signals(set: SigSet, w: Arc<Mutex<UnixStream>>, tty: bool) {
    while let Ok(sig) = set.wait() {
        let ok = if sig == Signal::SIGWINCH {
            match window_size() {
                Some((rows, cols)) if tty => {
                    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
                    write_json(&mut *s, Kind::Resize, &ResizeMsg { rows, cols }).is_ok()
                }
                _ => true,
            }
        } else {
            let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
            write_json(&mut *s, Kind::Signal, &SignalMsg { signal: sig as i32 }).is_ok()
        };
        if !ok {
            return;
        }
    }
}

/// Streams output until EXIT; returns the exit code to use.
fn receive(stream: &mut UnixStream) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    loop {
        let f = match read_frame(stream) {
            Ok(f) => f,
            Err(e) => {
                let _ = out.flush();
                eprintln!("microagent: connection to the guest agent lost: {e}");
                return EXIT_LOST;
            }
        };
        match f.kind {
            Kind::Stdout => {
                // A closed stdout (e.g. `| head`) must not stop the session.
                let _ = out.write_all(&f.payload);
                let _ = out.flush();
            }
            Kind::Stderr => {
                let _ = err.write_all(&f.payload);
            }
            Kind::Exit => {
                let _ = out.flush();
                return match f.json::<ExitStatus>() {
                    Ok(s) => s.shell_code(),
                    Err(_) => EXIT_LOST,
                };
            }
            Kind::Error => {
                let msg = error_text(&f);
                eprintln!("microagent: {msg}");
                return if msg.ends_with("command not found") {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_CANNOT_EXEC
                };
            }
            _ => {}
        }
    }
}
