//! Host capacity as the planner tracks it while it orders actions: memory for guests on
//! normal pages, and the hugepage pools.
//!
//! A host's memory (`Host.spec.memory`) holds its hugepage pools and the guests on
//! normal pages; a guest backed by hugepages takes pages from the pool of its size.

use std::collections::BTreeMap;

use berth_schema::{Bytes, CpuSet, Host, PageSize};

use crate::model::{pages_for, pinned_cpus, CpuInfo, ObservedGuest, ObservedHost};

/// Index of each resource in a [`Footprint`].
const NORMAL: usize = 0;

fn page_index(size: PageSize) -> usize {
    match size {
        PageSize::Huge2M => 1,
        PageSize::Huge1G => 2,
    }
}

const PAGE_SIZES: [PageSize; 2] = [PageSize::Huge2M, PageSize::Huge1G];

/// What one VMM holds on its host: bytes of normal memory, 2 MiB pages, 1 GiB pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint([u64; 3]);

impl Footprint {
    /// The footprint of a guest's VMM; nothing when no VMM exists.
    pub fn of(guest: &ObservedGuest) -> Self {
        let mut r = [0; 3];
        if guest.has_vmm() {
            match guest.memory.hugepages {
                Some(size) => r[page_index(size)] = pages_for(guest.memory.size, size),
                None => r[NORMAL] = guest.memory.size.get(),
            }
        }
        Footprint(r)
    }

    /// What `self` needs beyond `other`, per resource.
    pub fn beyond(self, other: Footprint) -> Footprint {
        Footprint(std::array::from_fn(|i| {
            self.0[i].saturating_sub(other.0[i])
        }))
    }

    /// Both footprints together.
    pub fn sum(a: Footprint, b: Footprint) -> Footprint {
        Footprint(std::array::from_fn(|i| a.0[i] + b.0[i]))
    }

    fn add(&mut self, other: Footprint) {
        for i in 0..3 {
            self.0[i] += other.0[i];
        }
    }

    fn sub(&mut self, other: Footprint) {
        for i in 0..3 {
            self.0[i] = self.0[i].saturating_sub(other.0[i]);
        }
    }
}

/// One host while the plan is ordered: its limits and what guests hold.
#[derive(Debug)]
pub struct HostState<'a> {
    /// Host name.
    pub name: &'a str,
    /// The Host manifest, when one names the host.
    pub desired: Option<&'a Host>,
    /// The host as observed, when the driver reached it.
    pub observed: Option<&'a ObservedHost>,
    memory: u64,
    pool: [u64; 2],
    used: Footprint,
}

impl<'a> HostState<'a> {
    /// A host known from its manifest, from observation, or only from the guests on it.
    pub fn new(
        name: &'a str,
        desired: Option<&'a Host>,
        observed: Option<&'a ObservedHost>,
    ) -> Self {
        let memory = match (desired, observed) {
            (Some(h), _) => h.spec.memory.get(),
            (None, Some(o)) => o.memory_total.get(),
            // A host only guests mention: nothing is known, nothing is held against it.
            (None, None) => u64::MAX / 4,
        };
        let pool = PAGE_SIZES.map(|size| match (observed, desired) {
            (Some(o), _) => o.hugepages.get(&size).map_or(0, |p| p.total),
            (None, Some(d)) => d.spec.hugepages.get(&size).copied().unwrap_or(0),
            (None, None) => 0,
        });
        HostState {
            name,
            desired,
            observed,
            memory,
            pool,
            used: Footprint::default(),
        }
    }

    /// The host CPU as observed.
    pub fn cpu(&self) -> CpuInfo {
        self.observed.map(|o| o.cpu.clone()).unwrap_or_default()
    }

    fn pool_bytes(pool: &[u64; 2]) -> u64 {
        PAGE_SIZES
            .iter()
            .zip(pool)
            .map(|(s, n)| s.bytes().saturating_mul(*n))
            .fold(0u64, u64::saturating_add)
    }

