use super::*;
use crate::testmem::{FakeGuest, FakePool, G1, M2, UPPER};
use crate::tree::FROM_2M;
use crate::walk::bits::{PS, XD};
use crate::walk::walk;

extern crate std;
use std::collections::HashMap;
use std::vec::Vec;

const AC: u64 = 1 << 18;
const PCIDE: u64 = 1 << 17;

fn sup(kind: AccessKind) -> Access {
    Access::sup(kind)
}
fn usr(kind: AccessKind) -> Access {
    Access::usr(kind)
}
use AccessKind::{Fetch as F, Read as R, Write as W};

#[derive(Default)]
pub(crate) struct Pols(pub HashMap<u64, PagePolicy>);

impl PolicyLookup for Pols {
    fn policy(&self, gpa: u64) -> PagePolicy {
        self.0.get(&(gpa & !0xfff)).copied().unwrap_or_default()
    }
}

/// What an access ended in, seen from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Out {
    Ok(u64),
    Fault(PfErrorCode),
    Policy,
}

/// A guest, its MMU, and a CPU that walks the shadow tables.
pub(crate) struct Rig {
    pub g: FakeGuest,
    pub mmu: Mmu<FakePool>,
    pub pol: Pols,
    /// `#PF` exits taken.
    pub exits: usize,
    pub flushes: Vec<HwFlush>,
}

impl Rig {
    pub fn new(ctx: PagingCtx, frames: usize) -> (Rig, u64) {
        let mut g = FakeGuest::new();
        let cr3 = g.alloc();
        let mmu = Mmu::new(FakePool::new(frames), frames, ctx, cr3).map_err(|(e, _)| e).unwrap();
        (Rig { g, mmu, pol: Pols::default(), exits: 0, flushes: Vec::new() }, cr3)
    }

    /// The real CPU: the guest's controls except EFER.NXE, which kdbt keeps on.
    fn cpu(&self) -> PagingCtx {
        PagingCtx { nxe: true, maxphyaddr: 52, ..*self.mmu.ctx() }
    }

    /// One access by the CPU on the shadow tables, with `#PF` exits handled by the MMU.
    pub fn access(&mut self, la: u64, acc: Access) -> Out {
        for _ in 0..3 {
            let cpu = self.cpu();
            match translate(self.mmu.pool(), &cpu, self.mmu.shadow_cr3(), la, acc) {
                Ok(w) => {
                    // The CPU never has to set A or D in a shadow leaf.
                    let leaf = self.mmu.shadow_leaf(la);
                    assert_ne!(leaf & A, 0, "shadow leaf without A at {la:#x}");
                    if acc.kind == W {
                        assert_ne!(leaf & D, 0, "writable shadow leaf without D at {la:#x}");
                    }
                    return Out::Ok(w.translation.gpa);
                }
                Err(WalkError::PageFault(ec)) => {
                    self.exits += 1;
                    let rflags = if acc.ac { AC } else { 0 };
                    match self.mmu.on_page_fault(&mut self.g, &self.pol, la, ec.bits(), rflags).unwrap() {
                        PfOutcome::Resolved { flush } => self.flushes.push(flush),
                        PfOutcome::Reflect { error_code, cr2 } => {
                            assert_eq!(cr2, la);
                            return Out::Fault(error_code);
                        }
                        PfOutcome::Policy { la: pla, gpa, access } => {
                            assert_eq!((pla, access), (la, acc.kind));
                            assert_eq!(self.pol.policy(gpa), self.pol.policy(gpa & !0xfff));
                            return Out::Policy;
                        }
                    }
                }
                Err(e) => panic!("shadow walk of {la:#x}: {e:?}"),
            }
        }
        panic!("{la:#x}: still faulting after three resolved exits");
    }

    /// Access and count the exits it took.
    pub fn access_n(&mut self, la: u64, acc: Access) -> (Out, usize) {
        let before = self.exits;
        let o = self.access(la, acc);
        (o, self.exits - before)
    }

    pub fn cr3(&mut self, value: u64) -> Cr3Action {
        let cr4 = if self.mmu.ctx().pcide { PCIDE } else { 0 };
        self.mmu.on_cr3_write(value, cr4).unwrap()
    }
}

fn pf(bits: PfErrorCode) -> Out {
    Out::Fault(bits)
}

#[test]
fn clean_page_is_read_only_until_the_first_write_sets_dirty() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let la = 0x7f12_3456_7000;
    let leaf = r.g.map(cr3, la, 0xabc_d000, PageSize::Size4K, RW | US, UPPER);
    assert_eq!(r.access_n(la + 8, usr(R)), (Out::Ok(0xabc_d008), 1));
    assert_eq!(r.g.read(leaf) & (A | D), A, "a read sets A only");
    assert_eq!(r.mmu.shadow_leaf(la) & RW, 0, "clean page shadowed read-only");
    for level in 2..=4 {
        assert_ne!(r.g.read(r.g.entry_at(cr3, la, level)) & A, 0);
        assert_eq!(r.g.read(r.g.entry_at(cr3, la, level)) & D, 0);
    }
    assert_eq!(r.access_n(la, usr(R)), (Out::Ok(0xabc_d000), 0));
    assert_eq!(r.access_n(la + 16, usr(W)), (Out::Ok(0xabc_d010), 1), "the first write exits once");
    assert_eq!(r.g.read(leaf) & (A | D), A | D);
    assert_ne!(r.mmu.shadow_leaf(la) & RW, 0, "upgraded in place");
    assert_eq!(r.access_n(la, usr(W)), (Out::Ok(0xabc_d000), 0));
    let c = r.mmu.counters();
    assert_eq!((c.faults_resolved, c.faults_reflected), (2, 0));
    // Upgrades need no hardware flush (the #PF already dropped the real TLB entry).
    assert!(r.flushes[1..].iter().all(|f| *f == HwFlush::None));
}

