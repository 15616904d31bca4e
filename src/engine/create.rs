//! create: a workspace from an image or a root disk, with its boot cache key.

use super::auto_snapshot::{check_max_snapshots, Settings};
use std::path::{Path, PathBuf};

use super::{
    claim_workspace_dir, invalid, written, Engine, Error, IoContext, Reporter, Result,
    WorkspaceView,
};
use crate::agent::{agent_binary, AGENT_GUEST_PATH};
use crate::devices::virtio::net::config::{check_unique, PortMap};
use crate::digest::{sha256_file, sha256_file_cached};
use crate::image::pull::PullOptions;
use crate::image::store::{ImageRecord, ImageStore};
use crate::snapshot::bootcache::BootInputs;
use crate::util::lock::FileLock;
use crate::vmm::arch::x86_64::cpuid::CpuTemplate;
use crate::vmm::host;
use crate::vmm::vm::{VmConfig, VmError};
use crate::workspace::base::{BaseCache, BaseInputs};
use crate::workspace::disk::{content_sha256, copy_disk, grow_ext4};
use crate::workspace::layout::{self, DiskLayout, LayerDisk};
use crate::workspace::secrets::{SecretStore, Value};
use crate::workspace::state::Status;
use crate::workspace::store::{
    now_rfc3339, NetworkMode, StoreError, WorkspaceDir, WorkspaceRecord, RECORD_VERSION,
};
use crate::workspace::volume::VolumeMount;

/// Registry access for pulls: credentials and plain-HTTP registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// USER:PASSWORD (default: ~/.docker/config.json).
    pub creds: Option<String>,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure_registries: Vec<String>,
}

impl RegistryOptions {
    pub fn pull_options(&self) -> PullOptions<'_> {
        PullOptions {
            creds: self.creds.as_deref(),
            insecure_registries: &self.insecure_registries,
        }
    }
}

/// Where a new workspace's root disk comes from.
#[derive(Debug, Clone)]
pub enum RootSource {
    /// An OCI image (reference, digest or ID), pulled when not stored.
    Image(String),
    /// A base snapshot's name, or `oci://REF` for an image.
    BaseSnapshot(String),
    /// A local ext4 image; the workspace gets its own copy.
    Rootfs(PathBuf),
}

/// Everything `create` takes (the CLI's defaults are the engine's).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub source: RootSource,
    pub registry: RegistryOptions,
    pub vcpus: u64,
    pub memory: u64,
    /// Grow the root disk to this many bytes.
    pub disk_size: Option<u64>,
    /// With an image: free bytes on the root disk beyond its content.
    pub disk_free: u64,
    /// Guest kernel (default: [`default_kernel`]).
    pub kernel: Option<PathBuf>,
    pub cmdline: String,
    /// Default: pvm-safe on PVM hosts, else host.
    pub cpu_template: Option<CpuTemplate>,
    /// A program in the root disk that the agent starts at boot.
    pub init: Option<String>,
    /// With an image: the agent starts its Entrypoint + Cmd at boot.
    pub run_entrypoint: bool,
    pub network: NetworkMode,
    pub publish: Vec<PortMap>,
    pub secrets: Vec<(String, Value)>,
    /// Halt snapshots memory first (tagged `auto-<UTC>`).
    pub auto_snapshot_on_stop: bool,
    /// Automatic snapshots kept; older ones are deleted by halt.
    pub max_snapshots: u32,
    /// Volumes to attach, in order (`VOL:/path[:ro]`; the engine finds
    /// each volume's disk).
    pub volumes: Vec<VolumeMount>,
    /// A home snapshot stacked over the image.
    pub home_snapshot: Option<String>,
    /// Stack the caller's default personal snapshot (if set) on top.
    pub personal: bool,
}

impl CreateOptions {
    pub fn new(source: RootSource) -> CreateOptions {
        CreateOptions {
            source,
            registry: RegistryOptions::default(),
            vcpus: 1,
            memory: 512,
            disk_size: None,
            disk_free: 1 << 30,
            kernel: None,
            // The root comes from the disk layout (workspace::layout).
            cmdline: "quiet".into(),
            cpu_template: None,
            init: None,
            run_entrypoint: false,
            network: NetworkMode::User,
            publish: Vec::new(),
            secrets: Vec::new(),
            auto_snapshot_on_stop: true,
            max_snapshots: crate::workspace::store::MAX_SNAPSHOTS_DEFAULT,
            volumes: Vec::new(),
            home_snapshot: None,
            personal: true,
        }
    }
}

impl CreateOptions {
    /// These options with the given snapshot settings (unset: default).
    pub fn with_settings(mut self, s: &Settings) -> CreateOptions {
        if let Some(on) = s.auto_snapshot_on_stop {
            self.auto_snapshot_on_stop = on;
        }
        if let Some(n) = s.max_snapshots {
            self.max_snapshots = n;
        }
        self
    }
}

