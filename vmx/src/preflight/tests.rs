use super::*;
use crate::caps::{idx, profiles::BOCHS_27_SKYLAKE_X, tests::profile_raw, RawCaps, CR4_FRED};

extern crate std;
use std::format;
use std::string::ToString;

/// What kdbt's hypervisor needs (EPT identity map, VPID, MSR bitmaps, 64-bit host/guest).
const KDBT: Features = Features::VMX
    .union(Features::MSR_BITMAPS)
    .union(Features::SECONDARY_CONTROLS)
    .union(Features::HOST_64BIT)
    .union(Features::GUEST_64BIT)
    .union(Features::EFER_SWITCH)
    .union(Features::EPT)
    .union(Features::EPT_PWL4)
    .union(Features::EPT_WB)
    .union(Features::INVEPT_ALL)
    .union(Features::RDTSCP)
    .union(Features::INVPCID)
    .union(Features::XSAVES);

fn req(required: Features) -> Request {
    Request { required, mask: Features::empty() }
}

fn bochs() -> RawCaps {
    profile_raw(&BOCHS_27_SKYLAKE_X)
}

#[test]
fn bochs_passes_kdbt_requirements() {
    let c = VmxCaps::decode(&bochs());
    let ok = preflight(&c, 0, &req(KDBT)).unwrap();
    assert!(!ok.needs_lock);
    assert!(ok.available.contains(KDBT | Features::EPT_EXECUTE_ONLY | Features::VMFUNC_EPTP | Features::VE));
    assert!(!ok.available.contains(Features::MTF));
}

#[test]
fn bochs_without_mtf_refuses_mtf() {
    let c = VmxCaps::decode(&bochs());
    let err = preflight(&c, 0, &req(KDBT | Features::MTF)).unwrap_err();
    assert_eq!(err.iter().collect::<std::vec::Vec<_>>(), [Refusal::Missing(Features::MTF)]);
    assert_eq!(err.to_string(), "required VMX features missing: MTF");
}

#[test]
fn no_vmx() {
    let mut r = bochs();
    r.cpuid1_ecx &= !crate::caps::CPUID1_ECX_VMX;
    r.vendor = [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")];
    let c = VmxCaps::decode(&r);
    let err = preflight(&c, 0, &req(KDBT)).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err.to_string(), "no VT-x: CPUID.1:ECX.VMX is clear (vendor AuthenticAMD)");
}

#[test]
fn vmxe_already_set() {
    let c = VmxCaps::decode(&bochs());
    let err = preflight(&c, CR4_VMXE, &req(KDBT)).unwrap_err();
    assert!(err.contains(&Refusal::VmxAlreadyInUse));
    assert!(err.to_string().contains("another hypervisor or KVM holds VMX"));
    // From the snapshot too.
    let mut r = bochs();
    r.cr4 |= CR4_VMXE;
    assert!(preflight(&VmxCaps::decode(&r), r.cr4, &req(KDBT)).unwrap_err().contains(&Refusal::VmxAlreadyInUse));
}

#[test]
fn feature_control_states() {
    let with_fc = |v: Option<u64>| {
        let mut r = bochs();
        match v {
            Some(v) => r.msrs[idx::FEATURE_CONTROL] = v,
            None => r.msr_valid &= !(1 << idx::FEATURE_CONTROL),
        }
        preflight(&VmxCaps::decode(&r), 0, &req(KDBT))
    };
    // Bochs at reset / firmware that leaves it alone: unlocked -> caller locks it.
    assert_eq!(with_fc(Some(0)).map(|c| c.needs_lock), Ok(true));
    assert_eq!(with_fc(Some(4)).map(|c| c.needs_lock), Ok(true));
    assert_eq!(with_fc(Some(5)).map(|c| c.needs_lock), Ok(false));
    // Locked with VMX outside SMX off (e.g. Linux without CONFIG_KVM_INTEL locked it).
    let e = with_fc(Some(1)).unwrap_err();
    assert_eq!(e.iter().collect::<std::vec::Vec<_>>(), [Refusal::FeatureControlLockedOff]);
    assert!(e.to_string().contains("enable VT-x in the firmware setup"));
    // Only inside SMX: still refused.
    assert!(with_fc(Some(3)).unwrap_err().contains(&Refusal::FeatureControlLockedOff));
    assert!(with_fc(None).unwrap_err().contains(&Refusal::FeatureControlUnreadable));
    assert_eq!(feature_control_lock_value(0), 5);
    assert_eq!(feature_control_lock_value(0x100), 0x105);
}

