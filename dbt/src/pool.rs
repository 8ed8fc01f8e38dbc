//! The dispatcher's memory pool: a fixed region the environment hands over
//! before anything runs, carved into power-of-two blocks (a bump pointer,
//! and a free list per size class). The dispatcher allocates only from here,
//! so it never calls an allocator the guest may be inside (the host's
//! `malloc`, the kernel's slab allocator with its locks held by the
//! interrupted code) and never sleeps.
//!
//! Thread-safe: the bump pointer is a CAS, the free lists sit behind one
//! spin lock that is taken only by dispatcher code (interrupts off in a
//! kernel, so no CPU ever spins on a lock held by an interrupted holder on
//! the same CPU) and by the environment's teardown.
//!
//! The failure path is a null return: the engine never reaches it in
//! practice because it asks [`Pool::bump_left`] (through
//! [`crate::Env::memory_left`]) before each translation and refuses the
//! translation while fewer than [`TRANSLATE_RESERVE`] bytes are left; see
//! `dbt/README.md`, "Dispatcher memory".

use core::alloc::Layout;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Size classes: 16 B (2^4) up to 2^47.
const CLASSES: usize = 48;
const MIN_CLASS: u32 = 4;
/// Alignment of the bump pointer's blocks at most (see [`Pool::alloc`]).
const PAGE: usize = 4096;

/// Bytes the pool must still hold, untouched by the bump pointer, for the
/// engine to start another translation. One dispatch (a block's
/// translation, its exit records and pc map, the growth of the engine's
/// maps and vectors; a new region's pc-index directory is checked on its
/// own) used at most 18 KB of the pool's bump space, alignment padding
/// included, over the host corpus with the inscount client (3,843 blocks);
/// `tests/dispatch_memory.rs` checks a quarter of this reserve as the bound
/// on every run.
pub const TRANSLATE_RESERVE: usize = 128 << 10;

/// What a pool has done (every field counts since [`Pool::init`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Region size in bytes.
    pub size: usize,
    /// Bytes in live blocks (rounded up to their class).
    pub in_use: usize,
    /// Highest `in_use` seen.
    pub peak: usize,
    /// Bytes the bump pointer has not reached yet.
    pub bump_left: usize,
    /// Successful allocations.
    pub allocs: u64,
    /// Requests the pool could not serve (null returned).
    pub failures: u64,
    /// Largest single request, in bytes.
    pub largest: usize,
}

pub struct Pool {
    base: AtomicUsize,
    size: AtomicUsize,
    next: AtomicUsize,
    free: spin::Mutex<[usize; CLASSES]>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    /// Peak since [`Pool::mark`] (for per-dispatch measurements).
    mark_peak: AtomicUsize,
    allocs: AtomicU64,
    failures: AtomicU64,
    largest: AtomicUsize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

fn class(layout: &Layout) -> Option<usize> {
    let sz = layout.size().max(layout.align()).max(1 << MIN_CLASS).checked_next_power_of_two()?;
    let c = sz.trailing_zeros() as usize;
    (c < CLASSES).then_some(c)
}

/// Bytes a pool block for a `size`-byte request (byte-aligned) takes:
/// the size class's, a power of two of at least 16.
pub fn block_bytes(size: usize) -> usize {
    size.max(1 << MIN_CLASS).checked_next_power_of_two().unwrap_or(usize::MAX)
}

impl Pool {
    /// An empty pool (every allocation fails until [`Pool::init`]).
    pub const fn new() -> Pool {
        Pool {
            base: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            free: spin::Mutex::new([0; CLASSES]),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            mark_peak: AtomicUsize::new(0),
            allocs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            largest: AtomicUsize::new(0),
        }
    }

    /// Hand the pool `size` bytes at `base`. False (and nothing changes) if
    /// the pool already has a region, the region is empty or wraps.
    ///
    /// # Safety
    /// The region is readable and writable, used by nothing else, and stays
    /// so until [`Pool::release`] returns it.
    pub unsafe fn init(&self, base: usize, size: usize) -> bool {
        if base == 0 || size == 0 || base.checked_add(size).is_none() {
            return false;
        }
        let mut f = self.free.lock();
        if self.base.load(Ordering::Acquire) != 0 {
            return false;
        }
        *f = [0; CLASSES];
        self.size.store(size, Ordering::Relaxed);
        self.next.store(base, Ordering::Relaxed);
        for c in [&self.in_use, &self.peak, &self.mark_peak, &self.largest] {
            c.store(0, Ordering::Relaxed);
        }
        self.allocs.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.base.store(base, Ordering::Release);
        true
    }

