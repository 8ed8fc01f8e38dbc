use super::*;

extern crate std;
use std::vec::Vec;

/// Raw MTRR MSR values of a simulated machine.
#[derive(Clone)]
pub(crate) struct Raw {
    pub cap: u64,
    pub def: u64,
    pub fixed: [u64; 11],
    pub var: Vec<(u64, u64)>,
    pub phys_bits: u8,
}

impl Raw {
    pub fn mtrrs(&self) -> Mtrrs {
        Mtrrs::from_raw(self.cap, self.def, &self.fixed, &self.var, self.phys_bits)
    }
}

const E: u64 = 1 << 11;
const FE: u64 = 1 << 10;
const V: u64 = 1 << 11;
pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const MIB: u64 = 1 << 20;

fn rep(t: u8) -> u64 {
    u64::from_le_bytes([t; 8])
}

/// PHYSMASK for a power-of-two `size` range with `phys_bits`.
pub(crate) fn mask(size: u64, phys_bits: u8) -> u64 {
    (!(size - 1) & ((1u64 << phys_bits) - 1) & !0xfff) | V
}

/// Fixed ranges: WB up to 0x9FFFF, UC VGA hole 0xA0000-0xBFFFF, WP ROM 0xC0000-0xFFFFF.
pub(crate) fn pc_fixed() -> [u64; 11] {
    let mut f = [rep(5); 11];
    f[0] = rep(6);
    f[1] = rep(6);
    f[2] = rep(0);
    f
}

/// WB default, UC hole at 3-4 GiB for MMIO (var0), fixed ranges as [`pc_fixed`].
pub(crate) fn wb_default_uc_hole() -> Raw {
    Raw { cap: 0x50a, def: E | FE | 6, fixed: pc_fixed(), var: std::vec![(3 * GIB, mask(GIB, 39))], phys_bits: 39 }
}

/// Firmware style: UC default, WB 0-2 GiB + 2-3 GiB + 4-8 GiB, WC frame buffer at
/// 0xE000_0000 (256 MiB, in the UC area), a UC 64 KiB hole inside the first WB range.
pub(crate) fn uc_default_wb_vars() -> Raw {
    Raw {
        cap: 0x50a,
        def: E | FE,
        fixed: pc_fixed(),
        var: std::vec![
            (6, mask(2 * GIB, 36)),
            ((2 * GIB) | 6, mask(GIB, 36)),
            ((4 * GIB) | 6, mask(4 * GIB, 36)),
            (0xe000_0000 | 1, mask(256 * MIB, 36)),
            (0x7ff0_0000, mask(64 << 10, 36)),
        ],
        phys_bits: 36,
    }
}

/// Overlaps: WB 0-4 GiB; WT 1 GiB + 2 MiB (2 MiB) -> WT; UC at 2 GiB (4 KiB) -> UC;
/// WC at 3 GiB (1 MiB) over WB -> undefined -> UC; WT and WP at 0x1_4000_0000 -> UC.
pub(crate) fn overlapping() -> Raw {
    Raw {
        cap: 0x508,
        def: E | FE,
        fixed: [rep(6); 11],
        var: std::vec![
            (6, mask(4 * GIB, 40)),
            ((GIB + 2 * MIB) | 4, mask(2 * MIB, 40)),
            (2 * GIB, mask(4096, 40)),
            ((3 * GIB) | 1, mask(MIB, 40)),
            (0x1_4000_0000 | 4, mask(2 * MIB, 40)),
            (0x1_4000_0000 | 5, mask(2 * MIB, 40)),
        ],
        phys_bits: 40,
    }
}

/// Independent reference: the SDM rules applied to raw values, one address at a time.
pub(crate) fn naive(raw: &Raw, addr: u64) -> MemType {
    let pb = raw.phys_bits.clamp(32, 52);
    if raw.def & E == 0 || addr >= 1u64 << pb {
        return MemType::Uc;
    }
    if raw.cap & (1 << 8) != 0 && raw.def & FE != 0 && addr < 0x10_0000 {
        let (msr, byte) = if addr < 0x80000 {
            (0, addr / 0x10000)
        } else if addr < 0xc0000 {
            let k = (addr - 0x80000) / 0x4000;
            (1 + k / 8, k % 8)
        } else {
            let k = (addr - 0xc0000) / 0x1000;
            (3 + k / 8, k % 8)
        };
        return MemType::from_bits_or_uc((raw.fixed[msr as usize] >> (8 * byte)) & 0xff);
    }
    let am = ((1u64 << pb) - 1) & !0xfff;
    let mut types = Vec::new();
    for &(b, m) in raw.var.iter().take((raw.cap & 0xff) as usize) {
        if m & V != 0 && addr & m & am == b & m & am {
            types.push(MemType::from_bits_or_uc(b & 0xff));
        }
    }
    if types.is_empty() {
        return MemType::from_bits_or_uc(raw.def & 0xff);
    }
    if types.contains(&MemType::Uc) {
        return MemType::Uc;
    }
    if types.iter().all(|t| *t == types[0]) {
        return types[0];
    }
    if types.iter().all(|t| matches!(t, MemType::Wt | MemType::Wb)) {
        return MemType::Wt;
    }
    MemType::Uc
}

