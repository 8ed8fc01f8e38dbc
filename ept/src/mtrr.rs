//! Memory types from the MTRRs (SDM vol. 3 section 11.11): fixed ranges below 1 MiB,
//! variable ranges, the default type, and the precedence rules of 11.11.4.1 for overlaps.
use x86::msr;

/// A memory type as encoded in MTRRs, PAT and EPT entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemType {
    Uc = 0,
    Wc = 1,
    Wt = 4,
    Wp = 5,
    Wb = 6,
}

impl MemType {
    /// Decodes an encoding; reserved encodings (2, 3, 7..) give `None`.
    pub fn from_bits(v: u64) -> Option<MemType> {
        match v {
            0 => Some(MemType::Uc),
            1 => Some(MemType::Wc),
            4 => Some(MemType::Wt),
            5 => Some(MemType::Wp),
            6 => Some(MemType::Wb),
            _ => None,
        }
    }
    /// Like [`MemType::from_bits`], but a reserved encoding counts as UC (the safe choice).
    pub fn from_bits_or_uc(v: u64) -> MemType {
        MemType::from_bits(v).unwrap_or(MemType::Uc)
    }
    pub fn bits(self) -> u64 {
        self as u64
    }
    pub fn name(self) -> &'static str {
        match self {
            MemType::Uc => "UC",
            MemType::Wc => "WC",
            MemType::Wt => "WT",
            MemType::Wp => "WP",
            MemType::Wb => "WB",
        }
    }
}

/// The fixed-range MTRR MSRs in address order (64K, 16K x2, 4K x8).
pub const FIXED_MSRS: [u32; 11] = [
    msr::IA32_MTRR_FIX64K_00000,
    msr::IA32_MTRR_FIX16K_80000,
    msr::IA32_MTRR_FIX16K_A0000,
    msr::IA32_MTRR_FIX4K_C0000,
    msr::IA32_MTRR_FIX4K_C8000,
    msr::IA32_MTRR_FIX4K_D0000,
    msr::IA32_MTRR_FIX4K_D8000,
    msr::IA32_MTRR_FIX4K_E0000,
    msr::IA32_MTRR_FIX4K_E8000,
    msr::IA32_MTRR_FIX4K_F0000,
    msr::IA32_MTRR_FIX4K_F8000,
];

/// IA32_MTRR_PHYSBASEn / PHYSMASKn MSR numbers for variable range `n`.
pub fn var_msrs(n: u32) -> (u32, u32) {
    (msr::IA32_MTRR_PHYSBASE0 + 2 * n, msr::IA32_MTRR_PHYSMASK0 + 2 * n)
}

/// Most variable ranges kept (real CPUs have 8-10; IA32_MTRRCAP.VCNT is 8 bits).
pub const MAX_VAR: usize = 32;

/// End of the fixed-range region.
pub const FIXED_END: u64 = 0x10_0000;

/// MTRR state of one CPU, decoded from raw MSR values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mtrrs {
    /// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled. When clear, all memory is UC.
    pub enabled: bool,
    /// Fixed ranges in use (MTRRCAP.FIX, DEF_TYPE.FE and .E).
    pub fixed_enabled: bool,
    pub default: MemType,
    /// Type of each fixed sub-range, in address order (88 entries).
    fixed: [MemType; 88],
    /// Valid variable ranges: (base, mask, type), both restricted to the physical-address
    /// width and to bits 12 and up.
    var: [(u64, u64, MemType); MAX_VAR],
    nvar: usize,
    /// Physical-address width in bits (clamped to 32..=52).
    pub phys_bits: u8,
}

/// Start and size of fixed sub-range `i` (0..88).
fn fixed_range(i: usize) -> (u64, u64) {
    match i {
        0..=7 => (i as u64 * 0x1_0000, 0x1_0000),
        8..=23 => (0x8_0000 + (i as u64 - 8) * 0x4000, 0x4000),
        _ => (0xc_0000 + (i as u64 - 24) * 0x1000, 0x1000),
    }
}

