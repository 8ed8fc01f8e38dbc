//! The hypervisor: late launch beneath the running kernel on every CPU, and devirtualize.
//!
//! Serialization: load, unload and permission changes run from ioctls (serialized by the
//! glue's mutex) and take the CPU hotplug read lock *before* [`STATE`]; the hotplug
//! callbacks run under the hotplug write lock and then take [`STATE`]. With that order at
//! most one of them holds [`STATE`] at a time, and neither waits for the other while
//! holding it (taking [`STATE`] first would let a hotplug callback spin on it while the
//! ioctl waits for the hotplug lock: a deadlock). Status reads take [`STATE`] alone.
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use spin::Mutex;

use crate::{ffi, hw};

mod entry;
mod ept;
mod fatal;
pub mod launch;
pub mod percpu;
mod root;
mod serial;
pub mod shadow;

use percpu::{PerCpu, PERCPU_ORDER};
use vmx::caps::{RawCaps, VmxCaps};
pub use vmx::policy::Controls;
use vmx::policy::{choose_controls, required};
use vmx::preflight::{preflight, Features, Request};

/// Parses the `fake_missing` module parameter: comma-separated [`Features`] names, any
/// case (e.g. `ept,vpid`).
fn parse_mask(fake: &str) -> Result<Features, String> {
    let mut mask = Features::empty();
    for name in fake.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let upper: String = name.chars().map(|c| c.to_ascii_uppercase()).collect();
        match Features::from_name(&upper) {
            Some(f) => mask |= f,
            None => return Err(alloc::format!("fake_missing: unknown feature '{name}'")),
        }
    }
    Ok(mask)
}

struct Cpu {
    pc: *mut PerCpu,
    /// The block's guest-visible page (the block itself is hidden under EPT: the kernel
    /// side must not even read its `shared` field).
    shared: *const percpu::Shared,
}

impl Cpu {
    fn shared(&self) -> &percpu::Shared {
        // SAFETY: the shared page stays allocated while the CPU is in `cpus`.
        unsafe { &*self.shared }
    }
}

// SAFETY: the per-CPU block is only touched by its own CPU in root mode and by the
// serialized load/unload/status paths (see the module comment).
unsafe impl Send for Cpu {}

struct State {
    controls: Controls,
    /// The identity map all CPUs share (in a page of its own, hidden once handed to root
    /// mode).
    ept: Option<ept::MapPage>,
    /// The map was handed to root mode ([`ept::hide_initial`], at the first launch).
    handed: bool,
    /// Host page tables: a PML4 page sharing the kernel half of the kernel's.
    host_pml4: *mut u64,
    cpus: Vec<Option<Cpu>>,
}

