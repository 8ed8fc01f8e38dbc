use super::*;
use crate::testmem::{FakeGuest, G1, M2, UPPER};

const R: Access = Access::sup(AccessKind::Read);
const W: Access = Access::sup(AccessKind::Write);
const X: Access = Access::sup(AccessKind::Fetch);
const UR: Access = Access::usr(AccessKind::Read);
const UW: Access = Access::usr(AccessKind::Write);
const UX: Access = Access::usr(AccessKind::Fetch);

fn ctx() -> PagingCtx {
    PagingCtx::LINUX
}

fn pf(bits: PfErrorCode) -> Result<Translation, WalkError> {
    Err(WalkError::PageFault(bits))
}

/// A guest with one root and the four entry addresses of `la`'s 4K mapping.
fn guest_4k(la: u64, gpa: u64, leaf: u64, upper: u64) -> (FakeGuest, u64, [u64; 4]) {
    let mut g = FakeGuest::new();
    let cr3 = g.alloc();
    g.map(cr3, la, gpa, PageSize::Size4K, leaf, upper);
    let slots = [g.entry_at(cr3, la, 4), g.entry_at(cr3, la, 3), g.entry_at(cr3, la, 2), g.entry_at(cr3, la, 1)];
    (g, cr3, slots)
}

#[test]
fn read_sets_accessed_on_every_level_and_no_dirty() {
    let la = 0xffff_8880_1234_5678;
    let (mut g, cr3, slots) = guest_4k(la, 0x7654_3000, RW, RW);
    let t = walk(&mut g, &ctx(), cr3, la, R).unwrap();
    assert_eq!(t.gpa, 0x7654_3678);
    assert_eq!(t.size, PageSize::Size4K);
    assert!(t.writable && !t.user && !t.nx && !t.dirty && !t.global);
    for s in slots {
        assert_eq!(g.read(s) & (bits::A | bits::D), bits::A, "entry at {s:#x}");
    }
}

#[test]
fn write_sets_dirty_in_the_leaf_only() {
    let la = 0x7f00_0000_1000;
    let (mut g, cr3, slots) = guest_4k(la, 0x5000, RW | US, UPPER);
    let t = walk(&mut g, &ctx(), cr3, la, UW).unwrap();
    assert!(!t.dirty, "dirty reports the bit as read");
    for s in &slots[..3] {
        assert_eq!(g.read(*s) & (bits::A | bits::D), bits::A);
    }
    assert_eq!(g.read(slots[3]) & (bits::A | bits::D), bits::A | bits::D);
    // Once set, nothing is written again.
    let calls = g.cas_calls;
    let t = walk(&mut g, &ctx(), cr3, la, UW).unwrap();
    assert!(t.dirty);
    assert_eq!(g.cas_calls, calls);
}

#[test]
fn faulting_access_sets_no_accessed_bit() {
    let la = 0x40_0000;
    let (mut g, cr3, slots) = guest_4k(la, 0x9000, US, UPPER); // read-only
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UW), pf(PfErrorCode::P | PfErrorCode::W | PfErrorCode::U));
    for s in slots {
        assert_eq!(g.read(s) & bits::A, 0);
    }
}

#[test]
fn large_pages_translate_with_offsets_and_large_pat_bit() {
    let mut g = FakeGuest::new();
    let cr3 = g.alloc();
    let la2 = 0xffff_8000_0060_0000u64;
    let la1 = 0xffff_8001_4000_0000u64;
    let s2 = g.map(cr3, la2, 0x1_2340_0000, PageSize::Size2M, RW | bits::PAT_LARGE | bits::PWT, RW);
    let s1 = g.map(cr3, la1, 0x40_c000_0000, PageSize::Size1G, RW | bits::PCD, RW);
    let t = walk(&mut g, &ctx(), cr3, la2 + 0x1_2345, W).unwrap();
    assert_eq!((t.gpa, t.size, t.pat_index), (0x1_2341_2345, PageSize::Size2M, 0b101));
    assert_eq!(g.read(s2) & (bits::A | bits::D), bits::A | bits::D);
    let t = walk(&mut g, &ctx(), cr3, la1 + 0x3abc_def0, R).unwrap();
    assert_eq!((t.gpa, t.size, t.pat_index), (0x40_fabc_def0, PageSize::Size1G, 0b010));
    assert_eq!(g.read(s1) & (bits::A | bits::D), bits::A);
    // The 4 KB PAT bit position (7) is PS in a large leaf; the large one is bit 12.
    let la4 = 0x1000;
    g.map(cr3, la4, 0x3000, PageSize::Size4K, bits::PAT_4K, RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, la4, R).unwrap().pat_index, 0b100);
}

