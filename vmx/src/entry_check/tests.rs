//! The VMCS kdbt programs passes every check on every capability profile kdbt knows, in
//! both paging modes; and each check fails when one field is corrupted.
use super::*;

extern crate std;
use std::string::ToString;
use std::vec::Vec;

use x86::vmx::vmcs::control::{PinbasedControls as Pin, PrimaryControls as P, SecondaryControls as S};

use crate::caps::{profiles::PROFILES, tests, RawCaps, VmxCaps};
use crate::policy::{choose_controls, required, Controls};
use crate::preflight::{native_needs, preflight, Features, Request};
use crate::segment::{access_rights, AR_UNUSABLE};
use crate::vmcs::{program, Dtr, HostIn, LaunchState, Segment, CR4_VMXE};

/// Physical-address width assumed for every profile: 36 bits, the smallest an Intel 64
/// CPU has, so that an address the tests accept fits any of them (Bochs 2.7 and current
/// CPUs have 39 to 52).
const PHYS_BITS: u8 = 36;

/// The capability profiles: Bochs 2.7's model, derived from its source, and real CPUs'
/// values with their citations ([`PROFILES`]), and the hand-built "modern CPU" of the
/// capability tests. Each with the features a Linux kernel's native instructions need
/// there ([`native_needs`] of that CPU's CPUID).
fn profiles() -> Vec<(&'static str, RawCaps, Features)> {
    let mut v: Vec<_> =
        PROFILES.iter().map(|p| (p.name, tests::profile_raw(p), native_needs(|l, s| p.cpuid_leaf(l, s)))).collect();
    v.push(("hand-built modern Intel CPU (caps tests)", tests::modern(), native_needs(linux_cpuid)));
    v
}

/// CPUID of a Linux guest on the hand-built CPU: RDTSCP (80000001H:EDX[27]), INVPCID
/// (7:EBX[10]), XSAVES (0DH.1:EAX[3]) are in use, so kdbt must pass them through.
fn linux_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    match (leaf, sub) {
        (0, _) => [0xd, 0, 0, 0],
        (7, 0) => [0, 1 << 10, 0, 0],
        (0xd, 1) => [1 << 3, 0, 0, 0],
        (0x8000_0000, _) => [0x8000_0008, 0, 0, 0],
        (0x8000_0001, _) => [0, 0, 0, 1 << 27],
        _ => [0; 4],
    }
}

/// What the kernel's load path chooses on this CPU (`preflight_cpu`, then EPT enabled with
/// the map's pointer or shadow paging) and the host CR3 it builds.
fn controls(raw: &RawCaps, native: Features, shadow: bool) -> (VmxCaps, Controls) {
    let caps = VmxCaps::decode(raw);
    let req = Request { required: required(shadow) | native, mask: Features::empty() };
    let cleared = preflight(&caps, raw.cr4, &req).expect("preflight");
    let mut c = choose_controls(&caps, cleared.available, shadow).expect("controls");
    if !shadow {
        // `load`: the identity map's PML4 (a kernel page) and `Ept::eptp(false)`.
        c.enable_ept(ept::table::eptp_for(0x7c5_3000, &c.ept, false));
    }
    c.host_cr3 = 0x7b0_0000;
    (caps, c)
}

/// What `launch_state` collects on CPU `cpu` of a Linux 6.x kernel in 64-bit mode at the
/// launch point (IPI context: interrupts off), with kdbt's host tables (percpu.rs: GDT_CS
/// 0x10, GDT_SS 0x18, GDT_TR 0x40 in the per-CPU block) and the controls.
fn launch_state(raw: &RawCaps, c: &Controls, cpu: u32) -> LaunchState {
    // LAR of __KERNEL_CS (0x00af9b00), __KERNEL_DS (0x00cf9300), the busy TSS (0x00008b00).
    let code =
        Segment { selector: 0x10, limit: 0xffff_ffff, access_rights: access_rights(0x10, Some(0x00af_9b00)), base: 0 };
    let data =
        Segment { selector: 0x18, limit: 0xffff_ffff, access_rights: access_rights(0x18, Some(0x00cf_9300)), base: 0 };
    let null = Segment { selector: 0, limit: 0, access_rights: access_rights(0, None), base: 0 };
    let tss = Segment {
        selector: 0x40,
        limit: 0x4087,
        access_rights: access_rights(0x40, Some(0x0000_8b00)),
        base: 0xffff_fe00_0000_3000 + cpu as u64 * 0x1_0000,
    };
    let gs = Segment { base: 0xffff_8880_7fc0_0000 + cpu as u64 * 0x4_0000, ..null };
    let block = 0xffff_8880_07a0_0000u64 + cpu as u64 * 0x1_0000;
    let native_cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE (AM too)
    LaunchState {
        controls: c.launch_controls(cpu, 0x7a0_3000 + cpu as u64 * 0x1_0000),
        host: HostIn {
            cr3: c.host_cr3,
            cs: 0x10,
            ss: 0x18,
            tr: 0x40,
            tr_base: block + 0x2800,
            gdtr_base: block + 0x2000,
            idtr_base: block + 0x4000,
            rsp: block + 0xfff0 - 5 * 8,
            rip: 0xffff_ffff_c0a0_1000,
        },
        cr0: c.vmx_cr0(native_cr0),
        cr4: raw.cr4 | CR4_VMXE,
        segments: [null, code, data, null, null, gs, null, tss],
        gdtr: Dtr { base: 0xffff_fe00_0000_1000 + cpu as u64 * 0x1_0000, limit: 0x7f },
        idtr: Dtr { base: 0xffff_fe00_0000_0000, limit: 0xfff },
        // Shadow paging: the guest runs on the MMU's shadow root, a frame of its pool.
        cr3: if c.shadow { 0x6f2_1000 } else { 0x1_2345_6000 },
        dr7: 0x400,
        rflags: 0x46,
        debugctl: 0,
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_5000,
        sysenter_eip: 0xffff_ffff_8100_2000,
        efer: 0xd01,
        pat: 0x0407_0406_0007_0406,
    }
}

