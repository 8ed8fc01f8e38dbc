use super::*;
use crate::mtrr::tests::{naive, wb_default_uc_hole, GIB, MIB};
use crate::table::tests::FakeMem;
use crate::table::{EptCaps, PageSize};

extern crate std;
use std::collections::HashSet;
use std::format;
use std::vec::Vec;

const ALL: EptCaps = EptCaps { pages_2m: true, pages_1g: true, wb_allowed: true, execute_only: true, ad_bits: true };

/// A map of 8 GiB whose paging structures live inside it, at 6 GiB + 3 MiB (as the
/// kernel's do: its frames come from the RAM being mapped).
fn map_with_tables_inside() -> Ept<FakeMem> {
    let raw = wb_default_uc_hole();
    let mut mem = FakeMem::new();
    mem.next = 6 * GIB + 3 * MIB;
    Ept::build_identity(8 * GIB, &raw.mtrrs(), ALL, mem).map_err(|(e, _)| e).unwrap()
}

fn tables(ept: &Ept<FakeMem>) -> Vec<u64> {
    let mut v = Vec::new();
    ept.for_each_table(|t| v.push(t));
    v
}

#[test]
fn hides_pages_and_every_table_to_a_fixed_point() {
    let raw = wb_default_uc_hole();
    let mut ept = map_with_tables_inside();
    let before = tables(&ept);
    assert!(before.iter().all(|&t| ept.perms_of(t) == Some(Perms::RWX)));
    // A 64 KiB per-CPU block in another 1 GiB page, and one page at the start of RAM.
    let block = 2 * GIB + 5 * MIB;
    let extra: Vec<u64> = (0..16).map(|i| block + i * 4096).chain([0x1000]).collect();
    assert_eq!(hide_self(&mut ept, &extra), Ok(true));
    let after = tables(&ept);
    // Hiding needed splits: more tables than before, every one of them hidden, at 4 KiB.
    assert!(after.len() > before.len());
    for &t in &after {
        let tr = ept.translate(t).unwrap();
        assert_eq!((tr.perms, tr.page_size), (Perms::NONE, PageSize::Size4K), "table {t:#x}");
    }
    for &p in &extra {
        assert_eq!(ept.perms_of(p), Some(Perms::NONE), "{p:#x}");
    }
    // Everything else keeps its identity mapping, RWX, with its MTRR type.
    let hidden: HashSet<u64> = after.iter().chain(extra.iter()).copied().collect();
    let mut gpa = 0;
    while gpa < ept.limit() {
        let t = ept.translate(gpa).unwrap();
        assert_eq!((t.hpa, t.memtype), (gpa, naive(&raw, gpa)), "{gpa:#x}");
        if !hidden.contains(&gpa) {
            assert_eq!(t.perms, Perms::RWX, "{gpa:#x}");
        }
        gpa += t.page_size.bytes();
    }
    // The neighbours of the block are still there.
    assert_eq!(ept.perms_of(block - 4096), Some(Perms::RWX));
    assert_eq!(ept.perms_of(block + 16 * 4096), Some(Perms::RWX));
    // A second pass has nothing left to do.
    assert_eq!(hide_self(&mut ept, &extra), Ok(false));
    // Unhiding the block (a CPU's block freed while others run) restores RWX there only.
    for &p in &extra[..16] {
        assert_eq!(ept.set_perms_4k(p, Perms::RWX), Ok(true));
    }
    assert_eq!(ept.perms_of(block), Some(Perms::RWX));
    assert!(tables(&ept).iter().all(|&t| ept.perms_of(t) == Some(Perms::NONE)));
    assert!(ept.is_table(after[after.len() - 1] + 0x18));
    assert!(!ept.is_table(block));
}

#[test]
fn out_of_frames_is_an_error() {
    let mut ept = map_with_tables_inside();
    ept.allocator_mut().budget = Some(0);
    assert_eq!(hide_self(&mut ept, &[2 * GIB]), Err(EptError::OutOfMemory));
    // A page outside the map is refused, not ignored.
    ept.allocator_mut().budget = None;
    assert_eq!(hide_self(&mut ept, &[64 * GIB]), Err(EptError::NotMapped));
}

#[test]
fn names_per_cpu_objects() {
    let layout = |p: usize| match p {
        0 => Object::Vmxon,
        1 => Object::Vmcs,
        _ => Object::HostStack,
    };
    let blocks = [0x10_0000u64, 0, 0x40_0000];
    let f = |gpa| find_in_blocks(blocks, 0x1_0000, gpa, layout);
    assert_eq!(f(0x10_1008), Some(Hidden { object: Object::Vmcs, cpu: Some(0) }));
    assert_eq!(f(0x40_0000), Some(Hidden { object: Object::Vmxon, cpu: Some(2) }));
    assert_eq!(f(0x40_ffff), Some(Hidden { object: Object::HostStack, cpu: Some(2) }));
    assert_eq!(f(0x41_0000), None);
    assert_eq!(f(0x0), None);
    assert_eq!(format!("{}", f(0x10_1000).unwrap()), "hypervisor memory: vmcs of cpu0");
    assert_eq!(
        format!("{}", Hidden { object: Object::EptTable, cpu: None }),
        "hypervisor memory: ept paging structure"
    );
}
