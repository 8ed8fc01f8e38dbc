//! The per-CPU shadow MMU: shadow hierarchies per (guest CR3, PCID), filled lazily on
//! `#PF` from the guest walk, and the entry points of the VM-exit handler.
//!
//! The model: each CPU's shadow tables play the role of that CPU's TLB. A shadow leaf is
//! only ever derived from a successful guest walk (with the guest's A/D bits set first),
//! with permissions never wider than the guest's; it lives until the guest does something
//! that would flush the corresponding TLB entry natively (INVLPG, INVPCID, a flushing CR3
//! write, a CR4 change) or until a `#PF` at its address. Guest page-table pages are not
//! write-protected: like the CPU, the MMU relies on the guest's own TLB discipline.
//! Because every CPU has its own MMU, a guest TLB shootdown (an IPI after which each CPU
//! flushes locally) reaches every CPU's shadow exactly as it reaches every TLB.
//!
//! Every entry point returns the [`HwFlush`] the exit handler must do on this CPU before
//! the next VM entry (the real TLB caches translations of the shadow tables).
use core::fmt;

use crate::policy::{PagePolicy, PolicyLookup};
use crate::pool::{FramePool, FreeList};
use crate::tree::{self, FROM_1G, FROM_2M};
use crate::walk::bits::{A, ADDR, D, G, P, PAT_4K, PCD, PWT, RW, US, XD};
use crate::walk::{
    translate, Access, AccessKind, PageSize, PagingCtx, PfErrorCode, Translation, WalkError, MAX_AD_RETRIES,
};
use crate::GuestMem;

/// Shadow hierarchies cached per CPU. KPTI with Linux's 6 dynamic ASIDs uses 12.
pub const MAX_ROOTS: usize = 16;
/// The least frames an MMU works with: one full path (PML4, PDPT, PD, PT).
pub const MIN_FRAMES: usize = 4;

const CR3_NOFLUSH: u64 = 1 << 63;

/// What the exit handler must do to the real TLB of this CPU (VPID-tagged) before the next
/// VM entry. Ordered by strength; [`HwFlush::merge`] gives one that covers both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HwFlush {
    None,
    /// INVVPID individual-address (type 0) for this linear address.
    Page(u64),
    /// INVVPID single-context-retaining-globals (type 3).
    NonGlobal,
    /// INVVPID single-context (type 1): everything, also paging-structure caches (needed
    /// whenever shadow frames were freed: they may be reused at another level).
    Context,
}

impl HwFlush {
    pub fn merge(self, other: HwFlush) -> HwFlush {
        match (self, other) {
            (HwFlush::None, x) | (x, HwFlush::None) => x,
            (a, b) if a == b => a,
            // Two pages, or a page and non-global (the page may be global): everything.
            _ => HwFlush::Context,
        }
    }
}

/// Result of [`Mmu::on_cr3_write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr3Action {
    /// The value for the VMCS guest CR3: the shadow PML4 with the guest's PCID (with
    /// CR4.PCIDE) or 0 in bits 11:0.
    pub shadow_cr3: u64,
    /// What the guest reads back from CR3 (the value written without bit 63).
    pub guest_cr3: u64,
    pub flush: HwFlush,
}

