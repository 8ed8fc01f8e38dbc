//! `kdbt start --module NAME` / `kdbt stop` / `kdbt stats` / `kdbt cov`: a loaded module's
//! code runs from the code cache on every CPU, in whatever context the kernel calls it
//! (system calls, timers in softirq context, any CPU), steered there by EPT.
//!
//! While started, the module's text pages are not executable in the guest's EPT view, and
//! every virtualized CPU has EPT-violation #VE on (its own information page, through
//! [`vmx::hypercall::Call::VeControl`]). The kernel's IDT, one page shared by every CPU and
//! mapped read-only (also in KPTI's user page tables), gets a gate 20 that leads to kdbt's
//! per-CPU #VE stub ([`dbt::ve::ve_entry_stub_gs`]) in a cache page the engine never
//! gets; the gate is written through a writable alias of that page and put back at stop.
//! So when native kernel code calls into the module (a file operation, a timer callback,
//! a return from a kernel function the module called), the fetch violates EPT, the CPU
//! delivers #VE without a VM exit, and the stub enters the dispatcher, which translates
//! the module's code on demand; the translation runs until it leaves the module, which
//! the environment declares native. Only a fetch of rip is steered: any other #VE goes
//! to the fallback (#VE off on that CPU, the access retried, so that root mode reports a
//! real violation).
//!
//! Stop: the text gets its execute right back (INVEPT on every CPU), the dispatcher
//! drains (every target is native from then on), #VE goes off and gate 20 back, every
//! link is cut, so a CPU still inside translated code leaves it at the end of its block.
//! Then the glue waits until no task can still be inside: where kernel code is not
//! preemptible (none/voluntary, Debian's default), a task leaves a CPU only through a
//! call, whose resume point is native, so a context switch on every CPU is enough; under
//! full preemption, an RCU Tasks grace period. Then an IPI to every CPU, and the engine is
//! freed.
//!
//! The text is also read-only in EPT while started: a write to it (a static key's
//! `text_poke`) invalidates its translations first ([`wprotect`]).
//!
//! A fault of a translated instruction that has an exception-table entry (an inline user
//! access) takes its fixup: such instructions run from slots kdbt's own table knows
//! ([`super::faults`]).
//!
//! `kdbt start --kernel` (experimental) does the same for the kernel's own text,
//! `[_stext, _etext)` as `/proc/kallsyms` gives it: every page of it loses its execute
//! right but the entry text's (under KPTI it runs on the user page tables, which do not
//! map the cache) and the pages of the retpoline and return thunks (kdbt's own code calls
//! them). The entry text runs a copy whose direct calls and jumps into the text (system
//! calls, interrupts, exceptions, `ret_from_fork`) enter the cache through trampolines
//! ([`super::redirect`]); what else reaches native text (a return of a task that slept
//! natively, an indirect call from entry text) lands in the dispatcher by #VE. The dispatcher
//! then never calls kernel code: it reads the text directly. Instructions the translator
//! stops at are carried out for it ([`KernelEnv`]'s `deliver`): `iretq` to kernel code
//! (`sync_core`) is emulated, a `%gs` window (`swapgs; rdgsbase; swapgs`) runs from a
//! copy. Faults take their fixups through slots, as for a module, when `kdbt start` found
//! the kernel's exception table in `/proc/kallsyms` (it is not exported). Not yet: a cache
//! reset with more than one CPU online, IDT gates and LSTAR into the cache (the entry
//! text itself stays native), modules (native).
//!
//! What this stage does not do yet (issue 10): native pcs for other faults, interrupts
//! and NMIs inside translated code (their reports show code-cache addresses).
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use dbt::{BbCov, BlockInfo, Client, Config, Engine, InsCount, Inserts};
use kdbt_abi::{DbtCovEntry, DbtCpuStats, DbtStatsQuery, DBT_CLIENT_BBCOV, DBT_CLIENT_INSCOUNT, DBT_CLIENT_NULL};
use spin::Mutex;

use super::env::{self, Handlers, KernelEnv};
use super::faults::FaultSites;
use super::oops;
use super::percpu::Blocks;
use super::pool;
use super::redirect::Redirect;
use super::steer::{gate, gate_target};
use super::wprotect::{self, WriteGuard};
use crate::hv::launch::sidt;
use crate::{ffi, hv, hw};

