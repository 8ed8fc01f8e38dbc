use super::*;

extern crate std;
use std::format;
use std::string::String;

/// A fake CPU: CPUID leaves, an MSR table (missing = #GP) and CR4.
pub(crate) struct FakeHw {
    pub vendor: &'static [u8; 12],
    pub cpuid1_ecx: u32,
    pub cr4: u64,
    pub msrs: &'static [(u32, u64)],
}

impl VmxHw for FakeHw {
    fn rdmsr_safe(&self, msr: u32) -> Option<u64> {
        self.msrs.iter().find(|(m, _)| *m == msr).map(|(_, v)| *v)
    }
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        let w =
            |i: usize| u32::from_le_bytes([self.vendor[i], self.vendor[i + 1], self.vendor[i + 2], self.vendor[i + 3]]);
        match leaf {
            0 => [0x16, w(0), w(8), w(4)],
            1 => [0x50654, 0, self.cpuid1_ecx, 0],
            _ => [0; 4],
        }
    }
    fn read_cr4(&self) -> u64 {
        self.cr4
    }
}

/// A typical modern Intel CPU with true controls, EPT and VPID (hand-built, see the
/// individual bits in the asserts below).
pub(crate) const MODERN: &[(u32, u64)] = &[
    (0x3a, 0x5),
    (0x480, 0x00da_0400_0000_0004),
    (0x481, 0x0000_007f_0000_0016),
    (0x482, 0xfff9_fffe_0401_e172),
    (0x483, 0x01ff_ffff_0003_6dff),
    (0x484, 0x0003_ffff_0000_11ff),
    (0x485, 0x0000_0000_7004_c1e7),
    (0x486, 0x8000_0021),
    (0x487, 0xffff_ffff),
    (0x488, 0x2000),
    (0x489, 0x003f_27ff),
    (0x48a, 0x2e),
    (0x48b, 0x0053_7fff_0000_0000),
    (0x48c, 0x0000_0f01_0673_4141),
    (0x48d, 0x0000_007f_0000_0016),
    (0x48e, 0xfff9_fffe_0400_6172),
    (0x48f, 0x01ff_ffff_0003_6dfb),
    (0x490, 0x0003_ffff_0000_11fb),
    (0x491, 0x1),
];

pub(crate) fn modern() -> RawCaps {
    RawCaps::read(&FakeHw { vendor: b"GenuineIntel", cpuid1_ecx: 0x7ffa_fbff, cr4: 0x3706f0, msrs: MODERN }, 3)
}

#[test]
fn layout_and_bytes_round_trip() {
    assert_eq!(core::mem::size_of::<RawCaps>(), RawCaps::SIZE);
    let r = modern();
    let b = r.as_bytes();
    assert_eq!(b.len(), RawCaps::SIZE);
    assert_eq!(&b[0..4], &RawCaps::VERSION.to_le_bytes());
    assert_eq!(&b[16..28], b"GenuineIntel");
    assert_eq!(RawCaps::from_bytes(b), Some(r));
    // Wrong length, version or size field: refused.
    assert_eq!(RawCaps::from_bytes(&b[..RawCaps::SIZE - 1]), None);
    let mut v = b.to_vec();
    v.push(0);
    assert_eq!(RawCaps::from_bytes(&v), None);
    let mut v = b.to_vec();
    v[0] ^= 0xff;
    assert_eq!(RawCaps::from_bytes(&v), None);
    let mut v = b.to_vec();
    v[4] ^= 1;
    assert_eq!(RawCaps::from_bytes(&v), None);
}

#[test]
fn msr_table_is_indexed_and_complete() {
    for (k, &(i, msr, _)) in MSR_TABLE.iter().enumerate() {
        assert_eq!(i, k);
        assert!(msr == 0x3a || (0x480..=0x492).contains(&msr));
    }
    let mut nums: std::vec::Vec<u32> = MSR_TABLE.iter().map(|e| e.1).collect();
    nums.sort();
    nums.dedup();
    assert_eq!(nums.len(), MSR_COUNT);
    assert_eq!(nums.last(), Some(&0x492));
}

#[test]
fn read_records_fault_as_invalid() {
    let r = modern();
    assert_eq!(r.cpu, 3);
    assert_eq!(r.get(idx::BASIC), Some(0x00da_0400_0000_0004));
    // 0x492 is not in the fake table: the read "faulted".
    assert_eq!(r.get(idx::PROCBASED3), None);
    assert_eq!(r.msr_valid, (1 << MSR_COUNT) - 1 - (1 << idx::PROCBASED3));
    let names: std::vec::Vec<_> = r.msrs().collect();
    assert_eq!(names[0], ("IA32_FEATURE_CONTROL", 0x3a, Some(5)));
    assert_eq!(names[19], ("IA32_VMX_PROCBASED_CTLS3", 0x492, None));
}

