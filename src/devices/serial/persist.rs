//! The serial port's saved state: vm-superio's registers and input FIFO.

use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::Serial;

use super::{ConsoleSink, SerialDevice};
use crate::devices::EventFdTrigger;

/// Serde mirror of vm-superio's SerialState.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("serial port state is not valid: {0}")]
pub struct SerialRestoreError(String);

impl SerialDevice {
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Rebuilds the port from untrusted state; vm-superio validates it
    /// (e.g. the input FIFO's size).
    pub fn restore(
        irq: EventFdTrigger,
        sink: ConsoleSink,
        st: &SerialState,
    ) -> Result<Self, SerialRestoreError> {
        let state = UartState {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, irq, NoEvents, sink)
            .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }
}
