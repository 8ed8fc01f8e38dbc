//! Software walk of the guest's 4-level page tables (CR4.PAE=1, EFER.LMA=1, CR4.LA57=0).
//!
//! [`translate`] only reads: it returns the translation or the `#PF` error code the CPU
//! would push for the access. [`Walk::set_accessed_dirty`] then sets the accessed bit in
//! every entry used and, for a write, the dirty bit in the leaf, each with one atomic
//! compare-exchange ([`GuestMem::cmpxchg_u64`]); if an entry changed since it was read the
//! exchange fails and the whole walk is redone ([`walk`] does both with bounded retries).
//! Accessed and dirty bits are set only for an access that does not fault, after the
//! permission checks: the guest never sees an A or D bit for an access that did not
//! happen (Linux does not rely on A bits being set by faulting walks).
//!
//! Not modelled: protection keys (a PK fault is reported by the CPU itself and the MMU
//! reflects it as is, see [`crate::mmu`]), CET shadow-stack accesses, implicit supervisor
//! accesses from CPL 3 (they are checked as explicit ones, SMAP honours [`Access::ac`]),
//! 5-level paging, HLAT.
use bitflags::bitflags;

use crate::GuestMem;

pub const PAGE_4K: u64 = 1 << 12;
pub const PAGE_2M: u64 = 1 << 21;
pub const PAGE_1G: u64 = 1 << 30;

/// Bits of a paging-structure entry.
pub mod bits {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const PWT: u64 = 1 << 3;
    pub const PCD: u64 = 1 << 4;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    /// Page size in a PDPTE/PDE; PAT in a PTE.
    pub const PS: u64 = 1 << 7;
    pub const PAT_4K: u64 = 1 << 7;
    pub const G: u64 = 1 << 8;
    /// PAT in a 2 MB / 1 GB leaf.
    pub const PAT_LARGE: u64 = 1 << 12;
    pub const XD: u64 = 1 << 63;
    /// Protection key of a leaf (bits 62:59).
    pub const PK_MASK: u64 = 0xf << 59;
    /// Address bits 51:12.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

use bits::*;

bitflags! {
    /// The error code of a `#PF`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PfErrorCode: u32 {
        /// 0: the page was not present; 1: a protection (or reserved-bit) violation.
        const P = 1 << 0;
        /// The access was a write.
        const W = 1 << 1;
        /// The access was a user-mode (CPL 3) access.
        const U = 1 << 2;
        /// A reserved bit was set in some paging-structure entry.
        const RSVD = 1 << 3;
        /// The access was an instruction fetch (reported only with EFER.NXE or CR4.SMEP).
        const ID = 1 << 4;
        /// Protection-key violation.
        const PK = 1 << 5;
        /// Shadow-stack access.
        const SS = 1 << 6;
        /// SGX-specific access-control violation.
        const SGX = 1 << 15;
    }
}

/// The kind of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// One access to a linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    pub kind: AccessKind,
    /// A CPL 3 access (else supervisor).
    pub user: bool,
    /// RFLAGS.AC of a supervisor data access: with CR4.SMAP it allows user pages.
    pub ac: bool,
}

impl Access {
    pub const fn new(kind: AccessKind, user: bool) -> Access {
        Access { kind, user, ac: false }
    }
    pub const fn sup(kind: AccessKind) -> Access {
        Access::new(kind, false)
    }
    pub const fn usr(kind: AccessKind) -> Access {
        Access::new(kind, true)
    }
    /// The access a `#PF` error code describes (W/R, U/S, I/D); `ac` from RFLAGS.
    pub fn from_error_code(ec: PfErrorCode, ac: bool) -> Access {
        let kind = if ec.contains(PfErrorCode::ID) {
            AccessKind::Fetch
        } else if ec.contains(PfErrorCode::W) {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        Access { kind, user: ec.contains(PfErrorCode::U), ac }
    }
}

/// The paging controls a walk depends on (from CR0, CR4, EFER and CPUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingCtx {
    /// CR0.WP.
    pub wp: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// CR4.PGE: the G bit of a leaf makes the translation global.
    pub pge: bool,
    /// CR4.PCIDE: CR3 bits 11:0 are the PCID.
    pub pcide: bool,
    /// EFER.NXE: bit 63 is XD (else reserved).
    pub nxe: bool,
    /// CPUID.80000008H:EAX[7:0], 36..=52.
    pub maxphyaddr: u8,
    /// CPUID.80000001H:EDX.Page1GB: PS in a PDPTE is allowed.
    pub pages_1g: bool,
}

impl PagingCtx {
    /// Linux's usual x86-64 setting: WP, SMEP, SMAP, PGE, NXE, 1 GB pages, MAXPHYADDR 46.
    pub const LINUX: PagingCtx = PagingCtx {
        wp: true,
        smep: true,
        smap: true,
        pge: true,
        pcide: false,
        nxe: true,
        maxphyaddr: 46,
        pages_1g: true,
    };

