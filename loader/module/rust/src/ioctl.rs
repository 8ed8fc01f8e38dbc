//! `/dev/kdbt` ioctls. Each handler validates the user's structure (size fields, buffer
//! capacity) before acting and copies through the glue's checked user-copy helpers.
use alloc::vec::Vec;
use core::mem::size_of;

use kdbt_abi::{
    errno, CapsQuery, Command, CpuStatus, DbtCovEntry, DbtCovQuery, DbtCpuStats, DbtStart, DbtStatsQuery, StatusQuery,
    VersionInfo, IOC_CAPS, IOC_DBT_COV, IOC_DBT_SELFTEST, IOC_DBT_START, IOC_DBT_STATS, IOC_DBT_STOP, IOC_EPT_CHECK,
    IOC_EPT_VIOLATE, IOC_LOAD, IOC_NMI_CHECK, IOC_SHADOW_CHECK, IOC_STATUS, IOC_UNLOAD, IOC_VERSION,
};
use vmx::caps::RawCaps;

use crate::{ffi, hv, hw, power};

type Result<T> = core::result::Result<T, i32>;

pub fn dispatch(cmd: u32, arg: u64) -> Result<i64> {
    match cmd {
        IOC_VERSION => version(arg),
        IOC_CAPS => caps(arg),
        IOC_LOAD => command(arg, power::load, errno::EALREADY, hv::is_loaded),
        IOC_UNLOAD => command(arg, |_| power::unload(), errno::ENOENT, || !hv::is_loaded()),
        IOC_STATUS => status(arg),
        IOC_EPT_CHECK => check(arg, |_| hv::ept_check(), true),
        IOC_NMI_CHECK => check(arg, |_| hv::nmi_check(), true),
        IOC_EPT_VIOLATE => check(arg, hv::ept_violation_check, true),
        IOC_SHADOW_CHECK => check(arg, hv::shadow_policy_check, true),
        IOC_DBT_SELFTEST => check(arg, crate::kernel_dbt::selftest::run, false),
        IOC_DBT_START => dbt_start(arg),
        IOC_DBT_STOP => check(arg, |_| crate::kernel_dbt::session::stop(), false),
        IOC_DBT_STATS => dbt_stats(arg),
        IOC_DBT_COV => dbt_cov(arg),
        _ => Err(errno::ENOTTY),
    }
}

/// Plain-old-data types that may be copied to/from user space byte for byte.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integers/arrays of integers, and have
/// no padding bytes left uninitialized in values built by kdbt (all are built from zeroed
/// or fully-initialized fields).
unsafe trait Pod: Copy {}
// SAFETY: #[repr(C)] structs of u32/u64/[u8; N] with no implicit padding (checked by the
// size assertions in kdbt-abi's tests and vmx's RawCaps tests).
unsafe impl Pod for VersionInfo {}
// SAFETY: as above.
unsafe impl Pod for CapsQuery {}
// SAFETY: as above.
unsafe impl Pod for RawCaps {}
// SAFETY: as above.
unsafe impl Pod for Command {}
// SAFETY: as above.
unsafe impl Pod for StatusQuery {}
// SAFETY: as above.
unsafe impl Pod for CpuStatus {}
// SAFETY: as above.
unsafe impl Pod for DbtStart {}
// SAFETY: as above.
unsafe impl Pod for DbtStatsQuery {}
// SAFETY: as above.
unsafe impl Pod for DbtCpuStats {}
// SAFETY: as above.
unsafe impl Pod for DbtCovQuery {}
// SAFETY: as above.
unsafe impl Pod for DbtCovEntry {}

fn copy_to_user<T: Pod>(to: u64, v: &[T]) -> Result<()> {
    let n = core::mem::size_of_val(v) as core::ffi::c_ulong;
    // SAFETY: `v` is valid for reads of `n` bytes (Pod: no uninitialized bytes); the glue
    // checks the user range with copy_to_user.
    let left = unsafe { ffi::kdbt_glue_copy_to_user(to, v.as_ptr().cast(), n) };
    if left == 0 {
        Ok(())
    } else {
        Err(errno::EFAULT)
    }
}

