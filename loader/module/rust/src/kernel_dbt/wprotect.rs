//! Write protection of the translated text while started: its pages are read-only (and
//! not executable) in the guest's EPT view, so a write to them through any virtual
//! alias (`text_poke` through its temporary mm for a static key, alternatives, ftrace,
//! kprobes) violates EPT, and the CPU delivers #VE (no VM exit) to the per-CPU stub,
//! which calls [`kdbt_rs_ve_write`] on the writer's stack before the write completes:
//!
//! 1. the translations of the written page are invalidated (the engine's lock, taken
//!    with interrupts off; the writer cannot be this CPU's dispatcher, which never writes
//!    kernel text);
//! 2. root mode makes the page readable, writable and executable (a permission raise:
//!    INVEPT on this CPU only; another CPU's stale translation gives it a spurious #VE,
//!    which comes here and is let through the same way);
//! 3. the write is retried and completes; the page runs natively (its code is the one
//!    just written, so a patching protocol such as `text_poke_bp`'s int3 sees its own
//!    bytes) until
//! 4. a work item (queued through an irq_work, which is safe from the #VE's context)
//!    makes it read-only and not executable again on every CPU (INVEPT round), then
//!    invalidates the page's translations a second time: a CPU that steered into it
//!    through a stale EPT translation meanwhile may have translated bytes in the middle
//!    of a patch. The next execution retranslates from the new bytes.
//! 5. the same work then runs a quiescence pass: a work item on every online CPU, each
//!    a quiescent point of its CPU ([`quiesce_here`]), so that the space of the
//!    invalidated translations is reused soon, not when each CPU next dispatches outside
//!    an interrupt handler (an idle CPU may not for long).
//!
//! So a page written often costs a #VE and a re-protection per burst of writes (a
//! burst: until the work runs). A write to a page that is not translated text goes to
//! the stub's fallback (root mode's diagnostic).
//!
//! `kdbt start --test-no-invalidate` skips steps 1 and 4's invalidation: a patched
//! function keeps running its old translation, which the suite's static-key check must
//! catch.
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use dbt::Engine;
use vmx::hypercall::{Call, ERR_BUSY, OK};

use super::percpu::Blocks;
use crate::{ffi, hv, hw};

/// The running session's guard, read by the #VE write handler (interrupts off) and the
/// re-protection work; null when not started.
static GUARD: AtomicPtr<WriteGuard> = AtomicPtr::new(core::ptr::null_mut());
/// Held by the re-protection work around its check of `retired` and its changes, and by
/// [`WriteGuard::retire`]: once that returns, no re-protection can follow the session's
/// restoring of the text's rights.
static REPROTECT: spin::Mutex<()> = spin::Mutex::new(());

pub struct WriteGuard {
    /// Guest-physical page of each text page, the first at virtual `va0`.
    pages: Vec<u64>,
    va0: u64,
    /// Written and not yet re-protected.
    dirty: Vec<AtomicBool>,
    engine: *mut Engine,
    blocks: *const Blocks,
    invalidate: bool,
    /// Stopping: no more re-protection.
    retired: AtomicBool,
    writes: AtomicU64,
    reprotects: AtomicU64,
    writable: AtomicU64,
    /// Quiescence passes run by the reclaim tick.
    ticks: AtomicU64,
}

// SAFETY: the engine and blocks outlive the guard (the session unpublishes it and waits
// for its users before dropping either); the engine is used only under its lock.
unsafe impl Sync for WriteGuard {}
// SAFETY: as above.
unsafe impl Send for WriteGuard {}

/// What `kdbt stats` shows of the guard.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    pub writes: u64,
    pub reprotects: u64,
    pub writable: u64,
    pub quiesce_passes: u64,
}

