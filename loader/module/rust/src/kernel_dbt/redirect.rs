//! Entry redirects (`kdbt start --kernel`): the entry text stays native (under KPTI it
//! runs on the user page tables, which do not map the code cache), but its direct calls
//! and jumps into the translated text (`call do_syscall_64`, each `idtentry`'s call of
//! its C handler, `ret_from_fork`, ...) enter the cache through trampolines instead of a
//! #VE each ([`dbt::entry_calls`]).
//!
//! The entry text's pages are copied; in the copies each such site's rel32 leads to a
//! trampoline for its target (in the first steering page of the cache, within rel32 of
//! the kernel's text). Root mode then maps each entry page's guest-physical address to its
//! copy, readable and executable, not writable ([`hv::remap_pages`]): the same virtual
//! addresses, in every address space (KPTI's user page tables too), now run the copy.
//! Reads of those pages see the copy (only the redirected rel32 fields differ from the
//! kernel's bytes). A write to one (nothing in the kernel patches entry text after boot;
//! this is the safe path if something does) violates EPT; the #VE write handler maps that
//! page back to the original, writable, before the write is retried
//! ([`revert_on_write`]), so the write lands in the kernel's own page, which then runs
//! natively with #VE steering as before. Stop maps every page back (identity, RWX, INVEPT
//! on every CPU) before the copies are freed.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use dbt::entry_calls::{direct_sites, trampoline, TRAMPOLINE_BYTES};
use vmx::hypercall::{Call, ERR_BUSY, OK};

use crate::{ffi, hv};

/// The live redirect, read by the #VE write handler; null when none.
static LIVE: AtomicPtr<Redirect> = AtomicPtr::new(core::ptr::null_mut());

pub struct Redirect {
    /// (guest-physical entry page, its copy's virtual address, the copy's physical address).
    pages: Vec<(u64, *mut u8, u64)>,
    /// Mapped back to the original by a write.
    reverted: Vec<AtomicBool>,
    /// Redirected sites and their distinct targets.
    pub sites: u64,
    pub targets: u64,
    /// Pages mapped back by writes.
    pub writes: AtomicU64,
    mapped: bool,
}

// SAFETY: the copies are this redirect's own pages; after `map` they are only read (by
// the CPU executing them) and freed in Drop after every CPU stopped using them.
unsafe impl Send for Redirect {}
// SAFETY: as above; shared state is atomic.
unsafe impl Sync for Redirect {}

