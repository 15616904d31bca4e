//! create: a workspace from an image or a root disk, or a fork of a snapshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::output::{print_record, Out};
use crate::devices::virtio::net::config::PortMap;
use crate::engine::apply::Existing;
use crate::engine::auto_snapshot::Settings;
use crate::engine::create::{CreateOptions, RootSource};
use crate::engine::fork::ForkOptions;
use crate::engine::Engine;
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::workspace::secrets;
use crate::workspace::store::NetworkMode;
use crate::workspace::volume::parse_mount;

#[derive(Args)]
pub struct CreateArgs {
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// Every workspace of this definition file instead (refused if one
    /// exists; `apply -f` leaves equal ones alone).
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["image", "rootfs", "base_snapshot", "from_snapshot"])]
    file: Option<PathBuf>,
    /// OCI image (reference, digest or ID); pulled when not in the local store.
    #[arg(long, conflicts_with = "rootfs")]
    image: Option<String>,
    #[command(flatten)]
    registry: super::image::RegistryArgs,
    /// A local ext4 image; the workspace gets its own copy.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// A base snapshot's name (`snapshot create WS --base NAME`), or
    /// oci://REF for an image.
    #[arg(long, value_name = "NAME|oci://REF", conflicts_with_all = ["image", "rootfs"])]
    base_snapshot: Option<String>,
    /// A home snapshot stacked over the base (then your default personal
    /// snapshot, if you set one).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["rootfs", "from_snapshot"])]
    home_snapshot: Option<String>,
    /// Do not apply your default personal snapshot.
    #[arg(long, conflicts_with_all = ["rootfs", "from_snapshot"])]
    no_personal: bool,
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Grow the workspace's root disk to this size (e.g. 2G, 512M).
    #[arg(long, conflicts_with = "disk_free")]
    disk_size: Option<String>,
    /// With --image: free space on the workspace's root disk beyond the
    /// image's content.
    #[arg(long, default_value = "1G")]
    disk_free: String,
    /// Guest kernel (default: $MICROAGENT_KERNEL, else the one scripts/build-kernel.sh built last).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest kernel arguments appended to the VMM's own.
    #[arg(long, default_value = "quiet")]
    cmdline: String,
    /// CPU template (host, pvm-safe); default: pvm-safe on PVM hosts.
    #[arg(long)]
    cpu_template: Option<CpuTemplate>,
    /// A program in the root disk that the guest agent (always PID 1)
    /// starts at boot, such as the image's own init.
    #[arg(long)]
    init: Option<String>,
    /// With --image: the agent starts the image's Entrypoint + Cmd at boot,
    /// with its Env, WorkingDir and User.
    #[arg(long, requires = "image", conflicts_with = "init")]
    run_entrypoint: bool,
    /// Fork: a new workspace resumed from WORKSPACE:TAG (started at once),
    /// or from a snapshot in a registry, REGISTRY/REPOSITORY:TAG, pulled
    /// first (only the chunks not already here are fetched).
    #[arg(long, value_name = "WORKSPACE:TAG|REF", conflicts_with_all = ["image", "rootfs", "disk_size", "kernel"])]
    from_snapshot: Option<String>,
    /// With --from-snapshot: return once the VMM runs, without waiting for the guest agent.
    #[arg(long)]
    no_wait: bool,
    /// `user`: a NIC behind this workspace's own passt (user-mode TCP/IP,
    /// no root set-up); `none`: loopback only. A fork keeps its source's.
    #[arg(long, value_enum, default_value_t = NetworkMode::User, conflicts_with = "from_snapshot")]
    network: NetworkMode,
    /// Publish a guest TCP port on the host: [ADDR:]HOST_PORT:GUEST_PORT
    /// (ADDR defaults to 127.0.0.1; repeatable). Forks publish only what
    /// their own `create --from-snapshot` names.
    #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST")]
    publish: Vec<PortMap>,
    /// A secret delivered to /run/secrets/KEY: KEY=@FILE (repeatable; values
    /// never go on the command line). A fork inherits its source's
    /// secrets; --secret overrides them key by key.
    #[arg(long = "secret", value_name = "KEY=@FILE")]
    secrets: Vec<String>,
    /// Attach a volume (made with `volume create`): VOLUME:/PATH[:ro]
    /// (repeatable, at most 4; a separate disk mounted at PATH, never in
    /// a commit). A fork gets copy-on-write clones of its source's.
    #[arg(
        short = 'v',
        long = "volume",
        value_name = "VOLUME:/PATH[:ro]",
        conflicts_with = "from_snapshot"
    )]
    volumes: Vec<String>,
    #[command(flatten)]
    snapshots: SnapshotSettingsArgs,
}

