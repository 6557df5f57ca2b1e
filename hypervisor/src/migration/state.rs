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
//!
//! The XSAVE area is carried whole, at the size of the source host's KVM uABI area
//! ([`XsaveAbi`]): the legacy 4 KiB `kvm_xsave` holds x87, SSE, AVX, AVX-512 and PKRU,
//! and KVM_CAP_XSAVE2 reports a larger size when dynamically enabled components (AMX
//! tile data) are permitted. [`MachineState::xsave_size`] says how large every vCPU's
//! area is; a destination whose KVM takes less refuses the guest in its pre-checks
//! (and again before restoring anything), never truncating it.

use std::fmt;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::Devices;
use crate::vstate::vm::{Vm, VmError, VmState};

/// The version of [`MachineState`] this build writes and reads.
///
/// Version 2: the XSAVE area is a byte string of [`MachineState::xsave_size`] bytes
/// (version 1 carried only the legacy 4 KiB `kvm_xsave`).
pub const STATE_VERSION: u32 = 2;

/// The legacy `kvm_xsave` area: KVM_GET_XSAVE's size, and the smallest area there is.
pub const LEGACY_XSAVE_SIZE: usize = std::mem::size_of::<kvm_xsave>();

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
    /// An XSAVE area does not have the size the state announces.
    #[error("The XSAVE area of vCPU {index} is {len} bytes, the state announces {size}")]
    XsaveLength {
        /// vCPU index.
        index: u32,
        /// Bytes carried.
        len: usize,
        /// [`MachineState::xsave_size`].
        size: u32,
    },
    /// The source's XSAVE areas are larger than this host's KVM takes.
    #[error("The guest's XSAVE areas are {source_size} bytes, this host's KVM takes {here} (KVM_CAP_XSAVE2): the guest would lose register state")]
    XsaveTooLarge {
        /// The source's area size.
        source_size: usize,
        /// This host's.
        here: usize,
    },
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
    /// x87, SSE, AVX, AVX-512, PKRU... state: the whole XSAVE area in KVM's uABI
    /// (standard) format, [`MachineState::xsave_size`] bytes.
    pub xsave: Vec<u8>,
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

/// How this host's KVM reads and writes a vCPU's XSAVE area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsaveAbi {
    /// No KVM_CAP_XSAVE2 (Linux before 5.17): KVM_GET_XSAVE and KVM_SET_XSAVE on the
    /// 4 KiB `kvm_xsave`.
    Legacy,
    /// KVM_GET_XSAVE2 and KVM_SET_XSAVE on an area of this many bytes (at least 4 KiB).
    Xsave2(usize),
}

impl XsaveAbi {
    /// What the KVM of `vm` offers: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd,
    /// which also counts the components this process was permitted (arch_prctl).
    pub fn of(vm: &VmFd) -> XsaveAbi {
        match usize::try_from(vm.check_extension_int(Cap::Xsave2)) {
            Ok(size) if size > 0 => XsaveAbi::Xsave2(size.max(LEGACY_XSAVE_SIZE)),
            _ => XsaveAbi::Legacy,
        }
    }

    /// Bytes in one vCPU's area.
    pub fn size(self) -> usize {
        match self {
            XsaveAbi::Legacy => LEGACY_XSAVE_SIZE,
            XsaveAbi::Xsave2(size) => size,
        }
    }

    /// An `Xsave` as large as KVM's area (the 4 KiB `kvm_xsave` plus the rest in `u32`s).
    fn buffer(self) -> Xsave {
        let extra = (self.size() - LEGACY_XSAVE_SIZE).div_ceil(std::mem::size_of::<u32>());
        Xsave::new(extra).expect("an XSAVE area fits a FamStructWrapper")
    }

    /// Reads the vCPU's whole XSAVE area.
    ///
    /// # Errors
    /// KVM's error.
    pub fn get(self, fd: &VcpuFd) -> Result<Vec<u8>, kvm_ioctls::Error> {
        let words: Vec<u32> = match self {
            XsaveAbi::Legacy => fd.get_xsave()?.region.to_vec(),
            XsaveAbi::Xsave2(_) => {
                let mut xsave = self.buffer();
                // SAFETY: the buffer holds the KVM_CAP_XSAVE2 size that KVM_GET_XSAVE2
                // writes; this process never asks for more XSAVE components after the
                // size was read.
                unsafe { fd.get_xsave2(&mut xsave)? };
                let fam = xsave.as_fam_struct_ref();
                fam.xsave
                    .region
                    .iter()
                    .chain(xsave.as_slice())
                    .copied()
                    .collect()
            }
        };
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        bytes.truncate(self.size());
        Ok(bytes)
    }

