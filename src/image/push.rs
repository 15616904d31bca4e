//! Pushing an image from the store to a registry: every blob the registry
//! lacks (layers, then the config), streamed from the store in chunks,
//! then an OCI manifest (`commit::manifest_json`, so a committed image
//! keeps its digest).

use std::io::Read;

use oci_client::{Reference, RegistryOperation};

use super::commit::{manifest_json, OCI_CONFIG};
use super::config::{Blob, OCI_MANIFEST};
use super::digest::Digest;
use super::progress::Progress;
use super::pull::{client_for, registry_error, retry, runtime, PullOptions};
use super::store::{ImageRecord, ImageStore};
use super::{ImageError, Result};

/// Blobs go up in chunks of this size, read as they are sent.
const CHUNK: usize = 4 << 20;

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub reference: String,
    pub manifest_digest: Digest,
    pub blobs_pushed: usize,
    pub blobs_skipped: usize,
    pub bytes_pushed: u64,
}

pub fn push(
    store: &ImageStore,
    rec: &ImageRecord,
    dest: &Reference,
    opts: &PullOptions,
    progress: &Progress,
) -> Result<Pushed> {
    runtime()?.block_on(push_async(store, rec, dest, opts, progress))
}

/// The chunks of a blob file, read lazily, with progress.
pub(super) fn blob_stream(
    path: std::path::PathBuf,
    bar: std::sync::Arc<super::progress::BlobProgress>,
) -> Result<
    impl futures_util::Stream<Item = Result<bytes::Bytes, oci_client::errors::OciDistributionError>>,
> {
    let file = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
    Ok(futures_util::stream::unfold(Some(file), move |file| {
        let bar = bar.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        return Some((Err(e.into()), None));
                    }
                }
            }
            if n == 0 {
                return None;
            }
            buf.truncate(n);
            bar.advance(n as u64);
            Some((Ok(bytes::Bytes::from(buf)), Some(file)))
        }
    }))
}

async fn push_async(
    store: &ImageStore,
    rec: &ImageRecord,
    dest: &Reference,
    opts: &PullOptions<'_>,
    progress: &Progress,
) -> Result<Pushed> {
    let client = client_for(dest, opts.insecure_registries);
    let auth = super::auth::resolve(dest.registry(), opts.creds)?;
    retry(dest, || client.auth(dest, &auth, RegistryOperation::Push)).await?;

    let config_path = store.image_dir(&rec.digest).join("config.json");
    let config_bytes = std::fs::read(&config_path).map_err(ImageError::io(&config_path))?;
    let config = Blob {
        digest: Digest::of_bytes(&config_bytes),
        size: config_bytes.len() as u64,
        media_type: OCI_CONFIG.to_string(),
    };
    if config.digest != rec.config_digest {
        return Err(ImageError::DigestMismatch {
            digest: rec.config_digest.to_string(),
            actual: config.digest.hex().to_string(),
        });
    }
    let mut done = Pushed {
        reference: dest.whole(),
        manifest_digest: Digest::of_bytes(b""),
        blobs_pushed: 0,
        blobs_skipped: 0,
        bytes_pushed: 0,
    };
    let blobs: Vec<(&Blob, &str)> = rec
        .layers
        .iter()
        .map(|l| (l, "layer"))
        .chain([(&config, "config")])
        .collect();
    for (blob, what) in blobs {
        let digest = blob.digest.to_string();
        let bar = std::sync::Arc::new(progress.blob(what, &digest, blob.size));
        if retry(dest, || client.blob_exists(dest, &digest)).await? {
            bar.done(true);
            done.blobs_skipped += 1;
            continue;
        }
        let path = store.blobs.path(&blob.digest);
        let pushed = retry(dest, || {
            let stream = blob_stream(path.clone(), bar.clone());
            let client = &client;
            let digest = &digest;
            async move {
                let stream = stream.map_err(|e| {
                    oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
                })?;
                client
                    .push_blob_stream(dest, stream, digest, Some(blob.size))
                    .await
            }
        })
        .await;
        match pushed {
            Ok(_) => bar.done(false),
            Err(e) => {
                bar.fail();
                return Err(e);
            }
        }
        done.blobs_pushed += 1;
        done.bytes_pushed += blob.size;
    }
    let manifest = manifest_json(&config, &rec.layers);
    done.manifest_digest = Digest::of_bytes(&manifest);
    let content_type = http::HeaderValue::from_static(OCI_MANIFEST);
    client
        .push_manifest_raw(dest, manifest, content_type)
        .await
        .map_err(|e| registry_error(dest, e))?;
    Ok(done)
}
