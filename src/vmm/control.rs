//! The VMM's control socket (`<workspace>/control.sock`): JSON lines, one
//! request and one response per line, versioned, with a bounded request size.
//!
//! Request:  {"v":2,"op":"status"|"pause"|"resume"|"halt"|"snapshot"|"freeze_disk"}
//! Response: {"v":2,"ok":true,"state":"running"|"paused","pid":N,...}
//!           {"v":2,"ok":false,"error":"..."}
//!
//! No request names a path: a snapshot is written into a staging directory
//! the VMM makes itself under the snapshots directory it was started with
//! (its own workspace's), with files created `O_EXCL | O_NOFOLLOW`, and the
//! reply names that directory. Unknown fields are refused, so an old client
//! asking to write elsewhere gets an error and nothing is written.
//! Pause, resume and snapshot are serialised: a resume sent while a
//! snapshot is being written waits for it. Status and halt are answered at
//! once (halt ends whatever runs).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::seccomp::{confine, ThreadKind};
use super::vm::{RunState, VmHandle};
use crate::snapshot::cpuid::CpuidLeaf;
use crate::snapshot::manifest::valid_memory_id;
use crate::vmm::snapshot::MemoryIds;

mod staging;

pub const PROTOCOL_VERSION: u32 = 2;
/// Requests are tiny; anything longer is refused without being buffered.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Staging directories of snapshots start with this (under the snapshots
/// directory); a leftover one is removed by the next snapshot.
pub const STAGING_PREFIX: &str = ".vmm-staging-";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Status,
    Pause,
    Resume,
    Halt,
    /// Save the VM (vmstate.bin, memory.bin and the root disk as
    /// rootfs.ext4, copied while memory is written) into a new staging
    /// directory and leave it paused; the client moves the directory,
    /// resumes the VM if it wants, then syncs the files. Nothing is synced
    /// yet.
    Snapshot,
    /// Freeze the root disk's chain as a snapshot does, without memory:
    /// the frozen chain is described in a new staging directory's `disk/`
    /// (named in the reply; the client links its files), the guest paused only meanwhile. For
    /// `commit`, which reads the frozen upper while the guest runs on.
    FreezeDisk,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub op: Op,
    /// Snapshot only: the id of the memory layer it writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_id: Option<String>,
    /// Snapshot only: the layer it may write a diff over (see `MemoryIds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_parent: Option<String>,
    /// Snapshot only: copy memory while the guest runs, pause only for the
    /// last dirty pages and the devices, and resume at the end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Snapshot only: the state the VM was in before (running or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was: Option<String>,
    /// Status only, with a NIC: "up", or "down: why" once passt is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Snapshot only: the staging directory's name (one path component,
    /// under the snapshots directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    /// Snapshot only: the guest's TSC rate, which a restore must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u32>,
    /// Snapshot only: vCPU 0's CPUID as the guest saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpuid: Option<Vec<CpuidLeaf>>,
    /// Snapshot only: the ids of its memory layers, bottom first, its own
    /// last (one: written whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_layers: Option<Vec<String>>,
    /// Live snapshot only: the VM resumed itself after this long paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_us: Option<u64>,
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
            ..Default::default()
        }
    }

    fn err(msg: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
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
    /// Where snapshots are staged: fixed when the VMM starts, from its own
    /// workspace directory, never from a request.
    pub snapshots_dir: PathBuf,
    /// The guest's TSC rate (vCPU 0), reported with each snapshot.
    pub tsc_khz: Option<u32>,
}

/// Serialises the operations that change the VM's run state.
struct Server {
    vm: VmHandle,
    info: ServeInfo,
    ops: Mutex<()>,
    staged: AtomicU32,
}

