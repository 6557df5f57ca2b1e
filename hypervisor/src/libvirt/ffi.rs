//! The few libvirt calls the `virt` crate does not wrap: vCPU and emulator pin info,
//! block I/O parameters, the host CPU count and aborting a job. Each goes through
//! `virt::sys` here, and nowhere else.

use std::os::raw::{c_int, c_uint};
use std::ptr;

use berth_schema::CpuSet;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// Bytes of a libvirt CPU map for `cpus` host CPUs (`VIR_CPU_MAPLEN`).
fn map_len(cpus: u32) -> usize {
    (cpus as usize).div_ceil(8)
}

/// The CPUs set in one CPU map.
fn cpus_of(map: &[u8]) -> CpuSet {
    map.iter()
        .enumerate()
        .flat_map(|(byte, bits)| {
            (0..8u32)
                .filter_map(move |bit| (bits & (1 << bit) != 0).then_some(byte as u32 * 8 + bit))
        })
        .collect()
}

/// A libvirt CPU map of `cpus` on a host with `host_cpus` CPUs.
pub(super) fn cpu_map(cpus: &CpuSet, host_cpus: u32) -> Vec<u8> {
    let mut map = vec![0u8; map_len(host_cpus)];
    for cpu in cpus.iter().filter(|c| *c < host_cpus) {
        map[cpu as usize / 8] |= 1 << (cpu % 8);
    }
    map
}

/// The number of CPUs the host has (present, online or not): the width of CPU maps.
pub(super) fn host_cpus(conn: &Connect) -> Result<u32, Error> {
    // SAFETY: the connection pointer is valid while `conn` lives; null out-pointers ask
    // only for the count, so libvirt allocates nothing.
    let n = unsafe { sys::virNodeGetCPUMap(conn.as_ptr(), ptr::null_mut(), ptr::null_mut(), 0) };
    if n < 0 {
        return Err(Error::last_error());
    }
    Ok(n as u32)
}

/// Each vCPU's affinity (`virDomainGetVcpuPinInfo`), for `max_vcpus` vCPUs.
pub(super) fn vcpu_pin_info(
    dom: &Domain,
    max_vcpus: u32,
    host_cpus: u32,
    flags: c_uint,
) -> Result<Vec<CpuSet>, Error> {
    let len = map_len(host_cpus);
    let mut maps = vec![0u8; len * max_vcpus as usize];
    // SAFETY: `maps` holds `max_vcpus` maps of `len` bytes each, as the call is told;
    // libvirt writes at most that much. The domain pointer is valid while `dom` lives.
    let n = unsafe {
        sys::virDomainGetVcpuPinInfo(
            dom.as_ptr(),
            max_vcpus as c_int,
            maps.as_mut_ptr(),
            len as c_int,
            flags,
        )
    };
    if n < 0 {
        return Err(Error::last_error());
    }
    Ok(maps.chunks(len).take(n as usize).map(cpus_of).collect())
}

/// The emulator threads' affinity (`virDomainGetEmulatorPinInfo`).
pub(super) fn emulator_pin_info(
    dom: &Domain,
    host_cpus: u32,
    flags: c_uint,
) -> Result<CpuSet, Error> {
    let mut map = vec![0u8; map_len(host_cpus)];
    // SAFETY: `map` is `len` bytes, as the call is told; the domain pointer is valid
    // while `dom` lives.
    let n = unsafe {
        sys::virDomainGetEmulatorPinInfo(dom.as_ptr(), map.as_mut_ptr(), map.len() as c_int, flags)
    };
    if n < 0 {
        return Err(Error::last_error());
    }
    Ok(cpus_of(&map))
}

