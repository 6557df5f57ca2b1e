//! One guest's VMM: builds memory, VM, vCPUs and devices from a [`VmConfig`], starts the
//! vCPUs, and serves status, retune, pause, resume and shutdown.
//!
//! Building and starting are separate so that an incoming migration can build the same
//! machine, restore state into it, and only then start it ([`Vmm::create`] then
//! [`Vmm::start`]; [`Vmm::load_payload`] is what a fresh boot does in between).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_schema::{CpuSet, Pinning};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, mptable, regs};
use crate::config::{Backing, BootConfig, VmConfig};
use crate::control::protocol::{
    ConsoleStatus, ErrorCode, GuestRunState, MemoryStatus, Retune, Status, ThreadStatus, VcpuStatus,
};
use crate::devices::{console, ConsoleLog, ConsoleStats, Devices, IrqTrigger, SerialConsole};
use crate::host::cgroup::{CgroupError, Cgroups, GuestCgroup, NotEnforced};
use crate::hostlink;
use crate::payload::{self, heartbeat};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuRegisters, VcpuRunState};
use crate::vstate::vm::{Vm, VmError};

/// Events the VMM's main thread acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// A vCPU crashed or halted.
    Vcpu(VcpuEvent),
    /// End the VMM: stop the vCPUs (waiting at most `timeout`), clean up, exit.
    Shutdown {
        /// How long vCPUs get to stop.
        timeout: Duration,
        /// Why (logged).
        reason: String,
    },
    /// SIGTERM, SIGINT or SIGHUP (named): a shutdown, except while a migration's
    /// switchover is unknown (see [`Vmm::run_until_shutdown`]).
    Signal(&'static str),
}

/// Why the VMM could not be built or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// CPU model.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Boot registers and tables.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The heartbeat payload.
    #[error(transparent)]
    Heartbeat(#[from] heartbeat::HeartbeatError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Linux loading.
    #[error(transparent)]
    Linux(#[from] payload::linux::LinuxError),
    /// The console log.
    #[error("Cannot create the console log {}: {source}", .path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The guest's cgroup.
    #[error("Cannot set up the guest's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    /// The serial IRQ.
    #[error("Cannot wire the serial interrupt: {0}")]
    SerialIrq(String),
    /// A request argument is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request cannot be done live or in this state.
    #[error("{0}")]
    Refused(String),
    /// The host refused.
    #[error("{0}")]
    Host(String),
    /// Not available in this VMM.
    #[error("{0}")]
    Unsupported(String),
}

impl VmmError {
    /// The protocol error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            VmmError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            VmmError::Refused(_) => ErrorCode::Refused,
            VmmError::Unsupported(_) => ErrorCode::Unsupported,
            _ => ErrorCode::Host,
        }
    }
}

/// What the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The heartbeat payload, laid out so.
    Heartbeat(heartbeat::Layout),
    /// A Linux kernel.
    Linux,
    /// The triple-fault test payload.
    TripleFault,
    /// Not loaded yet (an incoming migration restores memory instead).
    None,
}

/// The guest's cgroup, or why there is none, and the settings it cannot enforce.
#[derive(Debug, Default)]
pub struct CgroupState {
    /// The cgroup the VMM process is in.
    pub cgroup: Option<GuestCgroup>,
    /// Why there is no cgroup.
    pub missing: Option<String>,
    /// Settings asked for that the host cannot enforce.
    pub not_enforced: Vec<NotEnforced>,
    /// The guest asked for limits, so running without a cgroup is an error.
    wants_limits: bool,
}

/// A cgroup failure a guest without limits survives (it runs without a cgroup).
fn tolerable(e: &CgroupError) -> bool {
    matches!(e, CgroupError::Write { .. } | CgroupError::CreateDir { .. })
}

impl CgroupState {
    /// Creates the cgroup `berth/<name>` (removing one a killed VMM left behind), moves
    /// this process into it and applies memtune, I/O weight and the cpuset (the union of
    /// the pinned CPUs, and the strict NUMA nodeset). Call before guest memory is
    /// allocated, so that memory is charged to the guest.
    ///
    /// Without cgroupfs (or permission) the guest runs without a cgroup when it asks for
    /// no limits; with limits that is an error.
    ///
    /// # Errors
    /// [`VmmError::Cgroup`].
    pub fn create(config: &VmConfig) -> Result<CgroupState, VmmError> {
        let mut state = CgroupState::prepare(config)?;
        if let Some(Err(e)) = state
            .cgroup
            .as_ref()
            .map(|c| c.add_process(hostlink::current_pid()))
        {
            state.refused(e)?;
        }
        Ok(state)
    }

