//! The kernel dispatcher's memory: a [`dbt::pool::Pool`] over vmalloc memory taken at
//! start, which the module's global allocator serves while this CPU runs the dispatcher.
//!
//! The dispatcher runs with interrupts off, in whatever context translated code was in:
//! possibly inside the slab allocator with its locks held (when that code is itself
//! translated), so it must never call kmalloc or kfree. The dispatcher entry is wrapped
//! ([`dispatch`]) so that this CPU's block has `Scratch::env` set while it runs; the
//! global allocator ([`crate::kalloc`]) reads that flag through `%gs` and then allocates
//! from [`POOL`]. Frees go by address: a pool block back to the pool (any context; the
//! allocator turns interrupts off around its spin-locked free lists), a
//! kmalloc block freed in dispatcher mode onto a deferred list that process context
//! drains ([`drain_deferred`]). Code that builds or feeds the engine from process
//! context (its construction, the self-test's translations) runs in a [`Scope`], so
//! what the engine owns lives in the pool too.
//!
//! The allocator also counts kmalloc calls made with interrupts off outside dispatcher
//! mode ([`atomic_kmallocs`]): the self-test fails if translated runs caused any, which
//! is how `kdbt dbt-selftest --no-pool` (the pool switched off) shows the check works.
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use dbt::pool::{Pool, PoolStats};
use dbt::scratch::{Frame, Scratch, OFF_ENV};

use crate::ffi;

/// The dispatcher's pool (one engine at a time holds it, with the code cache's claim).
pub static POOL: Pool = Pool::new();
/// Bytes of the pool: the self-test engine's region directories (a quarter of its
/// 768 KB cache) need 256 KB, the translation reserve 128 KB; the rest is blocks.
pub const POOL_BYTES: usize = 4 << 20;
/// Bytes of the pool when the kernel's own text is translated (`kdbt start --kernel`):
/// thousands of fragments' records and pc maps.
pub const KERNEL_POOL_BYTES: usize = 64 << 20;

/// `%gs` offset of every CPU's `Scratch::env` (0: no engine's blocks exist).
static FLAG_OFF: AtomicU64 = AtomicU64::new(0);
/// Whether [`dispatch`] sets the flag (false: the `--no-pool` test hook).
static ENABLED: AtomicBool = AtomicBool::new(true);
/// kmalloc calls made with interrupts off outside dispatcher mode.
static ATOMIC_KMALLOCS: AtomicU64 = AtomicU64::new(0);
/// kmalloc blocks freed in dispatcher mode, linked through their first word.
static DEFERRED: AtomicPtr<usize> = AtomicPtr::new(core::ptr::null_mut());
static DEFERRED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// The pool's memory, owned from [`Memory::take`] to drop.
pub struct Memory {
    base: *mut u8,
}

impl Memory {
    /// Hands [`POOL`] `bytes` ([`POOL_BYTES`], [`KERNEL_POOL_BYTES`]) of fresh vmalloc
    /// memory (process context).
    pub fn take(bytes: usize) -> Result<Memory, &'static str> {
        // SAFETY: process context; freed in Drop.
        let base = unsafe { ffi::kdbt_glue_pool_alloc(bytes) } as *mut u8;
        if base.is_null() {
            return Err("no memory for the dispatcher's pool (vmalloc)");
        }
        // SAFETY: a fresh vmalloc region, the pool's until Drop releases it.
        if !unsafe { POOL.init(base as usize, bytes) } {
            // SAFETY: just allocated, never handed out.
            unsafe { ffi::kdbt_glue_pool_free(base.cast()) };
            return Err("the dispatcher's pool is in use (or kept since a run that left blocks in it)");
        }
        Ok(Memory { base })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        let live = POOL.stats().in_use;
        if live != 0 {
            // Something still holds pool blocks: freeing the region would leave it
            // pointing into freed memory. Keep the pool (and its memory) for the module's
            // life instead; the next `take` reports it in use.
            kwarn!("dbt pool: {live} bytes still allocated at release; the pool's memory is kept");
            return;
        }
        // SAFETY: no block is live (checked above) and the engine is gone.
        let _ = unsafe { POOL.release() };
        // SAFETY: the region from `take`, no longer the pool's.
        unsafe { ffi::kdbt_glue_pool_free(self.base.cast()) };
    }
}

/// The `%gs` offset of the blocks' `env` flags becomes `pcp + OFF_ENV` (0: none).
pub fn set_blocks(pcp: u64) {
    FLAG_OFF.store(if pcp == 0 { 0 } else { pcp + OFF_ENV as u64 }, Ordering::Release);
}