/// Result of [`Mmu::on_page_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfOutcome {
    /// The guest's tables allow the access; the shadow now does too. Resume the guest
    /// (the faulting instruction runs again) after the flush.
    Resolved { flush: HwFlush },
    /// The guest's own tables make the access fault: inject `#PF` with this error code and
    /// CR2.
    Reflect { error_code: PfErrorCode, cr2: u64 },
    /// The guest allows the access but the page's policy forbids it (a write to a
    /// not-writable page, a fetch from a not-executable one). Nothing was changed in the
    /// guest's entries; the policy's owner decides (e.g. lift the policy and resume).
    Policy { la: u64, gpa: u64, access: AccessKind },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuError {
    /// The pool gave a frame that is not 4 KiB-aligned or not below 2^52.
    BadFrame(u64),
    /// The pool gave fewer than [`MIN_FRAMES`] frames (all were returned).
    TooFewFrames(usize),
    /// A paging mode or control the MMU does not handle.
    Unsupported(&'static str),
    /// The value would make MOV to CR3 raise `#GP` (reserved bits, or bit 63 without
    /// CR4.PCIDE): the exit handler injects `#GP(0)`.
    InvalidCr3(u64),
    /// The INVPCID operands would raise `#GP` (type above 3, PCID above 4095, a non-zero
    /// PCID without CR4.PCIDE for types 0 and 1, a non-canonical address for type 0).
    InvalidInvpcid,
    /// A guest paging structure lies outside memory [`GuestMem`] reads.
    Unbacked(u64),
    /// A `#PF` for a non-canonical address (cannot come from the CPU).
    NonCanonical(u64),
    /// A `#PF` the shadow tables cannot explain (reserved bit in a shadow entry, a
    /// shadow-stack or SGX access).
    UnexpectedFault(PfErrorCode),
    /// No frame even after a full reset (cannot happen with [`MIN_FRAMES`] frames).
    OutOfFrames,
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::BadFrame(pa) => write!(f, "frame pool gave an unusable frame {pa:#x}"),
            MmuError::TooFewFrames(n) => write!(f, "{n} shadow frames, at least {MIN_FRAMES} needed"),
            MmuError::Unsupported(what) => write!(f, "unsupported paging setting: {what}"),
            MmuError::InvalidCr3(v) => write!(f, "MOV to CR3 of {v:#x} raises #GP"),
            MmuError::InvalidInvpcid => f.write_str("INVPCID operands raise #GP"),
            MmuError::Unbacked(gpa) => write!(f, "guest paging structure at unbacked {gpa:#x}"),
            MmuError::NonCanonical(la) => write!(f, "#PF at non-canonical {la:#x}"),
            MmuError::UnexpectedFault(ec) => write!(f, "#PF the shadow cannot explain, error code {:#x}", ec.bits()),
            MmuError::OutOfFrames => f.write_str("no shadow frame after a full reset"),
        }
    }
}

/// Event counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `#PF` exits fixed in the shadow without the guest seeing them.
    pub faults_resolved: u64,
    /// `#PF` exits reflected to the guest.
    pub faults_reflected: u64,
    /// `#PF` exits denied by the policy.
    pub policy_faults: u64,
    pub cr3_switches: u64,
    pub invlpgs: u64,
    pub invpcids: u64,
    /// The pool ran dry and every hierarchy but the current one was dropped.
    pub reclaims: u64,
    /// The pool ran dry with nothing else to drop: the current hierarchy was emptied.
    pub pool_resets: u64,
    /// A hierarchy dropped to make room in the root cache.
    pub root_evictions: u64,
    /// Everything dropped for a guest flush of all translations (INVPCID type 2, a change
    /// of CR4.PGE/PCIDE or EFER.NXE).
    pub full_flushes: u64,
    /// Guest walks redone because an entry changed under the A/D update.
    pub ad_retries: u64,
    /// Shadow leaves restricted by [`Mmu::apply_policy`].
    pub policy_downgrades: u64,
}

/// Counters plus the current occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub counters: Counters,
    /// Shadow frames holding tables (including every cached PML4).
    pub pages_in_use: usize,
    pub pages_total: usize,
    pub roots: usize,
}

#[derive(Clone, Copy, Debug)]
struct Root {
    pml4: u64,
    /// Guest CR3 bits 51:12.
    cr3: u64,
    pcid: u16,
    last_use: u64,
    /// A flush of non-global translations happened for this PCID while the hierarchy was
    /// not current: clear its non-global leaves before it is used.
    stale: bool,
}