#[test]
fn dirty_page_is_writable_at_once_and_read_only_guest_page_never() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    r.g.map(cr3, 0x1000, 0x5000, PageSize::Size4K, RW | US | D, UPPER);
    assert_eq!(r.access_n(0x1000, usr(R)), (Out::Ok(0x5000), 1));
    assert_eq!(r.access_n(0x1000, usr(W)), (Out::Ok(0x5000), 0));
    let leaf = r.g.map(cr3, 0x2000, 0x6000, PageSize::Size4K, US | D, UPPER);
    assert_eq!(r.access_n(0x2000, usr(R)), (Out::Ok(0x6000), 1));
    assert_eq!(r.access(0x2000, usr(W)), pf(PfErrorCode::P | PfErrorCode::W | PfErrorCode::U));
    assert_eq!(r.mmu.shadow_leaf(0x2000), 0, "the reflected #PF dropped the leaf, as it drops a TLB entry");
    assert_eq!(r.g.read(leaf) & A, A);
}

#[test]
fn guest_not_present_is_reflected_with_its_error_code() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    r.g.map(cr3, 0x40_0000, 0x5000, PageSize::Size4K, RW | US, UPPER);
    assert_eq!(r.access(0x40_1000, usr(W)), pf(PfErrorCode::W | PfErrorCode::U));
    assert_eq!(r.access(0x7000_0000_0000, sup(R)), pf(PfErrorCode::empty()));
    assert_eq!(r.access(0x40_2000, usr(F)), pf(PfErrorCode::U | PfErrorCode::ID));
    let c = r.mmu.counters();
    assert_eq!((c.faults_resolved, c.faults_reflected), (0, 3));
}

#[test]
fn permission_upgrades_without_a_flush_are_resolved_not_reflected() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let la = 0x5555_0000_0000;
    let leaf = r.g.map(cr3, la, 0x9000, PageSize::Size4K, US | XD, UPPER);
    assert_eq!(r.access(la, usr(R)), Out::Ok(0x9000));
    assert_eq!(r.access(la, usr(W)), pf(PfErrorCode::P | PfErrorCode::W | PfErrorCode::U));
    assert_eq!(r.access(la, usr(F)), pf(PfErrorCode::P | PfErrorCode::U | PfErrorCode::ID));
    // The guest makes the page writable and executable and does not flush.
    assert_eq!(r.access(la, usr(R)), Out::Ok(0x9000));
    r.g.write(leaf, (r.g.read(leaf) | RW) & !XD);
    let reflected = r.mmu.counters().faults_reflected;
    assert_eq!(r.access_n(la, usr(W)), (Out::Ok(0x9000), 1));
    assert_eq!(r.access_n(la, usr(F)), (Out::Ok(0x9000), 0), "the write's walk saw XD gone too");
    assert_eq!(r.mmu.counters().faults_reflected, reflected, "stale shadow faults are not reflected");
    assert_eq!(r.g.read(leaf) & D, D);
    // Not present → present without a flush.
    let la2 = la + 0x1000;
    assert_eq!(r.access(la2, usr(R)), pf(PfErrorCode::U));
    r.g.map(cr3, la2, 0xa000, PageSize::Size4K, US, UPPER);
    assert_eq!(r.access_n(la2, usr(R)), (Out::Ok(0xa000), 1));
    // Supervisor → user without a flush.
    let la3 = la + 0x2000;
    let l3 = r.g.map(cr3, la3, 0xb000, PageSize::Size4K, RW, UPPER);
    assert_eq!(r.access(la3, sup(R)), Out::Ok(0xb000));
    assert_eq!(r.access(la3, usr(R)), pf(PfErrorCode::P | PfErrorCode::U));
    r.g.write(l3, r.g.read(l3) | US);
    assert_eq!(r.access(la3, usr(R)), Out::Ok(0xb000));
}

#[test]
fn restrictions_take_effect_at_the_guests_flush_like_a_tlb() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let la = 0xffff_c900_0001_0000;
    let leaf = r.g.map(cr3, la, 0x9000, PageSize::Size4K, RW | D, RW);
    assert_eq!(r.access(la, sup(W)), Out::Ok(0x9000));
    r.g.write(leaf, r.g.read(leaf) & !RW);
    assert_eq!(r.access(la, sup(W)), Out::Ok(0x9000), "stale until the guest flushes, as natively");
    assert_eq!(r.mmu.on_invlpg(la), HwFlush::Page(la));
    assert_eq!(r.access(la, sup(W)), pf(PfErrorCode::P | PfErrorCode::W));
    // Remapped to another frame: visible after INVLPG.
    r.g.write(leaf, 0x7000 | P | RW | D);
    r.mmu.on_invlpg(la);
    assert_eq!(r.access(la + 4, sup(W)), Out::Ok(0x7004));
    assert_eq!(r.mmu.counters().invlpgs, 2);
}

