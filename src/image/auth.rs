//! Registry credentials: `--creds USER:PASS`, else the Docker CLI's
//! `config.json` (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`),
//! else anonymous.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::{ImageError, Result};

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The registry host a config.json key names (keys may be URLs).
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    let host = key_host(key);
    host == registry || (hub(host) && hub(registry))
}

pub fn resolve(registry: &str, creds: Option<&str>) -> Result<RegistryAuth> {
    if let Some(c) = creds {
        let (user, pass) = c
            .split_once(':')
            .ok_or_else(|| ImageError::Invalid("--creds must be USER:PASSWORD".to_string()))?;
        return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
    }
    let Some(path) = docker_config_path() else {
        return Ok(RegistryAuth::Anonymous);
    };
    let Ok(bytes) = crate::util::fs::read_bounded(&path) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let cfg: DockerConfig = serde_json::from_slice(&bytes).map_err(ImageError::json(format!(
        "docker config {}",
        path.display()
    )))?;
    from_config(&cfg, registry, &path)
}

fn from_config(cfg: &DockerConfig, registry: &str, path: &std::path::Path) -> Result<RegistryAuth> {
    let Some(entry) = cfg
        .auths
        .iter()
        .find(|(k, _)| same_registry(k, registry))
        .map(|(_, v)| v)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.identitytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(auth) = &entry.auth {
        let bad = || {
            ImageError::Invalid(format!(
                "{}: the \"auth\" entry for {registry} is not base64 of USER:PASSWORD",
                path.display()
            ))
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (u, p) = text.split_once(':').ok_or_else(bad)?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_entries() {
        let cfg: DockerConfig = serde_json::from_str(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},
                "127.0.0.1:5000":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let p = std::path::Path::new("config.json");
        assert!(matches!(
            from_config(&cfg, "docker.io", p).unwrap(),
            RegistryAuth::Basic(u, pw) if u == "u" && pw == "p"
        ));
        assert!(matches!(
            from_config(&cfg, "127.0.0.1:5000", p).unwrap(),
            RegistryAuth::Basic(u, _) if u == "a"
        ));
        assert!(matches!(
            from_config(&cfg, "quay.io", p).unwrap(),
            RegistryAuth::Anonymous
        ));
    }
}
