//! Device assembly: the serial port, the i8042 (reset) and the virtio-mmio
//! devices of a VM, each new or restored from its saved state, wired to
//! KVM's irqfds and ioeventfds. Ids and order are part of the snapshot
//! format: restore finds each device's state by id.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::arch::x86_64::layout::{
    SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use super::vm::{eventfd, kvm_err, VmConfig, VmError};
use crate::devices::bus::{lock, Bus};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_LEN, COM1_PORT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::config as net_config;
use crate::devices::virtio::net::{LinkState, Net};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::EventFdTrigger;
use crate::vmm::snapshot::DeviceState;

/// Device ids, stable across snapshot and restore: the serial port, then
/// vda, vdb, ... for disks, then the vsock.
pub(crate) const SERIAL_ID: &str = "com1";
pub(crate) const VSOCK_ID: &str = "vsock";
/// After the vsock, so snapshots taken before NICs existed keep their order.
pub(crate) const NET_ID: &str = "eth0";

fn disk_id(i: usize) -> String {
    format!("vd{}", (b'a' + i as u8) as char)
}

/// Everything `Vm::assemble` needs from its devices.
pub(super) struct Devices {
    pub(super) pio: Bus,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    /// Signalled by the i8042 when the guest resets (or powers off).
    pub(super) reset_evt: EventFd,
    pub(super) virtio: VirtioSet,
    /// The NIC's link (None without one).
    pub(super) link: Option<LinkState>,
}

impl Devices {
    /// With `devices` (from a snapshot) each device is restored from its
    /// saved state, and a device without one is an error.
    pub(super) fn assemble(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        cfg: &VmConfig,
        devices: Option<&[(String, DeviceState)]>,
    ) -> Result<Devices, VmError> {
        let saved =
            |id: &str| devices.and_then(|d| d.iter().find(|(i, _)| i == id).map(|(_, s)| s));
        let mut pio = Bus::default();
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("registering serial irqfd"))?;
        let log = match &cfg.console_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::ConsoleLog {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        let sink = ConsoleSink::new(log, cfg.console_stdout);
        let serial = match saved(SERIAL_ID) {
            Some(DeviceState::Serial(snap)) => {
                SerialDevice::restore(EventFdTrigger(serial_irq), sink, snap)
                    .map_err(|e| VmError::Restore(format!("{SERIAL_ID}: {e}")))?
            }
            Some(_) => {
                return Err(VmError::Restore(format!(
                    "{SERIAL_ID}: not a serial port's state"
                )))
            }
            None if devices.is_some() => {
                return Err(VmError::Restore(format!("no state for {SERIAL_ID}")))
            }
            None => SerialDevice::new(EventFdTrigger(serial_irq), sink),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(COM1_PORT, COM1_LEN, serial.clone())?;
        let reset_evt = eventfd()?;
        let i8042 = I8042::new(EventFdTrigger(
            reset_evt.try_clone().map_err(VmError::EventFd)?,
        ));
        pio.insert(I8042_PORT, I8042_LEN, Arc::new(Mutex::new(i8042)))?;

        // virtio-mmio devices, described to the guest on the command line.
        let mut virtio = VirtioSet::default();
        for (i, disk) in cfg.disks.iter().enumerate() {
            let id = disk_id(i);
            let block = Block::open(&disk.path, disk.read_only, &format!("microagent-{id}"))?;
            virtio.add(
                vm,
                mem,
                id.clone(),
                Box::new(block),
                saved(&id),
                devices.is_some(),
            )?;
        }
        if let Some(v) = &cfg.vsock {
            let dev = Vsock::new(v.guest_cid, &v.socket)?;
            virtio.add(
                vm,
                mem,
                VSOCK_ID.into(),
                Box::new(dev),
                saved(VSOCK_ID),
                devices.is_some(),
            )?;
        }
        let link = match &cfg.net {
            Some(n) => {
                let link: LinkState = Arc::new(Mutex::new(Ok(())));
                let dev = Net::new(n, link.clone())?;
                virtio.add(
                    vm,
                    mem,
                    NET_ID.into(),
                    Box::new(dev),
                    saved(NET_ID),
                    devices.is_some(),
                )?;
                virtio.cmdline_args.push(net_config::kernel_ip_arg());
                Some(link)
            }
            None => None,
        };
        Ok(Devices {
            pio,
            serial,
            reset_evt,
            virtio,
            link,
        })
    }
}

/// The virtio-mmio devices of a VM as they are created: one MMIO window
/// and one IRQ each, in order.
#[derive(Default)]
pub(super) struct VirtioSet {
    pub(super) mmio: Bus,
    pub(super) kicks: Vec<QueueKick>,
    pub(super) backends: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) named: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    pub(super) cmdline_args: Vec<String>,
}

impl VirtioSet {
    fn add(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: String,
        device: Box<dyn VirtioDevice>,
        saved: Option<&DeviceState>,
        restoring: bool,
    ) -> Result<(), VmError> {
        let i = self.cmdline_args.len();
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let has_backend = device.backend_fd().is_some();
        let irqfd = eventfd()?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(kvm_err("registering virtio irqfd"))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport = match (saved, restoring) {
            (Some(DeviceState::Virtio(st)), _) => {
                MmioTransport::restore(device, mem.clone(), interrupt, st)
                    .map_err(|e| VmError::Restore(format!("{id}: {e}")))?
            }
            (Some(_), _) => {
                return Err(VmError::Restore(format!(
                    "{id}: not a virtio device's state"
                )))
            }
            (None, true) => return Err(VmError::Restore(format!("no state for device {id}"))),
            (None, false) => MmioTransport::new(device, mem.clone(), interrupt),
        };
        let transport = Arc::new(Mutex::new(transport));
        for q in 0..lock(&transport).num_queues() {
            let evt = eventfd()?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(kvm_err("registering virtio ioeventfd"))?;
            self.kicks.push(QueueKick {
                evt,
                transport: transport.clone(),
                queue: q,
            });
        }
        if has_backend {
            self.backends.push(transport.clone());
        }
        self.named.push((id, transport.clone()));
        self.mmio.insert(base, VIRTIO_MMIO_SIZE, transport)?;
        self.cmdline_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(())
    }
}

/// A queue kick the event loop watches: (transport, queue index).
pub(super) struct QueueKick {
    pub(super) evt: EventFd,
    pub(super) transport: Arc<Mutex<MmioTransport>>,
    pub(super) queue: usize,
}
