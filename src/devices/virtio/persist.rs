//! Saved state shared by the virtio devices: the transport's registers and
//! queues, and the validation every restore runs on them. Restored state
//! is untrusted input: queue sizes, ring addresses and features are
//! checked against the device and guest memory before anything uses them.

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::block::persist::BlockState;
use super::net::persist::NetState;
use super::vsock::persist::VsockState;
use super::VirtioDevice;

/// Everything the transport knows, for snapshots.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnap>,
}

/// A virtio device's own state, by kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DeviceKindState {
    Block(BlockState),
    Vsock(VsockState),
    Net(NetState),
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("device type {saved} in the snapshot, {here} here")]
    DeviceType { saved: u32, here: u32 },
    #[error("features {0:#x} were never offered")]
    Features(u64),
    #[error("{saved} queues in the snapshot, the device has {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index}: max size {saved} in the snapshot, {here} here")]
    QueueMax { index: usize, saved: u16, here: u16 },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("queue {index}: rings outside guest memory")]
    QueueMemory { index: usize },
    #[error("activated with {saved} queues, the device needs {here}")]
    ActiveQueues { saved: usize, here: usize },
    #[error("{what} is {saved} in the snapshot, {here} here")]
    Mismatch {
        what: &'static str,
        saved: String,
        here: String,
    },
    #[error("the snapshot holds another kind of device's state")]
    WrongKind,
}

/// Checks `st` against `device` and guest memory and returns its queues.
/// An activated device's ready queues must lie in guest memory.
pub fn restore_queues(
    device: &dyn VirtioDevice,
    st: &TransportState,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Queue>, PersistError> {
    if st.device_type != device.device_type() {
        return Err(PersistError::DeviceType {
            saved: st.device_type,
            here: device.device_type(),
        });
    }
    if st.acked_features & !device.features() != 0 {
        return Err(PersistError::Features(st.acked_features));
    }
    let maxes = device.queue_max_sizes();
    if st.queues.len() != maxes.len() {
        return Err(PersistError::QueueCount {
            saved: st.queues.len(),
            here: maxes.len(),
        });
    }
    let mut queues = Vec::with_capacity(maxes.len());
    for (index, (q, &max)) in st.queues.iter().zip(maxes).enumerate() {
        if q.max_size != max {
            return Err(PersistError::QueueMax {
                index,
                saved: q.max_size,
                here: max,
            });
        }
        let queue = Queue::try_from(virtio_queue::QueueState::from(*q)).map_err(|e| {
            PersistError::Queue {
                index,
                reason: e.to_string(),
            }
        })?;
        if st.activated && queue.ready() && !queue.is_valid(mem) {
            return Err(PersistError::QueueMemory { index });
        }
        queues.push(queue);
    }
    Ok(queues)
}

/// A saved value must equal what this host's configuration gives.
pub fn expect_eq<T: PartialEq + std::fmt::Debug>(
    what: &'static str,
    saved: T,
    here: T,
) -> Result<(), PersistError> {
    if saved == here {
        Ok(())
    } else {
        Err(PersistError::Mismatch {
            what,
            saved: format!("{saved:?}"),
            here: format!("{here:?}"),
        })
    }
}

/// Serde mirror of virtio-queue's QueueState. Restored through
/// `Queue::try_from`, which validates it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnap {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnap {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnap> for virtio_queue::QueueState {
    fn from(q: QueueSnap) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}