#[test]
fn nx_user_supervisor_smap_and_reserved_bits() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let k = 0xffff_ffff_8100_0000u64;
    r.g.map(cr3, k, 0x10_0000, PageSize::Size4K, RW | XD, RW);
    assert_eq!(r.access(k, sup(R)), Out::Ok(0x10_0000));
    assert_ne!(r.mmu.shadow_leaf(k) & XD, 0, "guest XD copied to the shadow leaf");
    assert_eq!(r.access(k, sup(F)), pf(PfErrorCode::P | PfErrorCode::ID));
    assert_eq!(r.access(k, usr(R)), pf(PfErrorCode::P | PfErrorCode::U));
    // A user page from the kernel: SMEP and SMAP (AC lifts SMAP only).
    let u = 0x6000_0000;
    r.g.map(cr3, u, 0x20_0000, PageSize::Size4K, RW | US, UPPER);
    assert_eq!(r.access(u, usr(F)), Out::Ok(0x20_0000));
    assert_eq!(r.mmu.shadow_leaf(u) & (US | XD), US);
    assert_eq!(r.access(u, sup(F)), pf(PfErrorCode::P | PfErrorCode::ID));
    assert_eq!(r.access(u, sup(R)), pf(PfErrorCode::P));
    let with_ac = Access { kind: W, user: false, ac: true };
    assert_eq!(r.access(u, with_ac), Out::Ok(0x20_0000));
    // Reserved bit: bit 50 (above MAXPHYADDR 46) in the PDE.
    let bad = 0x7000_0000;
    r.g.map(cr3, bad, 0x30_0000, PageSize::Size4K, RW | US, UPPER);
    let pde = r.g.entry_at(cr3, bad, 2);
    r.g.write(pde, r.g.read(pde) | 1 << 50);
    assert_eq!(r.access(bad, usr(W)), pf(PfErrorCode::P | PfErrorCode::RSVD | PfErrorCode::W | PfErrorCode::U));
    // A guest without NXE: bit 63 reserved in its tables, fetches still tell I/D by SMEP.
    let (mut r, cr3) = Rig::new(PagingCtx { nxe: false, ..PagingCtx::LINUX }, 64);
    r.g.map(cr3, k, 0x10_0000, PageSize::Size4K, RW | XD, RW);
    assert_eq!(r.access(k, sup(R)), pf(PfErrorCode::P | PfErrorCode::RSVD));
    r.g.map(cr3, k + 0x1000, 0x11_0000, PageSize::Size4K, RW, RW);
    assert_eq!(r.access(k + 0x1000, sup(F)), Out::Ok(0x11_0000));
}

#[test]
fn protection_key_faults_are_reflected_as_they_come() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    r.g.map(cr3, 0x1000, 0x5000, PageSize::Size4K, RW | US | 3 << 59, UPPER);
    assert_eq!(r.access(0x1000, usr(R)), Out::Ok(0x5000));
    assert_eq!(r.mmu.shadow_leaf(0x1000) >> 59 & 0xf, 3, "the key is copied for the CPU's PKRU check");
    let ec = (PfErrorCode::P | PfErrorCode::U | PfErrorCode::PK).bits();
    let o = r.mmu.on_page_fault(&mut r.g, &r.pol, 0x1000, ec, 0).unwrap();
    assert_eq!(o, PfOutcome::Reflect { error_code: PfErrorCode::from_bits_retain(ec), cr2: 0x1000 });
    let ss = (PfErrorCode::P | PfErrorCode::SS).bits();
    assert!(matches!(r.mmu.on_page_fault(&mut r.g, &r.pol, 0x1000, ss, 0), Err(MmuError::UnexpectedFault(_))));
    assert!(matches!(r.mmu.on_page_fault(&mut r.g, &r.pol, 1 << 47, 0, 0), Err(MmuError::NonCanonical(_))));
}

#[test]
fn large_guest_pages_are_shadowed_by_4k_leaves_and_invlpg_drops_the_whole_page() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let la2 = 0xffff_8880_0020_0000u64;
    let s2 = r.g.map(cr3, la2, 0x4000_0000, PageSize::Size2M, RW | D | bits_pat_large(), RW);
    for off in [0, 0x1000, 0x1f_f000] {
        assert_eq!(r.access_n(la2 + off + 8, sup(W)), (Out::Ok(0x4000_0008 + off), 1));
        let e = r.mmu.shadow_leaf(la2 + off);
        assert_eq!(e & ADDR, 0x4000_0000 + off, "a 4 KiB piece");
        assert_ne!(e & PAT_4K, 0, "PAT moves from bit 12 to bit 7 (PS in a PDE, PAT in a PTE)");
        assert_ne!(e & FROM_2M, 0);
    }
    assert_eq!(r.g.read(s2) & (A | D), A | D);
    // A 4 KiB page in the next 2 MB window is not part of it.
    let other = la2 + M2;
    r.g.map(cr3, other, 0x9000, PageSize::Size4K, RW | D, RW);
    assert_eq!(r.access(other, sup(R)), Out::Ok(0x9000));
    // The guest moves the 2 MB page and flushes one address inside it, one never touched.
    r.g.write(s2, 0x6000_0000 | P | RW | PS | D);
    assert_eq!(r.mmu.on_invlpg(la2 + 0x8_0000), HwFlush::Context);
    for off in [0, 0x1000, 0x1f_f000] {
        assert_eq!(r.mmu.shadow_leaf(la2 + off), 0);
        assert_eq!(r.access(la2 + off, sup(R)), Out::Ok(0x6000_0000 + off));
    }
    assert_eq!(r.access_n(other, sup(R)), (Out::Ok(0x9000), 0));

    // 1 GB: pieces in different 2 MB windows (different shadow PTs).
    let la1 = 0xffff_8881_0000_0000u64;
    let s1 = r.g.map(cr3, la1, 3 * G1, PageSize::Size1G, RW | D, RW);
    let offs = [0x123_4000, 0x2000_0000, 0x3fff_f000];
    for off in offs {
        assert_eq!(r.access(la1 + off, sup(R)), Out::Ok(3 * G1 + off));
    }
    r.g.write(s1, (5 * G1) | P | RW | PS | D);
    assert_eq!(r.mmu.on_invlpg(la1 + 0x1000_0000), HwFlush::Context);
    for off in offs {
        assert_eq!(r.mmu.shadow_leaf(la1 + off), 0);
        assert_eq!(r.access(la1 + off, sup(R)), Out::Ok(5 * G1 + off));
    }
    // The 2 MB page's pieces (another PDPTE) survive a 1 GB invalidation elsewhere.
    assert_eq!(r.access_n(la2, sup(R)), (Out::Ok(0x6000_0000), 0));
}

