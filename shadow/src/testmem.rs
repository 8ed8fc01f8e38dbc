//! Fake memories for the unit tests: guest-physical memory with a page-table builder, and
//! a frame pool whose frames the test can walk like the CPU would.
extern crate std;

use std::collections::HashMap;

use crate::pool::FramePool;
use crate::walk::bits::{ADDR, P, PS, RW, US};
use crate::walk::{PageSize, PAGE_1G, PAGE_2M};
use crate::GuestMem;

/// Sparse guest-physical memory: 4 KiB frames created on demand by the builder; reads of
/// anything else are refused (like MMIO holes).
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct FakeGuest {
    pub frames: HashMap<u64, [u64; 512]>,
    next: u64,
    /// Number of compare-exchanges to fail on purpose (a concurrent writer) and the value
    /// to store instead when one does.
    pub fail_cas: usize,
    pub cas_calls: usize,
}

impl FakeGuest {
    /// Tables are allocated from 16 MB up.
    pub fn new() -> FakeGuest {
        FakeGuest { next: 0x100_0000, ..FakeGuest::default() }
    }

    pub fn alloc(&mut self) -> u64 {
        let pa = self.next;
        self.next += 4096;
        self.frames.insert(pa, [0; 512]);
        pa
    }

    pub fn read(&self, gpa: u64) -> u64 {
        self.frames[&(gpa & !0xfff)][((gpa & 0xfff) / 8) as usize]
    }

    pub fn write(&mut self, gpa: u64, v: u64) {
        self.frames.get_mut(&(gpa & !0xfff)).expect("unbacked write")[((gpa & 0xfff) / 8) as usize] = v;
    }

    /// Address of the entry for `la` at `level` (4..1) below `table`.
    pub fn slot(table: u64, la: u64, level: u32) -> u64 {
        table + ((la >> (12 + 9 * (level - 1))) & 0x1ff) * 8
    }

    /// Maps `la` to `gpa` with a page of `size`: the leaf gets `flags | P` (and PS for a
    /// large page), missing tables get `upper | P`; existing upper entries are kept.
    /// Returns the address of the leaf entry.
    pub fn map(&mut self, cr3: u64, la: u64, gpa: u64, size: PageSize, flags: u64, upper: u64) -> u64 {
        let leaf_level = match size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let mut t = cr3 & ADDR;
        for level in (leaf_level + 1..=4).rev() {
            let s = Self::slot(t, la, level);
            let e = self.read(s);
            if e & P == 0 {
                let n = self.alloc();
                self.write(s, n | upper | P);
                t = n;
            } else {
                t = e & ADDR;
            }
        }
        let s = Self::slot(t, la, leaf_level);
        let ps = if leaf_level > 1 { PS } else { 0 };
        self.write(s, gpa | flags | ps | P);
        s
    }

    /// The address of the entry at `level` on `la`'s path (the path must exist).
    pub fn entry_at(&self, cr3: u64, la: u64, level: u32) -> u64 {
        let mut t = cr3 & ADDR;
        for l in (level + 1..=4).rev() {
            t = self.read(Self::slot(t, la, l)) & ADDR;
        }
        Self::slot(t, la, level)
    }
}

/// Upper-level flags most tests use: writable, user.
pub const UPPER: u64 = RW | US;

impl GuestMem for FakeGuest {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.frames.get(&(gpa & !0xfff)).map(|f| f[((gpa & 0xfff) / 8) as usize])
    }
    fn cmpxchg_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Option<u64> {
        self.cas_calls += 1;
        let f = self.frames.get_mut(&(gpa & !0xfff))?;
        let e = &mut f[((gpa & 0xfff) / 8) as usize];
        let found = *e;
        if self.fail_cas > 0 {
            // Another CPU changed the entry just before (counts up in the ignored bits
            // 58:52).
            self.fail_cas -= 1;
            *e = found.wrapping_add(1 << 52);
            return Some(*e);
        }
        if found == expected {
            *e = new;
        }
        Some(found)
    }
}

/// Frame pool with frames at 256 GB and up, limited to `limit` frames.
pub struct FakePool {
    pub frames: HashMap<u64, [u64; 512]>,
    next: u64,
    pub limit: usize,
    pub taken: usize,
    pub returned: usize,
    /// Give a misaligned frame on the n-th take (tests of BadFrame).
    pub bad_at: Option<usize>,
}

impl FakePool {
    pub fn new(limit: usize) -> FakePool {
        FakePool { frames: HashMap::new(), next: 0x40_0000_0000, limit, taken: 0, returned: 0, bad_at: None }
    }
}

impl FramePool for FakePool {
    fn take_frame(&mut self) -> Option<u64> {
        if self.taken == self.limit {
            return None;
        }
        self.taken += 1;
        if self.bad_at == Some(self.taken) {
            return Some(0x1234);
        }
        let pa = self.next;
        self.next += 4096;
        self.frames.insert(pa, [0xdead_beef; 512]);
        Some(pa)
    }
    fn return_frame(&mut self, pa: u64) {
        self.returned += 1;
        if self.bad_at.is_some() && pa == 0x1234 {
            return;
        }
        assert!(self.frames.remove(&pa).is_some(), "foreign or double-returned frame {pa:#x}");
    }
    fn read_entry(&self, pa: u64, index: usize) -> u64 {
        self.frames[&pa][index]
    }
    fn write_entry(&mut self, pa: u64, index: usize, value: u64) {
        self.frames.get_mut(&pa).expect("write to a frame the pool did not give")[index] = value;
    }
}

/// The shadow tables as memory the test walks in place of the CPU.
impl GuestMem for FakePool {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.frames.get(&(gpa & !0xfff)).map(|f| f[((gpa & 0xfff) / 8) as usize])
    }
    fn cmpxchg_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Option<u64> {
        let f = self.frames.get_mut(&(gpa & !0xfff))?;
        let e = &mut f[((gpa & 0xfff) / 8) as usize];
        let found = *e;
        if found == expected {
            *e = new;
        }
        Some(found)
    }
}

/// Sizes for tests.
pub const G1: u64 = PAGE_1G;
pub const M2: u64 = PAGE_2M;

/// xorshift64*: deterministic randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
