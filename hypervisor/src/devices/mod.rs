//! Emulated devices: the 16550 serial console on COM1 and the i8042 reset line. Every
//! other port or MMIO access is ignored and counted.

pub mod console;
pub mod serial;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::I8042Device;

pub use console::{ConsoleLog, ConsoleStats};
pub use serial::{IrqTrigger, SerialConsole};

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's IRQ line (GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command port (0xFE written here resets the CPU).
pub const I8042_COMMAND: u16 = 0x64;

/// Counts of accesses no device claimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IgnoredAccesses {
    /// Port I/O.
    pub pio: u64,
    /// MMIO.
    pub mmio: u64,
}

/// The i8042's reset line: sets a flag the vCPU loop checks after each exit.
#[derive(Debug, Default, Clone)]
pub struct ResetFlag(Arc<AtomicBool>);

impl vm_superio::Trigger for ResetFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The devices of one guest, shared by its vCPU threads.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<SerialConsole>,
    i8042: Mutex<I8042Device<ResetFlag>>,
    reset: ResetFlag,
    ignored_pio: AtomicU64,
    ignored_mmio: AtomicU64,
}

impl Devices {
    /// Devices around a serial console.
    pub fn new(serial: SerialConsole) -> Devices {
        let reset = ResetFlag::default();
        Devices {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
            ignored_pio: AtomicU64::new(0),
            ignored_mmio: AtomicU64::new(0),
        }
    }

    /// Whether the guest pulsed the reset line.
    pub fn reset_requested(&self) -> bool {
        self.reset.0.load(Ordering::SeqCst)
    }

    /// Accesses no device claimed.
    pub fn ignored(&self) -> IgnoredAccesses {
        IgnoredAccesses {
            pio: self.ignored_pio.load(Ordering::Relaxed),
            mmio: self.ignored_mmio.load(Ordering::Relaxed),
        }
    }

    /// The serial console (for its state and statistics).
    pub fn serial(&self) -> std::sync::MutexGuard<'_, SerialConsole> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A port write. String I/O (`rep outsb`) arrives as several bytes for one port.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            COM1_BASE..=0x3ff => self.serial().write((port - COM1_BASE) as u8, data),
            I8042_DATA | I8042_COMMAND => {
                let mut dev = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                for &byte in data {
                    let _ = dev.write((port - I8042_DATA) as u8, byte);
                }
            }
            _ => {
                self.ignored_pio.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff => self.serial().read((port - COM1_BASE) as u8, data),
            I8042_DATA | I8042_COMMAND => {
                let mut dev = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(dev.read((port - I8042_DATA) as u8));
            }
            _ => {
                self.ignored_pio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xFF);
            }
        }
    }

    /// An MMIO read: no MMIO devices exist, reads see all ones.
    pub fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        self.ignored_mmio.fetch_add(1, Ordering::Relaxed);
        data.fill(0xFF);
    }

    /// An MMIO write: ignored.
    pub fn mmio_write(&self, _addr: u64, _data: &[u8]) {
        self.ignored_mmio.fetch_add(1, Ordering::Relaxed);
    }
}