/// The running translation, if started (process context only: ioctls, hotplug, unload).
static SESSION: Mutex<Option<Session>> = Mutex::new(None);

/// bbcov, shared between the engine (which instruments through it) and `kdbt cov`.
struct SharedCov(*mut BbCov);

impl Client for SharedCov {
    fn instrument(&mut self, b: &BlockInfo<'_>, o: &mut Inserts) {
        // SAFETY: the BbCov outlives the engine (the session drops the engine first) and
        // is used only under the engine lock.
        unsafe { (*self.0).instrument(b, o) }
    }
}

struct Session {
    engine: Box<Engine>,
    /// Fault sites' slots (after the engine: dropped once it is gone); none for the
    /// kernel's text when `/proc/kallsyms` did not show its exception table.
    faults: Option<Box<FaultSites>>,
    /// Boxed: the write guard points at it.
    blocks: Box<Blocks>,
    cov: Option<Box<BbCov>>,
    client: u32,
    name: [u8; 64],
    /// The module's reference (null: the kernel's text).
    module: *mut core::ffi::c_void,
    text: (u64, u64),
    /// Guest-physical pages of the text whose execute right is taken away.
    pages: Vec<u64>,
    steered: bool,
    /// Write protection of the text (published while started).
    guard: Option<Box<WriteGuard>>,
    /// Kernel scope: the ranges whose pages keep their execute right (`kdbt stats`).
    native: Vec<(u64, u64)>,
    /// The kernel's entry text running a copy whose calls enter the cache (kernel scope).
    redirect: Option<Box<Redirect>>,
    /// (cpu, information page) of every possible CPU.
    info: Vec<(u32, *mut u8)>,
    /// The IDT page's writable alias and gate 20 as it was.
    idt_alias: u64,
    old_gate: [u64; 2],
    cache_bytes: u64,
    _mem: pool::Memory,
}

// SAFETY: the raw pointers are the session's own memory (information pages, the module
// reference, bbcov's map), used under SESSION's lock or by the dispatcher under the
// engine's.
unsafe impl Send for Session {}

fn kernel_cs() -> u16 {
    let cs: u16;
    // SAFETY: reads CS.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs
}

/// `f` with interrupts off on this CPU: the engine's lock is also taken by the
/// dispatcher, which an interrupt on this CPU may enter.
fn irqs_off<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: irq save/restore pair.
    let flags = unsafe { ffi::kdbt_glue_irq_save() };
    let r = f();
    // SAFETY: restores what irq_save returned.
    unsafe { ffi::kdbt_glue_irq_restore(flags) };
    r
}

/// #VE on (`info_pa` != 0) or off on every online CPU.
fn ve_everywhere(info: &[(u32, *mut u8)], on: bool) -> Result<(), String> {
    let _hp = hw::CpusReadGuard::lock();
    for &(cpu, page) in info.iter().filter(|c| hw::cpu_online(c.0)) {
        // SAFETY: a page from alloc_pages (direct map).
        let pa = if on { unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) } } else { 0 };
        let mut r = 0;
        hw::run_on_cpu(cpu, || r = hv::hypercall(vmx::hypercall::Call::VeControl, pa))
            .map_err(|e| format!("cpu{cpu}: cannot run there (errno {e})"))?;
        if r != vmx::hypercall::OK {
            return Err(format!("cpu{cpu}: root mode refused #VE {}: {r:#x}", if on { "on" } else { "off" }));
        }
    }
    Ok(())
}

/// What `kdbt start` translates.
#[derive(Clone, Copy)]
enum Scope {
    Module,
    /// The kernel's text, its entry text (native: its whole pages, and exactly) and its
    /// exception table (entries, count; 0: unknown).
    Kernel {
        text: (u64, u64),
        entry: (u64, u64),
        entry_exact: (u64, u64),
        extable: (u64, u32),
    },
}

