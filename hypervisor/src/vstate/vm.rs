//! The KVM VM: memory slots, in-kernel irqchip and PIT, dirty logging, VM-wide state.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::vstate::memory::GuestMemory;

/// Why the VM could not be created or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("Cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("Cannot set the TSS address: {0}")]
    SetTssAddress(kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("Cannot create the in-kernel irqchip: {0}")]
    CreateIrqChip(kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("Cannot create the in-kernel PIT: {0}")]
    CreatePit(kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot get the supported CPUID: {0}")]
    GetSupportedCpuid(kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("Cannot set the memory regions: {0}")]
    SetUserMemoryRegion(kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("Cannot get the dirty log: {0}")]
    GetDirtyLog(kvm_ioctls::Error),
    /// The guest needs more vCPUs than KVM allows.
    #[error("Cannot create {wanted} vCPUs: KVM allows at most {max}")]
    TooManyVcpus {
        /// vCPUs asked for.
        wanted: u32,
        /// KVM's limit.
        max: usize,
    },
    /// Saving or restoring irqchip, PIT or clock failed.
    #[error("Cannot {0} the VM state: {1}")]
    State(&'static str, kvm_ioctls::Error),
}

/// One KVM memory slot: a guest range backed by a host range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address.
    pub guest_addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address.
    pub host_addr: u64,
}

/// The dirty pages of one slot since the last read: bit `n` of the bitmap is page
/// `guest_addr + n * 4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDirtyLog {
    /// The slot.
    pub slot: MemorySlot,
    /// One bit per 4 KiB page.
    pub bitmap: Vec<u64>,
}

/// VM-wide device state held by KVM: PIC, IOAPIC, PIT and kvmclock. Restore after the
/// memory and before the vCPUs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest memory registered.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
    slots: Vec<MemorySlot>,
    dirty_logging: AtomicBool,
}

impl Vm {
    /// Creates the VM, registers `memory`, then creates the irqchip and PIT.
    ///
    /// # Errors
    /// The failing step as a [`VmError`].
    pub fn new(memory: GuestMemory) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::SetTssAddress)?;
        // Only Intel VMX without unrestricted guest needs the identity map; a kernel that
        // refuses it (PVM, AMD) runs fine without.
        let _ = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR);
        let slots = memory
            .iter()
            .enumerate()
            .map(|(i, region)| MemorySlot {
                slot: i as u32,
                guest_addr: region.start_addr(),
                len: region.len(),
                host_addr: region.as_ptr() as u64,
            })
            .collect();
        let vm = Vm {
            kvm,
            fd,
            memory,
            slots,
            dirty_logging: AtomicBool::new(false),
        };
        // Memory before the irqchip: registering a slot waits for an SRCU grace period
        // of the VM, and right after the irqchip and PIT have registered their devices
        // that wait took 5-10 ms on this host, against 0.1-0.2 ms on a fresh VM.
        vm.register_slots(false)?;
        vm.fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(vm)
    }

    fn register_slots(&self, log_dirty: bool) -> Result<(), VmError> {
        for slot in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: slot.guest_addr.0,
                memory_size: slot.len,
                userspace_addr: slot.host_addr,
            };
            // SAFETY: the host range belongs to a region of `self.memory`, which lives
            // as long as the VM fd (both are fields of `self`, memory dropped after fd is
            // unusable) and is never unmapped or resized while registered.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(VmError::SetUserMemoryRegion)?;
        }
        Ok(())
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The memory slots as registered with KVM.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// KVM's supported CPUID.
    ///
    /// # Errors
    /// [`VmError::GetSupportedCpuid`].
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::GetSupportedCpuid)
    }

    /// Checks that KVM can create `count` vCPUs.
    ///
    /// # Errors
    /// [`VmError::TooManyVcpus`].
    pub fn check_vcpu_count(&self, count: u32) -> Result<(), VmError> {
        let max = self.kvm.get_max_vcpus();
        if count as usize > max {
            return Err(VmError::TooManyVcpus { wanted: count, max });
        }
        Ok(())
    }

    /// Turns KVM dirty page logging on or off for every slot. Turning it on starts a
    /// clean log: every page written after this call shows in [`Vm::dirty_log`].
    ///
    /// # Errors
    /// [`VmError::SetUserMemoryRegion`].
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.register_slots(on)?;
        self.dirty_logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// The pages of every slot written by the guest since the last call (or since
    /// logging was turned on), and clears the log. Needs dirty logging on.
    ///
    /// # Errors
    /// [`VmError::GetDirtyLog`].
    pub fn dirty_log(&self) -> Result<Vec<SlotDirtyLog>, VmError> {
        self.slots
            .iter()
            .map(|slot| {
                let bitmap = self
                    .fd
                    .get_dirty_log(slot.slot, slot.len as usize)
                    .map_err(VmError::GetDirtyLog)?;
                Ok(SlotDirtyLog {
                    slot: *slot,
                    bitmap,
                })
            })
            .collect()
    }

    /// Reads PIC, IOAPIC, PIT and clock.
    ///
    /// # Errors
    /// [`VmError::State`].
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| VmError::State("save", e))?;
            Ok(chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(|e| VmError::State("save", e))?,
            clock: self.fd.get_clock().map_err(|e| VmError::State("save", e))?,
        })
    }

    /// Restores what [`Vm::save_state`] read.
    ///
    /// # Errors
    /// [`VmError::State`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let err = |e| VmError::State("restore", e);
        self.fd.set_irqchip(&state.pic_master).map_err(err)?;
        self.fd.set_irqchip(&state.pic_slave).map_err(err)?;
        self.fd.set_irqchip(&state.ioapic).map_err(err)?;
        self.fd.set_pit2(&state.pit).map_err(err)?;
        let mut clock = state.clock;
        // Only the clock value is restored; the flags describe the source host.
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(err)
    }
}
