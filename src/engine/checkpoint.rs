//! `checkpoint`: run a setup once per set of inputs, keep the result as a
//! snapshot, and fork from it on every later call with the same inputs.
//!
//! The key is the sha256 of what the setup's result depends on: the image's
//! manifest digest, the kernel's sha256, vCPUs, memory, network mode, the
//! working directory, the command, and each listed file's name and content.
//! The snapshot lives in a holder workspace `NAME-<key12>` under tag
//! `setup`, halted once the snapshot is taken. A holder only counts once
//! its `checkpoint.json` is written, after the snapshot: a crash mid-setup
//! leaves no hit behind, and the next call rebuilds.
//!
//! The steps are the engine's own operations: the same code paths, locks
//! and errors as a user running them one by one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::create::{default_kernel, CreateOptions, RegistryOptions, RootSource};
use super::fork::ForkOptions;
use super::lifecycle::StartOptions;
use super::{invalid, Engine, Error, IoContext, Reporter, Result, Silent};
use crate::digest::{hex, sha256_file, sha256_file_cached};
use crate::image::ops as image_ops;
use crate::image::store::ImageStore;
use crate::util::lock::FileLock;
use crate::workspace::store::{
    now_rfc3339, read_bounded, validate_name, write_atomic, NetworkMode, StateDir,
};

/// The snapshot tag inside every holder workspace.
pub const TAG: &str = "setup";
/// Hex digits of the key in a holder's name.
const KEY_CHARS: usize = 12;
const MARKER: &str = "checkpoint.json";

/// What a checkpoint takes.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// OCI image the setup runs in (pulled when not in the local store).
    pub image: String,
    pub registry: RegistryOptions,
    /// Host files copied into `workdir` before the setup; their names and
    /// contents are part of the key.
    pub files: Vec<PathBuf>,
    /// Fork a new workspace from the checkpoint (hit or miss).
    pub fork: Option<String>,
    /// Keep this many checkpoints of the name (the newest).
    pub keep: usize,
    pub vcpus: u64,
    pub memory: u64,
    pub network: NetworkMode,
    pub kernel: Option<PathBuf>,
    /// Directory in the guest where the files land and the setup runs.
    pub workdir: String,
    pub command: Vec<String>,
}

/// What a checkpoint did.
#[derive(Debug, Clone)]
pub struct Checkpointed {
    pub key: String,
    pub hit: bool,
    /// The holder workspace.
    pub workspace: String,
    /// `HOLDER:TAG`.
    pub snapshot: String,
    pub setup_ms: Option<u64>,
    pub fork_ms: Option<u64>,
    pub total_ms: u64,
    pub pruned: Vec<String>,
}

/// What a finished holder records about itself.
#[derive(Serialize, Deserialize)]
struct Marker {
    name: String,
    key: String,
    image_digest: String,
    command: Vec<String>,
    files: Vec<String>,
    created: String,
    setup_ms: u64,
}

/// The inputs the key is made of, in a fixed order.
struct Inputs<'a> {
    image_digest: &'a str,
    kernel_sha256: &'a str,
    vcpus: u64,
    memory_mib: u64,
    network: &'a str,
    workdir: &'a str,
    command: &'a [String],
    /// (file name, sha256 of its content)
    files: &'a [(String, String)],
}

impl Inputs<'_> {
    fn key(&self) -> String {
        let mut h = Sha256::new();
        // Length-prefixed fields: no two input lists hash alike.
        let mut field = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        field("microagent-checkpoint-v1");
        field(self.image_digest);
        field(self.kernel_sha256);
        field(&self.vcpus.to_string());
        field(&self.memory_mib.to_string());
        field(self.network);
        field(self.workdir);
        field(&self.command.len().to_string());
        for a in self.command {
            field(a);
        }
        field(&self.files.len().to_string());
        for (path, sha) in self.files {
            field(path);
            field(sha);
        }
        hex(&h.finalize())
    }
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

