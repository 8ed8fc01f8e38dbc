//! The EPT identity map: building it, walking it in software, changing the permissions
//! of single 4 KiB pages and mapping single 4 KiB pages elsewhere (splitting 1 GiB and
//! 2 MiB pages on demand).
//!
//! Paging structures are reached only through [`FrameAllocator`], so this code has no
//! `unsafe` and is tested on the host against fake physical memory.
//!
//! Concurrency: the tables are live while other CPUs run guests on them. The caller
//! serializes all mutations (one lock); every entry change is one 64-bit store
//! ([`FrameAllocator::write_entry`] must be a single, non-torn store), a split table is
//! filled completely before the entry pointing to it is published, and an INVEPT on every
//! CPU is required when a function says so.
use core::fmt;

use bitflags::bitflags;

use crate::mtrr::{MemType, Mtrrs};

/// Size of the pages this crate allocates for paging structures.
pub const PAGE_SIZE: u64 = 4096;
pub const SIZE_2M: u64 = 1 << 21;
pub const SIZE_1G: u64 = 1 << 30;
/// A 4-level EPT translates 48-bit guest-physical addresses.
pub const MAX_GPA_4LEVEL: u64 = 1 << 48;

/// Allocation of, and access to, 4 KiB paging-structure frames.
pub trait FrameAllocator {
    /// A zeroed, 4 KiB-aligned frame; returns its physical address. `None` when out of
    /// memory.
    fn alloc_zeroed(&mut self) -> Option<u64>;
    /// Frees a frame returned by [`FrameAllocator::alloc_zeroed`].
    fn free(&mut self, pa: u64);
    /// Reads entry `index` (0..512) of the table at `pa`.
    fn read_entry(&self, pa: u64, index: usize) -> u64;
    /// Writes entry `index` of the table at `pa` with one 64-bit store.
    fn write_entry(&mut self, pa: u64, index: usize, value: u64);
}

bitflags! {
    /// EPT access rights of a page (bits 0-2 of an EPT entry).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        const R = 1 << 0;
        const W = 1 << 1;
        /// Execute (supervisor-mode execute when MBEC is on; kdbt does not use MBEC).
        const X = 1 << 2;
    }
}

impl Perms {
    pub const NONE: Perms = Perms::empty();
    pub const RW: Perms = Perms::R.union(Perms::W);
    pub const RX: Perms = Perms::R.union(Perms::X);
    pub const RWX: Perms = Perms::R.union(Perms::W).union(Perms::X);
}

impl fmt::Display for Perms {
    /// `rwx` style, `-` for a missing right.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |p: Perms, ch: char| if self.contains(p) { ch } else { '-' };
        write!(f, "{}{}{}", c(Perms::R, 'r'), c(Perms::W, 'w'), c(Perms::X, 'x'))
    }
}

/// What the hardware offers for building the map (from IA32_VMX_EPT_VPID_CAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EptCaps {
    pub pages_2m: bool,
    pub pages_1g: bool,
    /// WB allowed as the paging-structure memory type in the EPTP (else UC is used).
    pub wb_allowed: bool,
    /// Execute-only translations allowed.
    pub execute_only: bool,
    /// Accessed/dirty flags supported.
    pub ad_bits: bool,
}

impl EptCaps {
    /// From the raw IA32_VMX_EPT_VPID_CAP value (bit 0 execute-only, 14 WB, 16 2 MiB,
    /// 17 1 GiB, 21 A/D). The caller must also know that "enable EPT" may be set at all.
    pub fn from_ept_vpid_cap(raw: u64) -> EptCaps {
        let b = |n: u32| raw & (1 << n) != 0;
        EptCaps { execute_only: b(0), wb_allowed: b(14), pages_2m: b(16), pages_1g: b(17), ad_bits: b(21) }
    }
}

/// The EPT pointer of a 4-level map whose PML4 is at `pml4`: WB paging structures when
/// allowed (else UC), page-walk length 4, A/D flags when asked for and supported.
pub fn eptp_for(pml4: u64, caps: &EptCaps, enable_ad: bool) -> u64 {
    let t = if caps.wb_allowed { MemType::Wb } else { MemType::Uc };
    let ad = if enable_ad && caps.ad_bits { 1 << 6 } else { 0 };
    pml4 | t.bits() | (3 << 3) | ad
}

/// Page sizes of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => SIZE_2M,
            PageSize::Size1G => SIZE_1G,
        }
    }
}