/// The VMCS at VMLAUNCH: `program`'s writes, then guest RSP and RIP (`vmlaunch_here`).
fn vmcs(s: &LaunchState) -> Fields {
    let mut f = Fields::default();
    program(&mut f, s).expect("program");
    f.set(guest::RSP, 0xffff_c900_0001_3e58);
    f.set(guest::RIP, 0xffff_ffff_c0a0_2345);
    f
}

fn check_on(caps: &VmxCaps, f: &Fields) -> Violations {
    check(f, &Machine { caps, phys_bits: PHYS_BITS })
}

#[test]
fn kdbts_vmcs_enters_on_every_profile_in_both_modes() {
    for (name, raw, native) in profiles() {
        for shadow in [false, true] {
            let (caps, c) = controls(&raw, native, shadow);
            for cpu in [0, 1, 7] {
                let s = launch_state(&raw, &c, cpu);
                let f = vmcs(&s);
                let v = check_on(&caps, &f);
                assert!(v.is_empty(), "{name}, shadow={shadow}, cpu{cpu}: {v}");
            }
        }
    }
}

#[test]
fn without_nmi_virtualization_and_vpid_too() {
    // A CPU offering neither virtual NMIs nor VPID: kdbt's other choice of controls.
    for (name, raw, native) in profiles() {
        let mut raw = raw;
        let pin = raw.get(crate::caps::idx::TRUE_PINBASED).unwrap();
        raw.set(crate::caps::idx::TRUE_PINBASED, pin & !((Pin::VIRTUAL_NMIS.bits() as u64) << 32));
        let p2 = raw.get(crate::caps::idx::PROCBASED2).unwrap();
        raw.set(crate::caps::idx::PROCBASED2, p2 & !((S::ENABLE_VPID.bits() as u64) << 32));
        let (caps, c) = controls(&raw, native, false);
        assert!(!c.vnmi && c.vpid == 0, "{name}");
        let v = check_on(&caps, &vmcs(&launch_state(&raw, &c, 0)));
        assert!(v.is_empty(), "{name}: {v}");
    }
}

#[test]
fn program_alone_leaves_guest_rip_unwritten() {
    // Without the launcher's own VMWRITEs of guest RSP/RIP the VMCS would not enter.
    let (_, raw, native) = &profiles()[0];
    let (caps, c) = controls(raw, *native, false);
    let mut f = vmcs(&launch_state(raw, &c, 0));
    f.remove(guest::RIP);
    let v = check_on(&caps, &f);
    assert_eq!(v.iter().collect::<Vec<_>>(), [Check::FieldUnwritten]);
    assert_eq!(v.unwritten, Some(guest::RIP));
    assert!(v.to_string().contains("FieldUnwritten (entry checker)"), "{v}");
}

/// One corruption of kdbt's Bochs EPT-mode VMCS and the checks it must (exactly) violate.
struct Case {
    what: &'static str,
    change: fn(&mut Fields),
    expect: &'static [Check],
}

fn or(f: &mut Fields, field: u32, bits: u64) {
    let v = f.get(field).unwrap_or(0);
    f.set(field, v | bits);
}
fn and_not(f: &mut Fields, field: u32, bits: u64) {
    let v = f.get(field).unwrap_or(0);
    f.set(field, v & !bits);
}

const fn b(v: u32) -> u64 {
    v as u64
}

use Check as K;