#[test]
fn mask_pretends_features_are_missing() {
    let c = VmxCaps::decode(&bochs());
    let masked = |mask: Features| preflight(&c, 0, &Request { required: KDBT, mask });
    let e = masked(Features::EPT | Features::INVPCID).unwrap_err();
    assert_eq!(e.iter().collect::<std::vec::Vec<_>>(), [Refusal::Missing(Features::EPT | Features::INVPCID)]);
    assert_eq!(e.to_string(), "required VMX features missing: EPT INVPCID");
    // Masking something not required changes nothing but `available`.
    let ok = masked(Features::MTF | Features::VE).unwrap();
    assert!(!ok.available.contains(Features::VE));
    // Masking VMX: looks like a CPU without VT-x.
    let e = masked(Features::VMX).unwrap_err();
    assert!(matches!(e.iter().next(), Some(Refusal::NoVmx { .. })));
}

#[test]
fn several_reasons_reported_together() {
    let mut r = bochs();
    r.msrs[idx::FEATURE_CONTROL] = 1;
    r.msrs[idx::EPT_VPID_CAP] = 0;
    let c = VmxCaps::decode(&r);
    let e = preflight(&c, CR4_VMXE, &req(KDBT)).unwrap_err();
    assert_eq!(e.len(), 3, "{e}");
    assert!(e.contains(&Refusal::VmxAlreadyInUse));
    assert!(e.contains(&Refusal::FeatureControlLockedOff));
    assert!(e.contains(&Refusal::Missing(Features::EPT_PWL4 | Features::EPT_WB | Features::INVEPT_ALL)));
    assert_eq!(format!("{e}").lines().count(), 3);
}

#[test]
fn unreadable_capability_msrs() {
    let mut r = bochs();
    r.msr_valid &= !(1 << idx::BASIC);
    assert!(preflight(&VmxCaps::decode(&r), 0, &req(Features::VMX))
        .unwrap_err()
        .contains(&Refusal::CapabilityMsrsUnreadable));
    let mut r = bochs();
    r.msr_valid &= !((1 << idx::ENTRY) | (1 << idx::TRUE_ENTRY));
    let e = preflight(&VmxCaps::decode(&r), 0, &req(KDBT)).unwrap_err();
    assert!(e.contains(&Refusal::CapabilityMsrsUnreadable));
    assert!(e.contains(&Refusal::Missing(Features::GUEST_64BIT | Features::EFER_SWITCH)));
    let mut r = bochs();
    r.msrs[idx::BASIC] &= !(0xf << 50);
    assert!(preflight(&VmxCaps::decode(&r), 0, &req(Features::VMX)).unwrap_err().contains(&Refusal::VmcsMemTypeNotWb));
}

#[test]
fn garbage_never_panics() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let mut r = RawCaps { cpuid1_ecx: next() as u32, msr_valid: next() as u32, cr4: next(), ..RawCaps::default() };
        for m in r.msrs.iter_mut() {
            *m = next();
        }
        let c = VmxCaps::decode(&r);
        let res = preflight(
            &c,
            next(),
            &Request { required: Features::from_bits_retain(next()), mask: Features::from_bits_retain(next()) },
        );
        if let Err(e) = res {
            assert!(!e.is_empty());
            let _ = format!("{e}");
        }
    }
}

/// A CPUID table for `native_needs`: (leaf, subleaf) -> registers; absent leaves are 0.
fn cpuid_of(table: &[((u32, u32), [u32; 4])]) -> impl Fn(u32, u32) -> [u32; 4] + '_ {
    move |l, s| table.iter().find(|(k, _)| *k == (l, s)).map_or([0; 4], |(_, v)| *v)
}

#[test]
fn native_features_become_requirements() {
    let all = [
        ((0, 0), [0xd, 0, 0, 0]),
        ((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]),
        ((0x8000_0001, 0), [0, 0, 0, 1 << 27]),
        ((7, 0), [0, 1 << 10, 0, 0]),
        ((0xd, 1), [1 << 3, 0, 0, 0]),
    ];
    assert_eq!(native_needs(cpuid_of(&all)), Features::RDTSCP | Features::INVPCID | Features::XSAVES);
    // RDPID alone also needs "enable RDTSCP".
    let rdpid = [((0, 0), [7, 0, 0, 0]), ((7, 0), [0, 0, 1 << 22, 0])];
    assert_eq!(native_needs(cpuid_of(&rdpid)), Features::RDTSCP);
    // Leaves above the maximum are not read: a CPU reporting max leaf 1 needs nothing.
    let old = [((0, 0), [1, 0, 0, 0]), ((7, 0), [0, !0, !0, !0]), ((0xd, 1), [!0, 0, 0, 0])];
    assert_eq!(native_needs(cpuid_of(&old)), Features::empty());
}