/// `$MICROAGENT_KERNEL`, else the kernel scripts/build-kernel.sh built last.
pub fn default_kernel() -> Result<PathBuf> {
    if let Some(k) = std::env::var_os("MICROAGENT_KERNEL").filter(|k| !k.is_empty()) {
        return Ok(k.into());
    }
    let k = crate::paths::cache_root().join("kernels/current/vmlinux");
    if !k.is_file() {
        return Err(invalid(format!(
            "no guest kernel at {}: pass --kernel, set MICROAGENT_KERNEL, or run scripts/build-kernel.sh",
            k.display()
        )));
    }
    Ok(k)
}

impl Engine {
    /// Creates workspace `name` (not started). A failure leaves nothing.
    pub fn create(
        &self,
        name: &str,
        opts: &CreateOptions,
        report: &dyn Reporter,
    ) -> Result<WorkspaceView> {
        let ws = self.state.workspace(name)?;
        check_unique(&opts.publish).map_err(invalid)?;
        check_max_snapshots(opts.max_snapshots)?;
        if opts.network == NetworkMode::None && !opts.publish.is_empty() {
            return Err(invalid("--publish needs a network: drop --network none"));
        }
        if let RootSource::Rootfs(r) = &opts.source {
            if !r.is_file() {
                return Err(Error::NotFound {
                    kind: "rootfs",
                    name: r.display().to_string(),
                });
            }
        }
        let kernel = match opts.kernel.clone() {
            Some(k) => k,
            None => default_kernel()?,
        };
        let cpu_template = opts.cpu_template.unwrap_or_else(host::default_cpu_template);
        let vcpus = u8::try_from(opts.vcpus).unwrap_or(0);
        // Validate what a boot would, before anything is written.
        VmConfig {
            kernel: kernel.clone(),
            disks: vec![],
            vcpus,
            mem_mib: opts.memory,
            cmdline: opts.cmdline.clone(),
            cpu_template,
            pvm: false,
            console_log: None,
            console_stdout: false,
            vsock: None,
            net: None,
        }
        .validate()
        .map_err(|e| match e {
            VmError::Vcpus(_) => VmError::Vcpus(opts.vcpus),
            e => e,
        })?;

        if ws.dir.exists() {
            return Err(StoreError::Exists(name.into()).into());
        }
        let volumes = self.resolve_mounts(&opts.volumes)?;
        // Fetch the image before the workspace exists: a failed pull leaves nothing.
        let mut shown = None;
        let (source, disk_size) = match &opts.source {
            RootSource::Image(_) | RootSource::BaseSnapshot(_) => {
                let store = ImageStore::new(&self.state.root);
                let (image, applied) = self.root_image(
                    &opts.source,
                    &opts.registry,
                    opts.home_snapshot.as_deref(),
                    opts.personal,
                    report,
                )?;
                shown = applied;
                // The upper holds only what the workspace changes.
                let size = opts.disk_size.unwrap_or(opts.disk_free);
                let layers = LayerDisk::of_image(&store, &image);
                (DiskSource::Image(Box::new(image), layers), Some(size))
            }
            RootSource::Rootfs(p) => {
                if opts.home_snapshot.is_some() {
                    return Err(invalid(
                        "a home snapshot is a layer over an image: create from --image or --base-snapshot",
                    ));
                }
                (DiskSource::File(p.clone()), opts.disk_size)
            }
        };

        claim_workspace_dir(&self.state, &ws)?;
        // From here on a failure removes the half-made workspace.
        let result = populate(
            &self.state.root,
            &ws,
            opts,
            &source,
            &kernel,
            vcpus,
            cpu_template,
            disk_size,
        )
        .and_then(|mut rec| {
            if shown.is_some() {
                rec.image = shown;
                ws.write(&rec)?;
            }
            if !volumes.is_empty() {
                // A boot snapshot would hold these volumes' blocks in its
                // page cache: a workspace with volumes always boots cold.
                rec.volumes = volumes;
                rec.boot_key = None;
                ws.write(&rec)?;
            }
            let store = SecretStore::of(&ws);
            for (k, v) in &opts.secrets {
                store.set(k, v)?;
            }
            Ok(rec)
        });
        match result {
            Ok(rec) => Ok(written(&ws, &rec, None)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&ws.dir);
                Err(e)
            }
        }
    }
}

/// Writes the image's Entrypoint + Cmd as the agent reads it at boot, to
/// `<workspace>/entrypoint.json` (it goes beside the upper from there).
fn write_entrypoint(ws: &WorkspaceDir, image: &ImageRecord) -> Result<PathBuf> {
    let run = &image.run;
    let argv: Vec<String> = run.entrypoint.iter().chain(&run.cmd).cloned().collect();
    if argv.is_empty() {
        return Err(invalid(format!(
            "image {} has no Entrypoint or Cmd to run",
            image.digest
        )));
    }
    let spec = guest_agent::EntrypointSpec {
        argv,
        env: run.env.clone(),
        cwd: run.working_dir.clone(),
        user: run.user.clone(),
    };
    let host = ws.dir.join("entrypoint.json");
    let json = serde_json::to_vec(&spec).map_err(std::io::Error::other);
    json.and_then(|j| std::fs::write(&host, j))
        .io_ctx(|| format!("writing {}", host.display()))?;
    Ok(host)
}