/// Index of the fixed sub-range holding `addr` (< 1 MiB).
fn fixed_index(addr: u64) -> usize {
    if addr < 0x8_0000 {
        (addr >> 16) as usize
    } else if addr < 0xc_0000 {
        8 + ((addr - 0x8_0000) >> 14) as usize
    } else {
        24 + ((addr - 0xc_0000) >> 12) as usize
    }
}

/// Combines the types of all matching variable ranges (SDM 11.11.4.1): UC wins; identical
/// types stay; WT with WB gives WT; any other mix is undefined and treated as UC.
fn combine(acc: Option<MemType>, t: MemType) -> Option<MemType> {
    Some(match acc {
        None => t,
        Some(a) if a == t => a,
        Some(MemType::Uc) => MemType::Uc,
        Some(a) => match (a, t) {
            (_, MemType::Uc) => MemType::Uc,
            (MemType::Wt, MemType::Wb) | (MemType::Wb, MemType::Wt) => MemType::Wt,
            _ => MemType::Uc,
        },
    })
}

impl Mtrrs {
    /// Decodes raw values. `cap` = IA32_MTRRCAP, `def_type` = IA32_MTRR_DEF_TYPE,
    /// `fixed` = the [`FIXED_MSRS`] values, `var` = (PHYSBASEn, PHYSMASKn) pairs (only the
    /// first MTRRCAP.VCNT are used), `phys_bits` = CPUID.80000008H:EAX\[7:0\]. Total: reserved
    /// type encodings count as UC, invalid ranges (V clear) are ignored.
    pub fn from_raw(cap: u64, def_type: u64, fixed: &[u64; 11], var: &[(u64, u64)], phys_bits: u8) -> Mtrrs {
        let phys_bits = phys_bits.clamp(32, 52);
        let addr_mask = ((1u64 << phys_bits) - 1) & !0xfff;
        let enabled = def_type & (1 << 11) != 0;
        let fixed_enabled = enabled && cap & (1 << 8) != 0 && def_type & (1 << 10) != 0;
        let mut f = [MemType::Uc; 88];
        for (i, slot) in f.iter_mut().enumerate() {
            let msr = fixed[match i {
                0..=7 => 0,
                8..=15 => 1,
                16..=23 => 2,
                _ => 3 + (i - 24) / 8,
            }];
            let byte = match i {
                0..=7 => i,
                8..=23 => (i - 8) % 8,
                _ => (i - 24) % 8,
            };
            *slot = MemType::from_bits_or_uc((msr >> (8 * byte)) & 0xff);
        }
        let vcnt = ((cap & 0xff) as usize).min(var.len()).min(MAX_VAR);
        let mut vars = [(0u64, 0u64, MemType::Uc); MAX_VAR];
        let mut nvar = 0;
        for &(base, mask) in var.iter().take(vcnt) {
            if mask & (1 << 11) == 0 {
                continue;
            }
            vars[nvar] = (base & addr_mask, mask & addr_mask, MemType::from_bits_or_uc(base & 0xff));
            nvar += 1;
        }
        Mtrrs {
            enabled,
            fixed_enabled,
            default: MemType::from_bits_or_uc(def_type & 0xff),
            fixed: f,
            var: vars,
            nvar,
            phys_bits,
        }
    }

    /// Reads the MTRR MSRs with `rdmsr` (a fault-safe RDMSR, `None` on #GP) and decodes
    /// them. Without a readable IA32_MTRRCAP/IA32_MTRR_DEF_TYPE the result says "MTRRs
    /// disabled": everything UC. `phys_bits` = CPUID.80000008H:EAX\[7:0\].
    pub fn read(mut rdmsr: impl FnMut(u32) -> Option<u64>, phys_bits: u8) -> Mtrrs {
        let (cap, def) = match (rdmsr(msr::IA32_MTRRCAP), rdmsr(msr::IA32_MTRR_DEF_TYPE)) {
            (Some(c), Some(d)) => (c, d),
            _ => (0, 0),
        };
        let mut fixed = [0u64; 11];
        if cap & (1 << 8) != 0 {
            for (f, &m) in fixed.iter_mut().zip(FIXED_MSRS.iter()) {
                // An unreadable fixed MSR counts as UC (0) for its ranges.
                *f = rdmsr(m).unwrap_or(0);
            }
        }
        let n = ((cap & 0xff) as usize).min(MAX_VAR);
        let mut var = [(0u64, 0u64); MAX_VAR];
        for (i, v) in var.iter_mut().enumerate().take(n) {
            let (b, m) = var_msrs(i as u32);
            // An unreadable pair is treated as an invalid (unused) range.
            *v = match (rdmsr(b), rdmsr(m)) {
                (Some(b), Some(m)) => (b, m),
                _ => (0, 0),
            };
        }
        Mtrrs::from_raw(cap, def, &fixed, &var[..n], phys_bits)
    }