const CASES: &[Case] = &[
    // 27.2.1.1
    Case {
        what: "pin: a default1 bit cleared",
        change: |f| and_not(f, control::PINBASED_EXEC_CONTROLS, 1 << 1),
        expect: &[K::PinReserved],
    },
    Case {
        what: "proc: monitor trap flag, which Bochs 2.7 does not allow",
        change: |f| or(f, control::PRIMARY_PROCBASED_EXEC_CONTROLS, b(P::MONITOR_TRAP_FLAG.bits())),
        expect: &[K::ProcReserved],
    },
    Case {
        what: "proc2: bit 27 (reserved)",
        change: |f| or(f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, 1 << 27),
        expect: &[K::Proc2Reserved],
    },
    Case {
        what: "CR3-target count 5",
        change: |f| _ = f.set(control::CR3_TARGET_COUNT, 5),
        expect: &[K::Cr3TargetCount],
    },
    Case {
        what: "I/O bitmaps on, B unaligned",
        change: |f| {
            or(f, control::PRIMARY_PROCBASED_EXEC_CONTROLS, b(P::USE_IO_BITMAPS.bits()));
            f.set(control::IO_BITMAP_A_ADDR_FULL, 0x10_0000);
            f.set(control::IO_BITMAP_B_ADDR_FULL, 0x10_1800);
        },
        expect: &[K::IoBitmapAddress],
    },
    Case {
        what: "MSR bitmap beyond 36 bits",
        change: |f| _ = f.set(control::MSR_BITMAPS_ADDR_FULL, 1 << 40),
        expect: &[K::MsrBitmapAddress],
    },
    Case {
        what: "MSR bitmap unaligned",
        change: |f| _ = f.set(control::MSR_BITMAPS_ADDR_FULL, 0x7a0_3010),
        expect: &[K::MsrBitmapAddress],
    },
    Case {
        what: "x2APIC virtualization without TPR shadow",
        change: |f| or(f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, b(S::VIRTUALIZE_X2APIC.bits())),
        expect: &[K::TprShadowDependents],
    },
    Case {
        what: "virtual NMIs without NMI exiting",
        change: |f| and_not(f, control::PINBASED_EXEC_CONTROLS, b(Pin::NMI_EXITING.bits())),
        expect: &[K::VirtualNmisNeedNmiExiting],
    },
    Case {
        what: "NMI-window exiting without virtual NMIs",
        change: |f| {
            and_not(f, control::PINBASED_EXEC_CONTROLS, b(Pin::VIRTUAL_NMIS.bits()));
            or(f, control::PRIMARY_PROCBASED_EXEC_CONTROLS, b(P::NMI_WINDOW_EXITING.bits()));
        },
        expect: &[K::NmiWindowNeedsVirtualNmis],
    },
    Case {
        what: "virtual-interrupt delivery without external-interrupt exiting (nor TPR shadow)",
        change: |f| or(f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, b(S::VIRTUAL_INTERRUPT_DELIVERY.bits())),
        expect: &[K::TprShadowDependents, K::VirtualInterruptDeliveryNeedsExtIntExiting],
    },
    Case { what: "VPID 0", change: |f| _ = f.set(control::VPID, 0), expect: &[K::VpidNotZero] },
    Case {
        what: "EPTP memory type 1 (WC)",
        change: |f| {
            let e = f.get(control::EPTP_FULL).unwrap();
            f.set(control::EPTP_FULL, (e & !7) | 1);
        },
        expect: &[K::EptpMemoryType],
    },
    Case {
        what: "EPTP 5-level walk, which Bochs 2.7 lacks",
        change: |f| {
            let e = f.get(control::EPTP_FULL).unwrap();
            f.set(control::EPTP_FULL, (e & !0x38) | (4 << 3));
        },
        expect: &[K::EptpWalkLength],
    },
    Case {
        what: "EPTP reserved bit 8 and a PML4 beyond 36 bits",
        change: |f| or(f, control::EPTP_FULL, (1 << 8) | (1 << 44)),
        expect: &[K::EptpReserved],
    },
    Case {
        what: "unrestricted guest with EPT off",
        change: |f| {
            let p2 = f.get(control::SECONDARY_PROCBASED_EXEC_CONTROLS).unwrap();
            f.set(
                control::SECONDARY_PROCBASED_EXEC_CONTROLS,
                (p2 & !b(S::ENABLE_EPT.bits())) | b(S::UNRESTRICTED_GUEST.bits()),
            );
        },
        expect: &[K::UnrestrictedGuestNeedsEpt, K::ControlNotModeled],
    },
    Case {
        what: "VM function 1, which IA32_VMX_VMFUNC does not offer",
        change: |f| {
            or(f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, b(S::ENABLE_VM_FUNCTIONS.bits()));
            f.set(control::VM_FUNCTION_CONTROLS_FULL, 2);
        },
        expect: &[K::VmFunctionControls],
    },
    Case {
        what: "EPTP switching with an unaligned EPTP list",
        change: |f| {
            or(f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, b(S::ENABLE_VM_FUNCTIONS.bits()));
            f.set(control::VM_FUNCTION_CONTROLS_FULL, 1);
            f.set(control::EPTP_LIST_ADDR_FULL, 0x5008);
        },
        expect: &[K::EptpSwitching],
    },
    // 27.2.1.2
    Case {
        what: "exit: a default1 bit cleared",
        change: |f| and_not(f, control::VMEXIT_CONTROLS, 1 << 0),
        expect: &[K::ExitReserved],
    },
    Case {
        what: "save the preemption timer without it",
        change: |f| or(f, control::VMEXIT_CONTROLS, b(Ex::SAVE_VMX_PREEMPTION_TIMER.bits())),
        expect: &[K::SavePreemptionTimerNeedsTimer],
    },
    Case {
        what: "MSR-store area unaligned",
        change: |f| {
            f.set(control::VMEXIT_MSR_STORE_COUNT, 1);
            f.set(control::VMEXIT_MSR_STORE_ADDR_FULL, 0x9008);
        },
        expect: &[K::ExitMsrStoreArea],
    },
    Case {
        what: "exit MSR-load area running past 36 bits",
        change: |f| {
            f.set(control::VMEXIT_MSR_LOAD_COUNT, 2);
            f.set(control::VMEXIT_MSR_LOAD_ADDR_FULL, (1 << 36) - 16);
        },
        expect: &[K::ExitMsrLoadArea],
    },
    // 27.2.1.3
    Case {
        what: "entry: a default1 bit cleared",
        change: |f| and_not(f, control::VMENTRY_CONTROLS, 1 << 0),
        expect: &[K::EntryReserved],
    },
    Case {
        what: "inject with reserved bit 12",
        change: |f| _ = f.set(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | (1 << 12) | (3 << 8) | 6),
        expect: &[K::EntryInterruptionReserved],
    },
    Case {
        what: "inject type 1 (reserved)",
        change: |f| _ = f.set(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | (1 << 8) | 0x20),
        expect: &[K::EntryInterruptionType],
    },
    Case {
        what: "inject an NMI with vector 3",
        change: |f| _ = f.set(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | (2 << 8) | 3),
        expect: &[K::EntryInterruptionVector],
    },
    Case {
        what: "entry MSR-load area unaligned",
        change: |f| {
            f.set(control::VMENTRY_MSR_LOAD_COUNT, 1);
            f.set(control::VMENTRY_MSR_LOAD_ADDR_FULL, 0x9004);
        },
        expect: &[K::EntryMsrLoadArea],
    },
    Case {
        what: "entry to SMM",
        change: |f| or(f, control::VMENTRY_CONTROLS, b(En::ENTRY_TO_SMM.bits())),
        expect: &[K::EntrySmmControls],
    },
    Case {
        what: "load IA32_PERF_GLOBAL_CTRL (not modeled)",
        change: |f| or(f, control::VMENTRY_CONTROLS, b(En::LOAD_IA32_PERF_GLOBAL_CTRL.bits())),
        expect: &[K::ControlNotModeled],
    },
    Case {
        what: "use TPR shadow (not modeled)",
        change: |f| or(f, control::PRIMARY_PROCBASED_EXEC_CONTROLS, b(P::USE_TPR_SHADOW.bits())),
        expect: &[K::ControlNotModeled],
    },
    // 27.2.2
    Case { what: "host CR0.PE clear", change: |f| and_not(f, host::CR0, 1), expect: &[K::HostCr0Fixed] },
    Case { what: "host CR4.VMXE clear", change: |f| and_not(f, host::CR4, CR4_VMXE), expect: &[K::HostCr4Fixed] },
    Case { what: "host CR3 beyond 36 bits", change: |f| or(f, host::CR3, 1 << 38), expect: &[K::HostCr3Width] },
    Case {
        what: "host CR4.CET with WP clear (and CET outside CR4_FIXED1)",
        change: |f| {
            or(f, host::CR4, CR4_CET);
            and_not(f, host::CR0, CR0_WP);
        },
        expect: &[K::HostCr4Fixed, K::HostCetNeedsWp],
    },
    Case {
        what: "host SYSENTER_EIP not canonical",
        change: |f| _ = f.set(host::IA32_SYSENTER_EIP, 0x0000_8000_0000_0000),
        expect: &[K::HostSysenterCanonical],
    },
    Case {
        what: "host PAT entry 2",
        change: |f| _ = f.set(host::IA32_PAT_FULL, 0x0407_0406_0007_0402),
        expect: &[K::HostPat],
    },
    Case {
        what: "host EFER.LMA clear",
        change: |f| and_not(f, host::IA32_EFER_FULL, EFER_LMA),
        expect: &[K::HostEfer],
    },
    // 27.2.3
    Case { what: "host CS RPL 3", change: |f| _ = f.set(host::CS_SELECTOR, 0x13), expect: &[K::HostSelectorRplTi] },
    Case { what: "host DS TI set", change: |f| _ = f.set(host::DS_SELECTOR, 0x4), expect: &[K::HostSelectorRplTi] },
    Case { what: "host TR null", change: |f| _ = f.set(host::TR_SELECTOR, 0), expect: &[K::HostCsTrNotNull] },
    Case {
        what: "host GS base not canonical",
        change: |f| _ = f.set(host::GS_BASE, 0xffff_0880_0000_0000),
        expect: &[K::HostBasesCanonical],
    },
    // 27.2.4
    Case {
        what: "32-bit host (host address-space size clear) with SS null",
        change: |f| {
            and_not(f, control::VMEXIT_CONTROLS, b(Ex::HOST_ADDRESS_SPACE_SIZE.bits()));
            f.set(host::SS_SELECTOR, 0);
        },
        expect: &[K::HostEfer, K::HostSsNotNull, K::HostAddressSpaceSize, K::Ia32eGuestNeedsHost64, K::HostRip],
    },
    Case { what: "host CR4.PAE clear", change: |f| and_not(f, host::CR4, CR4_PAE), expect: &[K::HostPae] },
    Case {
        what: "host RIP not canonical",
        change: |f| _ = f.set(host::RIP, 0x0000_8000_0000_1000),
        expect: &[K::HostRip],
    },
    // 27.3.1.1
    Case {
        what: "guest CR0.PG clear with PE set",
        change: |f| and_not(f, guest::CR0, CR0_PG),
        expect: &[K::GuestCr0Fixed, K::GuestIa32ePaging],
    },
    Case {
        what: "guest CR0.PE clear with PG set",
        change: |f| and_not(f, guest::CR0, CR0_PE),
        expect: &[K::GuestCr0Fixed, K::GuestCr0PgNeedsPe],
    },
    Case {
        what: "guest CR4.PKE, outside Bochs' CR4_FIXED1",
        change: |f| or(f, guest::CR4, 1 << 22),
        expect: &[K::GuestCr4Fixed],
    },
    Case {
        what: "guest CR4.CET with WP clear",
        change: |f| {
            or(f, guest::CR4, CR4_CET);
            and_not(f, guest::CR0, CR0_WP);
        },
        expect: &[K::GuestCr4Fixed, K::GuestCetNeedsWp],
    },
    Case {
        what: "guest IA32_DEBUGCTL bit 2 (reserved)",
        change: |f| _ = f.set(guest::IA32_DEBUGCTL_FULL, 1 << 2),
        expect: &[K::GuestDebugctl],
    },
    Case {
        what: "guest CR4.PAE clear in IA-32e mode",
        change: |f| and_not(f, guest::CR4, CR4_PAE),
        expect: &[K::GuestIa32ePaging],
    },
    Case {
        what: "32-bit guest with PCIDE (IA-32e mode guest clear)",
        change: |f| and_not(f, control::VMENTRY_CONTROLS, b(En::IA32E_MODE_GUEST.bits())),
        expect: &[K::GuestPcideNeedsIa32e, K::GuestEferLma, K::GuestRip],
    },
    Case { what: "guest CR3 beyond 36 bits", change: |f| or(f, guest::CR3, 1 << 40), expect: &[K::GuestCr3Width] },
    Case { what: "guest DR7 bit 32", change: |f| or(f, guest::DR7, 1 << 32), expect: &[K::GuestDr7] },
    Case {
        what: "guest SYSENTER_ESP not canonical",
        change: |f| _ = f.set(guest::IA32_SYSENTER_ESP, 0x0001_0000_0000_0000),
        expect: &[K::GuestSysenterCanonical],
    },
    Case {
        what: "guest PAT entry 3",
        change: |f| _ = f.set(guest::IA32_PAT_FULL, 0x0407_0406_0007_0403),
        expect: &[K::GuestPat],
    },
    Case { what: "guest EFER bit 1", change: |f| or(f, guest::IA32_EFER_FULL, 2), expect: &[K::GuestEferReserved] },
    Case {
        what: "guest EFER.LME clear with PG",
        change: |f| and_not(f, guest::IA32_EFER_FULL, EFER_LME),
        expect: &[K::GuestEferLma],
    },
    // 27.3.1.2
    Case { what: "guest TR TI set", change: |f| _ = f.set(guest::TR_SELECTOR, 0x44), expect: &[K::GuestTrTi] },
    Case {
        what: "guest LDTR usable with TI set",
        change: |f| {
            f.set(guest::LDTR_SELECTOR, 0x54);
            f.set(guest::LDTR_ACCESS_RIGHTS, 0x82);
        },
        expect: &[K::GuestLdtrTi],
    },
    Case {
        what: "guest SS RPL 3 (and so DPL 0 != RPL)",
        change: |f| _ = f.set(guest::SS_SELECTOR, 0x1b),
        expect: &[K::GuestSsRpl, K::GuestSsDpl],
    },
    Case {
        what: "guest GS base not canonical",
        change: |f| _ = f.set(guest::GS_BASE, 0x0000_8000_0000_0000),
        expect: &[K::GuestBasesCanonical],
    },
    Case {
        what: "guest CS base above 4 GB",
        change: |f| _ = f.set(guest::CS_BASE, 1 << 32),
        expect: &[K::GuestBasesHigh],
    },
    Case {
        what: "guest CS is a data segment",
        change: |f| _ = f.set(guest::CS_ACCESS_RIGHTS, 0xa093),
        expect: &[K::GuestCsType],
    },
    Case {
        what: "guest SS is read-only data",
        change: |f| _ = f.set(guest::SS_ACCESS_RIGHTS, 0xc091),
        expect: &[K::GuestSsType],
    },
    Case {
        what: "guest DS usable but not accessed",
        change: |f| {
            f.set(guest::DS_SELECTOR, 0x18);
            f.set(guest::DS_LIMIT, 0xffff_ffff);
            f.set(guest::DS_ACCESS_RIGHTS, 0xc092);
        },
        expect: &[K::GuestDataType],
    },
    Case {
        what: "guest CS with S clear (a system descriptor)",
        change: |f| _ = f.set(guest::CS_ACCESS_RIGHTS, 0xa08b),
        expect: &[K::GuestSegmentS],
    },
    Case {
        what: "guest CS DPL 3 with SS DPL 0",
        change: |f| _ = f.set(guest::CS_ACCESS_RIGHTS, 0xa0fb),
        expect: &[K::GuestCsDpl],
    },
    Case {
        what: "guest ES usable with DPL 0 under RPL 3",
        change: |f| {
            f.set(guest::ES_SELECTOR, 0x1b);
            f.set(guest::ES_LIMIT, 0xffff_ffff);
            f.set(guest::ES_ACCESS_RIGHTS, 0xc093);
        },
        expect: &[K::GuestDataDpl],
    },
    Case {
        what: "guest SS not present",
        change: |f| _ = f.set(guest::SS_ACCESS_RIGHTS, 0xc013),
        expect: &[K::GuestSegmentPresent],
    },
    Case {
        what: "guest CS access-rights bit 8 (reserved)",
        change: |f| _ = f.set(guest::CS_ACCESS_RIGHTS, 0xa19b),
        expect: &[K::GuestSegmentReserved],
    },
    Case {
        what: "guest CS with L and D/B in IA-32e mode",
        change: |f| _ = f.set(guest::CS_ACCESS_RIGHTS, 0xe09b),
        expect: &[K::GuestCsDb],
    },
    Case {
        what: "guest SS with a 4 GB limit and G clear",
        change: |f| _ = f.set(guest::SS_ACCESS_RIGHTS, 0x4093),
        expect: &[K::GuestSegmentGranularity],
    },
    Case {
        what: "guest TR an available TSS (type 9)",
        change: |f| _ = f.set(guest::TR_ACCESS_RIGHTS, 0x89),
        expect: &[K::GuestTrType],
    },
    Case {
        what: "guest TR unusable",
        change: |f| or(f, guest::TR_ACCESS_RIGHTS, b(AR_UNUSABLE)),
        expect: &[K::GuestTrUsable],
    },
    Case {
        what: "guest TR not present",
        change: |f| and_not(f, guest::TR_ACCESS_RIGHTS, 1 << 7),
        expect: &[K::GuestTrAccessRights],
    },
    Case {
        what: "guest LDTR usable with type 9",
        change: |f| {
            f.set(guest::LDTR_SELECTOR, 0x50);
            f.set(guest::LDTR_ACCESS_RIGHTS, 0x89);
        },
        expect: &[K::GuestLdtrAccessRights],
    },
    // 27.3.1.3
    Case {
        what: "guest GDTR base not canonical",
        change: |f| _ = f.set(guest::GDTR_BASE, 0x0080_0000_0000_0000),
        expect: &[K::GuestDtrBases],
    },
    Case {
        what: "guest IDTR limit 64 KB",
        change: |f| _ = f.set(guest::IDTR_LIMIT, 0x1_0000),
        expect: &[K::GuestDtrLimits],
    },
    // 27.3.1.4
    Case {
        what: "guest RIP not canonical",
        change: |f| _ = f.set(guest::RIP, 0x0000_8000_0000_0000),
        expect: &[K::GuestRip],
    },
    Case {
        what: "guest RFLAGS bit 1 clear",
        change: |f| and_not(f, guest::RFLAGS, 2),
        expect: &[K::GuestRflagsReserved],
    },
    Case {
        what: "guest RFLAGS.VM in IA-32e mode",
        change: |f| or(f, guest::RFLAGS, RFLAGS_VM),
        expect: &[K::GuestRflagsVm],
    },
    Case {
        what: "inject an external interrupt with IF clear",
        change: |f| _ = f.set(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | 0x20),
        expect: &[K::GuestRflagsIf],
    },
    // 27.3.1.5
    Case {
        what: "guest activity state 5",
        change: |f| _ = f.set(guest::ACTIVITY_STATE, 5),
        expect: &[K::GuestActivityState],
    },
    Case {
        what: "guest HLT at SS.DPL 3 (CS, SS at ring 3 too)",
        change: |f| {
            f.set(guest::ACTIVITY_STATE, 1);
            f.set(guest::CS_SELECTOR, 0x33);
            f.set(guest::CS_ACCESS_RIGHTS, 0xa0fb);
            f.set(guest::SS_SELECTOR, 0x2b);
            f.set(guest::SS_ACCESS_RIGHTS, 0xc0f3);
        },
        expect: &[K::GuestActivityHltDpl],
    },
    Case {
        what: "guest HLT under MOV-SS blocking",
        change: |f| {
            f.set(guest::ACTIVITY_STATE, 1);
            f.set(guest::INTERRUPTIBILITY_STATE, 2);
        },
        expect: &[K::GuestActivityBlocking],
    },
    Case {
        what: "guest interruptibility bit 5",
        change: |f| _ = f.set(guest::INTERRUPTIBILITY_STATE, 1 << 5),
        expect: &[K::GuestInterruptibilityReserved],
    },
    Case {
        what: "guest STI and MOV-SS blocking, IF clear",
        change: |f| _ = f.set(guest::INTERRUPTIBILITY_STATE, 3),
        expect: &[K::GuestInterruptibilityStiMovSs, K::GuestInterruptibilityStiIf],
    },
    Case {
        what: "inject an NMI while NMIs are blocked (virtual NMIs on)",
        change: |f| {
            f.set(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | (2 << 8) | 2);
            f.set(guest::INTERRUPTIBILITY_STATE, 8);
        },
        expect: &[K::GuestInterruptibilityInjection],
    },
    Case {
        what: "guest SMI blocking outside SMM",
        change: |f| _ = f.set(guest::INTERRUPTIBILITY_STATE, 4),
        expect: &[K::GuestInterruptibilitySmi],
    },
    Case {
        what: "guest pending debug exceptions bit 4",
        change: |f| _ = f.set(guest::PENDING_DBG_EXCEPTIONS, 1 << 4),
        expect: &[K::GuestPendingDebugReserved],
    },
    Case {
        what: "guest BS pending under MOV-SS blocking with TF clear",
        change: |f| {
            f.set(guest::INTERRUPTIBILITY_STATE, 2);
            f.set(guest::PENDING_DBG_EXCEPTIONS, 1 << 14);
        },
        expect: &[K::GuestPendingDebugBs],
    },
    Case {
        what: "guest RTM pending debug without bit 12",
        change: |f| _ = f.set(guest::PENDING_DBG_EXCEPTIONS, 1 << 16),
        expect: &[K::GuestPendingDebugRtm],
    },
    Case {
        what: "VMCS link pointer 0 (not all ones)",
        change: |f| _ = f.set(guest::LINK_PTR_FULL, 0),
        expect: &[K::VmcsLinkPointer],
    },
    Case {
        what: "guest activity state never written",
        change: |f| f.remove(guest::ACTIVITY_STATE),
        expect: &[K::FieldUnwritten],
    },
];