impl WriteGuard {
    /// A guard for text pages `pages` (guest-physical, the first at virtual `va0`),
    /// translated by `engine` with per-CPU blocks `blocks`, both of which must outlive it.
    pub fn new(
        pages: &[u64],
        va0: u64,
        engine: *mut Engine,
        blocks: *const Blocks,
        invalidate: bool,
    ) -> Result<Box<WriteGuard>, &'static str> {
        let mut p = Vec::new();
        p.try_reserve_exact(pages.len()).map_err(|_| "out of memory")?;
        p.extend_from_slice(pages);
        let mut dirty = Vec::new();
        dirty.try_reserve_exact(pages.len()).map_err(|_| "out of memory")?;
        dirty.extend(pages.iter().map(|_| AtomicBool::new(false)));
        Ok(Box::new(WriteGuard {
            pages: p,
            va0,
            dirty,
            engine,
            blocks,
            invalidate,
            retired: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            reprotects: AtomicU64::new(0),
            writable: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        }))
    }

    /// Makes the guard the one the #VE write handler uses (before the text is made
    /// read-only).
    pub fn publish(&self) {
        GUARD.store(self as *const WriteGuard as *mut WriteGuard, Ordering::Release);
        // SAFETY: process context.
        unsafe { ffi::kdbt_glue_reclaim_tick(true) };
    }

    /// No re-protection from now on (process context; waits for one in progress). Writes
    /// are still let through, so the session restores the text's rights next and only
    /// then unpublishes the guard: a write meanwhile (a stale EPT translation too) is
    /// handled, never fatal.
    pub fn retire(&self) {
        let _l = REPROTECT.lock();
        self.retired.store(true, Ordering::Release);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            writes: self.writes.load(Ordering::Relaxed),
            reprotects: self.reprotects.load(Ordering::Relaxed),
            writable: self.writable.load(Ordering::Relaxed),
            quiesce_passes: self.ticks.load(Ordering::Relaxed),
        }
    }

    /// Invalidates the translations of text page `i` (interrupts off, dispatcher mode:
    /// what the engine frees or allocates goes through its pool).
    fn invalidate_page(&self, i: usize) {
        if !self.invalidate {
            return;
        }
        let va = self.va0 + (i as u64) * 4096;
        // SAFETY: the blocks outlive the guard (see `new`).
        let blocks = unsafe { &*self.blocks };
        let scope = blocks.pool_scope();
        // SAFETY: the live engine (see `new`), its lock taken with interrupts off (the
        // scope keeps them off).
        unsafe { Engine::locked(self.engine, |e| e.invalidate(va, va + 4096)) };
        drop(scope);
    }
}

/// No guard from now on; waits for a re-protection in progress (process context). A
/// #VE handler may still be running on another CPU with the old guard until every CPU
/// has taken an interrupt (the session switches #VE off on each CPU next).
pub fn unpublish() {
    GUARD.store(core::ptr::null_mut(), Ordering::Release);
    // SAFETY: process context; a tick running now finds no guard and stops.
    unsafe { ffi::kdbt_glue_reclaim_tick(false) };
    flush();
}

/// Waits until no re-protection work is queued or running (process context).
pub fn flush() {
    // SAFETY: process context.
    unsafe { ffi::kdbt_glue_wp_flush() };
}

/// A root-mode EPT call, retried while another CPU is changing the tables.
fn ept_call(call: Call, arg: u64) -> u64 {
    let mut r = ERR_BUSY;
    for _ in 0..100_000 {
        r = hv::hypercall(call, arg);
        if r != ERR_BUSY {
            break;
        }
        core::hint::spin_loop();
    }
    r
}

