//! Pulling from a registry with oci-client: manifest (and multi-platform
//! index → linux/amd64), config and layers, each verified into the blob
//! store. Transient network failures are retried; authentication failures
//! are not.

use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::{Client, Reference};

use super::blob::BlobStore;
use super::config::{self, Blob, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use super::digest::Digest;
use super::progress::Progress;
use super::{reference, ImageError, Result, MAX_JSON_BYTES};

const ATTEMPTS: u32 = 4;

pub struct PullOptions<'a> {
    pub creds: Option<&'a str>,
    pub insecure_registries: &'a [String],
}

/// What a pull fetched: the manifest and its digest, all blobs stored.
pub struct Pulled {
    pub manifest_digest: Digest,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
}

pub fn pull(
    reference: &Reference,
    blobs: &BlobStore,
    opts: &PullOptions,
    progress: &Progress,
) -> Result<Pulled> {
    runtime()?.block_on(pull_async(reference, blobs, opts, progress))
}

pub(super) fn registry_error(reference: &Reference, e: OciDistributionError) -> ImageError {
    let registry = reference.registry().to_string();
    let reason = match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => format!(
            "authentication failed for {} (check --creds or ~/.docker/config.json): {e}",
            reference.whole()
        ),
        OciDistributionError::ImageManifestNotFoundError(_) => {
            format!("{} not found: {e}", reference.whole())
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|er| format!("{:?}: {}", er.code, er.message))
                .collect();
            format!("{}: {}", reference.whole(), codes.join("; "))
        }
        _ => format!("{}: {e}", reference.whole()),
    };
    ImageError::Registry { registry, reason }
}

fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => r.is_connect() || r.is_timeout() || r.is_body(),
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

pub(super) async fn retry<T, F, Fut>(reference: &Reference, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS && transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(registry_error(reference, e)),
        }
    }
    unreachable!("the last attempt returns")
}

/// A registry client for `reference`: HTTPS, except for loopback
/// registries and those named insecure.
pub(super) fn client_for(reference: &Reference, insecure_registries: &[String]) -> Client {
    let registry = reference.resolve_registry().to_string();
    let mut plain_http: Vec<String> = insecure_registries.to_vec();
    if reference::is_loopback_registry(&registry) {
        plain_http.push(registry.clone());
    }
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain_http),
        // We resolve indexes ourselves, to name what an index offers when
        // linux/amd64 is missing.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
}

/// A current-thread runtime for one registry operation.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    // A process default is what rustls builds its client configs from.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ImageError::io("tokio runtime"))
}

async fn pull_async(
    reference: &Reference,
    blobs: &BlobStore,
    opts: &PullOptions<'_>,
    progress: &Progress,
) -> Result<Pulled> {
    let client = client_for(reference, opts.insecure_registries);
    let auth = super::auth::resolve(reference.registry(), opts.creds)?;
    let accepted = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

    let (mut body, mut digest) = retry(reference, || {
        client.pull_manifest_raw(reference, &auth, &accepted)
    })
    .await?;
    check_manifest_bytes(&body, &digest, reference.digest())?;
    if config::is_index(&body) {
        let entries = config::parse_index(&body)?;
        let chosen = config::select_platform(&entries)?.manifest.clone();
        let by_digest = reference.clone_with_digest(chosen.digest.to_string());
        let (b, d) = retry(reference, || {
            client.pull_manifest_raw(&by_digest, &auth, &accepted)
        })
        .await?;
        check_manifest_bytes(&b, &d, Some(&chosen.digest.to_string()))?;
        body = b;
        digest = d;
    }
    let manifest = config::parse_manifest(&body)?;
    let manifest_digest = Digest::parse(&digest)?;

    fetch_blob(
        &client,
        reference,
        blobs,
        &manifest.config,
        "config",
        progress,
    )
    .await?;
    let config_bytes = blobs.read_small(&manifest.config.digest, MAX_JSON_BYTES)?;
    for layer in &manifest.layers {
        fetch_blob(&client, reference, blobs, layer, "layer", progress).await?;
    }
    Ok(Pulled {
        manifest_digest,
        manifest,
        config_bytes,
    })
}

/// Size-bounds a manifest and checks it hashes to its digest (and to the
/// digest the reference pinned, if any).
pub(super) fn check_manifest_bytes(body: &[u8], digest: &str, pinned: Option<&str>) -> Result<()> {
    if body.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: "manifest".into(),
            size: body.len() as u64,
            limit: MAX_JSON_BYTES,
        });
    }
    let actual = Digest::of_bytes(body);
    for expected in [Some(digest), pinned].into_iter().flatten() {
        if Digest::parse(expected)? != actual {
            return Err(ImageError::DigestMismatch {
                digest: expected.to_string(),
                actual: actual.hex().to_string(),
            });
        }
    }
    Ok(())
}

pub(super) async fn fetch_blob(
    client: &Client,
    reference: &Reference,
    blobs: &BlobStore,
    blob: &Blob,
    what: &str,
    progress: &Progress,
) -> Result<()> {
    let bar = progress.blob(what, &blob.digest.to_string(), blob.size);
    if blobs.has(&blob.digest, blob.size) {
        bar.done(true);
        return Ok(());
    }
    let desc = oci_client::manifest::OciDescriptor {
        media_type: blob.media_type.clone(),
        digest: blob.digest.to_string(),
        size: blob.size as i64,
        ..Default::default()
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = fetch_once(client, reference, blobs, blob, &desc, &bar).await;
        match result {
            Ok(()) => {
                bar.done(false);
                return Ok(());
            }
            Err(Fetch::Transient(e)) if attempt < ATTEMPTS => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            Err(Fetch::Transient(e)) => {
                bar.fail();
                return Err(registry_error(reference, e));
            }
            Err(Fetch::Fatal(e)) => {
                bar.fail();
                return Err(e);
            }
        }
    }
}

enum Fetch {
    Transient(OciDistributionError),
    Fatal(ImageError),
}

async fn fetch_once(
    client: &Client,
    reference: &Reference,
    blobs: &BlobStore,
    blob: &Blob,
    desc: &oci_client::manifest::OciDescriptor,
    bar: &super::progress::BlobProgress,
) -> Result<(), Fetch> {
    let mut stream = match client.pull_blob_stream(reference, desc).await {
        Ok(s) => s,
        Err(e) if transient(&e) => return Err(Fetch::Transient(e)),
        Err(e) => return Err(Fetch::Fatal(registry_error(reference, e))),
    };
    if let Some(len) = stream.content_length {
        if len != blob.size {
            return Err(Fetch::Fatal(ImageError::SizeMismatch {
                digest: blob.digest.to_string(),
                expected: blob.size,
                actual: len,
            }));
        }
    }
    let mut w = blobs
        .writer(&blob.digest, blob.size)
        .map_err(Fetch::Fatal)?;
    let start = w.written();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Fetch::Transient(OciDistributionError::IoError(e)))?;
        w.write(&chunk).map_err(Fetch::Fatal)?;
        bar.advance(chunk.len() as u64);
    }
    let _ = start;
    w.commit().map(|_| ()).map_err(Fetch::Fatal)
}