#[test]
fn each_corruption_violates_exactly_its_checks() {
    let (_, raw, native) = &profiles()[0];
    let (caps, c) = controls(raw, *native, false);
    let good = vmcs(&launch_state(raw, &c, 0));
    assert!(check_on(&caps, &good).is_empty());
    let mut seen = Violations::default();
    for case in CASES {
        let mut f = good.clone();
        (case.change)(&mut f);
        let v = check_on(&caps, &f);
        assert_eq!(v.iter().collect::<Vec<_>>(), case.expect, "{}: {v}", case.what);
        for &k in case.expect {
            seen.add(k);
        }
    }
    // Every check can fail, except these two, shown below on other profiles/modes.
    let missing: Vec<_> = Check::ALL.iter().filter(|&&k| !seen.contains(k)).collect();
    assert_eq!(missing, [&K::EptpAccessedDirty], "checks no case violates");
}

#[test]
fn rtm_pending_debug_with_bit_12_is_accepted() {
    let (_, raw, native) = &profiles()[0];
    let (caps, c) = controls(raw, *native, false);
    let mut f = vmcs(&launch_state(raw, &c, 0));
    f.set(guest::PENDING_DBG_EXCEPTIONS, (1 << 16) | (1 << 12));
    assert!(check_on(&caps, &f).is_empty());
    f.set(guest::PENDING_DBG_EXCEPTIONS, (1 << 16) | (1 << 12) | 1);
    assert_eq!(check_on(&caps, &f).iter().collect::<Vec<_>>(), [K::GuestPendingDebugRtm]);
}