#[test]
fn not_present_at_each_level_gives_p0_with_access_bits() {
    let la = 0x7fff_ffe0_1000;
    for level in 1..=4 {
        let (mut g, cr3, _) = guest_4k(la, 0x8000, RW | US, UPPER);
        let s = g.entry_at(cr3, la, level);
        g.write(s, g.read(s) & !bits::P);
        assert_eq!(walk(&mut g, &ctx(), cr3, la, R), pf(PfErrorCode::empty()), "level {level}");
        assert_eq!(walk(&mut g, &ctx(), cr3, la, UW), pf(PfErrorCode::W | PfErrorCode::U));
        assert_eq!(walk(&mut g, &ctx(), cr3, la, X), pf(PfErrorCode::ID));
    }
}

#[test]
fn reserved_bits_give_rsvd_with_p() {
    let la = 0xffff_c900_0000_0000u64;
    let rsvd = PfErrorCode::P | PfErrorCode::RSVD;
    // Bit 46 is above MAXPHYADDR (46) at every level.
    for level in 1..=4 {
        let (mut g, cr3, _) = guest_4k(la, 0x8000, RW, RW);
        let s = g.entry_at(cr3, la, level);
        g.write(s, g.read(s) | 1 << 46);
        assert_eq!(walk(&mut g, &ctx(), cr3, la, W), pf(rsvd | PfErrorCode::W), "level {level}");
        // Nothing set on the way.
        assert_eq!(g.read(g.entry_at(cr3, la, 4)) & bits::A, 0);
        // With MAXPHYADDR 52 the same bit is an address bit.
        let wide = PagingCtx { maxphyaddr: 52, ..ctx() };
        if level == 1 {
            assert_eq!(walk(&mut g, &wide, cr3, la, W).unwrap().gpa, 1 << 46 | 0x8000);
        } else {
            assert!(matches!(walk(&mut g, &wide, cr3, la, W), Err(WalkError::Unbacked(_))));
        }
    }
    // PS in a PML4E.
    let (mut g, cr3, s) = guest_4k(la, 0x8000, RW, RW);
    g.write(s[0], g.read(s[0]) | bits::PS);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UR), pf(rsvd | PfErrorCode::U));
    // XD without EFER.NXE; a fetch reports I/D only because of SMEP then.
    let (mut g, cr3, s) = guest_4k(la, 0x8000, RW, RW);
    g.write(s[3], g.read(s[3]) | bits::XD);
    let no_nx = PagingCtx { nxe: false, ..ctx() };
    assert_eq!(walk(&mut g, &no_nx, cr3, la, R), pf(rsvd));
    assert_eq!(walk(&mut g, &no_nx, cr3, la, X), pf(rsvd | PfErrorCode::ID));
    let no_nx_smep = PagingCtx { smep: false, ..no_nx };
    assert_eq!(walk(&mut g, &no_nx_smep, cr3, la, X), pf(rsvd));
    // Bits 20:13 of a 2 MB leaf, 29:13 of a 1 GB leaf; PS in a PDPTE without 1 GB pages.
    let mut g = FakeGuest::new();
    let cr3 = g.alloc();
    let s2 = g.map(cr3, 0x20_0000, 0x40_0000 | 1 << 13, PageSize::Size2M, RW, RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, 0x20_0000, R), pf(rsvd));
    g.write(s2, (g.read(s2) & !(1 << 13)) | 1 << 21);
    assert_eq!(walk(&mut g, &ctx(), cr3, 0x20_0000, R).unwrap().gpa, 0x60_0000);
    let s1 = g.map(cr3, G1, (2 * G1) | (1 << 29), PageSize::Size1G, RW, RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, G1, R), pf(rsvd));
    g.write(s1, g.read(s1) & !(1 << 29));
    assert_eq!(walk(&mut g, &ctx(), cr3, G1 + 5, R).unwrap().gpa, 2 * G1 + 5);
    let no1g = PagingCtx { pages_1g: false, ..ctx() };
    assert_eq!(walk(&mut g, &no1g, cr3, G1, R), pf(rsvd));
    // The PAT bit (12) of a large leaf is not reserved.
    g.write(s2, g.read(s2) | bits::PAT_LARGE);
    assert!(walk(&mut g, &ctx(), cr3, 0x20_0000, R).is_ok());
    // Bits 62:52 are ignored.
    g.write(s2, g.read(s2) | 0x7ff << 52);
    assert!(walk(&mut g, &ctx(), cr3, 0x20_0000 + M2 - 1, R).is_ok());
}

