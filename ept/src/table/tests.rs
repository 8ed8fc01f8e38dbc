use super::*;
use crate::mtrr::tests::{mask, naive, overlapping, uc_default_wb_vars, wb_default_uc_hole, Raw, GIB, MIB};

extern crate std;
use std::collections::{HashMap, HashSet};
use std::format;
use std::vec::Vec;

/// Fake physical memory: frames at made-up physical addresses far above the map.
pub(crate) struct FakeMem {
    frames: HashMap<u64, [u64; 512]>,
    pub next: u64,
    /// Allocations still allowed (None: unlimited).
    pub budget: Option<usize>,
    pub freed: usize,
    pub allocated: usize,
}

impl FakeMem {
    pub fn new() -> FakeMem {
        FakeMem { frames: HashMap::new(), next: 0x7f00_0000_0000, budget: None, freed: 0, allocated: 0 }
    }
    pub fn live(&self) -> usize {
        self.frames.len()
    }
}

impl FrameAllocator for FakeMem {
    fn alloc_zeroed(&mut self) -> Option<u64> {
        if let Some(b) = self.budget.as_mut() {
            *b = b.checked_sub(1)?;
        }
        let pa = self.next;
        self.next += 4096;
        self.frames.insert(pa, [0; 512]);
        self.allocated += 1;
        Some(pa)
    }
    fn free(&mut self, pa: u64) {
        assert!(self.frames.remove(&pa).is_some(), "double free or foreign frame {pa:#x}");
        self.freed += 1;
    }
    fn read_entry(&self, pa: u64, index: usize) -> u64 {
        self.frames[&pa][index]
    }
    fn write_entry(&mut self, pa: u64, index: usize, value: u64) {
        self.frames.get_mut(&pa).expect("write to unallocated frame")[index] = value;
    }
}

const ALL: EptCaps = EptCaps { pages_2m: true, pages_1g: true, wb_allowed: true, execute_only: true, ad_bits: true };

fn build(raw: &Raw, max: u64, caps: EptCaps) -> Ept<FakeMem> {
    Ept::build_identity(max, &raw.mtrrs(), caps, FakeMem::new()).map_err(|(e, _)| e).unwrap()
}

/// Walks every leaf of `[0, limit)`: identity, RWX, type equal to the reference at every
/// 4 KiB page, no large page where the caps forbid it; returns the page-size counts.
fn check_whole_space(ept: &Ept<FakeMem>, raw: &Raw, caps: EptCaps) -> (u64, u64, u64) {
    let (mut n1g, mut n2m, mut n4k) = (0, 0, 0);
    let mut gpa = 0;
    while gpa < ept.limit() {
        let t = ept.translate(gpa).unwrap_or_else(|| panic!("unmapped {gpa:#x}"));
        let size = t.page_size.bytes();
        assert_eq!(gpa % size, 0, "leaf not aligned at {gpa:#x}");
        assert_eq!(t.hpa, gpa);
        assert_eq!(t.perms, Perms::RWX);
        assert!(!t.ignore_pat);
        match t.page_size {
            PageSize::Size1G => {
                assert!(caps.pages_1g);
                n1g += 1
            }
            PageSize::Size2M => {
                assert!(caps.pages_2m);
                n2m += 1
            }
            PageSize::Size4K => n4k += 1,
        }
        let mut a = gpa;
        while a < gpa + size {
            assert_eq!(t.memtype, naive(raw, a), "type at {a:#x} in page {gpa:#x} ({:?})", t.page_size);
            a += 4096;
        }
        // An offset inside the page translates to the same offset.
        let mid = gpa + size / 2 + 123;
        assert_eq!(ept.translate(mid).map(|t| t.hpa), Some(mid));
        gpa += size;
    }
    assert_eq!(ept.translate(ept.limit()), None);
    (n1g, n2m, n4k)
}