/// The #VE stub's write handler (`dbt::ve::ve_entry_stub_gs`): a write of guest-physical
/// `gpa` violated EPT. 0: the page's translations are gone and the page is writable on
/// this CPU, or it was an entry page running its copy, now mapped back
/// ([`super::redirect::revert_on_write`]): the write is retried; 1: not translated text,
/// or root mode refused (the stub's fallback then lets root mode report the violation).
#[no_mangle]
pub extern "C" fn kdbt_rs_ve_write(gpa: u64, _gla: u64) -> u64 {
    // An entry page running its copy goes back to the kernel's own page first.
    if super::redirect::revert_on_write(gpa) {
        return 0;
    }
    let g = GUARD.load(Ordering::Acquire);
    if g.is_null() {
        return 1;
    }
    // SAFETY: a published guard stays alive until every CPU has left this handler (the
    // session unpublishes it, then interrupts every CPU, then frees it).
    let g = unsafe { &*g };
    let Some(i) = g.pages.iter().position(|&p| p == gpa & !0xfff) else { return 1 };
    g.invalidate_page(i);
    let r = ept_call(Call::EptSetPerms, (gpa & !0xfff) | ::ept::Perms::RWX.bits() as u64);
    if r & (1 << 63) != 0 {
        return 1;
    }
    if hv::hypercall(Call::EptInvalidate, 0) != OK {
        return 1;
    }
    g.writes.fetch_add(1, Ordering::Relaxed);
    if !g.dirty[i].swap(true, Ordering::AcqRel) {
        g.writable.fetch_add(1, Ordering::Relaxed);
    }
    // Always, not only when the page was clean: a re-protection that took the page's
    // mark before this write's RWX may overwrite it with its R (the write then faults
    // again, comes here) or not (the page stays writable, and only a later run sees the
    // mark). An irq_work already queued is not queued twice; one queued while the work
    // runs queues it again.
    // SAFETY: irq_work_queue, safe in any context.
    unsafe { ffi::kdbt_glue_wp_kick() };
    0
}

/// [`dbt::Env::native_now`] (the dispatcher, interrupts off): whether text at `pc` is in
/// a page written and not yet re-protected. Such a page is writable and executable in
/// EPT, but this CPU may still hold its old, not executable, EPT translation (only the
/// writer's CPU ran INVEPT), so a native run would come straight back by #VE: INVEPT
/// here first. Without this, a CPU steered into the page mid-patch translated the
/// `int3` of `text_poke_bp`, whose stop then found the patch done and left to the native
/// pc, was steered back, and so on, with interrupts off (in `__schedule`), while the
/// writer waited for it in `text_poke_sync`. Not for a pc in the last 15 bytes of the
/// page when the next page is not written too (an instruction there may straddle into
/// it): that one is translated (from the page's bytes now; the re-protection
/// invalidates it again).
pub fn native_now(pc: u64) -> bool {
    let g = GUARD.load(Ordering::Acquire);
    if g.is_null() {
        return false;
    }
    // SAFETY: as in `kdbt_rs_ve_write`: a published guard outlives every dispatcher
    // that may still read it.
    let g = unsafe { &*g };
    let Some(i) = pc.checked_sub(g.va0).map(|o| (o / 4096) as usize) else { return false };
    let dirty = |i: usize| g.dirty.get(i).is_some_and(|d| d.load(Ordering::Acquire));
    if !dirty(i) {
        return false;
    }
    // An instruction that may straddle into the next page cannot run natively unless
    // that page is executable too: its fetch would be steered back here, for ever.
    if pc & 0xfff > 0x1000 - 16 && !dirty(i + 1) {
        return false;
    }
    hv::hypercall(Call::EptInvalidate, 0) == OK
}

/// The re-protection work (process context, from the glue's work item): every written
/// page read-only and not executable again, then its translations invalidated; then a
/// quiescence pass, so that the space of what was invalidated (now and by the writes)
/// can be reused: a CPU that only runs linked code, or only dispatches in interrupt
/// handlers, would otherwise hold it back indefinitely.
pub fn reprotect() {
    let g = GUARD.load(Ordering::Acquire);
    if g.is_null() {
        return;
    }
    // SAFETY: the session unpublishes the guard and flushes this work before freeing it.
    let g = unsafe { &*g };
    // Outside the lock: the pass sleeps, and the session's `retire` spins on the lock.
    if reprotect_written(g) && g.invalidate {
        // SAFETY: process context.
        unsafe { ffi::kdbt_glue_dbt_quiesce_cpus() };
    }
}

/// One of the glue's quiescence work items, on its CPU (task context between other tasks:
/// nothing translated lies interrupted beneath it where kernel code is not preemptible;
/// the glue runs none under full preemption): the CPU counts as having left every
/// fragment, and what that frees is reclaimed.
pub fn quiesce_here() {
    let g = GUARD.load(Ordering::Acquire);
    if g.is_null() {
        return;
    }
    // SAFETY: as in `reprotect`: the pass runs inside that work, which the session
    // flushes before freeing the guard.
    let g = unsafe { &*g };
    // SAFETY: the blocks outlive the guard (see `WriteGuard::new`).
    let blocks = unsafe { &*g.blocks };
    let scope = blocks.pool_scope();
    if let Some(s) = blocks.of_cpu(hw::this_cpu()) {
        // SAFETY: the live engine, its lock taken with interrupts off (the scope keeps
        // them off, so this is still the CPU of `s`), at this CPU's quiescent point.
        unsafe { Engine::locked(g.engine, |e| e.note_quiescent(s)) };
    }
    drop(scope);
}

