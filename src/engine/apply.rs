//! `apply -f` and `create -f`: workspaces made from a definition file
//! (`workspace::definition`), dependencies first, each left running.
//!
//! A workspace made by apply keeps its definition (`definition.json`).
//! Applying again leaves an equal one alone (started if it was not) and
//! refuses, before anything is done, when one differs: the fields that
//! changed are named and nothing is replaced behind the user's back.
//! Setup steps run through `checkpoint` (the same key, holder and cache):
//! a second apply with the same inputs forks the kept snapshot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::checkpoint::CheckpointOptions;
use super::create::{CreateOptions, RegistryOptions, RootSource};
use super::fork::ForkOptions;
use super::lifecycle::StartOptions;
use super::{conflict, invalid, Engine, Error, IoContext, Reporter, Result, Silent};
use crate::devices::virtio::net::config::PortMap;
use crate::util::fs::{read_bounded, write_atomic};
use crate::workspace::definition::Definition;
use crate::workspace::secrets::{read_value_file, Value};
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::NetworkMode;
use crate::workspace::volume::parse_mount;

const DEFINITION_FILE: &str = "definition.json";
/// How long a started workspace's agent is waited for.
const AGENT_WAIT: Duration = Duration::from_secs(600);

/// What to do with a workspace of the file that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Leave it when equal, refuse when changed (`apply`).
    KeepEqual,
    /// Refuse (`create -f`).
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Created,
    Unchanged,
}

/// What apply did with one workspace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub name: String,
    pub action: Action,
    /// It was started by this apply.
    pub started: bool,
    /// With setup steps: whether the checkpoint was found (`true`) or
    /// built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_cached: Option<bool>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub registry: RegistryOptions,
    pub kernel: Option<PathBuf>,
}

/// The top-level fields of `new` that differ from `old`.
fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return vec!["(the whole definition)".into()];
    };
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| o.get(*k) != n.get(*k))
        .cloned()
        .collect()
}

/// Each secret's value, read from the host now.
fn secret_values(def: &Definition) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for (key, src) in &def.secrets {
        let key = &key.0;
        let value = match (&src.env, &src.file) {
            (Some(var), _) => {
                let v = std::env::var_os(var).ok_or_else(|| {
                    invalid(format!(
                        "workspace {}: secret {key} comes from ${var}, which is not set",
                        def.name.0
                    ))
                })?;
                Value::new(std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec())
            }
            (None, Some(file)) => read_value_file(key, std::path::Path::new(file))?,
            (None, None) => unreachable!("checked when read"),
        };
        out.push((key.clone(), value));
    }
    Ok(out)
}

