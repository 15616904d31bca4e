//! virtio devices over the virtio-mmio transport (virtio 1.x, MMIO version 2).

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;

use crate::devices::GuestMemoryMmap;
pub use persist::QueueSnap;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver says in the rings when it wants the next interrupt and the
/// device when it wants the next kick (virtio 1.x 2.7.10). Only devices
/// that re-arm kicks with [`rearm`] after every drain may offer it: once
/// negotiated, a queue the device does not re-arm is never kicked again.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const TYPE_BLOCK: u32 = 2;

/// Interrupt status bits of the MMIO transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: status bits the driver reads and acks through
/// the transport, plus an irqfd that KVM turns into an IOAPIC edge.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A full eventfd counter still means "interrupt pending": fine to drop.
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores pending status bits and re-raises the line if any are set.
    pub fn restore(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            let _ = self.irqfd.write(1);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio queue {index} is not valid for guest memory (addresses or size)")]
    InvalidQueue { index: usize },
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    NotModern,
}

/// The device half of a virtio device; the transport owns feature
/// negotiation and queue set-up, and hands ready queues over on DRIVER_OK.
/// What an activated multi-queue device holds: guest memory, its
/// interrupt, and exactly the queues it asked for.
pub struct Activated {
    pub mem: GuestMemoryMmap,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub queues: Vec<Queue>,
}

impl Activated {
    /// Refuses a driver that set up another number of queues than `count`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
        count: usize,
    ) -> Result<Activated, ActivateError> {
        if queues.len() != count {
            return Err(ActivateError::InvalidQueue {
                index: queues.len(),
            });
        }
        Ok(Activated {
            mem,
            interrupt,
            queues,
        })
    }

    /// The queues' state for a snapshot; none before activation.
    pub fn states(active: Option<&Activated>) -> Vec<virtio_queue::QueueState> {
        active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver kicked queue `index` (ioeventfd or trapped MMIO write).
    fn process_queue(&mut self, index: usize);
    /// The driver reset the device: drop queues, forget activation.
    fn reset(&mut self);
    /// An fd the VMM's event loop should watch for this device's host-side
    /// I/O (sockets), if it has any.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// `backend_fd` is readable.
    fn process_backend(&mut self) {}
    /// The live queues' state once activated (for snapshots).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// The device's own state for a snapshot (the transport saves its own).
    fn save(&self) -> persist::DeviceKindState;
    /// Make host-side state durable before a snapshot, and put what the
    /// device keeps outside guest memory into the snapshot's `staging`
    /// directory (disks: flush, then freeze the chain there).
    fn prepare_snapshot(&mut self, _staging: &std::path::Path) -> std::io::Result<()> {
        Ok(())
    }
    /// Called after a restore once the vCPUs run again, never before: the
    /// vsock tells the guest its streams are gone, and every device looks
    /// at its queues once for a kick that came just before the snapshot.
    fn after_restore(&mut self) {}
}

/// Stops kicks for `q` while the device drains it: the driver then adds
/// buffers without trapping (a device reading a queue the driver fills,
/// or one that waits for nothing).
pub fn quiet<M: vm_memory::GuestMemory>(q: &mut Queue, mem: &M) {
    use virtio_queue::QueueT;
    let _ = q.disable_notification(mem);
}

/// Asks for a kick at the driver's next buffer, once the device has taken
/// every one it needed. True if buffers came in meanwhile: the caller
/// drains again (or a kick would be lost). A queue it cannot read counts
/// as empty: the device's next pass looks again.
pub fn rearm<M: vm_memory::GuestMemory>(q: &mut Queue, mem: &M) -> bool {
    use virtio_queue::QueueT;
    q.enable_notification(mem).unwrap_or(false)
}

/// One descriptor of a chain, as a device sees it: guest address, length,
/// and whether the device may write it. Devices validate chains as lists
/// of these before touching any byte.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seg {
    pub addr: vm_memory::GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// The descriptors of a chain (virtio-queue bounds the walk).
pub fn chain_segs<M>(chain: virtio_queue::DescriptorChain<M>) -> Vec<Seg>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    chain
        .map(|d| Seg {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect()
}

/// Reads `data.len()` bytes at `offset` of a device config blob; out-of-range
/// bytes read as zero so a probing driver never sees host memory.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = (start + data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}
