//! create: a workspace from an image or a root disk, with its boot cache key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::output::{print_record, Out};
use crate::agent::{agent_binary, AGENT_GUEST_PATH};
use crate::devices::virtio::net::config::{check_unique, PortMap};
use crate::digest::sha256_file;
use crate::image::ops as image_ops;
use crate::image::progress::Progress;
use crate::image::store::{ImageRecord, ImageStore};
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::host;
use crate::vmm::vm::VmConfig;
use crate::workspace::bootcache::BootInputs;
use crate::workspace::disk::{content_sha256, copy_disk, grow_ext4};
use crate::workspace::inject::{inject_agent, inject_file};
use crate::workspace::lock::WorkspaceLock;
use crate::workspace::secrets::{self, SecretStore};
use crate::workspace::state::Status;
use crate::workspace::store::{
    now_rfc3339, NetworkMode, StateDir, StoreError, WorkspaceDir, WorkspaceRecord, RECORD_VERSION,
};

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// OCI image (reference, digest or ID); pulled when not in the local store.
    #[arg(long, conflicts_with = "rootfs")]
    image: Option<String>,
    #[command(flatten)]
    registry: super::image::RegistryArgs,
    /// A local ext4 image; the workspace gets its own copy.
    #[arg(long)]
    rootfs: Option<PathBuf>,
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
    #[arg(long, default_value = "quiet root=/dev/vda rw")]
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
    /// Fork: a new workspace resumed from WORKSPACE:TAG (started at once).
    #[arg(long, value_name = "WORKSPACE:TAG", conflicts_with_all = ["image", "rootfs", "disk_size", "kernel"])]
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

pub fn default_kernel() -> Result<PathBuf> {
    if let Some(k) = std::env::var_os("MICROAGENT_KERNEL").filter(|k| !k.is_empty()) {
        return Ok(k.into());
    }
    let k = crate::paths::cache_root().join("kernels/current/vmlinux");
    if !k.is_file() {
        bail!(
            "no guest kernel at {}: pass --kernel, set MICROAGENT_KERNEL, or run scripts/build-kernel.sh",
            k.display()
        );
    }
    Ok(k)
}

pub fn create(state: &StateDir, args: CreateArgs, out: &Out) -> Result<i32> {
    let ws = state.workspace(&args.name)?;
    let secret_values = read_secret_args(&args.secrets)?;
    check_unique(&args.publish).map_err(anyhow::Error::msg)?;
    if let Some(from) = &args.from_snapshot {
        let wait = (!args.no_wait).then(|| Duration::from_secs(600));
        let fork = super::snapshot::ForkArgs {
            name: &args.name,
            from,
            wait,
            secret_overrides: &secret_values,
            ports: &args.publish,
        };
        return super::snapshot::fork(state, fork, out);
    }
    if args.network == NetworkMode::None && !args.publish.is_empty() {
        bail!("--publish needs a network: drop --network none");
    }
    if args.image.is_none() && args.rootfs.is_none() {
        bail!("create needs --image REF (an OCI image) or --rootfs PATH (an ext4 image)");
    }
    if let Some(r) = &args.rootfs {
        if !r.is_file() {
            bail!("rootfs {} does not exist", r.display());
        }
    }
    let kernel = match args.kernel.clone() {
        Some(k) => k,
        None => default_kernel()?,
    };
    let cpu_template = args.cpu_template.unwrap_or_else(host::default_cpu_template);
    let vcpus = u8::try_from(args.vcpus).unwrap_or(0);
    let disk_size = args.disk_size.as_deref().map(parse_size).transpose()?;
    // Validate what a boot would, before anything is written.
    VmConfig {
        kernel: kernel.clone(),
        disks: vec![],
        vcpus,
        mem_mib: args.memory,
        cmdline: args.cmdline.clone(),
        cpu_template,
        pvm: false,
        console_log: None,
        console_stdout: false,
        vsock: None,
        net: None,
    }
    .validate()
    .map_err(|e| match e {
        crate::vmm::vm::VmError::Vcpus(_) => crate::vmm::vm::VmError::Vcpus(args.vcpus),
        e => e,
    })?;

    if ws.dir.exists() {
        return Err(StoreError::Exists(args.name).into());
    }
    // Fetch the image before the workspace exists: a failed pull leaves nothing.
    let (source, disk_size) = match &args.image {
        Some(image) => {
            let store = ImageStore::new(&state.root);
            let progress = Progress::for_output(out.json, out.quiet);
            let ready = image_ops::ensure(&store, image, &args.registry.options(), &progress)?;
            let size = match disk_size {
                Some(s) => Some(s),
                None => Some(ready.record.disk_bytes + parse_size(&args.disk_free)?),
            };
            let disk = store.disk(&ready.record.digest);
            (DiskSource::Image(Box::new(ready.record), disk), size)
        }
        None => (
            DiskSource::File(args.rootfs.clone().unwrap_or_default()),
            disk_size,
        ),
    };

    std::fs::create_dir_all(state.workspaces())
        .with_context(|| format!("creating {}", state.workspaces().display()))?;
    match std::fs::create_dir(&ws.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::Exists(args.name).into())
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", ws.dir.display())),
    }
    // From here on a failure removes the half-made workspace.
    let result =
        populate(&ws, &args, &source, &kernel, vcpus, cpu_template, disk_size).and_then(|rec| {
            let store = SecretStore::of(&ws);
            for (k, v) in &secret_values {
                store.set(k, v)?;
            }
            Ok(rec)
        });
    match result {
        Ok(rec) => {
            print_record(
                out,
                &ws,
                &rec,
                Status::Created,
                None,
                None,
                &format!("workspace {} created", rec.name),
            );
            Ok(0)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&ws.dir);
            Err(e)
        }
    }
}