// SAFETY: see `Cpu`; the host PML4 page is read-only after load.
unsafe impl Send for State {}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Free a per-CPU block (and its shadow MMU's pool, and its shared page). The block must
/// be visible to the guest again, or no CPU run on the EPT map any more.
fn free_percpu(pc: *mut PerCpu) {
    // SAFETY: the block is ours and its CPU is not virtualized.
    let (sh, shared) = unsafe { ((*pc).ctl.shadow, (*pc).ctl.shared) };
    shadow::free(sh);
    if !shared.is_null() {
        // SAFETY: the shared page came from kdbt_glue_alloc_pages(0); its CPU is not
        // virtualized, so root mode no longer writes it.
        unsafe { ffi::kdbt_glue_free_pages(shared as *mut _, 0) };
    }
    // SAFETY: `pc` came from kdbt_glue_alloc_pages(PERCPU_ORDER) and is no longer in use
    // (its CPU is not virtualized).
    unsafe { ffi::kdbt_glue_free_pages(pc.cast(), PERCPU_ORDER) }
}

/// A virtualized CPU, to run root-mode EPT calls on (None: no CPU runs on the map).
fn root_cpu(st: &State) -> Option<u32> {
    // SAFETY: reads the current CPU number.
    let here = unsafe { ffi::kdbt_glue_this_cpu() };
    let held = |c: &u32| st.cpus.get(*c as usize).and_then(|c| c.as_ref()).is_some_and(|c| c.shared().virtualized.load(Ordering::Acquire));
    core::iter::once(here).chain(0..st.cpus.len() as u32).find(held)
}

/// INVEPT through the hypercall on every virtualized CPU.
fn invept_everywhere(st: &State) -> Result<(), String> {
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
fn map_set(st: &mut State, pages: &[u64], perms: ::ept::Perms) -> Result<::ept::Perms, String> {
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

fn no_ept() -> String {
    String::from("kdbt runs with shadow paging (no EPT): EPT permissions do not exist in this mode")
}

fn block_pages(pc: *mut PerCpu) -> Vec<u64> {
    // SAFETY: translating our own direct-map block (no access).
    let base = unsafe { ffi::kdbt_glue_virt_to_phys(pc as *const _) };
    (0..percpu::PERCPU_SIZE as u64 / 4096).map(|i| base + i * 4096).collect()
}

/// Hides `cpu`'s block from the guest before its launch (EPT mode); the first block of a
/// load also hands the map to root mode, hiding its tables with it.
fn hide_block(st: &mut State, cpu: u32, pc: *mut PerCpu) -> Result<(), String> {
    let Some(page) = st.ept.as_mut() else { return Ok(()) };
    let pages = block_pages(pc);
    if !st.handed {
        let pml4_pa = st.controls.host_cr3;
        ept::hide_initial(page, pml4_pa, cpu, pages[0], percpu::PERCPU_SIZE as u64)?;
        st.handed = true;
        return Ok(());
    }
    if ept::hiding() {
        map_set(st, &pages, ::ept::Perms::NONE).map_err(|e| alloc::format!("cpu{cpu}: cannot hide its per-CPU block: {e}"))?;
        ept::name_block(cpu, pages[0]);
    }
    Ok(())
}

/// Frees `cpu`'s block once its CPU is not virtualized: while other CPUs still run on the
/// EPT map the block is first made guest-accessible again (RWX, as in the identity map),
/// since the kernel will reuse the pages. If that fails the block is kept (leaked, logged).
fn release_block(st: &mut State, cpu: u32, pc: *mut PerCpu) -> Result<(), String> {
    ept::name_block(cpu, 0);
    if st.ept.is_some() && ept::hiding() && root_cpu(st).is_some() {
        if let Err(e) = map_set(st, &block_pages(pc), ::ept::Perms::RWX) {
            kwarn!("cpu{}: per-CPU block kept (not freed): cannot make it visible again: {}", cpu, e);
            return Err(alloc::format!("cpu{cpu}: cannot unhide its per-CPU block: {e}"));
        }
    }
    free_percpu(pc);
    Ok(())
}

fn alloc_percpu(cpu: u32) -> Result<*mut PerCpu, String> {
    // SAFETY: allocation of zeroed, naturally aligned pages; process context.
    let p = unsafe { ffi::kdbt_glue_alloc_pages(PERCPU_ORDER) } as *mut PerCpu;
    if p.is_null() {
        return Err(String::from("out of memory for the per-CPU area"));
    }
    // SAFETY: one zeroed page, large enough for `Shared` (asserted in percpu), whose
    // all-zero bytes are a valid `Shared` (atomics).
    let shared = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *const percpu::Shared;
    if shared.is_null() {
        // SAFETY: `p` came from kdbt_glue_alloc_pages(PERCPU_ORDER) and is unused.
        unsafe { ffi::kdbt_glue_free_pages(p.cast(), PERCPU_ORDER) };
        return Err(String::from("out of memory for the per-CPU shared page"));
    }
    // SAFETY: `p` is a fresh, zeroed, exclusively owned 64 KB block; all-zero is a valid
    // PerCpu (integers, atomics, arrays, a None option is not all-zero so we write it).
    let pcr = unsafe { &mut *p };
    pcr.ctl.cpu = cpu;
    pcr.ctl.exits = vmx::exit::ExitCtx::new(cpu, vmx::hypercall::STATE_VIRTUALIZED);
    pcr.ctl.shared = shared;
    pcr.ctl.shadow = core::ptr::null_mut();
    // SAFETY: the glue translates a direct-map address.
    pcr.ctl.phys = unsafe { ffi::kdbt_glue_virt_to_phys(p as *const _) };
    pcr.init_tables(&entry::idt_stubs());
    Ok(p)
}

/// Builds the host PML4: the kernel half of the current page tables (shared by every
/// process and never freed), nothing in the user half. Process context.
fn host_page_tables() -> Result<(*mut u64, u64), String> {
    // SAFETY: allocation of one zeroed page.
    let p = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if p.is_null() {
        return Err(String::from("out of memory for the host page tables"));
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    // SAFETY: the glue returns the direct-map address of the current PML4's frame.
    let cur = unsafe { ffi::kdbt_glue_phys_to_virt(cr3 & 0x000f_ffff_ffff_f000) } as *const u64;
    for i in 256..512 {
        // SAFETY: both pages are 512 u64 entries; the kernel half is stable.
        unsafe { p.add(i).write(cur.add(i).read_volatile()) };
    }
    // SAFETY: translating our own direct-map page.
    let pa = unsafe { ffi::kdbt_glue_virt_to_phys(p as *const _) };
    Ok((p, pa))
}

fn fake_missing() -> String {
    // SAFETY: the glue returns a NUL-terminated module parameter string (or null).
    let p = unsafe { ffi::kdbt_glue_param_fake_missing() };
    let mut s = String::new();
    if !p.is_null() {
        // SAFETY: NUL-terminated, alive while the module is loaded.
        let c = unsafe { core::ffi::CStr::from_ptr(p.cast()) };
        s.push_str(c.to_str().unwrap_or(""));
    }
    s
}

/// Preflight of one CPU from its raw capabilities (read on that CPU, including its CR4)
/// and the features its instructions need passed through (`native`, from its CPUID): its
/// controls, or every reason it can't be launched. Process context (allocates).
fn preflight_cpu(raw: &RawCaps, native: Features, mask: Features, shadow: bool) -> Result<Controls, String> {
    let caps = VmxCaps::decode(raw);
    let req = Request { required: required(shadow) | native, mask };
    match preflight(&caps, raw.cr4, &req) {
        Ok(cleared) => choose_controls(&caps, cleared.available, shadow).map_err(|e| alloc::format!("{e}")),
        Err(refusals) => {
            let mut s = String::new();
            for (i, r) in refusals.iter().enumerate() {
                let _ = write!(s, "{}{r}", if i > 0 { "; " } else { "" });
            }
            Err(s)
        }
    }
}

/// Launches `cpu` (process context; the CPU must be online). On failure the block is freed.
fn launch_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let pc = alloc_percpu(cpu)?;
    if st.controls.shadow {
        match shadow::ShadowCpu::alloc() {
            // SAFETY: the block is exclusively ours until the CPU is launched.
            Ok(sc) => unsafe { (*pc).ctl.shadow = sc },
            Err(e) => {
                free_percpu(pc);
                return Err(alloc::format!("cpu{cpu}: {e}"));
            }
        }
    }
    // Writable alias of this CPU's GDT, for devirtualize.
    // SAFETY: the glue returns per_cpu(gdt_page, cpu), a direct-map address.
    unsafe { (*pc).ctl.tables.gdt_rw = ffi::kdbt_glue_gdt_rw(cpu) };
    let controls = st.controls;
    {
        use vmx::hypercall::{STATE_EPT, STATE_VIRTUALIZED, STATE_VPID};
        let state = STATE_VIRTUALIZED
            | if controls.eptp != 0 { STATE_EPT } else { 0 }
            | if controls.vpid != 0 { STATE_VPID } else { 0 };
        // SAFETY: the block is exclusively ours until the CPU is launched.
        unsafe {
            (*pc).ctl.exits.state = state;
            (*pc).ctl.exits.vnmi = controls.vnmi;
            (*pc).ctl.flush = controls.flush;
        }
    }
    // SAFETY: the block is exclusively ours and not hidden yet.
    let shared = unsafe { (*pc).ctl.shared };
    // From here until it is freed the block is root mode's only (EPT: no guest rights).
    if let Err(e) = hide_block(st, cpu, pc) {
        let _ = release_block(st, cpu, pc);
        return Err(e);
    }
    let mut result: Result<(), launch::LaunchError> = Ok(());
    let pc_addr = pc as usize;
    // SAFETY: reads a module parameter.
    let fail = unsafe { ffi::kdbt_glue_param_fail_launch_cpu() } == cpu as i32;
    // SAFETY: reads module parameters.
    let corrupt = (unsafe { ffi::kdbt_glue_param_fail_vmwrite_cpu() } == cpu as i32)
        // SAFETY: as above.
        .then(|| unsafe { ffi::kdbt_glue_param_fail_vmwrite_field() });
    let rc = hw::run_on_cpu(cpu, || {
        // SAFETY: the block is exclusively ours until the CPU is launched.
        result = launch::launch(unsafe { &mut *(pc_addr as *mut PerCpu) }, &controls, fail, corrupt);
    });
    let err = match (rc, result) {
        (Ok(()), Ok(())) => None,
        (Err(e), _) => Some(alloc::format!("cpu{cpu}: cannot run on it (error {e})")),
        (_, Err(e)) => Some(alloc::format!("cpu{cpu}: {e}")),
    };
    if let Some(e) = err {
        let _ = release_block(st, cpu, pc);
        return Err(e);
    }
    let idx = cpu as usize;
    if st.cpus.len() <= idx {
        st.cpus.resize_with(idx + 1, || None);
    }
    st.cpus[idx] = Some(Cpu { pc, shared });
    Ok(())
}

/// Devirtualizes `cpu` through the hypercall, then frees its block.
fn devirt_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let Some(c) = st.cpus.get_mut(cpu as usize).and_then(|c| c.take()) else {
        return Ok(());
    };
    if !c.shared().virtualized.load(Ordering::Acquire) {
        // Devirtualized already, behind kdbt's back (the emergency callback of a reboot or
        // panic that did not end the kernel): a VMCALL now would be #UD.
        kwarn!("cpu{}: found devirtualized already (emergency path)", cpu);
        return release_block(st, cpu, c.pc);
    }
    let mut rax = 0u64;
    let pc_addr = c.pc as usize;
    let rc = hw::run_on_cpu(cpu, || {
        rax = hypercall(vmx::hypercall::Call::Devirtualize, 0);
        // An NMI that hit root mode during the devirtualize path (before the kernel's IDT
        // was back) was only recorded: deliver it now, natively.
        // SAFETY: our block, still allocated; only this CPU writes the flag.
        let pending = unsafe { &(*(pc_addr as *const PerCpu)).ctl.nmi_pending };
        if rax == vmx::hypercall::OK && pending.swap(0, Ordering::Relaxed) != 0 {
            // SAFETY: native again, kernel context with interrupts off on this CPU.
            unsafe { ffi::kdbt_glue_self_nmi() };
        }
    });
    let still = c.shared().virtualized.load(Ordering::Acquire);
    if rc.is_err() || rax != vmx::hypercall::OK || still {
        // Keep the block: freeing memory a virtualized CPU uses would be fatal.
        st.cpus[cpu as usize] = Some(c);
        return Err(alloc::format!("cpu{cpu}: devirtualize failed (rc {rc:?}, rax {rax:#x})"));
    }
    release_block(st, cpu, c.pc)
}

/// VMCALL from the current CPU (CPL 0).
pub fn hypercall(call: vmx::hypercall::Call, arg: u64) -> u64 {
    let mut rax = call.rax();
    // SAFETY: VMCALL in VMX non-root operation exits to kdbt's handler, which implements
    // `call` and returns in RAX (RBX may be written by Ping); outside VMX it would #UD,
    // so callers only use it on CPUs kdbt virtualized.
    unsafe {
        core::arch::asm!("xchg {a}, rbx", "vmcall", "xchg {a}, rbx", a = inout(reg) arg => _, inout("rax") rax, options(nostack));
    }
    rax
}

pub fn is_loaded() -> bool {
    STATE.lock().is_some()
}

/// Launch on every online CPU; all or nothing. `flags`: `kdbt_abi::LOAD_*`.
pub fn load(flags: u32) -> Result<(), String> {
    if flags & !(kdbt_abi::LOAD_SHADOW_PAGING | kdbt_abi::LOAD_TEST_IGNORE_USER_INVLPG) != 0 {
        return Err(alloc::format!("unknown load flags {flags:#x} (CLI and module versions differ?)"));
    }
    let shadow = flags & kdbt_abi::LOAD_SHADOW_PAGING != 0;
    let ignore_user_invlpg = flags & kdbt_abi::LOAD_TEST_IGNORE_USER_INVLPG != 0;
    if ignore_user_invlpg && !shadow {
        return Err(String::from("the ignore-user-INVLPG test hook needs shadow paging"));
    }
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    if guard.is_some() {
        return Err(String::from("kdbt is already loaded"));
    }
    let mask = parse_mask(&fake_missing())?;
    // Preflight on every CPU before touching anything.
    let mut chosen: Option<Controls> = None;
    let mut errors = String::new();
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        // Only the reads run on the CPU (IPI context: no allocation, no sleeping).
        let mut raw = RawCaps::default();
        let mut native = Features::empty();
        let read = || {
            raw = RawCaps::read(&hw::KernelHw, cpu);
            native = vmx::preflight::native_needs(|l, s| {
                let r = core::arch::x86_64::__cpuid_count(l, s);
                [r.eax, r.ebx, r.ecx, r.edx]
            });
        };
        let r = match hw::run_on_cpu(cpu, read) {
            Ok(()) => preflight_cpu(&raw, native, mask, shadow),
            Err(e) => Err(alloc::format!("cannot run on it (error {e})")),
        };
        match r {
            Ok(c) if chosen.is_none_or(|x| x == c) => chosen = Some(c),
            Ok(_) => {
                let _ = write!(errors, "cpu{cpu}: VT-x capabilities differ from cpu0's; ");
            }
            Err(e) => {
                let _ = write!(errors, "cpu{cpu}: {e}; ");
            }
        }
    }
    if !errors.is_empty() {
        let msg = String::from(errors.trim_end_matches("; "));
        kwarn!("load refused: {}", msg);
        return Err(msg);
    }
    let Some(mut controls) = chosen else { return Err(String::from("no CPU online")) };
    controls.flush.ignore_user_invlpg = ignore_user_invlpg;
    if ignore_user_invlpg {
        kwarn!("test hook: the shadow MMU ignores INVLPG of user addresses");
    }
    let map = if shadow {
        kinfo!("shadow paging: {} shadow frames per CPU, no EPT", shadow::FRAMES_PER_CPU);
        None
    } else {
        let mut page = ept::build(controls.ept)?;
        let map = page.direct();
        controls.enable_ept(map.eptp(false));
        let stats = map.stats();
        kinfo!(
            "EPT identity map of {} GB: {} tables, {} x 1G + {} x 2M + {} x 4K pages; hypervisor memory {}",
            map.limit() >> 30,
            stats.tables,
            stats.pages_1g,
            stats.pages_2m,
            stats.pages_4k,
            if ept::hiding() { "hidden from the guest" } else { "NOT hidden (hide_hv=0)" }
        );
        Some(page)
    };
    let (pml4, pml4_pa) = match host_page_tables() {
        Ok(v) => v,
        Err(e) => {
            if let Some(map) = map {
                map.destroy();
            }
            return Err(e);
        }
    };
    controls.host_cr3 = pml4_pa;
    let mut st = State { controls, ept: map, handed: false, host_pml4: pml4, cpus: Vec::new() };
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        if let Err(e) = launch_cpu(&mut st, cpu) {
            // Roll back: nothing half-done survives.
            let mut rollback = String::new();
            for done in 0..st.cpus.len() as u32 {
                if let Err(e2) = devirt_cpu(&mut st, done) {
                    let _ = write!(rollback, "; rollback: {e2}");
                }
            }
            if rollback.is_empty() {
                free_host_tables(&mut st);
            } else {
                // A CPU is still virtualized and uses the EPT and host page tables: keep
                // them (and the state, so that `kdbt unload` can retry).
                *guard = Some(st);
            }
            kwarn!("load failed: {}{}", e, rollback);
            return Err(alloc::format!("{e}{rollback}"));
        }
    }
    kinfo!("virtualized {} CPUs", st.cpus.iter().flatten().count());
    *guard = Some(st);
    Ok(())
}

