//! COM1: vm-superio's 16550 whose interrupt is an irqfd on GSI 4 and whose output goes
//! to the console log.

use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleLog;

/// Raises the serial IRQ by writing to an eventfd registered as an irqfd.
#[derive(Debug, Clone)]
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The 16550 and its log.
#[derive(Debug)]
pub struct SerialConsole {
    inner: Serial<IrqTrigger, NoEvents, ConsoleLog>,
}

impl SerialConsole {
    /// A serial port writing to `log`, interrupting through `irq`.
    pub fn new(irq: IrqTrigger, log: ConsoleLog) -> SerialConsole {
        SerialConsole {
            inner: Serial::new(irq, log),
        }
    }

    /// Register writes at `offset` (several bytes: a string write to one register).
    pub fn write(&mut self, offset: u8, data: &[u8]) {
        for &byte in data {
            // Errors are the IRQ eventfd's or the log's; the guest must not stall on them.
            let _ = self.inner.write(offset, byte);
        }
        self.inner.writer_mut().end_of_exit();
    }

    /// Register reads at `offset`.
    pub fn read(&mut self, offset: u8, data: &mut [u8]) {
        for byte in data {
            *byte = self.inner.read(offset);
        }
    }

    /// The registers, for migration.
    pub fn state(&self) -> SerialState {
        self.inner.state()
    }

    /// The log.
    pub fn log(&self) -> &ConsoleLog {
        self.inner.writer()
    }

    /// The log, to move it (a migrated guest's console joins its final state directory).
    pub fn log_mut(&mut self) -> &mut ConsoleLog {
        self.inner.writer_mut()
    }

    /// Restores registers saved on a migration source by writing them through the
    /// register interface, as the guest would (the divisor latch with DLAB set, then
    /// LCR, IER, MCR, scratch); line and interrupt status follow from them. Pending input
    /// is queued again.
    pub fn restore_registers(&mut self, s: &crate::migration::state::SerialRegisters) {
        const IER: u8 = 1;
        const LCR: u8 = 3;
        const MCR: u8 = 4;
        const SCR: u8 = 7;
        const DLAB: u8 = 0x80;
        let _ = self.inner.write(LCR, s.line_control | DLAB);
        let _ = self.inner.write(0, s.baud_divisor_low);
        let _ = self.inner.write(1, s.baud_divisor_high);
        let _ = self.inner.write(LCR, s.line_control);
        let _ = self.inner.write(IER, s.interrupt_enable);
        let _ = self.inner.write(MCR, s.modem_control);
        let _ = self.inner.write(SCR, s.scratch);
        if !s.in_buffer.is_empty() {
            let _ = self.inner.enqueue_raw_bytes(&s.in_buffer);
        }
    }
}
