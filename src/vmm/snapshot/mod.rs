//! Saving a running VM (vCPUs, VM-wide KVM state, devices, memory) and
//! building a VM from that state again.
//!
//! Save: pause vCPUs, lock every device (so neither the event loop nor a
//! vCPU touches guest memory or queues), flush disks, save devices, have
//! each parked vCPU save itself, save irqchip/PIT/clock, write memory
//! sparse. Restore order: VM, memory (MAP_PRIVATE from memory.bin),
//! devices, VM-wide state, vCPUs; kvmclock is told about the pause and the
//! vsock sends TRANSPORT_RESET once the vCPUs run (see Vm::run).

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use crate::devices::GuestMemoryMmap;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::vmm::arch::x86_64::layout::ram_ranges;
use crate::vmm::vcpu::ParkError;
use crate::vmm::vcpu::Vcpu;
pub mod layers;
pub mod live;
pub mod vcpu_state;

use crate::devices::bus::lock;
use crate::devices::serial::persist::SerialState;
use crate::devices::virtio::persist::{DeviceKindState, TransportState};
use crate::vmm::vm::{create_vm, PauseError, RunState, Vm, VmConfig, VmError, VmHandle};
use layers::MemoryLayer;
use vcpu_state::VcpuState;

const PAGE: usize = 4096;
const PAGE_SIZE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(PAGE).unwrap();
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
const KVM_IRQCHIP_PIC_MASTER: u32 = 0;
const KVM_IRQCHIP_PIC_SLAVE: u32 = 1;
const KVM_IRQCHIP_IOAPIC: u32 = 2;