    /// Writes `area` (as [`XsaveAbi::get`] read it on a host whose area is the same
    /// size or smaller) into the vCPU; the rest of KVM's area is zero, which is what
    /// the area's XSAVE header already says of components it does not hold.
    ///
    /// # Errors
    /// KVM's error; `EINVAL` for an area larger than this host's.
    pub fn set(self, fd: &VcpuFd, area: &[u8]) -> Result<(), kvm_ioctls::Error> {
        if area.len() > self.size() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let mut words = area
            .chunks(std::mem::size_of::<u32>())
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_ne_bytes(w)
            })
            .chain(std::iter::repeat(0));
        let mut legacy = kvm_xsave::default();
        for (slot, word) in legacy.region.iter_mut().zip(&mut words) {
            *slot = word;
        }
        match self {
            // SAFETY: without KVM_CAP_XSAVE2, KVM_SET_XSAVE reads the 4 KiB kvm_xsave.
            XsaveAbi::Legacy => unsafe { fd.set_xsave(&legacy) },
            XsaveAbi::Xsave2(_) => {
                let mut xsave = self.buffer();
                for (slot, word) in xsave.as_mut_slice().iter_mut().zip(&mut words) {
                    *slot = word;
                }
                // SAFETY: only the legacy region is replaced; the FAM length stays.
                unsafe { xsave.as_mut_fam_struct().xsave.region = legacy.region };
                // SAFETY: the buffer holds the KVM_CAP_XSAVE2 size that KVM_SET_XSAVE
                // reads (see `get`).
                unsafe { fd.set_xsave2(&xsave) }
            }
        }
    }
}

/// A vCPU for [`Persist`]: its fd, index, the MSRs to save and how to reach its XSAVE
/// area.
pub struct Vcpu<'a> {
    /// vCPU index.
    pub index: u32,
    /// Its KVM fd (locked by the caller; the vCPU is paused).
    pub fd: &'a VcpuFd,
    /// MSR indexes to save ([`saveable_msrs`]).
    pub msrs: &'a [u32],
    /// This host's XSAVE interface.
    pub xsave: XsaveAbi,
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
            xsave: self.xsave.get(fd).map_err(err("XSAVE area"))?,
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
        // MachineState::check_xsave refused an area larger than this host's before.
        self.xsave.set(fd, &s.xsave).map_err(err("XSAVE area"))?;
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
    /// Bytes in every vCPU's XSAVE area: the source host's [`XsaveAbi::size`].
    pub xsave_size: u32,
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

    /// Parses JSON bytes, refusing an unknown version before anything else is read,
    /// and an XSAVE area whose length is not the announced size.
    ///
    /// # Errors
    /// [`StateError::Version`], [`StateError::Decode`], [`StateError::XsaveLength`].
    pub fn decode(bytes: &[u8]) -> Result<MachineState, StateError> {
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(StateError::Decode)?;
        if v.version != STATE_VERSION {
            return Err(StateError::Version(v.version));
        }
        let state: MachineState = serde_json::from_slice(bytes).map_err(StateError::Decode)?;
        let size = state.xsave_size;
        let bad = state
            .vcpus
            .iter()
            .find(|v| v.xsave.len() != size as usize || v.xsave.len() < LEGACY_XSAVE_SIZE);
        if let Some(v) = bad {
            return Err(StateError::XsaveLength {
                index: v.index,
                len: v.xsave.len(),
                size,
            });
        }
        Ok(state)
    }

    /// Refuses a state whose XSAVE areas this host cannot take whole.
    ///
    /// # Errors
    /// [`StateError::XsaveTooLarge`].
    pub fn check_xsave(&self, here: XsaveAbi) -> Result<(), StateError> {
        if self.xsave_size as usize > here.size() {
            return Err(StateError::XsaveTooLarge {
                source_size: self.xsave_size as usize,
                here: here.size(),
            });
        }
        Ok(())
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

    fn state_with_xsave(size: u32, len: usize) -> Vec<u8> {
        let vcpu = VcpuState {
            index: 0,
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: (0..len).map(|i| i as u8).collect(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            tsc_khz: None,
        };
        MachineState {
            version: STATE_VERSION,
            xsave_size: size,
            vcpus: vec![vcpu],
            online: 1,
            paused: false,
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: DevicesState::default(),
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn xsave_areas_carry_their_announced_size_whole() {
        let state = MachineState::decode(&state_with_xsave(11008, 11008)).unwrap();
        assert_eq!(state.vcpus[0].xsave.len(), 11008);
        assert_eq!(state.vcpus[0].xsave[4200], (4200 % 256) as u8);
        // A host with a smaller area refuses it; one as large takes it.
        let err = state.check_xsave(XsaveAbi::Legacy).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::XsaveTooLarge {
                    source_size: 11008,
                    here: 4096
                }
            ),
            "{err}"
        );
        state.check_xsave(XsaveAbi::Xsave2(11008)).unwrap();
        // A length other than the announced one, or below the legacy area, is corrupt.
        for (size, len) in [(11008, 4096), (2048, 2048)] {
            let err = MachineState::decode(&state_with_xsave(size, len)).unwrap_err();
            assert!(matches!(err, StateError::XsaveLength { .. }), "{err}");
        }
    }
}
