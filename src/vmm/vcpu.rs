//! One vCPU: boot-time register set-up and the KVM_RUN loop that turns exits
//! into device accesses.

use std::sync::{Arc, Condvar, Mutex};

use crate::devices::GuestMemoryMmap;
use kvm_bindings::{kvm_lapic_state, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::arch::x86_64::cpuid::{self, CpuTemplate};
use super::arch::x86_64::{msrs, regs};
use crate::devices::bus::Bus;
use crate::vmm::snapshot::vcpu_state::{VcpuState, VcpuStateError};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("configuring vCPU {index}: {what}: {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("configuring vCPU {index}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {index}: {source}")]
    Regs { index: u8, source: regs::RegsError },
    #[error("building CPUID: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
}

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestStop {
    /// The guest asked to be reset (i8042 pulse, triple fault, system
    /// event). A microVM has no firmware to reboot into, so this is how a
    /// guest powers off.
    Reset(String),
    /// The VMM was asked to stop the guest (halt).
    Halted(String),
    /// The VMM could not go on running the guest.
    Error(String),
}

impl GuestStop {
    /// A stop the user or the guest asked for, as opposed to a failure.
    pub fn is_clean(&self) -> bool {
        !matches!(self, GuestStop::Error(_))
    }

    pub fn reason(&self) -> &str {
        match self {
            GuestStop::Reset(r) | GuestStop::Halted(r) | GuestStop::Error(r) => r,
        }
    }
}

/// Why parked vCPUs could not hand over their state.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("vCPUs are not paused")]
    NotPaused,
    #[error("vCPUs did not save their state within {0:?}")]
    Timeout(std::time::Duration),
    #[error("vCPU {index}: {source}")]
    Vcpu {
        index: usize,
        source: VcpuStateError,
    },
}

#[derive(Default)]
struct PauseGate {
    want_pause: bool,
    parked: usize,
    /// Bumped to ask parked vCPUs to save their state into `saved`.
    save_gen: u64,
    handled_gen: Vec<u64>,
    saved: Vec<Option<Result<VcpuState, VcpuStateError>>>,
}

/// Shared by vCPU threads and devices: the first stop reason wins, and the
/// event wakes the VMM's event loop.
pub struct StopSignal {
    reason: Mutex<Option<GuestStop>>,
    pub evt: EventFd,
    /// Set by the VMM to make each vCPU print its state at its next exit
    /// (a diagnostic for guests that hang; see `vmm run --dump-state-every`).
    pub dump_state: std::sync::atomic::AtomicBool,
    gate: Mutex<PauseGate>,
    gate_cv: Condvar,
    /// MSRs a snapshot saves (KVM's index list for this host).
    pub msr_list: Arc<Vec<u32>>,
}

impl StopSignal {
    pub fn new(evt: EventFd, msr_list: Vec<u32>) -> Self {
        StopSignal {
            msr_list: Arc::new(msr_list),
            reason: Mutex::new(None),
            evt,
            dump_state: std::sync::atomic::AtomicBool::new(false),
            gate: Mutex::new(PauseGate::default()),
            gate_cv: Condvar::new(),
        }
    }

    /// Asks vCPUs to park at their next exit; see `parked`.
    pub fn request_pause(&self, pause: bool) {
        crate::devices::bus::lock(&self.gate).want_pause = pause;
        self.gate_cv.notify_all();
    }

    pub fn parked(&self) -> usize {
        crate::devices::bus::lock(&self.gate).parked
    }