fn holder_name(name: &str, key: &str) -> String {
    format!("{name}-{}", &key[..KEY_CHARS])
}

fn read_marker(state: &StateDir, holder: &str) -> Option<Marker> {
    let path = state.workspaces().join(holder).join(MARKER);
    let data = read_bounded(&path).ok()?;
    serde_json::from_slice(&data).ok()
}

/// (file name, sha256 of content) of the listed files, refusing two that
/// would land on one path.
fn hash_files(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for f in files {
        let base = f
            .file_name()
            .ok_or_else(|| invalid(format!("--file {}: not a file name", f.display())))?;
        if !seen.insert(base.to_os_string()) {
            return Err(invalid(format!(
                "--file {}: another listed file has the name {}; both would land in the same place",
                f.display(),
                base.to_string_lossy()
            )));
        }
        let sha = sha256_file(f).io_ctx(|| format!("--file {}", f.display()))?;
        // The key holds what the guest sees, its name and content, not
        // where the host had it: CI checkouts move from run to run.
        out.push((base.to_string_lossy().into_owned(), sha));
    }
    Ok(out)
}

/// Builds the holder: create, start, copy the files, run the setup,
/// snapshot, halt. Ok(Err(code)) when the setup itself failed.
fn build(
    engine: &Engine,
    holder: &str,
    opts: &CheckpointOptions,
    image_digest: &str,
    kernel: &Path,
    report: &dyn Reporter,
    setup_output: &mut dyn Write,
) -> Result<std::result::Result<u64, i32>> {
    report.step(&format!("creating workspace {holder}"));
    let mut create = CreateOptions::new(RootSource::Image(image_digest.to_string()));
    create.vcpus = opts.vcpus;
    create.memory = opts.memory;
    create.network = opts.network;
    create.kernel = Some(kernel.to_path_buf());
    // Its one snapshot is the checkpoint; halting it keeps nothing more.
    create.auto_snapshot_on_stop = false;
    // The image is the whole root the key names: no personal layer on top.
    create.personal = false;
    engine.create(holder, &create, report)?;
    report.step(&format!("starting {holder}"));
    let start = StartOptions {
        wait: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let started = engine.start(holder, &start, &Silent::default())?;
    report.step(&format!(
        "started ({} boot, {} ms)",
        started.boot.name(),
        started.start_ms
    ));
    let workdir = &opts.workdir;
    let mkdir = ["mkdir".to_string(), "-p".into(), workdir.clone()];
    let code = engine.exec_to(holder, &mkdir, "/", setup_output)?;
    if code != 0 {
        return Err(invalid(format!(
            "creating {workdir} in {holder} failed with exit status {code}"
        )));
    }
    for f in &opts.files {
        engine.copy_in(f, holder, workdir)?;
    }
    report.step(&format!("running the setup: {}", opts.command.join(" ")));
    let t = Instant::now();
    let code = engine.exec_to(holder, &opts.command, workdir, setup_output)?;
    if code != 0 {
        return Ok(Err(code));
    }
    let setup_ms = ms_since(t);
    report.step(&format!("setup done in {setup_ms} ms; snapshotting"));
    engine.snapshot_create(holder, Some(TAG), report)?;
    engine.halt(holder, Duration::from_secs(10), report)?;
    Ok(Ok(setup_ms))
}

impl Engine {
    /// Finds or builds checkpoint `name` for these inputs and, with
    /// `opts.fork`, forks a workspace from it. The setup's output goes to
    /// `setup_output`. A failing setup keeps nothing and fails with
    /// `setup_failed` carrying its exit status.
    pub fn checkpoint(
        &self,
        name: &str,
        opts: &CheckpointOptions,
        report: &dyn Reporter,
        setup_output: &mut dyn Write,
    ) -> Result<Checkpointed> {
        let t0 = Instant::now();
        let state = &self.state;
        validate_name(name)?;
        if name.len() > 63 - 1 - KEY_CHARS {
            return Err(invalid(format!(
                "checkpoint name {name} is too long: at most {} characters (its workspaces are NAME-<12 hex>)",
                63 - 1 - KEY_CHARS
            )));
        }
        if let Some(f) = &opts.fork {
            validate_name(f)?;
        }
        if !opts.workdir.starts_with('/') {
            return Err(invalid(format!(
                "--workdir {}: must be an absolute path",
                opts.workdir
            )));
        }
        let files = hash_files(&opts.files)?;
        let kernel = match opts.kernel.clone() {
            Some(k) => k,
            None => default_kernel()?,
        };
        let kernel_sha256 = sha256_file_cached(&kernel, &state.hash_cache())
            .io_ctx(|| format!("hashing kernel {}", kernel.display()))?;
        let store = ImageStore::new(&state.root);
        let image = image_ops::ensure(
            &store,
            &opts.image,
            &opts.registry.pull_options(),
            report.image_progress(),
        )?;
        let image_digest = image.record.digest.to_string();
        let key = Inputs {
            image_digest: &image_digest,
            kernel_sha256: &kernel_sha256,
            vcpus: opts.vcpus,
            memory_mib: opts.memory,
            network: opts.network.name(),
            workdir: &opts.workdir,
            command: &opts.command,
            files: &files,
        }
        .key();
        let holder = holder_name(name, &key);
        let checkpoints = state.root.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)
            .io_ctx(|| format!("creating {}", checkpoints.display()))?;
        let lock_path = checkpoints.join(format!("{name}.lock"));
        // Shared while we only read and fork; a miss upgrades to exclusive
        // (so two calls with the same inputs build once) and checks again.
        let mut lock = FileLock::acquire_shared(&lock_path)?;
        let mut hit = read_marker(state, &holder).is_some_and(|m| m.key == key);
        let mut setup_ms = None;
        let mut pruned = Vec::new();
        if !hit {
            drop(lock);
            lock = FileLock::acquire(&lock_path)?;
            hit = read_marker(state, &holder).is_some_and(|m| m.key == key);
            if !hit {
                report.step(&format!("cache miss (key {})", &key[..KEY_CHARS]));
                if state.workspaces().join(&holder).exists() {
                    // A build that died half-way: start over.
                    self.delete(&holder, true)?;
                }
                match build(
                    self,
                    &holder,
                    opts,
                    &image_digest,
                    &kernel,
                    report,
                    setup_output,
                ) {
                    Ok(Ok(ms)) => {
                        write_marker(state, name, &holder, opts, &key, &image_digest, ms)?;
                        setup_ms = Some(ms);
                    }
                    Ok(Err(exit_code)) => {
                        let _ = self.delete(&holder, true);
                        return Err(Error::SetupFailed {
                            checkpoint: name.to_string(),
                            exit_code,
                        });
                    }
                    Err(e) => {
                        let _ = self.delete(&holder, true);
                        return Err(Error::Context {
                            context: format!(
                                "checkpoint {name}: building {holder} failed; nothing was kept"
                            ),
                            source: Box::new(e),
                        });
                    }
                }
                pruned = self.prune_checkpoints(name, &holder, opts.keep, report);
            }
            drop(lock);
            lock = FileLock::acquire_shared(&lock_path)?;
        }
        let snapshot = format!("{holder}:{TAG}");
        let mut fork_ms = None;
        if let Some(new) = &opts.fork {
            let t = Instant::now();
            let fork = ForkOptions {
                from: &snapshot,
                wait: Some(Duration::from_secs(600)),
                secret_overrides: &[],
                ports: &[],
                settings: Default::default(),
                registry: Default::default(),
            };
            self.fork(new, &fork, report)?;
            fork_ms = Some(ms_since(t));
        }
        drop(lock);
        Ok(Checkpointed {
            key,
            hit,
            workspace: holder,
            snapshot,
            setup_ms,
            fork_ms,
            total_ms: ms_since(t0),
            pruned,
        })
    }

    /// Deletes NAME's checkpoints beyond the newest `keep` (never `current`).
    fn prune_checkpoints(
        &self,
        name: &str,
        current: &str,
        keep: usize,
        report: &dyn Reporter,
    ) -> Vec<String> {
        let state = &self.state;
        let mut holders: Vec<(String, String)> = state
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|ws| ws != current)
            .filter_map(|ws| {
                let m = read_marker(state, &ws)?;
                (m.name == name).then_some((m.created, ws))
            })
            .collect();
        holders.sort();
        // `current` is the newest and counts towards `keep`.
        let excess = (holders.len() + 1).saturating_sub(keep.max(1));
        let mut pruned = Vec::new();
        for (_, ws) in holders.into_iter().take(excess) {
            match self.delete(&ws, true) {
                Ok(()) => pruned.push(ws),
                Err(e) => report.warn(&format!("pruning checkpoint {ws}: {e}")),
            }
        }
        pruned
    }
}