fn bits_pat_large() -> u64 {
    crate::walk::bits::PAT_LARGE
}

/// Two address spaces sharing the kernel half (one PML4 entry pointing to the same PDPT),
/// as Linux does; returns (cr3 of the second space, kernel la, user la).
fn two_spaces(r: &mut Rig, cr3a: u64, kernel_flags: u64) -> (u64, u64, u64) {
    let k = 0xffff_ffff_8100_0000u64;
    let u = 0x40_0000u64;
    r.g.map(cr3a, k, 0x100_0000, PageSize::Size4K, RW | D | kernel_flags, RW);
    r.g.map(cr3a, u, 0x200_0000, PageSize::Size4K, RW | US | D, UPPER);
    let cr3b = r.g.alloc();
    let pml4e = r.g.read(r.g.entry_at(cr3a, k, 4));
    r.g.write(r.g.entry_at(cr3b, k, 4), pml4e);
    r.g.map(cr3b, u, 0x300_0000, PageSize::Size4K, RW | US | D, UPPER);
    (cr3b, k, u)
}

#[test]
fn global_pages_survive_flushing_cr3_switches_non_global_ones_do_not() {
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 64);
    let (b, k, u) = two_spaces(&mut r, a, G);
    assert_eq!(r.access(k, sup(R)), Out::Ok(0x100_0000));
    assert_eq!(r.access(u, usr(R)), Out::Ok(0x200_0000));
    let act = r.cr3(b);
    assert_eq!((act.guest_cr3, act.flush), (b, HwFlush::NonGlobal));
    assert_eq!(act.shadow_cr3 & 0xfff, 0);
    assert_eq!(r.access(u, usr(R)), Out::Ok(0x300_0000), "B's own user page");
    assert_eq!(r.access(k, sup(R)), Out::Ok(0x100_0000));
    // Back to A (without PCIDs every CR3 write flushes non-global translations).
    assert_eq!(r.cr3(a).flush, HwFlush::NonGlobal);
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 0), "global leaf kept in A's hierarchy");
    assert_eq!(r.access_n(u, usr(R)), (Out::Ok(0x200_0000), 1), "non-global leaf flushed");
    assert_eq!(r.mmu.stats().roots, 2);
    assert_eq!(r.mmu.counters().cr3_switches, 2);
    assert_ne!(r.mmu.shadow_leaf(k) & G, 0);
    // The same without CR4.PGE: G means nothing, the kernel page is flushed too.
    let (mut r, a) = Rig::new(PagingCtx { pge: false, ..PagingCtx::LINUX }, 64);
    let (b, k, _) = two_spaces(&mut r, a, G);
    r.access(k, sup(R));
    r.cr3(b);
    r.cr3(a);
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 1));
    // And a non-global kernel page is flushed with PGE.
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 64);
    let (b, k, _) = two_spaces(&mut r, a, 0);
    r.access(k, sup(R));
    r.cr3(b);
    r.cr3(a);
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 1));
}