    /// [`CgroupState::create`] without moving the process in: makes the cgroup and
    /// writes every limit, so that a limit the kernel refuses fails here; it can run on
    /// any thread, beside the VM's creation. [`join`] completes it.
    ///
    /// [`join`]: CgroupState::join
    ///
    /// # Errors
    /// [`VmmError::Cgroup`].
    pub fn prepare(config: &VmConfig) -> Result<CgroupState, VmmError> {
        let wants_limits = config.memtune.is_some() || config.io.is_some();
        let cgroups = match Cgroups::detect() {
            Ok(c) => c,
            Err(e) if !wants_limits => {
                return Ok(CgroupState {
                    missing: Some(e.to_string()),
                    ..Default::default()
                })
            }
            Err(e) => return Err(e.into()),
        };
        let attempt = || -> Result<CgroupState, CgroupError> {
            cgroups.remove_stale(&config.name)?;
            let cgroup = cgroups.create(&config.name)?;
            let mut state = CgroupState {
                cgroup: Some(cgroup),
                wants_limits,
                ..Default::default()
            };
            let applied = state
                .apply(config.memtune.as_ref(), config.io.map(|io| io.weight))
                .and_then(|()| state.apply_cpuset(config));
            match applied {
                Ok(()) => Ok(state),
                Err(e) => {
                    // Never leave a half-made cgroup behind.
                    if let Some(cgroup) = state.cgroup.take() {
                        let _ = cgroup.remove();
                    }
                    Err(e)
                }
            }
        };
        match attempt() {
            Ok(state) => Ok(state),
            Err(e) if !wants_limits && tolerable(&e) => Ok(CgroupState {
                missing: Some(e.to_string()),
                ..Default::default()
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves the calling thread into the cgroup made by [`CgroupState::prepare`]; the
    /// threads it creates afterwards start there. Call it from the thread that creates
    /// all of the VMM's other threads, before it creates them and before guest memory is
    /// touched (memory is charged where it is first touched and does not move later).
    ///
    /// Only the calling thread moves because moving a whole process (`cgroup.procs`)
    /// waits for an RCU grace period in the kernel: 8-10 ms on this host, where moving
    /// one thread (`tasks` on v1) takes 0.04 ms. On cgroup v2, outside threaded
    /// subtrees, the whole process moves.
    ///
    /// When the move is refused and the guest asked for no limits, the guest runs
    /// without a cgroup (the cgroup is removed and `missing` says why).
    ///
    /// # Errors
    /// [`VmmError::Cgroup`]; the cgroup is removed.
    pub fn join(&mut self) -> Result<(), VmmError> {
        match &self.cgroup {
            Some(cgroup) => match cgroup.add_current_thread() {
                Ok(()) => Ok(()),
                Err(e) => self.refused(e),
            },
            None => Ok(()),
        }
    }

    /// The cgroup refused the process: remove it, and run without one if the guest
    /// asked for no limits.
    fn refused(&mut self, e: CgroupError) -> Result<(), VmmError> {
        if let Some(cgroup) = self.cgroup.take() {
            let _ = cgroup.remove();
        }
        if !self.wants_limits && tolerable(&e) {
            self.missing = Some(e.to_string());
            Ok(())
        } else {
            Err(e.into())
        }
    }

    fn apply(
        &mut self,
        memtune: Option<&berth_schema::MemTune>,
        io: Option<u16>,
    ) -> Result<(), CgroupError> {
        let Some(cgroup) = &self.cgroup else {
            return Ok(());
        };
        if let Some(tune) = memtune {
            let skipped = cgroup.set_memtune(tune)?;
            self.not_enforced
                .retain(|n| !MEMTUNE_SETTINGS.contains(&n.setting.as_str()));
            self.not_enforced.extend(skipped);
        }
        if let Some(weight) = io {
            let skipped = cgroup.set_io_weight(weight)?;
            self.not_enforced
                .retain(|n| MEMTUNE_SETTINGS.contains(&n.setting.as_str()));
            self.not_enforced.extend(skipped);
        }
        Ok(())
    }

    fn apply_cpuset(&mut self, config: &VmConfig) -> Result<(), CgroupError> {
        let Some(cgroup) = &self.cgroup else {
            return Ok(());
        };
        let pins = &config.pinning;
        let mut cpus: CpuSet = pins.vcpus.values().flat_map(|s| s.iter()).collect();
        let unpinned = (0..config.max_vcpus).any(|i| !pins.vcpus.contains_key(&i));
        if unpinned || pins.emulator.is_none() {
            // Some thread may run anywhere: do not narrow the cpuset.
            match hostlink::online_cpus() {
                Ok(online) => cpus = cpus.union(&online),
                Err(_) => return Ok(()),
            }
        }
        if let Some(e) = &pins.emulator {
            cpus = cpus.union(e);
        }
        let mems = config
            .memory
            .numa
            .as_ref()
            .filter(|n| n.mode == berth_schema::NumaMode::Strict)
            .map(|n| &n.nodeset);
        self.not_enforced.extend(cgroup.set_cpuset(&cpus, mems)?);
        Ok(())
    }
}

const MEMTUNE_SETTINGS: [&str; 4] = ["hardLimit", "softLimit", "swapHardLimit", "minGuarantee"];

#[derive(Debug, Default)]
struct Lifecycle {
    paused: bool,
    halted: Option<String>,
    crashed: Option<String>,
    shutting_down: bool,
}

/// How long an exiting VMM waits for the replies to control requests it has taken.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Control requests taken and not yet answered (see [`Vmm::answering`]).
#[derive(Debug, Default)]
struct Unanswered {
    count: Mutex<usize>,
    answered: Condvar,
}

/// Held while a control request is handled and answered; see [`Vmm::answering`].
#[derive(Debug)]
pub struct Answering<'a>(&'a Unanswered);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        *lock(&self.0.count) -= 1;
        self.0.answered.notify_all();
    }
}

/// One guest's VMM.
#[derive(Debug)]
pub struct Vmm {
    config: Mutex<VmConfig>,
    vm: Vm,
    vcpus: Vec<Arc<VcpuHandle>>,
    devices: Arc<Devices>,
    console: Arc<ConsoleStats>,
    payload: Mutex<Payload>,
    events: Sender<VmmEvent>,
    online: AtomicU32,
    lifecycle: Mutex<Lifecycle>,
    /// Serializes retune, pause, resume and hot-add.
    steering: Mutex<()>,
    cgroup: Mutex<CgroupState>,
    started_at: Instant,
    migration: crate::migration::Migration,
    fence: crate::fence::Fence,
    /// What every status reads again: see [`StatusCache`].
    status_cache: Mutex<StatusCache>,
    /// Control requests the exit waits for.
    unanswered: Unanswered,
    /// This process's id (read once: `getpid` is a system call).
    pid: hostlink::Pid,
    _serial_irq: Arc<EventFd>,
}

/// What a status would otherwise open and read afresh on every request: the kernel
/// files it reads (this process's `/proc` status, the THP mode, the cgroup's files),
/// kept open and read again from offset 0, and the VMM's thread list. Every value is
/// still read from the kernel on every status; only the path walks, `open`/`close`
/// calls and the listing of `/proc/self/task` are saved:
/// - the thread list is read again when the thread count in `/proc/self/status` (read
///   for the memory figures anyway) differs from the list's length, or when a listed
///   thread is gone (its affinity cannot be read). Thread ids are allocated cyclically,
///   so a thread that ended and one that started in between do not go unnoticed: the
///   ended one's id fails.
/// - a thread's name is read on its first two statuses (a thread just spawned may not
///   have set its name yet) and kept while its id is listed.
#[derive(Debug, Default)]
struct StatusCache {
    files: crate::host::KeptFiles,
    /// This process's threads, by id: (tid, name, name seen in an earlier status too).
    threads: Vec<(hostlink::Pid, String, bool)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    /// Builds memory, the VM with its irqchip and PIT, every vCPU up to maxVcpus (not
    /// started) and the devices. Nothing runs yet.
    ///
    /// # Errors
    /// The failing step; hugepage shortage and bad NUMA nodes fail before the VM exists.
    pub fn create(
        config: VmConfig,
        console_path: &Path,
        events: Sender<VmmEvent>,
        started_at: Instant,
    ) -> Result<Vmm, VmmError> {
        check_pinning(&config.pinning)?;
        let mem = memory::create(&config.memory)?;
        let vm = Vm::new(mem)?;
        vm.check_vcpu_count(config.max_vcpus)?;

        let log =
            ConsoleLog::create(console_path, console::DEFAULT_MAX_BYTES).map_err(|source| {
                VmmError::Console {
                    path: console_path.to_owned(),
                    source,
                }
            })?;
        let console_stats = log.stats();
        let irq = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::SerialIrq(e.to_string()))?,
        );
        vm.fd()
            .register_irqfd(&irq, crate::devices::COM1_IRQ)
            .map_err(|e| VmmError::SerialIrq(e.to_string()))?;
        let devices = Arc::new(Devices::new(SerialConsole::new(
            IrqTrigger(Arc::clone(&irq)),
            log,
        )));

