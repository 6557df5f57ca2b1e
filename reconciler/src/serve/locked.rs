//! `berth serve` and the state lock: the service holds `<state>/apply.lock` around
//! each action it performs (start, retune, stop, migrate, host settings), not for its
//! whole life, and never to observe. So an `apply` or `stop` run by hand while the
//! service runs never interleaves with one of its actions on the same state
//! directory: it waits (`--wait`) or refuses, naming `berth serve` and its pid. An
//! action of the service while such a command holds the lock fails with that
//! command's name and is retried with backoff, planned afresh from a new observe.
//!
//! The service's own actions share one hold ([`SharedStateLock`]), so they still run
//! side by side. The same lock is held by the service's actions that do not go
//! through its driver: the switchover resolver's `migrateResolve`
//! ([`crate::fleet::switchover::Resolver`]) and the preparation of an incoming VMM
//! ([`crate::fleet::incoming::LocalIncoming`]).

use std::sync::Arc;

use berth_schema::Guest;

use crate::diff::{Field, HostSetting};
use crate::driver::local::SharedStateLock;
use crate::driver::{Capabilities, Driver, DriverError, DriverKind, FleetCapabilities, Scope};
use crate::model::{Desired, Observed};

/// A driver whose actions hold the state lock. See the module documentation.
pub struct Locked<D: ?Sized> {
    lock: Arc<SharedStateLock>,
    inner: Arc<D>,
}

impl<D: Driver + ?Sized> Locked<D> {
    /// `inner`, whose actions hold `lock` (the state lock in the name of `berth serve`,
    /// shared with the service's other actions).
    pub fn new(inner: Arc<D>, lock: Arc<SharedStateLock>) -> Self {
        Locked { lock, inner }
    }

    fn acting<T>(
        &self,
        what: impl FnOnce() -> String,
        act: impl FnOnce() -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let _hold = self
            .lock
            .hold()
            .map_err(|e| DriverError::failed(format!("{}: not now", what()), e))?;
        act()
    }
}

impl<D: Driver + ?Sized> Driver for Locked<D> {
    fn kind(&self) -> DriverKind {
        self.inner.kind()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn scope(&self) -> Scope {
        self.inner.scope()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn plan_capabilities(&self, desired: &Desired) -> FleetCapabilities {
        self.inner.plan_capabilities(desired)
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        self.inner.observe()
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.acting(
            || format!("configuring host {host}"),
            || self.inner.configure_host(host, settings),
        )
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.acting(
            || format!("starting {}", guest.metadata.name),
            || self.inner.start(guest, host),
        )
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.acting(
            || format!("retuning {}", guest.metadata.name),
            || self.inner.retune(guest, host, fields),
        )
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.acting(
            || format!("stopping {name}"),
            || self.inner.stop(name, host),
        )
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.acting(
            || format!("migrating {} to {to}", guest.metadata.name),
            || self.inner.migrate(guest, from, to),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Mutex;

    use super::*;
    use crate::driver::local::StateLock;

    /// A driver whose `start` waits until the test lets it go: an action caught in the
    /// middle, which the real drivers finish too fast to catch.
    struct Held {
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl Driver for Held {
        fn kind(&self) -> DriverKind {
            DriverKind::Local
        }
        fn scope(&self) -> Scope {
            Scope::Host("kvm01".into())
        }
        fn observe(&self) -> Result<Observed, DriverError> {
            Ok(Observed::default())
        }
        fn configure_host(&self, _: &str, _: &[HostSetting]) -> Result<(), DriverError> {
            Ok(())
        }
        fn start(&self, _: &Guest, _: &str) -> Result<(), DriverError> {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            Ok(())
        }
        fn retune(&self, _: &Guest, _: &str, _: &[Field]) -> Result<(), DriverError> {
            Ok(())
        }
        fn stop(&self, _: &str, _: &str) -> Result<(), DriverError> {
            Ok(())
        }
        fn migrate(&self, _: &Guest, _: &str, _: &str) -> Result<(), DriverError> {
            Ok(())
        }
    }

    fn guest() -> Guest {
        let desired = crate::model::desired_from_yaml([
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\n\
             spec: {host: kvm01, cpu: {vcpus: 1}, memory: {size: 64MiB}}\n",
        ]);
        desired.guests[0].clone()
    }

    #[test]
    fn an_apply_by_hand_refuses_while_serve_acts_and_serve_waits_for_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let driver = Arc::new(Locked::new(
            Arc::new(Held {
                entered: Mutex::new(entered_tx),
                release: Mutex::new(release_rx),
            }),
            Arc::new(SharedStateLock::new(dir.path(), "berth serve")),
        ));

        // Not held while serve only observes.
        driver.observe().unwrap();
        drop(StateLock::acquire(dir.path(), false, "berth apply").unwrap());

        // Held while an action runs: an apply by hand refuses, naming serve.
        let acting = {
            let driver = Arc::clone(&driver);
            std::thread::spawn(move || driver.start(&guest(), "kvm01"))
        };
        entered.recv().unwrap();
        let refused = StateLock::acquire(dir.path(), false, "berth apply").unwrap_err();
        assert!(
            refused.to_string().starts_with(&format!(
                "berth serve (pid {}) holds {}",
                std::process::id(),
                dir.path().join("apply.lock").display()
            )),
            "{refused}"
        );
        // Serve's other actions go on meanwhile.
        driver.stop("db-1", "kvm01").unwrap();
        release.send(()).unwrap();
        acting.join().unwrap().unwrap();

        // Released after the action; while an apply holds it, serve's action refuses
        // and names the apply.
        let apply =
            StateLock::retry_while_held(|| StateLock::acquire(dir.path(), false, "berth apply"))
                .unwrap();
        let refused = driver.stop("web-1", "kvm01").unwrap_err();
        let text = berth_hypervisor::report::one_line(&refused);
        assert!(
            text.starts_with("stopping web-1: not now")
                && text.contains(&format!("berth apply (pid {}) holds", std::process::id())),
            "{text}"
        );
        drop(apply);
        StateLock::retry_while_held(|| driver.stop("web-1", "kvm01")).unwrap();
    }
}