fn copy_from_user<T: Pod + Default>(from: u64) -> Result<T> {
    let mut v = T::default();
    // SAFETY: `v` is valid for writes of size_of::<T>() bytes and any byte pattern is a
    // valid T (Pod); the glue checks the user range with copy_from_user.
    let left =
        unsafe { ffi::kdbt_glue_copy_from_user((&mut v as *mut T).cast(), from, size_of::<T>() as core::ffi::c_ulong) };
    if left == 0 {
        Ok(v)
    } else {
        Err(errno::EFAULT)
    }
}

fn version(arg: u64) -> Result<i64> {
    let info = VersionInfo {
        size: size_of::<VersionInfo>() as u32,
        abi_version: kdbt_abi::ABI_VERSION,
        cpus_online: hw::online_cpus(),
        cpu_ids: hw::cpu_ids(),
        module_version: kdbt_abi::fixed_str(env!("CARGO_PKG_VERSION")),
    };
    copy_to_user(arg, core::slice::from_ref(&info))?;
    Ok(0)
}

/// Reads the VT-x capability MSRs on every online CPU (each read on its own CPU, with
/// rdmsr_safe) and returns them raw; decoding is `vmx::caps`' job, in user space.
fn caps(arg: u64) -> Result<i64> {
    let mut q: CapsQuery = copy_from_user(arg)?;
    if q.size as usize != size_of::<CapsQuery>() || q.entry_size as usize != size_of::<RawCaps>() {
        return Err(errno::EINVAL);
    }
    let mut out: Vec<RawCaps> = Vec::new();
    {
        let _hotplug = hw::CpusReadGuard::lock();
        let online = hw::online_cpus();
        if q.capacity < online {
            q.count = online;
            copy_to_user(arg, core::slice::from_ref(&q))?;
            return Err(errno::ENOSPC);
        }
        out.try_reserve_exact(online as usize).map_err(|_| errno::ENOMEM)?;
        for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
            let mut raw = RawCaps::default();
            hw::run_on_cpu(cpu, || raw = RawCaps::read(&hw::KernelHw, cpu))?;
            out.push(raw);
        }
    }
    copy_to_user(q.buf, &out)?;
    q.count = out.len() as u32;
    copy_to_user(arg, core::slice::from_ref(&q))?;
    Ok(0)
}

/// Load or unload: run `f`; on failure copy its message back to the caller. `busy_errno`
/// is returned when `busy()` says the command makes no sense now (already loaded / not
/// loaded), so the CLI can tell that apart from a failure.
fn command(
    arg: u64,
    f: fn(u32) -> core::result::Result<(), alloc::string::String>,
    busy_errno: i32,
    busy: fn() -> bool,
) -> Result<i64> {
    let mut c: Command = copy_from_user(arg)?;
    if c.size as usize != size_of::<Command>() {
        return Err(errno::EINVAL);
    }
    let already = busy();
    let r = if already { Err(alloc::string::String::new()) } else { f(c.flags) };
    match r {
        Ok(()) => Ok(0),
        Err(msg) => {
            c.message = [0; 480];
            let n = msg.len().min(c.message.len() - 1);
            c.message[..n].copy_from_slice(&msg.as_bytes()[..n]);
            copy_to_user(arg, core::slice::from_ref(&c))?;
            Err(if already { busy_errno } else { errno::EIO })
        }
    }
}

fn status(arg: u64) -> Result<i64> {
    let mut q: StatusQuery = copy_from_user(arg)?;
    if q.size as usize != size_of::<StatusQuery>() || q.entry_size as usize != size_of::<CpuStatus>() {
        return Err(errno::EINVAL);
    }
    let mut out: Vec<CpuStatus> = Vec::new();
    let loaded = hv::status(|cpu, online, held| {
        let mut s = CpuStatus { cpu, online: online as u32, ..Default::default() };
        if let Some((virt, cycles, stats, shadow)) = held {
            s.virtualized = virt as u32;
            if let Some(f) = shadow {
                s.paging = kdbt_abi::PAGING_SHADOW;
                s.shadow = kdbt_abi::ShadowStatus {
                    faults_resolved: f[0],
                    faults_reflected: f[1],
                    policy_faults: f[2],
                    cr3_switches: f[3],
                    invlpgs: f[4],
                    invpcids: f[5],
                    reclaims: f[6],
                    pool_resets: f[7],
                    root_evictions: f[8],
                    full_flushes: f[9],
                    pages_in_use: f[10],
                    pages_total: f[11],
                    roots: f[12],
                };
            }
            s.launch_cycles = cycles;
            s.exits_total = stats.total;
            let n = s.exits.len().min(stats.counts.len());
            s.exits[..n].copy_from_slice(&stats.counts[..n]);
        }
        out.push(s);
    });
    q.loaded = loaded as u32;
    let (buf, cap) = (q.buf, q.capacity);
    reply_list(arg, &mut q, buf, cap, &out, |q, n| q.count = n)
}