impl Engine {
    /// The definition an existing workspace was made from, if any.
    fn stored_definition(&self, name: &str) -> Result<Option<serde_json::Value>> {
        let path = self.state.workspaces().join(name).join(DEFINITION_FILE);
        match read_bounded(&path) {
            Ok(d) => Ok(Some(serde_json::from_slice(&d).map_err(|e| {
                invalid(format!("{}: not a definition: {e}", path.display()))
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).io_ctx(|| path.display().to_string()),
        }
    }

    /// Makes (or finds) and starts every workspace of `defs`, in order
    /// (dependencies first, as `definition::parse` returns them).
    pub fn apply(
        &self,
        defs: &[Definition],
        existing: Existing,
        opts: &ApplyOptions,
        report: &dyn Reporter,
    ) -> Result<Vec<Applied>> {
        // Check every workspace before touching any.
        // None: present already; Some: to make, with its secrets (read
        // first, so a missing one stops the apply before anything is made).
        let mut to_make = Vec::new();
        for def in defs {
            let name = &def.name.0;
            if !self
                .state
                .workspaces()
                .join(name)
                .join("workspace.json")
                .exists()
            {
                to_make.push(Some(secret_values(def)?));
                continue;
            }
            if existing == Existing::Refuse {
                return Err(Error::AlreadyExists {
                    kind: "workspace",
                    name: name.clone(),
                });
            }
            let new = serde_json::to_value(def).expect("a definition serialises");
            match self.stored_definition(name)? {
                None => {
                    return Err(conflict(
                        name,
                        format!("workspace {name} exists and was not made from a definition: delete it or rename it in the file"),
                    ))
                }
                Some(old) if old != new => {
                    return Err(conflict(
                        name,
                        format!(
                            "workspace {name} differs from its definition in: {}; nothing was changed (delete it and apply again to remake it)",
                            changed_fields(&old, &new).join(", ")
                        ),
                    ))
                }
                Some(_) => to_make.push(None),
            }
        }
        let mut out = Vec::new();
        for (def, make) in defs.iter().zip(to_make) {
            let t = Instant::now();
            let name = &def.name.0;
            let (action, started, setup_cached) = match make {
                None => {
                    report.step(&format!("workspace {name}: unchanged"));
                    (Action::Unchanged, self.ensure_running(name)?, None)
                }
                Some(secrets) => {
                    report.step(&format!("workspace {name}: creating"));
                    let cached = self.apply_new(def, secrets, opts, report)?;
                    (Action::Created, true, cached)
                }
            };
            out.push(Applied {
                name: name.clone(),
                action,
                started,
                setup_cached,
                duration_ms: t.elapsed().as_millis() as u64,
            });
        }
        Ok(out)
    }

    /// Starts `name` unless it runs; whether it was started.
    fn ensure_running(&self, name: &str) -> Result<bool> {
        let ws = self.state.existing(name)?;
        let rec = ws.read()?;
        match reconcile(&ws, &rec).0 {
            Status::Running => Ok(false),
            Status::Paused => {
                self.resume(name)?;
                Ok(true)
            }
            _ => {
                let start = StartOptions {
                    wait: Some(AGENT_WAIT),
                    ..Default::default()
                };
                self.start(name, &start, &Silent::default())?;
                Ok(true)
            }
        }
    }

    /// Creates and starts one workspace; with setup steps, whether the
    /// checkpoint was cached.
    fn apply_new(
        &self,
        def: &Definition,
        secrets: Vec<(String, Value)>,
        opts: &ApplyOptions,
        report: &dyn Reporter,
    ) -> Result<Option<bool>> {
        let name = &def.name.0;
        let ports: Vec<PortMap> = def.ports.iter().filter_map(|p| p.0.parse().ok()).collect();
        let network = match def.network.0.as_str() {
            "none" => NetworkMode::None,
            _ => NetworkMode::User,
        };
        let mut mounts = Vec::new();
        for v in &def.volumes {
            let m = parse_mount(&v.0).map_err(invalid)?;
            if !self.state.root.join("volumes").join(&m.volume).exists() {
                report.step(&format!("creating volume {}", m.volume));
                self.volume_create(&m.volume, None, None)?;
            }
            mounts.push(m);
        }
        let source = RootSource::BaseSnapshot(def.base_snapshot.0.clone());
        let home = def.home_snapshot.as_ref().map(|h| h.0.clone());
        let cached = if def.setup.is_empty() {
            let create = CreateOptions {
                registry: opts.registry.clone(),
                vcpus: def.vcpus.0,
                memory: def.memory.0,
                kernel: opts.kernel.clone(),
                network,
                publish: ports,
                secrets,
                volumes: mounts,
                home_snapshot: home,
                personal: def.personal,
                ..CreateOptions::new(source)
            };
            self.create(name, &create, report)?;
            self.write_definition(def)?;
            self.ensure_running(name)?;
            None
        } else {
            if !mounts.is_empty() {
                return Err(invalid(format!(
                    "workspace {name}: setup steps run once in a kept checkpoint, which holds no volumes; move the volumes to a workspace without setup, or the setup into the image"
                )));
            }
            let (image, shown) = self.root_image(
                &source,
                &opts.registry,
                home.as_deref(),
                def.personal,
                report,
            )?;
            // The setup sees the definition's env, as later execs do.
            let steps: Vec<String> = def
                .env
                .iter()
                .map(|(k, v)| format!("export {}='{}'", k.0, v.replace('\'', "'\\''")))
                .chain(def.setup.iter().map(|s| s.0.clone()))
                .collect();
            let checkpoint = CheckpointOptions {
                image: image.digest.to_string(),
                registry: opts.registry.clone(),
                files: Vec::new(),
                fork: None,
                keep: 2,
                vcpus: def.vcpus.0,
                memory: def.memory.0,
                network,
                kernel: opts.kernel.clone(),
                workdir: "/".into(),
                command: vec!["/bin/sh".into(), "-ec".into(), steps.join("\n")],
            };
            let mut output = Vec::new();
            let done = self.checkpoint(name, &checkpoint, report, &mut output);
            let done = done.map_err(|e| match e {
                Error::SetupFailed { .. } => Error::Context {
                    context: format!(
                        "workspace {name}'s setup failed; its output:\n{}",
                        String::from_utf8_lossy(&output[output.len().saturating_sub(4096)..])
                    ),
                    source: Box::new(e),
                },
                e => e,
            })?;
            let fork = ForkOptions {
                from: &done.snapshot,
                wait: Some(AGENT_WAIT),
                secret_overrides: &secrets,
                ports: &ports,
                settings: Default::default(),
                registry: opts.registry.clone(),
            };
            self.fork(name, &fork, report)?;
            self.write_definition(def)?;
            // A fork shows its holder's image, the stacked digest.
            let base = match &source {
                RootSource::BaseSnapshot(b) => b.clone(),
                _ => unreachable!("made above"),
            };
            self.finish_record(name, def, Some(shown.unwrap_or(base)))?;
            return Ok(Some(done.hit));
        };
        self.finish_record(name, def, None)?;
        Ok(cached)
    }

    fn write_definition(&self, def: &Definition) -> Result<()> {
        let path = self
            .state
            .workspaces()
            .join(&def.name.0)
            .join(DEFINITION_FILE);
        let data = serde_json::to_vec_pretty(def).expect("a definition serialises");
        write_atomic(&path, &data).io_ctx(|| path.display().to_string())
    }

    /// The definition's env over the image's, as exec's defaults, and
    /// the image as `ls` shows it.
    fn finish_record(&self, name: &str, def: &Definition, shown: Option<String>) -> Result<()> {
        if def.env.is_empty() && shown.is_none() {
            return Ok(());
        }
        let super::Opened { ws, mut rec, .. } = super::open(&self.state, name)?;
        if shown.is_some() {
            rec.image = shown;
        }
        let config = rec.image_config.get_or_insert_with(Default::default);
        for (k, v) in &def.env {
            let prefix = format!("{}=", k.0);
            config.env.retain(|e| !e.starts_with(&prefix));
            config.env.push(format!("{prefix}{v}"));
        }
        ws.write(&rec)?;
        Ok(())
    }
}

/// Reads and checks definition file `path` (dependencies first).
pub fn read_definitions(path: &std::path::Path) -> Result<Vec<Definition>> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).io_ctx(|| shown.clone())?;
    if meta.len() > crate::workspace::definition::MAX_DEFINITION_BYTES as u64 {
        return Err(invalid(format!("{shown}: larger than 1 MiB")));
    }
    let text = std::fs::read_to_string(path).io_ctx(|| shown.clone())?;
    parse_definitions(&text, &shown)
}

/// Checks definition `text`, named `label` in errors (dependencies first).
pub fn parse_definitions(text: &str, label: &str) -> Result<Vec<Definition>> {
    crate::workspace::definition::parse(text, label).map_err(|e| invalid(e.to_string()))
}