#[test]
fn pcid_switches_with_and_without_the_no_flush_bit() {
    let ctx = PagingCtx { pcide: true, ..PagingCtx::LINUX };
    let (mut r, a0) = Rig::new(ctx, 64);
    let (b0, k, u) = two_spaces(&mut r, a0, G);
    let (a, b) = (a0 | 1, b0 | 2);
    let noflush = 1u64 << 63;
    r.cr3(a | noflush);
    assert_eq!(r.access(u, usr(R)), Out::Ok(0x200_0000));
    assert_eq!(r.access(k, sup(R)), Out::Ok(0x100_0000));
    let act = r.cr3(b | noflush);
    assert_eq!(act.flush, HwFlush::None);
    assert_eq!(act.shadow_cr3 & 0xfff, 2, "the guest's PCID tags the real TLB");
    assert_eq!(act.guest_cr3, b, "bit 63 is not part of CR3");
    assert_eq!(r.mmu.guest_cr3(), b);
    assert_eq!(r.access(u, usr(R)), Out::Ok(0x300_0000));
    // A flushing write for PCID 2 leaves PCID 1 alone.
    assert_eq!(r.cr3(b).flush, HwFlush::NonGlobal);
    assert_eq!(r.access_n(u, usr(R)), (Out::Ok(0x300_0000), 1));
    assert_eq!(r.cr3(a | noflush).flush, HwFlush::None);
    assert_eq!(r.access_n(u, usr(R)), (Out::Ok(0x200_0000), 0), "PCID 1 kept everything");
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 0));
    // Without the bit: non-global translations of PCID 1 go, global ones stay.
    assert_eq!(r.cr3(a).flush, HwFlush::NonGlobal);
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 0));
    assert_eq!(r.access_n(u, usr(R)), (Out::Ok(0x200_0000), 1));
    // The same CR3 under another PCID is another hierarchy.
    r.cr3(a0 | 5 | noflush);
    assert_eq!(r.mmu.stats().roots, 4, "the boot CR3 (PCID 0), A/1, B/2, A/5");
    // Bit 63 without PCIDE, reserved bits: #GP.
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 64);
    assert_eq!(r.mmu.on_cr3_write(a | noflush, 0), Err(MmuError::InvalidCr3(a | noflush)));
    assert_eq!(r.mmu.on_cr3_write(a | 1 << 50, 0), Err(MmuError::InvalidCr3(a | 1 << 50)));
    assert!(matches!(r.mmu.on_cr3_write(a, PCIDE), Err(MmuError::Unsupported(_))));
}

#[test]
fn kpti_pair_shares_kernel_entry_mappings_and_keeps_both_hierarchies() {
    // Linux with PTI: the kernel PGD at K, the user PGD at K + 4 KB; PCID k and k | 0x800.
    // Both PGDs share the user half (same PDPT) and the entry trampoline (global, same
    // PDPT for the cpu_entry_area half); only the kernel PGD maps kernel text.
    let ctx = PagingCtx { pcide: true, ..PagingCtx::LINUX };
    let (mut r, boot) = Rig::new(ctx, 64);
    let kpgd = r.g.alloc();
    let upgd = r.g.alloc();
    assert_eq!(upgd, kpgd + 0x1000);
    let text = 0xffff_ffff_8100_0000u64;
    let entry = 0xffff_fe00_0000_1000u64; // cpu_entry_area
    let user = 0x5600_0000_0000u64;
    r.g.map(kpgd, text, 0x100_0000, PageSize::Size4K, RW | D, RW);
    r.g.map(kpgd, entry, 0x180_0000, PageSize::Size4K, RW | D | G, RW);
    r.g.map(kpgd, user, 0x200_0000, PageSize::Size4K, RW | US | D, UPPER);
    for la in [entry, user] {
        let e = r.g.read(r.g.entry_at(kpgd, la, 4));
        r.g.write(r.g.entry_at(upgd, la, 4), e);
    }
    let _ = boot;
    let (kcr3, ucr3) = (kpgd | 6, upgd | 0x806);
    let noflush = 1u64 << 63;
    r.cr3(ucr3);
    let user_ac = Access { kind: R, user: false, ac: true };
    for round in 0..5 {
        // User mode runs, enters the kernel through the trampoline.
        assert_eq!(r.access(user, usr(W)), Out::Ok(0x200_0000));
        assert_eq!(r.access(entry, sup(F)), Out::Ok(0x180_0000));
        assert_eq!(r.access(text, sup(F)), pf(PfErrorCode::ID), "kernel text is absent from the user PGD");
        // SWITCH_TO_KERNEL_CR3 (no flush), kernel work incl. copy_from_user.
        assert_eq!(r.cr3(kcr3 | noflush).flush, HwFlush::None);
        assert_eq!(r.access(text, sup(F)), Out::Ok(0x100_0000));
        assert_eq!(r.access(user, user_ac), Out::Ok(0x200_0000));
        assert_eq!(r.access(entry, sup(R)), Out::Ok(0x180_0000));
        // SWITCH_TO_USER_CR3 (no flush).
        assert_eq!(r.cr3(ucr3 | noflush).flush, HwFlush::None);
        if round == 0 {
            continue;
        }
        let before = r.exits;
        r.access(user, usr(W));
        r.access(entry, sup(F));
        assert_eq!(r.exits - before, 0, "round {round}: warm hierarchies, no exits");
    }
    assert_eq!(r.mmu.stats().roots, 3, "boot CR3 + the pair");
    // A flushing user-CR3 write (a pending user-ASID flush) leaves the kernel PGD alone.
    r.cr3(ucr3);
    assert_eq!(r.access_n(user, usr(R)), (Out::Ok(0x200_0000), 1));
    assert_eq!(r.access_n(entry, sup(R)), (Out::Ok(0x180_0000), 0), "global trampoline kept");
    r.cr3(kcr3 | noflush);
    assert_eq!(r.access_n(text, sup(F)), (Out::Ok(0x100_0000), 0));
    assert_eq!(r.access_n(user, user_ac), (Out::Ok(0x200_0000), 0));
}

