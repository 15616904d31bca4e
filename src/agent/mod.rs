//! Host-side client of the guest agent: reach it through the VMM's hybrid
//! vsock socket (`CONNECT <port>` / `OK <n>`), then speak the framed
//! protocol of the guest-agent crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod secrets;

use guest_agent::{
    encode, read_frame, write_json, Frame, Hello, Kind, Request, Response, AGENT_PORT,
    PROTOCOL_VERSION,
};

/// Where the agent lives inside every workspace's root disk.
pub const AGENT_GUEST_PATH: &str = "/.microagent/agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent not reachable through {path}: {reason}")]
    Unreachable { path: String, reason: String },
    #[error("guest agent protocol: {0}")]
    Protocol(String),
    #[error("guest agent: {0}")]
    Remote(String),
    #[error("guest agent did not answer within {0}s")]
    Timeout(u64),
    #[error(
        "guest agent binary not found (looked at {0}); run scripts/build-agent.sh or set MICROAGENT_AGENT"
    )]
    BinaryMissing(String),
}

pub struct AgentConn {
    pub stream: UnixStream,
}

/// Reads the `OK <port>` line byte by byte, so no stream bytes after it are
/// swallowed by a buffer.
fn read_ok_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if stream.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(std::io::ErrorKind::InvalidData.into())
}

/// A frame's JSON payload, refused as `write_frame` would if the agent
/// could not take it (a request with megabytes of argv or env).
fn frame_json<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, AgentError> {
    let payload = serde_json::to_vec(msg).map_err(|e| AgentError::Protocol(e.to_string()))?;
    if payload.len() > guest_agent::MAX_FRAME {
        return Err(AgentError::Protocol(format!(
            "request of {} bytes is over the agent's limit of {} bytes",
            payload.len(),
            guest_agent::MAX_FRAME
        )));
    }
    Ok(payload)
}

impl AgentConn {
    /// One attempt: connect, CONNECT to the agent port, HELLO both ways.
    pub fn connect(vsock_socket: &Path, io_timeout: Duration) -> Result<AgentConn, AgentError> {
        Self::open(vsock_socket, io_timeout, None)
    }

    /// As [`AgentConn::connect`], with `first` sent right behind our HELLO
    /// instead of after the agent's: one guest round trip less per
    /// request. The agent reads a request only after accepting our HELLO,
    /// so a version mismatch still runs nothing. The next frame on the
    /// connection answers `first`.
    pub fn connect_sending(
        vsock_socket: &Path,
        io_timeout: Duration,
        first: &Request,
    ) -> Result<AgentConn, AgentError> {
        Self::open(vsock_socket, io_timeout, Some(first))
    }

    fn open(
        vsock_socket: &Path,
        io_timeout: Duration,
        first: Option<&Request>,
    ) -> Result<AgentConn, AgentError> {
        let unreachable = |reason: String| AgentError::Unreachable {
            path: vsock_socket.display().to_string(),
            reason,
        };
        let mut stream =
            UnixStream::connect(vsock_socket).map_err(|e| unreachable(e.to_string()))?;
        stream
            .set_read_timeout(Some(io_timeout))
            .map_err(|e| unreachable(e.to_string()))?;
        writeln!(stream, "CONNECT {AGENT_PORT}").map_err(|e| unreachable(e.to_string()))?;
        let ok = read_ok_line(&mut stream)
            .map_err(|e| unreachable(format!("no OK from the VMM ({e})")))?;
        if !ok.starts_with("OK ") {
            return Err(unreachable(format!("unexpected answer {ok:?}")));
        }
        let me = Hello {
            version: PROTOCOL_VERSION,
            role: "host".into(),
        };
        let mut out = encode(Kind::Hello, &frame_json(&me)?);
        if let Some(req) = first {
            out.extend(encode(Kind::Request, &frame_json(req)?));
        }
        // One write: both frames reach the guest in one vsock packet.
        stream
            .write_all(&out)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let f = read_frame(&mut stream).map_err(|e| AgentError::Protocol(e.to_string()))?;
        match f.kind {
            Kind::Hello => {
                let h: Hello = f.json().map_err(|e| AgentError::Protocol(e.to_string()))?;
                if h.version != PROTOCOL_VERSION {
                    return Err(AgentError::Protocol(format!(
                        "agent speaks protocol {}, we speak {PROTOCOL_VERSION}",
                        h.version
                    )));
                }
            }
            Kind::Error => return Err(AgentError::Remote(error_text(&f))),
            k => return Err(AgentError::Protocol(format!("expected HELLO, got {k:?}"))),
        }
        Ok(AgentConn { stream })
    }

    pub fn send(&mut self, req: &Request) -> Result<(), AgentError> {
        write_json(&mut self.stream, Kind::Request, req)
            .map_err(|e| AgentError::Protocol(e.to_string()))
    }

    /// Sends a request that is answered with one RESPONSE.
    pub fn call(self, req: &Request) -> Result<Response, AgentError> {
        self.call_with(req, &[])
    }