#[test]
fn wb_default_with_uc_hole_whole_space() {
    let raw = wb_default_uc_hole();
    let ept = build(&raw, 8 * GIB, ALL);
    let (n1g, n2m, n4k) = check_whole_space(&ept, &raw, ALL);
    // 0-1 GiB: fixed ranges force 4 KiB pages in the first 2 MiB; 1-3 GiB WB and 3-4 GiB
    // UC as 1 GiB pages; 4-8 GiB WB.
    assert_eq!(n1g, 7);
    assert_eq!(n2m, 511);
    assert_eq!(n4k, 512);
    assert_eq!(ept.stats(), Stats { tables: 1 + 1 + 1 + 1, pages_1g: 7, pages_2m: 511, pages_4k: 512 });
    assert_eq!(ept.translate(0xa0000).unwrap().memtype, MemType::Uc);
    assert_eq!(ept.translate(0xa0000).unwrap().page_size, PageSize::Size4K);
    assert_eq!(ept.translate(3 * GIB).unwrap().memtype, MemType::Uc);
    assert_eq!(ept.translate(3 * GIB).unwrap().page_size, PageSize::Size1G);
}

#[test]
fn firmware_style_layout_whole_space() {
    let raw = uc_default_wb_vars();
    let ept = build(&raw, 1 << 36, ALL);
    let (n1g, _, n4k) = check_whole_space(&ept, &raw, ALL);
    assert!(n1g >= 60, "{n1g}");
    // The 64 KiB UC hole at 0x7ff0_0000 is mapped with 4 KiB pages.
    assert_eq!(ept.translate(0x7ff0_0000).unwrap().page_size, PageSize::Size4K);
    assert_eq!(n4k, 1024);
    assert_eq!(ept.translate(0xe000_0000).unwrap().memtype, MemType::Wc);
}

#[test]
fn overlapping_layout_whole_space() {
    let raw = overlapping();
    let ept = build(&raw, 6 * GIB, ALL);
    check_whole_space(&ept, &raw, ALL);
    assert_eq!(ept.translate(GIB + 2 * MIB).unwrap().memtype, MemType::Wt);
    assert_eq!(ept.translate(GIB + 2 * MIB).unwrap().page_size, PageSize::Size2M);
    assert_eq!(ept.translate(2 * GIB).unwrap().page_size, PageSize::Size4K);
}

#[test]
fn caps_limit_page_sizes() {
    let raw = wb_default_uc_hole();
    for caps in [
        EptCaps { pages_1g: false, ..ALL },
        EptCaps { pages_1g: false, pages_2m: false, ..ALL },
        EptCaps { pages_2m: false, ..ALL },
    ] {
        let ept = build(&raw, 5 * GIB, caps);
        let (n1g, n2m, n4k) = check_whole_space(&ept, &raw, caps);
        assert_eq!(n1g * 512 * 512 + n2m * 512 + n4k, 5 * 512 * 512);
    }
}

#[test]
fn unaligned_limit() {
    let raw = wb_default_uc_hole();
    let max = GIB + 3 * MIB + 5;
    let ept = build(&raw, max, ALL);
    assert_eq!(ept.limit(), GIB + 3 * MIB + 4096);
    check_whole_space(&ept, &raw, ALL);
    assert_eq!(ept.translate(GIB + 3 * MIB).unwrap().page_size, PageSize::Size4K);
    assert_eq!(ept.translate(GIB).unwrap().page_size, PageSize::Size2M);
    assert_eq!(ept.translate(GIB + 3 * MIB + 4096), None);
}

#[test]
fn bad_limits_refused() {
    let m = wb_default_uc_hole().mtrrs();
    for max in [0, (1u64 << 48) + 1, u64::MAX] {
        let r = Ept::build_identity(max, &m, ALL, FakeMem::new());
        assert!(matches!(r, Err((EptError::BadLimit, _))), "{max:#x}");
    }
    assert!(Ept::build_identity(1 << 48, &m, ALL, FakeMem::new()).is_ok());
}

#[test]
fn out_of_memory_during_build_frees_everything() {
    let raw = wb_default_uc_hole();
    for budget in 0..4 {
        let mut mem = FakeMem::new();
        mem.budget = Some(budget);
        let (e, mem) = Ept::build_identity(8 * GIB, &raw.mtrrs(), ALL, mem).err().unwrap();
        assert_eq!(e, EptError::OutOfMemory);
        assert_eq!(mem.live(), 0);
        assert_eq!(mem.allocated, budget);
    }
}