/// Frees what all CPUs shared (host page tables, EPT) once none is virtualized.
fn free_host_tables(st: &mut State) {
    // SAFETY: the page came from kdbt_glue_alloc_pages(0) and no CPU uses it any more.
    unsafe { ffi::kdbt_glue_free_pages(st.host_pml4.cast(), 0) };
    if let Some(map) = st.ept.take() {
        map.destroy();
    }
    ept::forget_names();
}

/// Devirtualize every CPU and free everything.
pub fn unload() -> Result<(), String> {
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else {
        return Err(String::from("kdbt is not loaded"));
    };
    let mut errors = String::new();
    for cpu in 0..st.cpus.len() as u32 {
        if let Err(e) = devirt_cpu(st, cpu) {
            let _ = write!(errors, "{e}; ");
        }
    }
    if !errors.is_empty() {
        kwarn!("unload incomplete: {}", errors);
        return Err(errors);
    }
    free_host_tables(st);
    *guard = None;
    kinfo!("devirtualized all CPUs");
    Ok(())
}

/// CPU hotplug: a CPU came online while loaded (runs on that CPU's hotplug thread).
pub fn cpu_online(cpu: u32) -> Result<(), String> {
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Ok(()) };
    let r = launch_cpu(st, cpu);
    match &r {
        Ok(()) => kinfo!("cpu{} came online: virtualized", cpu),
        Err(e) => kwarn!("cpu{} came online but cannot be virtualized: {}", cpu, e),
    }
    r
}