/// One device's saved state, found again by its id on restore.
/// Why a VM could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("pausing: {0}")]
    Pause(#[from] PauseError),
    #[error("device {id}: flushing before the snapshot: {source}")]
    Device { id: String, source: std::io::Error },
    #[error("saving vCPUs: {0}")]
    Vcpus(#[from] ParkError),
    #[error("reading {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("writing guest memory: {0}")]
    Memory(std::io::Error),
    #[error("tracking dirty memory: {0}")]
    Dirty(#[from] crate::vmm::memory::MemoryError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    Serial(SerialState),
    /// Formats 1.0 and 1.1: the transport only; the device's own state is
    /// what the VM configuration gives it (kept so old snapshots restore).
    Virtio(TransportState),
    /// Format 1.2 on: the transport and the device's own state.
    VirtioDevice {
        transport: TransportState,
        device: DeviceKindState,
    },
}

/// Where each guest RAM region lives in memory.bin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegionSnap {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The body of vmstate.bin.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub devices: Vec<(String, DeviceState)>,
    pub memory: Vec<RegionSnap>,
    /// Memory layers, bottom first; the last is this snapshot's own
    /// `memory.bin` (see `layers`). Empty: a snapshot from before layers,
    /// whose `memory.bin` is whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_layers: Vec<MemoryLayer>,
}

/// What a save names its memory: its own layer's id, and the layer it may
/// be a diff over (written whole unless that is what the guest's RAM
/// equalled at the last save or restore).
#[derive(Debug, Clone)]
pub struct MemoryIds {
    pub id: String,
    pub parent: Option<String>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SaveError {
    move |source| SaveError::Kvm { what, source }
}

fn irqchip(vm: &kvm_ioctls::VmFd, id: u32) -> Result<kvm_irqchip, SaveError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    let what = ["PIC master", "PIC slave", "IOAPIC"];
    vm.get_irqchip(&mut c)
        .map_err(kvm(what.get(id as usize).copied().unwrap_or("irqchip")))?;
    Ok(c)
}

impl VmHandle {
    /// Freezes the writable disks' chains into `staging` (see
    /// `Block::snapshot_disk`), pausing the guest only while it does.
    pub fn freeze_disks(&self, staging: &std::path::Path) -> Result<(), SaveError> {
        let was_running = self.state() != RunState::Paused;
        if was_running {
            self.pause()?;
        }
        let result = self.devices.iter().try_for_each(|(id, t)| {
            lock(t)
                .device_mut()
                .prepare_snapshot(staging)
                .map_err(|source| SaveError::Device {
                    id: id.clone(),
                    source,
                })
        });
        if was_running {
            self.resume();
        }
        result
    }

    /// Saves the whole VM: its state is returned, guest memory goes to
    /// `memory_file`, a new empty file the caller opened (not synced
    /// here), and devices put what they keep outside guest memory (the
    /// root disk's frozen chain) into `staging`, at the moment memory is
    /// consistent with it. Leaves the VM paused; the caller resumes it.
    ///
    /// `live` (and running): memory is first copied while the guest runs
    /// (see `live`); the pause holds only the last dirty pages and the
    /// device state, and the VM resumes itself at the end. Returns how
    /// long it was paused then.
    pub fn save(
        &self,
        memory_file: File,
        staging: &std::path::Path,
        cmdline: &str,
        mem_mib: u64,
        ids: &MemoryIds,
        live: bool,
    ) -> Result<(VmSnapshot, Option<Duration>), SaveError> {
        let running = self.state() != RunState::Paused;
        let mut phases = Phases::new();
        let pre = match live && running {
            true => Some(self.precopy(&memory_file, ids)?),
            false => None,
        };
        let passes = pre.as_ref().map(|p| (p.passes, p.pages));
        phases.mark("precopy");
        let paused_at = std::time::Instant::now();
        if running {
            self.pause()?;
        }
        phases.mark("pause");
        let result = self.save_paused(
            &memory_file,
            staging,
            cmdline,
            mem_mib,
            ids,
            pre,
            &mut phases,
        );
        let paused = if live && running {
            // Resumed here, whatever happened: a live snapshot never leaves
            // the guest stopped.
            self.resume();
            phases.mark("resume");
            Some(paused_at.elapsed())
        } else {
            None
        };
        let passes = passes.map_or(String::new(), |(n, pages)| {
            format!(" (live: {n} passes, {pages} pages before the pause)")
        });
        eprintln!("save phases (ms): {}{passes}", phases.parts());
        result.map(|snap| (snap, paused))
    }

    #[allow(clippy::too_many_arguments)]
    fn save_paused(
        &self,
        memory_file: &File,
        staging: &std::path::Path,
        cmdline: &str,
        mem_mib: u64,
        ids: &MemoryIds,
        pre: Option<live::PreCopy>,
        phases: &mut Phases,
    ) -> Result<VmSnapshot, SaveError> {
        // Lock every device for the whole save: no queue processing, no
        // DMA into guest memory, no console bytes while we look.
        let serial = lock(&self.serial);
        let mut transports: Vec<_> = self
            .devices
            .iter()
            .map(|(id, t)| (id.clone(), lock(t)))
            .collect();
        for (id, t) in &mut transports {
            t.device_mut()
                .prepare_snapshot(staging)
                .map_err(|source| SaveError::Device {
                    id: id.clone(),
                    source,
                })?;
        }
        let mut devices = vec![(
            crate::vmm::devices::SERIAL_ID.to_string(),
            DeviceState::Serial(serial.save()),
        )];
        devices.extend(transports.iter().map(|(id, t)| {
            let state = DeviceState::VirtioDevice {
                transport: t.save(),
                device: t.device().save(),
            };
            (id.clone(), state)
        }));
        phases.mark("devices");
        let vcpus = self.stop.save_parked(self.vcpus, Duration::from_secs(10))?;
        phases.mark("vcpus");
        let vm = &self.vm_fd;
        let snap_vm = (
            irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            vm.get_pit2().map_err(kvm("PIT"))?,
            vm.get_clock().map_err(kvm("clock"))?,
        );
        phases.mark("vm_state");
        let (memory, memory_layers) = self.save_memory(memory_file, ids, pre)?;
        phases.mark("memory");
        drop(transports);
        drop(serial);
        Ok(VmSnapshot {
            vcpu_count: self.vcpus as u8,
            mem_mib,
            cmdline: cmdline.to_string(),
            vcpus,
            pic_master: snap_vm.0,
            pic_slave: snap_vm.1,
            ioapic: snap_vm.2,
            pit: snap_vm.3,
            clock: snap_vm.4,
            devices,
            memory,
            memory_layers,
        })
    }
}

/// Guest memory from a snapshot's layers: the bottom mapped privately,
/// each diff above read over it in order.
fn map_layers(dir: &Path, snap: &VmSnapshot) -> Result<GuestMemoryMmap, String> {
    use crate::snapshot::manifest::{
        memory_layer_file, valid_memory_id, MAX_MEMORY_LAYERS, MEMORY,
    };
    let layers = &snap.memory_layers;
    if layers.len() > MAX_MEMORY_LAYERS {
        return Err(format!(
            "{} memory layers, at most {MAX_MEMORY_LAYERS}",
            layers.len()
        ));
    }
    for (k, l) in layers.iter().enumerate() {
        if !valid_memory_id(&l.id) || (k == 0) != l.pages.is_none() {
            return Err(format!("memory layer {k} is malformed"));
        }
    }
    let n = layers.len();
    let bottom = if n == 0 {
        MEMORY.to_string()
    } else {
        memory_layer_file(0, n)
    };
    let mem = map_memory(&dir.join(bottom), snap)?;
    for (k, l) in layers.iter().enumerate().skip(1) {
        let runs = l.pages.as_deref().unwrap_or_default();
        layers::apply(&mem, &snap.memory, &dir.join(memory_layer_file(k, n)), runs)
            .map_err(|e| format!("memory layer {k}: {e}"))?;
    }
    Ok(mem)
}

/// Maps memory.bin privately: pages are read on first touch and shared
/// through the page cache by every VM restored from the same file; writes
/// stay private to each VM.
fn map_memory(path: &Path, snap: &VmSnapshot) -> Result<GuestMemoryMmap, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let expected = ram_ranges(snap.mem_mib << 20);
    if snap.memory.len() != expected.len() {
        return Err(format!(
            "{} memory regions, expected {}",
            snap.memory.len(),
            expected.len()
        ));
    }
    let mut regions = Vec::new();
    for (r, (addr, size)) in snap.memory.iter().zip(expected) {
        if r.guest_addr != addr || r.size != size {
            return Err(format!(
                "memory region {:#x}+{:#x} does not match the layout",
                r.guest_addr, r.size
            ));
        }
        let end = r
            .file_offset
            .checked_add(r.size)
            .ok_or("memory region overflows")?;
        if end > file_len || r.file_offset % PAGE as u64 != 0 {
            return Err(format!(
                "memory region at file offset {:#x} is outside {}",
                r.file_offset,
                path.display()
            ));
        }
        let f = file.try_clone().map_err(|e| e.to_string())?;
        let bitmap = vm_memory::bitmap::AtomicBitmap::new(r.size as usize, PAGE_SIZE);
        let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(r.size as usize, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(f, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| format!("mapping memory: {e}"))?;
        let region: MmapRegion<vm_memory::bitmap::AtomicBitmap> = mapping;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or("bad memory region")?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| format!("guest memory: {e}"))
}

impl Vm {
    /// Builds a VM from a snapshot. `cfg` supplies the host-side resources
    /// (kernel is not reloaded; disks, vsock socket, console); its vCPU and
    /// memory sizes must match the snapshot.
    pub fn restore(cfg: &VmConfig, snap: &VmSnapshot, dir: &Path) -> Result<Vm, VmError> {
        let bad = |m: String| VmError::Restore(m);
        if snap.vcpu_count != cfg.vcpus || usize::from(snap.vcpu_count) != snap.vcpus.len() {
            return Err(bad(format!(
                "snapshot has {} vCPUs ({} states), workspace {}",
                snap.vcpu_count,
                snap.vcpus.len(),
                cfg.vcpus
            )));
        }
        if snap.mem_mib != cfg.mem_mib {
            return Err(bad(format!(
                "snapshot has {} MiB, workspace {} MiB",
                snap.mem_mib, cfg.mem_mib
            )));
        }
        for (i, v) in snap.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(bad(format!("vCPU state {i} claims index {}", v.index)));
            }
        }
        // Each phase's time goes to the VMM log: restore latency is a
        // headline figure, and the bench reports it split into these.
        let mut phases = Phases::new();
        let (kvm, vm) = create_vm()?;
        phases.mark("kvm_vm");
        let mem = map_layers(dir, snap).map_err(bad)?;
        if let Some(top) = snap.memory_layers.last() {
            layers::log_ram_digest(&mem, "after restore", &top.id);
        }
        // No dirty log yet: until its first save, what the guest changes
        // is read from the pagemap (see `dirty_since_baseline`).
        super::memory::register(&vm, &mem, false)?;
        let pagemap = match snap.memory_layers.is_empty() {
            true => None,
            false => File::open("/proc/self/pagemap").ok(),
        };
        phases.mark("memory");
        let (mut this, _) = Vm::assemble(&kvm, vm, mem, cfg, Some(&snap.devices))?;
        *lock(&this.lineage) = crate::vmm::handle::Lineage {
            layers: snap.memory_layers.clone(),
            logging: false,
            pagemap,
        };
        phases.mark("devices");

        // VM-wide state before the vCPUs (the LAPICs depend on the irqchip).
        let vmfd = &this.vm_fd;
        for (chip, id) in [
            (&snap.pic_master, 0u32),
            (&snap.pic_slave, 1),
            (&snap.ioapic, 2),
        ] {
            if chip.chip_id != id {
                return Err(bad(format!(
                    "irqchip {id} state is for chip {}",
                    chip.chip_id
                )));
            }
            vmfd.set_irqchip(chip)
                .map_err(|e| bad(format!("irqchip {id}: {e}")))?;
        }
        vmfd.set_pit2(&snap.pit)
            .map_err(|e| bad(format!("PIT: {e}")))?;
        let clock = kvm_clock_data {
            clock: snap.clock.clock,
            ..Default::default()
        };
        vmfd.set_clock(&clock)
            .map_err(|e| bad(format!("clock: {e}")))?;
        phases.mark("vm_state");
        for state in &snap.vcpus {
            let fd = vcpu_state::restore(vmfd, state)
                .map_err(|e| bad(format!("vCPU {}: {e}", state.index)))?;
            this.vcpus.push(Vcpu::from_restored(fd, state.index));
        }
        phases.mark("vcpus");
        eprintln!("{}", phases.line());
        this.cmdline = snap.cmdline.clone();
        Ok(this)
    }
}

