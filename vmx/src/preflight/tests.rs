use super::*;
use crate::caps::{idx, profiles::BOCHS_27_SKYLAKE_X, tests::profile_raw, RawCaps};

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
    let ok = preflight(&c, false, &req(KDBT)).unwrap();
    assert!(!ok.needs_lock);
    assert!(ok.available.contains(KDBT | Features::EPT_EXECUTE_ONLY | Features::VMFUNC_EPTP | Features::VE));
    assert!(!ok.available.contains(Features::MTF));
}

#[test]
fn bochs_without_mtf_refuses_mtf() {
    let c = VmxCaps::decode(&bochs());
    let err = preflight(&c, false, &req(KDBT | Features::MTF)).unwrap_err();
    assert_eq!(err.iter().copied().collect::<std::vec::Vec<_>>(), [Refusal::Missing(Features::MTF)]);
    assert_eq!(err.to_string(), "required VMX features missing: MTF");
}

#[test]
fn no_vmx() {
    let mut r = bochs();
    r.cpuid1_ecx &= !crate::caps::CPUID1_ECX_VMX;
    r.vendor = [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")];
    let c = VmxCaps::decode(&r);
    let err = preflight(&c, false, &req(KDBT)).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err.to_string(), "no VT-x: CPUID.1:ECX.VMX is clear (vendor AuthenticAMD)");
}

#[test]
fn vmxe_already_set() {
    let c = VmxCaps::decode(&bochs());
    let err = preflight(&c, true, &req(KDBT)).unwrap_err();
    assert!(err.contains(&Refusal::VmxAlreadyInUse));
    assert!(err.to_string().contains("another hypervisor or KVM holds VMX"));
    // From the snapshot too.
    let mut r = bochs();
    r.cr4 |= CR4_VMXE;
    assert!(preflight_snapshot(&VmxCaps::decode(&r), &req(KDBT)).unwrap_err().contains(&Refusal::VmxAlreadyInUse));
}

#[test]
fn feature_control_states() {
    let with_fc = |v: Option<u64>| {
        let mut r = bochs();
        match v {
            Some(v) => r.msrs[idx::FEATURE_CONTROL] = v,
            None => r.msr_valid &= !(1 << idx::FEATURE_CONTROL),
        }
        preflight(&VmxCaps::decode(&r), false, &req(KDBT))
    };
    // Bochs at reset / firmware that leaves it alone: unlocked -> caller locks it.
    assert_eq!(with_fc(Some(0)).map(|c| c.needs_lock), Ok(true));
    assert_eq!(with_fc(Some(4)).map(|c| c.needs_lock), Ok(true));
    assert_eq!(with_fc(Some(5)).map(|c| c.needs_lock), Ok(false));
    // Locked with VMX outside SMX off (e.g. Linux without CONFIG_KVM_INTEL locked it).
    let e = with_fc(Some(1)).unwrap_err();
    assert_eq!(e.iter().copied().collect::<std::vec::Vec<_>>(), [Refusal::FeatureControlLockedOff]);
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
    let masked = |mask: Features| preflight(&c, false, &Request { required: KDBT, mask });
    let e = masked(Features::EPT | Features::INVPCID).unwrap_err();
    assert_eq!(e.iter().copied().collect::<std::vec::Vec<_>>(), [Refusal::Missing(Features::EPT | Features::INVPCID)]);
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
    let e = preflight(&c, true, &req(KDBT)).unwrap_err();
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
    assert!(preflight(&VmxCaps::decode(&r), false, &req(Features::VMX))
        .unwrap_err()
        .contains(&Refusal::CapabilityMsrsUnreadable));
    let mut r = bochs();
    r.msr_valid &= !((1 << idx::ENTRY) | (1 << idx::TRUE_ENTRY));
    let e = preflight(&VmxCaps::decode(&r), false, &req(KDBT)).unwrap_err();
    assert!(e.contains(&Refusal::CapabilityMsrsUnreadable));
    assert!(e.contains(&Refusal::Missing(Features::GUEST_64BIT | Features::EFER_SWITCH)));
    let mut r = bochs();
    r.msrs[idx::BASIC] &= !(0xf << 50);
    assert!(preflight(&VmxCaps::decode(&r), false, &req(Features::VMX))
        .unwrap_err()
        .contains(&Refusal::VmcsMemTypeNotWb));
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
            next() & 1 != 0,
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
    let e = preflight(&caps, false, &req).unwrap_err();
    assert!(e.contains(&Refusal::Missing(Features::XSAVES)), "{e}");
    assert!(format!("{e}").to_lowercase().contains("xsaves"), "{e}");
}
