//! XCR0 rules: what XSETBV accepts (SDM Vol. 2C, XSETBV; Vol. 1, 13.3 "Enabling the
//! XSAVE feature set and XSAVE-enabled features"). The exit handler checks a guest's
//! XSETBV with [`check_xsetbv`] before executing it in root mode, where an invalid value
//! would fault; the guest gets the #GP hardware would have raised.
use core::fmt;

/// XCR0 state components.
pub const X87: u64 = 1 << 0;
pub const SSE: u64 = 1 << 1;
pub const AVX: u64 = 1 << 2;
pub const MPX_BNDREGS: u64 = 1 << 3;
pub const MPX_BNDCSR: u64 = 1 << 4;
pub const MPX: u64 = MPX_BNDREGS | MPX_BNDCSR;
pub const OPMASK: u64 = 1 << 5;
pub const ZMM_HI256: u64 = 1 << 6;
pub const HI16_ZMM: u64 = 1 << 7;
/// The three AVX-512 components.
pub const AVX512: u64 = OPMASK | ZMM_HI256 | HI16_ZMM;
pub const AMX_TILECFG: u64 = 1 << 17;
pub const AMX_TILEDATA: u64 = 1 << 18;
pub const AMX: u64 = AMX_TILECFG | AMX_TILEDATA;

/// Why XSETBV would raise #GP(0) (CPL aside, which the caller checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsetbvFault {
    /// ECX names an XCR other than XCR0.
    NotXcr0(u32),
    /// Bits the CPU does not support (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
    Unsupported(u64),
    /// Bit 0 (x87) clear.
    X87Clear,
    /// Bit 2 (AVX) set without bit 1 (SSE).
    AvxWithoutSse,
    /// Bits 5-7 (opmask, ZMM_Hi256, Hi16_ZMM) neither all set nor all clear.
    Avx512Partial,
    /// Bits 5-7 set without bit 2 (AVX).
    Avx512WithoutAvx,
    /// Bits 3 and 4 (MPX BNDREGS, BNDCSR) differ.
    MpxPartial,
    /// Bits 17 and 18 (AMX TILECFG, TILEDATA) differ.
    AmxPartial,
}

impl fmt::Display for XsetbvFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsetbvFault::NotXcr0(x) => write!(f, "XCR{x} is not XCR0"),
            XsetbvFault::Unsupported(b) => write!(f, "unsupported XCR0 bits {b:#x}"),
            XsetbvFault::X87Clear => f.write_str("XCR0.X87 clear"),
            XsetbvFault::AvxWithoutSse => f.write_str("XCR0.AVX without SSE"),
            XsetbvFault::Avx512Partial => f.write_str("XCR0 AVX-512 bits 5-7 not all equal"),
            XsetbvFault::Avx512WithoutAvx => f.write_str("XCR0 AVX-512 bits without AVX"),
            XsetbvFault::MpxPartial => f.write_str("XCR0 MPX bits 3-4 not equal"),
            XsetbvFault::AmxPartial => f.write_str("XCR0 AMX bits 17-18 not equal"),
        }
    }
}

/// The XCR0 bits a CPU supports, from CPUID.(EAX=0DH,ECX=0) (`[eax, ebx, ecx, edx]`).
pub fn supported_xcr0(leaf_0d_0: [u32; 4]) -> u64 {
    ((leaf_0d_0[3] as u64) << 32) | leaf_0d_0[0] as u64
}

