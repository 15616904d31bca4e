//! OCI images: references, registry pulls, imports from layouts and
//! archives, verified blob storage, safe layer unpacking, and the cached ext4
//! root disk every workspace of an image is copied from.
//!
//! Everything that arrives from a registry or an archive is untrusted: digests
//! and sizes are checked before a blob is used, manifests and configs are
//! size-bounded, and unpacking refuses entries that would land outside the
//! tree.

pub mod artifact;
pub mod auth;
pub mod blob;
pub mod build;
pub mod building;
pub mod commit;
pub mod config;
pub mod digest;
pub mod import;
pub mod layer_disk;
pub mod layout;
pub mod ops;
pub mod progress;
pub mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;
pub mod upper;

use std::path::PathBuf;

/// Manifests, indexes and configs are small JSON documents; anything larger
/// is refused before it is parsed.
pub const MAX_JSON_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    Digest(String),
    #[error("blob {digest}: content has sha256:{actual}, not the digest it was announced with")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest}: size {actual} bytes, announced {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("layer {digest}: entry {entry:?}: {reason}")]
    UnsafeEntry {
        digest: String,
        entry: String,
        reason: String,
    },
    #[error("layer {index} ({digest}): uncompressed content has sha256:{actual}, the image config says {expected}")]
    DiffIdMismatch {
        index: usize,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no image {0:?} in the local store (pull or import it first)")]
    NotFound(String),
    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("mkfs.ext4 failed for {path}: {reason}")]
    Mkfs { path: PathBuf, reason: String },
}

impl ImageError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }

    pub fn json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Json { what, source }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;