fn handle(server: &Server, req: &Request) -> Response {
    let vm = &server.vm;
    match req.op {
        Op::Status => {
            let mut r = Response::ok(vm.state());
            r.network = vm.network().map(|n| match n {
                Ok(()) => "up".to_string(),
                Err(why) => format!("down: {why}"),
            });
            r
        }
        Op::Halt => {
            vm.halt("halted by request");
            Response::ok(vm.state())
        }
        Op::Snapshot | Op::FreezeDisk | Op::Pause | Op::Resume => {
            let _serial = server.ops.lock().unwrap_or_else(|p| p.into_inner());
            match req.op {
                Op::Snapshot => staging::save(server, req),
                Op::FreezeDisk => staging::freeze_staged(server),
                Op::Pause => match vm.pause() {
                    Ok(()) => Response::ok(RunState::Paused),
                    Err(e) => Response::err(format!("pause failed: {e}")),
                },
                _ => {
                    vm.resume();
                    Response::ok(RunState::Running)
                }
            }
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

fn serve_connection(server: &Server, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let resp = match read_line(&mut reader) {
            Ok(None) => return,
            Ok(Some(line)) => match parse_request(&line) {
                Ok(req) => handle(server, &req),
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
        .unwrap_or_else(|_| r#"{"v":2,"ok":false,"error":"encoding"}"#.into())
}

/// Binds the control socket, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serves the control socket `listener` on a thread.
pub fn spawn_server(listener: UnixListener, vm: VmHandle, info: ServeInfo) -> std::io::Result<()> {
    let server = Arc::new(Server {
        vm,
        info,
        ops: Mutex::new(()),
        staged: AtomicU32::new(0),
    });
    let (confined_tx, confined) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // Client threads inherit this filter.
            let result = confine(ThreadKind::Control);
            let ok = result.is_ok();
            let _ = confined_tx.send(result);
            if !ok {
                return;
            }
            for stream in listener.incoming().flatten() {
                if !crate::util::peer::trusted(&stream) {
                    continue; // Dropping it closes it.
                }
                let server = server.clone();
                // One thread per client: a slow client cannot block `halt`.
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(&server, stream));
            }
        })?;
    match confined.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other("the control thread ended at start")),
    }
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
            memory_id: None,
            memory_parent: None,
            live: false,
        },
        timeout,
    )
}

/// What a snapshot request produced.
#[derive(Debug, Clone)]
pub struct SnapshotReply {
    /// The staging directory's name under the workspace's snapshots directory.
    pub staging: String,
    pub was_running: bool,
    pub tsc_khz: Option<u32>,
    pub guest_cpuid: Vec<CpuidLeaf>,
    /// Memory layer ids, bottom first, the snapshot's own last.
    pub memory_layers: Vec<String>,
    /// Live: the VM resumed itself after this long paused.
    pub paused: Option<Duration>,
}

/// Asks the VMM to save the VM; it stays paused (see [`Op::Snapshot`]),
/// unless `live`.
pub fn snapshot(
    path: &Path,
    ids: &MemoryIds,
    live: bool,
    timeout: Duration,
) -> Result<SnapshotReply, ClientError> {
    let req = Request {
        v: PROTOCOL_VERSION,
        op: Op::Snapshot,
        memory_id: Some(ids.id.clone()),
        memory_parent: ids.parent.clone(),
        live,
    };
    let resp = request_with(path, req, timeout)?;
    let staging = staging_of(path, resp.staging.clone())?;
    let layers = resp.memory_layers.clone().unwrap_or_default();
    if layers.last() != Some(&ids.id) || layers.iter().any(|l| !valid_memory_id(l)) {
        return Err(ClientError::Protocol {
            path: path.display().to_string(),
            reason: "the reply's memory layers do not end with the requested id".into(),
        });
    }
    Ok(SnapshotReply {
        staging,
        was_running: resp.was.as_deref() == Some("running"),
        tsc_khz: resp.tsc_khz,
        guest_cpuid: resp.guest_cpuid.unwrap_or_default(),
        memory_layers: layers,
        paused: resp.paused_us.map(Duration::from_micros),
    })
}

/// The staging directory a reply names: one component with our prefix.
fn staging_of(path: &Path, staging: Option<String>) -> Result<String, ClientError> {
    staging
        .filter(|s| s.starts_with(STAGING_PREFIX) && !s.contains('/') && !s.contains(".."))
        .ok_or_else(|| ClientError::Protocol {
            path: path.display().to_string(),
            reason: "the reply names no valid staging directory".into(),
        })
}

/// Asks the VMM to freeze its root disk's chain (see [`Op::FreezeDisk`]);
/// returns the staging directory's name under the snapshots directory.
pub fn freeze_disk(path: &Path, timeout: Duration) -> Result<String, ClientError> {
    let resp = request(path, Op::FreezeDisk, timeout)?;
    staging_of(path, resp.staging)
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
            parse_request(br#"{"v":2,"op":"pause"}"#).unwrap().op,
            Op::Pause
        );
        assert!(parse_request(br#"{"v":1,"op":"pause"}"#)
            .unwrap_err()
            .contains("version 1"));
        // No request names a path: such a field is refused outright.
        let e = parse_request(br#"{"v":2,"op":"snapshot","dir":"/tmp/x"}"#).unwrap_err();
        assert!(e.contains("unknown field") && e.contains("dir"), "{e}");
        assert!(parse_request(br#"{"v":2,"op":"explode"}"#)
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