#[test]
fn eptp_encoding() {
    let ept = build(&wb_default_uc_hole(), GIB, ALL);
    assert_eq!(ept.eptp(false), ept.pml4() | 6 | 3 << 3);
    assert_eq!(ept.eptp(true), ept.pml4() | 6 | 3 << 3 | 1 << 6);
    let ept = build(&wb_default_uc_hole(), GIB, EptCaps { wb_allowed: false, ad_bits: false, ..ALL });
    assert_eq!(ept.eptp(true), ept.pml4() | 3 << 3);
}

#[test]
fn split_1g_and_permission_round_trip() {
    let raw = wb_default_uc_hole();
    let mut ept = build(&raw, 8 * GIB, ALL);
    let target = 5 * GIB + 7 * MIB + 0x3000;
    assert_eq!(ept.translate(target).unwrap().page_size, PageSize::Size1G);
    let before = ept.stats();
    assert_eq!(ept.set_perms_4k(target + 0x123, Perms::R), Ok(true));
    let after = ept.stats();
    assert_eq!(after.pages_1g, before.pages_1g - 1);
    assert_eq!(after.pages_2m, before.pages_2m + 511);
    assert_eq!(after.pages_4k, before.pages_4k + 512);
    assert_eq!(after.tables, before.tables + 2);
    let t = ept.translate(target).unwrap();
    assert_eq!((t.hpa, t.perms, t.memtype, t.page_size), (target, Perms::R, MemType::Wb, PageSize::Size4K));
    // Neighbours keep their rights and type, at the right sizes.
    assert_eq!(ept.translate(target + 4096).unwrap().perms, Perms::RWX);
    assert_eq!(ept.translate(target - 4096).unwrap().page_size, PageSize::Size4K);
    assert_eq!(ept.translate(5 * GIB).unwrap().page_size, PageSize::Size2M);
    check_whole_space_except(&ept, &raw, &[target]);
    // Same perms again: nothing to do, no INVEPT.
    assert_eq!(ept.set_perms_4k(target, Perms::R), Ok(false));
    // Every valid combination round-trips.
    for p in [Perms::NONE, Perms::R, Perms::RW, Perms::RX, Perms::X, Perms::RWX] {
        assert_eq!(ept.set_perms_4k(target, p), Ok(true), "{p}");
        assert_eq!(ept.perms_of(target), Some(p));
        let t = ept.translate(target).unwrap();
        assert_eq!((t.hpa, t.memtype), (target, MemType::Wb), "{p}");
    }
    assert_eq!(ept.perms_of(target), Some(Perms::RWX));
    check_whole_space_except(&ept, &raw, &[]);
}

/// Like check_whole_space but without page-size accounting; `skip` pages may differ in perms.
fn check_whole_space_except(ept: &Ept<FakeMem>, raw: &Raw, skip: &[u64]) {
    let skip: HashSet<u64> = skip.iter().copied().collect();
    let mut gpa = 0;
    while gpa < ept.limit() {
        let t = ept.translate(gpa).unwrap();
        assert_eq!(t.hpa, gpa);
        assert_eq!(t.memtype, naive(raw, gpa), "{gpa:#x}");
        if !skip.contains(&gpa) {
            assert_eq!(t.perms, Perms::RWX, "{gpa:#x}");
        }
        gpa += t.page_size.bytes();
    }
}

#[test]
fn split_2m_keeps_type() {
    let raw = overlapping();
    let mut ept = build(&raw, 6 * GIB, ALL);
    let wt = GIB + 2 * MIB + 0x5000;
    assert_eq!(ept.translate(wt).unwrap().page_size, PageSize::Size2M);
    assert_eq!(ept.set_perms_4k(wt, Perms::RX), Ok(true));
    for a in [wt, wt + 4096, GIB + 2 * MIB, GIB + 4 * MIB - 4096] {
        let t = ept.translate(a).unwrap();
        assert_eq!((t.memtype, t.page_size), (MemType::Wt, PageSize::Size4K), "{a:#x}");
    }
    assert_eq!(ept.perms_of(wt), Some(Perms::RX));
    assert_eq!(ept.perms_of(wt + 4096), Some(Perms::RWX));
    check_whole_space_except(&ept, &raw, &[wt & !0xfff]);
}

#[test]
fn no_split_when_perms_already_match() {
    let mut ept = build(&wb_default_uc_hole(), 2 * GIB, ALL);
    let before = ept.stats();
    assert_eq!(ept.set_perms_4k(GIB + 4096, Perms::RWX), Ok(false));
    assert_eq!(ept.stats(), before);
}

