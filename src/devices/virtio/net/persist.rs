//! virtio-net's saved state: what the guest's driver read from the config
//! space. Frames in flight are not kept: a restored VM gets a fresh passt,
//! and TCP in the guest retransmits what was lost.

use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::Queue;

use super::{LinkState, Net, NetConfig, PasstError};
use crate::devices::virtio::persist::{expect_eq, restore_queues, PersistError, TransportState};
use crate::devices::virtio::{Activated, Interrupt};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub mtu: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Passt(#[from] PasstError),
    #[error("restoring the NIC: {0}")]
    State(#[from] PersistError),
}

impl Net {
    /// What every NIC shows its driver (the state of format 1.0/1.1
    /// snapshots, which did not record it).
    pub fn configured_state() -> NetState {
        NetState {
            mac: super::config::GUEST_MAC,
            mtu: super::GUEST_MTU,
        }
    }

    pub fn save_state(&self) -> NetState {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        NetState {
            mac,
            mtu: u16::from_le_bytes([self.config[10], self.config[11]]),
        }
    }

    /// Starts a fresh passt and rebuilds the device as the snapshot left
    /// it, its queues taken straight from the validated state: no
    /// activation, no frame moved until `after_restore`. Returns the queues
    /// the transport keeps (all of them before activation).
    pub fn restore(
        cfg: &NetConfig,
        link: LinkState,
        mem: &GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        transport: &TransportState,
        st: &NetState,
    ) -> Result<(Net, Vec<Queue>), NetError> {
        let mut net = Net::new(cfg, link)?;
        let here = net.save_state();
        expect_eq("MAC address", st.mac, here.mac)?;
        expect_eq("MTU", st.mtu, here.mtu)?;
        let queues = restore_queues(&net, transport, mem)?;
        if !transport.activated {
            return Ok((net, queues));
        }
        let saved = queues.len();
        net.active = Some(
            Activated::new(mem.clone(), interrupt, queues, 2)
                .map_err(|_| PersistError::ActiveQueues { saved, here: 2 })?,
        );
        Ok((net, Vec::new()))
    }
}
