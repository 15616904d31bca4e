//! Image references, normalised the way Docker does it
//! (`alpine` → `docker.io/library/alpine:latest`; digests accepted).

use oci_client::Reference;

use super::{ImageError, Result};

pub fn parse(s: &str) -> Result<Reference> {
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageError::Reference {
            reference: s.to_string(),
            reason: "empty, too long, or contains whitespace".into(),
        });
    }
    s.parse::<Reference>().map_err(|e| ImageError::Reference {
        reference: s.to_string(),
        reason: e.to_string(),
    })
}

/// The canonical text of a reference (`registry/repo:tag` or `…@digest`).
pub fn normalise(s: &str) -> Result<String> {
    Ok(parse(s)?.whole())
}

/// Registries that are reached over plain HTTP without asking: the ones on
/// this machine (a registry on loopback cannot be intercepted off-host).
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                registry
            }
        }),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        assert_eq!(
            normalise("alpine").unwrap(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            normalise("alpine:3.20").unwrap(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            normalise("127.0.0.1:5000/test/debian:12").unwrap(),
            "127.0.0.1:5000/test/debian:12"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalise(&format!("alpine@{d}")).unwrap(),
            format!("docker.io/library/alpine@{d}")
        );
        assert!(normalise("").is_err());
        assert!(normalise("repo@sha256:short").is_err());
        assert!(normalise("a b").is_err());
    }

    #[test]
    fn loopback_registries() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost:5000"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("docker.io"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
    }
}
