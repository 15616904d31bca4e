//! virtio-vsock's saved state. Host-side streams never survive a
//! snapshot (their sockets belong to the old VMM process): a restored
//! device starts with none and, once the vCPUs run, tells the guest with a
//! transport reset so it drops its side too. Listeners in the guest survive.

use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

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
