//! Native-pc recovery: from any code-cache address back to the native pc it
//! stands for and the native register state there.
//!
//! Every byte the translator emits is covered by a [`MapEnt`]: from its
//! offset on (until the next entry), the native pc is a constant or is
//! computed from `rcx` (inside a lookup, where `rcx` holds the guest target),
//! the native `rsp` is the current `rsp` plus `sp` (undoing the inserted
//! sequence's pushes and red-zone steps), and the registers in `saved` have
//! their native values on the stack (a lookup's `rcx`/`rdx`, the registers a
//! client snippet clobbers), the highest-numbered one at `[rsp + top]`, the
//! next at `[rsp + top - 8]`, ... (they are always pushed in descending
//! register order). Every other register holds its native value.
//!
//! The index is lock-free for readers: a fault, NMI or signal handler may
//! call [`PcIndex::native_state`] on a CPU that holds the engine's lock. Each
//! region has a directory with one pointer per [`GRANULE`] bytes of its hot
//! and stub areas, set (Release) after a fragment's code is in place and
//! cleared when it is invalidated; the [`FragMeta`] it points to is
//! immutable and freed only at `Engine::reclaim`, after every CPU has passed
//! a quiescent point (an interrupted CPU has not).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::scratch::GuestCtx;

/// Allocation unit of both region areas; a granule belongs to one fragment.
pub const GRANULE: u64 = 32;
/// Regions the index can hold.
pub const MAX_REGIONS: usize = 64;

/// How the native pc is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Npc {
    /// This guest pc; the instruction there has not executed.
    At(u64),
    /// The guest target in `rcx` (a lookup: the transfer has happened).
    Rcx,
    /// `rcx + k` (a target check that subtracted its pc from `rcx`).
    RcxPlus(u64),
}

/// Where the native arithmetic flags (CF PF AF ZF SF OF) are, while a client
/// snippet that clobbers live flags runs (`templates::Emit::snippet`: `lahf;
/// seto al; push rax` before, `pop rax; add al,0x7f; sahf` after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    /// In rflags.
    Live,
    /// The `lahf`/`seto` image in the slot at `[rsp + off]`: SF ZF AF PF CF in
    /// bits 15..8 as `lahf` stores them, OF as bit 0.
    Stack(i16),
    /// That image in rax.
    Rax,
    /// SF ZF AF PF CF in ah; OF in rflags.
    Ah,
}

/// The native state from offset `off` of an area on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEnt {
    pub off: u32,
    pub npc: Npc,
    /// Native rsp = rsp + sp.
    pub sp: i32,
    /// Registers (bit = iced/hardware GPR number) whose native values are
    /// on the stack.
    pub saved: u16,
    /// Offset from rsp of the highest-numbered saved register's slot.
    pub top: i16,
    pub flags: Flags,
}

impl MapEnt {
    pub const fn at(pc: u64) -> MapEnt {
        MapEnt { off: 0, npc: Npc::At(pc), sp: 0, saved: 0, top: 0, flags: Flags::Live }
    }
}

/// The arithmetic flags of rflags.
pub const ARITH_FLAGS: u64 = 0x8D5;

/// `rflags` with its arithmetic flags replaced by those of a `lahf`/`seto`
/// image (`ah` = SF ZF 0 AF 0 PF 1 CF, `of` = bit 0: OF).
fn with_image(rflags: u64, ah: u64, of: bool) -> u64 {
    (rflags & !ARITH_FLAGS) | (ah & 0xD5) | if of { 0x800 } else { 0 }
}

/// What [`PcIndex::native_state`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativePc {
    pub pc: u64,
    /// Guest start of the fragment the cache address belongs to.
    pub fragment: u64,
    /// The arithmetic flags in the rewritten rflags came from a client
    /// snippet's save (the live ones were the snippet's). Elsewhere rflags is
    /// the interrupted one: native wherever the flags are live (dead flags a
    /// snippet clobbered without saving are not restored).
    pub flags_saved: bool,
}

