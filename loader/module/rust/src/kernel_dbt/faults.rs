//! Fault sites ([`dbt::Env::fault_slot`]): instructions of the translated module that have
//! an entry in its exception table (inline user accesses such as `unsafe_get_user`,
//! `rdmsr_safe`, `get_kernel_nofault`). When one faults the kernel looks the faulting pc
//! up in the exception table of the module holding that pc; translated, the pc is a
//! code-cache address in kdbt.ko, so kdbt's own table must know it.
//!
//! kdbt.ko carries one placeholder entry per slot of a small area at the end of the code
//! cache (`kdbt_cache.S`: 8192 slots of 32 bytes, type EX_TYPE_NONE). The engine asks for
//! a slot for each fault site it translates; this module copies the site's own entry
//! (fixup and type/data; the fixup stays the module's native address, which is not
//! executable while started, so the fixup is steered back into the cache by #VE like any
//! other entry; a fixup that is the next instruction becomes the slot's jump out, as
//! `EX_TYPE_ZEROPAD`'s handler measures the instruction as fixup − ip) into the slot's
//! entry, through a writable alias of the table's pages, and only then hands the slot out.
//!
//! A slot jumps out to the next instruction's native pc
//! (`Config::fault_slot_native_return`), so it depends on no fragment: a task asleep in a
//! page fault at a slot (its saved ip is the slot) may resume after its fragment was
//! reclaimed, or after the session ended (the native pc then runs natively), and a fault
//! it takes then still finds its fixup, because entries are never put back. Slots are
//! handed out round-robin over the module's life: never one to two instructions in a
//! session (a retranslation of a site from the same bytes, after an invalidation or a
//! cache reset, gets its slot again, `dbt::extable::SlotMemo`; when a session has used
//! them all, further fault sites are copied in line and counted: a fault of one would
//! oops), and across sessions the least recently used first, so a slot is
//! reused only after all the others were. What remains: a task that sleeps in a fault at a
//! slot through that many later translations would resume into another instruction.
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use dbt::extable::{self, Entry, SlotMemo, DATA_OFF, ENTRY_BYTES, FIXUP_OFF};

use crate::ffi;

/// Slots in the area (`KDBT_FAULT_SLOTS` in kdbt_cache.S).
pub const SLOTS: usize = FAULT_PAGES as usize * 4096 / dbt::FAULT_SLOT_BYTES;
/// Pages of the slot area, right before the steering pages (`KDBT_FAULT_PAGES`).
pub const FAULT_PAGES: u64 = 64;

/// Slots handed out since the module was loaded (the next is this modulo [`SLOTS`]).
static HANDED_OUT: AtomicUsize = AtomicUsize::new(0);

pub struct FaultSites {
    /// The module's exception table, absolute, sorted by instruction.
    sites: Vec<Entry>,
    /// First slot's address.
    area: u64,
    /// kdbt's own entry for each slot (its address), by slot index.
    entries: Vec<u64>,
    /// Writable aliases of the pages holding those entries: (page, alias).
    aliases: Vec<(u64, u64)>,
    /// The slot each site was last given, for its retranslations.
    memo: SlotMemo,
    /// Slots handed out; translations of a site that got its slot again; fault sites
    /// copied in line because none was left.
    pub placed: usize,
    pub again: u64,
    pub unplaced: u64,
    /// Test hook (`kdbt start --test-no-fault-slots`): never hand out a slot.
    disabled: bool,
}

/// The exception table at `base` with `n` entries, decoded.
///
/// # Safety
/// `base` is a live exception table of `n` entries (a module's, held by a reference).
unsafe fn read_table(base: u64, n: u32) -> Result<Vec<Entry>, &'static str> {
    let mut v = Vec::new();
    v.try_reserve(n as usize).map_err(|_| "out of memory")?;
    for k in 0..n as u64 {
        let at = base + k * ENTRY_BYTES;
        let p = at as *const i32;
        // SAFETY: the caller's contract: entry k of the table, three aligned i32.
        let w = unsafe { [p.read_volatile(), p.add(1).read_volatile(), p.add(2).read_volatile()] };
        v.push(extable::decode(at, w));
    }
    Ok(v)
}