#[test]
fn decode_modern() {
    let c = VmxCaps::decode(&modern());
    assert!(c.vmx);
    let b = c.basic.unwrap();
    assert_eq!(b.revision_id, 4);
    assert_eq!(b.vmcs_size, 0x400);
    assert_eq!(b.mem_type, BasicMemType::Wb);
    assert!(b.true_ctls && b.ins_outs_info && !b.no_err_code_required && !b.phys_addr_32bit);
    // TRUE_PROCBASED used: CR3 load/store exiting (bits 15, 16) may be 0 there.
    assert!(c.proc.from_true_msr);
    assert_eq!(c.proc.allowed0, 0x0400_6172);
    assert_eq!(c.proc.state(1 << 15), CtlState::Either);
    assert_eq!(c.proc.state(1 << 1), CtlState::MustBe1);
    assert_eq!(c.proc.state(1 << 0), CtlState::MustBe0);
    assert!(c.ept() && c.ept_execute_only() && c.vpid() && c.unrestricted_guest() && c.mtf());
    assert!(c.vmfunc_eptp() && !c.ve() && c.preemption_timer());
    assert_eq!(c.misc.unwrap().preemption_timer_rate, 7);
    assert!(c.ept_vpid.pages_1g && c.ept_vpid.pages_2m && c.ept_vpid.invvpid_single_context_retaining_globals);
    assert!(!c.ept_vpid.pwl5 && !c.ept_vpid.supervisor_shadow_stack);
    assert!(c.fc_locked() && c.fc_outside_smx());
    assert!(c.cr4_fixed.must_be_1() & CR4_VMXE != 0);
    assert!(c.cr0_fixed.accepts(0x8005_0033) && !c.cr0_fixed.accepts(0x8005_0032));
    assert!(!c.proc3.present);
    assert_eq!(
        &*c.summary(),
        "cpu=3 vmx=1 ept=1 ept_xo=1 vpid=1 ug=1 mtf=1 vmfunc_eptp=1 ve=0 fc_locked=1 fc_outside_smx=1"
    );
    let report = format!("{c}");
    assert!(report.contains("revision 0x4"), "{report}");
    assert!(report.contains("CR3_LOAD_EXITING"), "{report}");
    assert!(report.contains("must be 1: PE NE PG"), "{report}");
    assert!(!report.contains("no VT-x"));
}

#[test]
fn non_true_controls_use_plain_msrs() {
    let mut r = modern();
    r.msrs[idx::BASIC] &= !(1 << 55);
    let c = VmxCaps::decode(&r);
    assert!(!c.proc.from_true_msr);
    assert_eq!(c.proc.allowed0, 0x0401_e172);
    assert_eq!(c.proc.state(1 << 15), CtlState::MustBe1);
    assert_eq!(c.entry.allowed0, 0x11ff);
    // true_ctls set but TRUE MSR unreadable: falls back to the plain one.
    let mut r = modern();
    r.msr_valid &= !(1 << idx::TRUE_PROCBASED);
    let c = VmxCaps::decode(&r);
    assert!(!c.proc.from_true_msr && c.pin.from_true_msr);
}

#[test]
fn no_vmx_amd() {
    let r = RawCaps::read(
        &FakeHw {
            vendor: b"AuthenticAMD",
            cpuid1_ecx: 0x7ed8_320b,
            cr4: 0x3506f0,
            msrs: &[(0x3a, 0), (0x480, 0xffff_ffff_ffff_ffff)],
        },
        0,
    );
    // Only IA32_FEATURE_CONTROL is attempted without CPUID.VMX.
    assert_eq!(r.msr_valid, 1 << idx::FEATURE_CONTROL);
    let c = VmxCaps::decode(&r);
    assert!(!c.vmx && !c.ept() && c.basic.is_none());
    assert_eq!(
        &*c.summary(),
        "cpu=0 vmx=0 ept=0 ept_xo=0 vpid=0 ug=0 mtf=0 vmfunc_eptp=0 ve=0 fc_locked=0 fc_outside_smx=0"
    );
    let s = format!("{c}");
    assert!(s.contains("no VT-x: CPUID.1:ECX.VMX is clear (vendor AuthenticAMD)"), "{s}");
    // Even with VMX MSR values injected, a CPU without CPUID.VMX decodes as no VMX.
    let mut r2 = r;
    r2.set(idx::PROCBASED2, u64::MAX);
    r2.set(idx::BASIC, u64::MAX);
    let c2 = VmxCaps::decode(&r2);
    assert!(c2.basic.is_none() && !c2.ept());
}