/// A translation found by [`Ept::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub hpa: u64,
    pub perms: Perms,
    pub memtype: MemType,
    pub page_size: PageSize,
    /// Ignore-PAT bit of the leaf.
    pub ignore_pat: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// The frame allocator returned nothing. Nothing was changed.
    OutOfMemory,
    /// `max_phys` is 0 or above what a 4-level EPT maps.
    BadLimit,
    /// The address is not mapped (beyond the identity-mapped range).
    NotMapped,
    /// Write without read (an EPT misconfiguration).
    InvalidPerms(Perms),
    /// Execute-only requested but the CPU does not support it.
    ExecuteOnlyUnsupported,
    /// The frame allocator returned an address that is not 4 KiB-aligned or not below
    /// 2^52 (it was given back).
    BadFrame(u64),
    /// A paging-structure entry has a form this code never writes.
    Corrupt { level: u8, entry: u64 },
    /// The host-physical address of a remap ([`Ept::remap_4k`]) is not 4 KiB-aligned or
    /// not below the map's limit.
    BadTarget(u64),
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EptError::OutOfMemory => f.write_str("out of memory for EPT paging structures"),
            EptError::BadLimit => f.write_str("guest-physical limit is 0 or above 2^48"),
            EptError::NotMapped => f.write_str("guest-physical address not mapped"),
            EptError::InvalidPerms(p) => write!(f, "invalid EPT permissions {p} (write requires read)"),
            EptError::ExecuteOnlyUnsupported => f.write_str("execute-only EPT pages are not supported by this CPU"),
            EptError::BadFrame(pa) => write!(f, "frame allocator returned an unusable address {pa:#x}"),
            EptError::Corrupt { level, entry } => write!(f, "unexpected EPT entry {entry:#x} at level {level}"),
            EptError::BadTarget(hpa) => {
                write!(f, "host-physical address {hpa:#x} is not a page below the EPT map's limit")
            }
        }
    }
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const LARGE: u64 = 1 << 7;
const IPAT: u64 = 1 << 6;
const PERM_MASK: u64 = 0b111;
const TYPE_SHIFT: u32 = 3;
/// Non-leaf entries grant everything; leaves decide.
const NONLEAF: u64 = 0b111;

fn leaf(pa: u64, perms: Perms, t: MemType, large: bool) -> u64 {
    // IPAT clear: the guest's PAT still combines with the EPT type, which is the MTRR type,
    // so the effective type equals what the kernel had natively.
    (pa & ADDR_MASK) | perms.bits() as u64 | (t.bits() << TYPE_SHIFT) | if large { LARGE } else { 0 }
}

fn entry_perms(e: u64) -> Perms {
    Perms::from_bits_truncate((e & PERM_MASK) as u8)
}

fn entry_type(e: u64) -> MemType {
    MemType::from_bits_or_uc((e >> TYPE_SHIFT) & 7)
}

fn present(e: u64) -> bool {
    // An EPT entry is present if any of bits 2:0 is set; kdbt's non-present leaves with
    // perms NONE keep their address and type in a software bit instead (see NOPERM_MARK).
    e & PERM_MASK != 0 || e & NOPERM_MARK != 0
}

/// Software-available bit 11 marks a leaf whose permissions are NONE (not-present to the
/// CPU) but which still records address, type and size, so permissions can be restored.
const NOPERM_MARK: u64 = 1 << 11;

fn idx(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Validity of a permission set.
pub fn check_perms(p: Perms, caps: &EptCaps) -> Result<(), EptError> {
    if p.contains(Perms::W) && !p.contains(Perms::R) {
        return Err(EptError::InvalidPerms(p));
    }
    if p == Perms::X && !caps.execute_only {
        return Err(EptError::ExecuteOnlyUnsupported);
    }
    Ok(())
}

fn make_leaf(pa: u64, perms: Perms, t: MemType, large: bool) -> u64 {
    let e = leaf(pa, perms, t, large);
    if perms.is_empty() {
        e | NOPERM_MARK
    } else {
        e
    }
}

/// Statistics of a built map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tables: u64,
    pub pages_1g: u64,
    pub pages_2m: u64,
    pub pages_4k: u64,
}

/// An EPT hierarchy owned together with its frame allocator.
pub struct Ept<A: FrameAllocator> {
    alloc: A,
    pml4: u64,
    caps: EptCaps,
    limit: u64,
    stats: Stats,
}