    /// Valid variable ranges as (base, mask, type).
    pub fn variable(&self) -> &[(u64, u64, MemType)] {
        &self.var[..self.nvar]
    }

    /// First address beyond the physical-address width.
    pub fn phys_limit(&self) -> u64 {
        1u64 << self.phys_bits
    }

    /// Type of one address.
    pub fn type_of(&self, addr: u64) -> MemType {
        if !self.enabled || addr >= self.phys_limit() {
            return MemType::Uc;
        }
        if self.fixed_enabled && addr < FIXED_END {
            return self.fixed[fixed_index(addr)];
        }
        let mut acc = None;
        for &(base, mask, t) in self.variable() {
            if addr & mask == base & mask {
                acc = combine(acc, t);
            }
        }
        acc.unwrap_or(self.default)
    }

    /// Type of the aligned block `[s, s + 2^order)`, or `None` if not uniform or if the
    /// evaluation budget ran out (the caller then uses smaller blocks).
    fn block(&self, s: u64, order: u32, budget: &mut u32) -> Option<MemType> {
        *budget = budget.checked_sub(1)?;
        let size = 1u64 << order;
        let split = |this: &Self, budget: &mut u32| -> Option<MemType> {
            let a = this.block(s, order - 1, budget)?;
            let b = this.block(s + size / 2, order - 1, budget)?;
            (a == b).then_some(a)
        };
        if !self.enabled || s >= self.phys_limit() {
            return Some(MemType::Uc);
        }
        if order > 12 && s + size > self.phys_limit() {
            return split(self, budget);
        }
        if self.fixed_enabled && s < FIXED_END {
            if s + size > FIXED_END {
                return split(self, budget);
            }
            let (fs, fsize) = fixed_range(fixed_index(s));
            if s + size <= fs + fsize {
                return Some(self.fixed[fixed_index(s)]);
            }
            return split(self, budget);
        }
        let mut acc = None;
        for &(base, mask, t) in self.variable() {
            // Address bits above the block are fixed: if they disagree with the range's
            // base on a mask bit, nothing in the block matches.
            if (s ^ base) & mask & !(size - 1) != 0 {
                continue;
            }
            if mask & (size - 1) != 0 {
                // Some addresses of the block match and some do not.
                return split(self, budget);
            }
            acc = combine(acc, t);
        }
        Some(acc.unwrap_or(self.default))
    }

    /// The type of every byte of `[start, start + len)` if they all have the same one;
    /// `None` if not uniform, if `len` is 0, if the range wraps, or (for pathological
    /// MTRR masks) if deciding would take too long.
    pub fn type_of_range(&self, start: u64, len: u64) -> Option<MemType> {
        let end = start.checked_add(len)?;
        if len == 0 {
            return None;
        }
        // Page granularity: MTRRs never distinguish addresses within a 4 KiB page.
        let mut s = start & !0xfff;
        let end = end.checked_add(0xfff)? & !0xfff;
        let mut budget: u32 = 1 << 14;
        let mut acc: Option<MemType> = None;
        while s < end {
            // Largest aligned power-of-two block starting at s and ending by `end`.
            let align = if s == 0 { 63 } else { s.trailing_zeros().min(63) };
            let mut order = align;
            while order > 12 && (1u64 << order) > end - s {
                order -= 1;
            }
            let t = self.block(s, order, &mut budget)?;
            match acc {
                None => acc = Some(t),
                Some(a) if a != t => return None,
                _ => {}
            }
            s = s.checked_add(1u64 << order)?;
        }
        acc
    }
}

#[cfg(test)]
pub(crate) mod tests;
