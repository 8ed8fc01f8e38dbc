//! The global allocator: kmalloc/kfree through the glue (GFP_KERNEL in process context),
//! and the kernel DBT's dispatcher pool while this CPU runs the dispatcher
//! ([`crate::kernel_dbt::pool`]: the dispatcher never calls kmalloc or kfree).
//!
//! Alignment: kmalloc returns 8-byte aligned memory, and memory naturally aligned to the
//! size when the size is a power of two (Documentation/core-api/memory-allocation.rst).
//! So a request with alignment above 8 is served as a power-of-two size >= the alignment.
//! Alignments above one page are refused (null), which `alloc` reports as OOM; nothing in
//! kdbt asks for that (page-aligned hardware structures come from `alloc_pages`).
use core::alloc::{GlobalAlloc, Layout};

use crate::ffi;
use crate::kernel_dbt::pool;

pub struct KernelAllocator;

const KMALLOC_MIN_ALIGN: usize = 8;
const PAGE_SIZE: usize = 4096;

fn kmalloc_size(layout: Layout) -> Option<usize> {
    if layout.align() <= KMALLOC_MIN_ALIGN {
        Some(layout.size().max(1))
    } else if layout.align() <= PAGE_SIZE {
        layout.size().max(layout.align()).checked_next_power_of_two()
    } else {
        None
    }
}

// SAFETY: kmalloc/kfree and the pool are thread-safe; sizes and alignments are honoured
// as explained in the module comment (pool blocks are power-of-two sized and aligned), and
// dealloc only ever receives pointers from alloc, told apart by address.
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if pool::in_dispatcher() {
            return pool::POOL.alloc(layout);
        }
        pool::note_kmalloc();
        match kmalloc_size(layout) {
            // SAFETY: plain kmalloc call; a null return is passed on as allocation failure.
            Some(size) => unsafe { ffi::kdbt_glue_alloc(size) as *mut u8 },
            None => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if pool::POOL.contains(ptr) {
            // The pool's free lists are spin-locked, and the dispatcher (entered by a #VE
            // in an interrupt on this CPU) takes the same lock: with interrupts on, such
            // an interrupt while this CPU holds it would spin forever. So interrupts are
            // off around the free, as they are in the dispatcher.
            // SAFETY: irq save, restored right after on this CPU.
            let flags = unsafe { ffi::kdbt_glue_irq_save() };
            // SAFETY: a pool block of this layout (the GlobalAlloc contract).
            unsafe { pool::POOL.dealloc(ptr, layout) };
            // SAFETY: restores what irq_save returned.
            unsafe { ffi::kdbt_glue_irq_restore(flags) };
        } else if pool::in_dispatcher() {
            // SAFETY: a kmalloc block (not the pool's) the caller is done with.
            unsafe { pool::defer_free(ptr) };
        } else {
            // SAFETY: `ptr` came from kdbt_glue_alloc (the GlobalAlloc contract).
            unsafe { ffi::kdbt_glue_free(ptr as *mut core::ffi::c_void) }
        }
    }
}