    /// Take the region back: (base, size, bytes still in live blocks), or
    /// None if the pool had none. Afterwards every allocation fails and
    /// [`Pool::contains`] is false for the old blocks.
    ///
    /// # Safety
    /// No block of the pool is used after this (the caller frees the region).
    pub unsafe fn release(&self) -> Option<(usize, usize, usize)> {
        let _f = self.free.lock();
        let base = self.base.swap(0, Ordering::AcqRel);
        (base != 0).then(|| (base, self.size.load(Ordering::Relaxed), self.in_use.load(Ordering::Relaxed)))
    }

    /// Whether `p` lies in the pool's region.
    pub fn contains(&self, p: *const u8) -> bool {
        let (b, p) = (self.base.load(Ordering::Acquire), p as usize);
        b != 0 && p >= b && p - b < self.size.load(Ordering::Relaxed)
    }

    /// A block for `layout`, or null (no region, or it is full).
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = self.alloc_inner(&layout);
        if p.is_null() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.allocs.fetch_add(1, Ordering::Relaxed);
            self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        }
        p
    }

    fn alloc_inner(&self, layout: &Layout) -> *mut u8 {
        let base = self.base.load(Ordering::Acquire);
        let Some(c) = class(layout) else {
            return core::ptr::null_mut();
        };
        if base == 0 {
            return core::ptr::null_mut();
        }
        let sz = 1usize << c;
        // Blocks are aligned to their class up to a page (so a block wastes at most
        // a page's worth of bump space in padding); a request aligned beyond a page
        // gets its own alignment from the bump pointer and never a free-list block.
        let over_page = layout.align() > PAGE;
        let align = if over_page { layout.align() } else { sz.min(PAGE) };
        let got = if over_page {
            0
        } else {
            let mut f = self.free.lock();
            let head = f[c];
            if head != 0 {
                // SAFETY: a free block of this class stores the next free one.
                f[c] = unsafe { *(head as *const usize) };
            }
            head
        };
        let p = if got != 0 {
            got
        } else {
            let end = base + self.size.load(Ordering::Relaxed);
            loop {
                let cur = self.next.load(Ordering::Acquire);
                let Some(a) = cur.checked_add(align - 1).map(|v| v & !(align - 1)) else {
                    return core::ptr::null_mut();
                };
                if a.checked_add(sz).is_none_or(|e| e > end) {
                    return core::ptr::null_mut();
                }
                if self.next.compare_exchange(cur, a + sz, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    break a;
                }
            }
        };
        let now = self.in_use.fetch_add(sz, Ordering::Relaxed) + sz;
        self.peak.fetch_max(now, Ordering::Relaxed);
        self.mark_peak.fetch_max(now, Ordering::Relaxed);
        p as *mut u8
    }

    /// Give back a block.
    ///
    /// # Safety
    /// `p` came from [`Pool::alloc`] of this pool with the same `layout`
    /// (since its last `init`) and is not used afterwards.
    pub unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(c) = class(&layout) else {
            return;
        };
        let mut f = self.free.lock();
        if !self.contains(p) {
            return;
        }
        // SAFETY: the block is ours and at least 16 bytes, aligned to its size.
        unsafe { *(p as *mut usize) = f[c] };
        f[c] = p as usize;
        self.in_use.fetch_sub(1 << c, Ordering::Relaxed);
    }

    /// Bytes the bump pointer has passed (blocks, their alignment padding included).
    pub fn bump_used(&self) -> usize {
        let b = self.base.load(Ordering::Acquire);
        if b == 0 {
            return 0;
        }
        self.next.load(Ordering::Acquire).saturating_sub(b)
    }

    /// Bytes the bump pointer has not handed out yet: what a large request
    /// can still get, less at most a page of alignment padding (the free lists
    /// hold more, in their classes).
    pub fn bump_left(&self) -> usize {
        let b = self.base.load(Ordering::Acquire);
        if b == 0 {
            return 0;
        }
        (b + self.size.load(Ordering::Relaxed)).saturating_sub(self.next.load(Ordering::Acquire))
    }

    /// Start a measurement: the peak since now restarts at the current use.
    pub fn mark(&self) {
        self.mark_peak.store(self.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Highest `in_use` since the last [`Pool::mark`].
    pub fn peak_since_mark(&self) -> usize {
        self.mark_peak.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            size: if self.base.load(Ordering::Acquire) == 0 { 0 } else { self.size.load(Ordering::Relaxed) },
            in_use: self.in_use.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            bump_left: self.bump_left(),
            allocs: self.allocs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn region(bytes: usize) -> (Vec<u64>, usize) {
        let v = vec![0u64; bytes / 8];
        let b = v.as_ptr() as usize;
        (v, b)
    }

    #[test]
    fn empty_pool_fails_and_counts() {
        let p = Pool::new();
        assert!(p.alloc(Layout::new::<u64>()).is_null());
        assert_eq!(p.stats().failures, 1);
        assert_eq!(p.bump_left(), 0);
    }

    #[test]
    fn init_rejects_bad_regions_and_a_second_region() {
        let (_v, b) = region(4096);
        let p = Pool::new();
        // SAFETY: rejected regions are never used.
        unsafe {
            assert!(!p.init(0, 4096));
            assert!(!p.init(b, 0));
            assert!(!p.init(usize::MAX - 10, 100));
            assert!(p.init(b, 4096));
            assert!(!p.init(b, 4096));
        }
    }

    #[test]
    fn blocks_are_aligned_inside_and_reused() {
        let (_v, b) = region(64 << 10);
        let p = Pool::new();
        // SAFETY: `_v` outlives the pool's use.
        assert!(unsafe { p.init(b, 64 << 10) });
        let l = Layout::from_size_align(100, 8).unwrap();
        let a = p.alloc(l);
        assert!(p.contains(a) && (a as usize).is_multiple_of(128));
        let big = Layout::from_size_align(3000, 2048).unwrap();
        let c = p.alloc(big);
        assert!(p.contains(c) && (c as usize).is_multiple_of(4096));
        assert_eq!(p.stats().in_use, 128 + 4096);
        // SAFETY: blocks from this pool with their layouts.
        unsafe { p.dealloc(a, l) };
        assert_eq!(p.alloc(l), a, "a freed block is reused first");
        // SAFETY: as above.
        unsafe { p.dealloc(c, big) };
        assert_eq!(p.stats().in_use, 128);
        assert_eq!(p.stats().peak, 128 + 4096);
        assert_eq!(p.stats().largest, 3000);
    }

    #[test]
    fn full_pool_returns_null_and_release_returns_the_region() {
        let (_v, b) = region(4096);
        let p = Pool::new();
        // SAFETY: `_v` outlives the pool's use.
        assert!(unsafe { p.init(b, 4096) });
        let l = Layout::from_size_align(1024, 8).unwrap();
        let got: Vec<_> = (0..5).map(|_| p.alloc(l)).collect();
        let live = got.iter().filter(|x| !x.is_null()).count();
        assert!((3..=4).contains(&live), "{live}");
        assert!(got[4].is_null());
        assert!(p.stats().failures >= 1);
        assert!(p.alloc(Layout::from_size_align(1 << 60, 8).unwrap()).is_null());
        // SAFETY: nothing uses the blocks afterwards.
        let (rb, rs, live_bytes) = unsafe { p.release() }.unwrap();
        assert_eq!((rb, rs, live_bytes), (b, 4096, live * 1024));
        assert!(!p.contains(got[0]));
        assert!(p.alloc(l).is_null());
        // SAFETY: already released.
        assert!(unsafe { p.release() }.is_none());
    }

    #[test]
    fn mark_measures_the_peak_of_a_window() {
        let (_v, b) = region(64 << 10);
        let p = Pool::new();
        // SAFETY: `_v` outlives the pool's use.
        assert!(unsafe { p.init(b, 64 << 10) });
        let l = Layout::from_size_align(1024, 8).unwrap();
        let a = p.alloc(l);
        p.mark();
        let c = p.alloc(l);
        // SAFETY: blocks of this pool.
        unsafe {
            p.dealloc(c, l);
            p.dealloc(a, l);
        }
        assert_eq!(p.peak_since_mark(), 2048);
        p.mark();
        assert_eq!(p.peak_since_mark(), 0);
    }

    #[test]
    fn threads_share_a_pool() {
        extern crate std;
        let (_v, b) = region(1 << 20);
        let p = std::sync::Arc::new(Pool::new());
        // SAFETY: `_v` outlives the threads.
        assert!(unsafe { p.init(b, 1 << 20) });
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let l = Layout::from_size_align(48 + t * 8, 8).unwrap();
                    for i in 0..2000u64 {
                        let a = p.alloc(l) as *mut u64;
                        assert!(!a.is_null());
                        // SAFETY: our block, at least 8 bytes.
                        unsafe {
                            a.write(i ^ t as u64);
                            assert_eq!(a.read(), i ^ t as u64);
                            p.dealloc(a as *mut u8, l);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(p.stats().in_use, 0);
        assert_eq!(p.stats().allocs, 8000);
    }
}
