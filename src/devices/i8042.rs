//! The i8042 keyboard controller, reduced to what a microVM needs: the guest
//! kernel's reboot path (`reboot=k`) pulses the CPU reset line through it,
//! which the VMM treats as the guest shutting down.

use vm_superio::I8042Device;

use super::bus::BusDevice;
use super::EventFdTrigger;

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // If the reset eventfd cannot be written the guest retries the
            // reset (Linux loops over reboot methods), so the error is moot.
            let _ = self.0.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(
            status[0], 0,
            "input buffer empty, so the kernel's kb_wait() ends"
        );
        dev.write(4, &[0x12]);
        assert!(evt.read().is_err(), "other commands do not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