/// CPU hotplug: a CPU is going offline: devirtualize it first.
pub fn cpu_offline(cpu: u32) -> Result<(), String> {
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Ok(()) };
    let r = devirt_cpu(st, cpu);
    match &r {
        Ok(()) => kinfo!("cpu{} going offline: devirtualized", cpu),
        Err(e) => kwarn!("cpu{} going offline: {}", cpu, e),
    }
    r
}

/// Per-CPU status for `kdbt status`.
/// One CPU's state for [`status`]: (virtualized, launch cycles, exit counters) of a CPU
/// kdbt holds.
pub type HeldCpu = (bool, u64, vmx::exit::ExitStats, Option<[u64; shadow::COUNTERS]>);

/// Per-CPU status for `kdbt status`: `f(cpu, online, held)` for every possible CPU id when
/// loaded (`held` is None for a CPU kdbt does not hold: offline, or its launch failed).
/// Returns whether the hypervisor is loaded.
pub fn status(mut f: impl FnMut(u32, bool, Option<HeldCpu>)) -> bool {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return false };
    for cpu in 0..hw::cpu_ids() {
        let online = hw::cpu_online(cpu);
        match st.cpus.get(cpu as usize).and_then(|c| c.as_ref()) {
            Some(c) => {
                // That CPU's root mode writes these fields concurrently; all of them are
                // atomics. The per-CPU block itself is hidden under EPT: only its
                // guest-visible shared page is read here (and the shadow block under
                // shadow paging, which hides nothing from the guest).
                let shared = c.shared();
                let sh = if st.controls.shadow {
                    // SAFETY: the block stays allocated while in `cpus`, readable without
                    // EPT; the shadow block lives as long as it; its published counters
                    // are atomics.
                    unsafe { (*c.pc).ctl.shadow.as_ref() }.map(|s| s.snapshot())
                } else {
                    None
                };
                let (virt, cycles, stats) = (
                    shared.virtualized.load(Ordering::Acquire),
                    shared.launch_cycles.load(Ordering::Relaxed),
                    shared.stats.snapshot(),
                );
                f(cpu, online, Some((virt, cycles, stats, sh)));
            }
            None => f(cpu, online, None),
        }
    }
    true
}

