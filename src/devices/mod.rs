//! Emulated devices. They see guest memory and an interrupt handle, never KVM.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// `vm_superio::Trigger` over an EventFd: the fd is registered with KVM as an
/// irqfd (serial) or watched by the VMM's event loop (i8042 reset).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
