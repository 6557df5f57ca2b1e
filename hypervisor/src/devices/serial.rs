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
}