/// Whether the current CPU took a fatal VM exit (its guest-side NMI handler then panics
/// with [`fatal_message`]). Any context, NMI included.
pub fn fatal_pending() -> bool {
    // SAFETY: reads the current CPU number.
    fatal::for_cpu(unsafe { ffi::kdbt_glue_this_cpu() }).is_some()
}

/// Describes the fatal VM exit recorded on the current CPU, with what root mode found at
/// the exit (the page's mapping then, and which hypervisor object it is, if one). Called
/// in NMI context: reads nothing but the record (the EPT tables are hidden from here).
pub fn fatal_message(out: &mut impl Write) {
    // SAFETY: reads the current CPU number.
    let cpu = unsafe { ffi::kdbt_glue_this_cpu() };
    let Some(r) = fatal::for_cpu(cpu) else {
        let _ = write!(out, "kdbt: cpu{cpu}: no fatal VM exit recorded");
        return;
    };
    let _ = write!(out, "kdbt: {}", fatal::Describe { cpu, kind: r.kind, diag: r.diag, now: r.now, hidden: r.hidden });
}

/// Makes an EPT violation on purpose (`kdbt ept-check --violate`): a page kdbt owns loses
/// every EPT right and is read. The read exits, kdbt cannot handle it, and the kernel
/// panics with kdbt's diagnostic: on success this never returns. With `flags`
/// [`kdbt_abi::EPT_VIOLATE_HIDDEN`] (`--hidden`) the page read is instead the VMCS of the
/// last virtualized CPU, which kdbt hides from the guest: the panic must name it.
pub fn ept_violation_check(flags: u32) -> Result<String, String> {
    if flags & kdbt_abi::EPT_VIOLATE_HIDDEN != 0 {
        return hidden_touch_check();
    }
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    let r = set_page_perms(gpa, ::ept::Perms::NONE).map(|_| {
        kinfo!("reading {:#x} without EPT rights: expect a fatal VM exit and a panic", gpa);
        // SAFETY: our page (mapped; only its EPT rights are gone).
        unsafe { page.read_volatile() }
    });
    let restore = set_page_perms(gpa, ::ept::Perms::RWX);
    if restore.is_ok() {
        // SAFETY: our page, RWX again.
        unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    }
    r?;
    restore?;
    Err(alloc::format!("reading {gpa:#x} without EPT rights did not end in a fatal VM exit"))
}