/// Immutable metadata of one fragment: its cache areas and their maps.
pub struct FragMeta {
    pub start: u64,
    pub hot: u64,
    pub hot_len: u64,
    pub stub: u64,
    pub stub_len: u64,
    /// Sorted by offset; the first at offset 0.
    pub hot_map: Box<[MapEnt]>,
    pub stub_map: Box<[MapEnt]>,
}

impl FragMeta {
    fn ent(&self, pc: u64) -> Option<&MapEnt> {
        let (map, off) = if pc >= self.hot && pc < self.hot + self.hot_len {
            (&self.hot_map, pc - self.hot)
        } else if pc >= self.stub && pc < self.stub + self.stub_len {
            (&self.stub_map, pc - self.stub)
        } else {
            return None;
        };
        let i = map.partition_point(|e| e.off as u64 <= off);
        map.get(i.checked_sub(1)?)
    }
}

/// One region's directory.
pub struct RegionDir {
    pub base: u64,
    pub size: u64,
    slots: Box<[AtomicPtr<FragMeta>]>,
}

/// Bytes of region directories ever allocated, process-wide (what a
/// measurement of the dispatcher's other allocations subtracts).
pub static REGION_DIR_BYTES: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

impl RegionDir {
    /// Dispatcher-pool bytes the directory of a `size`-byte region takes
    /// (its slots, rounded up to the pool's block size).
    pub fn bytes_for(size: u64) -> usize {
        crate::pool::block_bytes(
            (size.div_ceil(GRANULE) as usize).saturating_mul(core::mem::size_of::<AtomicPtr<FragMeta>>()),
        )
    }

    pub fn new(base: u64, size: u64) -> RegionDir {
        let n = size.div_ceil(GRANULE) as usize;
        REGION_DIR_BYTES.fetch_add(Self::bytes_for(size), Ordering::Relaxed);
        let mut v = Vec::with_capacity(n);
        v.resize_with(n, || AtomicPtr::new(core::ptr::null_mut()));
        RegionDir { base, size, slots: v.into_boxed_slice() }
    }

    fn set(&self, lo: u64, len: u64, p: *mut FragMeta) {
        if len == 0 || lo < self.base {
            return;
        }
        let a = ((lo - self.base) / GRANULE) as usize;
        let b = ((lo - self.base + len).div_ceil(GRANULE) as usize).min(self.slots.len());
        for s in self.slots[a.min(b)..b].iter() {
            s.store(p, Ordering::Release);
        }
    }

    fn get(&self, pc: u64) -> *mut FragMeta {
        let i = ((pc - self.base) / GRANULE) as usize;
        self.slots.get(i).map_or(core::ptr::null_mut(), |s| s.load(Ordering::Acquire))
    }
}

/// The lock-free index over all regions.
pub struct PcIndex {
    regions: [AtomicPtr<RegionDir>; MAX_REGIONS],
}

impl Default for PcIndex {
    fn default() -> Self {
        PcIndex { regions: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_REGIONS] }
    }
}

