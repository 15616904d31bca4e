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
//! The steps are the ordinary commands run as child processes of this
//! binary: the same code paths, locks and errors as a user typing them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::image::RegistryArgs;
use super::output::Out;
use crate::digest::{hex, sha256_file};
use crate::image::ops as image_ops;
use crate::image::progress::Progress;
use crate::image::store::ImageStore;
use crate::workspace::lock::WorkspaceLock;
use crate::workspace::store::{
    now_rfc3339, read_bounded, validate_name, write_atomic, NetworkMode, StateDir,
};

/// The snapshot tag inside every holder workspace.
pub const TAG: &str = "setup";
/// Hex digits of the key in a holder's name.
const KEY_CHARS: usize = 12;
const MARKER: &str = "checkpoint.json";

#[derive(Args)]
pub struct CheckpointArgs {
    /// Checkpoint name; its snapshots live in workspaces NAME-<key>.
    name: String,
    /// OCI image the setup runs in (pulled when not in the local store).
    #[arg(long)]
    image: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// A host file the setup needs: copied into --workdir before the setup
    /// runs, and its content is part of the key (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Fork a new workspace NEW from the checkpoint (hit or miss).
    #[arg(long, value_name = "NEW")]
    fork: Option<String>,
    /// Keep this many checkpoints of NAME (the newest); older ones are
    /// deleted after a miss.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    #[arg(long, value_enum, default_value_t = NetworkMode::User)]
    network: NetworkMode,
    /// Guest kernel (default as for `create`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Directory in the guest where the files land and the setup runs.
    #[arg(long, default_value = "/work")]
    workdir: String,
    /// The setup command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
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

/// Runs `microagent --json ARGS` and returns its JSON document, or its
/// error message as the error.
fn child_json(args: &[&str]) -> Result<Value> {
    let exe = std::env::current_exe().context("finding the microagent binary")?;
    let out = Command::new(&exe)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", exe.display(), args.join(" ")))?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if out.status.success() {
        return Ok(v);
    }
    let msg = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
    bail!("microagent {}: {msg}", args.first().copied().unwrap_or(""))
}

/// The setup itself: its output goes to our stderr (stdout stays ours for
/// the result), and its exit status comes back.
fn run_setup(holder: &str, workdir: &str, command: &[String]) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the microagent binary")?;
    let status = Command::new(&exe)
        .args(["exec", holder, "--workdir", workdir, "--"])
        .args(command)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .context("running the setup command")?;
    Ok(status.code().unwrap_or(255))
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
            .with_context(|| format!("--file {}: not a file name", f.display()))?;
        if !seen.insert(base.to_os_string()) {
            bail!(
                "--file {}: another listed file has the name {}; both would land in the same place",
                f.display(),
                base.to_string_lossy()
            );
        }
        let sha = sha256_file(f).with_context(|| format!("--file {}", f.display()))?;
        // The key holds what the guest sees, its name and content, not
        // where the host had it: CI checkouts move from run to run.
        out.push((base.to_string_lossy().into_owned(), sha));
    }
    Ok(out)
}

/// Deletes NAME's checkpoints beyond the newest `keep` (never `current`).
fn prune(state: &StateDir, name: &str, current: &str, keep: usize) -> Vec<String> {
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
        match child_json(&["delete", &ws, "--yes", "--force"]) {
            Ok(_) => pruned.push(ws),
            Err(e) => eprintln!("microagent: warning: pruning checkpoint {ws}: {e:#}"),
        }
    }
    pruned
}

/// Builds the holder: create, start, copy the files, run the setup,
/// snapshot, halt. Ok(Err(code)) when the setup itself failed.
fn build(
    holder: &str,
    args: &CheckpointArgs,
    image_digest: &str,
    kernel: &Path,
    say: &dyn Fn(&str),
) -> Result<std::result::Result<u64, i32>> {
    let vcpus = args.vcpus.to_string();
    let memory = args.memory.to_string();
    let kernel = kernel.display().to_string();
    say(&format!("creating workspace {holder}"));
    child_json(&[
        "create",
        holder,
        "--image",
        image_digest,
        "--vcpus",
        &vcpus,
        "--memory",
        &memory,
        "--network",
        args.network.name(),
        "--kernel",
        &kernel,
    ])?;
    say(&format!("starting {holder}"));
    let started = child_json(&["start", holder])?;
    say(&format!(
        "started ({} boot, {} ms)",
        started["boot"].as_str().unwrap_or("?"),
        started["start_ms"]
    ));
    let workdir = &args.workdir;
    let mkdir = run_setup(holder, "/", &["mkdir".into(), "-p".into(), workdir.clone()])?;
    if mkdir != 0 {
        bail!("creating {workdir} in {holder} failed with exit status {mkdir}");
    }
    for f in &args.files {
        let dest = format!("{holder}:{workdir}");
        child_json(&["cp", &f.display().to_string(), &dest])?;
    }
    say(&format!("running the setup: {}", args.command.join(" ")));
    let t = Instant::now();
    let code = run_setup(holder, workdir, &args.command)?;
    if code != 0 {
        return Ok(Err(code));
    }
    let setup_ms = ms_since(t);
    say(&format!("setup done in {setup_ms} ms; snapshotting"));
    child_json(&["snapshot", "create", holder, "--tag", TAG])?;
    child_json(&["halt", holder])?;
    Ok(Ok(setup_ms))
}

