//! The engine's per-CPU blocks in the kernel: the glue's static per-CPU area holding a
//! [`dbt::scratch::PerCpuArea`] (the 512-byte block and the client counters), reached by
//! translated code as `%gs:[offset + field]`, where the offset is the per-CPU pointer's
//! value (x86-64 Linux: `this_cpu_ptr(p) == %gs base + p`, checked here on the calling
//! CPU), and a dispatcher stack per CPU.
use alloc::vec::Vec;
use core::mem::{align_of, size_of};

use dbt::scratch::{PerCpuArea, Scratch};

use crate::{ffi, hw};

const IA32_GS_BASE: u32 = 0xC000_0101;
/// Dispatcher stack: 2^3 pages (the entry puts the frame and a 4 KB xsave area at its
/// top; the translator runs below).
const DSTACK_ORDER: u32 = 3;
const DSTACK_BYTES: u64 = 4096 << DSTACK_ORDER;

pub struct Blocks {
    pcp: u64,
    /// (cpu, block, dispatcher stack base) of every possible CPU.
    cpus: Vec<(u32, *mut Scratch, u64)>,
}

// SAFETY: after `new` the list is only read; the pointers are to per-CPU blocks that
// outlive `self`, and what is done through them (`pool_scope`) touches only the calling
// CPU's block with interrupts off.
unsafe impl Sync for Blocks {}

impl Blocks {
    /// Allocates the blocks and stacks (process context). Err: no memory, or the per-CPU
    /// offset does not fit translated code's `gs:[disp32]`.
    pub fn new() -> Result<Blocks, &'static str> {
        let mut size = 0usize;
        // SAFETY: a valid out-pointer; the area is the module's, for its lifetime.
        let pcp = unsafe { ffi::kdbt_glue_percpu_block(&mut size) };
        if size < size_of::<PerCpuArea>() || pcp % align_of::<PerCpuArea>() as u64 != 0 {
            return Err("the glue's per-CPU area does not hold the DBT's block");
        }
        let mut b = Blocks { pcp, cpus: Vec::new() };
        if b.gs_offset().is_none() {
            return Err("the per-CPU block's offset does not fit a gs:[disp32]");
        }
        if !b.gs_matches() {
            return Err("this kernel's %gs base plus a per-CPU pointer is not that CPU's copy");
        }
        for cpu in 0..hw::cpu_ids() {
            // SAFETY: the glue range-checks `cpu`; `pcp` is the module's per-CPU area.
            let blk = unsafe { ffi::kdbt_glue_per_cpu_ptr(pcp, cpu) } as *mut Scratch;
            // SAFETY: order-3 zeroed pages, freed in Drop.
            let stack = unsafe { ffi::kdbt_glue_alloc_pages(DSTACK_ORDER) } as u64;
            if blk.is_null() || stack == 0 {
                if stack != 0 {
                    // SAFETY: just allocated, not yet recorded.
                    unsafe { ffi::kdbt_glue_free_pages(stack as *mut _, DSTACK_ORDER) };
                }
                return Err("no memory for a dispatcher stack");
            }
            if b.cpus.try_reserve(1).is_err() {
                // SAFETY: as above.
                unsafe { ffi::kdbt_glue_free_pages(stack as *mut _, DSTACK_ORDER) };
                return Err("no memory");
            }
            // SAFETY: this CPU's copy of the area (size checked above); no engine uses it
            // (the caller holds the code cache's claim). A previous run's state goes.
            unsafe { core::ptr::write_bytes(blk as *mut u8, 0, size_of::<PerCpuArea>()) };
            b.cpus.push((cpu, blk, stack));
        }
        super::pool::set_blocks(pcp);
        Ok(b)
    }

    /// The `%gs` offset of every CPU's block (what `dbt::Config::gs_base` takes), if the
    /// block and its counters fit a sign-extended disp32.
    pub fn gs_offset(&self) -> Option<i32> {
        let off = self.pcp as i64;
        let end = off.checked_add(size_of::<PerCpuArea>() as i64)?;
        (off == off as i32 as i64 && end == end as i32 as i64).then_some(off as i32)
    }

    /// Whether, on this CPU, `%gs base + offset` is this CPU's block (interrupts off
    /// around the check, so it stays on one CPU).
    fn gs_matches(&self) -> bool {
        // SAFETY: irq save/restore pair.
        let flags = unsafe { ffi::kdbt_glue_irq_save() };
        let mut base = 0u64;
        // SAFETY: reading IA32_GS_BASE (kernel GS base while in the kernel).
        let ok = unsafe { ffi::kdbt_glue_rdmsr_safe(IA32_GS_BASE, &mut base) } == 0;
        let cpu = hw::this_cpu();
        // SAFETY: the glue range-checks `cpu`.
        let mine = unsafe { ffi::kdbt_glue_per_cpu_ptr(self.pcp, cpu) };
        // SAFETY: restores what irq_save returned.
        unsafe { ffi::kdbt_glue_irq_restore(flags) };
        ok && base.wrapping_add(self.pcp) == mine
    }

    /// Registers every CPU's block and stack with `e` (before anything runs).
    pub fn attach(&self, e: &mut dbt::Engine) {
        for &(cpu, blk, stack) in &self.cpus {
            // SAFETY: the block and stack live as long as `self`, which the caller keeps
            // until the engine is dropped; attach_cpu initializes the block.
            unsafe {
                e.attach_cpu(blk, stack + DSTACK_BYTES);
                // The kernel cannot see a CPU leave translated code (native fragments leave
                // without a dispatch), so an online CPU is never "outside": its quiescence
                // is its epoch's (dispatches at base level, the quiescence pass). A CPU
                // offline now runs nothing until `set_online`.
                (*blk).outside = !hw::cpu_online(cpu) as u64;
                (*blk).counters_ptr = blk as u64 + dbt::scratch::OFF_COUNTERS as u64;
                // Kernel code outside kernel_fpu_begin() leaves the FPU/SIMD state to
                // user space, and the dispatcher (soft-float) never touches it.
                (*blk).save_xstate = 0;
                // The dispatcher runs in dispatcher mode (its allocations from the pool).
                (*blk).rust_dispatch = super::pool::dispatch as *const () as usize as u64;
            }
        }
    }

    /// `cpu` came online: it may run translated code from now on (before its #VE is on).
    pub fn set_online(&self, cpu: u32) {
        if let Some(b) = self.of_cpu(cpu) {
            // SAFETY: a live block; other CPUs read the word with volatile reads.
            unsafe { core::ptr::write_volatile(&mut (*b).outside, 0) };
        }
    }

    /// The block of `cpu`.
    pub fn of_cpu(&self, cpu: u32) -> Option<*mut Scratch> {
        self.cpus.iter().find(|c| c.0 == cpu).map(|c| c.1)
    }

    /// This CPU in dispatcher mode (allocations from the pool) for the guard's life.
    pub fn pool_scope(&self) -> super::pool::Scope {
        super::pool::Scope::enter(|cpu| self.of_cpu(cpu))
    }

    /// Every CPU's block.
    pub fn iter(&self) -> impl Iterator<Item = *mut Scratch> + '_ {
        self.cpus.iter().map(|c| c.1)
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        super::pool::set_blocks(0);
        for &(_, _, stack) in &self.cpus {
            // SAFETY: the stacks allocated in `new`; the engine using them is gone.
            unsafe { ffi::kdbt_glue_free_pages(stack as *mut _, DSTACK_ORDER) };
        }
    }
}
