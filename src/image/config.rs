//! The parts of OCI manifests, indexes and image configs microagent uses,
//! parsed with oci-spec from size-bounded bytes and checked (digests, the
//! layer/diff_id pairing) before anything acts on them.

use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::{ImageError, Result, MAX_JSON_BYTES};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// At most this many layers: more is a hostile or broken image.
pub const MAX_LAYERS: usize = 256;

/// A blob reference from a manifest, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// An image manifest reduced to what we pull and unpack.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub config: Blob,
    pub layers: Vec<Blob>,
}

/// What the image says about how to run it; the defaults of `exec` and of
/// the entrypoint the agent can start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A parsed image config.
#[derive(Debug, Clone)]
pub struct Config {
    pub run: RunConfig,
    pub diff_ids: Vec<Digest>,
    pub architecture: String,
    pub os: String,
}

fn bounded(what: &str, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            size: bytes.len() as u64,
            limit: MAX_JSON_BYTES,
        });
    }
    Ok(())
}

fn invalid(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(format!("{what} is not valid: {e}"))
}

/// The `mediaType` field of a manifest-like document, if any.
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    p.media_type
        .or_else(|| p.manifests.map(|_| OCI_INDEX.to_string()))
}

pub fn is_index(bytes: &[u8]) -> bool {
    matches!(
        media_type_of(bytes).as_deref(),
        Some(OCI_INDEX | DOCKER_LIST)
    )
}

fn blob(what: &str, digest: String, size: u64, media_type: String) -> Result<Blob> {
    let digest = Digest::parse(&digest).map_err(|e| invalid(what, e))?;
    Ok(Blob {
        digest,
        size,
        media_type,
    })
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest> {
    bounded("image manifest", bytes)?;
    let m = ImageManifest::from_reader(bytes).map_err(|e| invalid("image manifest", e))?;
    let c = m.config();
    let config = blob(
        "image manifest config",
        c.digest().to_string(),
        c.size(),
        c.media_type().to_string(),
    )?;
    if config.size > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: format!("image config {}", config.digest),
            size: config.size,
            limit: MAX_JSON_BYTES,
        });
    }
    if m.layers().len() > MAX_LAYERS {
        return Err(invalid(
            "image manifest",
            format!("{} layers (at most {MAX_LAYERS})", m.layers().len()),
        ));
    }
    let layers = m
        .layers()
        .iter()
        .map(|l| {
            blob(
                "image manifest layer",
                l.digest().to_string(),
                l.size(),
                l.media_type().to_string(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Manifest { config, layers })
}

/// One entry of an index: its manifest, platform and `ref.name` annotation.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub manifest: Blob,
    pub platform: Option<(String, String)>,
    pub ref_name: Option<String>,
}

pub fn parse_index(bytes: &[u8]) -> Result<Vec<IndexEntry>> {
    bounded("image index", bytes)?;
    let idx = ImageIndex::from_reader(bytes).map_err(|e| invalid("image index", e))?;
    idx.manifests()
        .iter()
        .map(|d| {
            Ok(IndexEntry {
                manifest: blob(
                    "image index entry",
                    d.digest().to_string(),
                    d.size(),
                    d.media_type().to_string(),
                )?,
                platform: d
                    .platform()
                    .as_ref()
                    .map(|p| (p.os().to_string(), p.architecture().to_string())),
                ref_name: d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned()),
            })
        })
        .collect()
}

/// The linux/amd64 entry of a multi-platform index (entries without a
/// platform count as a match only when they are the only entry).
pub fn select_platform(entries: &[IndexEntry]) -> Result<&IndexEntry> {
    let want = (Os::Linux.to_string(), Arch::Amd64.to_string());
    if let Some(e) = entries.iter().find(|e| e.platform.as_ref() == Some(&want)) {
        return Ok(e);
    }
    if let [only] = entries {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    let offered: Vec<String> = entries
        .iter()
        .map(|e| {
            e.platform
                .as_ref()
                .map_or("unknown".into(), |(o, a)| format!("{o}/{a}"))
        })
        .collect();
    Err(ImageError::Invalid(format!(
        "no linux/amd64 image in the index (it offers: {})",
        if offered.is_empty() {
            "nothing".to_string()
        } else {
            offered.join(", ")
        }
    )))
}

pub fn parse_config(bytes: &[u8]) -> Result<Config> {
    bounded("image config", bytes)?;
    let c = ImageConfiguration::from_reader(bytes).map_err(|e| invalid("image config", e))?;
    let run = c
        .config()
        .as_ref()
        .map(|cc| RunConfig {
            entrypoint: cc.entrypoint().clone().unwrap_or_default(),
            cmd: cc.cmd().clone().unwrap_or_default(),
            env: cc.env().clone().unwrap_or_default(),
            working_dir: cc.working_dir().clone().filter(|w| !w.is_empty()),
            user: cc.user().clone().filter(|u| !u.is_empty()),
        })
        .unwrap_or_default();
    let diff_ids = c
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| invalid("image config diff_ids", e)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Config {
        run,
        diff_ids,
        architecture: c.architecture().to_string(),
        os: c.os().to_string(),
    })
}

/// Checks that a config fits its manifest and this machine.
pub fn check_pair(manifest: &Manifest, config: &Config) -> Result<()> {
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::Invalid(format!(
            "image config lists {} layer diff_ids but the manifest has {} layers",
            config.diff_ids.len(),
            manifest.layers.len()
        )));
    }
    if config.os != "linux" || !matches!(config.architecture.as_str(), "amd64" | "x86_64") {
        return Err(ImageError::Invalid(format!(
            "image is {}/{}; microagent runs linux/amd64 guests",
            config.os, config.architecture
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn manifest_with_bad_digest_is_refused() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:../../etc","size":2}},
            "layers":[]}}"#
        );
        assert!(parse_manifest(m.as_bytes()).is_err());
    }

    #[test]
    fn oversized_config_is_refused_before_download() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":999999999}},
            "layers":[]}}"#,
            d('a')
        );
        assert!(matches!(
            parse_manifest(m.as_bytes()),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn index_resolves_linux_amd64() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":11,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('a'),
            d('b')
        );
        assert!(is_index(idx.as_bytes()));
        let entries = parse_index(idx.as_bytes()).unwrap();
        assert_eq!(
            select_platform(&entries)
                .unwrap()
                .manifest
                .digest
                .to_string(),
            d('b')
        );
        let arm_only = &entries[..1];
        let err = select_platform(arm_only).unwrap_err().to_string();
        assert!(err.contains("linux/arm64"), "{err}");
    }

    #[test]
    fn config_run_settings_and_diff_ids() {
        let c = format!(
            r#"{{"architecture":"amd64","os":"linux",
            "config":{{"Entrypoint":["/bin/sh"],"Cmd":["-c","echo"],"Env":["A=1"],"WorkingDir":"/w","User":"1000"}},
            "rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            d('c')
        );
        let cfg = parse_config(c.as_bytes()).unwrap();
        assert_eq!(cfg.run.entrypoint, vec!["/bin/sh"]);
        assert_eq!(cfg.run.working_dir.as_deref(), Some("/w"));
        assert_eq!(cfg.run.user.as_deref(), Some("1000"));
        assert_eq!(cfg.diff_ids.len(), 1);
    }
}