#[test]
fn eptp_ad_bit_needs_the_capability() {
    // Bochs has A/D: the bit is accepted; without the capability it is refused.
    let (_, raw, native) = &profiles()[0];
    let (mut caps, c) = controls(raw, *native, false);
    let mut f = vmcs(&launch_state(raw, &c, 0));
    or(&mut f, control::EPTP_FULL, 1 << 6);
    assert!(check_on(&caps, &f).is_empty());
    caps.ept_vpid.ad_bits = false;
    assert_eq!(check_on(&caps, &f).iter().collect::<Vec<_>>(), [K::EptpAccessedDirty]);
}

#[test]
fn shadow_mode_corruptions() {
    // Shadow paging: no EPTP is written or consulted; VPID is required and checked.
    for (name, raw, native) in profiles() {
        let (caps, c) = controls(&raw, native, true);
        let good = vmcs(&launch_state(&raw, &c, 0));
        assert!(good.get(control::EPTP_FULL).is_none(), "{name}");
        let mut f = good.clone();
        f.set(control::VPID, 0);
        assert_eq!(check_on(&caps, &f).iter().collect::<Vec<_>>(), [K::VpidNotZero], "{name}");
        let mut f = good.clone();
        or(&mut f, control::SECONDARY_PROCBASED_EXEC_CONTROLS, b(S::ENABLE_EPT.bits()));
        let v = check_on(&caps, &f);
        assert_eq!(
            (v.iter().collect::<Vec<_>>(), v.unwritten),
            (std::vec![K::FieldUnwritten], Some(control::EPTP_FULL))
        );
    }
}

