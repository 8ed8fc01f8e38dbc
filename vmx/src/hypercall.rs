//! The guest-visible interface of the kdbt hypervisor: CPUID leaves and the VMCALL ABI.
//!
//! CPUID `0x4000_0000` returns the maximum hypervisor leaf in EAX and the signature
//! "kdbtkdbtkdbt" in EBX, ECX, EDX. CPUID `0x4000_0001` returns EAX = [`VERSION`],
//! EBX = state bits ([`STATE_VIRTUALIZED`], ...), ECX = the CPU's kdbt index, EDX = 0.
//!
//! VMCALL (versioned): RAX = [`MAGIC`] | function number, arguments in RBX, RCX, RDX;
//! the result comes back in RAX ([`OK`] or an error code with the top bit set). Only CPL 0
//! may call: from any other privilege level, and for a RAX without the magic, VMCALL
//! raises #UD as it would natively outside VMX operation.

/// Hypervisor CPUID leaves.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
pub const CPUID_INFO_LEAF: u32 = 0x4000_0001;
/// "kdbt" as CPUID returns it in a register (little endian).
pub const SIGNATURE_WORD: u32 = u32::from_le_bytes(*b"kdbt");
/// Version of this interface (CPUID leaves and hypercalls).
pub const VERSION: u32 = 1;

/// Bits of EBX of leaf [`CPUID_INFO_LEAF`].
pub const STATE_VIRTUALIZED: u32 = 1 << 0;
pub const STATE_EPT: u32 = 1 << 1;
pub const STATE_VPID: u32 = 1 << 2;

/// High half of RAX for every kdbt hypercall ("kdbt").
pub const MAGIC: u64 = (SIGNATURE_WORD as u64) << 32;
const MAGIC_MASK: u64 = 0xffff_ffff_0000_0000;

/// Result codes in RAX.
pub const OK: u64 = 0;
pub const ERR_UNKNOWN_CALL: u64 = 1 << 63 | 1;
pub const ERR_BAD_ARGUMENT: u64 = 1 << 63 | 2;
pub const ERR_UNSUPPORTED: u64 = 1 << 63 | 3;
/// Root mode has no spare frame left for an EPT split ([`Call::EptSetPerms`],
/// [`Call::EptRemap`]).
pub const ERR_OUT_OF_FRAMES: u64 = 1 << 63 | 4;
/// Another CPU's root mode is changing the EPT tables right now: retry.
pub const ERR_BUSY: u64 = 1 << 63 | 5;

/// [`Call::EptSetPerms`] and [`Call::EptRemap`] result bit: the tables changed, INVEPT
/// every CPU.
pub const EPT_CHANGED: u64 = 1 << 3;
/// [`Call::EptQuery`]'s answer: the page's rights (bits 0-2: read, write, execute).
pub const EPT_QUERY_R: u64 = 1 << 0;
pub const EPT_QUERY_W: u64 = 1 << 1;

/// Hypercall functions. Numbers are ABI: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Call {
    /// Returns `MAGIC | VERSION` in RAX; RBX = the argument in RBX, bit-inverted.
    Ping = 1,
    /// Returns the number of VM exits this CPU has taken since launch.
    ExitCount = 2,
    /// Leaves VMX operation on this CPU and returns to the caller natively (RAX = OK).
    Devirtualize = 3,
    /// Sets the EPT permissions of the 4 KB page at RBX & !0xfff to RBX & 7 (R=1, W=2,
    /// X=4), in root mode: the EPT tables are hidden from the guest, so only root mode may
    /// write them (splits take frames from a pool root mode holds). RAX: the previous
    /// permissions | [`EPT_CHANGED`] if the tables changed (the caller then runs
    /// [`Call::EptInvalidate`] on every CPU), or an `ERR_*`.
    EptSetPerms = 0x10,
    /// INVEPT all-context on this CPU, after a change of the EPT tables.
    EptInvalidate = 0x11,
    /// The EPT permissions of the page at RBX (a software walk in root mode): RAX = R=1,
    /// W=2, X=4, or `ERR_BAD_ARGUMENT` when unmapped.
    EptQuery = 0x12,
    /// EPT-violation #VE on this CPU: RBX = the physical address of a zeroed, page-aligned
    /// virtualization-exception information area to turn it on, 0 to turn it off.
    VeControl = 0x13,
    /// Maps the 4 KB guest-physical page at RBX & !0xfff to the host-physical page in RCX
    /// (4 KB-aligned, below the map's limit) with the EPT permissions RBX & 7 (R=1, W=2,
    /// X=4), in root mode (splits as for [`Call::EptSetPerms`]); the entry keeps the guest
    /// page's memory type. RCX = the page itself restores the identity mapping. Neither
    /// page may be hypervisor memory hidden from the guest. RAX: the previous permissions
    /// | [`EPT_CHANGED`] if the tables changed (the caller then runs
    /// [`Call::EptInvalidate`] on every CPU), or an `ERR_*`.
    EptRemap = 0x14,
    /// Shadow paging: apply the current policy of the guest-physical page in RBX to this
    /// CPU's shadow leaves (and flush); `ERR_UNSUPPORTED` under EPT.
    ShadowApplyPolicy = 0x20,
}

impl Call {
    pub const fn rax(self) -> u64 {
        MAGIC | self as u32 as u64
    }
}

/// What a VMCALL's RAX asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not a kdbt hypercall (no magic): #UD, as natively.
    Foreign,
    /// kdbt magic but a function this version does not know.
    Unknown(u32),
    Call(Call),
}

pub fn decode(rax: u64) -> Decoded {
    if rax & MAGIC_MASK != MAGIC {
        return Decoded::Foreign;
    }
    let f = rax as u32;
    Decoded::Call(match f {
        1 => Call::Ping,
        2 => Call::ExitCount,
        3 => Call::Devirtualize,
        0x10 => Call::EptSetPerms,
        0x11 => Call::EptInvalidate,
        0x12 => Call::EptQuery,
        0x13 => Call::VeControl,
        0x14 => Call::EptRemap,
        0x20 => Call::ShadowApplyPolicy,
        other => return Decoded::Unknown(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip() {
        for c in [
            Call::Ping,
            Call::ExitCount,
            Call::Devirtualize,
            Call::EptSetPerms,
            Call::EptInvalidate,
            Call::EptQuery,
            Call::VeControl,
            Call::EptRemap,
            Call::ShadowApplyPolicy,
        ] {
            assert_eq!(decode(c.rax()), Decoded::Call(c));
        }
        assert_eq!(decode(MAGIC | 0x99), Decoded::Unknown(0x99));
        assert_eq!(decode(3), Decoded::Foreign);
        assert_eq!(decode(0x1234_5678_0000_0001), Decoded::Foreign);
    }

    #[test]
    fn signature_spells_kdbt() {
        assert_eq!(&SIGNATURE_WORD.to_le_bytes(), b"kdbt");
        assert_eq!(Call::Devirtualize.rax(), 0x7462_646b_0000_0003);
        assert_eq!(Call::EptRemap.rax(), 0x7462_646b_0000_0014);
    }
}
