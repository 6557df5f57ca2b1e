//! Auto-converge's throttle: a thread that takes a share of every vCPU's time while a
//! migration runs, as QEMU's CPU throttle does. The vCPUs run for [`TIMESLICE`], then
//! all pause for `TIMESLICE * p / (100 - p)` (so at 20% they run 80% of the time, at
//! 99% one slice in a hundred). A vCPU inside the guest's `hlt` is kicked out of
//! KVM_RUN like for any pause, so the throttle also holds back a guest that dirties
//! memory from timer interrupts.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::protocol::GuestRunState;
use crate::vmm::Vmm;

/// How long the vCPUs run between two throttle pauses.
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// A running throttle; stopping it (or dropping it) lets the vCPUs run freely again.
#[derive(Debug)]
pub struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts the throttle thread for `vmm` at 0%.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(vmm: Arc<Vmm>) -> std::io::Result<Throttle> {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&percent), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || run(&vmm, &p, &s))?;
        Ok(Throttle {
            percent,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the share of vCPU time taken, percent (0 to 99).
    pub fn set(&self, percent: u8) {
        self.percent.store(percent.min(99), Ordering::SeqCst);
        // At 0% the thread sleeps until this wakes it.
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// The share in force.
    pub fn get(&self) -> u8 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Stops the thread; the vCPUs it paused run again (unless the guest was paused by
    /// request meanwhile). Returns once no throttle pause is in progress.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(vmm: &Vmm, percent: &AtomicU8, stop: &AtomicBool) {
    // Parked, not asleep: `halt` unparks this thread, so a switchover waits for no
    // nap to end (a 5 ms sleep here was up to 5 ms of every migration's time).
    let nap = |d: Duration| {
        let end = Instant::now() + d;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::park_timeout(end - now);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if percent.load(Ordering::SeqCst) == 0 {
            // Nothing to take: sleep until `set` or `halt` unparks this thread (a
            // wake-up every slice at 0% was CPU taken from every migration). An unpark
            // between the load and the park is kept, so none is lost.
            std::thread::park();
            continue;
        }
        nap(TIMESLICE);
        let p = u32::from(percent.load(Ordering::SeqCst));
        if p == 0 || stop.load(Ordering::SeqCst) {
            continue;
        }
        let online = vmm.online_vcpus() as usize;
        let vcpus = &vmm.vcpus()[..online.min(vmm.vcpus().len())];
        for v in vcpus {
            v.request_pause();
        }
        nap(TIMESLICE * p / (100 - p));
        // A pause asked for meanwhile (control op, switchover) wins.
        if vmm.run_state().0 == GuestRunState::Running {
            for v in vcpus {
                v.resume();
            }
        }
    }
}