impl Redirect {
    /// Copies the pages of `entry` (`exact`: the entry text inside them, decoded for its
    /// direct calls and jumps) and points every site whose target `translated` accepts
    /// at a trampoline written at `tramp_x` (executable; `tramp_w` its writable alias,
    /// `cap` bytes) leading into `lookup`. Process context. Nothing is mapped yet.
    pub fn build(
        entry: (u64, u64),
        exact: (u64, u64),
        translated: impl Fn(u64) -> bool,
        (tramp_x, tramp_w, cap): (u64, u64, usize),
        lookup: u64,
    ) -> Result<Redirect, String> {
        let len =
            exact.1.checked_sub(exact.0).filter(|&l| l <= 1 << 20).ok_or("entry text range is not sane")? as usize;
        // SAFETY: the entry text, kernel text mapped for the kernel's life (checked by
        // the caller to lie in the kernel's text).
        let code = unsafe { core::slice::from_raw_parts(exact.0 as *const u8, len) };
        let sites = direct_sites(code, exact.0, &translated)
            .map_err(|pc| format!("entry text does not decode at {pc:#x}: not redirected"))?;
        let mut r = Redirect {
            pages: Vec::new(),
            reverted: Vec::new(),
            sites: 0,
            targets: 0,
            writes: AtomicU64::new(0),
            mapped: false,
        };
        let n = ((entry.1 - entry.0) / 4096) as usize;
        r.pages.try_reserve_exact(n).map_err(|_| "out of memory")?;
        r.reverted.try_reserve_exact(n).map_err(|_| "out of memory")?;
        for va in (entry.0..entry.1).step_by(4096) {
            // SAFETY: a page of the kernel's text (see above).
            let gpa = unsafe { ffi::kdbt_glue_kernel_text_to_phys(va) } & !0xfff;
            // SAFETY: one page; freed in Drop.
            let copy = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u8;
            if copy.is_null() || gpa == 0 {
                if !copy.is_null() {
                    // SAFETY: just allocated.
                    unsafe { ffi::kdbt_glue_free_pages(copy.cast(), 0) };
                }
                return Err(format!("entry page {va:#x}: no copy (out of memory or no physical page)"));
            }
            // SAFETY: a whole page of kernel text into our fresh page.
            unsafe { core::ptr::copy_nonoverlapping(va as *const u8, copy, 4096) };
            // SAFETY: our page (direct map).
            let pa = unsafe { ffi::kdbt_glue_virt_to_phys(copy as *const _) };
            r.pages.push((gpa, copy, pa));
            r.reverted.push(AtomicBool::new(false));
        }
        // One trampoline per target, in order of first use.
        let mut tramps: Vec<(u64, u64)> = Vec::new();
        tramps.try_reserve(sites.len()).map_err(|_| "out of memory")?;
        for s in &sites {
            let t = match tramps.iter().find(|t| t.0 == s.target) {
                Some(t) => t.1,
                None => {
                    let off = tramps.len() * TRAMPOLINE_BYTES;
                    if off + TRAMPOLINE_BYTES > cap {
                        return Err(format!("more than {} entry targets", cap / TRAMPOLINE_BYTES));
                    }
                    let at = tramp_x + off as u64;
                    let b = trampoline(at, s.target, lookup).ok_or("entry trampoline out of reach")?;
                    // SAFETY: the writable alias of the trampoline page, inside `cap`.
                    unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), (tramp_w + off as u64) as *mut u8, b.len()) };
                    tramps.push((s.target, at));
                    at
                }
            };
            let rel = s.rel_to(t).ok_or("entry trampoline out of rel32 reach")?;
            for (k, byte) in rel.to_le_bytes().into_iter().enumerate() {
                let a = s.rel_at() + k as u64;
                let i = ((a - entry.0) / 4096) as usize;
                let page = r.pages.get(i).ok_or("entry site outside the entry pages")?.1;
                // SAFETY: a byte of our copy of page i (not mapped for execution yet).
                unsafe { page.add((a & 0xfff) as usize).write(byte) };
            }
        }
        (r.sites, r.targets) = (sites.len() as u64, tramps.len() as u64);
        Ok(r)
    }

    /// Runs the copies: each entry page's guest-physical address maps to its copy,
    /// readable and executable (INVEPT on every CPU). The redirect must stay where it is
    /// until Drop (the write handler reads it).
    pub fn map(&mut self) -> Result<(), String> {
        let mut pairs = Vec::new();
        pairs.try_reserve_exact(self.pages.len()).map_err(|_| "out of memory")?;
        pairs.extend(self.pages.iter().map(|p| (p.0, p.2)));
        LIVE.store(self as *mut Redirect, Ordering::Release);
        // Mapped as soon as any page may be (an error leaves the pages before it changed).
        self.mapped = true;
        hv::remap_pages(&pairs, ::ept::Perms::RX)
    }

    /// Every entry page back to itself, readable, writable and executable (INVEPT on every
    /// CPU), before the session's #VE goes off. Process context. On error the copies may
    /// still run: the caller must then leak the redirect (its pages and the handler's view
    /// of it stay valid).
    pub fn unmap(&mut self) -> Result<(), String> {
        if !self.mapped {
            return Ok(());
        }
        let mut pairs = Vec::new();
        pairs.try_reserve_exact(self.pages.len()).map_err(|_| "out of memory")?;
        pairs.extend(self.pages.iter().map(|p| (p.0, p.0)));
        hv::remap_pages(&pairs, ::ept::Perms::RWX)?;
        LIVE.store(core::ptr::null_mut(), Ordering::Release);
        self.mapped = false;
        Ok(())
    }
}

impl Drop for Redirect {
    /// Frees the copies (unmapped by [`Redirect::unmap`] first: a redirect still mapped is
    /// leaked by its owner, never dropped).
    fn drop(&mut self) {
        if self.mapped {
            return;
        }
        for &(_, copy, _) in &self.pages {
            // SAFETY: our pages, mapped nowhere for execution any more (every CPU ran
            // INVEPT after the mapping back).
            unsafe { ffi::kdbt_glue_free_pages(copy.cast(), 0) };
        }
    }
}

/// The #VE write handler's first step: a write to an entry page running its copy maps
/// that page back to the original, writable (on this CPU at once: INVEPT here; another
/// CPU that still has the copy cached may run the copy's bytes until its next INVEPT, and
/// comes here too if it writes). True if `gpa` was such a page and the write may be
/// retried.
pub fn revert_on_write(gpa: u64) -> bool {
    let r = LIVE.load(Ordering::Acquire);
    if r.is_null() {
        return false;
    }
    // SAFETY: a live redirect stays alive until every CPU has left this handler (the
    // session unmaps, which clears LIVE, then switches #VE off everywhere, before the
    // redirect is dropped).
    let r = unsafe { &*r };
    let page = gpa & !0xfff;
    let Some(i) = r.pages.iter().position(|p| p.0 == page) else { return false };
    let mut res = ERR_BUSY;
    for _ in 0..100_000 {
        res = hv::hypercall2(Call::EptRemap, page | ::ept::Perms::RWX.bits() as u64, page);
        if res != ERR_BUSY {
            break;
        }
        core::hint::spin_loop();
    }
    if res & (1 << 63) != 0 || hv::hypercall(Call::EptInvalidate, 0) != OK {
        return false;
    }
    if !r.reverted[i].swap(true, Ordering::AcqRel) {
        r.writes.fetch_add(1, Ordering::Relaxed);
    }
    true
}
