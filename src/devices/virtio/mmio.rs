//! virtio-mmio transport (virtio spec 1.2, section 4.2.2, version 2 layout).

use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::persist::TransportState;
use super::{Interrupt, QueueSnap, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d41_4741; // "AGAM"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    log: crate::devices::LogBudget,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            log: crate::devices::LogBudget::new(8),
        }
    }

    pub fn num_queues(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn save(&self) -> TransportState {
        let queues = if self.activated {
            self.device.queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(QueueSnap::from).collect(),
        }
    }

    /// Rebuilds a transport around a device restored from the same
    /// snapshot (see `persist::restore_queues`): the registers come from
    /// `st`, the queues are the validated ones the device did not take
    /// (none once it was activated). Nothing is activated or processed.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        st: &TransportState,
        queues: Vec<Queue>,
    ) -> MmioTransport {
        interrupt.restore(st.interrupt_status);
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: st.queue_sel,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            acked_features: st.acked_features,
            status: st.status,
            activated: st.activated,
            log: crate::devices::LogBudget::new(8),
        }
    }

    pub fn after_restore(&mut self) {
        if self.activated {
            self.device.after_restore();
            // A kick that arrived just before the snapshot was never
            // replayed: look at every queue once.
            for i in 0..self.device.queue_max_sizes().len() {
                self.device.process_queue(i);
            }
        }
    }

    /// Queue `index` was kicked. Kicks before DRIVER_OK are ignored, as the
    /// spec allows.
    pub fn notify(&mut self, index: usize) {
        if self.activated && index < self.device.queue_max_sizes().len() {
            self.device.process_queue(index);
        }
    }

    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Host-side I/O is ready; handled even before DRIVER_OK so clients can
    /// queue up (the device decides what it can do without queues).
    pub fn process_backend(&mut self) {
        self.device.process_backend();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None; // Queue registers are read-only once live.
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.as_ref());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            return;
        }
        // Only ready queues are validated: a driver may leave some unused.
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                self.log.log(format_args!(
                    "virtio-mmio: device {} queue {index} invalid; needs reset",
                    self.device.device_type()
                ));
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                return;
            }
        }
        let mut queues = std::mem::take(&mut self.queues);
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        match self.device.activate(
            self.mem.clone(),
            self.interrupt.clone(),
            queues,
            self.acked_features,
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                self.log.log(format_args!(
                    "virtio-mmio: activating device {}: {e}",
                    self.device.device_type()
                ));
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.queues = new_queues(self.device.as_ref());
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(u32::from(self.activated), |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                // The driver may only accept what the device offered.
                let offered = self.device.features();
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | (u64::from(v) & offered)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v as usize),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v),
            REG_QUEUE_DESC_HIGH => self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v),
            REG_QUEUE_AVAIL_LOW => self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v),
            REG_QUEUE_AVAIL_HIGH => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            REG_QUEUE_USED_LOW => self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v),
            REG_QUEUE_USED_HIGH => self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v),
            _ => {}
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.selected_queue() {
            f(q, v);
        }
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (4, 0, Ok(bytes)) = (data.len(), offset % 4, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}