/// Checks XSETBV with ECX = `ecx` and EDX:EAX = `value` on a CPU supporting the XCR0 bits
/// `supported`: `Ok` when the instruction would succeed, else the first rule it breaks.
pub fn check_xsetbv(ecx: u32, value: u64, supported: u64) -> Result<(), XsetbvFault> {
    if ecx != 0 {
        return Err(XsetbvFault::NotXcr0(ecx));
    }
    if value & !supported != 0 {
        return Err(XsetbvFault::Unsupported(value & !supported));
    }
    if value & X87 == 0 {
        return Err(XsetbvFault::X87Clear);
    }
    if value & AVX != 0 && value & SSE == 0 {
        return Err(XsetbvFault::AvxWithoutSse);
    }
    let avx512 = value & AVX512;
    if avx512 != 0 && avx512 != AVX512 {
        return Err(XsetbvFault::Avx512Partial);
    }
    if avx512 != 0 && value & AVX == 0 {
        return Err(XsetbvFault::Avx512WithoutAvx);
    }
    let mpx = value & MPX;
    if mpx != 0 && mpx != MPX {
        return Err(XsetbvFault::MpxPartial);
    }
    let amx = value & AMX;
    if amx != 0 && amx != AMX {
        return Err(XsetbvFault::AmxPartial);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use XsetbvFault::*;

    /// A CPU with everything up to AMX: x87 SSE AVX MPX AVX-512 PKRU(9) AMX.
    const ALL: u64 = X87 | SSE | AVX | MPX | AVX512 | (1 << 9) | AMX;
    /// A CPU without MPX, AVX-512 or AMX (Bochs' corei7_skylake_x offers x87 SSE AVX).
    const AVX_ONLY: u64 = X87 | SSE | AVX;

    #[test]
    fn xcr0_rules() {
        let cases: &[(u32, u64, u64, Result<(), XsetbvFault>)] = &[
            // What Linux writes.
            (0, X87 | SSE, ALL, Ok(())),
            (0, X87 | SSE | AVX, AVX_ONLY, Ok(())),
            (0, X87 | SSE | AVX | AVX512, ALL, Ok(())),
            (0, ALL, ALL, Ok(())),
            (0, X87, ALL, Ok(())),
            (0, X87 | SSE | AVX | AMX, ALL, Ok(())),
            (0, X87 | MPX, ALL, Ok(())),
            // Only XCR0 can be written.
            (1, X87 | SSE, ALL, Err(NotXcr0(1))),
            (0xffff_ffff, X87, ALL, Err(NotXcr0(0xffff_ffff))),
            // Bit 0 must be 1.
            (0, 0, ALL, Err(X87Clear)),
            (0, SSE | AVX, ALL, Err(X87Clear)),
            // AVX needs SSE.
            (0, X87 | AVX, ALL, Err(AvxWithoutSse)),
            // AVX-512: all three or none, and only with AVX.
            (0, X87 | SSE | AVX | OPMASK, ALL, Err(Avx512Partial)),
            (0, X87 | SSE | AVX | ZMM_HI256 | HI16_ZMM, ALL, Err(Avx512Partial)),
            (0, X87 | SSE | AVX | HI16_ZMM, ALL, Err(Avx512Partial)),
            (0, X87 | SSE | AVX512, ALL, Err(Avx512WithoutAvx)),
            // MPX: both or neither.
            (0, X87 | MPX_BNDREGS, ALL, Err(MpxPartial)),
            (0, X87 | MPX_BNDCSR, ALL, Err(MpxPartial)),
            // AMX: both or neither.
            (0, X87 | SSE | AVX | AMX_TILECFG, ALL, Err(AmxPartial)),
            (0, X87 | SSE | AVX | AMX_TILEDATA, ALL, Err(AmxPartial)),
            // Nothing the CPU does not support, reserved bits included.
            (0, X87 | SSE | AVX | AVX512, AVX_ONLY, Err(Unsupported(AVX512))),
            (0, X87 | SSE | AMX, AVX_ONLY, Err(Unsupported(AMX))),
            (0, X87 | (1 << 63), ALL, Err(Unsupported(1 << 63))),
            (0, u64::MAX, ALL, Err(Unsupported(!ALL))),
        ];
        for &(ecx, value, supported, want) in cases {
            assert_eq!(
                check_xsetbv(ecx, value, supported),
                want,
                "ecx={ecx} value={value:#x} supported={supported:#x}"
            );
        }
    }

    #[test]
    fn supported_bits_come_from_edx_eax() {
        assert_eq!(supported_xcr0([0x0006_02e7, 0x2440, 0x2440, 0]), 0x6_02e7);
        assert_eq!(supported_xcr0([7, 0, 0, 0x8000_0000]), (1 << 63) | 7);
    }

    #[test]
    fn every_value_a_cpu_supports_obeys_the_rules_or_is_refused() {
        // Exhaustive over the low 20 bits on the full CPU: whatever is accepted satisfies
        // each rule as the SDM states it.
        for v in 0..(1u64 << 20) {
            if check_xsetbv(0, v, ALL).is_ok() {
                assert!(v & X87 != 0 && v & !ALL == 0, "{v:#x}");
                assert!(v & AVX == 0 || v & SSE != 0, "{v:#x}");
                assert!(matches!(v & AVX512, 0 | AVX512), "{v:#x}");
                assert!(v & AVX512 == 0 || v & AVX != 0, "{v:#x}");
                assert!(matches!(v & MPX, 0 | MPX) && matches!(v & AMX, 0 | AMX), "{v:#x}");
            }
        }
    }
}