/// The shadow MMU of one CPU.
pub struct Mmu<F: FramePool> {
    pool: F,
    free: FreeList,
    ctx: PagingCtx,
    roots: [Option<Root>; MAX_ROOTS],
    current: usize,
    /// The guest's CR3 (without bit 63).
    guest_cr3: u64,
    clock: u64,
    /// Frames were freed since the last flush the handler was told to do.
    pending_context: bool,
    counters: Counters,
}

fn canonical(la: u64) -> bool {
    let top = (la as i64) >> 47;
    top == 0 || top == -1
}

/// The shadow leaf for the 4 KiB piece of `t` at its `gpa`, after an access that set D if
/// `wrote`.
fn shadow_leaf(t: &Translation, wrote: bool, policy: PagePolicy) -> u64 {
    let mut e = (t.gpa & ADDR) | P | A;
    if t.writable && (t.dirty || wrote) && !policy.contains(PagePolicy::NOT_WRITABLE) {
        e |= RW | D;
    }
    if t.user {
        e |= US;
    }
    if t.nx || policy.contains(PagePolicy::NOT_EXECUTABLE) {
        e |= XD;
    }
    if t.global {
        e |= G;
    }
    if t.pat_index & 1 != 0 {
        e |= PWT;
    }
    if t.pat_index & 2 != 0 {
        e |= PCD;
    }
    if t.pat_index & 4 != 0 {
        e |= PAT_4K;
    }
    e |= ((t.pkey & 0xf) as u64) << 59;
    e | match t.size {
        PageSize::Size4K => 0,
        PageSize::Size2M => FROM_2M,
        PageSize::Size1G => FROM_1G,
    }
}

impl<F: FramePool> Mmu<F> {
    /// Takes `frames` frames from `pool` and starts with the guest's current `cr3`. On
    /// error every frame taken is given back with the pool.
    pub fn new(mut pool: F, frames: usize, ctx: PagingCtx, cr3: u64) -> Result<Self, (MmuError, F)> {
        if !ctx.wp {
            return Err((MmuError::Unsupported("CR0.WP=0"), pool));
        }
        let mut free = FreeList::new();
        for _ in 0..frames {
            match pool.take_frame() {
                Some(pa) if pa & 0xfff == 0 && pa < 1 << 52 => free.adopt(&mut pool, pa),
                Some(pa) => {
                    pool.return_frame(pa);
                    free.drain(&mut pool);
                    return Err((MmuError::BadFrame(pa), pool));
                }
                None => break,
            }
        }
        if free.total() < MIN_FRAMES {
            let n = free.total();
            free.drain(&mut pool);
            return Err((MmuError::TooFewFrames(n), pool));
        }
        let (base, pcid) = match Self::decode_cr3(&ctx, cr3) {
            Ok(v) => v,
            Err(e) => {
                free.drain(&mut pool);
                return Err((e, pool));
            }
        };
        let mut mmu = Mmu {
            pool,
            free,
            ctx,
            roots: [None; MAX_ROOTS],
            current: 0,
            guest_cr3: cr3 & !CR3_NOFLUSH,
            clock: 0,
            pending_context: true,
            counters: Counters::default(),
        };
        let pml4 = mmu.free.pop(&mut mmu.pool).ok_or(MmuError::OutOfFrames);
        match pml4 {
            Ok(pml4) => mmu.roots[0] = Some(Root { pml4, cr3: base, pcid, last_use: 0, stale: false }),
            Err(e) => return Err((e, mmu.release())),
        }
        Ok(mmu)
    }

    /// Frees everything and gives every frame back to the pool.
    pub fn release(mut self) -> F {
        for slot in 0..MAX_ROOTS {
            self.drop_root(slot);
        }
        self.free.drain(&mut self.pool);
        self.pool
    }

    /// (CR3 bits 51:12, PCID) of a CR3 value (bit 63 already handled by the caller).
    fn decode_cr3(ctx: &PagingCtx, v: u64) -> Result<(u64, u16), MmuError> {
        if v & !CR3_NOFLUSH & (0xfff0_0000_0000_0000 | ctx.rsvd_addr_mask()) != 0 {
            return Err(MmuError::InvalidCr3(v));
        }
        let pcid = if ctx.pcide { (v & 0xfff) as u16 } else { 0 };
        Ok((v & ADDR, pcid))
    }

