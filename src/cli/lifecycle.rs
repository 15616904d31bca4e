//! create, start, pause, resume, halt, delete: the commands that change a
//! workspace. Each holds the workspace's lock for its whole duration.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::output::{print_record, record_json, Out};
use super::warm::{self, Boot};
use crate::agent::secrets as agent_secrets;
use crate::agent::{agent_binary, wait_ready, AgentConn, AGENT_GUEST_PATH};
use crate::devices::virtio::net::config::{check_unique, PortMap};
use crate::digest::sha256_file;
use crate::image::ops as image_ops;
use crate::image::progress::Progress;
use crate::image::store::{ImageRecord, ImageStore};
use crate::snapshot::manifest::{
    validate_tag, HostCpu, Manifest, MANIFEST, MEMORY, ROOTFS, VMSTATE,
};
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::control::{self, Op as CtlOp};
use crate::vmm::host;
use crate::vmm::vm::VmConfig;
use crate::workspace::bootcache::BootInputs;
use crate::workspace::busy;
use crate::workspace::disk::{content_sha256, copy_disk, grow_ext4};
use crate::workspace::inject::{inject_agent, inject_file};
use crate::workspace::lock::WorkspaceLock;
use crate::workspace::secrets::{self, SecretStore};
use crate::workspace::state::{check, read_exit_record, reconcile, supervisor_alive, Op, Status};
use crate::workspace::store::{
    now_rfc3339, NetworkMode, StateDir, StoreError, WorkspaceDir, WorkspaceRecord, RECORD_VERSION,
};

/// How long `start` waits for the VMM to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Lock, read and reconcile: the common opening of every lifecycle command.
pub(crate) fn open(
    state: &StateDir,
    name: &str,
) -> Result<(WorkspaceDir, WorkspaceLock, WorkspaceRecord, Status)> {
    let ws = state.existing(name)?;
    let lock = busy::lock(&ws)?;
    reconciled(ws, lock)
}

fn reconciled(
    ws: WorkspaceDir,
    lock: WorkspaceLock,
) -> Result<(WorkspaceDir, WorkspaceLock, WorkspaceRecord, Status)> {
    let mut rec = ws.read()?;
    let (status, reason) = reconcile(&ws, &rec);
    if status != rec.status {
        // The VMM ended behind our back: record what happened.
        rec.status = status;
        rec.crash_reason = reason;
        rec.vmm_pid = None;
        ws.write(&rec)?;
    }
    Ok((ws, lock, rec, status))
}

#[derive(Args)]
pub struct NameArgs {
    pub name: String,
}

#[derive(Args)]
pub struct StartArgs {
    pub name: String,
    /// Return once the VMM runs, without waiting for the guest agent.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the guest agent (boots are slow on PVM hosts).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Roll back: resume memory, devices and disk from this snapshot tag.
    #[arg(long, value_name = "TAG")]
    from_snapshot: Option<String>,
    /// First start: boot the kernel even when a boot snapshot of an equal
    /// workspace is cached (and do not cache this boot).
    #[arg(long, conflicts_with = "from_snapshot")]
    cold: bool,
}

pub fn start(state: &StateDir, args: StartArgs, out: &Out) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, &args.name)?;
    check(&ws.name, status, Op::Start)?;
    let wait = (!args.no_wait).then(|| Duration::from_secs(args.timeout));
    let t = Instant::now();
    let (vmm_pid, boot, how) = match &args.from_snapshot {
        Some(tag) => {
            let dir = snapshot_dir(&ws, tag)?;
            check_snapshot(&dir, &rec)?;
            // Roll the disk back with the memory: both are from that moment.
            copy_disk(&dir.join(ROOTFS), &ws.rootfs())?;
            let pid = launch(
                &ws,
                &mut rec,
                Some(&dir),
                wait,
                AfterReady::DeliverSecrets,
                out,
            )?;
            (pid, Boot::Snapshot, format!(" from snapshot {tag}"))
        }
        None if status == Status::Created => {
            let first = warm::first_start(state, &ws, &mut rec, wait, args.cold, out)?;
            let how = match (first.boot, &first.key) {
                (Boot::Warm, Some(k)) => format!(" (warm start from boot snapshot {})", &k[..12]),
                (Boot::Cold, Some(k)) if first.cached => {
                    format!(" (cold boot; cached as boot snapshot {})", &k[..12])
                }
                _ => " (cold boot)".to_string(),
            };
            (first.vmm_pid, first.boot, how)
        }
        None => {
            let pid = launch(&ws, &mut rec, None, wait, AfterReady::DeliverSecrets, out)?;
            (pid, Boot::Cold, String::new())
        }
    };
    let mut json = record_json(&ws, &rec, Status::Running, None, vmm_pid);
    json["boot"] = boot.name().into();
    json["start_ms"] = (t.elapsed().as_millis() as u64).into();
    out.done(
        &format!(
            "workspace {} started{how} in {:.1}s",
            ws.name,
            t.elapsed().as_secs_f64()
        ),
        json,
    );
    Ok(0)
}