#[test]
fn invalid_requests_refused_without_change() {
    let raw = wb_default_uc_hole();
    let caps = EptCaps { execute_only: false, ..ALL };
    let mut ept = build(&raw, 2 * GIB, caps);
    let before = ept.stats();
    let a = GIB + 12 * MIB;
    assert_eq!(ept.set_perms_4k(a, Perms::W), Err(EptError::InvalidPerms(Perms::W)));
    assert_eq!(ept.set_perms_4k(a, Perms::W | Perms::X), Err(EptError::InvalidPerms(Perms::W | Perms::X)));
    assert_eq!(ept.set_perms_4k(a, Perms::X), Err(EptError::ExecuteOnlyUnsupported));
    assert_eq!(ept.set_perms_4k(2 * GIB, Perms::R), Err(EptError::NotMapped));
    assert_eq!(ept.set_perms_4k(u64::MAX, Perms::R), Err(EptError::NotMapped));
    assert_eq!(ept.stats(), before);
    check_whole_space(&ept, &raw, caps);
    assert_eq!(format!("{}", EptError::ExecuteOnlyUnsupported), "execute-only EPT pages are not supported by this CPU");
}

#[test]
fn out_of_memory_during_split_changes_nothing() {
    let raw = wb_default_uc_hole();
    let mut ept = build(&raw, 8 * GIB, ALL);
    let a = 6 * GIB + 4096;
    // No frame at all: the 1 GiB page stays.
    ept.alloc.budget = Some(0);
    assert_eq!(ept.set_perms_4k(a, Perms::R), Err(EptError::OutOfMemory));
    assert_eq!(ept.translate(a).unwrap().page_size, PageSize::Size1G);
    assert_eq!(ept.perms_of(a), Some(Perms::RWX));
    // One frame: 1 GiB -> 2 MiB done (translations unchanged), 2 MiB -> 4 KiB fails.
    ept.alloc.budget = Some(1);
    assert_eq!(ept.set_perms_4k(a, Perms::R), Err(EptError::OutOfMemory));
    assert_eq!(ept.perms_of(a), Some(Perms::RWX));
    check_whole_space_except(&ept, &raw, &[]);
    ept.alloc.budget = None;
    assert_eq!(ept.set_perms_4k(a, Perms::R), Ok(true));
    assert_eq!(ept.perms_of(a), Some(Perms::R));
}

#[test]
fn destroy_frees_every_frame() {
    let raw = uc_default_wb_vars();
    let mut ept = build(&raw, 16 * GIB, ALL);
    for a in [0x1000, 0x7ff0_0000, 5 * GIB + 0x1000, 5 * GIB + 0x2000, 9 * GIB] {
        ept.set_perms_4k(a, Perms::NONE).unwrap();
    }
    let tables = ept.stats().tables as usize;
    let mem = ept.destroy();
    assert_eq!(mem.live(), 0);
    assert_eq!(mem.freed, tables);
}

#[test]
fn no_large_page_across_boundaries_random_layouts() {
    // Random variable ranges (power-of-two, aligned) over a 4 GiB space: every leaf's type
    // must be the reference type of each of its 4 KiB pages.
    let mut x: u64 = 0xdead_beef_1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..8 {
        let mut var = Vec::new();
        for _ in 0..(2 + next() % 5) {
            let size = 1u64 << (12 + next() % 21);
            let base = (next() % (4 * GIB)) & !(size - 1);
            let t = [0u64, 1, 4, 5, 6][(next() % 5) as usize];
            var.push((base | t, mask(size, 36)));
        }
        let raw = Raw {
            cap: 0x50a,
            def: (1 << 11) | (1 << 10) | 6,
            fixed: crate::mtrr::tests::pc_fixed(),
            var,
            phys_bits: 36,
        };
        let ept = build(&raw, 4 * GIB, ALL);
        check_whole_space(&ept, &raw, ALL);
    }
}

#[test]
fn caps_from_msr() {
    // Bochs 2.7 corei7_skylake_x IA32_VMX_EPT_VPID_CAP (see vmx's profiles).
    assert_eq!(EptCaps::from_ept_vpid_cap(0x0000_0f01_0633_4141), ALL);
    assert_eq!(EptCaps::from_ept_vpid_cap(0), EptCaps::default());
}