/// The kernel's text, entry text and exception table as `kdbt start --kernel` gives
/// them (from /proc/kallsyms), checked against what the kernel itself says: a
/// page-aligned start in the kernel's image mapping with an exported function inside,
/// the entry text inside, the table after the text in whole entries.
fn kernel_scope(text: [u64; 2], entry: [u64; 2], ex: [u64; 2]) -> Result<Scope, String> {
    const IMAGE: u64 = 0xffff_ffff_8000_0000;
    let (lo, hi) = (text[0], text[1]);
    let sane = lo >= IMAGE && lo & 0xfff == 0 && lo < hi && hi - lo <= 256 << 20;
    let inside = |a: u64| (lo..hi).contains(&a);
    // SAFETY: plain getter.
    let known = unsafe { ffi::kdbt_glue_kernel_function() };
    if !sane || !inside(known) {
        return Err(format!("{lo:#x}..{hi:#x} is not the kernel's text (it holds {known:#x})"));
    }
    if !(entry[0] <= entry[1] && inside(entry[0]) && entry[1] <= hi) {
        return Err(format!("entry text {:#x}..{:#x} is not inside the kernel's text", entry[0], entry[1]));
    }
    // An exception table in the kernel's image after its text, of whole 12-byte entries.
    let n = (ex[1].wrapping_sub(ex[0])) / 12;
    let extable = if ex == [0, 0] {
        (0, 0)
    } else if ex[0] >= hi
        && ex[0] <= ex[1]
        && ex[1] - ex[0] <= 12 << 20
        && ex[0] & 3 == 0
        && (ex[1] - ex[0]).is_multiple_of(12)
    {
        (ex[0], n as u32)
    } else {
        return Err(format!("{:#x}..{:#x} is not an exception table after the kernel's text", ex[0], ex[1]));
    };
    // Whole pages: what shares a page with entry text keeps its execute right with it.
    Ok(Scope::Kernel {
        text: (lo, hi),
        entry: (entry[0] & !0xfff, entry[1].next_multiple_of(4096)),
        entry_exact: (entry[0], entry[1]),
        extable,
    })
}

/// `kdbt start`.
pub fn start(c: &kdbt_abi::DbtStart) -> Result<(), String> {
    let (name, client, flags) = (&c.module[..], c.client, c.flags);
    let known = kdbt_abi::DBT_START_TEST_NO_STEER
        | kdbt_abi::DBT_START_TEST_NO_INVALIDATE
        | kdbt_abi::DBT_START_TEST_NO_FAULT_SLOTS
        | kdbt_abi::DBT_START_TEST_NO_REDIRECT
        | kdbt_abi::DBT_START_TEST_SMALL_CACHE
        | kdbt_abi::DBT_START_TEST_NO_OOPS_MAP;
    if flags & !known != 0 {
        return Err(format!("unknown start flags {flags:#x}"));
    }
    if ![DBT_CLIENT_NULL, DBT_CLIENT_INSCOUNT, DBT_CLIENT_BBCOV].contains(&client) {
        return Err(format!("unknown client {client}"));
    }
    let len = name.iter().position(|&c| c == 0).ok_or("module name not terminated")?;
    if len == 0 {
        return Err("no module named".into());
    }
    let mod_name = core::str::from_utf8(&name[..len]).map_err(|_| "module name is not UTF-8")?;
    if mod_name == kdbt_abi::MODULE_NAME {
        return Err("kdbt cannot translate itself (its dispatcher is its own text)".into());
    }
    let scope = if mod_name == kdbt_abi::KERNEL_SCOPE {
        kernel_scope(c.kernel_text, c.entry_text, c.ex_table)?
    } else {
        Scope::Module
    };
    hv::ve_unavailable().map_err(|w| format!("kdbt start needs the hypervisor loaded with EPT and #VE: {w}"))?;
    if SESSION.lock().is_some() {
        return Err("already started (kdbt stop first)".into());
    }
    // The claim serializes starts (and self-tests); SESSION is not held while building,
    // which takes the CPU hotplug lock (a CPU coming online takes SESSION under it).
    if !env::claim() {
        return Err("the kernel DBT's code cache is in use (a self-test is running)".into());
    }
    dbt::warm_up();
    pool::set_enabled(true);
    let bytes = if matches!(scope, Scope::Kernel { .. }) { pool::KERNEL_POOL_BYTES } else { pool::POOL_BYTES };
    let r = pool::Memory::take(bytes)
        .map_err(String::from)
        .and_then(|mem| build(scope, mod_name, name, client, flags, mem));
    match r {
        Ok(s) => {
            kinfo!(
                "dbt: started: {mod_name} text {:#x}+{:#x} ({} pages not executable) runs from the code cache",
                s.text.0,
                s.text.1 - s.text.0,
                s.pages.len()
            );
            if flags & kdbt_abi::DBT_START_TEST_NO_OOPS_MAP == 0 {
                oops::publish(s.engine.pc_index());
            }
            *SESSION.lock() = Some(s);
            Ok(())
        }
        Err(e) => {
            pool::drain_deferred();
            env::release();
            Err(e)
        }
    }
}

