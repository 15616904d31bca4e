//! A booted microVM: KVM VM with in-kernel irqchip and PIT, guest memory,
//! devices, vCPU threads and the device event loop.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::arch::x86_64::cpuid::CpuTemplate;
use super::arch::x86_64::layout::{IRQ_MAX, KVM_TSS_ADDRESS, MAX_VCPUS, VIRTIO_IRQ_BASE};
use super::arch::x86_64::mptable;
use super::boot::{self, BootError};
use super::devices::{Devices, QueueKick, VirtioSet};
use super::memory::{self, MemoryError};
use super::seccomp::{confine, ThreadKind};
use super::vcpu::{
    install_kick_handler, kick_signal, stop_vcpu_threads, GuestStop, IoBuses, StopSignal, Vcpu,
    VcpuError,
};
use crate::devices::bus::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{LinkState, NetConfig};
use crate::vmm::snapshot::DeviceState;

pub use super::handle::{PauseError, RunState, VmHandle};

pub const MIN_MEM_MIB: u64 = 32;
/// Keeps glibc in PVM guests off AVX and XSAVE (see full_cmdline).
pub const PVM_GLIBC_TUNABLES: &str = "glibc.cpu.hwcaps=-XSAVE,-XSAVEC,-OSXSAVE,-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-FMA,-FMA4,-F16C,-AVX_Fast_Unaligned_Load";
/// Loops-per-jiffy is derived from the TSC at this HZ (our kernel's
/// CONFIG_HZ, kernels/patches/0005). A kernel built with another HZ gets
/// delay loops off by that ratio, which only `udelay` feels.
const GUEST_HZ: u64 = 50;

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub format: DiskFormat,
    /// The virtio-blk serial the guest finds the disk by (at most 20
    /// bytes; default `microagent-vdX` by position).
    pub serial: Option<String>,
    /// A chain's directory in a snapshot's staging directory, where a
    /// snapshot describes its frozen state (default `disk`, the root's).
    /// Each writable chain of a VM needs its own.
    pub snapshot_dir: Option<String>,
}

/// How a disk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// One file, read and written in place.
    File,
    /// A copy-on-write chain: `path` is the directory with `chain.json`
    /// (see `crate::disk`); snapshots freeze it instead of copying it.
    Chain,
}

/// The guest's vsock: its CID and the host Unix socket that fronts it.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub socket: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// The first disk is /dev/vda, the next /dev/vdb, and so on.
    pub disks: Vec<DiskConfig>,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Appended to the VMM's own arguments (console, reboot, devices, CPU).
    pub cmdline: String,
    pub cpu_template: CpuTemplate,
    /// Turns on the guest-kernel system-call fallback our PVM patch adds.
    pub pvm: bool,
    pub console_log: Option<PathBuf>,
    pub console_stdout: bool,
    pub vsock: Option<VsockConfig>,
    /// User-mode networking through a per-VM passt (None: no NIC).
    pub net: Option<NetConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid vCPU count {0}: must be 1 to {MAX_VCPUS}")]
    Vcpus(u64),
    #[error("invalid memory size {mib} MiB: must be {MIN_MEM_MIB} MiB to {max} MiB (host RAM)")]
    Memory { mib: u64, max: u64 },
    #[error("kernel {0} does not exist")]
    KernelMissing(String),
    #[error("disk {0} does not exist")]
    DiskMissing(String),
    #[error("too many disks: {0} (at most {max})", max = IRQ_MAX - VIRTIO_IRQ_BASE + 1)]
    TooManyDisks(usize),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM {what}: {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("opening console log {path}: {source}")]
    ConsoleLog {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Memory2(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::PasstError),
    #[error(transparent)]
    NetRestore(#[from] crate::devices::virtio::net::persist::NetError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("device layout: {0}")]
    Layout(#[from] crate::devices::bus::OverlapError),
    #[error("event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("restoring: {0}")]
    Restore(String),
}

impl VmConfig {
    /// Checks everything that can be checked without touching KVM, so bad
    /// input fails fast with a message naming the value.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Vcpus(u64::from(self.vcpus)));
        }
        let max = super::host::total_ram_bytes().map_or(u64::MAX, |b| b >> 20);
        if self.mem_mib < MIN_MEM_MIB || self.mem_mib > max {
            return Err(VmError::Memory {
                mib: self.mem_mib,
                max,
            });
        }
        if !self.kernel.is_file() {
            return Err(VmError::KernelMissing(self.kernel.display().to_string()));
        }
        for d in &self.disks {
            let present = match d.format {
                DiskFormat::File => d.path.is_file(),
                DiskFormat::Chain => d.path.join(crate::disk::CHAIN_FILE).is_file(),
            };
            if !present {
                return Err(VmError::DiskMissing(d.path.display().to_string()));
            }
        }
        // One IRQ per virtio device; the vsock and the NIC take one too.
        if self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some())
            > (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize
        {
            return Err(VmError::TooManyDisks(self.disks.len()));
        }
        Ok(())
    }
}