    /// Called by a vCPU thread outside KVM_RUN: parks while a pause is
    /// requested and the VM is not stopping; while parked, saves its state
    /// when asked (`save` runs on the vCPU's own thread).
    fn checkpoint(
        &self,
        index: usize,
        save: &mut dyn FnMut() -> Result<VcpuState, VcpuStateError>,
    ) {
        let mut g = crate::devices::bus::lock(&self.gate);
        if !g.want_pause {
            return;
        }
        g.parked += 1;
        self.gate_cv.notify_all();
        while g.want_pause && self.reason().is_none() {
            if g.handled_gen.get(index).is_some_and(|h| *h != g.save_gen) {
                g.handled_gen[index] = g.save_gen;
                g.saved[index] = Some(save());
                self.gate_cv.notify_all();
                continue;
            }
            g = self.gate_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
        self.gate_cv.notify_all();
    }

    /// With every vCPU parked, has each save its state; in vCPU order.
    pub fn save_parked(
        &self,
        vcpus: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<VcpuState>, ParkError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = crate::devices::bus::lock(&self.gate);
        if !g.want_pause || g.parked < vcpus {
            return Err(ParkError::NotPaused);
        }
        g.save_gen += 1;
        let gen = g.save_gen;
        g.handled_gen.resize(vcpus, 0);
        for h in g.handled_gen.iter_mut() {
            if *h == gen {
                *h = gen - 1;
            }
        }
        g.saved = (0..vcpus).map(|_| None).collect();
        self.gate_cv.notify_all();
        while g.saved.iter().any(|s| s.is_none()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ParkError::Timeout(timeout));
            }
            g = self
                .gate_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g.saved
            .iter_mut()
            .enumerate()
            .map(|(index, s)| match s.take() {
                Some(Ok(state)) => Ok(state),
                Some(Err(source)) => Err(ParkError::Vcpu { index, source }),
                None => Err(ParkError::Timeout(timeout)),
            })
            .collect()
    }

    pub fn stop(&self, why: GuestStop) {
        {
            let mut r = crate::devices::bus::lock(&self.reason);
            if r.is_none() {
                *r = Some(why);
            }
        }
        let _ = self.evt.write(1);
        // Parked vCPUs must wake up to exit.
        let _g = crate::devices::bus::lock(&self.gate);
        self.gate_cv.notify_all();
    }

    pub fn reason(&self) -> Option<GuestStop> {
        crate::devices::bus::lock(&self.reason).clone()
    }
}

/// The I/O buses a vCPU dispatches exits to.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

pub struct Vcpu {
    fd: VcpuFd,
    pub index: u8,
}

impl Vcpu {
    /// A vCPU whose state was loaded from a snapshot.
    pub fn from_restored(fd: VcpuFd, index: u8) -> Vcpu {
        Vcpu { fd, index }
    }

