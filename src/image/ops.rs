//! The image operations commands use: pull-or-find, import, remove. Each
//! takes the store lock, so concurrent pulls of one image build it once.

use std::path::Path;
use std::time::Instant;

use super::build::{self, BuildInput};
use super::progress::Progress;
use super::pull::{self, PullOptions};
use super::store::{ImageRecord, ImageStore};
use super::{import, reference, Result};

/// An image ready to use, and whether it was already in the store.
pub struct Ready {
    pub record: ImageRecord,
    pub cached: bool,
    pub seconds: f64,
}

/// Finds `query` in the store, or pulls and builds it.
pub fn ensure(
    store: &ImageStore,
    query: &str,
    opts: &PullOptions,
    progress: &Progress,
) -> Result<Ready> {
    let start = Instant::now();
    if let Some(record) = store.find(query)? {
        return Ok(Ready {
            record,
            cached: true,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    pull(store, query, opts, progress)
}

/// Pulls `query` from its registry (always asking the registry what the
/// reference points at now) and builds its disk unless already built.
pub fn pull(
    store: &ImageStore,
    query: &str,
    opts: &PullOptions,
    progress: &Progress,
) -> Result<Ready> {
    let start = Instant::now();
    let reference = reference::parse(query)?;
    let name = reference.whole();
    let _lock = store.lock()?;
    progress.step(&format!("pulling {name}"));
    let pulled = pull::pull(&reference, &store.blobs, opts, progress)?;
    let cached = store
        .read(&pulled.manifest_digest)
        .is_ok_and(|r| store.complete(&r));
    let record = build::build(
        store,
        BuildInput {
            manifest_digest: pulled.manifest_digest,
            manifest: &pulled.manifest,
            config_bytes: &pulled.config_bytes,
            refs: vec![name],
            source: "registry",
        },
        progress,
    )?;
    Ok(Ready {
        record,
        cached,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Imports an OCI layout, oci-archive or docker-archive. `tag` names the
/// image locally; without it the archive's own name is used when it is a
/// full reference.
pub fn import(
    store: &ImageStore,
    path: &Path,
    tag: Option<&str>,
    ref_name: Option<&str>,
    progress: &Progress,
) -> Result<Ready> {
    let start = Instant::now();
    let tag = tag.map(reference::normalise).transpose()?;
    let _lock = store.lock()?;
    progress.step(&format!("importing {}", path.display()));
    let found = import::read(store, path, ref_name)?;
    let archive_name = found
        .name
        .as_deref()
        .filter(|n| n.contains('/') || n.contains(':'))
        .and_then(|n| reference::normalise(n).ok());
    let refs: Vec<String> = tag.or(archive_name).into_iter().collect();
    let cached = store
        .read(&found.manifest_digest)
        .is_ok_and(|r| store.complete(&r));
    let record = build::build(
        store,
        BuildInput {
            manifest_digest: found.manifest_digest,
            manifest: &found.manifest,
            config_bytes: &found.config_bytes,
            refs,
            source: found.source,
        },
        progress,
    )?;
    Ok(Ready {
        record,
        cached,
        seconds: start.elapsed().as_secs_f64(),
    })
}
