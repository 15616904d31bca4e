//! The VMM's control socket (`<workspace>/control.sock`): JSON lines, one
//! request and one response per line, versioned, with a bounded request size.
//!
//! Request:  {"v":1,"op":"status"|"pause"|"resume"|"halt"}
//! Response: {"v":1,"ok":true,"state":"running"|"paused","pid":N}
//!           {"v":1,"ok":false,"error":"..."}

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::vm::{RunState, VmHandle};
use crate::snapshot::manifest::{MEMORY, ROOTFS, VMSTATE};
use crate::workspace::disk::{copy_disk_with, Sync};

pub const PROTOCOL_VERSION: u32 = 1;
/// Requests are tiny; anything longer is refused without being buffered.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Status,
    Pause,
    Resume,
    Halt,
    /// Save the VM into `dir` (vmstate.bin, memory.bin, and with
    /// `with_disk` the root disk as rootfs.ext4, copied while memory is
    /// written) and leave it paused; the client resumes it if it wants,
    /// then syncs the files. Nothing in `dir` is synced yet.
    Snapshot,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub op: Op,
    /// Snapshot only: directory to write into (must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Snapshot only: copy the root disk too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub with_disk: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Snapshot only: the state the VM was in before (running or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was: Option<String>,
    /// Status only, with a NIC: "up", or "down: why" once passt is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl Response {
    fn ok(state: RunState) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            state: Some(
                match state {
                    RunState::Running => "running",
                    RunState::Paused => "paused",
                }
                .into(),
            ),
            pid: Some(std::process::id()),
            error: None,
            was: None,
            network: None,
        }
    }

    fn err(msg: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            state: None,
            pid: None,
            error: Some(msg.into()),
            was: None,
            network: None,
        }
    }
}

/// Parses one request line; errors are phrased for the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let req: Request =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    if req.v != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported control protocol version {} (this VMM speaks {PROTOCOL_VERSION})",
            req.v
        ));
    }
    Ok(req)
}

/// What the VMM knows that a snapshot records beyond the VM itself.
#[derive(Clone)]
pub struct ServeInfo {
    pub cmdline: String,
    pub mem_mib: u64,
    /// The disk a snapshot `with_disk` copies (the workspace's root disk).
    pub root_disk: Option<PathBuf>,
}