#[test]
fn a_32bit_address_limit_in_vmx_basic_applies_to_the_msr_bitmap() {
    let (_, raw, native) = &profiles()[0];
    let (mut caps, c) = controls(raw, *native, false);
    let mut f = vmcs(&launch_state(raw, &c, 0));
    f.set(control::MSR_BITMAPS_ADDR_FULL, 0x1_0000_0000);
    assert!(check_on(&caps, &f).is_empty());
    caps.basic.as_mut().unwrap().phys_addr_32bit = true;
    assert_eq!(check_on(&caps, &f).iter().collect::<Vec<_>>(), [K::MsrBitmapAddress]);
}

#[test]
fn checks_are_named_with_their_sdm_section() {
    assert!(Check::ALL.len() >= 90, "{}", Check::ALL.len());
    assert!(Check::ALL.len() <= 128, "Violations holds 128");
    for &k in Check::ALL {
        let s = k.section();
        assert!(s == "checker" || s.starts_with("27."), "{k:?} {s}");
        assert!(!k.what().is_empty(), "{k:?}");
    }
    assert_eq!(Check::GuestTrUsable.to_string(), "GuestTrUsable (SDM Vol. 3C 27.3.1.2): Guest TR is usable.");
    let mut v = Violations::default();
    v.add(Check::HostRip);
    v.add(Check::VmcsLinkPointer);
    assert_eq!(v.len(), 2);
    assert!(v.to_string().starts_with("HostRip (SDM Vol. 3C 27.2.4)"), "{v}");
}