#[test]
fn invpcid_all_four_types() {
    let ctx = PagingCtx { pcide: true, ..PagingCtx::LINUX };
    let (mut r, a0) = Rig::new(ctx, 64);
    let (b0, k, u) = two_spaces(&mut r, a0, G);
    let noflush = 1u64 << 63;
    let warm = |r: &mut Rig| {
        r.cr3(b0 | 2 | noflush);
        r.access(u, usr(R));
        r.access(k, sup(R));
        r.cr3(a0 | 1 | noflush);
        r.access(u, usr(R));
        r.access(k, sup(R));
    };
    let exits_in_b = |r: &mut Rig| {
        r.cr3(b0 | 2 | noflush);
        let e = (r.access_n(u, usr(R)).1, r.access_n(k, sup(R)).1);
        r.cr3(a0 | 1 | noflush);
        e
    };
    // Type 0: one address of PCID 2 only.
    warm(&mut r);
    assert_eq!(r.mmu.on_invpcid(0, 2, u), Ok(HwFlush::Page(u)));
    assert_eq!(r.access_n(u, usr(R)).1, 0, "PCID 1 untouched");
    assert_eq!(exits_in_b(&mut r), (1, 0));
    // Type 1: PCID 1's non-global translations.
    warm(&mut r);
    assert_eq!(r.mmu.on_invpcid(1, 1, 0), Ok(HwFlush::NonGlobal));
    assert_eq!((r.access_n(u, usr(R)).1, r.access_n(k, sup(R)).1), (1, 0));
    assert_eq!(exits_in_b(&mut r), (0, 0));
    // Type 3: every PCID's non-global translations.
    warm(&mut r);
    assert_eq!(r.mmu.on_invpcid(3, 0, 0), Ok(HwFlush::NonGlobal));
    assert_eq!((r.access_n(u, usr(R)).1, r.access_n(k, sup(R)).1), (1, 0));
    assert_eq!(exits_in_b(&mut r), (1, 0));
    // Type 2: everything, globals too.
    warm(&mut r);
    assert_eq!(r.mmu.on_invpcid(2, 0, 0), Ok(HwFlush::Context));
    assert_eq!((r.access_n(u, usr(R)).1, r.access_n(k, sup(R)).1), (1, 1));
    assert_eq!(exits_in_b(&mut r), (1, 1));
    assert_eq!(r.mmu.counters().invpcids, 4);
    assert_eq!(r.mmu.counters().full_flushes, 1);
    // #GP cases.
    assert_eq!(r.mmu.on_invpcid(4, 0, 0), Err(MmuError::InvalidInvpcid));
    assert_eq!(r.mmu.on_invpcid(0, 0x1000, 0), Err(MmuError::InvalidInvpcid));
    assert_eq!(r.mmu.on_invpcid(0, 1, 1 << 47), Err(MmuError::InvalidInvpcid));
    let (mut r, _) = Rig::new(PagingCtx::LINUX, 64);
    assert_eq!(r.mmu.on_invpcid(1, 3, 0), Err(MmuError::InvalidInvpcid));
    assert_eq!(r.mmu.on_invpcid(1, 0, 0), Ok(HwFlush::Context), "first flush after new() covers freed frames");
}

/// 16 user pages, each in its own 1 GB region (a PDPT shared, one PD and PT each).
fn scattered(r: &mut Rig, cr3: u64, gpa_base: u64) -> Vec<(u64, u64)> {
    (0..16u64)
        .map(|i| {
            let la = (i + 1) * G1 + 0x5000;
            r.g.map(cr3, la, gpa_base + i * 0x1000, PageSize::Size4K, RW | US | D, UPPER);
            (la, gpa_base + i * 0x1000)
        })
        .collect()
}

#[test]
fn pool_exhaustion_reclaims_other_hierarchies_then_resets_and_keeps_translating() {
    // 10 frames: PML4s of two spaces + PDPT + 2 × (PD + PT) ... then it runs dry.
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 10);
    let pages_a = scattered(&mut r, a, 0x1000_0000);
    for &(la, gpa) in &pages_a[..3] {
        assert_eq!(r.access(la, usr(R)), Out::Ok(gpa));
    }
    assert_eq!(r.mmu.stats().pages_in_use, 1 + 1 + 3 * 2);
    let b = r.g.alloc();
    let pages_b = scattered(&mut r, b, 0x2000_0000);
    r.cr3(b);
    r.flushes.clear();
    // A holds 8 frames; B's PML4 and PDPT make 10, its first page's PD and PT do not fit:
    // A is dropped.
    for &(la, gpa) in &pages_b[..2] {
        assert_eq!(r.access(la, usr(W)), Out::Ok(gpa));
    }
    let c = r.mmu.counters();
    assert_eq!((c.reclaims, c.pool_resets), (1, 0));
    assert_eq!(r.mmu.stats().roots, 1);
    assert_eq!(r.flushes, [HwFlush::Context, HwFlush::None], "freed frames: full hardware flush");
    // Only B is left: once it fills the pool the current hierarchy is reset.
    for &(la, gpa) in &pages_b {
        assert_eq!(r.access(la, usr(W)), Out::Ok(gpa));
    }
    assert!(r.mmu.counters().pool_resets >= 3, "{:?}", r.mmu.counters());
    assert!(r.mmu.stats().pages_in_use <= 10);
    // Everything still translates (both spaces), and A/D are right in the guest.
    for round in 0..2 {
        for (cr3, pages) in [(a, &pages_a), (b, &pages_b)] {
            r.cr3(cr3);
            for &(la, gpa) in pages.iter() {
                assert_eq!(r.access(la + 0x18, usr(R)), Out::Ok(gpa + 0x18), "round {round}");
            }
        }
    }
    assert_eq!(r.mmu.counters().faults_reflected, 0);
    // Creating a hierarchy with a dry pool drops everything first.
    let c = r.g.alloc();
    r.cr3(c);
    assert!(r.mmu.stats().pages_in_use <= 10);
}