fn build(
    scope: Scope,
    mod_name: &str,
    name: &[u8],
    client: u32,
    flags: u32,
    mem: pool::Memory,
) -> Result<Session, String> {
    let (mut base, mut size) = (0u64, 0u64);
    let mut module = core::ptr::null_mut();
    if let Scope::Kernel { text, .. } = scope {
        (base, size) = (text.0, text.1 - text.0);
    } else {
        let cname: Vec<u8> = mod_name.bytes().chain(core::iter::once(0)).collect();
        // SAFETY: a 0-terminated name and two out-pointers; the reference is put in Drop
        // (or below on failure).
        module = unsafe { ffi::kdbt_glue_module_get(cname.as_ptr().cast(), &mut base, &mut size) };
        if module.is_null() {
            return Err(format!("no live module {mod_name} (see /proc/modules)"));
        }
    }
    let put = || {
        if !module.is_null() {
            // SAFETY: the reference just taken.
            unsafe { ffi::kdbt_glue_module_put(module) };
        }
    };
    let mut kenv = match KernelEnv::new() {
        Ok(k) => k,
        Err(e) => {
            put();
            return Err(e.into());
        }
    };
    // Pages that keep their execute right (kernel: the entry text, and the pages of the
    // thunks kdbt's own code and the entry text call).
    let mut native: Vec<(u64, u64)> = Vec::new();
    let mut faults = None;
    let no_slots = flags & kdbt_abi::DBT_START_TEST_NO_FAULT_SLOTS != 0;
    if let Scope::Kernel { text, entry, extable, .. } = scope {
        if extable.0 != 0 {
            let mut f = match FaultSites::of_kernel(extable.0, extable.1, kenv.fault_area(), no_slots) {
                Ok(f) => Box::new(f),
                Err(e) => return Err(e.into()),
            };
            kenv.set_faults(&mut *f);
            faults = Some(f);
        }
        if native.try_reserve(kenv.thunks() + 1).is_err() {
            return Err("out of memory".into());
        }
        native.push(entry);
        for t in kenv.thunk_addrs() {
            let p = t & !0xfff;
            if !native.iter().any(|r| (r.0..r.1).contains(&p)) {
                native.push((p, p + 4096));
            }
        }
        kenv.set_kernel_scope(text.0, text.1, native.clone());
    } else {
        kenv.set_scope(base, base + size);
        let mut f = match FaultSites::new(module, kenv.fault_area(), no_slots) {
            Ok(f) => Box::new(f),
            Err(e) => {
                put();
                return Err(e.into());
            }
        };
        kenv.set_faults(&mut *f);
        faults = Some(f);
    }
    // The kernel's #UD and #BP handlers, for exceptions of the module's translated code.
    let idt = sidt().base;
    // SAFETY: gates 3 and 6 of the live IDT (read-only here; the kernel never changes them).
    let g = |v: u64| unsafe {
        [((idt + v * 16) as *const u64).read_volatile(), ((idt + v * 16 + 8) as *const u64).read_volatile()]
    };
    // A gate with an IST stack is not delivered on the interrupted stack (0: not delivered).
    let target = |g: [u64; 2]| if (g[0] >> 32) & 7 == 0 { gate_target(g) } else { 0 };
    kenv.set_handlers(Handlers { invalid_op: target(g(6)), breakpoint: target(g(3)), cs: kernel_cs() });
    let (sx, sw) = kenv.steer_pages();
    // The #VE lookup routine's place (written below, before anything runs translated).
    kenv.set_lookup(sx + 4096 + 1024);
    let cache_bytes = kenv.cache().1;
    let blocks = match Blocks::new().map(Box::new) {
        Ok(b) => b,
        Err(e) => {
            put();
            return Err(e.into());
        }
    };
    let gs = blocks.gs_offset().ok_or("per-CPU offset out of reach");
    // The kernel's text needs megabytes of translations; a module, a few KB.
    let hot = if module.is_null() { 5 << 20 } else { 512 << 10 };
    let cfg = Config {
        kernel: true,
        // SAFETY: plain getter.
        ibt: unsafe { ffi::kdbt_glue_kernel_ibt() },
        gs_base: *gs.as_ref().unwrap_or(&0),
        hot_size: hot,
        stub_size: hot / 2,
        // A reset leaves a quarter of the cache to translate into while the space it
        // invalidated waits for every CPU's quiescent point (the reclaim tick's pass).
        max_hot_bytes: if flags & kdbt_abi::DBT_START_TEST_SMALL_CACHE != 0 { hot / 5 } else { hot - hot / 4 },
        // Calls out of the module, and returns into the kernel, leave the cache through
        // linked fragments and lookup hits, not a dispatch each.
        native_fragments: true,
        // Fault-site slots continue at the native pc (a #VE while started), so a task
        // asleep in a fault at one never needs its fragment (see `faults`).
        fault_slot_native_return: true,
        ..Config::default()
    };
    let mut cov = None;
    let cl: Option<Box<dyn Client>> = match client {
        DBT_CLIENT_INSCOUNT => Some(Box::new(InsCount)),
        DBT_CLIENT_BBCOV => {
            let mut c = Box::new(BbCov::new());
            let p: *mut BbCov = &mut *c;
            cov = Some(c);
            Some(Box::new(SharedCov(p)))
        }
        _ => None,
    };
    let in_pool = blocks.pool_scope();
    let e = gs.and_then(|_| Engine::new(Box::new(kenv), cl, cfg).map(Box::new)).map_err(String::from);
    drop(in_pool);
    let engine = match e {
        Ok(e) => e,
        Err(e) => {
            put();
            return Err(e);
        }
    };
    // From here on, dropping the session undoes whatever was done.
    let mut s = Session {
        engine,
        faults,
        blocks,
        cov,
        client,
        name: [0; 64],
        module,
        text: (base, base + size),
        pages: Vec::new(),
        steered: false,
        guard: None,
        native: Vec::new(),
        redirect: None,
        info: Vec::new(),
        idt_alias: 0,
        old_gate: [0; 2],
        cache_bytes,
        _mem: mem,
    };
    s.blocks.attach(&mut s.engine);
    let gs = cfg.gs_base;
    let n = name.len().min(63);
    s.name[..n].copy_from_slice(&name[..n]);
    // Text pages (all of them for the write guard, which indexes them from the first;
    // those not native lose their execute right), and an information page per CPU.
    let mut all = Vec::new();
    for p in (base & !0xfff..base + size).step_by(4096) {
        let pa = if module.is_null() {
            // SAFETY: a page of the kernel's text (checked in `kernel_scope`).
            unsafe { ffi::kdbt_glue_kernel_text_to_phys(p) }
        } else {
            // SAFETY: module text (vmalloc'd module space), held by our reference.
            unsafe { ffi::kdbt_glue_vmalloc_to_phys(p as *const _) }
        };
        if pa == 0 {
            return Err(format!("{mod_name}: text page {p:#x} has no physical page"));
        }
        all.try_reserve(1).map_err(|_| "out of memory")?;
        all.push(pa & !0xfff);
        if !native.iter().any(|r| (r.0..r.1).contains(&p)) {
            s.pages.try_reserve(1).map_err(|_| "out of memory")?;
            s.pages.push(pa & !0xfff);
        }
    }
    for (cpu, blk) in (0..hw::cpu_ids()).filter_map(|c| s.blocks.of_cpu(c).map(|b| (c, b))) {
        // SAFETY: one zeroed page (a zero busy word: the CPU may deliver); freed in Drop.
        let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u8;
        if page.is_null() || s.info.try_reserve(1).is_err() {
            if !page.is_null() {
                // SAFETY: just allocated.
                unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
            }
            return Err("out of memory".into());
        }
        s.info.push((cpu, page));
        // SAFETY: this CPU's block; nothing runs translated code yet.
        unsafe { (*blk).ve_info = page as u64 };
    }
    // The #VE stub (+0), its lookup (+1024: a pc steered before is found in the lookup
    // table, no dispatch) and its fallback (+2048), in the second steering page.
    let (stub_x, stub_w) = (sx + 4096, sw + 4096);
    let (lookup_x, fallback_x) = (stub_x + 1024, stub_x + 2048);
    let fallback = dbt::ve::ve_fallback_stub(fallback_x, vmx::hypercall::Call::VeControl.rax(), 0)
        .map_err(|e| format!("assembling the #VE fallback: {e}"))?;
    let lookup = dbt::ve::ve_lookup(lookup_x, env::table_addr())
        .ok_or("the lookup table is out of disp32 reach")?
        .map_err(|e| format!("assembling the #VE lookup: {e}"))?;
    let via_table = s.engine.cfg.inline_lookup.then_some(lookup_x);
    let on_write = wprotect::kdbt_rs_ve_write as *const () as u64;
    let stub = dbt::ve::ve_entry_stub_gs(stub_x, gs, via_table, Some(on_write), fallback_x)
        .map_err(|e| format!("assembling the #VE stub: {e}"))?;
    if stub.len() > 1024 || lookup.len() > 1024 || fallback.len() > 2048 {
        return Err("#VE stub larger than its page".into());
    }
    // SAFETY: the writable alias of the steering page the engine never gets.
    unsafe {
        core::ptr::copy_nonoverlapping(stub.as_ptr(), stub_w as *mut u8, stub.len());
        core::ptr::copy_nonoverlapping(lookup.as_ptr(), (stub_w + 1024) as *mut u8, lookup.len());
        core::ptr::copy_nonoverlapping(fallback.as_ptr(), (stub_w + 2048) as *mut u8, fallback.len());
    }
    // Gate 20 of the IDT every CPU uses.
    let idt = sidt();
    let (idt_base, idt_limit) = (idt.base, idt.limit);
    let mut same = true;
    {
        let _hp = hw::CpusReadGuard::lock();
        for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
            let mut b = 0;
            hw::run_on_cpu(cpu, || b = sidt().base).map_err(|e| format!("cpu{cpu}: errno {e}"))?;
            same &= b == idt_base;
        }
    }
    if !same || idt_limit < 20 * 16 + 15 || idt_base & 0xfff != 0 {
        return Err(format!("the CPUs do not share one page-aligned IDT (base {idt_base:#x}, limit {idt_limit:#x})"));
    }
    // SAFETY: process context; undone in Drop.
    s.idt_alias = unsafe { ffi::kdbt_glue_page_alias(idt_base) };
    if s.idt_alias == 0 {
        return Err(format!("cannot map a writable alias of the IDT at {idt_base:#x}"));
    }
    let g = (s.idt_alias + 20 * 16) as *mut u64;
    // SAFETY: gate 20 in the alias of the IDT page (16 bytes; no #VE is on yet, so no
    // CPU reads it meanwhile).
    unsafe {
        s.old_gate = [g.read_volatile(), g.add(1).read_volatile()];
        let new = gate(stub_x, kernel_cs());
        g.add(1).write_volatile(new[1]);
        g.write_volatile(new[0]);
    }
    ve_everywhere(&s.info, true)?;
    if flags & kdbt_abi::DBT_START_TEST_NO_STEER == 0 {
        let invalidate = flags & kdbt_abi::DBT_START_TEST_NO_INVALIDATE == 0;
        let ep: *mut Engine = &mut *s.engine;
        let g = WriteGuard::new(&all, base & !0xfff, ep, &*s.blocks, invalidate)?;
        g.publish();
        s.guard = Some(g);
        // Not executable (steering) and not writable (write invalidation).
        hv::set_pages_perms(&s.pages, ::ept::Perms::R)
            .map_err(|e| format!("{mod_name}: text not executable and read-only: {e}"))?;
        s.steered = true;
        // The entry text's calls into the text, through trampolines in the first steering
        // page (which a session does not use otherwise) into the lookup.
        let redirect = flags & kdbt_abi::DBT_START_TEST_NO_REDIRECT == 0;
        if let (true, Scope::Kernel { text, entry, entry_exact, .. }) = (redirect, scope) {
            let translated = |t: u64| (text.0..text.1).contains(&t) && !native.iter().any(|r| (r.0..r.1).contains(&t));
            let r = Redirect::build(entry, entry_exact, translated, (sx, sw, 4096), lookup_x)?;
            let r = s.redirect.insert(Box::new(r));
            r.map().map_err(|e| format!("entry text: running its copy: {e}"))?;
        }
    }
    s.native = native;
    Ok(s)
}