fn snapshot(vm: &VmHandle, info: &ServeInfo, req: &Request) -> Response {
    let Some(dir) = req
        .dir
        .as_deref()
        .map(std::path::Path::new)
        .filter(|d| d.is_dir())
    else {
        return Response::err("snapshot needs an existing directory");
    };
    let disk = match (req.with_disk, &info.root_disk) {
        (false, _) => None,
        (true, Some(d)) => Some(d),
        (true, None) => return Response::err("snapshot with_disk: this VM has no root disk"),
    };
    let copy_disk = || match disk {
        Some(src) => copy_disk_with(src, &dir.join(ROOTFS), Sync::Deferred)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let was = vm.state();
    let result = vm
        .save(&dir.join(MEMORY), &info.cmdline, info.mem_mib, copy_disk)
        .and_then(|snap| crate::snapshot::format::encode(&snap).map_err(|e| e.to_string()))
        .and_then(|bytes| {
            crate::workspace::store::write_atomic(&dir.join(VMSTATE), &bytes)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => {
            let mut r = Response::ok(RunState::Paused);
            r.was = Some(
                if was == RunState::Paused {
                    "paused"
                } else {
                    "running"
                }
                .into(),
            );
            r
        }
        Err(e) => {
            if was == RunState::Running {
                vm.resume();
            }
            Response::err(format!("snapshot failed: {e}"))
        }
    }
}

fn handle(vm: &VmHandle, info: &ServeInfo, req: &Request) -> Response {
    match req.op {
        Op::Snapshot => snapshot(vm, info, req),
        Op::Status => {
            let mut r = Response::ok(vm.state());
            r.network = vm.network().map(|n| match n {
                Ok(()) => "up".to_string(),
                Err(why) => format!("down: {why}"),
            });
            r
        }
        Op::Pause => match vm.pause() {
            Ok(()) => Response::ok(RunState::Paused),
            Err(e) => Response::err(format!("pause failed: {e}")),
        },
        Op::Resume => {
            vm.resume();
            Response::ok(RunState::Running)
        }
        Op::Halt => {
            vm.halt("halted by request");
            Response::ok(vm.state())
        }
    }
}

/// Reads one line of at most MAX_LINE_BYTES; None at EOF.
fn read_line(reader: &mut BufReader<UnixStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("request longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(Some(line))
}

fn serve_connection(vm: &VmHandle, info: &ServeInfo, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let resp = match read_line(&mut reader) {
            Ok(None) => return,
            Ok(Some(line)) => match parse_request(&line) {
                Ok(req) => handle(vm, info, &req),
                Err(e) => Response::err(e),
            },
            Err(e) => {
                // Oversized or unreadable: answer once and drop the client.
                let _ = writeln!(writer, "{}", json_line(&Response::err(e.to_string())));
                return;
            }
        };
        if writeln!(writer, "{}", json_line(&resp)).is_err() {
            return;
        }
    }
}

fn json_line(resp: &Response) -> String {
    serde_json::to_string(resp)
        .unwrap_or_else(|_| r#"{"v":1,"ok":false,"error":"encoding"}"#.into())
}

/// Binds the socket (replacing a stale one) and serves it on a thread.
pub fn spawn_server(path: &Path, vm: VmHandle, info: ServeInfo) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let (vm, info) = (vm.clone(), info.clone());
                // One thread per client: a slow client cannot block `halt`.
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(&vm, &info, stream));
            }
        })?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("VMM control socket {path} is not answering: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("VMM control socket {path}: {reason}")]
    Protocol { path: String, reason: String },
    #[error("VMM refused {op:?}: {error}")]
    Refused { op: Op, error: String },
}

/// Sends one request and returns the VMM's answer.
pub fn request(path: &Path, op: Op, timeout: Duration) -> Result<Response, ClientError> {
    request_with(
        path,
        Request {
            v: PROTOCOL_VERSION,
            op,
            dir: None,
            with_disk: false,
        },
        timeout,
    )
}

pub fn request_with(path: &Path, req: Request, timeout: Duration) -> Result<Response, ClientError> {
    let op = req.op;
    let p = || path.display().to_string();
    let stream =
        UnixStream::connect(path).map_err(|source| ClientError::Connect { path: p(), source })?;
    let proto = |reason: String| ClientError::Protocol { path: p(), reason };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| proto(e.to_string()))?;
    let mut w = stream.try_clone().map_err(|e| proto(e.to_string()))?;
    let line = serde_json::to_string(&req).map_err(|e| proto(e.to_string()))?;
    writeln!(w, "{line}").map_err(|e| proto(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let answer = read_line(&mut reader)
        .map_err(|e| proto(e.to_string()))?
        .ok_or_else(|| proto("closed without answering".into()))?;
    let resp: Response =
        serde_json::from_slice(&answer).map_err(|e| proto(format!("bad answer: {e}")))?;
    if !resp.ok {
        return Err(ClientError::Refused {
            op,
            error: resp.error.unwrap_or_default(),
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_versioned_and_validated() {
        assert_eq!(
            parse_request(br#"{"v":1,"op":"pause"}"#).unwrap().op,
            Op::Pause
        );
        assert!(parse_request(br#"{"v":2,"op":"pause"}"#)
            .unwrap_err()
            .contains("version 2"));
        assert!(parse_request(br#"{"v":1,"op":"explode"}"#)
            .unwrap_err()
            .contains("malformed"));
        assert!(parse_request(b"\xff\xfe")
            .unwrap_err()
            .contains("malformed"));
        assert!(parse_request(br#"{"op":"status"}"#).is_err());
    }

    #[test]
    fn oversized_lines_are_refused_without_buffering_them() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            let _ = a.write_all(&vec![b'x'; MAX_LINE_BYTES * 4]);
        });
        let mut reader = BufReader::new(b);
        let err = read_line(&mut reader).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        drop(reader);
        let _ = writer.join();
    }
}