    fn capacity(&self) -> Footprint {
        Footprint([
            self.memory.saturating_sub(Self::pool_bytes(&self.pool)),
            self.pool[0],
            self.pool[1],
        ])
    }

    /// Memory free for guests on normal pages.
    pub fn free_normal(&self) -> u64 {
        self.capacity().0[NORMAL].saturating_sub(self.used.0[NORMAL])
    }

    /// Count a VMM that exists before the plan starts.
    pub fn hold(&mut self, f: Footprint) {
        self.used.add(f);
    }

    /// Release a VMM's footprint.
    pub fn release(&mut self, f: Footprint) {
        self.used.sub(f);
    }

    /// Whether `extra` fits on top of what is held and what `reserved` (earlier actions
    /// of the same wave) holds; else why not, with the numbers.
    pub fn fits(&self, reserved: Footprint, extra: Footprint) -> Result<(), String> {
        let Some(i) = self.short_of(reserved, extra) else {
            return Ok(());
        };
        let cap = self.capacity();
        let have = cap.0[i].saturating_sub(self.used.0[i] + reserved.0[i]);
        Err(match i {
            NORMAL => format!(
                "{} has {} free for guests on normal pages ({} minus {} of hugepage pools, \
                 {} held), {} needed",
                self.name,
                Bytes(have),
                Bytes(self.memory),
                Bytes(Self::pool_bytes(&self.pool)),
                Bytes(self.used.0[NORMAL] + reserved.0[NORMAL]),
                Bytes(extra.0[i])
            ),
            _ => format!(
                "{}'s {} hugepage pool has {} of {} pages free, {} needed",
                self.name,
                PAGE_SIZES[i - 1],
                have,
                cap.0[i],
                extra.0[i]
            ),
        })
    }

    /// Whether `extra` fits, as [`HostState::fits`] says, without building the message
    /// (the scheduler asks this of every candidate host).
    pub fn has_room(&self, reserved: Footprint, extra: Footprint) -> bool {
        self.short_of(reserved, extra).is_none()
    }

    /// The first resource `extra` does not fit in (see [`Footprint`]'s order).
    fn short_of(&self, reserved: Footprint, extra: Footprint) -> Option<usize> {
        let cap = self.capacity();
        (0..3).find(|&i| extra.0[i] > cap.0[i].saturating_sub(self.used.0[i] + reserved.0[i]))
    }

    /// The pool of one size now, in pages.
    pub fn pool(&self, size: PageSize) -> u64 {
        self.pool[page_index(size) - 1]
    }

    /// Pages of one size that guests hold.
    pub fn pages_held(&self, size: PageSize) -> u64 {
        self.used.0[page_index(size)]
    }

    /// Whether the pool of `size` can become `pages`: growing takes free memory,
    /// shrinking must leave what guests hold.
    pub fn pool_resize_fits(&self, size: PageSize, pages: u64) -> Result<(), String> {
        let now = self.pool(size);
        if pages >= now {
            let need = (pages - now).saturating_mul(size.bytes());
            let free = self.capacity().0[NORMAL].saturating_sub(self.used.0[NORMAL]);
            if need > free {
                return Err(format!(
                    "growing {}'s {size} pool from {now} to {pages} pages needs {} free, {} is",
                    self.name,
                    Bytes(need),
                    Bytes(free)
                ));
            }
        } else if self.pages_held(size) > pages {
            return Err(format!(
                "{}'s {size} pool cannot shrink from {now} to {pages} pages: running guests hold {} pages",
                self.name,
                self.pages_held(size)
            ));
        }
        Ok(())
    }

    /// Set the pool of one size.
    pub fn resize_pool(&mut self, size: PageSize, pages: u64) {
        self.pool[page_index(size) - 1] = pages;
    }

