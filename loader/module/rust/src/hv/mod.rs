//! The hypervisor: late launch beneath the running kernel on every CPU, and devirtualize.
//!
//! Serialization: load, unload and status run from ioctls (serialized by the glue's mutex)
//! while holding the CPU hotplug read lock; the hotplug callbacks run under the hotplug
//! write lock. So at most one of them touches [`STATE`] at a time; the spin lock only makes
//! that explicit and is never contended.
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use spin::Mutex;

use crate::{ffi, hw};

mod entry;
pub mod launch;
pub mod percpu;
mod root;
mod serial;

use percpu::{PerCpu, PERCPU_ORDER};

/// VMX controls and fixed bits chosen for a CPU (identical on all CPUs of a machine; each
/// CPU computes its own and they are checked for equality).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    pub revision: u32,
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// CR0 bits the guest may clear (PE, PG with unrestricted guest; unused: 0).
    pub cr0_unrestricted_free: u64,
    pub vpid: u32,
    pub vpid_base: u16,
    pub eptp: u64,
    pub host_cr3: u64,
}

// Control bits (SDM Vol. 3C, 25.6 and 25.7).
const PROC_CR3_LOAD_EXITING: u32 = 1 << 15;
const PROC_CR3_STORE_EXITING: u32 = 1 << 16;
const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
const PROC_SECONDARY: u32 = 1 << 31;
const PROC2_EPT: u32 = 1 << 1;
const PROC2_RDTSCP: u32 = 1 << 3;
const PROC2_VPID: u32 = 1 << 5;
const PROC2_INVPCID: u32 = 1 << 12;
const PROC2_XSAVES: u32 = 1 << 20;
const PROC2_USER_WAIT_PAUSE: u32 = 1 << 26;
const EXIT_SAVE_DEBUG: u32 = 1 << 2;
const EXIT_HOST_64: u32 = 1 << 9;
const EXIT_SAVE_PAT: u32 = 1 << 18;
const EXIT_LOAD_PAT: u32 = 1 << 19;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;
const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
const ENTRY_IA32E: u32 = 1 << 9;
const ENTRY_LOAD_PAT: u32 = 1 << 14;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// Names a user can pass in the `fake_missing` module parameter to pretend a feature is
/// absent (for testing the refusal path): a comma-separated list.
pub const FAKEABLE: &[&str] = &["vmx", "ept", "vpid", "msr_bitmap", "load_efer", "secondary"];

