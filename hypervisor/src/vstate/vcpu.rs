//! vCPUs: creation and boot configuration, and the thread that runs each one.
//!
//! A vCPU thread (`vcpu<N>`) loops on KVM_RUN and hands port and MMIO exits to the
//! devices. Other threads steer it through [`VcpuHandle`]: pause, resume and stop set a
//! wish and kick the thread out of KVM_RUN with a signal; the kick sets
//! `kvm_run.immediate_exit`, so a kick that lands just before KVM_RUN is not lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_run, CpuId, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::lapic;
use crate::devices::Devices;
use crate::hostlink::{self, Pid};
use crate::vstate::vm::Vm;

/// Why a vCPU could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {0}: {1}")]
    Create(u32, kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("Cannot set the CPUID of vCPU {0}: {1}")]
    SetCpuid(u32, kvm_ioctls::Error),
    /// LAPIC get/set failed.
    #[error("Cannot set up the local APIC of vCPU {0}: {1}")]
    Lapic(u32, kvm_ioctls::Error),
    /// KVM_SET_MP_STATE failed.
    #[error("Cannot make vCPU {0} runnable: {1}")]
    SetMpState(u32, kvm_ioctls::Error),
    /// Spawning the thread failed.
    #[error("Cannot start the thread of vCPU {0}: {1}")]
    Spawn(u32, std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// KVM_GET_REGS or KVM_GET_SREGS failed.
    #[error("Cannot read the registers of vCPU {0}: {1}")]
    GetRegisters(u32, kvm_ioctls::Error),
}

/// Where a vCPU is and in which mode, from KVM_GET_REGS and KVM_GET_SREGS: enough to
/// tell that a guest runs its own code (`rip`) and is still in long mode (`efer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuRegisters {
    /// vCPU index.
    pub index: u32,
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// Code segment selector.
    pub cs: u16,
    /// CR0 (PE, PG).
    pub cr0: u64,
    /// CR2, the last page-fault address.
    pub cr2: u64,
    /// CR3, the page-table root.
    pub cr3: u64,
    /// CR4 (PAE, LA57).
    pub cr4: u64,
    /// EFER (LME, LMA).
    pub efer: u64,
}

/// What a vCPU is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state", content = "reason")]
pub enum VcpuRunState {
    /// Created, its thread not started (hot-add reserve).
    NotStarted,
    /// In its KVM_RUN loop.
    Running,
    /// Parked by a pause.
    Paused,
    /// The guest stopped this vCPU (HLT exit with interrupts off, reset).
    Halted,
    /// A fault the guest cannot recover from (triple fault, entry failure).
    Crashed(String),
    /// Its thread has ended.
    Stopped,
}

impl VcpuRunState {
    /// Whether the vCPU is not executing guest code and will not by itself.
    pub fn is_quiescent(&self) -> bool {
        !matches!(self, VcpuRunState::Running)
    }
}

/// What the VMM wants a vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wish {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Control {
    wish: Wish,
    state: VcpuRunState,
}

/// Events a vCPU thread reports to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The vCPU crashed.
    Crashed {
        /// vCPU index.
        index: u32,
        /// What happened.
        reason: String,
    },
    /// The guest asked to stop (i8042 reset, system event, halt).
    Halted {
        /// vCPU index.
        index: u32,
    },
}

/// Receives [`VcpuEvent`]s.
pub type EventSink = std::sync::mpsc::Sender<crate::vmm::VmmEvent>;

/// A created vCPU, its KVM fd, and the state its thread shares with the VMM.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    fd: Mutex<VcpuFd>,
    run_ptr: usize,
    control: Mutex<Control>,
    changed: Condvar,
    tid: AtomicI32,
    thread: Mutex<Option<JoinHandle<()>>>,
}

thread_local! {
    static KVM_RUN: Cell<usize> = const { Cell::new(0) };
}

/// The signal that kicks vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = KVM_RUN.with(Cell::get) as *mut kvm_run;
    if !ptr.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by its vCPU loop and
        // valid while the VcpuHandle (which owns the fd) lives; the loop holds an Arc to
        // it. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::SignalHandler);
    });
    result
}

