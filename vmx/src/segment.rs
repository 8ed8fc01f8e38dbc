//! Segment descriptors as VMX wants them: access-rights words for the VMCS guest-state
//! area, and bases of 64-bit system descriptors (TSS, LDT).

/// VMCS access-rights bit 16: the segment is unusable (null selector).
pub const AR_UNUSABLE: u32 = 1 << 16;

/// The VMCS access-rights word of a segment, from the result of `LAR` on its selector
/// (`None` when LAR failed, i.e. the selector is null or invalid).
///
/// LAR returns descriptor bits 8..24 of the high dword in bits 8..24 of its result
/// (type, S, DPL, P, AVL, L, D/B, G); the VMCS wants type..P in bits 0..8 and AVL..G in
/// bits 12..16 (SDM Vol. 3C, 25.4.1, Table 25-2).
pub fn access_rights(selector: u16, lar: Option<u32>) -> u32 {
    match lar {
        Some(v) if selector & !0x3 != 0 => (v >> 8) & 0xf0ff,
        _ => AR_UNUSABLE,
    }
}

/// Base address of a code/data descriptor (8 bytes).
pub fn descriptor_base(desc: u64) -> u64 {
    ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000)
}

/// Base address of a 64-bit system descriptor (16 bytes: `lo`, `hi`), e.g. the TSS.
pub fn system_descriptor_base(lo: u64, hi: u64) -> u64 {
    descriptor_base(lo) | ((hi & 0xffff_ffff) << 32)
}

/// Descriptor type field (bits 40..44) and the busy bit of a TSS descriptor.
pub const TSS_TYPE_AVAILABLE: u64 = 0x9;
pub const TSS_TYPE_BUSY: u64 = 0xb;

/// The low word of a TSS descriptor with its type set to "available" (so LTR accepts it).
pub fn tss_mark_available(lo: u64) -> u64 {
    (lo & !(0xf << 40)) | (TSS_TYPE_AVAILABLE << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_code_segment_access_rights() {
        // Linux __KERNEL_CS: 64-bit code, DPL 0, present, L=1, G=1: descriptor
        // 0x00af9b000000ffff; LAR gives 0x00af9b00.
        assert_eq!(access_rights(0x10, Some(0x00af_9b00)), 0xa09b);
        // __KERNEL_DS 0x00cf93000000ffff -> LAR 0x00cf9300.
        assert_eq!(access_rights(0x18, Some(0x00cf_9300)), 0xc093);
    }

    #[test]
    fn null_selectors_are_unusable() {
        assert_eq!(access_rights(0, None), AR_UNUSABLE);
        assert_eq!(access_rights(3, Some(0x00cf_f300)), AR_UNUSABLE);
        assert_eq!(access_rights(0x2b, None), AR_UNUSABLE);
    }

    #[test]
    #[allow(clippy::identity_op)] // every base byte written out, the zero one too
    fn tss_descriptor_base_and_busy_bit() {
        // A busy 64-bit TSS at 0xfffffe0000003000, limit 0x4087.
        let lo: u64 = 0x0000_8b00_3000_4087 | (0xfe << 56) | (0x00 << 32);
        let hi: u64 = 0xffff_fffe;
        assert_eq!(system_descriptor_base(lo, hi), 0xffff_fffe_fe00_3000);
        assert_eq!((lo >> 40) & 0xf, TSS_TYPE_BUSY);
        let avail = tss_mark_available(lo);
        assert_eq!((avail >> 40) & 0xf, TSS_TYPE_AVAILABLE);
        assert_eq!(avail & !(0xf << 40), lo & !(0xf << 40));
    }
}