/// Reads the VMX capability MSRs of this CPU and picks the controls kdbt needs, or lists
/// the missing features by name. `fake` lists features to treat as missing.
pub fn choose_controls(rd: &dyn Fn(u32) -> Option<u64>, vmx_in_cpuid: bool, fake: &str) -> Result<Controls, String> {
    let faked = |n: &str| fake.split(',').any(|f| f.trim() == n);
    if let Some(bad) = fake.split(',').map(str::trim).find(|f| !f.is_empty() && !FAKEABLE.contains(f)) {
        return Err(alloc::format!("fake_missing: unknown feature '{bad}' (known: {})", FAKEABLE.join(",")));
    }
    let mut missing: Vec<&str> = Vec::new();
    if !vmx_in_cpuid || faked("vmx") {
        return Err(String::from("VMX (CPUID.1:ECX.VMX is clear: this CPU has no VT-x)"));
    }
    let basic = rd(0x480).unwrap_or(0);
    let true_ctls = basic & (1 << 55) != 0;
    let pair = |plain: u32, truev: u32| -> (u32, u32) {
        let v = rd(if true_ctls { truev } else { plain }).unwrap_or(0);
        (v as u32, (v >> 32) as u32)
    };
    let (pin0, pin1) = pair(0x481, 0x48d);
    let (proc0, mut proc1) = pair(0x482, 0x48e);
    let (exit0, mut exit1) = pair(0x483, 0x48f);
    let (entry0, mut entry1) = pair(0x484, 0x490);
    if faked("msr_bitmap") {
        proc1 &= !PROC_USE_MSR_BITMAPS;
    }
    if faked("secondary") {
        proc1 &= !PROC_SECONDARY;
    }
    if faked("load_efer") {
        exit1 &= !EXIT_LOAD_EFER;
        entry1 &= !ENTRY_LOAD_EFER;
    }
    let proc2v = if proc1 & PROC_SECONDARY != 0 { rd(0x48b).unwrap_or(0) } else { 0 };
    let (proc2_0, mut proc2_1) = (proc2v as u32, (proc2v >> 32) as u32);
    let ept_cap = if proc2_1 & (PROC2_EPT | PROC2_VPID) != 0 { rd(0x48c).unwrap_or(0) } else { 0 };
    if faked("ept") {
        proc2_1 &= !PROC2_EPT;
    }
    if faked("vpid") {
        proc2_1 &= !PROC2_VPID;
    }

    let mut need = |have1: u32, bits: &[(u32, &'static str)]| {
        for &(b, name) in bits {
            if have1 & b == 0 {
                missing.push(name);
            }
        }
    };
    need(proc1, &[(PROC_USE_MSR_BITMAPS, "MSR bitmaps"), (PROC_SECONDARY, "secondary controls")]);
    need(proc2_1, &[(PROC2_EPT, "EPT")]);
    need(exit1, &[
        (EXIT_HOST_64, "64-bit host"),
        (EXIT_SAVE_EFER, "save EFER on exit"),
        (EXIT_LOAD_EFER, "load EFER on exit"),
        (EXIT_SAVE_PAT, "save PAT on exit"),
        (EXIT_LOAD_PAT, "load PAT on exit"),
    ]);
    need(entry1, &[(ENTRY_IA32E, "IA-32e mode guest"), (ENTRY_LOAD_EFER, "load EFER on entry"), (ENTRY_LOAD_PAT, "load PAT on entry")]);
    if proc0 & (PROC_CR3_LOAD_EXITING | PROC_CR3_STORE_EXITING) != 0 {
        missing.push("CR3-load/store exiting clearable (TRUE controls)");
    }
    if proc2_1 & PROC2_EPT != 0 {
        if ept_cap & (1 << 6) == 0 {
            missing.push("EPT 4-level page walk");
        }
        if ept_cap & (1 << 14) == 0 {
            missing.push("EPT write-back memory type");
        }
        if ept_cap & (1 << 20) == 0 || ept_cap & (1 << 26) == 0 {
            missing.push("INVEPT all-context");
        }
    }
    if !missing.is_empty() {
        let mut s = String::from("missing VT-x features: ");
        for (i, m) in missing.iter().enumerate() {
            let _ = write!(s, "{}{}", if i > 0 { ", " } else { "" }, m);
        }
        return Err(s);
    }
    // Optional features Linux may use natively: enable whenever allowed, so no guest
    // instruction faults that would not fault natively.
    let vpid_ok = proc2_1 & PROC2_VPID != 0 && ept_cap & (1 << 32) != 0 && ept_cap & (1 << 42) != 0;
    let want2 = PROC2_RDTSCP | PROC2_INVPCID | PROC2_XSAVES | PROC2_USER_WAIT_PAUSE | if vpid_ok { PROC2_VPID } else { 0 };
    let adjust = |want: u32, a0: u32, a1: u32| (want | a0) & a1;
    Ok(Controls {
        revision: basic as u32 & 0x7fff_ffff,
        pin: adjust(0, pin0, pin1),
        proc: adjust(PROC_USE_MSR_BITMAPS | PROC_SECONDARY, proc0, proc1) & !(PROC_CR3_LOAD_EXITING | PROC_CR3_STORE_EXITING),
        // EPT is switched on once the identity map exists (see `load`).
        proc2: adjust(want2 & proc2_1, proc2_0, proc2_1),
        exit: adjust(EXIT_SAVE_DEBUG | EXIT_HOST_64 | EXIT_SAVE_PAT | EXIT_LOAD_PAT | EXIT_SAVE_EFER | EXIT_LOAD_EFER, exit0, exit1),
        entry: adjust(ENTRY_LOAD_DEBUG | ENTRY_IA32E | ENTRY_LOAD_PAT | ENTRY_LOAD_EFER, entry0, entry1),
        cr0_fixed0: rd(0x486).unwrap_or(0),
        cr0_fixed1: rd(0x487).unwrap_or(u64::MAX),
        cr4_fixed0: rd(0x488).unwrap_or(0),
        cr4_fixed1: rd(0x489).unwrap_or(u64::MAX),
        cr0_unrestricted_free: 0,
        vpid: vpid_ok as u32,
        vpid_base: 1,
        eptp: 0,
        host_cr3: 0,
    })
}

struct Cpu {
    pc: *mut PerCpu,
}

// SAFETY: the per-CPU block is only touched by its own CPU in root mode and by the
// serialized load/unload/status paths (see the module comment).
unsafe impl Send for Cpu {}

struct State {
    controls: Controls,
    /// Host page tables: a PML4 page sharing the kernel half of the kernel's.
    host_pml4: *mut u64,
    cpus: Vec<Option<Cpu>>,
    loaded_at_tsc: u64,
}

// SAFETY: see `Cpu`; the host PML4 page is read-only after load.
unsafe impl Send for State {}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Free a per-CPU block.
fn free_percpu(pc: *mut PerCpu) {
    // SAFETY: `pc` came from kdbt_glue_alloc_pages(PERCPU_ORDER) and is no longer in use
    // (its CPU is not virtualized).
    unsafe { ffi::kdbt_glue_free_pages(pc.cast(), PERCPU_ORDER) }
}

fn alloc_percpu(cpu: u32) -> Result<*mut PerCpu, String> {
    // SAFETY: allocation of zeroed, naturally aligned pages; process context.
    let p = unsafe { ffi::kdbt_glue_alloc_pages(PERCPU_ORDER) } as *mut PerCpu;
    if p.is_null() {
        return Err(String::from("out of memory for the per-CPU area"));
    }
    // SAFETY: `p` is a fresh, zeroed, exclusively owned 64 KB block; all-zero is a valid
    // PerCpu (integers, atomics, arrays, a None option is not all-zero so we write it).
    let pcr = unsafe { &mut *p };
    pcr.ctl.cpu = cpu;
    pcr.ctl.fatal = None;
    pcr.ctl.exits = vmx::exit::ExitCtx::new(cpu, vmx::hypercall::STATE_VIRTUALIZED);
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

fn vmx_in_cpuid() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 5) != 0
}