/// The end of a list query: `out` into the caller's buffer `buf` of `capacity` entries
/// and the header (its count set by `set_count`) back at `arg`; ENOSPC, with the count
/// needed, when the buffer is too small.
fn reply_list<Q: Pod, E: Pod>(
    arg: u64,
    q: &mut Q,
    buf: u64,
    capacity: u32,
    out: &[E],
    set_count: fn(&mut Q, u32),
) -> Result<i64> {
    set_count(q, out.len() as u32);
    if out.len() > capacity as usize {
        copy_to_user(arg, core::slice::from_ref(q))?;
        return Err(errno::ENOSPC);
    }
    copy_to_user(buf, out)?;
    copy_to_user(arg, core::slice::from_ref(q))?;
    Ok(0)
}

/// A self-check of the loaded hypervisor (`kdbt ept-check`, `kdbt nmi-check`): its
/// report, or why it failed, in [`Command::message`].
/// `needs_hv`: a failure while kdbt is not loaded is reported as ENOENT ("not loaded").
fn check(
    arg: u64,
    run: fn(u32) -> core::result::Result<alloc::string::String, alloc::string::String>,
    needs_hv: bool,
) -> Result<i64> {
    let mut c: Command = copy_from_user(arg)?;
    if c.size as usize != size_of::<Command>() {
        return Err(errno::EINVAL);
    }
    let (r, text) = match run(c.flags) {
        Ok(report) => (Ok(0), report),
        Err(e) => (Err(if !needs_hv || hv::is_loaded() { errno::EIO } else { errno::ENOENT }), e),
    };
    c.message = [0; 480];
    let n = text.len().min(c.message.len() - 1);
    c.message[..n].copy_from_slice(&text.as_bytes()[..n]);
    copy_to_user(arg, core::slice::from_ref(&c))?;
    r
}

/// `kdbt start`: the reason of a failure in [`DbtStart::message`].
fn dbt_start(arg: u64) -> Result<i64> {
    let mut c: DbtStart = copy_from_user(arg)?;
    if c.size as usize != size_of::<DbtStart>() {
        return Err(errno::EINVAL);
    }
    match crate::kernel_dbt::session::start(&c) {
        Ok(()) => Ok(0),
        Err(msg) => {
            c.message = [0; 480];
            let n = msg.len().min(c.message.len() - 1);
            c.message[..n].copy_from_slice(&msg.as_bytes()[..n]);
            copy_to_user(arg, core::slice::from_ref(&c))?;
            Err(errno::EIO)
        }
    }
}

fn dbt_stats(arg: u64) -> Result<i64> {
    let mut q: DbtStatsQuery = copy_from_user(arg)?;
    if q.size as usize != size_of::<DbtStatsQuery>() || q.entry_size as usize != size_of::<DbtCpuStats>() {
        return Err(errno::EINVAL);
    }
    let mut out = Vec::new();
    crate::kernel_dbt::session::stats(&mut q, &mut out).map_err(|_| errno::ENOMEM)?;
    let (buf, cap) = (q.buf, q.capacity);
    reply_list(arg, &mut q, buf, cap, &out, |q, n| q.count = n)
}

fn dbt_cov(arg: u64) -> Result<i64> {
    let mut q: DbtCovQuery = copy_from_user(arg)?;
    if q.size as usize != size_of::<DbtCovQuery>() || q.entry_size as usize != size_of::<DbtCovEntry>() {
        return Err(errno::EINVAL);
    }
    let mut out = Vec::new();
    crate::kernel_dbt::session::cov(&mut out).map_err(|e| {
        if e == "out of memory" {
            errno::ENOMEM
        } else {
            errno::ENOENT
        }
    })?;
    let (buf, cap) = (q.buf, q.capacity);
    reply_list(arg, &mut q, buf, cap, &out, |q, n| q.count = n)
}