    pub fn ctx(&self) -> &PagingCtx {
        &self.ctx
    }

    pub fn pool(&self) -> &F {
        &self.pool
    }

    pub fn guest_cr3(&self) -> u64 {
        self.guest_cr3
    }

    /// The value for the VMCS guest CR3 now.
    pub fn shadow_cr3(&self) -> u64 {
        match &self.roots[self.current] {
            Some(r) => r.pml4 | if self.ctx.pcide { r.pcid as u64 } else { 0 },
            None => 0,
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn stats(&self) -> Stats {
        Stats {
            counters: self.counters,
            pages_in_use: self.free.total() - self.free.free(),
            pages_total: self.free.total(),
            roots: self.roots.iter().filter(|r| r.is_some()).count(),
        }
    }

    fn take_flush(&mut self, f: HwFlush) -> HwFlush {
        if core::mem::take(&mut self.pending_context) {
            HwFlush::Context
        } else {
            f
        }
    }

    fn current_pml4(&self) -> u64 {
        self.roots[self.current].map_or(0, |r| r.pml4)
    }

    /// Frees a hierarchy and its PML4.
    fn drop_root(&mut self, slot: usize) {
        if let Some(r) = self.roots[slot].take() {
            tree::free_below(&mut self.pool, &mut self.free, r.pml4);
            self.free.push(&mut self.pool, r.pml4);
            self.pending_context = true;
        }
    }

    /// Drops every hierarchy except the current one. True if any was dropped.
    fn drop_others(&mut self) -> bool {
        let mut any = false;
        for slot in 0..MAX_ROOTS {
            if slot != self.current && self.roots[slot].is_some() {
                self.drop_root(slot);
                any = true;
            }
        }
        any
    }

    /// Empties the current hierarchy (its PML4 stays).
    fn empty_current(&mut self) {
        let pml4 = self.current_pml4();
        if pml4 != 0 && tree::free_below(&mut self.pool, &mut self.free, pml4) > 0 {
            self.pending_context = true;
        }
    }

    /// Everything gone: what a flush of all translations, global ones too, means.
    fn flush_everything(&mut self) {
        self.counters.full_flushes += 1;
        self.drop_others();
        self.empty_current();
        if let Some(r) = self.roots[self.current].as_mut() {
            r.stale = false;
        }
        self.pending_context = true;
    }

    /// Clears the current hierarchy's non-global leaves if a flush is pending for it.
    fn freshen_current(&mut self) {
        if let Some(r) = self.roots[self.current].as_mut() {
            if r.stale {
                r.stale = false;
                let pml4 = r.pml4;
                tree::clear_nonglobal(&mut self.pool, pml4);
            }
        }
    }

    /// A frame for a new PML4: a free one, else after dropping every hierarchy (the
    /// caller is leaving the current one).
    fn frame_for_root(&mut self) -> Result<u64, MmuError> {
        if let Some(f) = self.free.pop(&mut self.pool) {
            return Ok(f);
        }
        self.counters.reclaims += 1;
        for slot in 0..MAX_ROOTS {
            self.drop_root(slot);
        }
        self.free.pop(&mut self.pool).ok_or(MmuError::OutOfFrames)
    }

    /// Makes (base, pcid) the current hierarchy, creating it if needed.
    fn switch_root(&mut self, base: u64, pcid: u16) -> Result<(), MmuError> {
        self.clock += 1;
        let found = self.roots.iter().position(|r| matches!(r, Some(r) if r.cr3 == base && r.pcid == pcid));
        if let Some(slot) = found {
            self.current = slot;
        } else {
            let slot = match self.roots.iter().position(|r| r.is_none()) {
                Some(s) => s,
                None => {
                    // Full: evict the least recently used (never the current one: the
                    // new root is not it, and it is dropped below only if still LRU).
                    let lru = (0..MAX_ROOTS)
                        .filter(|&s| s != self.current)
                        .min_by_key(|&s| self.roots[s].map_or(0, |r| r.last_use))
                        .unwrap_or(0);
                    self.drop_root(lru);
                    self.counters.root_evictions += 1;
                    lru
                }
            };
            let pml4 = self.frame_for_root()?;
            self.roots[slot] = Some(Root { pml4, cr3: base, pcid, last_use: 0, stale: false });
            self.current = slot;
        }
        if let Some(r) = self.roots[self.current].as_mut() {
            r.last_use = self.clock;
        }
        Ok(())
    }

    fn mark_stale(&mut self, pcid: Option<u16>) {
        for r in self.roots.iter_mut().flatten() {
            if pcid.is_none_or(|p| p == r.pcid) {
                r.stale = true;
            }
        }
    }

    /// The guest wrote `value` to CR3 with `cr4` in effect (CR4.PCIDE decides whether bits
    /// 11:0 are a PCID and bit 63 means "do not flush"). Without the no-flush bit the
    /// guest's non-global translations for the PCID are flushed (every hierarchy with that
    /// PCID keeps only its global leaves); global leaves survive in every hierarchy, as
    /// global TLB entries survive natively. The hierarchy for (CR3, PCID) is reused if
    /// cached.
    pub fn on_cr3_write(&mut self, value: u64, cr4: u64) -> Result<Cr3Action, MmuError> {
        let pcide = cr4 & (1 << 17) != 0;
        if pcide != self.ctx.pcide {
            return Err(MmuError::Unsupported("CR4.PCIDE differs from the MMU's: call set_ctx on CR4 writes"));
        }
        if !pcide && value & CR3_NOFLUSH != 0 {
            return Err(MmuError::InvalidCr3(value));
        }
        let noflush = value & CR3_NOFLUSH != 0;
        let v = value & !CR3_NOFLUSH;
        let (base, pcid) = Self::decode_cr3(&self.ctx, v)?;
        self.counters.cr3_switches += 1;
        if !noflush {
            self.mark_stale(Some(pcid));
        }
        self.switch_root(base, pcid)?;
        self.guest_cr3 = v;
        self.freshen_current();
        let flush = self.take_flush(if noflush { HwFlush::None } else { HwFlush::NonGlobal });
        Ok(Cr3Action { shadow_cr3: self.shadow_cr3(), guest_cr3: v, flush })
    }

    /// New CR0/CR4/EFER paging controls (from [`PagingCtx::from_regs`]). A change of
    /// CR4.PGE, CR4.PCIDE, EFER.NXE (or of the CPUID facts) flushes everything, as the
    /// CPU does for PGE and PCIDE; SMEP and SMAP need no shadow change (the shadow leaves
    /// carry the guest's U/S and the CPU checks them itself) but are flushed too.
    pub fn set_ctx(&mut self, ctx: PagingCtx) -> Result<HwFlush, MmuError> {
        if !ctx.wp {
            return Err(MmuError::Unsupported("CR0.WP=0"));
        }
        if ctx == self.ctx {
            return Ok(HwFlush::None);
        }
        let old = self.ctx;
        self.ctx = ctx;
        let deep = old.pge != ctx.pge
            || old.pcide != ctx.pcide
            || old.nxe != ctx.nxe
            || old.maxphyaddr != ctx.maxphyaddr
            || old.pages_1g != ctx.pages_1g;
        if deep {
            self.flush_everything();
            let pcid = if ctx.pcide { (self.guest_cr3 & 0xfff) as u16 } else { 0 };
            if let Some(r) = self.roots[self.current].as_mut() {
                r.pcid = pcid;
            }
        }
        Ok(self.take_flush(HwFlush::Context))
    }

    /// The guest executed INVLPG `la`: `la`'s shadow leaf goes in every hierarchy (global
    /// translations are shared by all PCIDs; non-global ones of other PCIDs go too, which
    /// is allowed), and if `la` was part of a 2 MB or 1 GB guest page, every shadowed piece
    /// of it. A non-canonical `la` is a no-op, as natively.
    pub fn on_invlpg(&mut self, la: u64) -> HwFlush {
        self.counters.invlpgs += 1;
        if !canonical(la) {
            return self.take_flush(HwFlush::None);
        }
        let f = self.invalidate(la, None);
        self.take_flush(f)
    }

    fn invalidate(&mut self, la: u64, pcid: Option<u16>) -> HwFlush {
        let mut range = false;
        for slot in 0..MAX_ROOTS {
            if let Some(r) = self.roots[slot] {
                if pcid.is_none_or(|p| p == r.pcid) {
                    range |= tree::invalidate(&mut self.pool, r.pml4, la).range;
                }
            }
        }
        // The real TLB caches 4 KiB pieces: a range is more than one INVVPID.
        if range {
            HwFlush::Context
        } else {
            HwFlush::Page(la)
        }
    }

    /// The guest executed INVPCID with `kind` 0 (one address of one PCID), 1 (one PCID,
    /// except globals), 2 (everything, globals too) or 3 (everything except globals).
    pub fn on_invpcid(&mut self, kind: u64, pcid: u64, la: u64) -> Result<HwFlush, MmuError> {
        if kind > 3 || pcid > 0xfff || (kind <= 1 && pcid != 0 && !self.ctx.pcide) || (kind == 0 && !canonical(la)) {
            return Err(MmuError::InvalidInvpcid);
        }
        self.counters.invpcids += 1;
        let pcid = pcid as u16;
        let f = match kind {
            0 => self.invalidate(la, Some(pcid)),
            1 => {
                self.mark_stale(Some(pcid));
                self.freshen_current();
                HwFlush::NonGlobal
            }
            2 => {
                self.flush_everything();
                HwFlush::Context
            }
            _ => {
                self.mark_stale(None);
                self.freshen_current();
                HwFlush::NonGlobal
            }
        };
        Ok(self.take_flush(f))
    }

    /// Installs `leaf` for `la` in the current hierarchy, reclaiming when the pool is dry:
    /// first every other hierarchy is dropped, then the current one is emptied.
    fn install_current(&mut self, la: u64, leaf: u64) -> Result<(), MmuError> {
        for stage in 0..3 {
            let pml4 = self.current_pml4();
            if pml4 == 0 {
                // No current hierarchy (only after a failed root creation).
                return Err(MmuError::OutOfFrames);
            }
            match tree::install(&mut self.pool, &mut self.free, pml4, la, leaf) {
                Ok(()) => return Ok(()),
                Err(tree::OutOfFrames) => match stage {
                    0 if self.drop_others() => self.counters.reclaims += 1,
                    0 | 1 => {
                        self.counters.pool_resets += 1;
                        self.empty_current();
                    }
                    _ => break,
                },
            }
        }
        Err(MmuError::OutOfFrames)
    }

    /// A `#PF` exit at `la` with the CPU's `error_code`; `rflags` of the guest (AC matters
    /// for SMAP). `mem` is the guest's memory, `policy` the page policy.
    pub fn on_page_fault<M: GuestMem + ?Sized, L: PolicyLookup + ?Sized>(
        &mut self,
        mem: &mut M,
        policy: &L,
        la: u64,
        error_code: u32,
        rflags: u64,
    ) -> Result<PfOutcome, MmuError> {
        let ec = PfErrorCode::from_bits_retain(error_code);
        if ec.contains(PfErrorCode::PK) {
            // The shadow leaf carries the guest's key and the CPU checked the guest's
            // PKRU: the guest's own protection faulted.
            self.counters.faults_reflected += 1;
            return Ok(PfOutcome::Reflect { error_code: ec, cr2: la });
        }
        if ec.intersects(PfErrorCode::RSVD | PfErrorCode::SS | PfErrorCode::SGX) {
            return Err(MmuError::UnexpectedFault(ec));
        }
        if !canonical(la) {
            return Err(MmuError::NonCanonical(la));
        }
        let access = Access::from_error_code(ec, rflags & (1 << 18) != 0);
        for _ in 0..MAX_AD_RETRIES {
            let w = match translate(mem, &self.ctx, self.guest_cr3, la, access) {
                Ok(w) => w,
                Err(WalkError::PageFault(gec)) => {
                    // Natively a #PF invalidates the TLB entries for the address.
                    let pml4 = self.current_pml4();
                    tree::zap_leaf(&mut self.pool, pml4, la);
                    self.counters.faults_reflected += 1;
                    return Ok(PfOutcome::Reflect { error_code: gec, cr2: la });
                }
                Err(WalkError::Unbacked(gpa)) => return Err(MmuError::Unbacked(gpa)),
                Err(WalkError::NonCanonical) => return Err(MmuError::NonCanonical(la)),
                Err(WalkError::Contended) => continue,
            };
            let t = w.translation;
            let pol = policy.policy(t.gpa);
            let denied = match access.kind {
                AccessKind::Write => pol.contains(PagePolicy::NOT_WRITABLE),
                AccessKind::Fetch => pol.contains(PagePolicy::NOT_EXECUTABLE),
                AccessKind::Read => false,
            };
            if denied {
                self.counters.policy_faults += 1;
                return Ok(PfOutcome::Policy { la, gpa: t.gpa, access: access.kind });
            }
            match w.set_accessed_dirty(mem) {
                Ok(()) => {}
                Err(WalkError::Contended) => {
                    self.counters.ad_retries += 1;
                    continue;
                }
                Err(WalkError::Unbacked(gpa)) => return Err(MmuError::Unbacked(gpa)),
                // set_accessed_dirty gives no other error; redo the walk if it did.
                Err(_) => continue,
            }
            let leaf = shadow_leaf(&t, access.kind == AccessKind::Write, pol);
            self.install_current(la, leaf)?;
            self.counters.faults_resolved += 1;
            return Ok(PfOutcome::Resolved { flush: self.take_flush(HwFlush::None) });
        }
        // The guest keeps changing the entries: let it run; the access faults again.
        Ok(PfOutcome::Resolved { flush: self.take_flush(HwFlush::None) })
    }

    /// Applies `policy` of the guest-physical page containing `gpa` to the shadow leaves
    /// already written, in every hierarchy: writable leaves mapping the page lose R/W
    /// (not writable), executable ones get XD (not executable). Found by a scan of every
    /// shadow leaf (no reverse map; see `README.md`). Loosening needs nothing here: the
    /// next fault writes the wider leaf. Call it after updating the policy store.
    pub fn apply_policy(&mut self, gpa: u64, policy: PagePolicy) -> HwFlush {
        let page = gpa & ADDR;
        let mut changed = 0;
        for slot in 0..MAX_ROOTS {
            if let Some(r) = self.roots[slot] {
                changed += tree::for_each_leaf(&mut self.pool, r.pml4, |_, e| {
                    if e & ADDR != page {
                        return None;
                    }
                    let mut n = e;
                    if policy.contains(PagePolicy::NOT_WRITABLE) {
                        n &= !RW;
                    }
                    if policy.contains(PagePolicy::NOT_EXECUTABLE) {
                        n |= XD;
                    }
                    Some(n)
                });
            }
        }
        self.counters.policy_downgrades += changed as u64;
        self.take_flush(if changed > 0 { HwFlush::Context } else { HwFlush::None })
    }

    /// The shadow leaf of `la` in the current hierarchy (0 if none): for tests and
    /// diagnostics.
    pub fn shadow_leaf(&self, la: u64) -> u64 {
        tree::leaf_slot(&self.pool, self.current_pml4(), la).map_or(0, |(pt, i)| self.pool.read_entry(pt, i))
    }
}

#[cfg(test)]
mod tests;
