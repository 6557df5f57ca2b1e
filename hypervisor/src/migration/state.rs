//! Everything a guest is besides its RAM: per-vCPU registers and KVM state, the VM's
//! irqchip, PIT and clock, and the devices. Saved on the source once its vCPUs are
//! paused, carried in one `State` frame, and restored into the destination's machine,
//! which was built from the destination's own spec (so it may have more memory, another
//! backing, more vCPUs).
//!
//! Each component has a [`Persist`] implementation (Firecracker's shape, restoring into
//! an existing component because the destination builds its machine before the state
//! arrives). [`MachineState`] is the serde aggregate; it is JSON with a `version` field,
//! and a receiver refuses a version it does not know before reading anything else.
//!
//! vCPU restore order (see [`Persist::restore`] for [`Vcpu`]), as Firecracker documents
//! it: TSC frequency, CPUID, MP state, regs, SREGS (control registers and EFER shape
//! how the rest is read), xsave, xcrs, debug regs, LAPIC after SREGS (APIC base MSR
//! lives in SREGS), MSRs after LAPIC (TSC-deadline needs the LAPIC mode, and TSC comes
//! first in the list so that TSC-deadline is relative to the restored TSC), vCPU events
//! last (pending exceptions and interrupts need everything else in place).

use std::fmt;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::devices::Devices;
use crate::vstate::vm::{Vm, VmError, VmState};

/// The version of [`MachineState`] this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// `IA32_TSC`: restored before every other MSR.
const MSR_IA32_TSC: u32 = 0x10;

/// Why state could not be saved, encoded or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU state ioctl failed on the source.
    #[error("Cannot save the {step} of vCPU {index}: {source}")]
    SaveVcpu {
        /// vCPU index.
        index: u32,
        /// Which state.
        step: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU state ioctl failed on the destination.
    #[error("Cannot restore the {step} of vCPU {index}: {source}")]
    RestoreVcpu {
        /// vCPU index.
        index: u32,
        /// Which state.
        step: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM took only some of the MSRs.
    #[error("Cannot restore the MSRs of vCPU {index}: KVM took {done} of {total}, refusing MSR {msr:#x}")]
    RestoreMsrs {
        /// vCPU index.
        index: u32,
        /// MSRs set.
        done: usize,
        /// MSRs in the state.
        total: usize,
        /// The first refused MSR.
        msr: u32,
    },
    /// The TSC frequency differs and this host cannot scale it.
    #[error("Cannot give vCPU {index} the source's TSC frequency of {khz} kHz: {source}")]
    TscFrequency {
        /// vCPU index.
        index: u32,
        /// The source's frequency.
        khz: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Building a KVM list failed.
    #[error("Cannot build the {0} list: {1}")]
    List(&'static str, String),
    /// The MSR index list could not be read.
    #[error("Cannot read KVM's MSR index list: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    /// VM-wide state.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Encoding failed.
    #[error("Cannot encode the machine state: {0}")]
    Encode(serde_json::Error),
    /// Decoding failed.
    #[error("Cannot decode the machine state: {0}")]
    Decode(serde_json::Error),
    /// A version this build does not know.
    #[error("Machine state version {0} is not known (this build reads version {STATE_VERSION})")]
    Version(u32),
    /// The state has more vCPUs than this machine.
    #[error("The source has {source_vcpus} vCPUs, this VMM only {here} (maxVcpus)")]
    TooManyVcpus {
        /// vCPUs in the state.
        source_vcpus: usize,
        /// vCPUs here.
        here: usize,
    },
}

/// Save and restore of one component, as Firecracker's `Persist`: `save` reads the
/// component into a plain serde value; `restore` puts such a value back into an
/// existing component of the same kind (built by the destination from its own spec).
pub trait Persist {
    /// The saved form.
    type State;
    /// What can go wrong.
    type Error;

    /// Reads the component's state. The component must be quiescent (vCPUs paused).
    ///
    /// # Errors
    /// The failing step.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Writes `state` into the component before it runs.
    ///
    /// # Errors
    /// The failing step.
    fn restore(&self, state: &Self::State) -> Result<(), Self::Error>;
}

/// One vCPU's complete KVM state.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuState {
    /// vCPU index (APIC ID).
    pub index: u32,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists and can read, TSC first.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMI, SMI.
    pub events: kvm_vcpu_events,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// A vCPU for [`Persist`]: its fd, index, and the MSRs to save.
pub struct Vcpu<'a> {
    /// vCPU index.
    pub index: u32,
    /// Its KVM fd (locked by the caller; the vCPU is paused).
    pub fd: &'a VcpuFd,
    /// MSR indexes to save ([`saveable_msrs`]).
    pub msrs: &'a [u32],
}

impl Persist for Vcpu<'_> {
    type State = VcpuState;
    type Error = StateError;

    fn save(&self) -> Result<VcpuState, StateError> {
        let index = self.index;
        let err = |step| {
            move |source| StateError::SaveVcpu {
                index,
                step,
                source,
            }
        };
        let fd = self.fd;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, self.msrs).map_err(err("MSRs"))?;
        Ok(VcpuState {
            index,
            cpuid,
            mp_state: fd.get_mp_state().map_err(err("MP state"))?,
            regs: fd.get_regs().map_err(err("registers"))?,
            sregs: fd.get_sregs().map_err(err("segment registers"))?,
            xsave: fd.get_xsave().map_err(err("XSAVE area"))?,
            xcrs: fd.get_xcrs().map_err(err("XCRs"))?,
            debug_regs: fd.get_debug_regs().map_err(err("debug registers"))?,
            lapic: fd.get_lapic().map_err(err("LAPIC"))?,
            msrs,
            events: fd.get_vcpu_events().map_err(err("vCPU events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Restores in the documented order: TSC frequency, CPUID, MP state, regs, SREGS,
    /// xsave, xcrs, debug regs, LAPIC, MSRs (TSC first), events.
    fn restore(&self, s: &VcpuState) -> Result<(), StateError> {
        let index = self.index;
        let err = |step| {
            move |source| StateError::RestoreVcpu {
                index,
                step,
                source,
            }
        };
        let fd = self.fd;
        if let Some(khz) = s.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz)
                    .map_err(|source| StateError::TscFrequency { index, khz, source })?;
            }
        }
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| StateError::List("CPUID", format!("{e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
        fd.set_mp_state(s.mp_state).map_err(err("MP state"))?;
        fd.set_regs(&s.regs).map_err(err("registers"))?;
        fd.set_sregs(&s.sregs).map_err(err("segment registers"))?;
        // SAFETY: `s.xsave` is a whole legacy kvm_xsave read by KVM_GET_XSAVE on the
        // source; KVM_SET_XSAVE reads exactly that 4 KiB structure (no extra area, since
        // this VMM never enables KVM_CAP_XSAVE2).
        unsafe { fd.set_xsave(&s.xsave) }.map_err(err("XSAVE area"))?;
        fd.set_xcrs(&s.xcrs).map_err(err("XCRs"))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(err("debug registers"))?;
        fd.set_lapic(&s.lapic).map_err(err("LAPIC"))?;
        let msrs =
            Msrs::from_entries(&s.msrs).map_err(|e| StateError::List("MSR", format!("{e:?}")))?;
        let done = fd.set_msrs(&msrs).map_err(err("MSRs"))?;
        if done < s.msrs.len() {
            return Err(StateError::RestoreMsrs {
                index,
                done,
                total: s.msrs.len(),
                msr: s.msrs[done].index,
            });
        }
        fd.set_vcpu_events(&s.events).map_err(err("vCPU events"))?;
        Ok(())
    }
}

fn read_msrs(fd: &VcpuFd, indexes: &[u32]) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = indexes
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).expect("the saveable list fits KVM_MAX_MSR_ENTRIES");
    let read = fd.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice()[..read].to_vec())
}

/// The MSRs of `fd` worth saving: every index in KVM's list that the vCPU can read, in
/// KVM's order with `IA32_TSC` moved first. Call with the vCPU paused (or not started).
///
/// # Errors
/// [`StateError::MsrIndexList`], or a failing KVM_GET_MSRS.
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm.get_msr_index_list().map_err(StateError::MsrIndexList)?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    if let Some(pos) = candidates.iter().position(|&i| i == MSR_IA32_TSC) {
        candidates.remove(pos);
        candidates.insert(0, MSR_IA32_TSC);
    }
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop it and go on after it.
    let mut saveable = Vec::with_capacity(candidates.len());
    let mut start = 0;
    while start < candidates.len() {
        let end = (start + kvm_bindings::KVM_MAX_MSR_ENTRIES).min(candidates.len());
        let chunk = &candidates[start..end];
        let read = read_msrs(fd, chunk)
            .map_err(|source| StateError::SaveVcpu {
                index: 0,
                step: "MSR probe",
                source,
            })?
            .len();
        saveable.extend_from_slice(&chunk[..read]);
        start += read;
        if read < chunk.len() {
            start += 1;
        }
    }
    Ok(saveable)
}

