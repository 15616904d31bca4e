//! The engine's one error type. Every failure has a stable code (what a
//! script or the HTTP API branches on) and the fields that explain it; the
//! message is for people and may change.

use serde_json::{json, Map, Value};

use crate::agent::secrets::DeliveryError;
use crate::agent::AgentError;
use crate::image::ImageError;
use crate::snapshot::format::FormatError;
use crate::snapshot::manifest::{CompatError, ManifestError};
use crate::util::lock::LockError;
use crate::vmm::control::ClientError;
use crate::vmm::vm::VmError;
use crate::workspace::busy::BusyError;
use crate::workspace::disk::DiskError;
use crate::workspace::layout::BuildError;
use crate::workspace::named_snapshots::NamesError;
use crate::workspace::secrets::SecretError;
use crate::workspace::state::TransitionError;
use crate::workspace::store::StoreError;

/// Stable error codes, documented in docs/json.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A workspace, snapshot, image or secret that does not exist.
    NotFound,
    /// A name that is taken.
    AlreadyExists,
    /// `checkpoint`'s setup command exited non-zero (`setup_exit` says how).
    SetupFailed,
    /// The workspace is in a state the operation does not accept, or
    /// another long operation (a snapshot) holds it.
    StateConflict,
    /// The snapshot pins another kernel.
    KernelMismatch,
    /// The snapshot needs a CPU (model, features, TSC rate, template) this
    /// host cannot give.
    CpuIncompatible,
    /// This host cannot save or restore VM memory.
    SnapshotUnsupported,
    /// A snapshot file that is damaged or from an unknown format.
    SnapshotDamaged,
    /// A secret's bytes were found in a snapshot after the scrub.
    SecretLeak,
    /// Bad arguments or input: the message names the thing and the value.
    InvalidInput,
    /// A destructive command needs --yes (or a terminal to ask on).
    ConfirmationRequired,
    /// The VMM or the guest agent did not answer or refused.
    Unavailable,
    /// A registry, blob or layer problem.
    Image,
    /// Anything else (host I/O, KVM set-up).
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::SetupFailed => "setup_failed",
            Code::StateConflict => "state_conflict",
            Code::KernelMismatch => "kernel_mismatch",
            Code::CpuIncompatible => "cpu_incompatible",
            Code::SnapshotUnsupported => "snapshot_unsupported",
            Code::SnapshotDamaged => "snapshot_damaged",
            Code::SecretLeak => "secret_leak",
            Code::InvalidInput => "invalid_input",
            Code::ConfirmationRequired => "confirmation_required",
            Code::Unavailable => "unavailable",
            Code::Image => "image",
            Code::Internal => "internal",
        }
    }

    pub const ALL: [Code; 14] = [
        Code::NotFound,
        Code::AlreadyExists,
        Code::SetupFailed,
        Code::StateConflict,
        Code::KernelMismatch,
        Code::CpuIncompatible,
        Code::SnapshotUnsupported,
        Code::SnapshotDamaged,
        Code::SecretLeak,
        Code::InvalidInput,
        Code::ConfirmationRequired,
        Code::Unavailable,
        Code::Image,
        Code::Internal,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{message}")]
    SnapshotDamaged { message: String },
    #[error("snapshot {tag} of workspace {workspace} does not exist")]
    SnapshotNotFound { workspace: String, tag: String },
    #[error("snapshot {tag} already exists in workspace {workspace}")]
    SnapshotExists { workspace: String, tag: String },
    #[error("checkpoint {checkpoint}: the setup exited with status {exit_code}; nothing was kept")]
    SetupFailed { checkpoint: String, exit_code: i32 },
    #[error("{message}")]
    Invalid { message: String },
    #[error("{message}")]
    Conflict { workspace: String, message: String },
    #[error("{kind} {name} is in use by {}: remove them first", users.join(", "))]
    InUse {
        kind: &'static str,
        name: String,
        users: Vec<String>,
    },
    #[error("{message}")]
    ConfirmationRequired { message: String },
    #[error("this host cannot snapshot VM memory: {}", missing.join(", "))]
    SnapshotUnsupported { missing: Vec<String> },
    #[error("secret {key} found in {file} ({encoding}) after the scrub: a guest process still holds a copy (a variable, /tmp, /dev/shm, a file on disk); remove it and try again")]
    SecretLeak {
        key: String,
        file: String,
        encoding: &'static str,
    },
    #[error("secret {key} ({encoding}) is in {path} of workspace {workspace}: secrets never go into an image; remove it and commit again (nothing was kept)")]
    SecretInLayer {
        workspace: String,
        key: String,
        path: String,
        encoding: &'static str,
    },
    #[error(transparent)]
    Upper(#[from] crate::image::upper::UpperError),
    #[error("workspace {workspace} failed to start: {reason}")]
    StartFailed { workspace: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// An error with a sentence of what was being done; keeps the inner code.
    #[error("{context}: {source}")]
    Context { context: String, source: Box<Error> },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    Busy(#[from] BusyError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Compat(#[from] CompatError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Control(#[from] ClientError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Base(#[from] crate::workspace::base::BaseError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Names(#[from] NamesError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `invalid_input` with a message that names the thing and the value.
pub fn invalid(message: impl Into<String>) -> Error {
    Error::Invalid {
        message: message.into(),
    }
}

/// `state_conflict` on a workspace.
pub fn conflict(workspace: &str, message: impl Into<String>) -> Error {
    Error::Conflict {
        workspace: workspace.to_string(),
        message: message.into(),
    }
}

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } | Error::SnapshotExists { .. } => Code::AlreadyExists,
            Error::SnapshotNotFound { .. } => Code::NotFound,
            Error::SnapshotDamaged { .. } => Code::SnapshotDamaged,
            Error::SetupFailed { .. } => Code::SetupFailed,
            Error::Invalid { .. } => Code::InvalidInput,
            Error::Conflict { .. } | Error::Transition(_) | Error::InUse { .. } => {
                Code::StateConflict
            }
            Error::ConfirmationRequired { .. } => Code::ConfirmationRequired,
            Error::SnapshotUnsupported { .. } => Code::SnapshotUnsupported,
            Error::SecretLeak { .. } | Error::SecretInLayer { .. } => Code::SecretLeak,
            Error::Upper(_) => Code::Internal,
            Error::Context { source, .. } => source.code(),
            Error::Store(e) => match e {
                StoreError::InvalidName(_) => Code::InvalidInput,
                StoreError::NotFound(_) => Code::NotFound,
                StoreError::Exists(_) => Code::AlreadyExists,
                StoreError::Io { .. } | StoreError::BadRecord { .. } => Code::Internal,
            },
            Error::Busy(BusyError::Busy { .. }) => Code::StateConflict,
            Error::Busy(_)
            | Error::Lock(_)
            | Error::Io { .. }
            | Error::Disk(_)
            | Error::Base(_) => Code::Internal,
            Error::StartFailed { .. } => Code::Internal,
            Error::Build(_) => Code::Internal,
            Error::Compat(e) => match e {
                CompatError::Kernel { .. } => Code::KernelMismatch,
                CompatError::Format { .. } => Code::SnapshotDamaged,
                CompatError::Template { .. }
                | CompatError::Cpu { .. }
                | CompatError::Tsc { .. }
                | CompatError::CpuFeatures { .. } => Code::CpuIncompatible,
            },
            Error::Format(_) => Code::SnapshotDamaged,
            Error::Manifest(ManifestError::Bad { .. }) => Code::SnapshotDamaged,
            Error::Manifest(ManifestError::Io { .. }) => Code::Internal,
            Error::Image(_) => Code::Image,
            Error::Agent(AgentError::BinaryMissing(_)) => Code::Internal,
            Error::Agent(_) | Error::Delivery(_) | Error::Control(_) => Code::Unavailable,
            Error::Secret(e) => match e {
                SecretError::NotFound { .. } => Code::NotFound,
                SecretError::Io { .. } => Code::Internal,
                _ => Code::InvalidInput,
            },
            Error::Names(e) => match e {
                NamesError::InvalidName(_) => Code::InvalidInput,
                NamesError::NotFound { .. } => Code::NotFound,
                NamesError::Taken { .. } => Code::AlreadyExists,
                NamesError::Io { .. } | NamesError::Corrupt { .. } | NamesError::Lock(_) => {
                    Code::Internal
                }
            },
            Error::Vm(e) => match e {
                VmError::Vcpus(_)
                | VmError::Memory { .. }
                | VmError::KernelMissing(_)
                | VmError::DiskMissing(_)
                | VmError::TooManyDisks(_) => Code::InvalidInput,
                _ => Code::Internal,
            },
        }
    }

    /// The innermost error that is not a `Context` wrapper.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }

    /// The fields that explain the failure, beside `code` and `message`.
    pub fn fields(&self) -> Map<String, Value> {
        let v = match self.root() {
            Error::NotFound { kind, name } | Error::AlreadyExists { kind, name } => {
                json!({ "kind": kind, "name": name })
            }
            Error::SnapshotNotFound { workspace, tag }
            | Error::SnapshotExists { workspace, tag } => {
                json!({ "kind": "snapshot", "name": tag, "workspace": workspace })
            }
            Error::SetupFailed {
                checkpoint,
                exit_code,
            } => json!({ "checkpoint": checkpoint, "setup_exit": exit_code }),
            Error::Conflict { workspace, .. } => json!({ "workspace": workspace }),
            Error::InUse { kind, name, users } => {
                json!({ "kind": kind, "name": name, "used_by": users })
            }
            Error::StartFailed { workspace, reason } => {
                json!({ "workspace": workspace, "reason": reason })
            }
            Error::SnapshotUnsupported { missing } => json!({ "missing": missing }),
            Error::SecretLeak { key, file, .. } => json!({ "secret_key": key, "file": file }),
            Error::SecretInLayer {
                workspace,
                key,
                path,
                ..
            } => json!({ "workspace": workspace, "secret_key": key, "file": path }),
            Error::Store(StoreError::NotFound(n)) => json!({ "kind": "workspace", "name": n }),
            Error::Store(StoreError::Exists(n)) => json!({ "kind": "workspace", "name": n }),
            Error::Transition(t) => json!({ "workspace": t.name, "status": t.status.name() }),
            Error::Busy(BusyError::Busy {
                name, op, detail, ..
            }) => json!({ "workspace": name, "status": op, "detail": detail }),
            Error::Compat(c) => match c {
                CompatError::Kernel {
                    snapshot,
                    workspace,
                } => json!({ "snapshot": snapshot, "workspace": workspace }),
                CompatError::Template {
                    snapshot,
                    workspace,
                } => json!({ "snapshot": snapshot, "workspace": workspace }),
                CompatError::Cpu { snapshot, host } => {
                    json!({ "snapshot": snapshot, "host": host })
                }
                CompatError::Tsc { snapshot, host } => {
                    json!({ "snapshot_tsc_khz": snapshot, "host_tsc_khz": host })
                }
                CompatError::CpuFeatures {
                    leaf,
                    register,
                    missing,
                } => json!({
                    "cpuid_leaf": format!("{leaf:#x}"),
                    "register": register,
                    "missing_bits": format!("{missing:#x}"),
                }),
                CompatError::Format { found } => json!({ "format": found }),
            },
            Error::Secret(SecretError::NotFound { name, key }) => {
                json!({ "kind": "secret", "workspace": name, "name": key })
            }
            _ => json!({}),
        };
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The documented `--json` / HTTP error body.
    pub fn to_json(&self) -> Value {
        let mut body = self.fields();
        body.insert("code".into(), self.code().as_str().into());
        body.insert("message".into(), self.to_string().into());
        json!({ "error": body })
    }
}

/// anyhow-like context for engine results: keeps the inner error's code.
pub trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context(),
            source: Box::new(e.into()),
        })
    }
}

/// Context for host I/O errors (code `internal`).
pub trait IoContext<T> {
    fn io_ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_code_and_fields() {
        let e: Result<()> = Err(Error::from(CompatError::Kernel {
            snapshot: "aa".into(),
            workspace: "bb".into(),
        }));
        let e = e.ctx(|| "snapshot t of workspace w".into()).unwrap_err();
        assert_eq!(e.code(), Code::KernelMismatch);
        let j = e.to_json();
        assert_eq!(j["error"]["code"], "kernel_mismatch");
        assert_eq!(j["error"]["snapshot"], "aa");
        assert!(j["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("snapshot t of workspace w: kernel sha256 mismatch"));
    }

    #[test]
    fn codes_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()));
            assert!(c
                .as_str()
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch == '_'));
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::Code;

    #[test]
    fn every_code_is_documented_and_every_documented_code_exists() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md"))
            .expect("docs/json.md");
        let section = doc
            .split("### error-codes")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("docs/json.md has an error-codes section");
        let documented: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let ours: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        for c in &ours {
            assert!(documented.contains(c), "{c} is not in docs/json.md");
        }
        for c in &documented {
            assert!(ours.contains(c), "docs/json.md lists unknown code {c}");
        }
    }
}