#[test]
fn policy_restricts_every_alias_of_a_page() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let page = 0x77_7000u64;
    let (la1, la2, la3) = (0xffff_8880_0077_7000u64, 0xffff_c900_0000_3000u64, 0x1000_0000u64);
    r.g.map(cr3, la1, page, PageSize::Size4K, RW | D, RW);
    r.g.map(cr3, la2, page, PageSize::Size4K, RW | D, RW);
    let clean = r.g.map(cr3, la3, page, PageSize::Size4K, RW, RW);
    assert_eq!(r.access(la1, sup(W)), Out::Ok(page));
    assert_eq!(r.access(la2 + 8, sup(W)), Out::Ok(page + 8));
    assert_eq!(r.access(la1, sup(F)), Out::Ok(page));
    // The page becomes not writable: both shadowed aliases lose R/W at once.
    r.pol.0.insert(page, PagePolicy::NOT_WRITABLE);
    assert_eq!(r.mmu.apply_policy(page + 0x123, PagePolicy::NOT_WRITABLE), HwFlush::Context);
    assert_eq!(r.mmu.shadow_leaf(la1) & RW, 0);
    assert_eq!(r.mmu.shadow_leaf(la2) & RW, 0);
    assert_eq!(r.mmu.counters().policy_downgrades, 2);
    assert_eq!(r.access(la1, sup(W)), Out::Policy);
    assert_eq!(r.access(la2, sup(W)), Out::Policy);
    assert_eq!(r.access(la3, sup(W)), Out::Policy, "an alias shadowed later gets the policy at fill time");
    assert_eq!(r.g.read(clean) & D, 0, "a denied write sets no dirty bit");
    assert_eq!(r.access(la1, sup(R)), Out::Ok(page));
    assert_eq!(r.access(la3, sup(R)), Out::Ok(page));
    assert_eq!(r.access(la2, sup(F)), Out::Ok(page));
    assert_eq!(r.mmu.counters().policy_faults, 3);
    // Not executable: fetches through any alias fault, reads do not.
    r.pol.0.insert(page, PagePolicy::all());
    assert_eq!(r.mmu.apply_policy(page, PagePolicy::all()), HwFlush::Context);
    for la in [la1, la2] {
        assert_ne!(r.mmu.shadow_leaf(la) & XD, 0);
        assert_eq!(r.access(la, sup(F)), Out::Policy);
        assert_eq!(r.access(la, sup(R)), Out::Ok(page));
    }
    // An alias first shadowed by a read while the page is not executable gets XD at fill
    // time: its first fetch faults to the policy too.
    let la4 = 0x2000_0000u64;
    r.g.map(cr3, la4, page, PageSize::Size4K, RW | D, RW);
    assert_eq!(r.access(la4, sup(R)), Out::Ok(page));
    assert_ne!(r.mmu.shadow_leaf(la4) & XD, 0);
    assert_eq!(r.mmu.shadow_leaf(la4) & RW, 0);
    assert_eq!(r.access(la4, sup(F)), Out::Policy);
    // Lifted: the next write through each alias is resolved (no apply needed).
    r.pol.0.remove(&page);
    for la in [la1, la2, la3] {
        assert_eq!(r.access(la, sup(W)), Out::Ok(page));
        assert_eq!(r.access(la, sup(F)), Out::Ok(page));
    }
    assert_eq!(r.g.read(clean) & D, D);
    // Another page is not touched by a scan.
    assert_eq!(r.mmu.apply_policy(0x99_9000, PagePolicy::all()), HwFlush::None);
    // The policy also covers aliases in other hierarchies (other CR3s).
    let b = r.g.alloc();
    r.g.map(b, la1, page, PageSize::Size4K, RW | D, RW);
    r.cr3(b);
    assert_eq!(r.access(la1, sup(W)), Out::Ok(page));
    r.pol.0.insert(page, PagePolicy::NOT_WRITABLE);
    r.mmu.apply_policy(page, PagePolicy::NOT_WRITABLE);
    assert_eq!(r.access(la1, sup(W)), Out::Policy);
    r.cr3(cr3);
    assert_eq!(r.access(la2, sup(W)), Out::Policy);
}

#[test]
fn policy_on_a_piece_of_a_large_page_only() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let la = 0xffff_8880_4000_0000u64;
    r.g.map(cr3, la, 0x4000_0000, PageSize::Size2M, RW | D, RW);
    r.pol.0.insert(0x4000_3000, PagePolicy::NOT_WRITABLE);
    assert_eq!(r.access(la + 0x3008, sup(W)), Out::Policy);
    assert_eq!(r.access(la + 0x4008, sup(W)), Out::Ok(0x4000_4008), "the neighbours in the same 2 MB page");
    assert_eq!(r.access(la + 0x2008, sup(W)), Out::Ok(0x4000_2008));
}