    /// Connects and asks `req` in the same breath (see
    /// [`AgentConn::connect_sending`]); its one RESPONSE.
    pub fn request(
        vsock_socket: &Path,
        io_timeout: Duration,
        req: &Request,
    ) -> Result<Response, AgentError> {
        Self::connect_sending(vsock_socket, io_timeout, req)?.response()
    }

    /// Sends a request followed by raw STDIN frames (e.g. secret values),
    /// then reads its one RESPONSE.
    pub fn call_with(mut self, req: &Request, payloads: &[&[u8]]) -> Result<Response, AgentError> {
        self.send(req)?;
        for p in payloads {
            guest_agent::write_frame(&mut self.stream, Kind::Stdin, p)
                .map_err(|e| AgentError::Protocol(e.to_string()))?;
        }
        self.response()
    }

    fn response(&mut self) -> Result<Response, AgentError> {
        let f = read_frame(&mut self.stream).map_err(|e| AgentError::Protocol(e.to_string()))?;
        match f.kind {
            Kind::Response => f.json().map_err(|e| AgentError::Protocol(e.to_string())),
            Kind::Error => Err(AgentError::Remote(error_text(&f))),
            k => Err(AgentError::Protocol(format!(
                "expected RESPONSE, got {k:?}"
            ))),
        }
    }

    /// Freezes the guest's upper filesystem: its data and journal are on
    /// the disk, clean, until [`FrozenFs::thaw`], the drop of what this
    /// returns, or `timeout` (the agent's own guard) thaws it.
    pub fn freeze_upper(self, timeout: Duration) -> Result<FrozenFs, AgentError> {
        let timeout_s = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        self.freeze(&Request::FreezeUpper { timeout_s })
    }

    /// The same for the workspace's volume `index` (in attach order).
    pub fn freeze_volume(self, index: u32, timeout: Duration) -> Result<FrozenFs, AgentError> {
        let timeout_s = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        self.freeze(&Request::FreezeVolume { index, timeout_s })
    }

    fn freeze(mut self, req: &Request) -> Result<FrozenFs, AgentError> {
        self.send(req)?;
        let r = self.response()?;
        if !r.ok {
            return Err(AgentError::Remote(r.message));
        }
        Ok(FrozenFs { conn: self })
    }
}

/// A guest filesystem while it is frozen (see
/// [`AgentConn::freeze_upper`]); dropping it closes the connection, which
/// thaws it too.
pub struct FrozenFs {
    conn: AgentConn,
}

impl FrozenFs {
    pub fn thaw(mut self) -> Result<(), AgentError> {
        self.conn.send(&Request::Ping)?;
        let r = self.conn.response()?;
        if r.ok {
            Ok(())
        } else {
            Err(AgentError::Remote(r.message))
        }
    }
}

pub fn error_text(f: &Frame) -> String {
    f.json::<guest_agent::ErrorMsg>()
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&f.payload).into_owned())
}

/// Pings the agent until it answers or `timeout` passes. Each attempt that
/// fails fast (guest still booting, no listener yet) is retried.
pub fn wait_ready(
    vsock_socket: &Path,
    timeout: Duration,
    alive: impl Fn() -> bool,
) -> Result<Response, AgentError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    // A restored guest answers within milliseconds on hardware KVM, so
    // retry soon at first; back off to spare an emulated (PVM) guest
    // kernel a storm of refused connections while it boots.
    let mut pause = Duration::from_millis(10);
    while Instant::now() < deadline {
        if !alive() {
            return Err(AgentError::Unreachable {
                path: vsock_socket.display().to_string(),
                reason: "the VMM exited".into(),
            });
        }
        match AgentConn::request(vsock_socket, Duration::from_secs(10), &Request::Ping) {
            Ok(r) => return Ok(r),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    let _ = last;
    Err(AgentError::Timeout(timeout.as_secs()))
}

/// The agent binary to put into root disks: $MICROAGENT_AGENT, else
/// `microagent-agent` next to this executable.
pub fn agent_binary() -> Result<PathBuf, AgentError> {
    if let Some(p) = std::env::var_os("MICROAGENT_AGENT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(AgentError::BinaryMissing(p.display().to_string()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| AgentError::BinaryMissing(e.to_string()))?;
    let p = exe.with_file_name("microagent-agent");
    if p.is_file() {
        Ok(p)
    } else {
        Err(AgentError::BinaryMissing(p.display().to_string()))
    }
}

/// Reads lines of a byte stream without holding more than `max` bytes.
pub fn bounded_lines(r: impl Read, max: usize) -> impl Iterator<Item = String> {
    BufReader::new(r.take(max as u64))
        .lines()
        .map_while(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_too_large_for_the_agent_is_refused_before_sending() {
        assert!(frame_json(&Request::Ping).is_ok());
        let huge = Request::Exec(guest_agent::ExecRequest {
            argv: vec!["x".repeat(guest_agent::MAX_FRAME + 1)],
            ..Default::default()
        });
        let err = frame_json(&huge).unwrap_err().to_string();
        assert!(err.contains("over the agent's limit"), "{err}");
    }
}