/// Reads the VMCS of the last virtualized CPU from the guest (the kernel): with hidden
/// hypervisor memory this is a fatal EPT violation whose panic names "vmcs of cpuN".
fn hidden_touch_check() -> Result<String, String> {
    let hp = hw::CpusReadGuard::lock();
    let (cpu, pc, reader) = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        if st.ept.is_none() {
            return Err(String::from(
                "kdbt runs with shadow paging: hypervisor memory is not hidden from the guest in this mode",
            ));
        }
        let last = st.cpus.iter().enumerate().rev().find_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.pc)));
        let (cpu, pc) = last.ok_or_else(|| String::from("no CPU is virtualized"))?;
        // Read on another CPU when there is one: Bochs keeps TLB entries across VM entries
        // and exits (no VPID tags), so on the owner the translations its own native launch
        // and root mode made of the block would still let the read through.
        let reader = (0..cpu).find(|&c| st.cpus[c as usize].is_some()).unwrap_or(cpu);
        (cpu, pc, reader)
    };
    // SAFETY: translating a direct-map address (no access).
    let vmcs = unsafe { ffi::kdbt_glue_virt_to_phys((pc as usize + percpu::PAGE) as *const _) };
    kinfo!("reading the VMCS of cpu{} ({:#x}) on cpu{} from the guest: expect a fatal EPT violation naming it", cpu, vmcs, reader);
    let addr = pc as usize + percpu::PAGE;
    let mut v = 0u64;
    // SAFETY: the block stays allocated (hotplug lock held, ioctls serialized); it is
    // mapped in the kernel's page tables; whether EPT lets the guest read it is the test.
    hw::run_on_cpu(reader, || v = unsafe { (addr as *const u64).read_volatile() })
        .map_err(|e| alloc::format!("cpu{reader}: cannot run on it (error {e})"))?;
    drop(hp);
    let here = reader;
    Err(alloc::format!(
        "read the VMCS of cpu{cpu} ({vmcs:#x}) on cpu{here} from the guest without a fault (first word {v:#x}): hypervisor memory is not hidden{} (EPT rights there now: {:?})",
        if ept::hiding() { "" } else { " (hide_hv=0)" },
        query_perms(vmcs)
    ))
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

