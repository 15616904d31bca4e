//! Emulated devices. They see guest memory and an interrupt handle, never KVM.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device and the VMM see it. Each region carries a
/// bitmap of the pages the VMM itself wrote (virtio buffers and rings):
/// KVM's dirty log sees only the guest's own writes, and a diff snapshot
/// needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Log lines a guest can trigger (a broken queue kicked in a loop, a
/// driver resetting over and over): the first few are written, then one
/// notice, then nothing, so the guest cannot grow the VMM's log.
#[derive(Debug)]
pub struct LogBudget {
    left: u32,
}

impl LogBudget {
    pub const fn new(lines: u32) -> LogBudget {
        LogBudget { left: lines }
    }

    pub fn log(&mut self, line: std::fmt::Arguments) {
        match self.left {
            0 => {}
            1 => eprintln!("{line} (further such messages from this device are suppressed)"),
            _ => eprintln!("{line}"),
        }
        self.left = self.left.saturating_sub(1);
    }
}

/// `vm_superio::Trigger` over an EventFd: the fd is registered with KVM as an
/// irqfd (serial) or watched by the VMM's event loop (i8042 reset).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