#[test]
fn user_supervisor_and_read_write_rules() {
    let la = 0x55_0000_0000;
    // Supervisor page.
    let (mut g, cr3, _) = guest_4k(la, 0x8000, RW, UPPER);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UR), pf(PfErrorCode::P | PfErrorCode::U));
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UX), pf(PfErrorCode::P | PfErrorCode::U | PfErrorCode::ID));
    assert!(walk(&mut g, &ctx(), cr3, la, W).is_ok());
    // U/S clear in an upper level only also makes it a supervisor page.
    let (mut g, cr3, s) = guest_4k(la, 0x8000, RW | US, UPPER);
    assert!(walk(&mut g, &ctx(), cr3, la, UW).is_ok());
    g.write(s[1], g.read(s[1]) & !bits::US);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UW), pf(PfErrorCode::P | PfErrorCode::U | PfErrorCode::W));
    // R/W clear in an upper level: user writes fault, supervisor ones only with WP.
    let (mut g, cr3, s) = guest_4k(la, 0x8000, RW | US, UPPER);
    g.write(s[2], g.read(s[2]) & !bits::RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UW), pf(PfErrorCode::P | PfErrorCode::U | PfErrorCode::W));
    let (mut g, cr3, _) = guest_4k(la, 0x8000, 0, RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, W), pf(PfErrorCode::P | PfErrorCode::W));
    let nowp = PagingCtx { wp: false, ..ctx() };
    assert!(walk(&mut g, &nowp, cr3, la, W).unwrap().gpa == 0x8000);
}

#[test]
fn nx_smep_smap() {
    let la = 0x1234_5000;
    // XD in an upper level with NXE.
    let (mut g, cr3, s) = guest_4k(la, 0x8000, RW | US, UPPER);
    g.write(s[0], g.read(s[0]) | bits::XD);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, UX), pf(PfErrorCode::P | PfErrorCode::U | PfErrorCode::ID));
    let t = walk(&mut g, &ctx(), cr3, la, UR).unwrap();
    assert!(t.nx);
    // A user page: supervisor fetch faults with SMEP, reads fault with SMAP unless AC.
    let (mut g, cr3, _) = guest_4k(la, 0x8000, RW | US, UPPER);
    assert_eq!(walk(&mut g, &ctx(), cr3, la, X), pf(PfErrorCode::P | PfErrorCode::ID));
    assert_eq!(walk(&mut g, &ctx(), cr3, la, R), pf(PfErrorCode::P));
    assert_eq!(walk(&mut g, &ctx(), cr3, la, W), pf(PfErrorCode::P | PfErrorCode::W));
    let ac = |kind| Access { kind, user: false, ac: true };
    assert!(walk(&mut g, &ctx(), cr3, la, ac(AccessKind::Read)).is_ok());
    assert!(walk(&mut g, &ctx(), cr3, la, ac(AccessKind::Write)).is_ok());
    assert_eq!(walk(&mut g, &ctx(), cr3, la, ac(AccessKind::Fetch)), pf(PfErrorCode::P | PfErrorCode::ID));
    let plain = PagingCtx { smep: false, smap: false, ..ctx() };
    assert!(walk(&mut g, &plain, cr3, la, X).is_ok());
    assert!(walk(&mut g, &plain, cr3, la, R).is_ok());
    // Without NXE and SMEP a fetch fault does not report I/D.
    let old = PagingCtx { nxe: false, smep: false, ..ctx() };
    let (mut g, cr3, _) = guest_4k(la, 0x8000, RW, RW);
    assert_eq!(walk(&mut g, &old, cr3, la, UX), pf(PfErrorCode::P | PfErrorCode::U));
}