#[test]
fn range_permissions() {
    let raw = wb_default_uc_hole();
    let mut ept = build(&raw, 4 * GIB, ALL);
    let start = GIB + 2 * MIB - 3 * 4096 + 5;
    assert_eq!(ept.set_perms_range(start, 5 * 4096, Perms::R), Ok(true));
    for k in 0..6u64 {
        let a = (start & !0xfff) + k * 4096;
        assert_eq!(ept.perms_of(a), Some(Perms::R), "{a:#x}");
    }
    assert_eq!(ept.perms_of((start & !0xfff) - 4096), Some(Perms::RWX));
    assert_eq!(ept.perms_of((start & !0xfff) + 6 * 4096), Some(Perms::RWX));
    assert_eq!(ept.set_perms_range(start, 5 * 4096, Perms::R), Ok(false));
    assert_eq!(ept.set_perms_range(4 * GIB - 4096, 8192, Perms::R), Err((EptError::NotMapped, false)));
    assert_eq!(ept.set_perms_range(u64::MAX - 10, 100, Perms::R), Err((EptError::NotMapped, false)));
    assert_eq!(ept.set_perms_range(0, 4096, Perms::W), Err((EptError::InvalidPerms(Perms::W), false)));
    // No frames left: pages in already-split 2 MiB regions still change.
    ept.alloc.budget = Some(0);
    assert_eq!(ept.set_perms_range(GIB + 2 * MIB - 4096, 4096, Perms::RWX), Ok(true));
    // Allocation failure midway: the first page (split region) changed, so INVEPT is
    // needed; the second (an unsplit 2 MiB page) did not.
    assert_eq!(ept.set_perms_range(GIB + 4 * MIB - 4096, 2 * 4096, Perms::R), Err((EptError::OutOfMemory, true)));
    assert_eq!(ept.perms_of(GIB + 4 * MIB - 4096), Some(Perms::R));
    assert_eq!(ept.translate(GIB + 4 * MIB).unwrap().page_size, PageSize::Size2M);
    check_whole_space_except(
        &ept,
        &raw,
        &[
            GIB + 2 * MIB - 3 * 4096,
            GIB + 2 * MIB - 2 * 4096,
            GIB + 2 * MIB,
            GIB + 2 * MIB + 4096,
            GIB + 2 * MIB + 2 * 4096,
            GIB + 4 * MIB - 4096,
        ],
    );
    assert_eq!(ept.perms_of(GIB + 2 * MIB - 4096), Some(Perms::RWX));
}

/// An allocator that hands out misaligned frames.
struct Misaligned(FakeMem);

impl FrameAllocator for Misaligned {
    fn alloc_zeroed(&mut self) -> Option<u64> {
        let pa = self.0.alloc_zeroed()?;
        // Re-key the frame at a misaligned address.
        let f = self.0.frames.remove(&pa).unwrap();
        self.0.frames.insert(pa + 8, f);
        Some(pa + 8)
    }
    fn free(&mut self, pa: u64) {
        self.0.free(pa)
    }
    fn read_entry(&self, pa: u64, index: usize) -> u64 {
        self.0.read_entry(pa, index)
    }
    fn write_entry(&mut self, pa: u64, index: usize, value: u64) {
        self.0.write_entry(pa, index, value)
    }
}

#[test]
fn unusable_frames_are_refused_and_returned() {
    let m = wb_default_uc_hole().mtrrs();
    let (e, a) = Ept::build_identity(GIB, &m, ALL, Misaligned(FakeMem::new())).err().unwrap();
    assert!(matches!(e, EptError::BadFrame(pa) if pa & 0xfff == 8), "{e:?}");
    assert_eq!(a.0.live(), 0);
}

/// Every leaf of `[0, limit)` identity-mapped, RWX and of its MTRR type, except the 4 KiB
/// pages in `remapped`, which must keep only their MTRR type.
fn check_identity_except(ept: &Ept<FakeMem>, raw: &Raw, remapped: &[u64]) {
    let remapped: HashSet<u64> = remapped.iter().copied().collect();
    let mut gpa = 0;
    while gpa < ept.limit() {
        let t = ept.translate(gpa).unwrap();
        assert_eq!(t.memtype, naive(raw, gpa), "{gpa:#x}");
        if !remapped.contains(&gpa) {
            assert_eq!((t.hpa, t.perms), (gpa, Perms::RWX), "{gpa:#x}");
        }
        gpa += t.page_size.bytes();
    }
}

