//! One registry repository, for content other than an image's own
//! manifest: blobs by digest (asked for, pushed when missing, fetched
//! verified into a blob store) and raw manifests of any media type.
//! Snapshot push and pull speak to registries through it; every call
//! retries transient failures like image pulls do.

use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::blob::BlobStore;
use super::config::Blob;
use super::digest::Digest;
use super::progress::Progress;
use super::pull::{
    check_manifest_bytes, client_for, fetch_blob, registry_error, retry, runtime, PullOptions,
};
use super::{ImageError, Result};

pub struct Session {
    rt: tokio::runtime::Runtime,
    client: Client,
    auth: RegistryAuth,
    pub reference: Reference,
}

impl Session {
    /// Opens `reference`'s repository; `push` authenticates for writing.
    pub fn open(reference: &Reference, opts: &PullOptions, push: bool) -> Result<Session> {
        let rt = runtime()?;
        let client = client_for(reference, opts.insecure_registries);
        let auth = super::auth::resolve(reference.registry(), opts.creds)?;
        let op = if push {
            RegistryOperation::Push
        } else {
            RegistryOperation::Pull
        };
        rt.block_on(retry(reference, || client.auth(reference, &auth, op)))?;
        Ok(Session {
            rt,
            client,
            auth,
            reference: reference.clone(),
        })
    }

    pub fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let d = digest.to_string();
        self.rt.block_on(retry(&self.reference, || {
            self.client.blob_exists(&self.reference, &d)
        }))
    }

    /// Uploads `data`, which the caller hashed to `digest`.
    pub fn push_bytes(&self, data: bytes::Bytes, digest: &Digest) -> Result<()> {
        let d = digest.to_string();
        self.rt.block_on(retry(&self.reference, || {
            self.client.push_blob(&self.reference, data.clone(), &d)
        }))?;
        Ok(())
    }

    /// Uploads a stored file as `blob`, read in chunks as it is sent.
    pub fn push_file(
        &self,
        path: &std::path::Path,
        blob: &Blob,
        progress: &Progress,
        what: &str,
    ) -> Result<()> {
        let digest = blob.digest.to_string();
        let bar = std::sync::Arc::new(progress.blob(what, &digest, blob.size));
        let pushed = self.rt.block_on(retry(&self.reference, || {
            let stream = super::push::blob_stream(path.to_path_buf(), bar.clone());
            let (client, reference, digest) = (&self.client, &self.reference, &digest);
            async move {
                let stream = stream.map_err(|e| {
                    oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
                })?;
                client
                    .push_blob_stream(reference, stream, digest, Some(blob.size))
                    .await
            }
        }));
        match pushed {
            Ok(_) => {
                bar.done(false);
                Ok(())
            }
            Err(e) => {
                bar.fail();
                Err(e)
            }
        }
    }

    /// Fetches `blob` into `store` unless it is there, verified by size
    /// and digest before it gets its name.
    pub fn fetch(
        &self,
        store: &BlobStore,
        blob: &Blob,
        what: &str,
        progress: &Progress,
    ) -> Result<()> {
        self.rt.block_on(fetch_blob(
            &self.client,
            &self.reference,
            store,
            blob,
            what,
            progress,
        ))
    }

    /// The manifest the reference names, size-bounded and checked against
    /// its digest (and the reference's own, when it pins one).
    pub fn pull_manifest(&self, accepted: &[&str]) -> Result<(Vec<u8>, Digest)> {
        let (body, digest) = self.rt.block_on(retry(&self.reference, || {
            self.client
                .pull_manifest_raw(&self.reference, &self.auth, accepted)
        }))?;
        check_manifest_bytes(&body, &digest, self.reference.digest())?;
        Ok((body.to_vec(), Digest::parse(&digest)?))
    }

    /// Puts `body` under the reference's tag (or digest).
    pub fn push_manifest(&self, body: Vec<u8>, media_type: &'static str) -> Result<Digest> {
        let digest = Digest::of_bytes(&body);
        let content_type = http::HeaderValue::from_static(media_type);
        self.rt
            .block_on(
                self.client
                    .push_manifest_raw(&self.reference, body, content_type),
            )
            .map_err(|e| registry_error(&self.reference, e))?;
        Ok(digest)
    }
}

/// A registry answered with something it should not have.
pub fn unexpected(reference: &Reference, reason: String) -> ImageError {
    ImageError::Registry {
        registry: reference.registry().to_string(),
        reason: format!("{}: {reason}", reference.whole()),
    }
}