impl Drop for Session {
    /// Stop (see the module comment); each step runs even if an earlier one failed, and
    /// failures are logged.
    fn drop(&mut self) {
        // Before anything the notifier reads goes away.
        oops::retract();
        if let Some(g) = &self.guard {
            // No re-protection after this (the text's rights are restored next).
            g.retire();
        }
        if self.steered {
            if let Err(e) = hv::set_pages_perms(&self.pages, ::ept::Perms::RWX) {
                kerr!("dbt stop: the module's text stays not executable: {e}");
            }
        }
        if let Some(mut r) = self.redirect.take() {
            if let Err(e) = r.unmap() {
                kerr!("dbt stop: the entry text keeps running its copy (kept, not freed): {e}");
                Box::leak(r);
            }
        }
        if self.guard.is_some() {
            wprotect::unpublish();
        }
        env::set_draining(true);
        if let Err(e) = ve_everywhere(&self.info, false) {
            kerr!("dbt stop: {e}");
        }
        // Every CPU has taken an interrupt since the guard was unpublished: no #VE write
        // handler runs with it, and what one queued last finds no guard.
        wprotect::flush();
        if self.idt_alias != 0 {
            let g = (self.idt_alias + 20 * 16) as *mut u64;
            // SAFETY: the alias of the IDT page; #VE is off on every CPU.
            unsafe {
                g.write_volatile(self.old_gate[0]);
                g.add(1).write_volatile(self.old_gate[1]);
                ffi::kdbt_glue_cache_unalias(self.idt_alias);
            }
        }
        let ep: *mut Engine = &mut *self.engine;
        // SAFETY: the live engine; its lock is taken with interrupts off.
        irqs_off(|| unsafe { Engine::locked(ep, |e| e.invalidate_all()) });
        // SAFETY: process context.
        unsafe { ffi::kdbt_glue_sync_tasks() };
        let _hp = hw::CpusReadGuard::lock();
        for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
            let _ = hw::run_on_cpu(cpu, || {});
        }
        for &(_, page) in &self.info {
            // SAFETY: our pages; #VE is off everywhere.
            unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
        }
        if !self.module.is_null() {
            // SAFETY: the reference taken at start.
            unsafe { ffi::kdbt_glue_module_put(self.module) };
        }
    }
}