fn brute_range(raw: &Raw, start: u64, len: u64) -> Option<MemType> {
    let first = naive(raw, start);
    let mut a = start & !0xfff;
    while a < start + len {
        if naive(raw, a) != first {
            return None;
        }
        a += 4096;
    }
    Some(first)
}

fn layouts() -> Vec<Raw> {
    std::vec![wb_default_uc_hole(), uc_default_wb_vars(), overlapping()]
}

#[test]
fn single_addresses_match_reference() {
    for raw in layouts() {
        let m = raw.mtrrs();
        let mut probes: Vec<u64> = (0..0x110).map(|k| k * 0x1000).collect();
        for &(b, mk) in &raw.var {
            let base = b & !0xfff;
            let size = (!(mk & !0xfff) & ((1u64 << raw.phys_bits) - 1)) + 1;
            for a in [base, base + size, base.wrapping_sub(4096), base + size - 4096, base + size / 2] {
                probes.push(a);
            }
        }
        for a in probes.into_iter().chain((0..64).map(|k| k * 256 * MIB)) {
            assert_eq!(m.type_of(a), naive(&raw, a), "addr {a:#x}");
        }
    }
}

#[test]
fn layout_expectations() {
    let m = wb_default_uc_hole().mtrrs();
    assert_eq!(m.type_of(0), MemType::Wb);
    assert_eq!(m.type_of(0xa0000), MemType::Uc);
    assert_eq!(m.type_of(0xbffff), MemType::Uc);
    assert_eq!(m.type_of(0xc0000), MemType::Wp);
    assert_eq!(m.type_of(0x100000), MemType::Wb);
    assert_eq!(m.type_of(3 * GIB - 1), MemType::Wb);
    assert_eq!(m.type_of(3 * GIB), MemType::Uc);
    assert_eq!(m.type_of(4 * GIB), MemType::Wb);
    assert_eq!(m.type_of_range(0, 0xa0000), Some(MemType::Wb));
    assert_eq!(m.type_of_range(0, 2 * MIB), None);
    assert_eq!(m.type_of_range(2 * MIB, GIB - 2 * MIB), Some(MemType::Wb));
    assert_eq!(m.type_of_range(3 * GIB, GIB), Some(MemType::Uc));
    assert_eq!(m.type_of_range(2 * GIB, 2 * GIB), None);
    assert_eq!(m.type_of_range(4 * GIB, 508 * GIB), Some(MemType::Wb));
    // Beyond the physical-address width: UC.
    assert_eq!(m.type_of(1 << 39), MemType::Uc);
    assert_eq!(m.type_of_range((1 << 39) - GIB, 2 * GIB), None);

    let m = overlapping().mtrrs();
    assert_eq!(m.type_of(GIB + 2 * MIB), MemType::Wt);
    assert_eq!(m.type_of_range(GIB + 2 * MIB, 2 * MIB), Some(MemType::Wt));
    assert_eq!(m.type_of(2 * GIB), MemType::Uc);
    assert_eq!(m.type_of(2 * GIB + 4096), MemType::Wb);
    assert_eq!(m.type_of(3 * GIB), MemType::Uc);
    assert_eq!(m.type_of(0x1_4000_0000), MemType::Uc);
    assert_eq!(m.type_of(4 * GIB), MemType::Uc);

    let m = uc_default_wb_vars().mtrrs();
    assert_eq!(m.type_of(0xe000_0000), MemType::Wc);
    assert_eq!(m.type_of(0x7ff0_0000), MemType::Uc);
    assert_eq!(m.type_of(0x7ff1_0000), MemType::Wb);
    assert_eq!(m.type_of(3 * GIB), MemType::Uc);
    assert_eq!(m.type_of(8 * GIB), MemType::Uc);
}

#[test]
fn ranges_match_brute_force() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for raw in layouts() {
        let m = raw.mtrrs();
        // Every aligned 2 MiB block of the first 10 GiB.
        let mut a = 0;
        while a < 10 * GIB {
            assert_eq!(m.type_of_range(a, 2 * MIB), brute_range(&raw, a, 2 * MIB), "{a:#x}");
            a += 2 * MIB;
        }
        // Random unaligned ranges.
        for _ in 0..300 {
            let start = next() % (10 * GIB);
            let len = 1 + next() % (64 * MIB);
            assert_eq!(m.type_of_range(start, len), brute_range(&raw, start, len), "{start:#x}+{len:#x}");
        }
    }
}

