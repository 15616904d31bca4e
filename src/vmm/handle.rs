//! A handle on a running VM for other threads (the control socket
//! server): pause, resume, halt, status.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;

use super::vcpu::kick_signal;
use super::vcpu::{GuestStop, StopSignal};
use crate::devices::bus::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::LinkState;

/// Why the vCPUs could not all be parked.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("only {parked} of {total} vCPUs paused in time")]
    Timeout { parked: usize, total: usize },
}

/// Pause, resume and halt a running VM from another thread (the control
/// socket server).
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) stop: Arc<StopSignal>,
    /// vCPU threads while they run; None before start and once stopping,
    /// so a kick never targets a joined thread.
    pub(super) threads: Arc<Mutex<Option<Vec<libc::pthread_t>>>>,
    pub(crate) vcpus: usize,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) devices: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    pub(super) link: Option<LinkState>,
    pub(crate) lineage: Arc<Mutex<Lineage>>,
}

/// The memory layers guest RAM equalled at the last save or restore
/// (bottom first), and whether KVM has logged the guest's writes since:
/// what a diff snapshot is taken against.
#[derive(Debug, Default)]
pub struct Lineage {
    pub layers: Vec<super::snapshot::layers::MemoryLayer>,
    pub logging: bool,
    /// A restored VM until its first save: `/proc/self/pagemap`, opened
    /// before the jail (see `VmHandle::dirty_since_baseline`).
    pub pagemap: Option<std::fs::File>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl VmHandle {
    /// None without a NIC; Some(Ok) while passt runs, Some(Err(why)) after.
    pub fn network(&self) -> Option<Result<(), String>> {
        self.link
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn kick_all(&self) -> bool {
        let threads = lock(&self.threads);
        let Some(tids) = threads.as_ref() else {
            return false;
        };
        for t in tids {
            // SAFETY: the thread ids are live: the list is cleared under this
            // lock before any vCPU thread is joined.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
        true
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.stop.request_pause(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.stop.parked() < self.vcpus {
            if self.stop.reason().is_some() {
                return Err(PauseError::Stopping);
            }
            if !self.kick_all() || std::time::Instant::now() > deadline {
                self.stop.request_pause(false);
                return Err(PauseError::Timeout {
                    parked: self.stop.parked(),
                    total: self.vcpus,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.stop.request_pause(false);
    }

    pub fn state(&self) -> RunState {
        if self.vcpus > 0 && self.stop.parked() == self.vcpus {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    pub fn halt(&self, why: &str) {
        self.stop.stop(GuestStop::Halted(why.into()));
    }
}