impl<A: FrameAllocator> Ept<A> {
    /// Builds the identity map of `[0, max_phys)` (rounded up to 4 KiB): every page
    /// readable, writable and executable, with its MTRR memory type, using 1 GiB and 2 MiB
    /// pages where the caps allow and the MTRR type is uniform over the page. On failure,
    /// every frame allocated so far is freed and the allocator is handed back.
    pub fn build_identity(max_phys: u64, mtrrs: &Mtrrs, caps: EptCaps, alloc: A) -> Result<Self, (EptError, A)> {
        let limit = match max_phys.checked_add(PAGE_SIZE - 1) {
            Some(v) if max_phys != 0 && v & !(PAGE_SIZE - 1) <= MAX_GPA_4LEVEL => v & !(PAGE_SIZE - 1),
            _ => return Err((EptError::BadLimit, alloc)),
        };
        let mut alloc = alloc;
        let pml4 = match take_frame(&mut alloc) {
            Ok(pa) => pa,
            Err(e) => return Err((e, alloc)),
        };
        let mut ept = Ept { alloc, pml4, caps, limit, stats: Stats { tables: 1, ..Stats::default() } };
        match ept.fill(mtrrs) {
            Ok(()) => Ok(ept),
            Err(e) => {
                let a = ept.destroy();
                Err((e, a))
            }
        }
    }

    fn new_table(&mut self) -> Result<u64, EptError> {
        let t = take_frame(&mut self.alloc)?;
        self.stats.tables += 1;
        Ok(t)
    }

    fn fill(&mut self, mtrrs: &Mtrrs) -> Result<(), EptError> {
        let limit = self.limit;
        let mut g = 0u64;
        while g < limit {
            let i4 = idx(g, 4);
            let mut pdpt = self.alloc.read_entry(self.pml4, i4) & ADDR_MASK;
            if pdpt == 0 {
                pdpt = self.new_table()?;
                self.alloc.write_entry(self.pml4, i4, pdpt | NONLEAF);
            }
            // One 1 GiB region.
            let whole = g + SIZE_1G <= limit;
            match (self.caps.pages_1g && whole).then(|| mtrrs.type_of_range(g, SIZE_1G)).flatten() {
                Some(t) => {
                    self.alloc.write_entry(pdpt, idx(g, 3), make_leaf(g, Perms::RWX, t, true));
                    self.stats.pages_1g += 1;
                }
                None => {
                    let pd = self.new_table()?;
                    self.alloc.write_entry(pdpt, idx(g, 3), pd | NONLEAF);
                    let mut m = g;
                    while m < g + SIZE_1G && m < limit {
                        let whole = m + SIZE_2M <= limit;
                        match (self.caps.pages_2m && whole).then(|| mtrrs.type_of_range(m, SIZE_2M)).flatten() {
                            Some(t) => {
                                self.alloc.write_entry(pd, idx(m, 2), make_leaf(m, Perms::RWX, t, true));
                                self.stats.pages_2m += 1;
                            }
                            None => {
                                let pt = self.new_table()?;
                                let mut p = m;
                                while p < m + SIZE_2M && p < limit {
                                    let t = mtrrs.type_of_range(p, PAGE_SIZE).unwrap_or(MemType::Uc);
                                    self.alloc.write_entry(pt, idx(p, 1), make_leaf(p, Perms::RWX, t, false));
                                    self.stats.pages_4k += 1;
                                    p += PAGE_SIZE;
                                }
                                self.alloc.write_entry(pd, idx(m, 2), pt | NONLEAF);
                            }
                        }
                        m += SIZE_2M;
                    }
                }
            }
            g += SIZE_1G;
        }
        Ok(())
    }

    /// The EPT pointer: WB paging-structure type when allowed (else UC), 4-level walk,
    /// accessed/dirty flags when `enable_ad` and supported.
    pub fn eptp(&self, enable_ad: bool) -> u64 {
        eptp_for(self.pml4, &self.caps, enable_ad)
    }

    /// Physical address of the PML4 table.
    pub fn pml4(&self) -> u64 {
        self.pml4
    }
    /// End of the identity-mapped range.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    pub fn caps(&self) -> &EptCaps {
        &self.caps
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Calls `f` with the physical address of every paging-structure frame of the map,
    /// the PML4 first.
    pub fn for_each_table(&self, mut f: impl FnMut(u64)) {
        self.visit(self.pml4, 4, &mut f);
    }

    fn visit(&self, table: u64, level: u8, f: &mut impl FnMut(u64)) {
        f(table);
        if level > 1 {
            for i in 0..512 {
                let e = self.alloc.read_entry(table, i);
                if e & PERM_MASK != 0 && e & LARGE == 0 && e & NOPERM_MARK == 0 {
                    self.visit(e & ADDR_MASK, level - 1, f);
                }
            }
        }
    }