    /// Checks that do not depend on what else runs: the host exists and is observed,
    /// takes new guests (when `arriving`), has the pinned CPUs, a pool of the right page
    /// size and enough memory in all.
    pub fn usable_for(&self, guest: &ObservedGuest, arriving: bool) -> Result<(), String> {
        let name = self.name;
        let Some(why) = self.unusable(guest, arriving) else {
            return Ok(());
        };
        let size = guest.memory.size;
        Err(match why {
            Unusable::Undeclared => format!("host {name} is not declared by any Host manifest"),
            Unusable::Unobserved => format!("host {name} is not observed (no driver reached it)"),
            Unusable::Unschedulable => format!("host {name} is not schedulable"),
            Unusable::NoCpu(usable) => format!(
                "host {name} has no CPU {} for the pinning (guest CPUs there: {usable})",
                pinned_cpus(guest.cpu.pinning.as_ref()).difference(&usable)
            ),
            Unusable::NoPool(page) => format!("host {name} keeps no {page} hugepage pool"),
            Unusable::PoolTooSmall { page, need, pool } => {
                format!("{size} needs {need} {page} hugepages, host {name}'s pool is {pool}")
            }
            Unusable::TooBig(room) => format!(
                "{size} does not fit in host {name}'s {} for guests on normal pages",
                Bytes(room)
            ),
        })
    }

    /// Whether [`HostState::usable_for`] says yes, without building its message.
    pub fn is_usable_for(&self, guest: &ObservedGuest, arriving: bool) -> bool {
        self.unusable(guest, arriving).is_none()
    }

    fn unusable(&self, guest: &ObservedGuest, arriving: bool) -> Option<Unusable> {
        let Some(desired) = self.desired else {
            return Some(Unusable::Undeclared);
        };
        if self.observed.is_none() {
            return Some(Unusable::Unobserved);
        }
        if arriving && !desired.spec.schedulable {
            return Some(Unusable::Unschedulable);
        }
        if let Some(pinning) = guest.cpu.pinning.as_ref() {
            let usable: CpuSet = desired.spec.cpus.difference(&desired.spec.reserved_cpus);
            if !pinned_cpus(Some(pinning)).is_subset(&usable) {
                return Some(Unusable::NoCpu(usable));
            }
        }
        let size = guest.memory.size;
        match guest.memory.hugepages {
            Some(page) => {
                let pool = desired.spec.hugepages.get(&page).copied().unwrap_or(0);
                let need = pages_for(size, page);
                if pool == 0 {
                    return Some(Unusable::NoPool(page));
                }
                if need > pool {
                    return Some(Unusable::PoolTooSmall { page, need, pool });
                }
            }
            None => {
                let pools: u64 = desired
                    .spec
                    .hugepages
                    .iter()
                    .map(|(s, n)| s.bytes().saturating_mul(*n))
                    .sum();
                let room = desired.spec.memory.get().saturating_sub(pools);
                if size.get() > room {
                    return Some(Unusable::TooBig(room));
                }
            }
        }
        None
    }
}

/// Why a host cannot take a guest whatever else runs there ([`HostState::usable_for`]).
enum Unusable {
    Undeclared,
    Unobserved,
    Unschedulable,
    /// The guest CPUs there.
    NoCpu(CpuSet),
    NoPool(PageSize),
    PoolTooSmall {
        page: PageSize,
        need: u64,
        pool: u64,
    },
    /// The memory there for guests on normal pages.
    TooBig(u64),
}

/// Guests holding pages of `size` on `host`, for messages: `web-1: 64, db-1: 32`.
pub fn page_holders<'g>(
    guests: impl IntoIterator<Item = &'g ObservedGuest>,
    host: &str,
    size: PageSize,
) -> String {
    let held: BTreeMap<&str, u64> = guests
        .into_iter()
        .filter(|g| g.host == host && g.has_vmm() && g.memory.hugepages == Some(size))
        .map(|g| (g.name.as_str(), pages_for(g.memory.size, size)))
        .collect();
    held.iter()
        .map(|(g, n)| format!("{g}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
