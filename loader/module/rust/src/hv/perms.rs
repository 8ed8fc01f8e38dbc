//! EPT permission changes and queries: directly while no CPU runs on the map, otherwise
//! by hypercall in root mode (the tables are hidden from the guest), then INVEPT everywhere.
use super::*;

/// A virtualized CPU, to run root-mode EPT calls on (None: no CPU runs on the map).
pub(super) fn root_cpu(st: &State) -> Option<u32> {
    // SAFETY: reads the current CPU number.
    let here = unsafe { ffi::kdbt_glue_this_cpu() };
    let held = |c: &u32| st.cpus.get(*c as usize).and_then(|c| c.as_ref()).is_some_and(|c| c.shared().virtualized.load(Ordering::Acquire));
    core::iter::once(here).chain(0..st.cpus.len() as u32).find(held)
}

/// INVEPT through the hypercall on every virtualized CPU.
pub(super) fn invept_everywhere(st: &State) -> Result<(), String> {
    for cpu in (0..st.cpus.len() as u32).filter(|&c| st.cpus[c as usize].is_some()) {
        let mut rax = 0;
        hw::run_on_cpu(cpu, || rax = hypercall(vmx::hypercall::Call::EptInvalidate, 0))
            .map_err(|e| alloc::format!("cpu{cpu}: cannot run INVEPT (error {e})"))?;
        if rax != vmx::hypercall::OK {
            return Err(alloc::format!("cpu{cpu}: INVEPT hypercall returned {rax:#x}"));
        }
    }
    Ok(())
}

/// Sets `perms` on every page of `pages` in the EPT map: directly while no CPU runs on it,
/// otherwise through [`Call::EptSetPerms`] in root mode on a virtualized CPU (the tables
/// are hidden from the guest), then INVEPT on every CPU. Returns the first page's previous
/// permissions. On error the pages changed before stay changed.
///
/// [`Call::EptSetPerms`]: vmx::hypercall::Call::EptSetPerms
pub(super) fn map_set(st: &mut State, pages: &[u64], perms: ::ept::Perms) -> Result<::ept::Perms, String> {
    use vmx::hypercall::{EPT_CHANGED, ERR_BUSY, ERR_OUT_OF_FRAMES};
    let Some(vcpu) = root_cpu(st) else {
        let map = st.ept.as_mut().ok_or_else(no_ept)?.direct();
        let mut first = None;
        for &p in pages {
            let old = map.perms_of(p).ok_or_else(|| alloc::format!("{p:#x} is outside the EPT map"))?;
            first.get_or_insert(old);
            map.set_perms_4k(p, perms).map_err(|e| alloc::format!("{p:#x}: {e}"))?;
        }
        return first.ok_or_else(|| String::from("no page given"));
    };
    if st.ept.is_none() {
        return Err(no_ept());
    }
    let (mut first, mut changed, mut failed) = (None, false, None);
    hw::run_on_cpu(vcpu, || {
        for &p in pages {
            let mut r = ERR_BUSY;
            for _ in 0..1000 {
                r = hypercall(vmx::hypercall::Call::EptSetPerms, p | perms.bits() as u64);
                if r != ERR_BUSY {
                    break;
                }
            }
            if r & (1 << 63) != 0 {
                failed = Some((p, r));
                break;
            }
            first.get_or_insert(::ept::Perms::from_bits_truncate((r & 7) as u8));
            changed |= r & EPT_CHANGED != 0;
        }
    })
    .map_err(|e| alloc::format!("cpu{vcpu}: cannot run on it (error {e})"))?;
    if changed {
        invept_everywhere(st)?;
    }
    if let Some((p, r)) = failed {
        return Err(match r {
            ERR_OUT_OF_FRAMES => alloc::format!("{p:#x}: root mode has no spare EPT frame left ({} at load)", ept::POOL),
            vmx::hypercall::ERR_BAD_ARGUMENT => alloc::format!("{p:#x} is outside the EPT map or {perms} is invalid"),
            r => alloc::format!("{p:#x}: EPT hypercall returned {r:#x}"),
        });
    }
    first.ok_or_else(|| String::from("no page given"))
}

pub(super) fn no_ept() -> String {
    String::from("kdbt runs with shadow paging (no EPT): EPT permissions do not exist in this mode")
}

/// Changes the EPT permissions of the 4 KB page at `gpa` on every CPU: root mode updates
/// the shared tables (splitting a large page if needed), then every virtualized CPU
/// executes INVEPT through the hypercall before this returns. Returns the previous
/// permissions.
pub fn set_page_perms(gpa: u64, perms: ::ept::Perms) -> Result<::ept::Perms, String> {
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Err(String::from("kdbt is not loaded")) };
    ::ept::table::check_perms(perms, &st.controls.ept).map_err(|e| alloc::format!("{e}"))?;
    map_set(st, &[gpa & !0xfff], perms)
}

/// [`set_page_perms`] for many pages at once: one root-mode visit and one INVEPT round
/// for all of them.
pub fn set_pages_perms(gpas: &[u64], perms: ::ept::Perms) -> Result<(), String> {
    if gpas.is_empty() {
        return Ok(());
    }
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Err(String::from("kdbt is not loaded")) };
    ::ept::table::check_perms(perms, &st.controls.ept).map_err(|e| alloc::format!("{e}"))?;
    let pages: alloc::vec::Vec<u64> = gpas.iter().map(|p| p & !0xfff).collect();
    map_set(st, &pages, perms).map(|_| ())
}

/// The EPT permissions of the page at `gpa` (root mode walks the hidden tables).
pub(super) fn query_perms(gpa: u64) -> Result<::ept::Perms, String> {
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Err(String::from("kdbt is not loaded")) };
    let Some(vcpu) = root_cpu(st) else {
        let map = st.ept.as_mut().ok_or_else(no_ept)?.direct();
        return map.perms_of(gpa).ok_or_else(|| alloc::format!("{gpa:#x} is outside the EPT map"));
    };
    let mut r = vmx::hypercall::ERR_BUSY;
    hw::run_on_cpu(vcpu, || {
        for _ in 0..1000 {
            r = hypercall(vmx::hypercall::Call::EptQuery, gpa);
            if r != vmx::hypercall::ERR_BUSY {
                break;
            }
        }
    })
    .map_err(|e| alloc::format!("cpu{vcpu}: cannot run on it (error {e})"))?;
    if r & (1 << 63) != 0 {
        return Err(alloc::format!("EPT query of {gpa:#x} returned {r:#x}"));
    }
    Ok(::ept::Perms::from_bits_truncate(r as u8))
}
