//! Global allocator for host builds: allocations made while the dispatcher
//! runs come from a private arena, everything else from the system
//! allocator. This is required, not an optimisation: the guest can leave
//! translated code in the middle of `malloc` (holding the arena lock), and a
//! dispatcher that called `malloc` then would deadlock. It also keeps the
//! guest's heap state independent of the translator, so instruction counts
//! match a native run exactly. (The kernel environment has the same rule:
//! the engine must not allocate from an allocator the guest may be inside.)

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::pool::Pool;
use std::alloc::System;

std::thread_local! {
    static IN_DBT: Cell<bool> = const { Cell::new(false) };
}

const ARENA_SIZE: usize = 8 << 30;
/// The dispatcher-mode arena (address space reserved on first use).
pub static ARENA: Pool = Pool::new();
static ARENA_ONCE: spin::Once<bool> = spin::Once::new();
/// Bytes of system blocks leaked because they were freed in dispatcher mode.
pub static LEAKED: AtomicUsize = AtomicUsize::new(0);
/// Allocations made in dispatcher mode (arena allocations), for tests that
/// check the dispatcher's fast path never allocates.
pub static DISPATCHER_ALLOCS: AtomicUsize = AtomicUsize::new(0);

/// The most bump space of the arena one dispatch used up (blocks and their
/// alignment padding; dispatches that made a region apart). The host
/// dispatcher measures every dispatch; meaningful when one thread dispatches.
pub static MAX_DISPATCH_GROWTH: AtomicUsize = AtomicUsize::new(0);

/// Run `f` with dispatcher-side allocation.
pub fn with_dbt_alloc<R>(f: impl FnOnce() -> R) -> R {
    let old = IN_DBT.with(|c| c.replace(true));
    let r = f();
    IN_DBT.with(|c| c.set(old));
    r
}

/// The arena, its region reserved on first use (false: mmap failed).
pub(crate) fn arena() -> bool {
    *ARENA_ONCE.call_once(|| {
        // SAFETY: reserving address space; pages are committed on first touch.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                ARENA_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        // SAFETY: a fresh private mapping, the arena's for the process's life.
        p != libc::MAP_FAILED && unsafe { ARENA.init(p as usize, ARENA_SIZE) }
    })
}

fn in_arena(p: usize) -> bool {
    ARENA.contains(p as *const u8)
}

pub struct HostAlloc;

// SAFETY: arena blocks are power-of-two sized and aligned to their size
// (bump pointer rounded up), so every request's size and alignment hold;
// system blocks are delegated unchanged.
unsafe impl GlobalAlloc for HostAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !IN_DBT.with(|c| c.get()) {
            // SAFETY: delegated.
            return unsafe { System.alloc(layout) };
        }
        DISPATCHER_ALLOCS.fetch_add(1, Ordering::Relaxed);
        if !arena() {
            return core::ptr::null_mut();
        }
        ARENA.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let p = ptr as usize;
        if in_arena(p) {
            // SAFETY: an arena block (GlobalAlloc contract: same layout).
            unsafe { ARENA.dealloc(ptr, layout) };
        } else if IN_DBT.with(|c| c.get()) {
            // A system block freed from the dispatcher: calling free() here
            // could deadlock (the guest may hold malloc's lock), so it is
            // leaked. The harness creates engine structures in arena mode,
            // so this is rare.
            LEAKED.fetch_add(layout.size(), Ordering::Relaxed);
        } else {
            // SAFETY: delegated.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = ptr as usize;
        if !in_arena(p) && !IN_DBT.with(|c| c.get()) {
            // SAFETY: delegated (system block, system mode).
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let Ok(nl) = Layout::from_size_align(new_size, layout.align()) else {
            return core::ptr::null_mut();
        };
        // SAFETY: valid layout.
        let n = unsafe { self.alloc(nl) };
        if !n.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, n, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        n
    }
}

#[global_allocator]
static GLOBAL: HostAlloc = HostAlloc;