/// Per-CPU preflight: controls this CPU would use, or why it can't be launched.
fn preflight_this_cpu(fake: &str) -> Result<Controls, String> {
    if launch::read_cr4() & (1 << 13) != 0 {
        return Err(String::from("CR4.VMXE is already set: another hypervisor or KVM holds VMX (unload kvm_intel first)"));
    }
    let vmx = vmx_in_cpuid();
    // Guest (normal kernel) context: the glue's rdmsr_safe, covered by the kernel's
    // exception table.
    let rd = |msr: u32| if vmx { vmx::caps::VmxHw::rdmsr_safe(&hw::KernelHw, msr) } else { None };
    if vmx {
        let fc = rd(0x3a).unwrap_or(0);
        if fc & 1 != 0 && fc & 4 == 0 {
            return Err(String::from("IA32_FEATURE_CONTROL is locked with VMXON outside SMX disabled: enable VT-x in the firmware setup"));
        }
    }
    choose_controls(&rd, vmx, fake)
}

/// Launches `cpu` (process context; the CPU must be online). On failure the block is freed.
fn launch_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let pc = alloc_percpu(cpu)?;
    // Writable alias of this CPU's GDT, for devirtualize.
    // SAFETY: the glue returns per_cpu(gdt_page, cpu), a direct-map address.
    unsafe { (*pc).ctl.tables.gdt_rw = ffi::kdbt_glue_gdt_rw(cpu) };
    let controls = st.controls;
    let mut result: Result<(), launch::LaunchError> = Ok(());
    let pc_addr = pc as usize;
    let rc = hw::run_on_cpu(cpu, || {
        // SAFETY: the block is exclusively ours until the CPU is launched.
        result = launch::launch(unsafe { &mut *(pc_addr as *mut PerCpu) }, &controls);
    });
    let err = match (rc, result) {
        (Ok(()), Ok(())) => None,
        (Err(e), _) => Some(alloc::format!("cpu{cpu}: cannot run on it (error {e})")),
        (_, Err(e)) => Some(alloc::format!("cpu{cpu}: {e}")),
    };
    if let Some(e) = err {
        free_percpu(pc);
        return Err(e);
    }
    let idx = cpu as usize;
    if st.cpus.len() <= idx {
        st.cpus.resize_with(idx + 1, || None);
    }
    st.cpus[idx] = Some(Cpu { pc });
    Ok(())
}

/// Devirtualizes `cpu` through the hypercall, then frees its block.
fn devirt_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let Some(c) = st.cpus.get_mut(cpu as usize).and_then(|c| c.take()) else {
        return Ok(());
    };
    let mut rax = 0u64;
    let rc = hw::run_on_cpu(cpu, || rax = hypercall(vmx::hypercall::Call::Devirtualize, 0));
    // SAFETY: the CPU is no longer virtualized (checked below) or never ran the call.
    let still = unsafe { (*c.pc).ctl.virtualized.load(Ordering::Acquire) };
    if rc.is_err() || rax != vmx::hypercall::OK || still {
        // Keep the block: freeing memory a virtualized CPU uses would be fatal.
        st.cpus[cpu as usize] = Some(c);
        return Err(alloc::format!("cpu{cpu}: devirtualize failed (rc {rc:?}, rax {rax:#x})"));
    }
    free_percpu(c.pc);
    Ok(())
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

