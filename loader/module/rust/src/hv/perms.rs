//! EPT permission changes, remaps and queries: directly while no CPU runs on the map,
//! otherwise by hypercall in root mode (the tables are hidden from the guest), then INVEPT
//! everywhere.
use vmx::hypercall::Call;

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

/// One change of a 4 KB page of the EPT map, by either path of [`map_apply`].
#[derive(Clone, Copy)]
enum Change {
    /// The page at this guest-physical address gets the new permissions
    /// ([`Call::EptSetPerms`]).
    Perms(u64),
    /// The page at `.0` is mapped to the host-physical page `.1` ([`Call::EptRemap`]).
    Remap(u64, u64),
}

impl Change {
    fn gpa(self) -> u64 {
        match self {
            Change::Perms(gpa) | Change::Remap(gpa, _) => gpa,
        }
    }

    /// In the tables, directly (no CPU runs on the map); whether they changed.
    fn apply(self, map: &mut ept::Map, perms: ::ept::Perms) -> Result<bool, String> {
        let r = match self {
            Change::Perms(gpa) => map.set_perms_4k(gpa, perms),
            Change::Remap(gpa, hpa) => {
                if ept::hypervisor_memory(map, &[gpa, hpa & !0xfff]) {
                    return Err(alloc::format!("{self}: hypervisor memory cannot be remapped"));
                }
                map.remap_4k(gpa, hpa, perms)
            }
        };
        r.map_err(|e| alloc::format!("{self}: {e}"))
    }

    /// In root mode, on a virtualized CPU (the hypercall's RAX).
    fn hypercall(self, perms: ::ept::Perms) -> u64 {
        match self {
            Change::Perms(gpa) => hypercall(Call::EptSetPerms, gpa | perms.bits() as u64),
            Change::Remap(gpa, hpa) => hypercall2(Call::EptRemap, gpa | perms.bits() as u64, hpa),
        }
    }

    /// Why root mode answered ERR_BAD_ARGUMENT.
    fn refused(self, perms: ::ept::Perms) -> String {
        match self {
            Change::Perms(gpa) => alloc::format!("{gpa:#x} is outside the EPT map or {perms} is invalid"),
            Change::Remap(..) => {
                alloc::format!("{self}: refused (a page outside the EPT map or hypervisor memory, or {perms} invalid)")
            }
        }
    }
}

impl core::fmt::Display for Change {
    /// The page, and for a remap where to: `0x1000` or `0x1000 -> 0x5000`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Change::Perms(gpa) => write!(f, "{gpa:#x}"),
            Change::Remap(gpa, hpa) => write!(f, "{gpa:#x} -> {hpa:#x}"),
        }
    }
}

/// Makes the `n` changes `change(0..n)` with `perms` in the EPT map: directly while no
/// CPU runs on it, otherwise by hypercall in root mode on a virtualized CPU (the tables
/// are hidden from the guest), retrying while the tables are busy, then one INVEPT round
/// on every CPU if anything changed. Returns the first page's previous permissions. On
/// error the pages changed before stay changed.
fn map_apply(
    st: &mut State,
    n: usize,
    change: impl Fn(usize) -> Change + Sync,
    perms: ::ept::Perms,
) -> Result<::ept::Perms, String> {
    use vmx::hypercall::{EPT_CHANGED, ERR_BAD_ARGUMENT, ERR_BUSY, ERR_OUT_OF_FRAMES};
    let Some(vcpu) = root_cpu(st) else {
        let map = st.ept.as_mut().ok_or_else(no_ept)?.direct();
        let mut first = None;
        for c in (0..n).map(&change) {
            let old = map.perms_of(c.gpa()).ok_or_else(|| alloc::format!("{:#x} is outside the EPT map", c.gpa()))?;
            first.get_or_insert(old);
            c.apply(map, perms)?;
        }
        return first.ok_or_else(|| String::from("no page given"));
    };
    if st.ept.is_none() {
        return Err(no_ept());
    }
    let (mut first, mut changed, mut failed) = (None, false, None);
    hw::run_on_cpu(vcpu, || {
        for c in (0..n).map(&change) {
            let mut r = ERR_BUSY;
            for _ in 0..1000 {
                r = c.hypercall(perms);
                if r != ERR_BUSY {
                    break;
                }
            }
            if r & (1 << 63) != 0 {
                failed = Some((c, r));
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
    if let Some((c, r)) = failed {
        return Err(match r {
            ERR_OUT_OF_FRAMES => alloc::format!("{c}: root mode has no spare EPT frame left ({} at load)", ept::POOL),
            ERR_BAD_ARGUMENT => c.refused(perms),
            r => alloc::format!("{c}: EPT hypercall returned {r:#x}"),
        });
    }
    first.ok_or_else(|| String::from("no page given"))
}

/// Sets `perms` on every page of `pages` in the EPT map ([`map_apply`] of
/// [`Call::EptSetPerms`]). Returns the first page's previous permissions. On error the
/// pages changed before stay changed.
pub(super) fn map_set(st: &mut State, pages: &[u64], perms: ::ept::Perms) -> Result<::ept::Perms, String> {
    map_apply(st, pages.len(), |i| Change::Perms(pages[i]), perms)
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

/// Whether `page` is hypervisor memory `st` knows of, hidden or not: a CPU's per-CPU
/// block, the host page-table root or the map's state page (root mode records them only
/// while hiding is on; the map's own tables and spare frames are checked where the map is
/// walked, [`ept::hypervisor_memory`]).
fn state_memory(st: &State, page: u64) -> bool {
    let block = |c: &Cpu| {
        // SAFETY: translating the address of our own direct-map block (no access).
        let base = unsafe { ffi::kdbt_glue_virt_to_phys(c.pc as *const _) };
        page >= base && page - base < percpu::PERCPU_SIZE as u64
    };
    st.cpus.iter().flatten().any(block)
        || page == st.controls.host_cr3 & 0x000f_ffff_ffff_f000
        || st.ept.as_ref().is_some_and(|m| page == m.pa())
}

/// Maps each guest-physical page `gpa` of `pairs` to the host-physical page `hpa`
/// (both 4 KB-aligned; `hpa == gpa` restores the identity mapping) with `perms` on every
/// CPU: root mode updates the shared tables ([`Call::EptRemap`], splitting large pages if
/// needed; the entries keep the guest pages' memory types), then every virtualized CPU
/// executes INVEPT through the hypercall before this returns, once for all pairs.
/// Refused: a page that is not aligned or outside the EPT map, a page of hypervisor
/// memory (either side), invalid `perms`. On error the pairs before the failing one stay
/// remapped: the caller undoes them. Each `hpa` page must stay allocated to the caller
/// until its remap is undone.
pub fn remap_pages(pairs: &[(u64, u64)], perms: ::ept::Perms) -> Result<(), String> {
    if pairs.is_empty() {
        return Ok(());
    }
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Err(String::from("kdbt is not loaded")) };
    ::ept::table::check_perms(perms, &st.controls.ept).map_err(|e| alloc::format!("{e}"))?;
    for &(gpa, hpa) in pairs {
        let c = Change::Remap(gpa, hpa);
        if (gpa | hpa) & 0xfff != 0 {
            return Err(alloc::format!("{c}: not page-aligned"));
        }
        if state_memory(st, gpa) || state_memory(st, hpa) {
            return Err(alloc::format!("{c}: hypervisor memory cannot be remapped"));
        }
    }
    map_apply(st, pairs.len(), |i| Change::Remap(pairs[i].0, pairs[i].1), perms).map(|_| ())
}