    /// Whether `pa` is one of the map's paging-structure frames.
    pub fn is_table(&self, pa: u64) -> bool {
        let pa = pa & !(PAGE_SIZE - 1);
        let mut found = false;
        self.for_each_table(|t| found |= t == pa);
        found
    }

    /// Mutable access to the allocator (e.g. to refill a pool of frames it keeps).
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.alloc
    }

    /// Walks to the leaf for `gpa`: (table, index, level, entry).
    fn walk(&self, gpa: u64) -> Result<(u64, usize, u8, u64), EptError> {
        if gpa >= self.limit {
            return Err(EptError::NotMapped);
        }
        let mut table = self.pml4;
        for level in (1..=4u8).rev() {
            let i = idx(gpa, level);
            let e = self.alloc.read_entry(table, i);
            if !present(e) {
                return Err(EptError::NotMapped);
            }
            let is_leaf = level == 1 || (e & LARGE != 0 && level <= 3);
            if level == 4 && e & LARGE != 0 {
                return Err(EptError::Corrupt { level, entry: e });
            }
            if is_leaf {
                return Ok((table, i, level, e));
            }
            table = e & ADDR_MASK;
        }
        unreachable_walk()
    }

    /// Software translation of `gpa`, for tests and diagnostics.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        let (_, _, level, e) = self.walk(gpa).ok()?;
        let size = match level {
            3 => PageSize::Size1G,
            2 => PageSize::Size2M,
            _ => PageSize::Size4K,
        };
        let off = gpa & (size.bytes() - 1);
        Some(Translation {
            hpa: (e & ADDR_MASK & !(size.bytes() - 1)) + off,
            perms: entry_perms(e),
            memtype: entry_type(e),
            page_size: size,
            ignore_pat: e & IPAT != 0,
        })
    }

    /// Permissions of the page holding `gpa`.
    pub fn perms_of(&self, gpa: u64) -> Option<Perms> {
        self.translate(gpa).map(|t| t.perms)
    }

    /// Replaces the large leaf `e` (at `table[i]`, `level` 3 or 2) by a table of 512 leaves
    /// of the next size down with the same type and permissions. The new table is complete
    /// before it is published. Returns the new table.
    fn split(&mut self, table: u64, i: usize, level: u8, e: u64) -> Result<u64, EptError> {
        let child_size = if level == 3 { SIZE_2M } else { PAGE_SIZE };
        let base = e & ADDR_MASK & !(child_size * 512 - 1);
        let perms = entry_perms(e);
        let t = entry_type(e);
        let new = self.new_table()?;
        for k in 0..512u64 {
            let child = make_leaf(base + k * child_size, perms, t, level == 3) | (e & IPAT);
            self.alloc.write_entry(new, k as usize, child);
        }
        self.alloc.write_entry(table, i, new | NONLEAF);
        if level == 3 {
            self.stats.pages_1g = self.stats.pages_1g.saturating_sub(1);
            self.stats.pages_2m += 512;
        } else {
            self.stats.pages_2m = self.stats.pages_2m.saturating_sub(1);
            self.stats.pages_4k += 512;
        }
        Ok(new)
    }

    /// The 4 KiB leaf for `gpa` (table, index, entry), splitting the large leaf `e` the
    /// walk found (at `table[i]`, `level`) down to it if needed.
    fn split_to_4k(
        &mut self,
        gpa: u64,
        mut table: u64,
        mut i: usize,
        mut level: u8,
        mut e: u64,
    ) -> Result<(u64, usize, u64), EptError> {
        while level > 1 {
            let new = self.split(table, i, level, e)?;
            level -= 1;
            table = new;
            i = idx(gpa, level);
            e = self.alloc.read_entry(table, i);
        }
        Ok((table, i, e))
    }

    /// Sets the permissions of the 4 KiB page holding `gpa`, splitting a 1 GiB or 2 MiB
    /// page into smaller ones if needed (the rest keep their type and permissions).
    /// Returns whether the map changed, i.e. whether the caller must INVEPT on every CPU
    /// (a split alone changes no translation, but stale large-page TLB entries must go too).
    /// Refused without any change: write-without-read, execute-only when unsupported,
    /// unmapped addresses. On allocation failure the permissions are unchanged, but a
    /// 1 GiB -> 2 MiB split already done stays (it changes no translation or right, so no
    /// INVEPT is needed for it).
    pub fn set_perms_4k(&mut self, gpa: u64, perms: Perms) -> Result<bool, EptError> {
        check_perms(perms, &self.caps)?;
        let (table, i, level, e) = self.walk(gpa)?;
        if entry_perms(e) == perms {
            return Ok(false);
        }
        let (table, i, e) = self.split_to_4k(gpa, table, i, level, e)?;
        let new = make_leaf(e & ADDR_MASK, perms, entry_type(e), false) | (e & IPAT);
        self.alloc.write_entry(table, i, new);
        Ok(true)
    }

    /// Maps the 4 KiB page holding `gpa` to the host-physical page `hpa` with `perms`,
    /// splitting a 1 GiB or 2 MiB page into smaller ones if needed (the rest keep their
    /// translation, type and permissions, as with [`Ept::set_perms_4k`]). The leaf keeps
    /// the memory type and ignore-PAT bit `gpa` had (its MTRR type): `hpa` should be
    /// memory of the same type. `hpa == gpa & !0xfff` restores the identity mapping.
    /// Returns whether the map changed, i.e. whether the caller must INVEPT on every CPU.
    /// Refused without any change: the [`Ept::set_perms_4k`] refusals, and an `hpa` that
    /// is not 4 KiB-aligned or not below [`Ept::limit`] ([`EptError::BadTarget`]). On
    /// allocation failure the mapping is unchanged (a 1 GiB -> 2 MiB split already done
    /// stays, as with [`Ept::set_perms_4k`]).
    pub fn remap_4k(&mut self, gpa: u64, hpa: u64, perms: Perms) -> Result<bool, EptError> {
        check_perms(perms, &self.caps)?;
        if hpa & (PAGE_SIZE - 1) != 0 || hpa >= self.limit {
            return Err(EptError::BadTarget(hpa));
        }
        let (table, i, level, e) = self.walk(gpa)?;
        let size = match level {
            3 => SIZE_1G,
            2 => SIZE_2M,
            _ => PAGE_SIZE,
        };
        let now = (e & ADDR_MASK & !(size - 1)) + (gpa & (size - 1) & !(PAGE_SIZE - 1));
        if now == hpa && entry_perms(e) == perms {
            return Ok(false);
        }
        let (table, i, e) = self.split_to_4k(gpa, table, i, level, e)?;
        let new = make_leaf(hpa, perms, entry_type(e), false) | (e & IPAT);
        self.alloc.write_entry(table, i, new);
        Ok(true)
    }

    /// [`Ept::set_perms_4k`] for every 4 KiB page overlapping `[gpa, gpa + len)`. Stops at
    /// the first error; pages already changed stay changed, and the error comes with
    /// whether an INVEPT is needed for them.
    pub fn set_perms_range(&mut self, gpa: u64, len: u64, perms: Perms) -> Result<bool, (EptError, bool)> {
        check_perms(perms, &self.caps).map_err(|e| (e, false))?;
        let Some(end) = gpa.checked_add(len) else {
            return Err((EptError::NotMapped, false));
        };
        if end > self.limit {
            return Err((EptError::NotMapped, false));
        }
        let mut invept = false;
        let mut p = gpa & !(PAGE_SIZE - 1);
        while p < end {
            match self.set_perms_4k(p, perms) {
                Ok(changed) => invept |= changed,
                Err(e) => return Err((e, invept)),
            }
            p += PAGE_SIZE;
        }
        Ok(invept)
    }

    /// Frees every paging structure and returns the allocator. Only after the map is no
    /// longer in use by any CPU.
    pub fn destroy(mut self) -> A {
        self.free_table(self.pml4, 4);
        self.alloc
    }

    fn free_table(&mut self, table: u64, level: u8) {
        if level > 1 {
            for i in 0..512 {
                let e = self.alloc.read_entry(table, i);
                if e & PERM_MASK != 0 && e & LARGE == 0 && e & NOPERM_MARK == 0 {
                    self.free_table(e & ADDR_MASK, level - 1);
                }
            }
        }
        self.alloc.free(table);
    }
}

/// A frame from the allocator, refused (and given back) unless 4 KiB-aligned and within
/// the 52-bit physical-address range an EPT entry can hold.
fn take_frame(alloc: &mut impl FrameAllocator) -> Result<u64, EptError> {
    let pa = alloc.alloc_zeroed().ok_or(EptError::OutOfMemory)?;
    if pa & !ADDR_MASK != 0 {
        alloc.free(pa);
        return Err(EptError::BadFrame(pa));
    }
    Ok(pa)
}

#[inline]
fn unreachable_walk() -> Result<(u64, usize, u8, u64), EptError> {
    // The loop returns at level 1 at the latest.
    Err(EptError::NotMapped)
}

#[cfg(test)]
pub(crate) mod tests;