#[test]
fn lost_ad_race_is_retried() {
    let (mut r, cr3) = Rig::new(PagingCtx::LINUX, 64);
    let leaf = r.g.map(cr3, 0x1000, 0x5000, PageSize::Size4K, RW, RW);
    r.g.fail_cas = 1;
    assert_eq!(r.access_n(0x1000, sup(W)), (Out::Ok(0x5000), 1));
    assert_eq!(r.mmu.counters().ad_retries, 1);
    assert_eq!(r.g.read(leaf) & (A | D), A | D);
    // A guest that keeps changing its entries gets its access retried, not a fault.
    let leaf2 = r.g.map(cr3, 0x2000, 0x6000, PageSize::Size4K, RW, RW);
    r.g.fail_cas = MAX_AD_RETRIES;
    let ec = PfErrorCode::W.bits();
    let o = r.mmu.on_page_fault(&mut r.g, &r.pol, 0x2000, ec, 0).unwrap();
    assert!(matches!(o, PfOutcome::Resolved { .. }));
    assert_eq!(r.g.read(leaf2) & D, 0);
    assert_eq!(r.access(0x2000, sup(W)), Out::Ok(0x6000));
}

#[test]
fn root_cache_evicts_the_least_recently_used_hierarchy() {
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 256);
    let mut spaces = Vec::new();
    for i in 0..MAX_ROOTS as u64 + 3 {
        let cr3 = if i == 0 { a } else { r.g.alloc() };
        r.g.map(cr3, 0x1000, 0x10_0000 + i * 0x1000, PageSize::Size4K, RW | US | D, UPPER);
        spaces.push(cr3);
    }
    for (i, &cr3) in spaces.iter().enumerate() {
        r.cr3(cr3);
        assert_eq!(r.access(0x1000, usr(R)), Out::Ok(0x10_0000 + i as u64 * 0x1000));
    }
    assert_eq!(r.mmu.stats().roots, MAX_ROOTS);
    assert_eq!(r.mmu.counters().root_evictions, 3);
    for (i, &cr3) in spaces.iter().enumerate().rev() {
        r.cr3(cr3);
        assert_eq!(r.access(0x1000, usr(R)), Out::Ok(0x10_0000 + i as u64 * 0x1000));
    }
}

#[test]
fn control_register_changes() {
    let (mut r, a) = Rig::new(PagingCtx::LINUX, 64);
    let (_, k, u) = two_spaces(&mut r, a, G);
    r.access(k, sup(R));
    r.access(u, usr(R));
    // SMAP off: no shadow change (the CPU checks U/S itself), a flush anyway.
    let smap_off = PagingCtx { smap: false, ..PagingCtx::LINUX };
    assert_eq!(r.mmu.set_ctx(smap_off), Ok(HwFlush::Context));
    assert_eq!(r.access_n(u, sup(R)), (Out::Ok(0x200_0000), 0));
    assert_eq!(r.mmu.set_ctx(smap_off), Ok(HwFlush::None));
    // PGE toggled (Linux's global flush without INVPCID): everything goes.
    let nopge = PagingCtx { pge: false, ..smap_off };
    assert_eq!(r.mmu.set_ctx(nopge), Ok(HwFlush::Context));
    assert_eq!(r.access_n(k, sup(R)), (Out::Ok(0x100_0000), 1));
    assert_eq!(r.mmu.shadow_leaf(k) & G, 0);
    assert!(matches!(r.mmu.set_ctx(PagingCtx { wp: false, ..nopge }), Err(MmuError::Unsupported(_))));
    assert_eq!(r.mmu.counters().full_flushes, 1);
}

#[test]
fn construction_and_release_account_for_every_frame() {
    let ctx = PagingCtx::LINUX;
    let (e, pool) = Mmu::new(FakePool::new(3), 8, ctx, 0x1000).err().unwrap();
    assert_eq!((e, pool.taken, pool.returned, pool.frames.len()), (MmuError::TooFewFrames(3), 3, 3, 0));
    let mut bad = FakePool::new(8);
    bad.bad_at = Some(5);
    let (e, pool) = Mmu::new(bad, 8, ctx, 0x1000).err().unwrap();
    assert_eq!((e, pool.frames.len()), (MmuError::BadFrame(0x1234), 0));
    let (e, pool) = Mmu::new(FakePool::new(8), 8, ctx, 0x1000 | 1 << 60).err().unwrap();
    assert_eq!((e, pool.frames.len()), (MmuError::InvalidCr3(0x1000 | 1 << 60), 0));
    let (e, _) = Mmu::new(FakePool::new(8), 8, PagingCtx { wp: false, ..ctx }, 0x1000).err().unwrap();
    assert_eq!(e, MmuError::Unsupported("CR0.WP=0"));
    // Build something in two hierarchies, then release: every frame comes back.
    let (mut r, a) = Rig::new(ctx, 32);
    let (b, k, u) = two_spaces(&mut r, a, G);
    r.access(k, sup(R));
    r.access(u, usr(R));
    r.cr3(b);
    r.access(u, usr(R));
    let s = r.mmu.stats();
    assert_eq!((s.pages_total, s.roots), (32, 2));
    assert_eq!(s.pages_in_use, 2 + 2 * 3 + 3, "two PML4s, A: 2 paths, B: user path");
    let pool = r.mmu.release();
    assert_eq!((pool.taken, pool.returned, pool.frames.len()), (32, 32, 0));
}

#[test]
fn hw_flush_merge() {
    use HwFlush::*;
    assert_eq!(None.merge(Page(1)), Page(1));
    assert_eq!(Page(1).merge(Page(1)), Page(1));
    assert_eq!(Page(1).merge(Page(2)), Context);
    assert_eq!(NonGlobal.merge(Page(2)), Context);
    assert_eq!(NonGlobal.merge(None), NonGlobal);
    assert_eq!(Context.merge(None), Context);
}

mod differential;