/// The automatic-snapshot settings, as `create` and `update` take them.
#[derive(Args)]
pub struct SnapshotSettingsArgs {
    /// Halt takes a memory snapshot tagged auto-<UTC time> first (default: true).
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    auto_snapshot_on_stop: Option<bool>,
    /// How many automatic snapshots halt keeps, oldest deleted first
    /// (default: 5; tags you chose are never deleted).
    #[arg(long, value_name = "N")]
    max_snapshots: Option<u32>,
}

impl SnapshotSettingsArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            auto_snapshot_on_stop: self.auto_snapshot_on_stop,
            max_snapshots: self.max_snapshots,
        }
    }
}

/// Reads `--secret KEY=@FILE` arguments (before anything is created).
pub(crate) fn read_secret_args(args: &[String]) -> Result<Vec<(String, secrets::Value)>> {
    args.iter()
        .map(|a| {
            let (key, src) = a
                .split_once('=')
                .with_context(|| format!("--secret takes KEY=@FILE, got {:?}", a))?;
            let Some(file) = src.strip_prefix('@') else {
                bail!(
                    "--secret {key}: give the value as @FILE (values never go on the command line)"
                );
            };
            let value = secrets::read_value_file(key, Path::new(file))?;
            Ok((key.to_string(), value))
        })
        .collect()
}

/// Parses sizes like 512M, 2G, 1024 (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("invalid size {s:?}: unit must be K, M, G or T"),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

pub fn create(engine: &Engine, args: CreateArgs, out: &Out) -> Result<i32> {
    if let Some(file) = &args.file {
        if args.name.is_some() {
            bail!("create -f takes the names from the file: drop NAME");
        }
        let apply = super::apply::ApplyArgs {
            file: file.clone(),
            registry: args.registry,
            kernel: args.kernel,
        };
        return super::apply::run(engine, &apply, Existing::Refuse, out);
    }
    let name = args.name.clone().unwrap_or_default();
    let secret_values = read_secret_args(&args.secrets)?;
    if let Some(from) = &args.from_snapshot {
        let fork = ForkOptions {
            from,
            wait: (!args.no_wait).then(|| Duration::from_secs(600)),
            secret_overrides: &secret_values,
            ports: &args.publish,
            settings: args.snapshots.settings(),
            registry: args.registry.options(),
        };
        let v = engine.fork(&name, &fork, out)?;
        print_record(out, &v, &format!("workspace {} forked from {from}", name));
        return Ok(0);
    }
    let source = match (&args.image, &args.rootfs, &args.base_snapshot) {
        (Some(image), _, _) => RootSource::Image(image.clone()),
        (None, Some(rootfs), _) => RootSource::Rootfs(rootfs.clone()),
        (None, None, Some(base)) => RootSource::BaseSnapshot(base.clone()),
        (None, None, None) => {
            bail!("create needs --image REF (an OCI image), --base-snapshot NAME or --rootfs PATH (an ext4 image)")
        }
    };
    let opts = CreateOptions {
        registry: args.registry.options(),
        vcpus: args.vcpus,
        memory: args.memory,
        disk_size: args.disk_size.as_deref().map(parse_size).transpose()?,
        disk_free: parse_size(&args.disk_free)?,
        kernel: args.kernel.clone(),
        cmdline: args.cmdline.clone(),
        cpu_template: args.cpu_template,
        init: args.init.clone(),
        run_entrypoint: args.run_entrypoint,
        network: args.network,
        publish: args.publish.clone(),
        secrets: secret_values,
        volumes: args
            .volumes
            .iter()
            .map(|v| parse_mount(v).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?,
        home_snapshot: args.home_snapshot.clone(),
        personal: !args.no_personal,
        ..CreateOptions::new(source)
    }
    .with_settings(&args.snapshots.settings());
    let v = engine.create(&name, &opts, out)?;
    print_record(out, &v, &format!("workspace {} created", name));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").unwrap_err().to_string().contains("12Q"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