/// The `--no-pool` test hook: dispatches run without the flag (and so allocate with
/// kmalloc) while `on` is false.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether this CPU is in dispatcher mode (its block's `env` flag is set).
pub fn in_dispatcher() -> bool {
    let off = FLAG_OFF.load(Ordering::Acquire);
    if off == 0 {
        return false;
    }
    let v: u64;
    // SAFETY: in the kernel `%gs` is the per-CPU base; `off` is the module's static
    // per-CPU area plus a field offset inside it (checked when the blocks were made), so
    // the read is of this CPU's flag. A task preempted between reading `off` and the
    // load reads the flag of the CPU it runs on, which is 0 unless that CPU is inside
    // the dispatcher (interrupts off: then this code is the dispatcher).
    unsafe {
        core::arch::asm!("mov {v}, qword ptr gs:[{o}]", o = in(reg) off, v = out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v != 0
}

/// Whether interrupts are off on this CPU (RFLAGS.IF clear).
pub fn irqs_off() -> bool {
    let f: u64;
    // SAFETY: reads rflags through the stack (push/pop, balanced).
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) f, options(preserves_flags)) };
    f & (1 << 9) == 0
}

/// Called by the global allocator before a kmalloc: counts one made with interrupts off.
pub fn note_kmalloc() {
    if irqs_off() {
        ATOMIC_KMALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

/// kmalloc calls made with interrupts off outside dispatcher mode, since load.
pub fn atomic_kmallocs() -> u64 {
    ATOMIC_KMALLOCS.load(Ordering::Relaxed)
}

/// A kmalloc block freed in dispatcher mode: kept until [`drain_deferred`].
///
/// # Safety
/// `p` is a live kmalloc block of at least 8 bytes (kmalloc's minimum) that nothing
/// uses any more.
pub unsafe fn defer_free(p: *mut u8) {
    let node = p as *mut usize;
    let mut head = DEFERRED.load(Ordering::Acquire);
    loop {
        // SAFETY: the block is ours (the caller's contract) and holds a word.
        unsafe { node.write(head as usize) };
        match DEFERRED.compare_exchange_weak(head, node, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    DEFERRED_COUNT.fetch_add(1, Ordering::Relaxed);
}

/// kfrees what dispatcher mode deferred (process context); returns how many.
pub fn drain_deferred() -> usize {
    let mut p = DEFERRED.swap(core::ptr::null_mut(), Ordering::AcqRel);
    let mut n = 0;
    while !p.is_null() {
        // SAFETY: a deferred block (see `defer_free`): its first word links the next.
        let next = unsafe { p.read() } as *mut usize;
        // SAFETY: a kmalloc block nothing uses; process context.
        unsafe { ffi::kdbt_glue_free(p.cast()) };
        p = next;
        n += 1;
    }
    n
}

/// kmalloc blocks freed in dispatcher mode since load.
pub fn deferred_frees() -> usize {
    DEFERRED_COUNT.load(Ordering::Relaxed)
}

/// This CPU in dispatcher mode, interrupts off, for the guard's life: process-context
/// code that builds or feeds the engine allocates from the pool as the dispatcher does.
pub struct Scope {
    flags: core::ffi::c_ulong,
    flag: *mut u64,
}

impl Scope {
    /// Enter dispatcher mode on this CPU; `blk_of_cpu` gives a CPU's block.
    pub fn enter(blk_of_cpu: impl Fn(u32) -> Option<*mut Scratch>) -> Scope {
        // SAFETY: irq save, restored in Drop (the guard stays on this CPU meanwhile).
        let flags = unsafe { ffi::kdbt_glue_irq_save() };
        let flag = match blk_of_cpu(crate::hw::this_cpu()) {
            // SAFETY: a live block; only this CPU writes its `env` (interrupts off).
            Some(b) if ENABLED.load(Ordering::Acquire) => unsafe {
                (*b).env += 1;
                &mut (*b).env as *mut u64
            },
            _ => core::ptr::null_mut(),
        };
        Scope { flags, flag }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.flag.is_null() {
            // SAFETY: the flag incremented in `enter`, on this CPU, interrupts still off.
            unsafe { *self.flag -= 1 };
        }
        // SAFETY: restores what irq_save returned.
        unsafe { ffi::kdbt_glue_irq_restore(self.flags) };
    }
}

/// The dispatcher entry the kernel's blocks point at (`Scratch::rust_dispatch`): the
/// engine's dispatcher in dispatcher mode.
///
/// # Safety
/// The contract of [`dbt::engine::dbt_rust_dispatch`] (called by the asm entries with
/// interrupts off, `s` this CPU's block).
pub unsafe extern "C" fn dispatch(s: *mut Scratch, f: *mut Frame) -> u64 {
    let on = ENABLED.load(Ordering::Relaxed);
    // SAFETY: this CPU's block, interrupts off (the dispatcher's entry).
    unsafe { (*s).dispatches = (*s).dispatches.wrapping_add(1) };
    if on {
        // SAFETY: this CPU's block; interrupts are off, so nothing else on this CPU
        // touches it until the matching decrement.
        unsafe { (*s).env += 1 };
    }
    // SAFETY: the caller's contract.
    let r = unsafe { dbt::engine::dbt_rust_dispatch(s, f) };
    if on {
        // SAFETY: as above.
        unsafe { (*s).env -= 1 };
    }
    r
}

/// The pool's figures.
pub fn stats() -> PoolStats {
    POOL.stats()
}
