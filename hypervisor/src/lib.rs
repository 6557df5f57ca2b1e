//! berth-vmm: one KVM guest per process, on kvm-ioctls and vm-memory.
//!
//! Laid out by domain, as Firecracker is:
//! - [`vstate`]: guest memory, the VM (slots, dirty log, irqchip/PIT state) and vCPUs
//!   (threads `vcpu<N>`, pause/resume/stop, exits);
//! - [`arch`]: x86_64 boot layout, GDT, long mode, CPUID, MP table, LAPIC;
//! - [`devices`]: COM1 serial to a rotating `console.log`, i8042 reset;
//! - [`payload`]: the built-in heartbeat payload and Linux loading;
//! - [`control`]: the control socket protocol, its client and server;
//! - [`vmm`]: one guest's VMM tying them together; [`statedir`]: its state directory;
//! - [`host`]: host-side Linux plumbing (cgroups, affinity, hugepage pools, sysinfo);
//! - [`migration`]: live migration.
//! - [`libvirt`]: guests that libvirtd and QEMU run (the libvirt driver's side).
#![warn(missing_docs)]

pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
pub mod fence;
pub mod host;
mod hostlink;
pub mod libvirt;
pub mod migration;
pub mod payload;
pub mod report;
pub mod statedir;
pub mod vmm;
pub mod vstate;

pub use config::VmConfig;
pub use vmm::Vmm;