#[test]
fn remap_inside_1g_page_splits_and_round_trips() {
    let raw = wb_default_uc_hole();
    let mut ept = build(&raw, 8 * GIB, ALL);
    let target = 5 * GIB + 7 * MIB + 0x3000;
    let hpa = 0x1234_5000;
    assert_eq!(ept.translate(target).unwrap().page_size, PageSize::Size1G);
    let before = ept.stats();
    assert_eq!(ept.remap_4k(target + 0x123, hpa, Perms::RX), Ok(true));
    let after = ept.stats();
    assert_eq!(after.pages_1g, before.pages_1g - 1);
    assert_eq!(after.pages_2m, before.pages_2m + 511);
    assert_eq!(after.pages_4k, before.pages_4k + 512);
    assert_eq!(after.tables, before.tables + 2);
    let t = ept.translate(target).unwrap();
    assert_eq!((t.hpa, t.perms, t.memtype, t.page_size), (hpa, Perms::RX, MemType::Wb, PageSize::Size4K));
    // An offset inside the page lands at the same offset of the new host page.
    assert_eq!(ept.translate(target + 0xfff).unwrap().hpa, hpa + 0xfff);
    // Neighbours keep identity and rights.
    for a in [target - 4096, target + 4096] {
        let t = ept.translate(a).unwrap();
        assert_eq!((t.hpa, t.perms, t.page_size), (a, Perms::RWX, PageSize::Size4K), "{a:#x}");
    }
    assert_eq!(ept.translate(5 * GIB).unwrap().page_size, PageSize::Size2M);
    check_identity_except(&ept, &raw, &[target]);
    // The same remap again: nothing to do, no INVEPT.
    assert_eq!(ept.remap_4k(target, hpa, Perms::RX), Ok(false));
    assert_eq!(ept.stats(), after);
    // Only the rights, or only the target, changing is a change; every valid set of
    // rights keeps the address (none included).
    for p in [Perms::NONE, Perms::R, Perms::RW, Perms::X, Perms::RWX, Perms::RX] {
        assert_eq!(ept.remap_4k(target, hpa, p), Ok(true), "{p}");
        let t = ept.translate(target).unwrap();
        assert_eq!((t.hpa, t.perms, t.memtype), (hpa, p, MemType::Wb), "{p}");
    }
    assert_eq!(ept.remap_4k(target, hpa + 4096, Perms::RX), Ok(true));
    assert_eq!(ept.translate(target).unwrap().hpa, hpa + 4096);
    // Back to the identity, RWX: the whole map is the identity map again.
    assert_eq!(ept.remap_4k(target, target, Perms::RWX), Ok(true));
    check_whole_space_except(&ept, &raw, &[]);
    assert_eq!(ept.remap_4k(target, target, Perms::RWX), Ok(false));
    assert_eq!(ept.stats(), after);
    let tables = after.tables as usize;
    let mem = ept.destroy();
    assert_eq!((mem.live(), mem.freed), (0, tables));
}

#[test]
fn remap_inside_2m_page_keeps_type_and_ipat() {
    let raw = overlapping();
    let mut ept = build(&raw, 6 * GIB, ALL);
    let wt = GIB + 2 * MIB + 0x5000;
    assert_eq!(ept.translate(wt).unwrap().page_size, PageSize::Size2M);
    // The leaf's type is the guest page's (WT here), wherever it now points.
    assert_eq!(ept.remap_4k(wt, 0x3000, Perms::RX), Ok(true));
    let t = ept.translate(wt).unwrap();
    assert_eq!(
        (t.hpa, t.perms, t.memtype, t.page_size, t.ignore_pat),
        (0x3000, Perms::RX, MemType::Wt, PageSize::Size4K, false)
    );
    for a in [wt - 4096, wt + 4096, GIB + 2 * MIB, GIB + 4 * MIB - 4096] {
        let t = ept.translate(a).unwrap();
        assert_eq!((t.hpa, t.perms, t.memtype, t.page_size), (a, Perms::RWX, MemType::Wt, PageSize::Size4K), "{a:#x}");
    }
    check_identity_except(&ept, &raw, &[wt & !0xfff]);
    // A leaf with ignore-PAT set keeps it.
    let (table, i, level, e) = ept.walk(wt).unwrap();
    assert_eq!(level, 1);
    ept.alloc.write_entry(table, i, e | IPAT);
    assert_eq!(ept.remap_4k(wt, wt & !0xfff, Perms::RWX), Ok(true));
    let t = ept.translate(wt).unwrap();
    assert_eq!((t.hpa, t.perms, t.memtype, t.ignore_pat), (wt & !0xfff, Perms::RWX, MemType::Wt, true));
}