impl Drop for PcIndex {
    fn drop(&mut self) {
        for r in self.regions.iter() {
            let p = r.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: published by `add_region` from a Box; the index is
                // being dropped with the engine, nothing reads it any more.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

impl PcIndex {
    /// Publish region `i`'s directory. False if `i` is out of range.
    pub fn add_region(&self, i: usize, base: u64, size: u64) -> bool {
        let Some(slot) = self.regions.get(i) else { return false };
        let d = Box::into_raw(Box::new(RegionDir::new(base, size)));
        let old = slot.swap(d, Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: regions are added once per index; a replaced one is
            // never read again (no code is placed in it).
            drop(unsafe { Box::from_raw(old) });
        }
        true
    }

    fn region_of(&self, pc: u64) -> Option<&RegionDir> {
        self.regions.iter().find_map(|r| {
            let p = r.load(Ordering::Acquire);
            // SAFETY: published directories live until the index is dropped.
            let d = unsafe { p.as_ref()? };
            (pc >= d.base && pc < d.base + d.size).then_some(d)
        })
    }

    /// Whether `pc` lies in a code-cache region (mapped or not).
    pub fn in_cache(&self, pc: u64) -> bool {
        self.region_of(pc).is_some()
    }

    /// Point the granules of `m`'s areas at `m`. The caller keeps `m`
    /// allocated (and unmoved) until it has retracted it and every CPU has
    /// passed a quiescent point.
    pub fn publish(&self, m: &FragMeta) {
        let p = m as *const FragMeta as *mut FragMeta;
        for (lo, len) in [(m.hot, m.hot_len), (m.stub, m.stub_len)] {
            if let Some(d) = self.region_of(lo) {
                d.set(lo, len, p);
            }
        }
    }

    /// Clear the granules of `m`'s areas (the meta itself stays valid until
    /// the caller frees it after quiescence).
    pub fn retract(&self, m: &FragMeta) {
        for (lo, len) in [(m.hot, m.hot_len), (m.stub, m.stub_len)] {
            if let Some(d) = self.region_of(lo) {
                d.set(lo, len, core::ptr::null_mut());
            }
        }
    }

    /// The native pc for code-cache address `regs.rip`, rewriting `regs` to
    /// the native state (rip, rsp and the registers saved on the stack).
    /// None if `rip` is not in a live fragment's code or stubs.
    ///
    /// # Safety
    /// `regs` is the state of a CPU interrupted at `regs.rip`, and its stack
    /// (`regs.rsp` up to the slots the map names) is readable.
    pub unsafe fn native_state(&self, regs: &mut GuestCtx) -> Option<NativePc> {
        let pc = regs.rip;
        let d = self.region_of(pc)?;
        let m = d.get(pc);
        // SAFETY: non-null directory entries point at metas freed only after
        // quiescence, which this interrupted CPU has not passed.
        let m = unsafe { m.as_ref()? };
        let e = *m.ent(pc)?;
        let rcx = regs.gpr[GuestCtx::RCX];
        let npc = match e.npc {
            Npc::At(p) => p,
            Npc::Rcx => rcx,
            Npc::RcxPlus(k) => rcx.wrapping_add(k),
        };
        let rsp = regs.gpr[GuestCtx::RSP];
        // Before the saved registers overwrite rax.
        let rax = regs.gpr[GuestCtx::RAX];
        regs.rflags = match e.flags {
            Flags::Live => regs.rflags,
            Flags::Stack(off) => {
                // SAFETY: the map says the slot holds the flags image, on the
                // interrupted stack (caller's contract).
                let img = unsafe { core::ptr::read_volatile(rsp.wrapping_add(off as i64 as u64) as *const u64) };
                with_image(regs.rflags, img >> 8, img & 1 != 0)
            }
            Flags::Rax => with_image(regs.rflags, rax >> 8, rax & 1 != 0),
            Flags::Ah => with_image(regs.rflags, rax >> 8, regs.rflags & 0x800 != 0),
        };
        let mut slot = rsp.wrapping_add(e.top as i64 as u64);
        for r in (0..16).rev() {
            if e.saved & (1 << r) != 0 {
                // SAFETY: the map says the slot holds a saved register, on
                // the interrupted stack (caller's contract).
                regs.gpr[r] = unsafe { core::ptr::read_volatile(slot as *const u64) };
                slot = slot.wrapping_sub(8);
            }
        }
        regs.gpr[GuestCtx::RSP] = rsp.wrapping_add(e.sp as i64 as u64);
        regs.rip = npc;
        Some(NativePc { pc: npc, fragment: m.start, flags_saved: e.flags != Flags::Live })
    }
}
