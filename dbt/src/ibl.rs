//! The shared inline-lookup table for returns and indirect branches.
//!
//! One table for every CPU, addressed absolutely by translated code
//! (`jmp qword [rdx*8 + disp32]`, the disp32 sign-extended): the environment
//! places it in the low 2 GiB (host: `MAP_32BIT`) or in the top 2 GiB
//! (kernel: module data). Entry `t & 0xffff` holds the indirect entry (target
//! check) of a fragment whose guest pc has those low 16 bits, or the
//! dispatcher's miss entry. There are no tags: the fragment's own check
//! compares the target with its pc, so a stale or colliding entry costs a
//! miss, never a wrong jump. Entries are aligned 8-byte words written with
//! one atomic store each, so a CPU racing with an update jumps to the old or
//! the new value; the old fragment's space is not reused before every CPU
//! has passed a quiescent point (`Engine::reclaim`).

use core::sync::atomic::{AtomicU64, Ordering};

/// Number of entries (indexed by the low 16 bits of the target: `movzx`
/// extracts them without touching the flags).
pub const IBL_ENTRIES: usize = 1 << 16;
/// Bytes the environment allocates for the table.
pub const IBL_BYTES: usize = IBL_ENTRIES * 8;

/// Whether a table at `base` can be addressed as `[reg*8 + disp32]`.
pub fn reachable(base: u64) -> bool {
    let end = base.wrapping_add(IBL_BYTES as u64 - 1);
    let fits = |a: u64| (a as i64) == (a as i64 as i32 as i64);
    base.is_multiple_of(8) && fits(base) && fits(end) && end > base
}

/// The table (memory owned by the environment, valid while the engine lives).
pub struct Ibl {
    base: u64,
    miss: u64,
}

impl Ibl {
    /// A table at `base` (IBL_BYTES, 8-byte aligned, [`reachable`]) with
    /// every entry set to `miss`.
    ///
    /// # Safety
    /// `base` is `IBL_BYTES` of writable memory that nothing else uses and
    /// that outlives the table.
    pub unsafe fn new(base: u64, miss: u64) -> Option<Ibl> {
        if !reachable(base) {
            return None;
        }
        let t = Ibl { base, miss };
        t.clear();
        Some(t)
    }

    /// The disp32 translated code uses.
    pub fn disp(&self) -> i64 {
        self.base as i64
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `i < IBL_ENTRIES` (callers mask), the memory is ours for
        // the table's life (constructor contract) and 8-byte aligned.
        unsafe { &*((self.base as *const AtomicU64).add(i & (IBL_ENTRIES - 1))) }
    }

    /// Entry for guest target `pc`.
    pub fn get(&self, pc: u64) -> u64 {
        self.slot((pc & 0xffff) as usize).load(Ordering::Relaxed)
    }

    /// Point the entry for `pc` at `entry` (a fragment's indirect entry).
    pub fn set(&self, pc: u64, entry: u64) {
        self.slot((pc & 0xffff) as usize).store(entry, Ordering::Release);
    }

    /// Reset the entry for `pc` to the miss entry if it still holds `entry`.
    pub fn clear_if(&self, pc: u64, entry: u64) {
        let _ =
            self.slot((pc & 0xffff) as usize).compare_exchange(entry, self.miss, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Every entry to the miss entry.
    pub fn clear(&self) {
        for i in 0..IBL_ENTRIES {
            self.slot(i).store(self.miss, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_is_checked_at_both_ends() {
        assert!(reachable(0x1000));
        assert!(reachable(0x7ff0_0000 - IBL_BYTES as u64));
        assert!(!reachable(0x8000_0000 - 8), "end crosses 2 GiB");
        assert!(!reachable(0x7fff_ffff_0000));
        assert!(reachable(0xffff_ffff_c000_0000), "kernel top 2 GiB");
        assert!(!reachable(0xffff_ffff_ffff_0000), "wraps");
        assert!(!reachable(0x1004), "unaligned");
    }
}