#[test]
fn global_pat_pkey_and_cr3_low_bits() {
    let la = 0xffff_ffff_8100_0000;
    let (mut g, cr3, _) = guest_4k(la, 0x8000, bits::G | bits::PCD | bits::PWT | 0x5 << 59, RW);
    // CR3 bits 11:0 (a PCID) and 63 do not change the table address.
    let t = walk(&mut g, &ctx(), cr3 | 0x801 | 1 << 63, la, R).unwrap();
    assert!(t.global);
    assert_eq!((t.pat_index, t.pkey), (0b011, 5));
    let nopge = PagingCtx { pge: false, ..ctx() };
    assert!(!walk(&mut g, &nopge, cr3, la, R).unwrap().global);
}

#[test]
fn non_canonical_and_unbacked() {
    let (mut g, cr3, _) = guest_4k(0x1000, 0x8000, RW, RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, 0x0000_8000_0000_0000, R), Err(WalkError::NonCanonical));
    assert_eq!(walk(&mut g, &ctx(), cr3, 0xffff_7fff_ffff_f000, R), Err(WalkError::NonCanonical));
    let s = g.entry_at(cr3, 0x1000, 2);
    g.write(s, 0x7000_0000 | bits::P | bits::RW);
    assert_eq!(walk(&mut g, &ctx(), cr3, 0x1000, R), Err(WalkError::Unbacked(0x7000_0008)));
}

#[test]
fn lost_compare_exchange_redoes_the_walk() {
    let la = 0x2000;
    let (mut g, cr3, slots) = guest_4k(la, 0x8000, RW, RW);
    g.fail_cas = 2;
    let t = walk(&mut g, &ctx(), cr3, la, W).unwrap();
    assert_eq!(t.gpa, 0x8000);
    for s in &slots[..3] {
        assert_eq!(g.read(*s) & (bits::A | bits::D), bits::A);
    }
    assert_eq!(g.read(slots[3]) & (bits::A | bits::D), bits::A | bits::D);
    // The concurrent writer's change survives (never overwritten by a stale value).
    assert_eq!(g.read(slots[0]) >> 52 & 0x7f, 2);
    let (mut g, cr3, _) = guest_4k(la, 0x8000, RW, RW);
    g.fail_cas = usize::MAX;
    assert_eq!(walk(&mut g, &ctx(), cr3, la, W), Err(WalkError::Contended));
}

#[test]
fn self_referencing_table_converges() {
    // PML4[0] points to the PML4 itself: la 0 walks PML4 → PML4 → PD → PT.
    let mut g = FakeGuest::new();
    let cr3 = g.alloc();
    let pd = g.alloc();
    let pt = g.alloc();
    g.write(cr3, cr3 | bits::P | bits::RW);
    g.write(cr3 + 8, pd | bits::P | bits::RW); // PML4[1] doubles as the PDPTE for la 1 GB
    g.write(pd, pt | bits::P | bits::RW);
    g.write(pt, 0x9000 | bits::P | bits::RW);
    let la = G1;
    let t = walk(&mut g, &ctx(), cr3, la, W).unwrap();
    assert_eq!(t.gpa, 0x9000);
    assert_eq!(g.read(cr3) & bits::A, bits::A);
    assert_eq!(g.read(cr3 + 8) & bits::A, bits::A);
    assert_eq!(g.read(pt) & (bits::A | bits::D), bits::A | bits::D);
}

#[test]
fn from_regs_decodes_and_refuses() {
    let cr0 = 1 << 31 | 1 << 16 | 1;
    let cr4 = 1 << 5 | 1 << 7 | 1 << 17 | 1 << 20 | 1 << 21;
    let efer = 1 << 8 | 1 << 10 | 1 << 11;
    let c = PagingCtx::from_regs(cr0, cr4, efer, 46, true).unwrap();
    assert_eq!(c, PagingCtx { pcide: true, ..PagingCtx::LINUX });
    assert!(PagingCtx::from_regs(cr0, cr4 | 1 << 12, efer, 46, true).is_err());
    assert!(PagingCtx::from_regs(cr0, cr4, 0, 46, true).is_err());
    assert!(PagingCtx::from_regs(cr0, cr4, efer, 60, true).is_err());
}