/// Wall time of a restore's or a save's phases, for the VMM log.
pub struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done
            .push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }

    /// `kvm_vm=0.412 memory=0.051 ...`
    fn parts(&self) -> String {
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(n, ms)| format!("{n}={ms:.3}"))
            .collect();
        parts.join(" ")
    }

    /// `restore phases (ms): kvm_vm=0.412 memory=0.051 ...`
    fn line(&self) -> String {
        format!("{RESTORE_PHASES_PREFIX} {}", self.parts())
    }
}

/// How the VMM log line with the restore's phase times starts.
pub const RESTORE_PHASES_PREFIX: &str = "restore phases (ms):";

/// Size on disk of a sparse file (allocated blocks).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use vm_memory::Bytes;

    pub(super) fn snapshot_of(mem_mib: u64, memory: Vec<RegionSnap>) -> VmSnapshot {
        VmSnapshot {
            vcpu_count: 0,
            mem_mib,
            cmdline: String::new(),
            vcpus: Vec::new(),
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
            devices: Vec::new(),
            memory,
            memory_layers: Vec::new(),
        }
    }

    /// After a restore, the pages written since are exactly the private
    /// mapping's anonymous ones: reads leave a page in the page cache,
    /// writes (the guest's or the VMM's) copy it out.
    #[test]
    fn pagemap_names_the_pages_written_since_the_mapping() {
        let mem_mib = 8;
        let mem = super::super::memory::create(mem_mib).unwrap();
        mem.write_slice(&[5u8; 64], GuestAddress(0x3000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let regions = live::write_memory(&mem, &File::create(&path).unwrap()).unwrap();
        let restored = map_memory(&path, &snapshot_of(mem_mib, regions)).unwrap();
        let mut read = [0u8; 8];
        restored
            .read_slice(&mut read, GuestAddress(0x3000))
            .unwrap();
        restored
            .read_slice(&mut read, GuestAddress(0x9000))
            .unwrap();
        restored
            .write_slice(&[1u8; 8], GuestAddress(0x5008))
            .unwrap();
        restored
            .write_slice(&[2u8; 8], GuestAddress(0x70_0000))
            .unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let bits = super::super::memory::written_since_mapped(&restored, &pagemap).unwrap();
        let set: Vec<u64> = (0..(mem_mib << 8))
            .filter(|p| bits[0][(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect();
        assert_eq!(set, vec![0x5, 0x700]);
    }

    /// A guest over 3 GiB has two RAM regions around the MMIO gap. Bytes on
    /// both sides of the gap must come back at the same guest addresses,
    /// with the second region packed right after the first in the file.
    #[test]
    fn memory_above_the_mmio_gap_round_trips() {
        let mem_mib = 4096;
        let mem = super::super::memory::create(mem_mib).unwrap();
        let ranges = ram_ranges(mem_mib << 20);
        assert_eq!(ranges.len(), 2, "4 GiB must split around the gap");
        let (low_start, low_size) = ranges[0];
        let (high_start, high_size) = ranges[1];
        let marks = [
            (low_start + 0x1000, 0x11u8),
            (low_start + low_size - 8, 0x22),
            (high_start, 0x33),
            (high_start + high_size - 8, 0x44),
        ];
        for (addr, byte) in marks {
            mem.write_slice(&[byte; 8], GuestAddress(addr)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let file = File::create(&path).unwrap();
        let regions = live::write_memory(&mem, &file).unwrap();
        assert_eq!(regions[1].file_offset, low_size);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            low_size + high_size
        );
        // Sparse: four touched pages, not 4 GiB.
        assert!(allocated_bytes(&path) < 1 << 20);

        let restored = map_memory(&path, &snapshot_of(mem_mib, regions.clone())).unwrap();
        for (addr, byte) in marks {
            let mut got = [0u8; 8];
            restored.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got, [byte; 8], "at {addr:#x}");
        }
        let mut zero = [1u8; 8];
        restored
            .read_slice(&mut zero, GuestAddress(high_start + 0x10_0000))
            .unwrap();
        assert_eq!(zero, [0; 8]);

        // A layout that does not match the memory size is refused.
        let mut bad = regions;
        bad[1].guest_addr += 0x1000;
        assert!(map_memory(&path, &snapshot_of(mem_mib, bad)).is_err());
    }
}