/// The EPT permissions of the page at `gpa` (root mode walks the hidden tables).
fn query_perms(gpa: u64) -> Result<::ept::Perms, String> {
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

/// INVEPT hypercalls each virtualized CPU has served, by CPU.
fn inveptions() -> Vec<(u32, u64)> {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return Vec::new() };
    st.cpus
        .iter()
        .enumerate()
        .filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.shared().stats.snapshot().inveptions)))
        .collect()
}

/// Exercises per-page permission changes on a scratch page kdbt owns: every permission
/// kind the CPU supports (none, R, RW, RX, X-only, RWX), each checked by a software walk of
/// the shared tables and by one INVEPT per CPU; the page is read while readable. Returns a
/// one-line report.
pub fn ept_check() -> Result<String, String> {
    use ::ept::Perms;
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    // SAFETY: our page, mapped RWX by EPT until we change it.
    unsafe { page.write_volatile(0x6b64_6274) };
    let xo = STATE.lock().as_ref().is_some_and(|st| st.controls.ept.execute_only);
    let mut kinds = alloc::vec![Perms::NONE, Perms::R, Perms::RW, Perms::RX];
    if xo {
        kinds.push(Perms::X);
    }
    kinds.push(Perms::RWX);
    let before = inveptions();
    let mut report = String::new();
    let mut result = Ok(());
    for &p in &kinds {
        if let Err(e) = set_page_perms(gpa, p) {
            result = Err(alloc::format!("set {p} on {gpa:#x}: {e}"));
            break;
        }
        let now = query_perms(gpa);
        if now.as_ref() != Ok(&p) {
            result = Err(alloc::format!("{gpa:#x}: set {p}, the tables say {now:?}"));
            break;
        }
        if p.contains(Perms::R) {
            // SAFETY: our page, readable under the permissions just installed.
            let v = unsafe { page.read_volatile() };
            if v != 0x6b64_6274 {
                result = Err(alloc::format!("{gpa:#x} reads {v:#x} under {p}"));
                break;
            }
        }
        let _ = write!(report, "{p} ");
    }
    // Whatever happened, give the page back its identity-map rights before freeing it.
    let restore = set_page_perms(gpa, Perms::RWX);
    let after = inveptions();
    // SAFETY: our page; RWX again (or the module is not loaded any more).
    unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    result?;
    restore?;
    let mut counts = String::new();
    for ((cpu, b), (_, a)) in before.iter().zip(after.iter()) {
        let _ = write!(counts, " cpu{cpu}_invept={}", a - b);
    }
    Ok(alloc::format!("page={gpa:#x} perms=[{}]{counts}", report.trim_end()))
}

/// NMI counters of a virtualized CPU: (NMI exits, NMI-window exits, NMIs injected).
fn nmi_counters(shared: *const percpu::Shared) -> (u64, u64, u64) {
    use vmx::exit::reason;
    // SAFETY: the shared page stays allocated while its CPU is in `cpus` (the caller holds
    // the hotplug lock, and ioctls are serialized); the counters are atomics its CPU's
    // root mode updates concurrently; the page is guest-visible.
    let ctx = unsafe { (*shared).stats.snapshot() };
    (ctx.counts[reason::EXCEPTION_NMI as usize], ctx.counts[reason::NMI_WINDOW as usize], ctx.nmis_injected)
}

/// Checks NMI delivery on every virtualized CPU: an NMI sent to it, and a second one its
/// handler sends itself while NMIs are blocked, must both reach the kernel. With NMI
/// virtualization each must also have exited (NMI exits), been injected, and the second
/// waited for the NMI window. Returns a one-line report.
pub fn nmi_check() -> Result<String, String> {
    let _hp = hw::CpusReadGuard::lock();
    let (cpus, vnmi): (Vec<(u32, *const percpu::Shared)>, bool) = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        let cpus =
            st.cpus.iter().enumerate().filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.shared))).collect();
        (cpus, st.controls.vnmi)
    };
    let mut report = alloc::format!("nmi_virtualization={}", vnmi as u8);
    let mut failures = String::new();
    for (cpu, pc) in cpus {
        let (e0, w0, i0) = nmi_counters(pc);
        // SAFETY: process context; the glue waits for the NMIs with a timeout.
        let got = unsafe { ffi::kdbt_glue_nmi_test(cpu) };
        let (e1, w1, i1) = nmi_counters(pc);
        let (exits, windows, injected) = (e1 - e0, w1 - w0, i1 - i0);
        let _ = write!(report, " cpu{cpu}: nmis={got} exits={exits} window_exits={windows} injected={injected};");
        if got != 2 {
            let _ = write!(failures, "cpu{cpu} received {got} of 2 NMIs; ");
        } else if vnmi && (exits < 2 || windows < 1 || injected < 2) {
            let _ = write!(failures, "cpu{cpu}: NMIs arrived but not through kdbt ({exits} exits, {windows} NMI windows, {injected} injected); ");
        }
    }
    let report = String::from(report.trim_end_matches(';'));
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(alloc::format!("{}({report})", failures))
    }
}

