//! VMCS control adjustment (SDM vol. 3 section 25.x and appendix A.3; "algorithm 3" of
//! section 31.5.1): start from the controls kdbt wants, force the bits the CPU requires to
//! be 1, and refuse if a wanted bit may not be 1.
use core::fmt;

use crate::caps::{CtlCaps, CtlKind};

/// Wanted control bits the CPU does not allow to be 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingBits {
    /// Which field, when known (set by [`adjust_kind`]).
    pub kind: Option<CtlKind>,
    pub bits: u64,
}

impl MissingBits {
    /// Names of the missing bits that are known controls (unknown ones are skipped).
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        let known: &[(u64, &str)] = match self.kind {
            Some(k) => k.known_bits(),
            None => &[],
        };
        known.iter().filter(move |(m, _)| self.bits & m != 0).map(|(_, n)| *n)
    }
}

impl fmt::Display for MissingBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(k) => write!(f, "{} controls not allowed by this CPU:", k.name())?,
            None => write!(f, "controls not allowed by this CPU:")?,
        }
        let known: &[(u64, &str)] = self.kind.map_or(&[], |k| k.known_bits());
        for bit in 0..64u32 {
            let m = 1u64 << bit;
            if self.bits & m == 0 {
                continue;
            }
            match known.iter().find(|(k, _)| *k == m) {
                Some((_, n)) => write!(f, " {n} (bit {bit})")?,
                None => write!(f, " bit {bit}")?,
            }
        }
        Ok(())
    }
}

/// Adjusts a 32-bit control field: returns `desired | allowed0` (the must-be-1 bits set)
/// when every desired bit is allowed to be 1 (set in `allowed1`); otherwise the desired
/// bits that may not be 1. `allowed0`/`allowed1` are the low/high halves of the capability
/// MSR (the TRUE_ one when IA32_VMX_BASIC\[55\] is set).
///
/// A bit that is required (allowed0) but not allowed (allowed1) is a contradictory report:
/// it is refused as well, since no value could satisfy the CPU.
pub fn adjust(desired: u32, allowed0: u32, allowed1: u32) -> Result<u32, MissingBits> {
    adjust64(desired as u64, allowed0 as u64, allowed1 as u64).map(|v| v as u32)
}

/// [`adjust`] for the 64-bit tertiary controls.
pub fn adjust64(desired: u64, allowed0: u64, allowed1: u64) -> Result<u64, MissingBits> {
    let value = desired | allowed0;
    let bad = value & !allowed1;
    if bad != 0 {
        return Err(MissingBits { kind: None, bits: bad });
    }
    Ok(value)
}

/// [`adjust`] against the decoded capabilities of one field; errors name the field. A field
/// that is not available (e.g. secondary controls without "activate secondary controls")
/// accepts only `desired == 0`.
pub fn adjust_kind(kind: CtlKind, caps: &CtlCaps, desired: u64) -> Result<u64, MissingBits> {
    let (a0, a1) = if caps.present { (caps.allowed0, caps.allowed1) } else { (0, 0) };
    let r = if kind == CtlKind::Proc3 {
        adjust64(desired, a0, a1)
    } else {
        // 32-bit fields: bits above 31 can never be set.
        adjust64(desired, a0 & 0xffff_ffff, a1 & 0xffff_ffff)
    };
    r.map_err(|e| MissingBits { kind: Some(kind), ..e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{profiles::BOCHS_27_SKYLAKE_X, tests::profile_raw, VmxCaps};
    use x86::vmx::vmcs::control::{PrimaryControls, SecondaryControls};

    extern crate std;
    use std::format;
    use std::vec::Vec;

    #[test]
    fn sets_required_bits_and_keeps_desired() {
        assert_eq!(adjust(0, 0x16, 0x7f), Ok(0x16));
        assert_eq!(adjust(0x40, 0x16, 0x7f), Ok(0x56));
        assert_eq!(adjust(0x16, 0x16, 0x7f), Ok(0x16));
        assert_eq!(adjust(0, 0, 0), Ok(0));
        assert_eq!(adjust(u32::MAX, 0, u32::MAX), Ok(u32::MAX));
    }

    #[test]
    fn refuses_disallowed_bits() {
        assert_eq!(adjust(0x80 | 0x40, 0x16, 0x7f), Err(MissingBits { kind: None, bits: 0x80 }));
        assert_eq!(adjust(u32::MAX, 0, 0).unwrap_err().bits, u32::MAX as u64);
        // Contradictory capability: required yet not allowed.
        assert_eq!(adjust(0, 1, 0).unwrap_err().bits, 1);
    }

    #[test]
    fn exhaustive_small_widths() {
        // For every 4-bit desired/allowed0/allowed1, the result satisfies the CPU and keeps
        // every desired bit, or the error names exactly the offending bits.
        for d in 0..16u32 {
            for a0 in 0..16u32 {
                for a1 in 0..16u32 {
                    match adjust(d, a0, a1) {
                        Ok(v) => {
                            assert_eq!(v & a0, a0);
                            assert_eq!(v & !a1, 0);
                            assert_eq!(v & d, d);
                            assert_eq!(v, d | a0);
                        }
                        Err(e) => assert_eq!(e.bits, ((d | a0) & !a1) as u64),
                    }
                }
            }
        }
    }

    #[test]
    fn bochs_controls() {
        let c = VmxCaps::decode(&profile_raw(&BOCHS_27_SKYLAKE_X));
        let want = (PrimaryControls::USE_MSR_BITMAPS | PrimaryControls::SECONDARY_CONTROLS).bits() as u64;
        let v = adjust_kind(CtlKind::Proc, &c.proc, want).unwrap();
        // TRUE_PROCBASED: CR3 load/store exiting not forced.
        assert_eq!(v, want | 0x0400_6172);
        let err =
            adjust_kind(CtlKind::Proc, &c.proc, want | PrimaryControls::MONITOR_TRAP_FLAG.bits() as u64).unwrap_err();
        assert_eq!(err.bits, PrimaryControls::MONITOR_TRAP_FLAG.bits() as u64);
        assert_eq!(err.names().collect::<Vec<_>>(), ["MONITOR_TRAP_FLAG"]);
        assert!(format!("{err}").contains("MONITOR_TRAP_FLAG (bit 27)"), "{err}");
        let p2 = (SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID).bits() as u64;
        assert_eq!(adjust_kind(CtlKind::Proc2, &c.proc2, p2), Ok(p2));
        // Tertiary controls are unavailable: only 0 is accepted.
        assert_eq!(adjust_kind(CtlKind::Proc3, &c.proc3, 0), Ok(0));
        assert_eq!(adjust_kind(CtlKind::Proc3, &c.proc3, 1).unwrap_err().bits, 1);
        // Bits above 31 of a 32-bit field are refused.
        assert!(adjust_kind(CtlKind::Pin, &c.pin, 1 << 40).is_err());
    }
}