#[test]
fn locked_without_outside_smx() {
    let mut r = modern();
    r.msrs[idx::FEATURE_CONTROL] = 0x1;
    let c = VmxCaps::decode(&r);
    assert!(c.fc_locked() && !c.fc_outside_smx());
    assert!(c.summary().ends_with("fc_locked=1 fc_outside_smx=0"));
    assert!(format!("{c}").contains("VMXON forbidden"));
}

#[test]
fn secondary_needs_activation_bit() {
    let mut r = modern();
    // Clear "activate secondary controls" in both primary MSRs' allowed-1.
    r.msrs[idx::PROCBASED] &= !(1u64 << 63);
    r.msrs[idx::TRUE_PROCBASED] &= !(1u64 << 63);
    let c = VmxCaps::decode(&r);
    assert!(!c.proc2.present && !c.ept() && !c.vpid() && !c.ept_vpid.invept);
    assert!(c.mtf());
}

fn check_total(r: &RawCaps) {
    let c = VmxCaps::decode(r);
    let s = String::from(&*c.summary());
    let keys: std::vec::Vec<&str> = s.split(' ').map(|kv| kv.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        ["cpu", "vmx", "ept", "ept_xo", "vpid", "ug", "mtf", "vmfunc_eptp", "ve", "fc_locked", "fc_outside_smx"]
    );
    let _ = format!("{c}");
    let _ = RawCaps::from_bytes(r.as_bytes());
}

#[test]
fn garbage_inputs_do_not_panic() {
    let ones = RawCaps {
        cpu: u32::MAX,
        cpuid1_ecx: u32::MAX,
        vendor: [u32::MAX; 3],
        cr4: u64::MAX,
        msr_valid: u32::MAX,
        msrs: [u64::MAX; MSR_COUNT],
        ..RawCaps::default()
    };
    check_total(&ones);
    let c = VmxCaps::decode(&ones);
    assert_eq!(c.proc.state(1), CtlState::MustBe1);
    assert!(c.vmx && c.ept() && c.ve());
    check_total(&RawCaps::default());
    let zero: RawCaps = RawCaps::from_bytes(&{
        let mut b = [0u8; RawCaps::SIZE];
        b[0..4].copy_from_slice(&RawCaps::VERSION.to_le_bytes());
        b[4..8].copy_from_slice(&(RawCaps::SIZE as u32).to_le_bytes());
        b
    })
    .unwrap();
    check_total(&zero);
    // Pseudo-random patterns (xorshift), deterministic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let mut r = RawCaps {
            cpu: next() as u32,
            cpuid1_ecx: next() as u32,
            vendor: [next() as u32, next() as u32, next() as u32],
            cr4: next(),
            msr_valid: next() as u32,
            ..RawCaps::default()
        };
        for m in r.msrs.iter_mut() {
            *m = next();
        }
        check_total(&r);
        // A set allowed-0 bit with a clear allowed-1 bit reads as contradictory, never panics.
        let c = VmxCaps::decode(&r);
        for kind in CtlKind::ALL {
            for &(mask, _) in kind.known_bits() {
                let st = c.ctl(kind).state(mask);
                let a0 = c.ctl(kind).allowed0 & mask != 0;
                let a1 = c.ctl(kind).allowed1 & mask != 0;
                assert_eq!(st == CtlState::Contradictory, a0 && !a1);
            }
        }
    }
}

pub(crate) fn profile_raw(p: &super::profiles::Profile) -> RawCaps {
    RawCaps::read(&FakeHw { vendor: p.vendor, cpuid1_ecx: p.cpuid1_ecx, cr4: p.cr4, msrs: p.msrs }, 0)
}

#[test]
fn known_profiles_decode_as_documented() {
    for p in super::profiles::PROFILES {
        let c = VmxCaps::decode(&profile_raw(p));
        assert_eq!(&*c.summary(), p.summary, "{} ({})", p.name, p.source);
        assert_eq!(c.ept_vpid.pages_1g, p.pages_1g, "{}", p.name);
        assert_eq!(c.ept_vpid.ad_bits, p.ept_ad, "{}", p.name);
        assert_eq!(c.preemption_timer(), p.preemption_timer, "{}", p.name);
        let b = c.basic.expect(p.name);
        assert_eq!(b.true_ctls, p.true_ctls, "{}", p.name);
        assert_eq!(b.revision_id, p.revision_id, "{}", p.name);
        // Internal consistency every real CPU satisfies: must-be-1 bits may be 1.
        for kind in CtlKind::ALL {
            let k = c.ctl(kind);
            assert_eq!(k.allowed0 & !k.allowed1, 0, "{}: {}", p.name, kind.name());
        }
        assert!(c.cr4_fixed.must_be_1() & CR4_VMXE != 0, "{}", p.name);
        let _ = format!("{c}");
    }
}

