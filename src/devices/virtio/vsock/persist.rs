//! virtio-vsock's saved state. Host-side streams never survive a
//! snapshot (their sockets belong to the old VMM process): a restored
//! device starts with none and, once the vCPUs run, tells the guest with a
//! transport reset so it drops its side too. Listeners in the guest survive.

use std::path::Path;
use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::Queue;

use super::{Vsock, VsockError};
use crate::devices::virtio::persist::{expect_eq, restore_queues, PersistError, TransportState};
use crate::devices::virtio::{Activated, Interrupt};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

impl Vsock {
    pub fn save_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// Listens on `socket` and rebuilds the device as the snapshot left
    /// it, its queues taken straight from the validated state: no
    /// activation, no queue processed until `after_restore`. Returns the
    /// queues the transport keeps (all of them before activation).
    pub fn restore(
        guest_cid: u64,
        socket: &Path,
        mem: &GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        transport: &TransportState,
        st: &VsockState,
    ) -> Result<(Vsock, Vec<Queue>), VsockError> {
        expect_eq("guest CID", st.guest_cid, guest_cid)?;
        let mut vsock = Vsock::new(guest_cid, socket)?;
        let queues = restore_queues(&vsock, transport, mem)?;
        if !transport.activated {
            return Ok((vsock, queues));
        }
        let saved = queues.len();
        vsock.active = Some(
            Activated::new(mem.clone(), interrupt, queues, 3)
                .map_err(|_| PersistError::ActiveQueues { saved, here: 3 })?,
        );
        Ok((vsock, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{QueueSnap, VIRTIO_F_VERSION_1};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    fn transport(activated: bool) -> TransportState {
        let q = |i: u64| QueueSnap {
            max_size: 256,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            size: 16,
            ready: true,
            desc_table: 0x10000 * (i + 1),
            avail_ring: 0x10000 * (i + 1) + 0x1000,
            used_ring: 0x10000 * (i + 1) + 0x2000,
        };
        TransportState {
            device_type: super::super::TYPE_VSOCK,
            status: 0xf,
            acked_features: VIRTIO_F_VERSION_1,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            activated,
            interrupt_status: 0,
            queues: (0..3).map(q).collect(),
        }
    }

    #[test]
    fn restore_checks_the_cid_and_takes_the_queues() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let irq = || Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let st = VsockState { guest_cid: 3 };
        let other = VsockState { guest_cid: 4 };
        let e = Vsock::restore(3, &sock, &mem, irq(), &transport(true), &other)
            .err()
            .expect("another CID was accepted")
            .to_string();
        assert!(e.contains("guest CID is 4 in the snapshot, 3 here"), "{e}");
        let (v, kept) = Vsock::restore(3, &sock, &mem, irq(), &transport(true), &st).unwrap();
        assert!(kept.is_empty() && v.active.is_some());
        assert_eq!(v.save_state(), st);
        let (v, kept) = Vsock::restore(3, &sock, &mem, irq(), &transport(false), &st).unwrap();
        assert_eq!((kept.len(), v.active.is_none()), (3, true));
    }
}
