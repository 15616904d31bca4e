//! Device assembly: the serial port, the i8042 (reset) and the virtio-mmio
//! devices of a VM, each new or restored from its saved state, wired to
//! KVM's irqfds and ioeventfds. Ids and order are part of the snapshot
//! format: restore finds each device's state by id.

use std::sync::{Arc, Mutex};

use crate::devices::GuestMemoryMmap;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::arch::x86_64::layout::{
    SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use super::vm::{eventfd, kvm_err, DiskConfig, DiskFormat, VmConfig, VmError};
use crate::devices::bus::{lock, Bus};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_LEN, COM1_PORT};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::config as net_config;
use crate::devices::virtio::net::{LinkState, Net};
use crate::devices::virtio::persist::{DeviceKindState, PersistError, TransportState};
use crate::devices::virtio::vsock::persist::VsockState;
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
        let sink =
            ConsoleSink::new(cfg.console_log.as_deref(), cfg.console_stdout).map_err(|source| {
                VmError::ConsoleLog {
                    path: cfg
                        .console_log
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    source,
                }
            })?;
        let serial = match saved(SERIAL_ID) {
            Some(DeviceState::Serial(st)) => {
                SerialDevice::restore(EventFdTrigger(serial_irq), sink, st)
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
            let name = disk
                .serial
                .clone()
                .unwrap_or_else(|| format!("microagent-{id}"));
            virtio.add(
                vm,
                mem,
                id.clone(),
                restoring(devices, &id)?,
                |interrupt, saved| {
                    Ok(match saved {
                        None => (Box::new(open_disk(disk, &name)?), vec![]),
                        Some((transport, kind)) => {
                            let block = open_disk(disk, &name)?;
                            let st = match kind {
                                Some(DeviceKindState::Block(st)) => st.clone(),
                                Some(_) => return Err(wrong_kind(&id)),
                                // Format 1.0/1.1: the disk as configured.
                                None => block.save_state(),
                            };
                            let (dev, queues) =
                                Block::restore(block, &disk.path, mem, interrupt, transport, &st)?;
                            (Box::new(dev), queues)
                        }
                    })
                },
            )?;
        }
        if let Some(v) = &cfg.vsock {
            let id = VSOCK_ID;
            virtio.add(
                vm,
                mem,
                id.into(),
                restoring(devices, id)?,
                |interrupt, saved| {
                    Ok(match saved {
                        None => (Box::new(Vsock::new(v.guest_cid, &v.socket)?), vec![]),
                        Some((transport, kind)) => {
                            let st = match kind {
                                Some(DeviceKindState::Vsock(st)) => st.clone(),
                                Some(_) => return Err(wrong_kind(id)),
                                None => VsockState {
                                    guest_cid: v.guest_cid,
                                },
                            };
                            let (dev, queues) = Vsock::restore(
                                v.guest_cid,
                                &v.socket,
                                mem,
                                interrupt,
                                transport,
                                &st,
                            )?;
                            (Box::new(dev), queues)
                        }
                    })
                },
            )?;
        }
        let link = match &cfg.net {
            Some(n) => {
                let link: LinkState = Arc::new(Mutex::new(Ok(())));
                let id = NET_ID;
                virtio.add(
                    vm,
                    mem,
                    id.into(),
                    restoring(devices, id)?,
                    |interrupt, saved| {
                        Ok(match saved {
                            None => (Box::new(Net::new(n, link.clone())?), vec![]),
                            Some((transport, kind)) => {
                                let st = match kind {
                                    Some(DeviceKindState::Net(st)) => st.clone(),
                                    Some(_) => return Err(wrong_kind(id)),
                                    None => Net::configured_state(),
                                };
                                let (dev, queues) =
                                    Net::restore(n, link.clone(), mem, interrupt, transport, &st)?;
                                (Box::new(dev), queues)
                            }
                        })
                    },
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

/// A saved virtio device: its transport and (format 1.2 on) its own state.
type Saved<'a> = (&'a TransportState, Option<&'a DeviceKindState>);

/// A device and the queues its transport keeps.
type Built = (Box<dyn VirtioDevice>, Vec<virtio_queue::Queue>);

/// The saved state of device `id`: None when booting; an error when a
/// snapshot lacks it or holds something else under its id.
fn restoring<'a>(
    devices: Option<&'a [(String, DeviceState)]>,
    id: &str,
) -> Result<Option<Saved<'a>>, VmError> {
    let Some(devices) = devices else {
        return Ok(None);
    };
    match devices.iter().find(|(i, _)| i == id).map(|(_, s)| s) {
        Some(DeviceState::VirtioDevice { transport, device }) => {
            Ok(Some((transport, Some(device))))
        }
        Some(DeviceState::Virtio(transport)) => Ok(Some((transport, None))),
        Some(_) => Err(VmError::Restore(format!(
            "{id}: not a virtio device's state"
        ))),
        None => Err(VmError::Restore(format!("no state for device {id}"))),
    }
}

fn wrong_kind(id: &str) -> VmError {
    VmError::Restore(format!("{id}: {}", PersistError::WrongKind))
}

fn open_disk(disk: &DiskConfig, name: &str) -> Result<Block, BlockError> {
    match disk.format {
        DiskFormat::File => Block::open(&disk.path, disk.read_only, name),
        DiskFormat::Chain => {
            Block::open_chain(&disk.path, name, disk.read_only).map(|b| match &disk.snapshot_dir {
                Some(d) => b.frozen_into(d),
                None => b,
            })
        }
    }
}

impl VirtioSet {
    /// Adds a device that `build` makes, new (None) or from its saved state.
    fn add<'a>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: String,
        saved: Option<Saved<'a>>,
        build: impl FnOnce(Arc<Interrupt>, Option<Saved<'a>>) -> Result<Built, VmError>,
    ) -> Result<(), VmError> {
        let i = self.cmdline_args.len();
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let irqfd = eventfd()?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(kvm_err("registering virtio irqfd"))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport_state = saved.map(|(t, _)| t);
        let (device, queues) = build(interrupt.clone(), saved).map_err(|e| match e {
            VmError::Restore(m) => VmError::Restore(m),
            e if transport_state.is_some() => VmError::Restore(format!("{id}: {e}")),
            e => e,
        })?;
        let has_backend = device.backend_fd().is_some();
        let transport = match transport_state {
            Some(st) => MmioTransport::restore(device, mem.clone(), interrupt, st, queues),
            None => MmioTransport::new(device, mem.clone(), interrupt),
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