/// Launch on every online CPU; all or nothing.
pub fn load() -> Result<(), String> {
    let mut guard = STATE.lock();
    if guard.is_some() {
        return Err(String::from("kdbt is already loaded"));
    }
    let _hp = hw::CpusReadGuard::lock();
    let fake = fake_missing();
    // Preflight on every CPU before touching anything.
    let mut chosen: Option<Controls> = None;
    let mut errors = String::new();
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        let mut r: Result<Controls, String> = Err(String::new());
        if let Err(e) = hw::run_on_cpu(cpu, || r = preflight_this_cpu(&fake)) {
            r = Err(alloc::format!("cannot run on it (error {e})"));
        }
        match r {
            Ok(c) if chosen.is_none_or(|x| x == c) => chosen = Some(c),
            Ok(_) => { let _ = write!(errors, "cpu{cpu}: VT-x capabilities differ from cpu0's; "); }
            Err(e) => { let _ = write!(errors, "cpu{cpu}: {e}; "); }
        }
    }
    if !errors.is_empty() {
        let msg = String::from(errors.trim_end_matches("; "));
        kwarn!("load refused: {}", msg);
        return Err(msg);
    }
    let Some(mut controls) = chosen else { return Err(String::from("no CPU online")) };
    let (pml4, pml4_pa) = host_page_tables()?;
    controls.host_cr3 = pml4_pa;
    let mut st = State { controls, host_pml4: pml4, cpus: Vec::new(), loaded_at_tsc: launch::tsc() };
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        if let Err(e) = launch_cpu(&mut st, cpu) {
            // Roll back: nothing half-done survives.
            let mut rollback = String::new();
            for done in 0..st.cpus.len() as u32 {
                if let Err(e2) = devirt_cpu(&mut st, done) {
                    let _ = write!(rollback, "; rollback: {e2}");
                }
            }
            free_host_tables(&st);
            kwarn!("load failed: {}{}", e, rollback);
            return Err(alloc::format!("{e}{rollback}"));
        }
    }
    kinfo!("virtualized {} CPUs", st.cpus.iter().flatten().count());
    *guard = Some(st);
    Ok(())
}

fn free_host_tables(st: &State) {
    // SAFETY: the page came from kdbt_glue_alloc_pages(0) and no CPU uses it any more.
    unsafe { ffi::kdbt_glue_free_pages(st.host_pml4.cast(), 0) };
}

/// Devirtualize every CPU and free everything.
pub fn unload() -> Result<(), String> {
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else {
        return Err(String::from("kdbt is not loaded"));
    };
    let _hp = hw::CpusReadGuard::lock();
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
pub fn status(mut f: impl FnMut(u32, bool, u64, &vmx::exit::ExitCtx)) -> bool {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return false };
    let _ = st.loaded_at_tsc;
    for (cpu, c) in st.cpus.iter().enumerate() {
        if let Some(c) = c {
            // SAFETY: the block stays allocated while in `cpus`. The counters are written
            // by that CPU in root mode concurrently; a torn or stale count is acceptable
            // for statistics, so we copy them with volatile reads.
            let pc = c.pc;
            let virt = unsafe { (*pc).ctl.virtualized.load(Ordering::Acquire) };
            let cycles = unsafe { (*pc).ctl.launch_cycles.load(Ordering::Relaxed) };
            let ctx = unsafe { core::ptr::read_volatile(&(*pc).ctl.exits) };
            f(cpu as u32, virt, cycles, &ctx);
        }
    }
    true
}

/// Describes the fatal VM exit recorded on the current CPU (called by the guest-side panic
/// trampoline, on the CPU that took the exit).
pub fn fatal_message(out: &mut impl Write) {
    // SAFETY: reads the current CPU number.
    let cpu = unsafe { ffi::kdbt_glue_this_cpu() };
    let Some(guard) = STATE.try_lock() else {
        let _ = write!(out, "cpu{cpu}: (state busy; see the serial console for details)");
        return;
    };
    let rec = guard
        .as_ref()
        .and_then(|st| st.cpus.get(cpu as usize))
        .and_then(|c| c.as_ref())
        // SAFETY: the block stays allocated while in `cpus`; `fatal` was written by this
        // CPU in root mode before it entered the trampoline.
        .and_then(|c| unsafe { (*c.pc).ctl.fatal });
    match rec {
        Some((kind, d)) => {
            let _ = write!(
                out,
                "cpu{cpu}: {kind:?} ({}) qualification {:#x} at RIP {:#x} GPA {:#x} GVA {:#x} CR3 {:#x}",
                vmx::exit::reason_name(d.reason),
                d.qualification,
                d.guest_rip,
                d.guest_physical,
                d.guest_linear,
                d.guest_cr3
            );
        }
        None => {
            let _ = write!(out, "cpu{cpu}: no record");
        }
    }
}