/// `kdbt stop`.
pub fn stop() -> Result<String, String> {
    let s = SESSION.lock().take().ok_or("not started")?;
    let st = s.engine.stats;
    let name = String::from(kdbt_abi::fixed_str_read(&s.name));
    drop(s);
    pool::drain_deferred();
    env::set_draining(false);
    env::release();
    kinfo!(
        "dbt: stopped ({name}: {} blocks, {} dispatches, {} exceptions delivered)",
        st.blocks,
        st.dispatches,
        st.delivered
    );
    Ok(format!(
        "stopped: {name} runs natively again ({} blocks were translated, {} dispatches, {} exceptions delivered)",
        st.blocks, st.dispatches, st.delivered
    ))
}

/// Stops if started (before `unload` devirtualizes).
pub fn stop_if_started() {
    if SESSION.lock().is_some() {
        match stop() {
            Ok(m) => kinfo!("dbt: {m}"),
            Err(e) => kerr!("dbt: {e}"),
        }
    }
}

/// A CPU came online (and was virtualized) while started: #VE on there too.
pub fn cpu_online(cpu: u32) {
    let guard = SESSION.lock();
    let Some(s) = guard.as_ref() else { return };
    let Some(&(_, page)) = s.info.iter().find(|c| c.0 == cpu) else { return };
    s.blocks.set_online(cpu);
    // SAFETY: a page from alloc_pages.
    let pa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    let r = if hw::this_cpu() == cpu {
        hv::hypercall(vmx::hypercall::Call::VeControl, pa)
    } else {
        let mut r = 0;
        let _ = hw::run_on_cpu(cpu, || r = hv::hypercall(vmx::hypercall::Call::VeControl, pa));
        r
    };
    if r != vmx::hypercall::OK {
        kerr!("dbt: cpu{cpu} came online without #VE ({r:#x}): the module's code would fault there");
    }
}