#[test]
fn a_native_feature_vmx_cannot_pass_through_is_refused_by_name() {
    let caps = VmxCaps::decode(&bochs());
    let req = Request { required: KDBT | Features::XSAVES, mask: Features::XSAVES };
    let e = preflight(&caps, 0, &req).unwrap_err();
    assert!(e.contains(&Refusal::Missing(Features::XSAVES)), "{e}");
    assert!(format!("{e}").to_lowercase().contains("xsaves"), "{e}");
}

/// Bochs 2.7 `corei7_skylake_x`: IA32_VMX_CR4_FIXED0 / FIXED1.
const BOCHS_CR4_FIXED: (u64, u64) = (0x2000, 0x0037_27ff);
/// CR4 of the small kernel on that model: PSE PAE MCE PGE OSFXSR OSXMMEXCPT FSGSBASE PCIDE
/// OSXSAVE SMEP SMAP.
const LINUX_CR4: u64 = 0x3706f0;

#[test]
fn cr4_bits_vmx_does_not_allow() {
    let (f0, f1) = BOCHS_CR4_FIXED;
    let pke = 1 << 22;
    let la57 = 1 << 12;
    // (CR4, FIXED0, FIXED1) -> (set but must be 0, clear but must be 1)
    let cases: &[(u64, u64, u64, u64, u64)] = &[
        // The kernel's CR4 as it is: nothing to change (VMXE is kdbt's to set).
        (LINUX_CR4, f0, f1, 0, 0),
        (0, f0, f1, 0, 0),
        // Features the kernel enabled that this CPU's VMX does not allow.
        (LINUX_CR4 | pke, f0, f1, pke, 0),
        (LINUX_CR4 | pke | la57, f0, f1, pke | la57, 0),
        (LINUX_CR4 | CR4_FRED, f0, f1, CR4_FRED, 0),
        // A bit FIXED0 requires that the kernel has clear (here PAE).
        (LINUX_CR4 & !0x20, f0 | 0x20, f1, 0, 0x20),
        // Both at once.
        (LINUX_CR4 & !0x20 | pke, f0 | 0x20, f1, pke, 0x20),
        // Unknown FIXED MSRs (kdbt treats FIXED1 as all ones): nothing refused.
        (LINUX_CR4 | pke, 0, u64::MAX, 0, 0),
    ];
    for &(cr4, fixed0, fixed1, must0, must1) in cases {
        let c = cr4_disallowed(cr4, fixed0, fixed1);
        assert_eq!(
            c,
            CrConflict { set_but_must_be_0: must0, clear_but_must_be_1: must1 },
            "cr4={cr4:#x} fixed0={fixed0:#x} fixed1={fixed1:#x}"
        );
        assert_eq!(c.is_empty(), must0 == 0 && must1 == 0);
    }
}

#[test]
fn cr4_bits_vmx_does_not_allow_are_refused_by_name() {
    let c = VmxCaps::decode(&bochs());
    assert_eq!((c.cr4_fixed.fixed0, c.cr4_fixed.fixed1), BOCHS_CR4_FIXED);
    assert!(preflight(&c, LINUX_CR4, &req(KDBT)).is_ok());
    let pke_la57 = (1 << 22) | (1 << 12);
    let e = preflight(&c, LINUX_CR4 | pke_la57 | (1 << 26), &req(KDBT)).unwrap_err();
    let want = CrConflict { set_but_must_be_0: pke_la57 | (1 << 26), clear_but_must_be_1: 0 };
    assert_eq!(e.iter().collect::<std::vec::Vec<_>>(), [Refusal::Cr4Fixed(want)]);
    assert_eq!(
        e.to_string(),
        "CR4 bits the CPU's VMX does not allow: set but must be 0 in VMX operation: LA57 PKE bit26"
    );
    let mut r = bochs();
    r.msrs[idx::CR4_FIXED0] |= 0x20;
    let e = preflight(&VmxCaps::decode(&r), LINUX_CR4 & !0x20 | (1 << 22), &req(KDBT)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "CR4 bits the CPU's VMX does not allow: set but must be 0 in VMX operation: PKE; clear but must be 1 in \
         VMX operation: PAE"
    );
}