/// Puts the image's Entrypoint + Cmd where the agent looks at boot.
fn inject_entrypoint(ws: &WorkspaceDir, image: &ImageRecord) -> Result<()> {
    let run = &image.run;
    let argv: Vec<String> = run.entrypoint.iter().chain(&run.cmd).cloned().collect();
    if argv.is_empty() {
        bail!("image {} has no Entrypoint or Cmd to run", image.digest);
    }
    let spec = guest_agent::EntrypointSpec {
        argv,
        env: run.env.clone(),
        cwd: run.working_dir.clone(),
        user: run.user.clone(),
    };
    let host = ws.dir.join("entrypoint.json");
    std::fs::write(&host, serde_json::to_vec(&spec)?)
        .with_context(|| format!("writing {}", host.display()))?;
    inject_file(&ws.rootfs(), &host, guest_agent::ENTRYPOINT_PATH, 0o644)?;
    Ok(())
}

/// Where a new workspace's root disk is copied from.
enum DiskSource {
    File(PathBuf),
    Image(Box<ImageRecord>, PathBuf),
}

fn populate(
    ws: &WorkspaceDir,
    args: &CreateArgs,
    source: &DiskSource,
    kernel: &Path,
    vcpus: u8,
    cpu_template: CpuTemplate,
    disk_size: Option<u64>,
) -> Result<WorkspaceRecord> {
    let _lock = WorkspaceLock::acquire(&ws.lock_path())?;
    let agent = agent_binary()?;
    let rootfs = match source {
        DiskSource::File(p) | DiskSource::Image(_, p) => p,
    };
    copy_disk(rootfs, &ws.rootfs())?;
    if let Some(size) = disk_size {
        grow_ext4(&ws.rootfs(), size)?;
    }
    inject_agent(&ws.rootfs(), &agent, AGENT_GUEST_PATH)?;
    if args.run_entrypoint {
        if let DiskSource::Image(image, _) = source {
            inject_entrypoint(ws, image)?;
        }
    }
    if let Some(init) = &args.init {
        if !init.starts_with('/') || init.contains(char::is_whitespace) {
            bail!("--init must be an absolute path without spaces, got {init:?}");
        }
    }
    let kernel =
        std::fs::canonicalize(kernel).with_context(|| format!("kernel {}", kernel.display()))?;
    let kernel_sha256 =
        sha256_file(&kernel).with_context(|| format!("hashing kernel {}", kernel.display()))?;
    let boot_key = boot_key(
        ws,
        args,
        source,
        &kernel_sha256,
        &agent,
        vcpus,
        cpu_template,
    )?;
    let rec = WorkspaceRecord {
        version: RECORD_VERSION,
        name: ws.name.clone(),
        image: match source {
            DiskSource::Image(r, _) => Some(
                r.refs
                    .first()
                    .cloned()
                    .unwrap_or_else(|| r.digest.to_string()),
            ),
            DiskSource::File(_) => None,
        },
        image_digest: match source {
            DiskSource::Image(r, _) => Some(r.digest.to_string()),
            DiskSource::File(_) => None,
        },
        image_config: match source {
            DiskSource::Image(r, _) => Some(r.run.clone()),
            DiskSource::File(_) => None,
        },
        rootfs_source: match source {
            DiskSource::File(p) => Some(p.display().to_string()),
            DiskSource::Image(..) => None,
        },
        vcpus,
        memory_mib: args.memory,
        kernel: kernel.display().to_string(),
        kernel_sha256,
        cmdline: args.cmdline.clone(),
        init: args.init.clone(),
        cpu_template: cpu_template.name().to_string(),
        network: args.network,
        ports: args.publish.clone(),
        boot_key: Some(boot_key),
        created: now_rfc3339(),
        status: Status::Created,
        vmm_pid: None,
        crash_reason: None,
    };
    ws.write(&rec)?;
    Ok(rec)
}

/// The boot cache key of a workspace just populated (see workspace::bootcache).
fn boot_key(
    ws: &WorkspaceDir,
    args: &CreateArgs,
    source: &DiskSource,
    kernel_sha256: &str,
    agent: &Path,
    vcpus: u8,
    cpu_template: CpuTemplate,
) -> Result<String> {
    let agent_sha256 =
        sha256_file(agent).with_context(|| format!("hashing agent {}", agent.display()))?;
    let disk_source = match source {
        DiskSource::Image(r, _) => r.digest.to_string(),
        DiskSource::File(p) => format!(
            "sha256:{}",
            content_sha256(p).with_context(|| format!("hashing rootfs {}", p.display()))?
        ),
    };
    let spec = ws.dir.join("entrypoint.json");
    let entrypoint_sha256 = if args.run_entrypoint {
        Some(sha256_file(&spec).with_context(|| format!("hashing {}", spec.display()))?)
    } else {
        None
    };
    let disk_bytes = std::fs::metadata(ws.rootfs())
        .with_context(|| format!("{}", ws.rootfs().display()))?
        .len();
    Ok(BootInputs {
        kernel_sha256,
        disk_source: &disk_source,
        disk_bytes,
        agent_sha256: &agent_sha256,
        entrypoint_sha256: entrypoint_sha256.as_deref(),
        vcpus,
        memory_mib: args.memory,
        cmdline: &args.cmdline,
        init: args.init.as_deref(),
        cpu_template: cpu_template.name(),
        network: args.network.name(),
    }
    .key())
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