/// Snapshot TAG of a workspace, which must exist.
pub fn snapshot_dir(ws: &WorkspaceDir, tag: &str) -> Result<PathBuf> {
    validate_tag(tag).map_err(anyhow::Error::msg)?;
    let dir = ws.snapshots().join(tag);
    if !dir.join(MANIFEST).is_file() {
        bail!("snapshot {tag} of workspace {} does not exist", ws.name);
    }
    Ok(dir)
}

/// Reads a snapshot's manifest and refuses what cannot run here: another
/// kernel, CPU template, host CPU or TSC rate, or missing files.
pub fn check_snapshot(dir: &Path, rec: &WorkspaceRecord) -> Result<Manifest> {
    let m = Manifest::read(dir)?;
    let kernel_now = sha256_file(Path::new(&rec.kernel))
        .with_context(|| format!("hashing kernel {}", rec.kernel))?;
    let host_cpuid = rec
        .cpu_template
        .parse::<CpuTemplate>()
        .ok()
        .and_then(|t| host::guest_cpuid(t, m.vcpus));
    m.check_compatible(
        &kernel_now,
        &rec.cpu_template,
        &HostCpu::current(),
        host::guest_tsc_khz(),
        host_cpuid.as_deref(),
    )?;
    if m.vcpus != rec.vcpus || m.memory_mib != rec.memory_mib {
        bail!(
            "snapshot has {} vCPUs and {} MiB, workspace {} has {} and {} MiB",
            m.vcpus,
            m.memory_mib,
            rec.name,
            rec.vcpus,
            rec.memory_mib
        );
    }
    for name in [VMSTATE, MEMORY, ROOTFS] {
        let want = m
            .file(name)
            .with_context(|| format!("snapshot manifest lists no {name}"))?;
        let size = std::fs::metadata(dir.join(name))
            .map(|md| md.len())
            .unwrap_or(u64::MAX);
        if size != want.size {
            bail!(
                "snapshot file {name} is damaged: {size} bytes, manifest says {}",
                want.size
            );
        }
    }
    // The VM state is small: check it whole (magic, version, checksum,
    // shape) before anything is changed or started.
    let bytes = std::fs::read(dir.join(VMSTATE))
        .with_context(|| format!("reading {}", dir.join(VMSTATE).display()))?;
    crate::snapshot::format::decode::<crate::vmm::snapshot::VmSnapshot>(&bytes)
        .with_context(|| format!("snapshot {}", dir.display()))?;
    Ok(m)
}

/// What `launch` does once the guest agent answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AfterReady {
    /// Deliver the workspace's secrets (the usual case).
    DeliverSecrets,
    /// Leave /run/secrets empty: the caller snapshots first (boot cache).
    NoSecrets,
}