pub struct Vm {
    // Field order is drop order: vCPU threads and devices go before the VM
    // fd, and the VM fd before the guest memory it maps.
    pub(crate) vcpus: Vec<Vcpu>,
    kicks: Vec<QueueKick>,
    /// Devices with host-side I/O of their own (the vsock's sockets).
    backends: Vec<Arc<Mutex<MmioTransport>>>,
    reset_evt: EventFd,
    buses: Arc<IoBuses>,
    stop: Arc<StopSignal>,
    threads: Arc<Mutex<Option<Vec<libc::pthread_t>>>>,
    vcpu_count: usize,
    serial: Arc<Mutex<SerialDevice>>,
    devices: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// The NIC's link (None without one): down once its passt is gone.
    link: Option<LinkState>,
    /// Built from a snapshot: tell devices and the guest's clock once the
    /// vCPUs run.
    restored: bool,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) lineage: Arc<Mutex<super::handle::Lineage>>,
    /// The full kernel command line the guest booted with.
    pub cmdline: String,
}

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

pub(super) fn eventfd() -> Result<EventFd, VmError> {
    EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)
}

/// The KVM VM with the in-kernel irqchip and PIT, before memory and devices.
pub(crate) fn create_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("creating VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("setting TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("creating irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("creating PIT"))?;
    Ok((kvm, vm))
}

impl Vm {
    /// Devices and plumbing shared by boot and restore. With `devices`
    /// (from a snapshot), each device is restored from its saved state.
    pub(crate) fn assemble(
        kvm: &Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        cfg: &VmConfig,
        devices: Option<&[(String, DeviceState)]>,
    ) -> Result<(Vm, Vec<String>), VmError> {
        let Devices {
            pio,
            serial,
            reset_evt,
            virtio:
                VirtioSet {
                    mmio,
                    kicks,
                    backends,
                    named,
                    cmdline_args,
                },
            link,
        } = Devices::assemble(&vm, &mem, cfg, devices)?;

        let msr_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let stop = Arc::new(StopSignal::new(eventfd()?, msr_list));
        let vm = Vm {
            vcpus: Vec::new(),
            kicks,
            backends,
            reset_evt,
            buses: Arc::new(IoBuses { pio, mmio }),
            stop,
            threads: Arc::new(Mutex::new(None)),
            vcpu_count: usize::from(cfg.vcpus),
            serial,
            devices: named,
            link,
            restored: devices.is_some(),
            vm_fd: Arc::new(vm),
            mem,
            lineage: Default::default(),
            cmdline: String::new(),
        };
        Ok((vm, cmdline_args))
    }

    pub fn boot(cfg: &VmConfig) -> Result<Vm, VmError> {
        cfg.validate()?;
        let (kvm, vm) = create_vm()?;
        let mem = memory::create(cfg.mem_mib)?;
        memory::register(&vm, &mem, false)?;
        let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
        let (mut this, device_args) = Vm::assemble(&kvm, vm, mem, cfg, None)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading supported CPUID"))?;
        for index in 0..cfg.vcpus {
            let mut vcpu = Vcpu::new(&this.vm_fd, index)?;
            vcpu.configure_boot(
                &this.mem,
                &supported,
                cfg.cpu_template,
                cfg.vcpus,
                kernel.entry,
            )?;
            this.vcpus.push(vcpu);
        }
        this.cmdline = full_cmdline(cfg, this.vcpus[0].tsc_khz(), &device_args);
        let parsed = boot::new_cmdline(&this.cmdline)?;
        boot::write_boot_params(&this.mem, &kernel, &parsed, cfg.mem_mib << 20)?;
        mptable::setup_mptable(&this.mem, cfg.vcpus)?;
        Ok(this)
    }

    /// The TSC rate KVM gives the guest (vCPU 0), before the vCPUs run.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.vcpus.first().and_then(|v| v.tsc_khz())
    }

    pub fn handle(&self) -> VmHandle {
        VmHandle {
            stop: self.stop.clone(),
            threads: self.threads.clone(),
            vcpus: self.vcpu_count,
            vm_fd: self.vm_fd.clone(),
            mem: self.mem.clone(),
            serial: self.serial.clone(),
            devices: self.devices.clone(),
            link: self.link.clone(),
            lineage: self.lineage.clone(),
        }
    }

    /// Runs the guest until it resets (powers off), is halted or fails;
    /// returns why.
    pub fn run(mut self, dump_state_after: Option<Duration>) -> Result<GuestStop, VmError> {
        use std::os::unix::thread::JoinHandleExt;
        if self.restored {
            for v in &self.vcpus {
                v.kvmclock_ctrl();
            }
        }
        let threads = self.start_vcpus()?;
        *lock(&self.threads) = Some(threads.iter().map(|t| t.as_pthread_t()).collect());
        if self.restored {
            for (_, t) in &self.devices {
                lock(t).after_restore();
            }
        }
        if let Some(after) = dump_state_after {
            self.spawn_state_dumper(after, &threads);
        }
        // Setup is over: from here the main thread only serves devices.
        let result = match confine(ThreadKind::EventLoop) {
            Ok(()) => self.event_loop(),
            Err(e) => {
                self.stop.stop(GuestStop::Error(e.to_string()));
                Ok(())
            }
        };
        if self.stop.reason().is_none() {
            self.stop.stop(GuestStop::Error("event loop ended".into()));
        }
        *lock(&self.threads) = None;
        stop_vcpu_threads(threads);
        result?;
        Ok(self
            .stop
            .reason()
            .unwrap_or_else(|| GuestStop::Error("stopped without a reason".into())))
    }

    /// Every `period`, asks each vCPU to print where it is.
    fn spawn_state_dumper(&self, period: Duration, threads: &[JoinHandle<()>]) {
        use std::os::unix::thread::JoinHandleExt;
        let stop = self.stop.clone();
        let tids: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
        let _ = std::thread::Builder::new()
            .name("state-dump".into())
            .spawn(move || {
                // It only sleeps and kicks vCPUs, as vCPUs do.
                if confine(ThreadKind::Vcpu).is_err() {
                    return;
                }
                loop {
                    std::thread::sleep(period);
                    if stop.reason().is_some() {
                        return;
                    }
                    stop.dump_state
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    for t in &tids {
                        // SAFETY: the vCPU threads outlive this loop until a
                        // stop reason is set, which ends the loop first.
                        unsafe { libc::pthread_kill(*t, kick_signal()) };
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    stop.dump_state
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
            });
    }

    fn start_vcpus(&mut self) -> Result<Vec<JoinHandle<()>>, VmError> {
        install_kick_handler();
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let buses = self.buses.clone();
            let mem = self.mem.clone();
            let stop = self.stop.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || match confine(ThreadKind::Vcpu) {
                    Ok(()) => vcpu.run_loop(buses, mem, stop),
                    Err(e) => stop.stop(GuestStop::Error(e.to_string())),
                })
                .map_err(VmError::EventLoop)?;
            threads.push(handle);
        }
        Ok(threads)
    }

    fn event_loop(&mut self) -> Result<(), VmError> {
        const STOP: u64 = u64::MAX;
        const BACKEND_BASE: u64 = 1 << 32;
        const RESET: u64 = u64::MAX - 1;
        let epoll = Epoll::new().map_err(VmError::EventLoop)?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VmError::EventLoop)
        };
        add(self.stop.evt.as_raw_fd(), STOP)?;
        add(self.reset_evt.as_raw_fd(), RESET)?;
        for (i, k) in self.kicks.iter().enumerate() {
            add(k.evt.as_raw_fd(), i as u64)?;
        }
        for (i, b) in self.backends.iter().enumerate() {
            if let Some(fd) = lock(b).backend_fd() {
                add(fd, BACKEND_BASE + i as u64)?;
            }
        }
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmError::EventLoop(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return Ok(()),
                    RESET => {
                        let _ = self.reset_evt.read();
                        self.stop.stop(GuestStop::Reset(
                            "i8042 reset (guest reboot or power-off)".into(),
                        ));
                        return Ok(());
                    }
                    i if i >= BACKEND_BASE => {
                        if let Some(b) = self.backends.get((i - BACKEND_BASE) as usize) {
                            lock(b).process_backend();
                        }
                    }
                    i => {
                        if let Some(k) = self.kicks.get(i as usize) {
                            let _ = k.evt.read();
                            lock(&k.transport).notify(k.queue);
                        }
                    }
                }
            }
        }
    }
}