    /// Tells the guest's kvmclock it was paused, so its watchdogs do not
    /// report soft lockups. Fails harmlessly if the guest has no kvmclock.
    pub fn kvmclock_ctrl(&self) {
        let _ = self.fd.kvmclock_ctrl();
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu { fd, index })
    }

    fn cfg(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    }

    /// The guest TSC frequency KVM gives this vCPU, if it can tell.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    pub fn configure_boot(
        &mut self,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        template: CpuTemplate,
        vcpu_count: u8,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::configure(&mut cpuid, template, self.index, vcpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(self.cfg("CPUID"))?;

        let msrs = msrs::boot_msrs().map_err(VcpuError::Cpuid)?;
        let set = self.fd.set_msrs(&msrs).map_err(self.cfg("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                wanted: msrs.as_slice().len(),
            });
        }

        // Application processors start in wait-for-SIPI; only the BSP gets
        // the boot state (the kernel brings APs up itself).
        if self.index == 0 {
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.cfg("registers"))?;
            let sregs = self.fd.get_sregs().map_err(self.cfg("reading sregs"))?;
            let sregs = regs::boot_sregs(mem, sregs).map_err(|source| VcpuError::Regs {
                index: self.index,
                source,
            })?;
            self.fd.set_sregs(&sregs).map_err(self.cfg("sregs"))?;
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.cfg("FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.cfg("reading LAPIC"))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            set_delivery_mode(lvt0, APIC_MODE_EXTINT),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            set_delivery_mode(lvt1, APIC_MODE_NMI),
        );
        self.fd.set_lapic(&lapic).map_err(self.cfg("LAPIC"))?;
        Ok(())
    }

    /// Runs the guest until it stops or another vCPU stops the VM.
    pub fn run_loop(mut self, buses: Arc<IoBuses>, mem: GuestMemoryMmap, stop: Arc<StopSignal>) {
        let msr_list = stop.msr_list.clone();
        loop {
            let index = self.index;
            stop.checkpoint(usize::from(index), &mut || {
                crate::vmm::snapshot::vcpu_state::save(&mut self.fd, index, &msr_list)
            });
            if stop.reason().is_some() {
                return;
            }
            let result = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        buses.pio.read(u64::from(port), data);
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        buses.pio.write(u64::from(port), data);
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        buses.mmio.read(addr, data);
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        buses.mmio.write(addr, data);
                        None
                    }
                    VcpuExit::Hlt => None,
                    VcpuExit::Shutdown => Some(GuestStop::Reset("triple fault (KVM_EXIT_SHUTDOWN)".into())),
                    VcpuExit::SystemEvent(kind, _) => Some(GuestStop::Reset(format!("system event {kind}"))),
                    VcpuExit::InternalError => Some(GuestStop::Error(self.internal_error_report(&mem))),
                    VcpuExit::FailEntry(reason, cpu) => Some(GuestStop::Error(format!(
                        "vCPU {}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu})",
                        self.index
                    ))),
                    other => Some(GuestStop::Error(format!("vCPU {}: unexpected exit {other:?}", self.index))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if stop.dump_state.load(std::sync::atomic::Ordering::SeqCst) {
                        eprintln!("{}", self.state_report(&mem));
                    }
                    None
                }
                Err(e) => Some(GuestStop::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
            };
            if let Some(why) = result {
                stop.stop(why);
                return;
            }
        }
    }

    /// Names the exit, the guest RIP and the bytes there, which is what one
    /// needs to tell an emulator limitation (PVM) from a guest bug.
    fn internal_error_report(&mut self, mem: &GuestMemoryMmap) -> String {
        // SAFETY: we are handling KVM_EXIT_INTERNAL_ERROR, so `internal` is
        // the member of the exit union KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let suberror = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        let rip = self.fd.get_regs().map(|r| r.rip).ok();
        let bytes = rip.map(|rip| self.instruction_bytes(mem, rip));
        format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR (suberror {}: {suberror}) at RIP {}, instruction bytes: {}",
            self.index,
            internal.suberror,
            rip.map_or("unknown".into(), |r| format!("{r:#x}")),
            bytes.unwrap_or_else(|| "unavailable".into()),
        )
    }

    /// One line describing where this vCPU is: for diagnosing hangs.
    pub fn state_report(&mut self, mem: &GuestMemoryMmap) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        let mp = self.fd.get_mp_state().map(|m| m.mp_state);
        let (rip, bytes) = match &regs {
            Ok(r) => {
                let linear = match &sregs {
                    // Outside long mode the CS base matters (real-mode trampolines).
                    Ok(s) if s.efer & 0x400 == 0 => s.cs.base + r.rip,
                    _ => r.rip,
                };
                (format!("{:#x}", r.rip), self.instruction_bytes(mem, linear))
            }
            Err(e) => (format!("unreadable ({e})"), String::new()),
        };
        match sregs {
            Ok(s) => format!(
                "vCPU {}: mp_state {:?} RIP {rip} CS {:#x} (base {:#x}) CR0 {:#x} EFER {:#x} bytes {bytes}",
                self.index, mp, s.cs.selector, s.cs.base, s.cr0, s.efer
            ),
            Err(e) => format!("vCPU {}: mp_state {mp:?} RIP {rip}, sregs unreadable ({e})", self.index),
        }
    }

    fn instruction_bytes(&self, mem: &GuestMemoryMmap, rip: u64) -> String {
        // Kernel text is mapped at __START_KERNEL_map + physical address.
        const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
        let gpa = match self.fd.translate_gva(rip) {
            Ok(t) if t.valid != 0 => t.physical_address,
            _ if rip >= START_KERNEL_MAP => rip - START_KERNEL_MAP,
            _ => rip,
        };
        let mut buf = [0u8; 15];
        match mem.read_slice(&mut buf, GuestAddress(gpa)) {
            Ok(()) => buf
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => format!("unavailable (guest physical {gpa:#x} is not RAM)"),
        }
    }
}
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(super) fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// A no-op handler so the kick signal interrupts KVM_RUN (EINTR) instead of
/// killing the process.
pub(super) fn install_kick_handler() {
    // Registering twice is harmless; failure only means slower teardown.
    let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
}

pub(super) fn stop_vcpu_threads(threads: Vec<std::thread::JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    for t in threads {
        // Kick until the thread notices the stop reason: a kick that lands
        // just before KVM_RUN is lost, the next one is not.
        for _ in 0..200 {
            if t.is_finished() {
                break;
            }
            // SAFETY: the pthread_t belongs to a thread we spawned and have
            // not joined yet, so it is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}