pub fn checkpoint(state: &StateDir, args: CheckpointArgs, out: &Out) -> Result<i32> {
    let t0 = Instant::now();
    validate_name(&args.name)?;
    if args.name.len() > 63 - 1 - KEY_CHARS {
        bail!(
            "checkpoint name {} is too long: at most {} characters (its workspaces are NAME-<12 hex>)",
            args.name,
            63 - 1 - KEY_CHARS
        );
    }
    if let Some(f) = &args.fork {
        validate_name(f)?;
    }
    if !args.workdir.starts_with('/') {
        bail!("--workdir {}: must be an absolute path", args.workdir);
    }
    let files = hash_files(&args.files)?;
    let kernel = match args.kernel.clone() {
        Some(k) => k,
        None => super::create::default_kernel()?,
    };
    let kernel_sha256 =
        sha256_file(&kernel).with_context(|| format!("hashing kernel {}", kernel.display()))?;
    let store = ImageStore::new(&state.root);
    let progress = Progress::for_output(out.json, out.quiet);
    let image = image_ops::ensure(&store, &args.image, &args.registry.options(), &progress)?;
    let image_digest = image.record.digest.to_string();
    let key = Inputs {
        image_digest: &image_digest,
        kernel_sha256: &kernel_sha256,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        network: args.network.name(),
        workdir: &args.workdir,
        command: &args.command,
        files: &files,
    }
    .key();
    let holder = holder_name(&args.name, &key);
    let quiet = out.quiet || out.json;
    let name = args.name.clone();
    let say = move |msg: &str| {
        if !quiet {
            eprintln!("checkpoint {name}: {msg}");
        }
    };

    std::fs::create_dir_all(state.root.join("checkpoints"))
        .with_context(|| format!("creating {}", state.root.join("checkpoints").display()))?;
    let lock_path = state
        .root
        .join("checkpoints")
        .join(format!("{}.lock", args.name));
    // Shared while we only read and fork; a miss upgrades to exclusive
    // (so two calls with the same inputs build once) and checks again.
    let mut lock = WorkspaceLock::acquire_shared(&lock_path)?;
    let mut hit = read_marker(state, &holder).is_some_and(|m| m.key == key);
    let mut setup_ms = None;
    let mut pruned = Vec::new();
    if !hit {
        drop(lock);
        lock = WorkspaceLock::acquire(&lock_path)?;
        hit = read_marker(state, &holder).is_some_and(|m| m.key == key);
        if !hit {
            say(&format!("cache miss (key {})", &key[..KEY_CHARS]));
            if state.workspaces().join(&holder).exists() {
                // A build that died half-way: start over.
                child_json(&["delete", &holder, "--yes", "--force"])?;
            }
            match build(&holder, &args, &image_digest, &kernel, &say) {
                Ok(Ok(ms)) => {
                    write_marker(state, &holder, &args, &key, &image_digest, ms)?;
                    setup_ms = Some(ms);
                }
                Ok(Err(code)) => {
                    let _ = child_json(&["delete", &holder, "--yes", "--force"]);
                    eprintln!(
                        "microagent: checkpoint {}: the setup exited with status {code}; nothing was kept",
                        args.name
                    );
                    if out.json {
                        println!(
                            "{}",
                            json!({"error": format!("the setup exited with status {code}; nothing was kept"), "setup_exit": code})
                        );
                    }
                    return Ok(code);
                }
                Err(e) => {
                    let _ = child_json(&["delete", &holder, "--yes", "--force"]);
                    return Err(e.context(format!(
                        "checkpoint {}: building {holder} failed; nothing was kept",
                        args.name
                    )));
                }
            }
            pruned = prune(state, &args.name, &holder, args.keep);
        }
        drop(lock);
        lock = WorkspaceLock::acquire_shared(&lock_path)?;
    }
    let lookup_ms = ms_since(t0);
    let snapshot = format!("{holder}:{TAG}");
    let mut fork_ms = None;
    if let Some(new) = &args.fork {
        let t = Instant::now();
        child_json(&["create", new, "--from-snapshot", &snapshot])?;
        fork_ms = Some(ms_since(t));
    }
    drop(lock);
    let cache = if hit { "hit" } else { "miss" };
    let mut human = format!(
        "checkpoint {}: cache {cache} (key {}), snapshot {snapshot}",
        args.name,
        &key[..KEY_CHARS]
    );
    match setup_ms {
        Some(ms) => human.push_str(&format!(", setup ran in {:.1} s", ms as f64 / 1e3)),
        None => human.push_str(&format!(", found in {lookup_ms} ms")),
    }
    if let (Some(new), Some(ms)) = (&args.fork, fork_ms) {
        human.push_str(&format!("; forked {new} in {:.1} s", ms as f64 / 1e3));
    }
    if !pruned.is_empty() {
        human.push_str(&format!("; pruned {}", pruned.join(", ")));
    }
    out.done(
        &human,
        json!({
            "name": args.name,
            "key": key,
            "cache": cache,
            "workspace": holder,
            "tag": TAG,
            "snapshot": snapshot,
            "setup_ms": setup_ms,
            "fork": args.fork,
            "fork_ms": fork_ms,
            "total_ms": ms_since(t0),
            "pruned": pruned,
        }),
    );
    Ok(0)
}

fn write_marker(
    state: &StateDir,
    holder: &str,
    args: &CheckpointArgs,
    key: &str,
    image_digest: &str,
    setup_ms: u64,
) -> Result<()> {
    let marker = Marker {
        name: args.name.clone(),
        key: key.to_string(),
        image_digest: image_digest.to_string(),
        command: args.command.clone(),
        files: args.files.iter().map(|f| f.display().to_string()).collect(),
        created: now_rfc3339(),
        setup_ms,
    };
    let path = state.workspaces().join(holder).join(MARKER);
    write_atomic(&path, &serde_json::to_vec_pretty(&marker)?)?;
    Ok(())
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