/// Where a new workspace's root comes from.
enum DiskSource {
    /// A whole root disk, copied once into a shared base.
    File(PathBuf),
    /// An image's layer disks, under an empty upper.
    Image(Box<ImageRecord>, Vec<LayerDisk>),
}

#[allow(clippy::too_many_arguments)]
fn populate(
    state_root: &Path,
    ws: &WorkspaceDir,
    opts: &CreateOptions,
    source: &DiskSource,
    kernel: &Path,
    vcpus: u8,
    cpu_template: CpuTemplate,
    disk_size: Option<u64>,
) -> Result<WorkspaceRecord> {
    let _lock = FileLock::acquire(&ws.lock_path())?;
    let hashes = state_root.join("cache/hashes");
    let agent = agent_binary()?;
    let agent_sha256 = sha256_file_cached(&agent, &hashes)
        .io_ctx(|| format!("hashing agent {}", agent.display()))?;
    if let Some(init) = &opts.init {
        if !init.starts_with('/') || init.contains(char::is_whitespace) {
            return Err(invalid(format!(
                "--init must be an absolute path without spaces, got {init:?}"
            )));
        }
    }
    let entrypoint = match source {
        DiskSource::Image(image, _) if opts.run_entrypoint => Some(write_entrypoint(ws, image)?),
        _ => None,
    };
    let entrypoint_sha256 = entrypoint
        .as_deref()
        .map(|p| sha256_file(p).io_ctx(|| format!("hashing {}", p.display())))
        .transpose()?;
    let boot_disk = layout::boot_disk(state_root, &agent, &agent_sha256, AGENT_GUEST_PATH)?;
    let disk_source = match source {
        DiskSource::Image(r, _) => r.digest.to_string(),
        DiskSource::File(p) => format!(
            "sha256:{}",
            content_sha256(p).io_ctx(|| format!("hashing rootfs {}", p.display()))?
        ),
    };
    // The base is built once per distinct inputs and shared; this
    // workspace gets an empty copy-on-write top over it. An image's base
    // is an empty upper, the same for every image of that size and
    // entrypoint.
    let key = BaseInputs {
        source: match source {
            // "2": inode tables zeroed at build, 16 MiB unwritten journal.
            DiskSource::Image(..) => "empty upper 2",
            DiskSource::File(_) => &disk_source,
        },
        agent_sha256: "-",
        entrypoint_sha256: entrypoint_sha256.as_deref(),
        size: disk_size,
    }
    .key();
    let (base, base_sha256) =
        BaseCache::new(state_root).get_or_build(&key, |tmp| match source {
            DiskSource::Image(..) => {
                layout::build_upper(
                    tmp,
                    disk_size.unwrap_or(opts.disk_free),
                    entrypoint.as_deref(),
                )?;
                Ok::<(), Error>(())
            }
            DiskSource::File(rootfs) => {
                copy_disk(rootfs, tmp)?;
                if let Some(size) = disk_size {
                    grow_ext4(tmp, size)?;
                }
                Ok(())
            }
        })?;
    let disk_layout = DiskLayout {
        boot_disk,
        layers: match source {
            DiskSource::Image(_, layers) => layers.clone(),
            DiskSource::File(_) => vec![],
        },
    };
    let chain = crate::disk::create(&ws.disk_dir(), &base, Some(base_sha256))
        .map_err(crate::workspace::disk::DiskError::from)?;
    let kernel = std::fs::canonicalize(kernel).io_ctx(|| format!("kernel {}", kernel.display()))?;
    let kernel_sha256 = sha256_file_cached(&kernel, &hashes)
        .io_ctx(|| format!("hashing kernel {}", kernel.display()))?;
    // A boot snapshot carries the disks it booted from, so the base (how
    // the empty upper was made) is part of what an equal boot means.
    let boot_disk_source = match source {
        DiskSource::Image(..) => format!("{disk_source} base {key}"),
        DiskSource::File(_) => disk_source.clone(),
    };
    let boot_key = BootInputs {
        kernel_sha256: &kernel_sha256,
        disk_source: &boot_disk_source,
        disk_bytes: chain.size,
        agent_sha256: &agent_sha256,
        entrypoint_sha256: entrypoint_sha256.as_deref(),
        vcpus,
        memory_mib: opts.memory,
        cmdline: &opts.cmdline,
        init: opts.init.as_deref(),
        cpu_template: cpu_template.name(),
        network: opts.network.name(),
    }
    .key();
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
        layout: Some(disk_layout),
        vcpus,
        memory_mib: opts.memory,
        kernel: kernel.display().to_string(),
        kernel_sha256,
        cmdline: opts.cmdline.clone(),
        init: opts.init.clone(),
        cpu_template: cpu_template.name().to_string(),
        network: opts.network,
        ports: opts.publish.clone(),
        boot_key: Some(boot_key),
        created: now_rfc3339(),
        status: Status::Created,
        vmm_pid: None,
        crash_reason: None,
        auto_snapshot_on_stop: opts.auto_snapshot_on_stop,
        max_snapshots: opts.max_snapshots,
        memory_base: None,
        volumes: Vec::new(),
    };
    ws.write(&rec)?;
    Ok(rec)
}