/// `kdbt stats`: the figures, and per CPU into `out`.
pub fn stats(q: &mut DbtStatsQuery, out: &mut Vec<DbtCpuStats>) -> Result<(), &'static str> {
    let guard = SESSION.lock();
    let Some(s) = guard.as_ref() else {
        q.active = 0;
        return Ok(());
    };
    q.active = 1;
    q.client = s.client;
    q.module = s.name;
    (q.text_base, q.text_size) = (s.text.0, s.text.1 - s.text.0);
    let ep = &*s.engine as *const Engine as *mut Engine;
    // SAFETY: the live engine, its lock taken with interrupts off.
    let (st, pending) = irqs_off(|| unsafe { Engine::locked(ep, |e| (e.stats, e.pending_count())) });
    q.blocks = st.blocks;
    q.guest_insns = st.guest_insns;
    q.dispatches = st.dispatches;
    q.links = st.links;
    q.misses = st.misses;
    q.invalidations = st.invalidations;
    (q.invalidated_blocks, q.pending_blocks, q.resets) = (st.invalidated_blocks, pending as u64, st.resets);
    q.code_bytes = st.hot_bytes + st.stub_bytes;
    q.cache_bytes = s.cache_bytes;
    let ps = pool::stats();
    (q.pool_peak, q.pool_size) = (ps.peak as u64, ps.size as u64);
    let wc = s.guard.as_ref().map(|g| g.counts()).unwrap_or_default();
    (q.write_faults, q.reprotects, q.writable_pages) = (wc.writes, wc.reprotects, wc.writable);
    q.quiesce_passes = wc.quiesce_passes;
    q.native_count = s.native.len() as u64;
    for (slot, r) in q.native.iter_mut().zip(&s.native) {
        *slot = [r.0, r.1];
    }
    if let Some(r) = &s.redirect {
        (q.entry_sites, q.entry_targets) = (r.sites, r.targets);
        q.entry_reverted = r.writes.load(core::sync::atomic::Ordering::Relaxed);
    }
    // Read under the engine's lock (the translator updates them there).
    if let Some(f) = &s.faults {
        let fp: *const FaultSites = &**f;
        // SAFETY: the session's fault sites, read under the engine's lock.
        let (ft, fs, fa, fu) = irqs_off(|| unsafe {
            Engine::locked(ep, |_| ((*fp).sites() as u64, (*fp).placed as u64, (*fp).again, (*fp).unplaced))
        });
        (q.fault_table, q.fault_slots, q.fault_slots_again, q.fault_unplaced) = (ft, fs, fa, fu);
    }
    for cpu in 0..hw::cpu_ids() {
        let Some(b) = s.blocks.of_cpu(cpu) else { continue };
        out.try_reserve(1).map_err(|_| "out of memory")?;
        // SAFETY: a live block; the dispatcher may be updating its counters (a racy read
        // gives a slightly stale figure).
        let (ve, disp, insns, why, at) = unsafe {
            let b = &*b;
            let insns = if s.client == DBT_CLIENT_INSCOUNT { InsCount::total(b) } else { 0 };
            (b.ve_count, b.dispatches, insns, b.exit_reason, b.exit_pc)
        };
        out.push(DbtCpuStats {
            cpu,
            online: hw::cpu_online(cpu) as u32,
            steered: ve,
            dispatches: disp,
            insns,
            last_exit_reason: why,
            last_exit_pc: at,
        });
    }
    Ok(())
}

/// `kdbt cov`: bbcov's executed blocks.
pub fn cov(out: &mut Vec<DbtCovEntry>) -> Result<(), &'static str> {
    let guard = SESSION.lock();
    let s = guard.as_ref().ok_or("not started")?;
    let cov = s.cov.as_ref().ok_or("started without --client bbcov")?;
    let ep = &*s.engine as *const Engine as *mut Engine;
    let p: *const BbCov = &**cov;
    // The map is read under the engine lock (the dispatcher adds to it there); the result
    // is copied out with interrupts on (allocation in process context).
    let hits = irqs_off(|| {
        // SAFETY: the live engine and its bbcov, read under the engine's lock; `hits`
        // allocates: in dispatcher mode (interrupts off), from the pool.
        let scope = s.blocks.pool_scope();
        let h = unsafe { Engine::locked(ep, |_| (*p).blocks()) };
        drop(scope);
        h
    });
    out.try_reserve(hits.len()).map_err(|_| "out of memory")?;
    out.extend(hits.iter().map(|b| DbtCovEntry { pc: b.start, hits: b.hits, len: b.len, reserved: 0 }));
    Ok(())
}