#[test]
fn fields_records_like_a_vmcs() {
    let mut f = Fields::default();
    assert!(f.is_empty());
    f.write(guest::CR0, 1).unwrap();
    f.write(guest::CR0, 2).unwrap();
    assert_eq!((f.read(guest::CR0), f.len()), (Ok(2), 1));
    assert!(f.read(guest::CR3).is_err());
    for i in 1..Fields::CAPACITY as u32 {
        f.write(0x1_0000 + i, 0).unwrap();
    }
    assert!(f.write(0x2_0000, 0).is_err(), "full");
    f.remove(guest::CR0);
    assert_eq!(f.get(guest::CR0), None);
    assert_eq!(f.len(), Fields::CAPACITY - 1);
}

#[test]
fn real_cpus_take_kdbts_different_paths() {
    // The positive test above covers these: what kdbt passes through and switches on
    // differs between the real CPUs (their CPUID and secondary controls differ).
    let p2 = |name: &str, shadow: bool| {
        let (_, raw, native) = profiles().into_iter().find(|p| p.0.starts_with(name)).expect(name);
        controls(&raw, native, shadow).1
    };
    let (rdtscp, invpcid, xsaves) =
        (S::ENABLE_RDTSCP.bits(), S::ENABLE_INVPCID.bits(), S::ENABLE_XSAVES_XRSTORS.bits());
    let all = rdtscp | invpcid | xsaves;
    let skl = p2("Intel Core i7-6700K", false);
    assert_eq!((skl.proc2 & all, skl.ve), (all, true));
    let bdw = p2("Intel Core i7-5600U", false);
    assert_eq!((bdw.proc2 & all, bdw.ve), (rdtscp | invpcid, true));
    let snb = p2("Intel Core i7-3960X", false);
    assert_eq!((snb.proc2 & all, snb.ve), (rdtscp, false));
    assert!(!snb.ept.ad_bits && skl.ept.ad_bits);
    for name in ["Intel Core i7-6700K", "Intel Core i7-5600U", "Intel Core i7-3960X"] {
        let c = p2(name, true);
        assert!(c.vpid != 0 && c.vnmi && c.flush.individual_addr && c.flush.retaining_globals, "{name}");
    }
}
