//! The frames shadow tables live in.
//!
//! The MMU takes all its frames from a [`FramePool`] once, in [`crate::Mmu::new`] (load
//! time, where the kernel allocator may be called), and never asks again: root mode never
//! allocates. Frames not in use are kept on a free list threaded through the frames
//! themselves (entry 0 of a free frame holds the next one), so the bookkeeping needs no
//! memory of its own.

/// Source of, and access to, 4 KiB shadow-table frames.
pub trait FramePool {
    /// One 4 KiB-aligned frame (its physical address) for the MMU to keep until
    /// [`crate::Mmu::release`]. Called only at construction. `None` when exhausted.
    fn take_frame(&mut self) -> Option<u64>;
    /// Gives back a frame returned by [`FramePool::take_frame`].
    fn return_frame(&mut self, pa: u64);
    /// Entry `index` (0..512) of the frame at `pa`.
    fn read_entry(&self, pa: u64, index: usize) -> u64;
    /// Writes entry `index` of the frame at `pa` with one 64-bit store (the CPU may be
    /// walking the table on this CPU's behalf while it is written: never a torn store).
    fn write_entry(&mut self, pa: u64, index: usize, value: u64);
}

/// Marks the end of the free list (not a valid frame address: not 4 KiB-aligned).
const END: u64 = u64::MAX;

/// The free frames of an MMU.
pub(crate) struct FreeList {
    head: u64,
    free: usize,
    total: usize,
}

impl FreeList {
    pub(crate) fn new() -> FreeList {
        FreeList { head: END, free: 0, total: 0 }
    }

    /// Adds a frame the pool just gave (counted in the total).
    pub(crate) fn adopt<P: FramePool>(&mut self, pool: &mut P, pa: u64) {
        self.total += 1;
        self.push(pool, pa);
    }

    pub(crate) fn push<P: FramePool>(&mut self, pool: &mut P, pa: u64) {
        pool.write_entry(pa, 0, self.head);
        self.head = pa;
        self.free += 1;
    }

    /// A zeroed frame, `None` if the list is empty.
    pub(crate) fn pop<P: FramePool>(&mut self, pool: &mut P) -> Option<u64> {
        if self.head == END {
            return None;
        }
        let pa = self.head;
        self.head = pool.read_entry(pa, 0);
        self.free -= 1;
        for i in 0..512 {
            pool.write_entry(pa, i, 0);
        }
        Some(pa)
    }

    pub(crate) fn free(&self) -> usize {
        self.free
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Hands every free frame back to the pool.
    pub(crate) fn drain<P: FramePool>(&mut self, pool: &mut P) {
        while self.head != END {
            let pa = self.head;
            self.head = pool.read_entry(pa, 0);
            pool.return_frame(pa);
            self.free -= 1;
            self.total -= 1;
        }
    }
}