#[test]
fn disabled_and_fixed_off() {
    let mut raw = wb_default_uc_hole();
    raw.def &= !E;
    let m = raw.mtrrs();
    assert_eq!(m.type_of(0x100000), MemType::Uc);
    assert_eq!(m.type_of_range(0, 1 << 39), Some(MemType::Uc));
    // Fixed ranges disabled (FE clear): the first MiB follows the variable ranges/default.
    let mut raw = wb_default_uc_hole();
    raw.def &= !FE;
    let m = raw.mtrrs();
    assert_eq!(m.type_of(0xa0000), MemType::Wb);
    assert_eq!(m.type_of_range(0, GIB), Some(MemType::Wb));
    // Not supported in MTRRCAP: same.
    let mut raw = wb_default_uc_hole();
    raw.cap &= !(1 << 8);
    assert_eq!(raw.mtrrs().type_of(0xa0000), MemType::Wb);
}

#[test]
fn vcnt_and_valid_bit_are_honored() {
    let mut raw = wb_default_uc_hole();
    raw.var.push((0, mask(GIB, 39))); // UC 0-1 GiB, but beyond VCNT? no: VCNT is 10.
    assert_eq!(raw.mtrrs().type_of(0x200000), MemType::Uc);
    raw.cap = (raw.cap & !0xff) | 1;
    assert_eq!(raw.mtrrs().type_of(0x200000), MemType::Wb);
    let mut raw = wb_default_uc_hole();
    raw.var[0].1 &= !V;
    assert_eq!(raw.mtrrs().type_of(3 * GIB), MemType::Wb);
}

#[test]
fn non_contiguous_mask() {
    // Matches every other 1 GiB (bit 30 of the address must be 1) within 4 GiB: legal but odd.
    let raw = Raw {
        cap: 0x502,
        def: E | FE | 6,
        fixed: [rep(6); 11],
        var: std::vec![(GIB, (GIB | V) & !0xfff | V)],
        phys_bits: 32,
    };
    let m = raw.mtrrs();
    for g in 0..4u64 {
        let want = if g % 2 == 1 { MemType::Uc } else { MemType::Wb };
        assert_eq!(m.type_of(g * GIB + 12345), want);
        assert_eq!(m.type_of_range(g * GIB, GIB), Some(want));
    }
    assert_eq!(m.type_of_range(0, 2 * GIB), None);
    // Low mask bit (4 KiB stride): pages alternate.
    let raw =
        Raw { cap: 0x502, def: E | FE | 6, fixed: [rep(6); 11], var: std::vec![(0x1000, 0x1000 | V)], phys_bits: 32 };
    let m = raw.mtrrs();
    assert_eq!(m.type_of(0x200000), MemType::Wb);
    assert_eq!(m.type_of(0x201000), MemType::Uc);
    assert_eq!(m.type_of_range(0x200000, 0x1000), Some(MemType::Wb));
    assert_eq!(m.type_of_range(0x200000, 2 * MIB), None);
    assert_eq!(m.type_of_range(0, 1 << 32), None);
}

#[test]
fn garbage_is_total() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let mut fixed = [0u64; 11];
        for f in fixed.iter_mut() {
            *f = next();
        }
        let var: Vec<(u64, u64)> = (0..(next() % 40)).map(|_| (next(), next())).collect();
        let m = Mtrrs::from_raw(next(), next(), &fixed, &var, next() as u8);
        for _ in 0..20 {
            let a = next();
            let _ = m.type_of(a);
            let _ = m.type_of_range(a, next());
            let _ = m.type_of_range(a % (1 << 40), next() % (1 << 34));
        }
        assert_eq!(m.type_of_range(0, 0), None);
        assert_eq!(m.type_of_range(u64::MAX, 2), None);
    }
    let ones = Mtrrs::from_raw(u64::MAX, u64::MAX, &[u64::MAX; 11], &[(u64::MAX, u64::MAX); 40], 255);
    assert_eq!(ones.type_of(0), MemType::Uc);
    let _ = ones.type_of_range(0, u64::MAX);
}

#[test]
fn read_through_rdmsr() {
    let raw = uc_default_wb_vars();
    let rd = |m: u32| -> Option<u64> {
        match m {
            0xfe => Some(raw.cap),
            0x2ff => Some(raw.def),
            _ => {
                if let Some(i) = FIXED_MSRS.iter().position(|&f| f == m) {
                    return Some(raw.fixed[i]);
                }
                if (0x200..0x200 + 2 * raw.var.len() as u32).contains(&m) {
                    let i = ((m - 0x200) / 2) as usize;
                    return Some(if m.is_multiple_of(2) { raw.var[i].0 } else { raw.var[i].1 });
                }
                None
            }
        }
    };
    // VCNT is 10 but only 5 pairs exist: the missing ones fault and are ignored.
    assert_eq!(Mtrrs::read(rd, 36), raw.mtrrs());
    let m = Mtrrs::read(|_| None, 36);
    assert!(!m.enabled);
    assert_eq!(m.type_of_range(0, 1 << 36), Some(MemType::Uc));
}
