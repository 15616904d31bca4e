//! Exec sessions: a command in a running workspace through its guest
//! agent, with streamed stdio, signals, window size and exit status. The
//! front end owns the terminal; the engine owns the protocol.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_agent::{
    read_frame, write_frame, write_json, ExecRequest, ExitStatus, Kind, Request, ResizeMsg,
    SignalMsg,
};

use super::{conflict, Context, Engine, IoContext, Result};
use crate::agent::{error_text, AgentConn};
use crate::image::config::RunConfig;
use crate::workspace::state::{reconcile, Status};

/// Exit codes for failures that are not the command's own (as Docker).
pub const EXIT_CANNOT_EXEC: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;
/// The agent connection broke before the command's status arrived (as ssh).
pub const EXIT_LOST: i32 = 255;

/// One thing an exec session produced.
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; the shell-style code (128+N for signal N).
    Exit(i32),
    /// The agent could not run it; the message and the code to exit with.
    Failed(String, i32),
    /// The connection broke before an exit status.
    Lost(String),
}

/// The sending half of a session: stdin, signals, window size. Cloneable
/// across the threads that forward them.
#[derive(Clone)]
pub struct ExecInput(Arc<Mutex<UnixStream>>);

impl ExecInput {
    fn send(&self, f: impl FnOnce(&mut UnixStream) -> std::io::Result<()>) -> bool {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s).is_ok()
    }

    /// Sends stdin bytes; an empty slice is EOF. False once the session is gone.
    pub fn stdin(&self, data: &[u8]) -> bool {
        self.send(|s| write_frame(s, Kind::Stdin, data))
    }

    pub fn signal(&self, signal: i32) -> bool {
        self.send(|s| write_json(s, Kind::Signal, &SignalMsg { signal }))
    }

    pub fn resize(&self, rows: u16, cols: u16) -> bool {
        self.send(|s| write_json(s, Kind::Resize, &ResizeMsg { rows, cols }))
    }
}

/// A running exec session.
pub struct ExecSession {
    stream: UnixStream,
    input: ExecInput,
}

impl ExecSession {
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// The next output, blocking until it comes.
    pub fn next_output(&mut self) -> Output {
        loop {
            let f = match read_frame(&mut self.stream) {
                Ok(f) => f,
                Err(e) => return Output::Lost(e.to_string()),
            };
            return match f.kind {
                Kind::Stdout => Output::Stdout(f.payload),
                Kind::Stderr => Output::Stderr(f.payload),
                Kind::Exit => match f.json::<ExitStatus>() {
                    Ok(s) => Output::Exit(s.shell_code()),
                    Err(e) => Output::Lost(format!("unreadable exit status: {e}")),
                },
                Kind::Error => {
                    let msg = error_text(&f);
                    let code = if msg.ends_with("command not found") {
                        EXIT_NOT_FOUND
                    } else {
                        EXIT_CANNOT_EXEC
                    };
                    Output::Failed(msg, code)
                }
                _ => continue,
            };
        }
    }
}

/// The image's Env, WorkingDir and User are exec's defaults; the request's
/// own env, cwd and user win.
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

impl Engine {
    /// Starts `req` in running workspace `name`.
    pub fn exec(&self, name: &str, mut req: ExecRequest) -> Result<ExecSession> {
        let ws = self.state.existing(name)?;
        let rec = ws.read()?;
        let (status, _) = reconcile(&ws, &rec);
        match status {
            Status::Running => {}
            Status::Paused => {
                return Err(conflict(
                    name,
                    format!("workspace {name} is paused; resume it first"),
                ))
            }
            s => {
                return Err(conflict(
                    name,
                    format!("workspace {name} is {s}; start it first"),
                ))
            }
        }
        if let Some(image) = &rec.image_config {
            apply_image_defaults(&mut req, image);
        }
        let conn = AgentConn::connect_sending(
            &ws.vsock_socket(),
            Duration::from_secs(30),
            &Request::Exec(req),
        )
        .ctx(|| format!("workspace {name}"))?;
        let stream = conn.stream;
        stream
            .set_read_timeout(None)
            .io_ctx(|| "agent connection".into())?;
        let writer = stream.try_clone().io_ctx(|| "agent connection".into())?;
        Ok(ExecSession {
            stream,
            input: ExecInput(Arc::new(Mutex::new(writer))),
        })
    }

    /// Runs `argv` in `cwd` without stdin, streaming its stdout and stderr
    /// into `out` (both), and returns its exit code.
    pub fn exec_to(
        &self,
        name: &str,
        argv: &[String],
        cwd: &str,
        out: &mut dyn Write,
    ) -> Result<i32> {
        let req = ExecRequest {
            argv: argv.to_vec(),
            cwd: Some(cwd.to_string()),
            ..Default::default()
        };
        let mut session = self.exec(name, req)?;
        loop {
            match session.next_output() {
                Output::Stdout(b) | Output::Stderr(b) => {
                    let _ = out.write_all(&b);
                }
                Output::Exit(code) => return Ok(code),
                Output::Failed(msg, code) => {
                    let _ = writeln!(out, "microagent: {msg}");
                    return Ok(code);
                }
                Output::Lost(why) => {
                    let _ = writeln!(out, "microagent: connection to the guest agent lost: {why}");
                    return Ok(EXIT_LOST);
                }
            }
        }
    }
}