/// Spawns the workspace's VMM (booting, or resuming `restore_from`), waits
/// for its control socket and, with `wait`, for the guest agent, which then
/// gives the guest its identity (hostname, machine-id, clock, entropy:
/// fresh for a restored guest too). Records the workspace as running.
pub fn launch(
    ws: &WorkspaceDir,
    rec: &mut WorkspaceRecord,
    restore_from: Option<&Path>,
    wait: Option<Duration>,
    after: AfterReady,
    out: &Out,
) -> Result<Option<u32>> {
    let _ = std::fs::remove_file(ws.exit_record());
    let _ = std::fs::remove_file(ws.control_socket());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.vmm_log())
        .with_context(|| format!("opening {}", ws.vmm_log().display()))?;
    let exe = std::env::current_exe().context("locating the microagent binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "supervise", "--workspace-dir"])
        .arg(&ws.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(dir) = restore_from {
        cmd.arg("--restore-from").arg(dir);
    }
    // SAFETY: setsid is async-signal-safe and the closure touches nothing
    // else; it detaches the VMM from the CLI's session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawning the VMM")?;
    let pid = child.id() as i32;
    // The supervisor outlives us; it is reaped by init once we exit.
    drop(child);

    let deadline = Instant::now() + START_TIMEOUT;
    let vmm_pid = loop {
        match control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT) {
            Ok(resp) => break resp.pid,
            Err(e) => {
                if !supervisor_alive(pid, ws) {
                    let why = read_exit_record(ws)
                        .map(|r| r.reason)
                        .unwrap_or_else(|| "the VMM exited".into());
                    rec.status = Status::Crashed;
                    rec.crash_reason = Some(why.clone());
                    rec.vmm_pid = None;
                    ws.write(rec)?;
                    bail!("workspace {} failed to start: {why}", ws.name);
                }
                if Instant::now() > deadline {
                    // SAFETY: kill on a pid we spawned; worst case it is gone.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    bail!(
                        "workspace {} did not start within {}s: {e}",
                        ws.name,
                        START_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    rec.status = Status::Running;
    rec.vmm_pid = Some(pid);
    rec.crash_reason = None;
    ws.write(rec)?;
    if let Some(timeout) = wait {
        let t = Instant::now();
        wait_ready(&ws.vsock_socket(), timeout, || supervisor_alive(pid, ws)).with_context(
            || {
                format!(
                    "workspace {} is running but its guest agent is not answering",
                    ws.name
                )
            },
        )?;
        // Every guest gets its machine-id and host entropy here, so a
        // cold-booted and a warm-started workspace look alike.
        refresh_identity(ws, &rec.name)?;
        // A restored guest's /run/secrets was scrubbed before its memory
        // was saved: deliver the host's current values (replace: nothing
        // stale survives).
        if after == AfterReady::DeliverSecrets && has_secrets(ws)? {
            deliver_secrets(ws, true)?;
        }
        if !out.json && !out.quiet {
            eprintln!("guest agent ready after {:.1}s", t.elapsed().as_secs_f64());
        }
    }
    Ok(vmm_pid)
}

pub(crate) fn has_secrets(ws: &WorkspaceDir) -> Result<bool> {
    Ok(!SecretStore::of(ws).keys()?.is_empty())
}

/// Delivers the host's secrets into a running guest, retried like the
/// identity refresh (a loaded PVM host can make the guest slow to answer).
pub(crate) fn deliver_secrets(ws: &WorkspaceDir, replace: bool) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match agent_secrets::deliver(ws, replace) {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 3 => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Hostname, clock, entropy and machine-id for a guest that was resumed
/// from a snapshot (a fork must not share its source's identity or RNG).
fn refresh_identity(ws: &WorkspaceDir, hostname: &str) -> Result<()> {
    let mut entropy = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
        .context("reading host entropy")?;
    let hex = crate::digest::hex(&entropy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let req = guest_agent::Request::Refresh(guest_agent::Refresh {
        hostname: hostname.to_string(),
        unix_time_ns: now,
        entropy_hex: hex[..64].to_string(),
        machine_id: hex[64..96].to_string(),
    });
    // Idempotent, so retried: a loaded host (many forks at once) can make
    // an emulated guest kernel slow to answer.
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        match AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(120))
            .and_then(|c| c.call(&req))
        {
            Ok(r) => break r,
            Err(e) if attempt >= 3 => {
                return Err(e)
                    .with_context(|| format!("refreshing the identity of workspace {}", ws.name))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    if !resp.ok {
        bail!(
            "refreshing the identity of workspace {}: {}",
            ws.name,
            resp.message
        );
    }
    Ok(())
}

fn pause_or_resume(state: &StateDir, name: &str, out: &Out, pause: bool) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, name)?;
    check(&ws.name, status, if pause { Op::Pause } else { Op::Resume })?;
    let op = if pause { CtlOp::Pause } else { CtlOp::Resume };
    let resp = control::request(&ws.control_socket(), op, CONTROL_TIMEOUT)?;
    // A workspace snapshotted while paused had its secrets scrubbed.
    if !pause && has_secrets(&ws)? {
        deliver_secrets(&ws, true)?;
    }
    rec.status = if pause {
        Status::Paused
    } else {
        Status::Running
    };
    ws.write(&rec)?;
    let verb = if pause { "paused" } else { "resumed" };
    print_record(
        out,
        &ws,
        &rec,
        rec.status,
        None,
        resp.pid,
        &format!("workspace {} {verb}", ws.name),
    );
    Ok(0)
}

pub fn pause(state: &StateDir, args: NameArgs, out: &Out) -> Result<i32> {
    pause_or_resume(state, &args.name, out, true)
}

pub fn resume(state: &StateDir, args: NameArgs, out: &Out) -> Result<i32> {
    pause_or_resume(state, &args.name, out, false)
}

#[derive(Args)]
pub struct HaltArgs {
    name: String,
    /// Seconds to wait for the VMM to stop before killing it.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// Stops the VMM: asks over the control socket, then kills the process
/// group if it has not gone within `timeout`. Returns whether it was forced.
fn stop_vmm(ws: &WorkspaceDir, pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // Graceful: the agent syncs, stops processes and powers off. A paused
    // guest cannot do that, and a guest without an agent answering gets
    // the VMM's halt (like pulling the power).
    let paused = control::request(&ws.control_socket(), CtlOp::Status, CONTROL_TIMEOUT)
        .map(|r| r.state.as_deref() == Some("paused"))
        .unwrap_or(true);
    let graceful = !paused
        && AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(2))
            .and_then(|c| c.call(&guest_agent::Request::Shutdown))
            .is_ok();
    if graceful {
        while supervisor_alive(pid, ws) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = control::request(&ws.control_socket(), CtlOp::Halt, CONTROL_TIMEOUT);
    while supervisor_alive(pid, ws) {
        if Instant::now() > deadline {
            // The supervisor leads its own session and process group.
            // SAFETY: kill on a process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let hard = Instant::now() + Duration::from_secs(5);
            while supervisor_alive(pid, ws) && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(20));
            }
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn halt(state: &StateDir, args: HaltArgs, out: &Out) -> Result<i32> {
    let (ws, _lock, mut rec, status) = open(state, &args.name)?;
    check(&ws.name, status, Op::Halt)?;
    let forced = stop_vmm(
        &ws,
        rec.vmm_pid.unwrap_or(0),
        Duration::from_secs(args.timeout),
    );
    let _ = std::fs::remove_file(ws.control_socket());
    rec.status = Status::Halted;
    rec.vmm_pid = None;
    rec.crash_reason = None;
    ws.write(&rec)?;
    let msg = if forced {
        format!(
            "workspace {} halted (forced after {}s)",
            ws.name, args.timeout
        )
    } else {
        format!("workspace {} halted", ws.name)
    };
    print_record(out, &ws, &rec, Status::Halted, None, None, &msg);
    Ok(0)
}

#[derive(Args)]
pub struct DeleteArgs {
    name: String,
    /// Confirm: deleting removes the workspace's disk and snapshots
    /// (asked on a terminal; refused without one).
    #[arg(long, short)]
    yes: bool,
    /// Delete even if running (the VMM is stopped first) or snapshotting
    /// (the snapshot is ended; it is not kept).
    #[arg(long)]
    force: bool,
}

pub fn delete(state: &StateDir, args: DeleteArgs, out: &Out) -> Result<i32> {
    state.existing(&args.name)?;
    super::confirm::confirm(
        &format!(
            "delete removes workspace {} with its disk and snapshots",
            args.name
        ),
        args.yes,
    )?;
    let (ws, _lock, rec, status) = if args.force {
        // Like `docker rm -f`: a snapshot in progress is ended too.
        let ws = state.existing(&args.name)?;
        let lock = busy::lock_evicting(&ws)?;
        reconciled(ws, lock)?
    } else {
        open(state, &args.name)?
    };
    if !args.force {
        check(&ws.name, status, Op::Delete)?;
    }
    if status.is_live() {
        stop_vmm(&ws, rec.vmm_pid.unwrap_or(0), Duration::from_secs(5));
    }
    // Rename first so a crash mid-delete never leaves a half-deleted
    // workspace that still looks valid.
    let doomed = ws
        .dir
        .with_file_name(format!(".deleting-{}-{}", ws.name, std::process::id()));
    std::fs::rename(&ws.dir, &doomed).with_context(|| format!("removing {}", ws.dir.display()))?;
    std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
    out.done(
        &format!("workspace {} deleted", ws.name),
        serde_json::json!({ "name": ws.name, "deleted": true }),
    );
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
