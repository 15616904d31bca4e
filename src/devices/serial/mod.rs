//! COM1: a 16550 UART (vm-superio) whose output goes to the console log and,
//! optionally, the VMM's stdout; its interrupt is an irqfd on GSI 4.

pub mod persist;

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::bus::BusDevice;
use super::EventFdTrigger;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;

/// Where console bytes go. Writes are unbuffered so `logs -f` and a crashing
/// guest's last words are never lost in a buffer.
pub struct ConsoleSink {
    log: Option<File>,
    echo_stdout: bool,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, echo_stdout: bool) -> Self {
        ConsoleSink { log, echo_stdout }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            // A full disk must not stop the guest; the byte is dropped.
            let _ = log.write_all(buf);
        }
        if self.echo_stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(buf);
            let _ = out.flush();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    pub(super) uart: Serial<EventFdTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(irq: EventFdTrigger, sink: ConsoleSink) -> Self {
        SerialDevice {
            uart: Serial::new(irq, sink),
        }
    }

    /// Feeds host input to the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            // An interrupt that cannot be raised (eventfd full) is retried by
            // the guest driver's THRE polling; nothing to do here.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}
