//! Test images: OCI layouts written here (layers from crafted tars, or
//! layers added on top of a base layout), and a real local registry
//! (Debian's docker-registry with htpasswd auth) that skopeo pushes into.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar entry for crafted layers: (name, kind, content or link target).
pub type Entry<'a> = (&'a str, tar::EntryType, &'a str);

/// Builds an uncompressed tar without the tar crate's path checks, so
/// hostile names (`../x`, writes through symlinks) can be written.
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let body: &[u8] = if *kind == tar::EntryType::Regular {
            data.as_bytes()
        } else {
            b""
        };
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            let raw = &mut h.as_old_mut().linkname;
            raw.fill(0);
            raw[..data.len()].copy_from_slice(data.as_bytes());
        }
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

fn write_blob(out: &Path, data: &[u8]) -> (String, u64) {
    let hex = sha256(data);
    let dir = out.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len() as u64)
}

/// Writes an OCI layout at `out`: the base layout's layers (if any), then
/// `layers` (uncompressed tars, gzip-compressed here), with `config`
/// entries (Env, WorkingDir, …) merged into the image config.
pub fn layout(out: &Path, base: Option<&Path>, layers: &[Vec<u8>], config: Value, ref_name: &str) {
    std::fs::create_dir_all(out.join("blobs/sha256")).unwrap();
    let (mut manifest, mut cfg) = match base {
        Some(b) => {
            let index: Value =
                serde_json::from_slice(&std::fs::read(b.join("index.json")).unwrap()).unwrap();
            let md = index["manifests"][0]["digest"].as_str().unwrap();
            let blob = |d: &str| {
                std::fs::read(b.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap()
            };
            let manifest: Value = serde_json::from_slice(&blob(md)).unwrap();
            let cfg: Value =
                serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap()))
                    .unwrap();
            for l in manifest["layers"].as_array().unwrap() {
                let d = l["digest"].as_str().unwrap();
                write_blob(out, &blob(d));
            }
            (manifest, cfg)
        }
        None => (
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}),
            json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}),
        ),
    };
    for tar in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap();
        let (digest, size) = write_blob(out, &gz.finish().unwrap());
        manifest["layers"].as_array_mut().unwrap().push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
        cfg["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(json!(format!("sha256:{}", sha256(tar))));
    }
    if let Value::Object(extra) = config {
        for (k, v) in extra {
            cfg["config"][k] = v;
        }
    }
    let (cd, cs) = write_blob(out, &serde_json::to_vec(&cfg).unwrap());
    manifest["config"] =
        json!({"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs});
    let (md, ms) = write_blob(out, &serde_json::to_vec(&manifest).unwrap());
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
            "platform": {"architecture": "amd64", "os": "linux"}}]});
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The digest (hex) of the first layer blob of a layout.
pub fn first_layer(layout: &Path) -> PathBuf {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(md)).unwrap())
            .unwrap();
    let d = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    layout.join("blobs/sha256").join(d)
}

/// Runs a script from scripts/ and returns its last stdout line (a path).
pub fn script_path(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(super::repo_root().join("scripts").join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap_or_default().trim())
}

/// A docker-registry on 127.0.0.1 with one htpasswd user, removed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    pub user: &'static str,
    pub password: &'static str,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let (user, password) = ("tester", "s3cret-pass");
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd (apt-get install apache2-utils)");
        assert!(htpasswd.status.success());
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: microagent-test\n    path: {}\n",
            dir.path().join("data").display(),
            dir.path().join("htpasswd").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let start = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry {
            child,
            addr,
            user,
            password,
            _dir: dir,
        }
    }

    /// Where the registry keeps its files (to tamper with a blob).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    pub fn creds(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    /// Pushes the image named `ref_name` of an OCI layout as `repo:tag`.
    pub fn push(&self, layout: &Path, ref_name: &str, repo_tag: &str) -> String {
        let dest = format!("{}/{repo_tag}", self.addr);
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-creds",
                &self.creds(),
            ])
            .arg(format!("oci:{}:{ref_name}", layout.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dest
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