    /// From the guest's CR0, CR4 and EFER and two CPUID facts. Only 4-level paging
    /// (CR0.PG, CR4.PAE, EFER.LMA, no CR4.LA57) is handled.
    pub fn from_regs(cr0: u64, cr4: u64, efer: u64, maxphyaddr: u8, pages_1g: bool) -> Result<PagingCtx, &'static str> {
        let b = |v: u64, n: u32| v & (1 << n) != 0;
        if !b(cr0, 31) || !b(cr4, 5) || !b(efer, 10) {
            return Err("not 4-level paging (CR0.PG, CR4.PAE, EFER.LMA)");
        }
        if b(cr4, 12) {
            return Err("5-level paging (CR4.LA57)");
        }
        if !(36..=52).contains(&maxphyaddr) {
            return Err("MAXPHYADDR outside 36..=52");
        }
        Ok(PagingCtx {
            wp: b(cr0, 16),
            smep: b(cr4, 20),
            smap: b(cr4, 21),
            pge: b(cr4, 7),
            pcide: b(cr4, 17),
            nxe: b(efer, 11),
            maxphyaddr,
            pages_1g,
        })
    }

    /// Address bits 51:MAXPHYADDR, reserved in every entry.
    pub fn rsvd_addr_mask(&self) -> u64 {
        let m = self.maxphyaddr.clamp(12, 52) as u32;
        ADDR & !((1u64 << m) - 1)
    }
}

/// Page sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_4K,
            PageSize::Size2M => PAGE_2M,
            PageSize::Size1G => PAGE_1G,
        }
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address of the linear address.
    pub gpa: u64,
    pub size: PageSize,
    /// R/W of every level.
    pub writable: bool,
    /// U/S of every level.
    pub user: bool,
    /// XD of any level (only with EFER.NXE).
    pub nx: bool,
    /// The leaf's G bit with CR4.PGE.
    pub global: bool,
    /// The leaf's D bit as read (before this access set it).
    pub dirty: bool,
    /// PAT index of the leaf: PAT << 2 | PCD << 1 | PWT.
    pub pat_index: u8,
    /// The leaf's protection key (bits 62:59).
    pub pkey: u8,
}

/// Why a walk gave no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkError {
    /// The CPU would raise `#PF` with this error code (CR2 = the linear address).
    PageFault(PfErrorCode),
    /// The linear address is not canonical (`#GP`, not `#PF`).
    NonCanonical,
    /// A paging-structure entry lies at a guest-physical address [`GuestMem`] refused.
    Unbacked(u64),
    /// The entries kept changing under the accessed/dirty update.
    Contended,
}

/// A translation together with the entries it was read from, for
/// [`Walk::set_accessed_dirty`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    pub translation: Translation,
    /// (guest-physical address, value read) of each entry, top level first.
    entries: [(u64, u64); 4],
    levels: usize,
    write: bool,
}

/// How often [`walk`] redoes a walk whose accessed/dirty update lost a race.
pub const MAX_AD_RETRIES: usize = 8;

fn canonical(la: u64) -> bool {
    let top = (la as i64) >> 47;
    top == 0 || top == -1
}

fn index(la: u64, level: u32) -> u64 {
    (la >> (12 + 9 * (level - 1))) & 0x1ff
}

/// The error code bits that describe the access itself.
fn access_bits(ctx: &PagingCtx, access: Access) -> PfErrorCode {
    let mut ec = PfErrorCode::empty();
    if access.kind == AccessKind::Write {
        ec |= PfErrorCode::W;
    }
    if access.user {
        ec |= PfErrorCode::U;
    }
    if access.kind == AccessKind::Fetch && (ctx.nxe || ctx.smep) {
        ec |= PfErrorCode::ID;
    }
    ec
}

/// Reserved bits of a present entry at `level` (4 = PML4E ... 1 = PTE) with PS = `ps`.
fn reserved(ctx: &PagingCtx, level: u32, e: u64) -> bool {
    let mut rsvd = ctx.rsvd_addr_mask();
    if !ctx.nxe {
        rsvd |= XD;
    }
    let ps = e & PS != 0;
    match level {
        4 => rsvd |= PS,
        3 if ps => {
            if !ctx.pages_1g {
                return true;
            }
            rsvd |= 0x3fff_e000; // bits 29:13
        }
        2 if ps => rsvd |= 0x001f_e000, // bits 20:13
        _ => {}
    }
    e & rsvd != 0
}

