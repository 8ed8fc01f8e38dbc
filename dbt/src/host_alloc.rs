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
use std::alloc::System;

std::thread_local! {
    static IN_DBT: Cell<bool> = const { Cell::new(false) };
}

const ARENA_SIZE: usize = 8 << 30;
static ARENA_BASE: AtomicUsize = AtomicUsize::new(0);
/// Bytes of system blocks leaked because they were freed in dispatcher mode.
pub static LEAKED: AtomicUsize = AtomicUsize::new(0);
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);
/// Allocations made in dispatcher mode (arena allocations), for tests that
/// check the dispatcher's fast path never allocates.
pub static DISPATCHER_ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Free lists per power-of-two class (16 B .. 2^47).
static FREE: spin::Mutex<[usize; 48]> = spin::Mutex::new([0; 48]);

/// Run `f` with dispatcher-side allocation.
pub fn with_dbt_alloc<R>(f: impl FnOnce() -> R) -> R {
    let old = IN_DBT.with(|c| c.replace(true));
    let r = f();
    IN_DBT.with(|c| c.set(old));
    r
}

fn arena() -> usize {
    let b = ARENA_BASE.load(Ordering::Acquire);
    if b != 0 {
        return b;
    }
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
    if p == libc::MAP_FAILED {
        return 0;
    }
    let p = p as usize;
    match ARENA_BASE.compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            ARENA_NEXT.store(p, Ordering::Release);
            p
        }
        Err(other) => {
            // SAFETY: our mapping lost the race; give it back.
            unsafe { libc::munmap(p as *mut libc::c_void, ARENA_SIZE) };
            other
        }
    }
}

fn class(layout: &Layout) -> usize {
    let sz = layout.size().max(layout.align()).max(16).next_power_of_two();
    sz.trailing_zeros() as usize
}

fn in_arena(p: usize) -> bool {
    let b = ARENA_BASE.load(Ordering::Acquire);
    b != 0 && p >= b && p < b + ARENA_SIZE
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
        let base = arena();
        if base == 0 {
            return core::ptr::null_mut();
        }
        let c = class(&layout);
        {
            let mut f = FREE.lock();
            let head = f[c];
            if head != 0 {
                // SAFETY: a freed arena block stores the next pointer.
                f[c] = unsafe { *(head as *const usize) };
                return head as *mut u8;
            }
        }
        let sz = 1usize << c;
        loop {
            let cur = ARENA_NEXT.load(Ordering::Acquire);
            let a = (cur + sz - 1) & !(sz - 1);
            if a + sz > base + ARENA_SIZE {
                return core::ptr::null_mut();
            }
            if ARENA_NEXT.compare_exchange(cur, a + sz, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return a as *mut u8;
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let p = ptr as usize;
        if in_arena(p) {
            let c = class(&layout);
            let mut f = FREE.lock();
            // SAFETY: the block is ours and at least 16 bytes.
            unsafe { *(p as *mut usize) = f[c] };
            f[c] = p;
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