impl VcpuHandle {
    /// Creates vCPU `index` with `cpuid`, LINT0/LINT1 wired like a PC, runnable.
    ///
    /// # Errors
    /// The failing KVM call.
    pub fn create(vm: &Vm, index: u32, cpuid: &CpuId) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let mut fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        fd.set_cpuid2(cpuid)
            .map_err(|e| VcpuError::SetCpuid(index, e))?;
        let mut lapic_state = fd.get_lapic().map_err(|e| VcpuError::Lapic(index, e))?;
        lapic::set_lint(&mut lapic_state);
        fd.set_lapic(&lapic_state)
            .map_err(|e| VcpuError::Lapic(index, e))?;
        // KVM makes application processors wait for INIT/SIPI; the built-in payloads
        // start every vCPU directly at its entry point (a Linux guest's wait again, see
        // `wait_for_startup_ipi`).
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(|e| VcpuError::SetMpState(index, e))?;
        let run_ptr = fd.get_kvm_run() as *mut kvm_run as usize;
        Ok(VcpuHandle {
            index,
            fd: Mutex::new(fd),
            run_ptr,
            control: Mutex::new(Control {
                wish: Wish::Run,
                state: VcpuRunState::NotStarted,
            }),
            changed: Condvar::new(),
            tid: AtomicI32::new(0),
            thread: Mutex::new(None),
        })
    }

    /// Makes this vCPU wait for INIT and SIPI from another vCPU, as an application
    /// processor does on a PC: a Linux guest starts its other CPUs itself (through the
    /// MP table), and a vCPU left runnable would run from the reset vector instead.
    ///
    /// # Errors
    /// [`VcpuError::SetMpState`].
    pub fn wait_for_startup_ipi(&self) -> Result<(), VcpuError> {
        self.fd()
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(|e| VcpuError::SetMpState(self.index, e))
    }

    /// The vCPU index (also its APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU fd, for reading and writing vCPU state. Locking it while the vCPU
    /// runs waits until the thread leaves KVM_RUN; pause first.
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads [`VcpuRegisters`]. Call it only on a quiescent vCPU: a running one holds
    /// its fd until it leaves KVM_RUN.
    ///
    /// # Errors
    /// [`VcpuError::GetRegisters`].
    pub fn registers(&self) -> Result<VcpuRegisters, VcpuError> {
        let fd = self.fd();
        let err = |e| VcpuError::GetRegisters(self.index, e);
        let regs = fd.get_regs().map_err(err)?;
        let sregs = fd.get_sregs().map_err(err)?;
        Ok(VcpuRegisters {
            index: self.index,
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cs: sregs.cs.selector,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        })
    }

    /// The thread id, once started.
    pub fn tid(&self) -> Option<Pid> {
        match self.tid.load(Ordering::SeqCst) {
            0 => None,
            tid => Some(tid),
        }
    }

    /// What the vCPU is doing now.
    pub fn state(&self) -> VcpuRunState {
        self.control().state.clone()
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: VcpuRunState) {
        self.control().state = state;
        self.changed.notify_all();
    }

    /// Starts the vCPU thread `vcpu<N>`; it pins itself to `pinning` (if any) and runs
    /// unless `paused`.
    ///
    /// # Errors
    /// [`VcpuError::Spawn`].
    pub fn start(
        self: &Arc<Self>,
        devices: Arc<Devices>,
        events: EventSink,
        pinning: Option<berth_schema::CpuSet>,
        paused: bool,
    ) -> Result<(), VcpuError> {
        {
            let mut c = self.control();
            c.wish = if paused { Wish::Pause } else { Wish::Run };
            c.state = if paused {
                VcpuRunState::Paused
            } else {
                VcpuRunState::Running
            };
        }
        let me = Arc::clone(self);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                let tid = hostlink::current_tid();
                me.tid.store(tid, Ordering::SeqCst);
                let pin_result = pinning
                    .as_ref()
                    .map(|cpus| hostlink::set_thread_affinity(tid, cpus));
                let _ = tid_tx.send(pin_result);
                me.run_loop(&devices, &events);
            })
            .map_err(|e| VcpuError::Spawn(self.index, e))?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        // The thread has a tid and is pinned before start returns, so status never shows
        // a running vCPU without them.
        if let Ok(Some(Err(e))) = tid_rx.recv() {
            eprintln!("berth-vmm: cannot pin vcpu{}: {e}", self.index);
        }
        Ok(())
    }

    fn run_loop(&self, devices: &Devices, events: &EventSink) {
        KVM_RUN.with(|p| p.set(self.run_ptr));
        loop {
            let mut fd = self.fd();
            // Clear the kick flag before looking at the wish: a kick after this point
            // makes the KVM_RUN below return at once.
            fd.set_kvm_immediate_exit(0);
            let wish = self.control().wish;
            match wish {
                Wish::Stop => break,
                Wish::Pause => {
                    drop(fd);
                    self.park();
                    continue;
                }
                Wish::Run => {}
            }
            let outcome = match fd.run() {
                Ok(exit) => handle_exit(exit, devices),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Outcome::Continue
                }
                Err(e) => Outcome::Crash(format!("KVM_RUN failed: {e}")),
            };
            drop(fd);
            match outcome {
                Outcome::Continue => {}
                Outcome::Crash(reason) => {
                    self.set_state(VcpuRunState::Crashed(reason.clone()));
                    let _ = events.send(crate::vmm::VmmEvent::Vcpu(VcpuEvent::Crashed {
                        index: self.index,
                        reason,
                    }));
                    self.wait_for_stop();
                    break;
                }
                Outcome::Halt => {
                    self.set_state(VcpuRunState::Halted);
                    let _ = events.send(crate::vmm::VmmEvent::Vcpu(VcpuEvent::Halted {
                        index: self.index,
                    }));
                    self.wait_for_stop();
                    break;
                }
            }
        }
        KVM_RUN.with(|p| p.set(0));
        self.set_state(VcpuRunState::Stopped);
    }

    /// Parks while the wish is Pause.
    fn park(&self) {
        let mut c = self.control();
        if c.wish == Wish::Pause {
            c.state = VcpuRunState::Paused;
            self.changed.notify_all();
        }
        while c.wish == Wish::Pause {
            c = self.changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        if c.wish == Wish::Run {
            c.state = VcpuRunState::Running;
            self.changed.notify_all();
        }
    }

    fn wait_for_stop(&self) {
        let mut c = self.control();
        while c.wish != Wish::Stop {
            c = self.changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn wish(&self, wish: Wish) {
        {
            let mut c = self.control();
            if matches!(c.state, VcpuRunState::NotStarted | VcpuRunState::Stopped) {
                return;
            }
            c.wish = wish;
        }
        self.changed.notify_all();
        self.kick();
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        let guard = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = guard.as_ref() {
            // SAFETY: the pthread is alive or joinable (its JoinHandle is held, so the id
            // is not reused); the kick signal has a handler that only sets a flag.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        }
    }

    /// Asks the vCPU to pause (no wait).
    pub fn request_pause(&self) {
        self.wish(Wish::Pause);
    }

    /// Asks a paused vCPU to run again.
    pub fn resume(&self) {
        let mut c = self.control();
        if c.wish == Wish::Pause {
            c.wish = Wish::Run;
            self.changed.notify_all();
        }
    }

    /// Asks the vCPU thread to end.
    pub fn request_stop(&self) {
        self.wish(Wish::Stop);
    }

    /// Waits until the vCPU is not running guest code, up to `deadline`.
    pub fn wait_quiescent(&self, deadline: Instant) -> bool {
        let mut c = self.control();
        loop {
            let done = match c.wish {
                Wish::Pause => c.state != VcpuRunState::Running,
                Wish::Stop => matches!(c.state, VcpuRunState::Stopped | VcpuRunState::NotStarted),
                Wish::Run => c.state.is_quiescent(),
            };
            if done {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let (guard, _) = self
                .changed
                .wait_timeout(c, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner());
            c = guard;
            if c.wish != Wish::Run {
                drop(c);
                // Re-kick in case the thread was between checks.
                self.kick();
                c = self.control();
            }
        }
    }

    /// Joins the thread after [`VcpuHandle::request_stop`], if it ended by `deadline`.
    pub fn join(&self, deadline: Instant) -> bool {
        if !self.wait_quiescent(deadline) {
            return false;
        }
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
        true
    }
}

enum Outcome {
    Continue,
    Crash(String),
    Halt,
}

fn handle_exit(exit: VcpuExit<'_>, devices: &Devices) -> Outcome {
    match exit {
        VcpuExit::IoOut(port, data) => devices.pio_write(port, data),
        VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
        VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => {
            return Outcome::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into());
        }
        VcpuExit::Hlt => return Outcome::Halt,
        VcpuExit::SystemEvent(kind, _) => {
            return match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Outcome::Halt
                }
                other => Outcome::Crash(format!("system event {other}")),
            }
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Outcome::Crash(format!(
                "VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
            ));
        }
        VcpuExit::InternalError => return Outcome::Crash("KVM internal error".into()),
        other => return Outcome::Crash(format!("unexpected exit {other:?}")),
    }
    if devices.reset_requested() {
        Outcome::Halt
    } else {
        Outcome::Continue
    }
}
