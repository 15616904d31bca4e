//! The wire protocol between microagent (host) and its guest agent, over a
//! vsock stream.
//!
//! Frame: `len: u32 LE` (of what follows) | `kind: u8` | payload.
//! Payloads are bounded by MAX_FRAME; control payloads are JSON, stream
//! payloads are raw bytes.
//!
//! A session: both sides send HELLO (version check), the host sends one
//! REQUEST, then for an exec the host streams STDIN/SIGNAL/RESIZE and the
//! guest streams STDOUT/STDERR and ends with EXIT (or ERROR). Non-exec
//! requests get one RESPONSE.

pub mod vsock;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Stream data is sent in chunks of at most this size: with its 5-byte
/// frame header a chunk fills one virtio-vsock packet (the Linux driver's
/// largest is 64 KiB), so a chunk costs the guest one kick and one
/// interrupt.
pub const CHUNK: usize = 64 * 1024 - 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Request = 2,
    Stdin = 3,
    Stdout = 4,
    Stderr = 5,
    Exit = 6,
    Signal = 7,
    Resize = 8,
    Error = 9,
    Response = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Request,
            3 => Stdin,
            4 => Stdout,
            5 => Stderr,
            6 => Exit,
            7 => Signal,
            8 => Resize,
            9 => Error,
            10 => Response,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    Eof,
    Io(io::Error),
    TooLarge(usize),
    UnknownKind(u8),
    Empty,
    BadJson(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Eof => write!(f, "connection closed"),
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TooLarge(n) => {
                write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            }
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::Empty => write!(f, "empty frame"),
            FrameError::BadJson(e) => write!(f, "malformed message: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::BadJson(e.to_string()))
    }
}

pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

/// Writes one frame with a single write call, so frames written by
/// different threads (each behind the same lock) never interleave.
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    w.write_all(&encode(kind, payload))?;
    w.flush()
}

pub fn write_json<W: Write, T: Serialize>(w: &mut W, kind: Kind, msg: &T) -> io::Result<()> {
    let payload =
        serde_json::to_vec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    write_frame(w, kind, &payload)
}

/// Reads one frame, refusing oversized or unknown ones before allocating.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Eof),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len - 1 > MAX_FRAME {
        return Err(FrameError::TooLarge(len - 1));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    let kind = Kind::from_u8(kind[0]).ok_or(FrameError::UnknownKind(kind[0]))?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, payload })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub version: u32,
    pub role: String,
}

/// Where the host puts the image's entrypoint for the agent to start at boot.
pub const ENTRYPOINT_PATH: &str = "/.microagent/entrypoint.json";

/// The image's Entrypoint + Cmd with its Env, WorkingDir and User: what the
/// agent starts at boot when the workspace asks for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct EntrypointSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Whether the host will send stdin (else the process gets /dev/null).
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and identity.
    Ping,
    Exec(ExecRequest),
    /// Sync, stop processes and power the guest off.
    Shutdown,
    /// Receive a tar stream on STDIN frames and unpack it under `dest`.
    CopyIn {
        dest: String,
    },
    /// Send `path` (file or directory) as a tar stream on STDOUT frames.
    CopyOut {
        path: String,
    },
    /// Send the listed absolute paths (each with its directories above
    /// it, header only) as one tar stream on STDOUT frames, entries named
    /// relative to `/`, minus every path at or under an `excludes` entry.
    /// Listed paths that do not exist are left out.
    ArchivePaths {
        includes: Vec<String>,
        #[serde(default)]
        excludes: Vec<String>,
    },
    /// After a restore or fork: new identity, wall clock and entropy.
    Refresh(Refresh),
    /// Write secrets into the /run/secrets tmpfs. Each value follows as
    /// one STDIN frame of exactly `len` bytes, in order (raw bytes, never
    /// inside JSON, so no encoded copy is left in the agent's memory).
    /// With `replace`, secrets not listed are scrubbed first.
    SecretsPut {
        secrets: Vec<SecretMeta>,
        #[serde(default)]
        replace: bool,
    },
    /// Scrub these secrets (overwrite, unlink).
    SecretsRemove {
        keys: Vec<String>,
    },
    /// Scrub every secret: done before guest memory is written anywhere.
    SecretsScrub,
    /// Freeze the upper filesystem so the host reads it whole and clean;
    /// answered `frozen`, then thawed (and answered `thawed`) at the next
    /// frame on this connection, when it closes, or after `timeout_s`.
    FreezeUpper {
        timeout_s: u32,
    },
    /// The same for the workspace's volume `index` (in attach order).
    FreezeVolume {
        index: u32,
        timeout_s: u32,
    },
}

/// Where secrets live in the guest (a tmpfs, never the root disk).
pub const SECRETS_DIR: &str = "/run/secrets";
/// At most this many secrets per workspace.
pub const MAX_SECRETS: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecretMeta {
    pub key: String,
    pub len: u32,
}

/// Secret keys become file names: 1-128 of letters, digits, '_', '.',
/// '-', not starting with '.' or '-'.
pub fn valid_secret_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && !key.starts_with(['.', '-'])
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refresh {
    pub hostname: String,
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// Fresh host entropy (hex) mixed into the guest CRNG, which is then
    /// reseeded: forks must not share random streams.
    pub entropy_hex: String,
    /// New /etc/machine-id (32 hex digits).
    pub machine_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// Shell convention: a death by signal N is 128 + N.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorMsg {
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SignalMsg {
    pub signal: i32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ResizeMsg {
    pub rows: u16,
    pub cols: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(&mut buf, Kind::Exit, &ExitStatus::Signal(9)).unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).unwrap();
        assert_eq!(
            (f.kind, f.payload.as_slice()),
            (Kind::Stdout, &b"hello"[..])
        );
        let e: ExitStatus = read_frame(&mut r).unwrap().json().unwrap();
        assert_eq!(e.shell_code(), 137);
        assert!(matches!(read_frame(&mut r), Err(FrameError::Eof)));
    }

    #[test]
    fn hostile_frames_are_refused_without_allocating() {
        // Claims 4 GiB.
        let mut r = &[0xff, 0xff, 0xff, 0xff, 2][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::TooLarge(_))));
        let mut r = &[0, 0, 0, 0][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Empty)));
        let mut r = &[1, 0, 0, 0, 200][..];
        assert!(matches!(
            read_frame(&mut r),
            Err(FrameError::UnknownKind(200))
        ));
        // Truncated payload.
        let mut r = &[10, 0, 0, 0, 4, b'a'][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        // Valid frame, garbage JSON.
        let f = Frame {
            kind: Kind::Request,
            payload: b"{\"type\":\"launch_missiles\"}".to_vec(),
        };
        assert!(matches!(f.json::<Request>(), Err(FrameError::BadJson(_))));
    }

    #[test]
    fn secret_keys_are_plain_file_names() {
        for ok in ["API_TOKEN", "db.password", "x", "a-b_c.1"] {
            assert!(valid_secret_key(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "k\0",
            &"k".repeat(129),
        ] {
            assert!(!valid_secret_key(bad), "{bad}");
        }
    }

    #[test]
    fn requests_have_a_stable_json_shape() {
        let r = Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"type":"exec","argv":["true"]"#), "{s}");
        let back: Request = serde_json::from_str(r#"{"type":"exec","argv":["ls"]}"#).unwrap();
        assert!(matches!(back, Request::Exec(e) if e.argv == ["ls"] && !e.tty));
    }
}