impl Persist for Vm {
    type State = VmState;
    type Error = VmError;

    fn save(&self) -> Result<VmState, VmError> {
        self.save_state()
    }

    fn restore(&self, state: &VmState) -> Result<(), VmError> {
        self.restore_state(state)
    }
}

/// The 16550's registers and pending input (vm-superio's `SerialState`, as serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SerialRegisters {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification (derived again on the destination).
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status (derived again on the destination).
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// Device state. The i8042 carries only the reset line, and a guest that pulled it is
/// halted, which the sender refuses to migrate; so there is nothing of it to carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialRegisters,
}

impl Persist for Devices {
    type State = DevicesState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<DevicesState, Self::Error> {
        let s = self.serial().state();
        Ok(DevicesState {
            serial: SerialRegisters {
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
            },
        })
    }

    fn restore(&self, state: &DevicesState) -> Result<(), Self::Error> {
        self.serial().restore_registers(&state.serial);
        Ok(())
    }
}

/// The whole non-memory state of a guest at switchover.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Every vCPU the source created (started or held for hot-add), by index.
    pub vcpus: Vec<VcpuState>,
    /// vCPUs the source had started.
    pub online: u32,
    /// Whether the guest was paused by request before the migration (the destination
    /// then starts it paused).
    pub paused: bool,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub vm: VmState,
    /// Devices.
    pub devices: DevicesState,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl MachineState {
    /// JSON bytes.
    ///
    /// # Errors
    /// [`StateError::Encode`].
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(StateError::Encode)
    }

    /// Parses JSON bytes, refusing an unknown version before anything else is read.
    ///
    /// # Errors
    /// [`StateError::Version`], [`StateError::Decode`].
    pub fn decode(bytes: &[u8]) -> Result<MachineState, StateError> {
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(StateError::Decode)?;
        if v.version != STATE_VERSION {
            return Err(StateError::Version(v.version));
        }
        serde_json::from_slice(bytes).map_err(StateError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_versions_are_refused_before_decoding() {
        let err = MachineState::decode(br#"{"version": 99, "vcpus": "whatever"}"#).unwrap_err();
        assert!(matches!(err, StateError::Version(99)), "{err}");
        assert!(matches!(
            MachineState::decode(b"{}").unwrap_err(),
            StateError::Decode(_)
        ));
    }
}