/// The reclaim tick (the glue's delayed work while a guard is published): when
/// invalidated translations wait for quiescence, a quiescence pass. Otherwise their space
/// waits for each CPU's next dispatch at a quiescent point or for the next text write's
/// pass; a CPU that only dispatches in interrupt handlers or with interrupts off (an idle
/// one) could hold a reset's space back until the rest of the cache is used up, and a
/// full cache stops every CPU that needs a new translation. Rarely needed: in the suite's
/// reset runs a dispatch at base level came first all but once. Milliseconds to the next
/// tick: [`TICK_BUSY_MS`] after a pass, else [`TICK_IDLE_MS`]; 0 once the guard is gone.
pub fn reclaim_tick() -> u32 {
    let g = GUARD.load(Ordering::Acquire);
    if g.is_null() {
        return 0;
    }
    // SAFETY: the session cancels this work (waiting for it) when it unpublishes the
    // guard, before freeing it.
    let g = unsafe { &*g };
    if !g.invalidate || g.retired.load(Ordering::Acquire) {
        return TICK_IDLE_MS;
    }
    // SAFETY: the blocks outlive the guard (see `WriteGuard::new`).
    let blocks = unsafe { &*g.blocks };
    let scope = blocks.pool_scope();
    // SAFETY: the live engine, its lock taken with interrupts off (the scope keeps them
    // off).
    let pending = unsafe { Engine::locked(g.engine, |e| e.pending_count()) };
    drop(scope);
    if pending == 0 {
        return TICK_IDLE_MS;
    }
    g.ticks.fetch_add(1, Ordering::Relaxed);
    // SAFETY: process context (the glue's work).
    unsafe { ffi::kdbt_glue_dbt_quiesce_cpus() };
    TICK_BUSY_MS
}

/// The reclaim tick's period while nothing waits. Each tick costs a few #VEs (kdbt's own
/// code runs natively, and its calls into the kernel's text and the work's return into
/// it are steered) and the timer and workqueue's kernel work: every 10 ms that was 632
/// #VEs and 10 more counted instructions per getppid in suite dbt-kernel's inscount
/// check on the small kernel.
const TICK_IDLE_MS: u32 = 1000;
/// The period while a pass freed something late: a reset's space comes back within
/// milliseconds, long before the rest of the cache is used.
const TICK_BUSY_MS: u32 = 10;

/// [`reprotect`]'s part under the lock; whether any page was re-protected.
fn reprotect_written(g: &WriteGuard) -> bool {
    let _l = REPROTECT.lock();
    if g.retired.load(Ordering::Acquire) {
        return false;
    }
    let (mut idx, mut gpas) = (Vec::new(), Vec::new());
    if idx.try_reserve_exact(g.pages.len()).is_err() || gpas.try_reserve_exact(g.pages.len()).is_err() {
        kerr!("dbt: out of memory: written text pages stay writable and native");
        return false;
    }
    for (i, d) in g.dirty.iter().enumerate() {
        if d.swap(false, Ordering::AcqRel) {
            idx.push(i);
            gpas.push(g.pages[i]);
        }
    }
    if idx.is_empty() {
        return false;
    }
    if let Err(e) = hv::set_pages_perms(&gpas, ::ept::Perms::R) {
        kerr!("dbt: {} written text page(s) stay writable and native: {e}", idx.len());
        for &i in &idx {
            g.dirty[i].store(true, Ordering::Release);
        }
        return false;
    }
    for &i in &idx {
        g.invalidate_page(i);
    }
    g.writable.fetch_sub(idx.len() as u64, Ordering::Relaxed);
    g.reprotects.fetch_add(idx.len() as u64, Ordering::Relaxed);
    true
}