/// Translates `la` for `access` with guest CR3 `cr3` (bits 11:0, PCID or PWT/PCD, and bit
/// 63 are ignored). Reads only.
pub fn translate<M: GuestMem + ?Sized>(
    mem: &M,
    ctx: &PagingCtx,
    cr3: u64,
    la: u64,
    access: Access,
) -> Result<Walk, WalkError> {
    if !canonical(la) {
        return Err(WalkError::NonCanonical);
    }
    let acc = access_bits(ctx, access);
    let addr_mask = ADDR & !ctx.rsvd_addr_mask();
    let mut table = cr3 & addr_mask;
    let mut entries = [(0u64, 0u64); 4];
    let (mut writable, mut user, mut nx) = (true, true, false);
    let mut level = 4u32;
    let mut n = 0;
    let (leaf, size) = loop {
        let gpa = table + index(la, level) * 8;
        let e = mem.read_u64(gpa).ok_or(WalkError::Unbacked(gpa))?;
        if e & P == 0 {
            return Err(WalkError::PageFault(acc));
        }
        if reserved(ctx, level, e) {
            return Err(WalkError::PageFault(acc | PfErrorCode::P | PfErrorCode::RSVD));
        }
        entries[n] = (gpa, e);
        n += 1;
        writable &= e & RW != 0;
        user &= e & US != 0;
        nx |= ctx.nxe && e & XD != 0;
        match level {
            3 if e & PS != 0 => break (e, PageSize::Size1G),
            2 if e & PS != 0 => break (e, PageSize::Size2M),
            1 => break (e, PageSize::Size4K),
            _ => {}
        }
        table = e & addr_mask;
        level -= 1;
    };
    let denied = match (access.user, access.kind) {
        (true, AccessKind::Read) => !user,
        (true, AccessKind::Write) => !user || !writable,
        (true, AccessKind::Fetch) => !user || nx,
        (false, AccessKind::Read) => user && ctx.smap && !access.ac,
        (false, AccessKind::Write) => (user && ctx.smap && !access.ac) || (!writable && ctx.wp),
        (false, AccessKind::Fetch) => nx || (user && ctx.smep),
    };
    if denied {
        return Err(WalkError::PageFault(acc | PfErrorCode::P));
    }
    let (base, pat) = match size {
        PageSize::Size4K => (leaf & addr_mask, leaf & PAT_4K != 0),
        PageSize::Size2M => (leaf & addr_mask & !(PAGE_2M - 1), leaf & PAT_LARGE != 0),
        PageSize::Size1G => (leaf & addr_mask & !(PAGE_1G - 1), leaf & PAT_LARGE != 0),
    };
    let translation = Translation {
        gpa: base | (la & (size.bytes() - 1)),
        size,
        writable,
        user,
        nx,
        global: ctx.pge && leaf & G != 0,
        dirty: leaf & D != 0,
        pat_index: (pat as u8) << 2 | ((leaf & PCD != 0) as u8) << 1 | (leaf & PWT != 0) as u8,
        pkey: ((leaf & PK_MASK) >> 59) as u8,
    };
    Ok(Walk { translation, entries, levels: n, write: access.kind == AccessKind::Write })
}

impl Walk {
    /// Sets A in every entry of the walk and, for a write, D in the leaf, top level first,
    /// each by one compare-exchange against the value the walk read. An entry that
    /// changed in between (another CPU wrote it) gives [`WalkError::Contended`]: the
    /// translation may be stale and the walk must be redone. Bits already set are not
    /// written. An entry reached twice (a table mapping itself) is exchanged against the
    /// value this call stored.
    pub fn set_accessed_dirty<M: GuestMem + ?Sized>(&self, mem: &mut M) -> Result<(), WalkError> {
        let mut done = [(u64::MAX, 0u64); 4];
        for i in 0..self.levels {
            let (gpa, read) = self.entries[i];
            let old = done[..i].iter().rev().find(|d| d.0 == gpa).map_or(read, |d| d.1);
            let leaf = i + 1 == self.levels;
            let new = old | A | if leaf && self.write { D } else { 0 };
            if new != old {
                let found = mem.cmpxchg_u64(gpa, old, new).ok_or(WalkError::Unbacked(gpa))?;
                if found != old {
                    return Err(WalkError::Contended);
                }
            }
            done[i] = (gpa, new);
        }
        Ok(())
    }

    /// The guest-physical address of the leaf entry.
    pub fn leaf_entry_gpa(&self) -> u64 {
        self.entries[self.levels.saturating_sub(1)].0
    }
}

/// [`translate`], then [`Walk::set_accessed_dirty`], redone up to [`MAX_AD_RETRIES`] times
/// while the entries change under it: what the CPU does for one access.
pub fn walk<M: GuestMem + ?Sized>(
    mem: &mut M,
    ctx: &PagingCtx,
    cr3: u64,
    la: u64,
    access: Access,
) -> Result<Translation, WalkError> {
    for _ in 0..MAX_AD_RETRIES {
        let w = translate(mem, ctx, cr3, la, access)?;
        match w.set_accessed_dirty(mem) {
            Ok(()) => return Ok(w.translation),
            Err(WalkError::Contended) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(WalkError::Contended)
}

#[cfg(test)]
mod tests;
