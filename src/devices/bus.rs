//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::sync::{Arc, Mutex};

pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0
            || self
                .entries
                .iter()
                .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(OverlapError { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let e = self
            .entries
            .iter()
            .find(|e| addr >= e.base && addr < e.base + e.len)?;
        let offset = addr - e.base;
        (offset + size as u64 <= e.len).then_some((e, offset))
    }

    /// Returns false when no device claims the access (reads then see 0xff).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device's mutex is only poisoned if a device panicked while holding it;
/// its state is still the best we have, so keep serving it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        assert!(bus.insert(0x10f, 1, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x110, &mut b));
        assert_eq!(b[0], 0xff);
        // An access that straddles the end of a device is not delivered.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x10e, &mut w));
        assert!(bus.write(0x100, &[7]));
        assert!(bus.read(0x100, &mut b));
        assert_eq!(b[0], 7);
    }
}