#[test]
fn bochs_27_skylake_x_details() {
    let c = VmxCaps::decode(&profile_raw(&super::profiles::BOCHS_27_SKYLAKE_X));
    let b = c.basic.unwrap();
    assert_eq!(
        (b.vmcs_size, b.mem_type, b.ins_outs_info, b.no_err_code_required),
        (4096, BasicMemType::Wb, true, false)
    );
    // TRUE controls: CR3 exiting and debug-control save/load may be cleared.
    assert_eq!(c.proc.state(PrimaryControls::CR3_LOAD_EXITING.bits() as u64), CtlState::Either);
    assert_eq!(c.exit.state(ExitControls::SAVE_DEBUG_CONTROLS.bits() as u64), CtlState::Either);
    assert_eq!(c.entry.state(EntryControls::LOAD_DEBUG_CONTROLS.bits() as u64), CtlState::Either);
    assert_eq!(c.proc.state(PrimaryControls::MONITOR_TRAP_FLAG.bits() as u64), CtlState::MustBe0);
    assert_eq!(c.pin.state(PinbasedControls::POSTED_INTERRUPTS.bits() as u64), CtlState::MustBe0);
    assert_eq!(c.proc2.state(SecondaryControls::MODE_BASED_EPT.bits() as u64), CtlState::MustBe0);
    for f in [
        SecondaryControls::ENABLE_RDTSCP,
        SecondaryControls::ENABLE_INVPCID,
        SecondaryControls::ENABLE_XSAVES_XRSTORS,
        SecondaryControls::ENABLE_PML,
        SecondaryControls::VMCS_SHADOWING,
        SecondaryControls::USE_TSC_SCALING,
    ] {
        assert_eq!(c.proc2.state(f.bits() as u64), CtlState::Either, "{f:?}");
    }
    let e = c.ept_vpid;
    assert!(e.execute_only && e.pwl4 && !e.pwl5 && e.memtype_uc && e.memtype_wb && e.pages_2m);
    assert!(e.invept && e.invept_single_context && e.invept_all_context && !e.advanced_exit_info);
    assert!(
        e.invvpid && e.invvpid_individual_addr && e.invvpid_all_context && e.invvpid_single_context_retaining_globals
    );
    let m = c.misc.unwrap();
    assert_eq!((m.preemption_timer_rate, m.cr3_targets, m.max_msr_list), (0, 4, 512));
    assert!(m.store_lma && m.activity_hlt && m.vmwrite_any_field && m.inject_zero_len);
    assert_eq!(c.vmcs_max_index, Some(0x1a));
    // Linux's usual CR4 there is accepted by the fixed bits once VMXE is set.
    assert!(c.cr4_fixed.accepts(0x0036_06f0 | CR4_VMXE));
    assert!(!c.cr4_fixed.accepts(0x0036_06f0));
    // The EPT/VPID value quoted from Bochs' master branch (bit 22 = advanced EPT exit info,
    // set there with MBE) differs from 2.7's only in bit 22.
    assert_eq!(0x0000_0f01_0673_4141u64 ^ e.raw, 1 << 22);
    // With ignore_bad_msrs=0, IA32_VMX_PROCBASED_CTLS3 faults instead of reading 0: the
    // decoding is the same.
    let mut r = profile_raw(&super::profiles::BOCHS_27_SKYLAKE_X);
    assert_eq!(r.get(idx::PROCBASED3), Some(0));
    r.msr_valid &= !(1 << idx::PROCBASED3);
    assert_eq!(VmxCaps::decode(&r), c);
}