        let supported = vm.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(config.max_vcpus as usize);
        for index in 0..config.max_vcpus {
            let cpuid = cpuid::for_vcpu(
                &supported,
                config.cpu_mode,
                config.cpu_model.as_deref(),
                index,
                config.max_vcpus,
            )?;
            vcpus.push(Arc::new(VcpuHandle::create(&vm, index, &cpuid)?));
        }
        Ok(Vmm {
            config: Mutex::new(config),
            vm,
            vcpus,
            devices,
            console: console_stats,
            payload: Mutex::new(Payload::None),
            events,
            online: AtomicU32::new(0),
            lifecycle: Mutex::new(Lifecycle::default()),
            steering: Mutex::new(()),
            cgroup: Mutex::new(CgroupState::default()),
            started_at,
            migration: crate::migration::Migration::default(),
            fence: crate::fence::Fence::default(),
            status_cache: Mutex::new(StatusCache {
                files: crate::host::KeptFiles::new(),
                ..StatusCache::default()
            }),
            unanswered: Unanswered::default(),
            pid: hostlink::current_pid(),
            _serial_irq: irq,
        })
    }

    /// Writes the boot payload into guest memory and sets every vCPU's boot registers
    /// (a fresh boot; an incoming migration restores state instead).
    ///
    /// # Errors
    /// The failing step.
    pub fn load_payload(&self) -> Result<(), VmmError> {
        let config = lock(&self.config).clone();
        let mem = self.vm.memory();
        regs::write_boot_tables(mem)?;
        let payload = match &config.boot {
            BootConfig::Heartbeat(spec) => {
                let layout = heartbeat::load(mem, spec, config.max_vcpus)?;
                for vcpu in &self.vcpus {
                    heartbeat::boot_vcpu(&vcpu.fd(), &layout, vcpu.index())?;
                }
                Payload::Heartbeat(layout)
            }
            BootConfig::Linux { kernel, .. } if kernel.as_os_str() == payload::TRIPLE_FAULT => {
                let entry = heartbeat::load_triple_fault(mem)?;
                for vcpu in &self.vcpus {
                    regs::setup_long_mode(&vcpu.fd(), entry, 0x8000, None, |_| {})?;
                }
                Payload::TripleFault
            }
            BootConfig::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let entry = payload::linux::load(mem, kernel, initrd.as_deref(), cmdline)?;
                mptable::write(mem, config.max_vcpus)?;
                for vcpu in &self.vcpus {
                    if vcpu.index() == 0 {
                        regs::setup_long_mode(&vcpu.fd(), entry.rip, entry.rsp, None, |r| {
                            r.rsi = entry.rsi;
                        })?;
                    } else {
                        // The kernel starts its other CPUs itself.
                        vcpu.wait_for_startup_ipi()?;
                    }
                }
                Payload::Linux
            }
        };
        *lock(&self.payload) = payload;
        Ok(())
    }

    /// Pins this process's threads to the emulator set and starts the configured
    /// number of vCPUs (paused when the spec says `state: paused`).
    ///
    /// # Errors
    /// A vCPU thread cannot be started, or the emulator set cannot be applied.
    pub fn start(&self) -> Result<(), VmmError> {
        let (count, paused, emulator) = {
            let c = lock(&self.config);
            (c.vcpus, c.start_paused, c.pinning.emulator.clone())
        };
        if let Some(set) = &emulator {
            self.pin_emulator(set)?;
        }
        lock(&self.lifecycle).paused = paused;
        for index in 0..count {
            self.start_vcpu(index, paused)?;
        }
        Ok(())
    }

    fn vcpu_cpus(&self, index: u32) -> Result<CpuSet, VmmError> {
        match lock(&self.config).vcpu_pinning(index) {
            Some(set) => Ok(set.clone()),
            None => hostlink::online_cpus()
                .map_err(|e| VmmError::Host(format!("Cannot read the online CPUs: {e}"))),
        }
    }

    fn start_vcpu(&self, index: u32, paused: bool) -> Result<(), VmmError> {
        let vcpu = &self.vcpus[index as usize];
        let cpus = self.vcpu_cpus(index)?;
        vcpu.start(
            Arc::clone(&self.devices),
            self.events.clone(),
            Some(cpus),
            paused,
        )?;
        self.online.fetch_max(index + 1, Ordering::SeqCst);
        Ok(())
    }

    /// The VM (memory, slots, dirty log, VM state).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Every created vCPU (index = position).
    pub fn vcpus(&self) -> &[Arc<VcpuHandle>] {
        &self.vcpus
    }

    /// The devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The payload loaded.
    pub fn payload(&self) -> Payload {
        lock(&self.payload).clone()
    }

    /// Records the payload an incoming migration brought in guest memory.
    pub fn set_payload(&self, payload: Payload) {
        *lock(&self.payload) = payload;
    }

    /// Sets how many vCPUs [`Vmm::start`] starts and whether paused: an incoming
    /// migration starts what the source ran.
    pub fn set_start(&self, vcpus: u32, paused: bool) {
        let mut c = lock(&self.config);
        c.vcpus = vcpus.min(c.max_vcpus);
        c.start_paused = paused;
    }

    /// The live-migration slot (progress, cancel).
    pub fn migration(&self) -> &crate::migration::Migration {
        &self.migration
    }

    /// The configuration in force (pinning updated by retunes).
    pub fn config(&self) -> VmConfig {
        lock(&self.config).clone()
    }

    /// vCPUs started.
    pub fn online_vcpus(&self) -> u32 {
        self.online.load(Ordering::SeqCst)
    }

    /// The guest's run state.
    pub fn run_state(&self) -> (GuestRunState, Option<String>) {
        let l = lock(&self.lifecycle);
        if let Some(reason) = &l.crashed {
            (GuestRunState::Crashed, Some(reason.clone()))
        } else if let Some(reason) = &l.halted {
            (GuestRunState::Halted, Some(reason.clone()))
        } else if l.paused {
            (GuestRunState::Paused, None)
        } else {
            (GuestRunState::Running, None)
        }
    }

    fn started(&self) -> impl Iterator<Item = &Arc<VcpuHandle>> {
        self.vcpus.iter().take(self.online_vcpus() as usize)
    }

    /// Pauses every started vCPU and waits until none runs guest code.
    ///
    /// # Errors
    /// [`VmmError::Refused`] for a crashed or halted guest, [`VmmError::Host`] when a
    /// vCPU does not stop within 2 s.
    pub fn pause(&self) -> Result<(), VmmError> {
        let _steer = lock(&self.steering);
        self.refuse_if_stopped("pause")?;
        lock(&self.lifecycle).paused = true;
        self.pause_all(Instant::now() + Duration::from_secs(2))
    }

    fn pause_all(&self, deadline: Instant) -> Result<(), VmmError> {
        for vcpu in self.started() {
            vcpu.request_pause();
        }
        for vcpu in self.started() {
            if !vcpu.wait_quiescent(deadline) {
                return Err(VmmError::Host(format!(
                    "vCPU {} did not pause in time",
                    vcpu.index()
                )));
            }
        }
        Ok(())
    }

    /// Resumes the vCPUs.
    ///
    /// # Errors
    /// [`VmmError::Refused`] for a crashed or halted guest.
    pub fn resume(&self) -> Result<(), VmmError> {
        let _steer = lock(&self.steering);
        self.refuse_if_stopped("resume")?;
        lock(&self.lifecycle).paused = false;
        for vcpu in self.started() {
            vcpu.resume();
        }
        Ok(())
    }

    /// The registers of every started vCPU. Only while no vCPU runs guest code (paused,
    /// halted or crashed), so that the values hold still.
    ///
    /// # Errors
    /// [`VmmError::Refused`] while a vCPU runs; [`VmmError::Vcpu`] when KVM fails.
    pub fn vcpu_registers(&self) -> Result<Vec<VcpuRegisters>, VmmError> {
        let _steer = lock(&self.steering);
        if let Some(vcpu) = self.started().find(|v| !v.state().is_quiescent()) {
            return Err(VmmError::Refused(format!(
                "cannot read registers: vCPU {} is running (pause the guest first)",
                vcpu.index()
            )));
        }
        Ok(self
            .started()
            .map(|v| v.registers())
            .collect::<Result<_, _>>()?)
    }

    fn refuse_if_stopped(&self, what: &str) -> Result<(), VmmError> {
        match self.run_state() {
            (GuestRunState::Crashed | GuestRunState::Halted, reason) => {
                Err(VmmError::Refused(format!(
                    "cannot {what}: the guest has stopped ({})",
                    reason.unwrap_or_default()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Applies live changes: pinning, vCPU hot-add, memtune and I/O weight. Everything
    /// is checked before anything changes.
    ///
    /// # Errors
    /// [`VmmError::InvalidArgument`] (offline CPU, vCPU beyond maxVcpus),
    /// [`VmmError::Refused`] (vCPU decrease), [`VmmError::Unsupported`] (memtune or I/O
    /// weight without a cgroup), [`VmmError::Host`].
    pub fn retune(&self, retune: &Retune) -> Result<(), VmmError> {
        let _steer = lock(&self.steering);
        let (max, online) = (lock(&self.config).max_vcpus, self.online_vcpus());
        if let Some(pinning) = &retune.pinning {
            check_pinning(pinning)?;
            if let Some(index) = pinning.vcpus.keys().find(|&&i| i >= max) {
                return Err(VmmError::InvalidArgument(format!(
                    "vCPU {index} is pinned but the guest has at most {max} vCPUs"
                )));
            }
        }
        if let Some(wanted) = retune.vcpus {
            if wanted < online {
                return Err(VmmError::Refused(format!(
                    "cannot remove vCPUs live: the guest has {online}, asked for {wanted} (no vCPU hot-remove; restart to lower vcpus)"
                )));
            }
            if wanted > max {
                return Err(VmmError::InvalidArgument(format!(
                    "cannot hot-add to {wanted} vCPUs: maxVcpus is {max}"
                )));
            }
            if wanted > online {
                self.refuse_if_stopped("hot-add vCPUs")?;
            }
        }
        if retune.memtune.is_some() || retune.io.is_some() {
            let mut cg = lock(&self.cgroup);
            if cg.cgroup.is_none() {
                return Err(VmmError::Unsupported(format!(
                    "memtune and io weight need the guest's cgroup, and there is none: {}",
                    cg.missing.clone().unwrap_or_default()
                )));
            }
            cg.apply(retune.memtune.as_ref(), retune.io.map(|io| io.weight))
                .map_err(|e| match e {
                    CgroupError::Write { .. } => VmmError::Host(e.to_string()),
                    other => VmmError::InvalidArgument(other.to_string()),
                })?;
            let mut c = lock(&self.config);
            if let Some(tune) = &retune.memtune {
                c.memtune = Some(tune.clone());
            }
            if let Some(io) = retune.io {
                c.io = Some(io);
            }
        }
        if let Some(pinning) = &retune.pinning {
            let config = {
                let mut c = lock(&self.config);
                for (index, set) in &pinning.vcpus {
                    c.pinning.vcpus.insert(*index, set.clone());
                }
                if let Some(set) = &pinning.emulator {
                    c.pinning.emulator = Some(set.clone());
                }
                c.clone()
            };
            // Widen (or narrow) the cpuset first: affinity is intersected with it.
            lock(&self.cgroup)
                .apply_cpuset(&config)
                .map_err(|e| VmmError::Host(e.to_string()))?;
            for (index, set) in &pinning.vcpus {
                if let Some(tid) = self.vcpus[*index as usize].tid() {
                    hostlink::set_thread_affinity(tid, set).map_err(|e| {
                        VmmError::Host(format!("Cannot pin vCPU {index} to CPUs {set}: {e}"))
                    })?;
                }
            }
            if let Some(set) = &pinning.emulator {
                self.pin_emulator(set)?;
            }
        }
        if !retune.unpin_vcpus.is_empty() || retune.unpin_emulator {
            self.unpin(&retune.unpin_vcpus, retune.unpin_emulator, max)?;
        }
        if let Some(wanted) = retune.vcpus {
            let paused = lock(&self.lifecycle).paused;
            for index in online..wanted {
                self.start_vcpu(index, paused)?;
            }
            lock(&self.config).vcpus = wanted.max(online);
        }
        Ok(())
    }

    /// Lets the listed vCPUs (and the emulator threads) run on every online CPU again
    /// and forgets their pins.
    fn unpin(&self, vcpus: &[u32], emulator: bool, max: u32) -> Result<(), VmmError> {
        if let Some(index) = vcpus.iter().find(|&&i| i >= max) {
            return Err(VmmError::InvalidArgument(format!(
                "cannot unpin vCPU {index}: the guest has at most {max} vCPUs"
            )));
        }
        let online = hostlink::online_cpus()
            .map_err(|e| VmmError::Host(format!("Cannot read the online CPUs: {e}")))?;
        let config = {
            let mut c = lock(&self.config);
            for index in vcpus {
                c.pinning.vcpus.remove(index);
            }
            if emulator {
                c.pinning.emulator = None;
            }
            c.clone()
        };
        lock(&self.cgroup)
            .apply_cpuset(&config)
            .map_err(|e| VmmError::Host(e.to_string()))?;
        for index in vcpus {
            if let Some(tid) = self.vcpus[*index as usize].tid() {
                hostlink::set_thread_affinity(tid, &online)
                    .map_err(|e| VmmError::Host(format!("Cannot unpin vCPU {index}: {e}")))?;
            }
        }
        if emulator {
            self.pin_emulator(&online)?;
        }
        Ok(())
    }

    /// Pins every thread that is not a vCPU to `set`.
    fn pin_emulator(&self, set: &CpuSet) -> Result<(), VmmError> {
        let vcpu_tids: Vec<_> = self.vcpus.iter().filter_map(|v| v.tid()).collect();
        let threads = hostlink::threads()
            .map_err(|e| VmmError::Host(format!("Cannot list the VMM's threads: {e}")))?;
        for (tid, _) in threads
            .into_iter()
            .filter(|(t, name)| !vcpu_tids.contains(t) && !is_kvm_worker(name))
        {
            match hostlink::set_thread_affinity(tid, set) {
                Err(e) if e.is_gone() => {} // exited meanwhile
                Err(e) => {
                    return Err(VmmError::Host(format!(
                        "Cannot pin emulator thread {tid} to CPUs {set}: {e}"
                    )))
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Checks the heartbeat payload's data pages (see [`heartbeat::verify_memory`]).
    ///
    /// # Errors
    /// [`VmmError::Unsupported`] for a guest not running the heartbeat.
    pub fn verify_memory(&self) -> Result<heartbeat::VerifyReport, VmmError> {
        let Payload::Heartbeat(layout) = self.payload() else {
            return Err(VmmError::Unsupported(
                "only the heartbeat payload has verifiable memory".into(),
            ));
        };
        // The guest must not write while its pages are compared with its cursors.
        let _steer = lock(&self.steering);
        let was_running = !lock(&self.lifecycle).paused;
        self.pause_all(Instant::now() + Duration::from_secs(2))?;
        let report = heartbeat::verify_memory(self.vm.memory(), &layout);
        if was_running && self.run_state().0 == GuestRunState::Running {
            for vcpu in self.started() {
                vcpu.resume();
            }
        }
        Ok(report?)
    }

    /// The self-fence deadline ([`crate::fence`]).
    pub fn fence(&self) -> &crate::fence::Fence {
        &self.fence
    }

    /// Asks the main thread to shut down.
    pub fn request_shutdown(&self, timeout_ms: Option<u64>, reason: &str) {
        lock(&self.lifecycle).shutting_down = true;
        let _ = self.events.send(VmmEvent::Shutdown {
            timeout: Duration::from_millis(timeout_ms.unwrap_or(5000)),
            reason: reason.to_owned(),
        });
    }

    /// Counts a control request as taken until the guard drops, which the control
    /// server does once the reply is written. The VMM does not exit before (for at most
    /// [`REPLY_GRACE`]), so a request that ends it (`shutdown`; `migrateResolve` when the
    /// destination runs the guest) is still answered instead of finding the connection
    /// closed.
    pub fn answering(&self) -> Answering<'_> {
        *lock(&self.unanswered.count) += 1;
        Answering(&self.unanswered)
    }

    /// Waits until every control request taken so far is answered, at most `within`;
    /// false when some still are not.
    fn wait_answered(&self, within: Duration) -> bool {
        let count = lock(&self.unanswered.count);
        let (count, _) = self
            .unanswered
            .answered
            .wait_timeout_while(count, within, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }

    /// Takes back a shutdown that was asked for but not acted on (see
    /// [`crate::migration::incoming`]: one that came as the guest arrived).
    pub fn withdraw_shutdown(&self) {
        lock(&self.lifecycle).shutting_down = false;
    }

    /// Whether a shutdown was asked for.
    pub fn shutting_down(&self) -> bool {
        lock(&self.lifecycle).shutting_down
    }

    /// Serves the VMM's events until a shutdown is asked for (or the channel closes),
    /// then stops the vCPUs, waiting at most the shutdown's timeout, and waits for the
    /// replies of the control requests taken (see [`Vmm::answering`]). The caller then
    /// releases the guest's files and cgroup.
    ///
    /// A termination signal is refused while the migration is in `switchoverUnknown`,
    /// or has sent `Commit` and has no `Running` yet: this VMM holds the only copy of the
    /// guest that is sure not to have run elsewhere, and exiting would lose it if the
    /// destination did not run it. `Running` or `migrateResolve` ends that state;
    /// `shutdown` with `force: true` (or SIGKILL) overrides it.
    pub fn run_until_shutdown(&self, inbox: &std::sync::mpsc::Receiver<VmmEvent>) {
        let (timeout, reason) = loop {
            match inbox.recv() {
                Ok(VmmEvent::Vcpu(event)) => self.on_vcpu_event(&event),
                Ok(VmmEvent::Shutdown { timeout, reason }) => break (timeout, reason),
                Ok(VmmEvent::Signal(name)) => match self.migration().holds_the_only_sure_copy() {
                    Some(why) => {
                        eprintln!(
                            "berth-vmm: {name} refused: {why} (or shut down with force: true)"
                        );
                    }
                    None => {
                        lock(&self.lifecycle).shutting_down = true;
                        break (Duration::from_secs(5), format!("{name} received"));
                    }
                },
                Err(_) => break (Duration::from_secs(5), "event channel closed".into()),
            }
        };
        eprintln!("berth-vmm: shutting down: {reason}");
        if !self.stop_vcpus(timeout) {
            eprintln!("berth-vmm: vCPUs did not stop within {timeout:?}; exiting anyway");
        }
        if !self.wait_answered(REPLY_GRACE) {
            eprintln!(
                "berth-vmm: a control request still had no reply after {REPLY_GRACE:?}; exiting anyway"
            );
        }
    }

    /// Acts on a vCPU event: a crash or a halt stops the other vCPUs.
    pub fn on_vcpu_event(&self, event: &VcpuEvent) {
        {
            let mut l = lock(&self.lifecycle);
            match event {
                VcpuEvent::Crashed { index, reason } => {
                    eprintln!("berth-vmm: vCPU {index} crashed: {reason}");
                    l.crashed
                        .get_or_insert_with(|| format!("vCPU {index}: {reason}"));
                }
                VcpuEvent::Halted { index } => {
                    eprintln!("berth-vmm: vCPU {index} halted the guest");
                    l.halted.get_or_insert_with(|| {
                        if self.devices.reset_requested() {
                            format!("vCPU {index} requested a reset (i8042)")
                        } else {
                            format!("vCPU {index} halted")
                        }
                    });
                }
            }
        }
        for vcpu in self.started() {
            vcpu.request_pause();
        }
    }

    /// Stops every vCPU thread; true when all ended within `timeout`.
    pub fn stop_vcpus(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for vcpu in &self.vcpus {
            vcpu.request_stop();
        }
        self.vcpus.iter().all(|v| v.join(deadline))
    }

    /// The status, read back from `/proc`, guest memory and the devices.
    pub fn status(&self) -> Status {
        self.status_of(false)
    }

    /// The status; `brief`: without what an observe does not compare (see
    /// [`crate::control::StatusArgs::brief`]).
    pub fn status_of(&self, brief: bool) -> Status {
        let config = self.config();
        let (state, reason) = self.run_state();
        let pid = self.pid;
        let layout = match self.payload() {
            Payload::Heartbeat(layout) => Some(layout),
            _ => None,
        };
        let online = self.online_vcpus();
        let vcpu = self
            .vcpus
            .iter()
            .map(|v| {
                let tid = v.tid();
                let record = layout
                    .as_ref()
                    .filter(|_| v.index() < online)
                    .and_then(|l| l.record(self.vm.memory(), v.index()).ok());
                VcpuStatus {
                    index: v.index(),
                    tid,
                    affinity: tid.and_then(|t| hostlink::read_thread_affinity(pid, t).ok()),
                    run_state: v.state(),
                    ticks: record.map(|r| r.ticks),
                    lines: record.map(|r| r.lines),
                }
            })
            .collect::<Vec<_>>();
        let vcpu_tids: Vec<_> = vcpu.iter().filter_map(|v| v.tid).collect();
        let mut cache = lock(&self.status_cache);
        let proc_status = cache
            .files
            .read(std::path::Path::new("/proc/self/status"))
            .unwrap_or_default();
        let mem = hostlink::parse_process_memory(&proc_status).unwrap_or_default();
        let emulator_threads =
            cache.emulator_threads(pid, &vcpu_tids, hostlink::parse_thread_count(&proc_status));
        let thp = if brief {
            None
        } else {
            hostlink::thp_mode_in(&mut cache.files)
        };
        let cgroup = self.cgroup_json(&mut cache.files, brief, config.io.is_some());
        drop(cache);
        let backing = match config.memory.backing {
            Backing::Anonymous => "anonymous".to_owned(),
            Backing::Hugetlb(size) => format!("hugetlb-{size}"),
        };
        let page = config.memory.backing.page_size();
        Status {
            name: config.name.clone(),
            pid,
            state,
            reason,
            boot: match &config.boot {
                BootConfig::Heartbeat(_) => berth_schema::Boot::HEARTBEAT.to_owned(),
                BootConfig::Linux { kernel, .. } => kernel.display().to_string(),
            },
            vcpus: online,
            max_vcpus: config.max_vcpus,
            vcpu,
            emulator_threads,
            pinning: config.pinning.clone(),
            memtune: config.memtune.clone(),
            io: config.io,
            memory: MemoryStatus {
                size: config.memory.size,
                backing,
                hugepages: if page > 4096 {
                    mem.hugetlb.get() / page
                } else {
                    0
                },
                rss: mem.rss.get(),
                locked: mem.locked.get(),
                share_pages: config.memory.share_pages,
                thp,
            },
            cgroup: Some(cgroup),
            console: ConsoleStatus {
                path: self.devices.serial().log().path().display().to_string(),
                lines: self.console.lines.load(Ordering::Relaxed),
                bytes: self.console.bytes.load(Ordering::Relaxed),
                rotations: self.console.rotations.load(Ordering::Relaxed),
            },
            ignored_accesses: self.devices.ignored(),
            uptime_ms: self.started_at.elapsed().as_millis() as u64,
            migration: Some(self.migration.status().phase),
            fence_in_ms: self.fence.remaining().map(|d| d.as_millis() as u64),
        }
    }

    /// Hands the guest's cgroup to the VMM (retune, status, removal at exit).
    pub fn set_cgroup(&self, state: CgroupState) {
        *lock(&self.cgroup) = state;
    }

    /// Removes the guest's cgroup (at exit).
    ///
    /// # Errors
    /// [`VmmError::Cgroup`].
    pub fn remove_cgroup(&self) -> Result<(), VmmError> {
        lock(&self.status_cache).files.close_all();
        if let Some(cgroup) = lock(&self.cgroup).cgroup.take() {
            cgroup.remove()?;
        }
        Ok(())
    }

    /// The cgroup's paths and values; `brief`: only the limits, with the I/O weight only
    /// when `io_asked` (an observe compares no other: a cgroup's default weight is no
    /// change to undo).
    fn cgroup_json(
        &self,
        files: &mut crate::host::KeptFiles,
        brief: bool,
        io_asked: bool,
    ) -> serde_json::Value {
        let cg = lock(&self.cgroup);
        match &cg.cgroup {
            Some(cgroup) => {
                let paths: Vec<String> = cgroup
                    .paths()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                let values = if brief {
                    cgroup
                        .read_limits_with(files, io_asked)
                        .map(serde_json::to_value)
                } else {
                    cgroup.read_with(files).map(serde_json::to_value)
                };
                let values = match values {
                    Ok(values) => values.unwrap_or_default(),
                    Err(e) => serde_json::json!({"error": e.to_string()}),
                };
                serde_json::json!({
                    "paths": paths,
                    "values": values,
                    "notEnforced": cg.not_enforced,
                })
            }
            None => serde_json::json!({"missing": cg.missing}),
        }
    }

    /// [`Vmm::status`] as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(self.status()).unwrap_or_default()
    }

    /// Whether the vCPU is running guest code (for tests and migration).
    pub fn vcpu_state(&self, index: u32) -> Option<VcpuRunState> {
        self.vcpus.get(index as usize).map(|v| v.state())
    }
}

impl StatusCache {
    /// The VMM's threads but `vcpu_tids` and KVM's workers, with their names and
    /// affinities, by tid. `count` is the thread count the kernel reports now.
    fn emulator_threads(
        &mut self,
        pid: hostlink::Pid,
        vcpu_tids: &[hostlink::Pid],
        count: Option<usize>,
    ) -> Vec<ThreadStatus> {
        let mut listed = false;
        if count != Some(self.threads.len()) {
            self.list_threads();
            listed = true;
        }
        loop {
            let mut threads = Vec::with_capacity(self.threads.len());
            let mut gone = false;
            for (tid, name, confirmed) in &mut self.threads {
                if vcpu_tids.contains(tid) {
                    continue;
                }
                if !*confirmed && !listed {
                    if let Some(now) = hostlink::thread_name(*tid) {
                        *name = now;
                    }
                    *confirmed = true;
                }
                if is_kvm_worker(name) {
                    continue;
                }
                let affinity = hostlink::read_thread_affinity(pid, *tid).ok();
                gone |= affinity.is_none();
                threads.push(ThreadStatus {
                    tid: *tid,
                    name: name.clone(),
                    affinity,
                });
            }
            if !gone || listed {
                return threads;
            }
            self.list_threads();
            listed = true;
        }
    }

    /// Reads the thread list again, keeping the names of the threads still listed.
    fn list_threads(&mut self) {
        let tids = hostlink::thread_ids().unwrap_or_default();
        let mut threads = Vec::with_capacity(tids.len());
        for tid in tids {
            match self.threads.iter().find(|(t, _, _)| *t == tid) {
                Some((_, name, true)) => threads.push((tid, name.clone(), true)),
                Some((_, name, false)) => {
                    let name = hostlink::thread_name(tid).unwrap_or_else(|| name.clone());
                    threads.push((tid, name, true));
                }
                None => {
                    if let Some(name) = hostlink::thread_name(tid) {
                        threads.push((tid, name, false));
                    }
                }
            }
        }
        self.threads = threads;
    }
}

/// KVM's own worker threads in the VMM's thread group (`kvm-nx-lpage-recovery`, ...):
/// kernel work on behalf of the VM, not emulator threads.
fn is_kvm_worker(name: &str) -> bool {
    name.starts_with("kvm-")
}

/// Checks that every CPU in `pinning` is online on this host.
fn check_pinning(pinning: &Pinning) -> Result<(), VmmError> {
    let online = hostlink::online_cpus()
        .map_err(|e| VmmError::Host(format!("Cannot read the online CPUs: {e}")))?;
    let sets = pinning
        .vcpus
        .iter()
        .map(|(i, s)| (format!("vCPU {i}"), s))
        .chain(
            pinning
                .emulator
                .iter()
                .map(|s| ("the emulator".to_owned(), s)),
        );
    for (who, set) in sets {
        let missing = set.difference(&online);
        if !missing.is_empty() {
            return Err(VmmError::InvalidArgument(format!(
                "{who} is pinned to CPUs {set}, but CPU {missing} is not online on this host (online: {online})"
            )));
        }
    }
    Ok(())
}