#[test]
fn identity_remap_of_a_large_page_changes_nothing() {
    let mut ept = build(&wb_default_uc_hole(), 2 * GIB, ALL);
    let before = ept.stats();
    assert_eq!(ept.remap_4k(GIB + 4096, GIB + 4096, Perms::RWX), Ok(false));
    assert_eq!(ept.remap_4k(GIB + 3 * MIB + 0x42, GIB + 3 * MIB, Perms::RWX), Ok(false));
    assert_eq!(ept.stats(), before);
}

#[test]
fn invalid_remaps_refused_without_change() {
    let raw = wb_default_uc_hole();
    let caps = EptCaps { execute_only: false, ..ALL };
    let mut ept = build(&raw, 2 * GIB, caps);
    let before = ept.stats();
    let a = GIB + 12 * MIB;
    assert_eq!(ept.remap_4k(a, 0x5001, Perms::RX), Err(EptError::BadTarget(0x5001)));
    assert_eq!(ept.remap_4k(a, 0x5800, Perms::RX), Err(EptError::BadTarget(0x5800)));
    assert_eq!(ept.remap_4k(a, 2 * GIB, Perms::RX), Err(EptError::BadTarget(2 * GIB)));
    let top = !0xfff_u64;
    assert_eq!(ept.remap_4k(a, top, Perms::RX), Err(EptError::BadTarget(top)));
    assert_eq!(ept.remap_4k(a, 0x5000, Perms::W), Err(EptError::InvalidPerms(Perms::W)));
    assert_eq!(ept.remap_4k(a, 0x5000, Perms::W | Perms::X), Err(EptError::InvalidPerms(Perms::W | Perms::X)));
    assert_eq!(ept.remap_4k(a, 0x5000, Perms::X), Err(EptError::ExecuteOnlyUnsupported));
    assert_eq!(ept.remap_4k(2 * GIB, 0x5000, Perms::R), Err(EptError::NotMapped));
    assert_eq!(ept.remap_4k(u64::MAX, 0x5000, Perms::R), Err(EptError::NotMapped));
    assert_eq!(ept.stats(), before);
    check_whole_space(&ept, &raw, caps);
    // The last page below the limit is a valid target.
    assert_eq!(ept.remap_4k(a, 2 * GIB - 4096, Perms::RX), Ok(true));
    assert_eq!(ept.translate(a).unwrap().hpa, 2 * GIB - 4096);
    assert_eq!(
        format!("{}", EptError::BadTarget(0x5001)),
        "host-physical address 0x5001 is not a page below the EPT map's limit"
    );
}

#[test]
fn out_of_memory_during_remap_changes_nothing() {
    let raw = wb_default_uc_hole();
    let mut ept = build(&raw, 8 * GIB, ALL);
    let a = 6 * GIB + 4096;
    ept.alloc.budget = Some(0);
    assert_eq!(ept.remap_4k(a, 0x7000, Perms::RX), Err(EptError::OutOfMemory));
    assert_eq!(ept.translate(a).unwrap().page_size, PageSize::Size1G);
    // One frame: 1 GiB -> 2 MiB done (translations unchanged), 2 MiB -> 4 KiB fails.
    ept.alloc.budget = Some(1);
    assert_eq!(ept.remap_4k(a, 0x7000, Perms::RX), Err(EptError::OutOfMemory));
    check_whole_space_except(&ept, &raw, &[]);
    ept.alloc.budget = None;
    assert_eq!(ept.remap_4k(a, 0x7000, Perms::RX), Ok(true));
    assert_eq!(ept.translate(a).map(|t| (t.hpa, t.perms)), Some((0x7000, Perms::RX)));
}