#[test]
fn real_cpus_details() {
    use super::profiles::real_cpus::{CORE_I7_3960X, CORE_I7_5600U, CORE_I7_6700K};
    for p in [&CORE_I7_6700K, &CORE_I7_5600U, &CORE_I7_3960X] {
        let r = profile_raw(p);
        let c = VmxCaps::decode(&r);
        let b = c.basic.unwrap();
        assert_eq!(
            (b.vmcs_size, b.mem_type, b.ins_outs_info, b.no_err_code_required, b.phys_addr_32bit),
            (0x400, BasicMemType::Wb, true, false, false),
            "{}",
            p.name
        );
        // None of them has tertiary controls: IA32_VMX_PROCBASED_CTLS3 faults.
        assert_eq!(r.get(idx::PROCBASED3), None, "{}", p.name);
        assert!(!c.proc3.present, "{}", p.name);
        // TRUE controls: CR3 exiting may be off; posted interrupts are not offered.
        assert_eq!(c.proc.state(PrimaryControls::CR3_LOAD_EXITING.bits() as u64), CtlState::Either, "{}", p.name);
        assert_eq!(c.pin.state(PinbasedControls::POSTED_INTERRUPTS.bits() as u64), CtlState::MustBe0, "{}", p.name);
        let e = c.ept_vpid;
        assert!(e.execute_only && e.pwl4 && !e.pwl5 && e.memtype_wb && e.pages_2m, "{}", p.name);
        assert!(e.invept_single_context && e.invept_all_context, "{}", p.name);
        assert!(e.invvpid_individual_addr && e.invvpid_all_context && e.invvpid_single_context_retaining_globals);
        // The CR4 Linux sets there is allowed in VMX operation once VMXE is set.
        assert!(c.cr4_fixed.accepts(p.cr4 | CR4_VMXE) && !c.cr4_fixed.accepts(p.cr4), "{}", p.name);
        assert_eq!(c.cr4_fixed.fixed1 & (1 << 22), 0, "{}: no PKE", p.name);
    }
    let misc = |p| VmxCaps::decode(&profile_raw(p)).misc.unwrap();
    let (skl, bdw, snb) = (misc(&CORE_I7_6700K), misc(&CORE_I7_5600U), misc(&CORE_I7_3960X));
    assert_eq!((skl.preemption_timer_rate, bdw.preemption_timer_rate, snb.preemption_timer_rate), (7, 5, 5));
    assert!(skl.vmwrite_any_field && bdw.vmwrite_any_field && !snb.vmwrite_any_field);
    assert!(skl.inject_zero_len && !bdw.inject_zero_len && !snb.inject_zero_len);
    // Skylake: PML and XSAVES; no APIC-register virtualization on this client part.
    let c = VmxCaps::decode(&profile_raw(&CORE_I7_6700K));
    assert_eq!(c.vmcs_max_index, Some(0x17));
    for (f, st) in [
        (SecondaryControls::ENABLE_PML, CtlState::Either),
        (SecondaryControls::ENABLE_XSAVES_XRSTORS, CtlState::Either),
        (SecondaryControls::VIRTUALIZE_APIC_REGISTER, CtlState::MustBe0),
        (SecondaryControls::USE_TSC_SCALING, CtlState::MustBe0),
    ] {
        assert_eq!(c.proc2.state(f.bits() as u64), st, "{f:?}");
    }
    // Broadwell: neither PML nor XSAVES, but #VE and EPTP switching.
    let c = VmxCaps::decode(&profile_raw(&CORE_I7_5600U));
    assert_eq!(c.vmcs_max_index, Some(0x15));
    assert_eq!(c.proc2.state(SecondaryControls::ENABLE_PML.bits() as u64), CtlState::MustBe0);
    assert_eq!(c.proc2.state(SecondaryControls::ENABLE_XSAVES_XRSTORS.bits() as u64), CtlState::MustBe0);
    assert!(c.ve() && c.vmfunc_eptp());
    // Sandy Bridge-E: no VM functions at all (IA32_VMX_VMFUNC faults), no INVPCID, no EPT
    // A/D bits, no FSGSBASE/SMEP/SMAP in CR4_FIXED1.
    let r = profile_raw(&CORE_I7_3960X);
    let c = VmxCaps::decode(&r);
    assert_eq!((r.get(idx::VMFUNC), c.vmfunc), (None, 0));
    assert_eq!(c.proc2.state(SecondaryControls::ENABLE_VM_FUNCTIONS.bits() as u64), CtlState::MustBe0);
    assert_eq!(c.proc2.state(SecondaryControls::ENABLE_INVPCID.bits() as u64), CtlState::MustBe0);
    assert_eq!(c.proc2.state(SecondaryControls::ENABLE_RDTSCP.bits() as u64), CtlState::Either);
    assert_eq!(c.cr4_fixed.fixed1 & ((1 << 16) | (1 << 20) | (1 << 21)), 0);
    assert_eq!(c.vmcs_max_index, Some(0x15));
}
