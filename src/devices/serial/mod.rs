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
    log: Option<ConsoleLog>,
    echo_stdout: bool,
}

/// The console log file, rotated once it holds [`CONSOLE_LOG_CAP`] bytes
/// (to `<path>.1`, replacing the previous one): the guest writes it, so
/// it must not grow without bound.
struct ConsoleLog {
    path: std::path::PathBuf,
    file: File,
    size: u64,
}

/// Bytes the console log holds before it rotates; with the one rotated
/// file, at most twice this is kept.
pub const CONSOLE_LOG_CAP: u64 = 32 << 20;

impl ConsoleLog {
    fn open(path: &std::path::Path) -> io::Result<ConsoleLog> {
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a link: a dropped VMM of an earlier run could have
        // left one here for this (root) one.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(ConsoleLog {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    fn write(&mut self, buf: &[u8]) {
        if self.size >= CONSOLE_LOG_CAP {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            if std::fs::rename(&self.path, &rotated).is_ok() {
                if let Ok(next) = ConsoleLog::open(&self.path) {
                    *self = next;
                }
            }
        }
        // A full disk must not stop the guest; the bytes are dropped.
        if self.file.write_all(buf).is_ok() {
            self.size += buf.len() as u64;
        }
    }
}

impl ConsoleSink {
    /// Output to `log` (created or appended to) and, with `echo_stdout`,
    /// to our stdout.
    pub fn new(log: Option<&std::path::Path>, echo_stdout: bool) -> io::Result<Self> {
        Ok(ConsoleSink {
            log: log.map(ConsoleLog::open).transpose()?,
            echo_stdout,
        })
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            log.write(buf);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_log_rotates_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut sink = ConsoleSink::new(Some(&path), false).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(CONSOLE_LOG_CAP >> 20) {
            sink.write_all(&chunk).unwrap();
        }
        sink.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after");
        let rotated = dir.path().join("console.log.1");
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), CONSOLE_LOG_CAP);
    }
}