fn write_marker(
    state: &StateDir,
    name: &str,
    holder: &str,
    opts: &CheckpointOptions,
    key: &str,
    image_digest: &str,
    setup_ms: u64,
) -> Result<()> {
    let marker = Marker {
        name: name.to_string(),
        key: key.to_string(),
        image_digest: image_digest.to_string(),
        command: opts.command.clone(),
        files: opts.files.iter().map(|f| f.display().to_string()).collect(),
        created: now_rfc3339(),
        setup_ms,
    };
    let path = state.workspaces().join(holder).join(MARKER);
    let json = serde_json::to_vec_pretty(&marker).map_err(std::io::Error::other);
    json.io_ctx(|| "encoding the checkpoint marker".into())
        .and_then(|j| Ok(write_atomic(&path, &j)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(command: &'a [String], files: &'a [(String, String)]) -> Inputs<'a> {
        Inputs {
            image_digest: "sha256:aa",
            kernel_sha256: "bb",
            vcpus: 1,
            memory_mib: 512,
            network: "user",
            workdir: "/work",
            command,
            files,
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let cmd = vec!["make".to_string(), "deps".to_string()];
        let files = vec![("req.txt".to_string(), "cc".to_string())];
        let base = inputs(&cmd, &files).key();
        assert_eq!(base, inputs(&cmd, &files).key(), "stable");
        let joined = vec!["make deps".to_string()];
        assert_ne!(base, inputs(&joined, &files).key(), "argv split matters");
        let other_file = vec![("req.txt".to_string(), "cd".to_string())];
        assert_ne!(base, inputs(&cmd, &other_file).key(), "file content");
        assert_ne!(base, inputs(&cmd, &[]).key(), "file list");
        let mut i = inputs(&cmd, &files);
        i.kernel_sha256 = "bc";
        assert_ne!(base, i.key(), "kernel");
        let mut i = inputs(&cmd, &files);
        i.image_digest = "sha256:ab";
        assert_ne!(base, i.key(), "image");
        let mut i = inputs(&cmd, &files);
        i.memory_mib = 1024;
        assert_ne!(base, i.key(), "memory");
        assert_eq!(holder_name("ci", &base).len(), 2 + 1 + KEY_CHARS);
    }

    #[test]
    fn duplicate_file_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("x"), b"1").unwrap();
        std::fs::write(dir.path().join("x"), b"2").unwrap();
        let err = hash_files(&[a.join("x"), dir.path().join("x")]).unwrap_err();
        assert!(err.to_string().contains("same place"), "{err}");
        let ok = hash_files(&[a.join("x")]).unwrap();
        assert_eq!(ok[0].1, crate::digest::sha256_bytes(b"1"));
        // Where the file lives on the host is not an input.
        std::fs::write(dir.path().join("y"), b"1").unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/x"), b"1").unwrap();
        assert_eq!(hash_files(&[dir.path().join("b/x")]).unwrap(), ok);
        assert_ne!(
            hash_files(&[dir.path().join("y")]).unwrap(),
            ok,
            "the name is"
        );
    }
}