/// Shadow paging's permission hook on every CPU (`kdbt shadow-check`): a scratch page is
/// written on a CPU (so that CPU holds a writable shadow leaf for it), made not writable
/// (policy lifted at the first violation), the policy applied to every CPU's shadow
/// leaves (hypercall), then written again on that CPU through the same direct-map alias:
/// the write must trap to kdbt exactly once and complete. Each CPU in turn. `flags`
/// [`kdbt_abi::SHADOW_CHECK_TEST_SKIP_APPLY`]: do not apply (the writable leaf stays and the
/// check must fail). Returns a one-line report.
pub fn shadow_policy_check(flags: u32) -> Result<String, String> {
    use ::shadow::PagePolicy;
    let skip_apply = flags & kdbt_abi::SHADOW_CHECK_TEST_SKIP_APPLY != 0;
    let _hp = hw::CpusReadGuard::lock();
    let cpus: Vec<(u32, *mut PerCpu)> = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        if !st.controls.shadow {
            return Err(String::from("kdbt runs with EPT: the shadow policy hook needs `kdbt load --paging shadow`"));
        }
        st.cpus.iter().enumerate().filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.pc))).collect()
    };
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    let addr = page as usize;
    // SAFETY: the blocks stay allocated while their CPUs are in `cpus` (hotplug lock held);
    // the published counters are atomics.
    let policy_faults = |pc: *mut PerCpu| unsafe { (*pc).ctl.shadow.as_ref() }.map_or(0, |s| s.snapshot()[2]);
    let mut report = alloc::format!("page={gpa:#x}");
    let mut result = Ok(());
    for &(cpu, pc) in &cpus {
        let r = (|| -> Result<(), String> {
            // SAFETY: our page, written on `cpu` (its shadow now maps it writable).
            hw::run_on_cpu(cpu, || unsafe { (addr as *mut u64).write_volatile(0x100 + cpu as u64) })
                .map_err(|e| alloc::format!("cpu{cpu}: cannot run on it (error {e})"))?;
            let (h0, f0) = (shadow::POLICY.hits(), policy_faults(pc));
            shadow::POLICY.set(gpa, PagePolicy::NOT_WRITABLE, true)?;
            if !skip_apply {
                for &(other, _) in &cpus {
                    let mut rax = 0;
                    hw::run_on_cpu(other, || rax = hypercall(vmx::hypercall::Call::ShadowApplyPolicy, gpa))
                        .map_err(|e| alloc::format!("cpu{other}: cannot run on it (error {e})"))?;
                    if rax != vmx::hypercall::OK {
                        return Err(alloc::format!("cpu{other}: apply-policy hypercall returned {rax:#x}"));
                    }
                }
            }
            let mut before = 0;
            // SAFETY: our page; the write traps to kdbt, which lifts the policy, and then
            // completes.
            hw::run_on_cpu(cpu, || unsafe {
                before = (addr as *const u64).read_volatile();
                (addr as *mut u64).write_volatile(0x200 + cpu as u64);
            })
            .map_err(|e| alloc::format!("cpu{cpu}: cannot run on it (error {e})"))?;
            // SAFETY: our page.
            let after = unsafe { (addr as *const u64).read_volatile() };
            let (hits, faults) = (shadow::POLICY.hits() - h0, policy_faults(pc) - f0);
            shadow::POLICY.clear(gpa);
            let _ = write!(report, " cpu{cpu}_policy_faults={faults}");
            if before != 0x100 + cpu as u64 || after != 0x200 + cpu as u64 {
                return Err(alloc::format!("cpu{cpu}: page read {before:#x} then {after:#x}"));
            }
            if hits != 1 || faults != 1 {
                return Err(alloc::format!(
                    "cpu{cpu}: the write to the not-writable page did not trap once ({hits} lifts, {faults} policy faults)"
                ));
            }
            Ok(())
        })();
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    shadow::POLICY.clear(gpa);
    // SAFETY: our page; it has no policy any more.
    unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    match result {
        Ok(()) => Ok(report),
        Err(e) => Err(alloc::format!("{e} ({report})")),
    }
}