/// The domain's block I/O weight (`virDomainGetBlkioParameters`, field `weight`);
/// `None` when libvirt reports no weight.
pub(super) fn blkio_weight(dom: &Domain, flags: c_uint) -> Result<Option<u32>, Error> {
    let mut n: c_int = 0;
    // SAFETY: a null parameter array asks only for the count, written to `n`.
    let rc =
        unsafe { sys::virDomainGetBlkioParameters(dom.as_ptr(), ptr::null_mut(), &mut n, flags) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    // SAFETY: virTypedParameter is plain C data; all-zero is a valid (empty) value.
    let mut params: Vec<sys::virTypedParameter> = vec![unsafe { std::mem::zeroed() }; n as usize];
    // SAFETY: `params` holds `n` entries, as the call is told; libvirt fills at most
    // that many and updates `n`.
    let rc = unsafe {
        sys::virDomainGetBlkioParameters(dom.as_ptr(), params.as_mut_ptr(), &mut n, flags)
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    let mut weight: c_uint = 0;
    // SAFETY: `params` holds `n` filled entries; the name is a NUL-terminated constant.
    let found = unsafe {
        sys::virTypedParamsGetUInt(
            params.as_mut_ptr(),
            n,
            sys::VIR_DOMAIN_BLKIO_WEIGHT.as_ptr(),
            &mut weight,
        )
    };
    // SAFETY: frees the strings libvirt allocated inside the `n` entries (device weight
    // lists), not the Vec's own buffer.
    unsafe { sys::virTypedParamsClear(params.as_mut_ptr(), n) };
    match found {
        1 => Ok(Some(weight)),
        0 => Ok(None),
        _ => Err(Error::last_error()),
    }
}

/// Sets the block I/O weight (`virDomainSetBlkioParameters`, field `weight`).
pub(super) fn set_blkio_weight(dom: &Domain, weight: u32, flags: c_uint) -> Result<(), Error> {
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let (mut n, mut max): (c_int, c_int) = (0, 0);
    // SAFETY: libvirt grows the array it owns through the out-pointers; the name is a
    // NUL-terminated constant.
    let rc = unsafe {
        sys::virTypedParamsAddUInt(
            &mut params,
            &mut n,
            &mut max,
            sys::VIR_DOMAIN_BLKIO_WEIGHT.as_ptr(),
            weight,
        )
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    // SAFETY: `params` holds `n` entries built above; the domain pointer is valid.
    let rc = unsafe { sys::virDomainSetBlkioParameters(dom.as_ptr(), params, n, flags) };
    let result = if rc < 0 {
        Err(Error::last_error())
    } else {
        Ok(())
    };
    // SAFETY: `params` was allocated by virTypedParamsAddUInt and is freed once here.
    unsafe { sys::virTypedParamsFree(params, n) };
    result
}

/// A running job's statistics: (data processed, data remaining, data total, memory
/// iteration) in bytes; `None` when the domain has no job.
pub(super) fn job_progress(dom: &Domain) -> Result<Option<[u64; 4]>, Error> {
    job_stats(
        dom,
        0,
        [
            sys::VIR_DOMAIN_JOB_DATA_PROCESSED,
            sys::VIR_DOMAIN_JOB_DATA_REMAINING,
            sys::VIR_DOMAIN_JOB_DATA_TOTAL,
            sys::VIR_DOMAIN_JOB_MEMORY_ITERATION,
        ],
    )
}

/// The downtime of the domain's last completed job, in milliseconds: on the
/// destination of a migration, the time the guest was paused for the switchover
/// (libvirt's `downtime`, from the source's statistics); `None` when libvirt keeps no
/// completed job or reports no downtime.
pub(super) fn completed_downtime_ms(dom: &Domain) -> Result<Option<u64>, Error> {
    Ok(job_stats(
        dom,
        sys::VIR_DOMAIN_JOB_STATS_COMPLETED,
        [sys::VIR_DOMAIN_JOB_DOWNTIME],
    )?
    .map(|[ms]| ms)
    .filter(|ms| *ms > 0))
}

/// The fields `names` of the domain's job statistics (`virDomainGetJobStats` with
/// `flags`), 0 for a field libvirt leaves out; `None` when there is no job.
///
/// `virt`'s own `Domain::job_stats` hands libvirt's allocation to a Rust `Vec` (and a
/// null one when there is no job), so this reads the parameters here and frees them
/// with libvirt.
fn job_stats<const N: usize>(
    dom: &Domain,
    flags: c_uint,
    names: [&std::ffi::CStr; N],
) -> Result<Option<[u64; N]>, Error> {
    let mut kind: c_int = 0;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut n: c_int = 0;
    // SAFETY: libvirt allocates the parameter array and writes its pointer and length
    // through the out-pointers; the domain pointer is valid while `dom` lives.
    let rc =
        unsafe { sys::virDomainGetJobStats(dom.as_ptr(), &mut kind, &mut params, &mut n, flags) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    if kind == sys::VIR_DOMAIN_JOB_NONE as c_int || params.is_null() {
        // SAFETY: freeing a null or empty array is allowed.
        unsafe { sys::virTypedParamsFree(params, n) };
        return Ok(None);
    }
    let mut out = [0u64; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let mut value: std::os::raw::c_ulonglong = 0;
        // SAFETY: `params` holds `n` entries from libvirt; the name is NUL-terminated.
        if unsafe { sys::virTypedParamsGetULLong(params, n, name.as_ptr(), &mut value) } == 1 {
            *slot = value;
        }
    }
    // SAFETY: `params` was allocated by libvirt above and is freed once, here.
    unsafe { sys::virTypedParamsFree(params, n) };
    Ok(Some(out))
}

/// Aborts the domain's running job, a migration for example (`virDomainAbortJob`).
pub(super) fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: the domain pointer is valid while `dom` lives.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_maps_round_trip() {
        let cpus: CpuSet = "0,3,8-9".parse().unwrap();
        let map = cpu_map(&cpus, 12);
        assert_eq!(map, vec![0b1001, 0b11]);
        assert_eq!(cpus_of(&map), cpus);
        // CPUs the host does not have are left out, not wrapped around.
        assert_eq!(cpu_map(&"1,20".parse().unwrap(), 2), vec![0b10]);
    }
}