#[test]
fn fred_is_refused_by_name() {
    let c = VmxCaps::decode(&bochs());
    let e = preflight(&c, LINUX_CR4 | CR4_FRED, &req(KDBT)).unwrap_err();
    // Named once, as FRED (not again as a CR4 bit this VMX does not allow).
    assert_eq!(e.iter().collect::<std::vec::Vec<_>>(), [Refusal::Fred]);
    let msg = e.to_string();
    assert!(msg.starts_with("CR4.FRED is set"), "{msg}");
    assert!(msg.contains("host IDT"), "{msg}");
    // A VMX that would allow CR4.FRED still refuses it.
    let mut r = bochs();
    r.msrs[idx::CR4_FIXED1] |= CR4_FRED;
    let e = preflight(&VmxCaps::decode(&r), LINUX_CR4 | CR4_FRED, &req(KDBT)).unwrap_err();
    assert_eq!(e.iter().collect::<std::vec::Vec<_>>(), [Refusal::Fred]);
    // With VMXE too, both are reported.
    let e = preflight(&c, LINUX_CR4 | CR4_FRED | CR4_VMXE, &req(KDBT)).unwrap_err();
    assert!(e.contains(&Refusal::Fred) && e.contains(&Refusal::VmxAlreadyInUse), "{e}");
}

#[test]
fn refusals_keep_every_variant_and_its_payload() {
    let all = [
        Refusal::NoVmx { vendor: *b"AuthenticAMD" },
        Refusal::VmxAlreadyInUse,
        Refusal::Fred,
        Refusal::Cr4Fixed(CrConflict { set_but_must_be_0: 1 << 22, clear_but_must_be_1: 0x20 }),
        Refusal::FeatureControlLockedOff,
        Refusal::FeatureControlUnreadable,
        Refusal::CapabilityMsrsUnreadable,
        Refusal::VmcsMemTypeNotWb,
        Refusal::Missing(Features::EPT | Features::VPID),
        Refusal::Cr0Fixed(CrConflict { set_but_must_be_0: 1 << 30, clear_but_must_be_1: 1 << 5 }),
    ];
    assert_eq!(all.len(), MAX_REFUSALS);
    let mut r = Refusals::default();
    assert!(r.is_empty());
    for x in all {
        r.push(x);
    }
    assert_eq!(r.len(), MAX_REFUSALS);
    assert_eq!(r.iter().collect::<std::vec::Vec<_>>(), all);
    assert!(all.iter().all(|x| r.contains(x)));
    assert!(!r.contains(&Refusal::Missing(Features::EPT)));
    assert_eq!(format!("{r}").lines().count(), MAX_REFUSALS);
}

#[test]
fn cr0_bits_vmx_does_not_allow_are_named() {
    // Bochs' and common hardware's CR0 fixed bits: PE, NE, PG must be 1; all may be 1.
    let (f0, f1) = (0x8000_0021u64, 0xffff_ffffu64);
    const LINUX_CR0: u64 = 0x8005_0033; // PE MP ET NE WP AM PG
    let pe_pg = 0x8000_0001;
    let cases: &[(u64, u64, u64, u64, u64, u64)] = &[
        (LINUX_CR0, f0, f1, 0, 0, 0),
        // NE clear: VMX operation needs it (the launch used to set it under the kernel).
        (LINUX_CR0 & !0x20, f0, f1, 0, 0, 0x20),
        // PE/PG clear are allowed with unrestricted guest, NE still is not.
        (0x10, f0, f1, pe_pg, 0, 0x20),
        (0x10, f0, f1, 0, 0, 0x8000_0021),
        // A bit FIXED1 does not allow (here CD).
        (LINUX_CR0 | 1 << 30, f0, f1 & !(1 << 30), 0, 1 << 30, 0),
        // Bits 32-63 of CR0 are reserved: FIXED1 has them clear.
        (LINUX_CR0 | 1 << 40, f0, f1, 0, 1 << 40, 0),
    ];
    for &(cr0, fixed0, fixed1, free, must0, must1) in cases {
        let c = cr0_disallowed(cr0, fixed0, fixed1, free);
        assert_eq!(
            c,
            CrConflict { set_but_must_be_0: must0, clear_but_must_be_1: must1 },
            "cr0={cr0:#x} fixed0={fixed0:#x} fixed1={fixed1:#x} free={free:#x}"
        );
        assert_eq!(c.is_empty(), must0 == 0 && must1 == 0);
    }
    let r = Refusal::Cr0Fixed(cr0_disallowed((LINUX_CR0 & !0x20) | 1 << 30, f0, f1 & !(1 << 30), 0));
    assert_eq!(
        std::format!("{r}"),
        "CR0 bits the CPU's VMX does not allow: set but must be 0 in VMX operation: CD; \
         clear but must be 1 in VMX operation: NE"
    );
    let r = Refusal::Cr4Fixed(cr4_disallowed(0x20 | 1 << 22, 0x2020, !(1u64 << 22)));
    assert_eq!(std::format!("{r}"), "CR4 bits the CPU's VMX does not allow: set but must be 0 in VMX operation: PKE");
}