impl FaultSites {
    /// The fault sites of `module` (a reference from `kdbt_glue_module_get`), slots from
    /// `area` (the code cache's slot pages). Process context (makes aliases).
    pub fn new(module: *mut core::ffi::c_void, area: u64, disabled: bool) -> Result<FaultSites, &'static str> {
        let mut n = 0u32;
        // SAFETY: the module is held by the caller's reference.
        let base = unsafe { ffi::kdbt_glue_module_extable(module, &mut n) };
        // SAFETY: the module's table is live (held).
        let sites = if base == 0 { Vec::new() } else { unsafe { read_table(base, n)? } };
        Self::with_sites(sites, area, disabled)
    }

    /// The fault sites of the kernel's own exception table, `n` entries at `base` (the
    /// kernel image's: checked by the caller to lie in it, 4-byte aligned).
    pub fn of_kernel(base: u64, n: u32, area: u64, disabled: bool) -> Result<FaultSites, &'static str> {
        // SAFETY: the caller's check: the kernel's table, mapped for the kernel's life.
        let mut sites = unsafe { read_table(base, n)? };
        // The build sorts it (sorttable); the lookup is a binary search either way.
        sites.sort_unstable_by_key(|e| e.insn);
        Self::with_sites(sites, area, disabled)
    }

    fn with_sites(sites: Vec<Entry>, area: u64, disabled: bool) -> Result<FaultSites, &'static str> {
        let mut own_n = 0u32;
        // SAFETY: NULL is this module.
        let own = unsafe { ffi::kdbt_glue_module_extable(core::ptr::null_mut(), &mut own_n) };
        // SAFETY: as above.
        let own_t = if own == 0 { Vec::new() } else { unsafe { read_table(own, own_n)? } };
        let mut entries = Vec::new();
        entries.try_reserve(SLOTS).map_err(|_| "out of memory")?;
        for k in 0..SLOTS as u64 {
            let slot = area + k * dbt::FAULT_SLOT_BYTES as u64;
            // The loader sorted the table by address (sort_extable).
            match own_t.binary_search_by_key(&slot, |e| e.insn) {
                Ok(i) => entries.push(own + i as u64 * ENTRY_BYTES),
                Err(_) => return Err("kdbt.ko's exception table lacks the fault slots' entries"),
            }
        }
        let memo = SlotMemo::new(sites.len()).ok_or("out of memory")?;
        let mut f =
            FaultSites { sites, area, entries, aliases: Vec::new(), memo, placed: 0, again: 0, unplaced: 0, disabled };
        let (lo, hi) = (f.entries[0] & !0xfff, (f.entries[SLOTS - 1] + ENTRY_BYTES - 1) & !0xfff);
        for page in (lo..=hi).step_by(4096) {
            f.aliases.try_reserve(1).map_err(|_| "out of memory")?;
            // SAFETY: process context; a page of this module's exception table; undone in Drop.
            let a = unsafe { ffi::kdbt_glue_page_alias(page) };
            if a == 0 {
                return Err("cannot map a writable alias of kdbt.ko's exception table");
            }
            f.aliases.push((page, a));
        }
        Ok(f)
    }

    /// Entries in the module's table.
    pub fn sites(&self) -> usize {
        self.sites.len()
    }

    /// The writable alias of the 4-byte field at `at` (entries are 4-byte aligned, so a
    /// field never straddles pages).
    fn field(&self, at: u64) -> Option<*mut i32> {
        let page = at & !0xfff;
        self.aliases.iter().find(|a| a.0 == page).map(|a| (a.1 + (at & 0xfff)) as *mut i32)
    }

    /// Rewrites slot `k`'s entry to continue at `fixup` with `data`.
    fn set(&mut self, k: usize, fixup: u64, data: u32) -> bool {
        let e = self.entries[k];
        let (Some(f), Some(d), Some(rel)) =
            (self.field(e + FIXUP_OFF), self.field(e + DATA_OFF), extable::fixup_field(e, fixup))
        else {
            return false;
        };
        // SAFETY: aligned fields of slot k's entry, through this session's alias. Nothing
        // can fault at the slot meanwhile: it is handed out only after this.
        unsafe {
            f.write_volatile(rel);
            d.write_volatile(data as i32);
        }
        true
    }

    /// A slot for the fault site at `pc` (decoded from `bytes`), its entry written
    /// ([`dbt::Env::fault_slot`]): the one it was given before for the same bytes, else
    /// a new one.
    pub fn slot(&mut self, pc: u64, bytes: &[u8]) -> Option<u64> {
        let i = extable::index_of(&self.sites, pc)?;
        let e = self.sites[i];
        let len = bytes.len();
        if self.disabled {
            self.unplaced += 1;
            return None;
        }
        if let Some(k) = self.memo.get(i, bytes) {
            self.again += 1;
            return Some(self.area + k as u64 * dbt::FAULT_SLOT_BYTES as u64);
        }
        if self.placed >= SLOTS {
            self.unplaced += 1;
            return None;
        }
        // Only the engine (under its lock) hands slots out; the counter outlives sessions.
        let k = HANDED_OUT.load(Ordering::Relaxed) % SLOTS;
        let slot = self.area + k as u64 * dbt::FAULT_SLOT_BYTES as u64;
        let fixup = if e.fixup == pc + len as u64 { slot + len as u64 } else { e.fixup };
        if !self.set(k, fixup, e.data) {
            self.unplaced += 1;
            return None;
        }
        HANDED_OUT.store(k + 1, Ordering::Relaxed);
        self.memo.put(i, bytes, k);
        self.placed += 1;
        Some(slot)
    }
}

impl Drop for FaultSites {
    /// Drops the aliases (process context). The entries stay as they are (see the module
    /// comment).
    fn drop(&mut self) {
        for &(_, a) in &self.aliases {
            // SAFETY: an alias from `new`, no longer used.
            unsafe { ffi::kdbt_glue_cache_unalias(a) };
        }
    }
}