/// The VMM's own arguments come first so that the user's can override
/// defaults such as `quiet` but never the device list.
fn full_cmdline(cfg: &VmConfig, tsc_khz: Option<u32>, device_args: &[String]) -> String {
    let mut parts: Vec<String> = vec![
        "console=ttyS0".into(),
        "reboot=k".into(),
        "panic=-1".into(),
        "8250.nr_uarts=1".into(),
        // Freed pages are zeroed: a secret scrubbed from /run/secrets (or
        // dropped by any process) cannot linger in a snapshot's memory.
        "init_on_free=1".into(),
    ];
    if let Some(khz) = tsc_khz.filter(|k| *k > 0) {
        // Skips delay-loop calibration, which costs seconds when emulated.
        parts.push(format!("lpj={}", u64::from(khz) * 1000 / GUEST_HZ));
    }
    let defence = cfg.cpu_template.cmdline_defence();
    if !defence.is_empty() {
        parts.push(defence.into());
    }
    if cfg.pvm {
        parts.push("microagent.pvm_syscall".into());
        // Guest user code runs natively on PVM and sees the host's AVX, but
        // the emulated guest kernel saves only FXSAVE state, so YMM upper
        // halves are clobbered across guest context switches (seen as
        // 16-byte zeroed runs in glibc's AVX2 memcpy output). Init gets
        // this as environment; the agent passes it to every command.
        parts.push(format!("GLIBC_TUNABLES={PVM_GLIBC_TUNABLES}"));
        // An RCU stall report sends other vCPUs an NMI for their stacks,
        // and the NMI's paranoid entry runs LSL, which PVM's emulator
        // cannot execute: the report killed the VM (seen after a rollback
        // on a loaded CI host). On PVM a vCPU starved for 21 s is the
        // host's load, not a guest bug, so the reports are off.
        parts.push("rcupdate.rcu_cpu_stall_suppress=1".into());
    }
    parts.extend(device_args.iter().cloned());
    if !cfg.cmdline.trim().is_empty() {
        parts.push(cfg.cmdline.trim().into());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            disks: vec![],
            vcpus: 1,
            mem_mib: 128,
            cmdline: String::new(),
            cpu_template: CpuTemplate::Host,
            pvm: false,
            console_log: None,
            console_stdout: false,
            vsock: None,
            net: None,
        }
    }

    #[test]
    fn bad_input_is_named() {
        let mut c = cfg();
        c.vcpus = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid vCPU count 0: must be 1 to 32"
        );
        c.vcpus = 200;
        assert!(c.validate().unwrap_err().to_string().contains("200"));
        c.vcpus = 1;
        c.mem_mib = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("invalid memory size 0 MiB"));
        c.mem_mib = 1 << 40;
        assert!(c.validate().unwrap_err().to_string().contains("host RAM"));
        c.mem_mib = 128;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "kernel /nonexistent/vmlinux does not exist"
        );
    }

    #[test]
    fn cmdline_puts_vmm_args_first_and_pvm_switch_only_on_pvm() {
        let mut c = cfg();
        c.cmdline = "root=/dev/vda init=/init".into();
        let line = full_cmdline(
            &c,
            Some(2_000_000),
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        );
        assert!(line.starts_with("console=ttyS0 reboot=k panic=-1"));
        assert!(line.contains("lpj=40000000"));
        assert!(line.ends_with("root=/dev/vda init=/init"));
        assert!(!line.contains("pvm_syscall"));
        assert!(!line.contains("clearcpuid"));
        assert!(
            !line.contains("rcu_cpu_stall_suppress"),
            "stall reports stay on KVM"
        );
        c.pvm = true;
        c.cpu_template = CpuTemplate::PvmSafe;
        let line = full_cmdline(&c, None, &[]);
        assert!(line.contains("microagent.pvm_syscall"));
        assert!(line.contains("GLIBC_TUNABLES=glibc.cpu.hwcaps=-XSAVE"));
        assert!(line.contains("clearcpuid=cx16,popcnt"));
        assert!(line.contains("rcupdate.rcu_cpu_stall_suppress=1"));
        assert!(!line.contains("lpj="));
    }
}
