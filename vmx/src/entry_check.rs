//! A host-side VM-entry checker: the checks a CPU makes at VMLAUNCH on the VMCS's
//! controls, host state and guest state (Intel SDM Vol. 3C, chapter 27 "VM Entries",
//! sections 27.2 and 27.3.1; chapter 26 in editions before the 2022 renumbering), applied
//! to the field values kdbt's [`crate::vmcs::program`] writes, against one CPU's VMX
//! capability MSRs. Bochs 2.7 makes many of these checks but not all of them; a CPU makes
//! all of them. The checker is what the host tests use to show that the VMCS kdbt programs
//! would enter on every capability profile it knows, in both paging modes.
//!
//! Use: capture the writes with a [`Fields`] (a [`Vmcs`] that records), add what the
//! launcher writes outside `program` (guest RSP and RIP, written by `vmlaunch_here` right
//! before VMLAUNCH), and call [`check`] with the [`Machine`] (decoded capabilities and the
//! physical-address width). It returns every violated [`Check`]; each names its SDM section.
//!
//! # What is checked
//!
//! Every check in [`Check::ALL`] (its doc line says what); grouped by SDM section:
//!
//! * 27.2.1.1 VM-execution control fields: reserved bits of the pin-based, primary and
//!   secondary controls against the (TRUE_) capability MSRs; CR3-target count against
//!   IA32_VMX_MISC; I/O- and MSR-bitmap addresses (alignment, physical-address width,
//!   32 bits when IA32_VMX_BASIC\[48\]); the TPR-shadow, NMI-exiting/virtual-NMIs/
//!   NMI-window and virtual-interrupt-delivery dependencies; VPID not 0; the EPT pointer
//!   (memory type allowed by IA32_VMX_EPT_VPID_CAP, page-walk length, A/D bit only with the
//!   A/D capability, reserved bits, width); unrestricted guest needs EPT; VM-function
//!   controls against IA32_VMX_VMFUNC and EPTP switching needing EPT and an aligned list.
//! * 27.2.1.2 VM-exit control fields: reserved bits; "save VMX-preemption timer value"
//!   needs the timer; MSR-store and MSR-load areas (16-byte alignment, width).
//! * 27.2.1.3 VM-entry control fields: reserved bits; event injection (reserved bits,
//!   type, vector); the MSR-load area; no entry to SMM and no dual-monitor deactivation.
//! * 27.2.2 host control registers and MSRs: CR0/CR4 fixed bits, CR3 width, CR4.CET needs
//!   CR0.WP, SYSENTER ESP/EIP canonical, PAT and EFER when loaded.
//! * 27.2.3 host segment and descriptor-table registers: selector RPL/TI, CS and TR not
//!   null, SS not null for a 32-bit host, FS/GS/GDTR/IDTR/TR bases canonical.
//! * 27.2.4 address-space size: a launch from 64-bit mode needs a 64-bit host, which needs
//!   CR4.PAE and a canonical RIP; a 32-bit host cannot enter an IA-32e guest.
//! * 27.3.1.1 guest control and debug registers, MSRs: CR0/CR4 fixed bits, PG needs PE,
//!   CR4.CET needs WP, IA32_DEBUGCTL reserved bits and DR7\[63:32\] when debug controls are
//!   loaded, IA-32e mode needs PG and PAE (and no PCIDE outside it), CR3 width, SYSENTER
//!   ESP/EIP canonical, PAT and EFER (reserved bits, LMA/LME against "IA-32e mode guest").
//! * 27.3.1.2 guest segment registers (protected mode, not virtual-8086): TR/LDTR TI,
//!   SS.RPL = CS.RPL, bases (canonical / bits 63:32), access rights of CS, SS, DS, ES, FS,
//!   GS (type, S, DPL, P, reserved bits, D/B with L, G against the limit), TR (type 11 in
//!   IA-32e mode, S, P, reserved, G, usable) and LDTR when usable.
//! * 27.3.1.3 GDTR/IDTR: canonical bases, limits below 64 KB.
//! * 27.3.1.4 RIP and RFLAGS: RIP canonical (64-bit code) or below 4 GB, RFLAGS reserved
//!   bits, VM clear in IA-32e mode, IF set when an external interrupt is injected.
//! * 27.3.1.5 non-register state: activity state (value, supported by IA32_VMX_MISC, HLT
//!   only at SS.DPL 0, active under STI/MOV-SS blocking), interruptibility (reserved bits,
//!   STI with MOV-SS, STI blocking with IF clear, blocking against injected events, SMI
//!   blocking outside SMM, NMI blocking with a virtual NMI injected), pending debug
//!   exceptions (reserved bits, BS against TF and BTF under blocking or HLT, RTM bit), the
//!   VMCS link pointer (all ones; any other value would have to be an aligned, in-width
//!   address of a VMCS region carrying the revision identifier, which kdbt never has).
//!
//! Two checks are the checker's own, not the SDM's: [`Check::FieldUnwritten`] (a field the
//! CPU consults was never written: a fresh VMCS's fields are undefined) and
//! [`Check::ControlNotModeled`] (a control is on whose own checks are not implemented here,
//! so a clean result would mean nothing for it).
//!
//! # What is not checked
//!
//! * Checks of controls kdbt never enables (reported as [`Check::ControlNotModeled`]
//!   instead): TPR shadow / virtual-APIC page, APIC-access page, posted interrupts,
//!   tertiary controls, VMCS shadowing bitmaps, PML, EPT-violation #VE, sub-page and
//!   mode-based EPT, Intel PT, load IA32_PERF_GLOBAL_CTRL / BNDCFGS / RTIT_CTL / CET /
//!   PKRS / LBR_CTL, and unrestricted guest's relaxations of the guest-state checks.
//! * Checks that need memory (the checker has none): the contents of the MSR-load areas,
//!   the revision identifier and shadow bit of a linked VMCS, the VMXON pointer and the
//!   VMCS itself (VMPTRLD checks), PDPTEs (27.3.1.6: only for PAE paging outside IA-32e
//!   mode, which kdbt's guest never is).
//! * Virtual-8086 and real-mode guests (kdbt's guest is Linux in 64-bit mode), guests
//!   entering SMM, entry with an activity state other than active or HLT in combination
//!   with injected events, the VMX-preemption timer value, event-injection error codes
//!   and instruction lengths.
//! * A consulted field that was never written reads as 0 for the checks on it (besides
//!   [`Check::FieldUnwritten`]), except the EPT pointer, whose checks are then skipped.
//! * "Canonical" uses 48-bit linear addresses, or 57 when CR4.LA57 is set in the CR4
//!   being checked (host CR4 for host fields, guest CR4 for guest fields).
use core::fmt;

use x86::vmx::vmcs::control::{
    EntryControls as En, ExitControls as Ex, PinbasedControls as Pin, PrimaryControls as P, SecondaryControls as S,
};
use x86::vmx::vmcs::{control, guest, host};

use crate::caps::VmxCaps;
use crate::vmcs::{Op, VmFail, Vmcs, VmcsError};

/// The VMCS as written: a [`Vmcs`] that records every VMWRITE (the last value of a field
/// wins) and reads back only what was written.
#[derive(Clone)]
pub struct Fields {
    entries: [(u32, u64); Fields::CAPACITY],
    len: usize,
}

impl Default for Fields {
    fn default() -> Self {
        Fields { entries: [(0, 0); Fields::CAPACITY], len: 0 }
    }
}

impl Fields {
    /// More than the VMCS fields kdbt writes (about 100).
    pub const CAPACITY: usize = 192;

    /// The value written to `field`, if any.
    pub fn get(&self, field: u32) -> Option<u64> {
        self.entries[..self.len].iter().find(|e| e.0 == field).map(|e| e.1)
    }

    /// Sets (or overwrites) a field; false when the table is full.
    pub fn set(&mut self, field: u32, value: u64) -> bool {
        if let Some(e) = self.entries[..self.len].iter_mut().find(|e| e.0 == field) {
            e.1 = value;
            return true;
        }
        if self.len == Self::CAPACITY {
            return false;
        }
        self.entries[self.len] = (field, value);
        self.len += 1;
        true
    }

    /// Forgets a field (as if never written).
    pub fn remove(&mut self, field: u32) {
        if let Some(i) = self.entries[..self.len].iter().position(|e| e.0 == field) {
            self.entries.copy_within(i + 1..self.len, i);
            self.len -= 1;
        }
    }

    /// Number of fields written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Vmcs for Fields {
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError> {
        // A full table is reported like a CPU refusing the field.
        if self.set(field, value) {
            Ok(())
        } else {
            Err(VmcsError { op: Op::Write, field, fail: VmFail::Valid(12) })
        }
    }
    fn read(&self, field: u32) -> Result<u64, VmcsError> {
        self.get(field).ok_or(VmcsError { op: Op::Read, field, fail: VmFail::Valid(12) })
    }
}

/// The CPU the VMCS is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// Its decoded VMX capability MSRs (IA32_VMX_BASIC, the (TRUE_) control MSRs,
    /// PROCBASED_CTLS2, EPT_VPID_CAP, MISC, CR0/CR4 FIXED0/1, VMFUNC).
    pub caps: &'a VmxCaps,
    /// Its physical-address width (CPUID.80000008H:EAX\[7:0\], MAXPHYADDR).
    pub phys_bits: u8,
}

macro_rules! checks {
    ($( $(#[doc = $doc:literal])* $name:ident = $sec:literal, )*) => {
        /// One VM-entry check (see the module documentation for the list).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u8)]
        pub enum Check {
            $( $(#[doc = $doc])* $name, )*
        }

        impl Check {
            /// Every check, in the order the SDM lists them.
            pub const ALL: &'static [Check] = &[$(Check::$name,)*];

            pub fn name(self) -> &'static str {
                match self { $(Check::$name => stringify!($name),)* }
            }

            /// The SDM Vol. 3C section that makes the check (`"checker"` for the
            /// checker's own).
            pub fn section(self) -> &'static str {
                match self { $(Check::$name => $sec,)* }
            }

            /// What the check requires (its doc line).
            pub fn what(self) -> &'static str {
                match self { $(Check::$name => concat!($($doc),*).trim_ascii(),)* }
            }
        }
    };
}

checks! {
    /// Pin-based controls: bits reserved by IA32_VMX_(TRUE_)PINBASED_CTLS have their fixed value.
    PinReserved = "27.2.1.1",
    /// Primary processor-based controls: bits reserved by IA32_VMX_(TRUE_)PROCBASED_CTLS have their fixed value.
    ProcReserved = "27.2.1.1",
    /// Secondary controls (when activated): bits reserved by IA32_VMX_PROCBASED_CTLS2 are 0.
    Proc2Reserved = "27.2.1.1",
    /// The CR3-target count is at most the number IA32_VMX_MISC[24:16] allows.
    Cr3TargetCount = "27.2.1.1",
    /// With "use I/O bitmaps": both addresses 4 KB aligned and within the physical-address width.
    IoBitmapAddress = "27.2.1.1",
    /// With "use MSR bitmaps": the address is 4 KB aligned and within the physical-address width.
    MsrBitmapAddress = "27.2.1.1",
    /// Without "use TPR shadow": virtualize x2APIC mode, APIC-register virtualization and virtual-interrupt delivery are 0.
    TprShadowDependents = "27.2.1.1",
    /// Without "NMI exiting": "virtual NMIs" is 0.
    VirtualNmisNeedNmiExiting = "27.2.1.1",
    /// Without "virtual NMIs": "NMI-window exiting" is 0.
    NmiWindowNeedsVirtualNmis = "27.2.1.1",
    /// With "virtual-interrupt delivery": "external-interrupt exiting" is 1.
    VirtualInterruptDeliveryNeedsExtIntExiting = "27.2.1.1",
    /// With "enable VPID": the VPID is not 0.
    VpidNotZero = "27.2.1.1",
    /// With "enable EPT": the EPTP memory type is UC or WB, and one IA32_VMX_EPT_VPID_CAP allows.
    EptpMemoryType = "27.2.1.1",
    /// With "enable EPT": the EPTP page-walk length is one IA32_VMX_EPT_VPID_CAP supports (4 or 5 levels).
    EptpWalkLength = "27.2.1.1",
    /// With "enable EPT": EPTP bit 6 (A/D flags) is 0 unless IA32_VMX_EPT_VPID_CAP[21] is 1.
    EptpAccessedDirty = "27.2.1.1",
    /// With "enable EPT": EPTP reserved bits (11:8, 7 without supervisor shadow-stack control) and bits beyond the physical-address width are 0.
    EptpReserved = "27.2.1.1",
    /// With "unrestricted guest": "enable EPT" is 1.
    UnrestrictedGuestNeedsEpt = "27.2.1.1",
    /// With "enable VM functions": VM-function controls bits not allowed by IA32_VMX_VMFUNC are 0.
    VmFunctionControls = "27.2.1.1",
    /// With EPTP switching: "enable EPT" is 1 and the EPTP-list address is 4 KB aligned and within the width.
    EptpSwitching = "27.2.1.1",
    /// VM-exit controls: bits reserved by IA32_VMX_(TRUE_)EXIT_CTLS have their fixed value.
    ExitReserved = "27.2.1.2",
    /// Without "activate VMX-preemption timer": "save VMX-preemption timer value" is 0.
    SavePreemptionTimerNeedsTimer = "27.2.1.2",
    /// VM-exit MSR-store area (count > 0): 16-byte aligned, within the physical-address width.
    ExitMsrStoreArea = "27.2.1.2",
    /// VM-exit MSR-load area (count > 0): 16-byte aligned, within the physical-address width.
    ExitMsrLoadArea = "27.2.1.2",
    /// VM-entry controls: bits reserved by IA32_VMX_(TRUE_)ENTRY_CTLS have their fixed value.
    EntryReserved = "27.2.1.3",
    /// Event injection (valid bit set): interruption-information bits 30:12 are 0.
    EntryInterruptionReserved = "27.2.1.3",
    /// Event injection: the type is not 1 (reserved), and 7 (other event) only with the monitor trap flag.
    EntryInterruptionType = "27.2.1.3",
    /// Event injection: NMI has vector 2, a hardware exception a vector up to 31, other event vector 0.
    EntryInterruptionVector = "27.2.1.3",
    /// VM-entry MSR-load area (count > 0): 16-byte aligned, within the physical-address width.
    EntryMsrLoadArea = "27.2.1.3",
    /// Outside SMM: "entry to SMM" and "deactivate dual-monitor treatment" are 0.
    EntrySmmControls = "27.2.1.3",
    /// Host CR0 has the bits IA32_VMX_CR0_FIXED0 fixes to 1 and none IA32_VMX_CR0_FIXED1 fixes to 0.
    HostCr0Fixed = "27.2.2",
    /// Host CR4 has the bits IA32_VMX_CR4_FIXED0 fixes to 1 and none IA32_VMX_CR4_FIXED1 fixes to 0.
    HostCr4Fixed = "27.2.2",
    /// Host CR3 has no bit set beyond the physical-address width.
    HostCr3Width = "27.2.2",
    /// Host CR4.CET set needs host CR0.WP set.
    HostCetNeedsWp = "27.2.2",
    /// Host IA32_SYSENTER_ESP and IA32_SYSENTER_EIP are canonical.
    HostSysenterCanonical = "27.2.2",
    /// With "load IA32_PAT" (exit): every host PAT entry is 0, 1, 4, 5, 6 or 7.
    HostPat = "27.2.2",
    /// With "load IA32_EFER" (exit): reserved host EFER bits are 0, LMA and LME equal "host address-space size".
    HostEfer = "27.2.2",
    /// Host selectors (ES, CS, SS, DS, FS, GS, TR) have RPL 0 and TI 0.
    HostSelectorRplTi = "27.2.3",
    /// Host CS and TR selectors are not 0.
    HostCsTrNotNull = "27.2.3",
    /// Without "host address-space size": the host SS selector is not 0.
    HostSsNotNull = "27.2.3",
    /// Host FS, GS, GDTR, IDTR and TR bases are canonical.
    HostBasesCanonical = "27.2.3",
    /// VMLAUNCH from IA-32e mode (kdbt always launches from 64-bit mode) needs "host address-space size".
    HostAddressSpaceSize = "27.2.4",
    /// Without "host address-space size": "IA-32e mode guest" is 0.
    Ia32eGuestNeedsHost64 = "27.2.4",
    /// With "host address-space size": host CR4.PAE is 1.
    HostPae = "27.2.4",
    /// With "host address-space size": host RIP is canonical (else bits 63:32 are 0).
    HostRip = "27.2.4",
    /// Guest CR0 has the bits IA32_VMX_CR0_FIXED0 fixes to 1 and none IA32_VMX_CR0_FIXED1 fixes to 0.
    GuestCr0Fixed = "27.3.1.1",
    /// Guest CR0.PG set needs CR0.PE set.
    GuestCr0PgNeedsPe = "27.3.1.1",
    /// Guest CR4 has the bits IA32_VMX_CR4_FIXED0 fixes to 1 and none IA32_VMX_CR4_FIXED1 fixes to 0.
    GuestCr4Fixed = "27.3.1.1",
    /// Guest CR4.CET set needs guest CR0.WP set.
    GuestCetNeedsWp = "27.3.1.1",
    /// With "load debug controls": reserved IA32_DEBUGCTL bits (5:2, 63:16) are 0.
    GuestDebugctl = "27.3.1.1",
    /// With "IA-32e mode guest": guest CR0.PG and CR4.PAE are 1.
    GuestIa32ePaging = "27.3.1.1",
    /// Without "IA-32e mode guest": guest CR4.PCIDE is 0.
    GuestPcideNeedsIa32e = "27.3.1.1",
    /// Guest CR3 has no bit set beyond the physical-address width.
    GuestCr3Width = "27.3.1.1",
    /// With "load debug controls": guest DR7 bits 63:32 are 0.
    GuestDr7 = "27.3.1.1",
    /// Guest IA32_SYSENTER_ESP and IA32_SYSENTER_EIP are canonical.
    GuestSysenterCanonical = "27.3.1.1",
    /// With "load IA32_PAT" (entry): every guest PAT entry is 0, 1, 4, 5, 6 or 7.
    GuestPat = "27.3.1.1",
    /// With "load IA32_EFER" (entry): reserved guest EFER bits are 0.
    GuestEferReserved = "27.3.1.1",
    /// With "load IA32_EFER" (entry): EFER.LMA equals "IA-32e mode guest", and EFER.LME too when CR0.PG is set.
    GuestEferLma = "27.3.1.1",
    /// Guest TR selector has TI 0.
    GuestTrTi = "27.3.1.2",
    /// Guest LDTR selector (usable) has TI 0.
    GuestLdtrTi = "27.3.1.2",
    /// Guest SS selector RPL equals CS selector RPL.
    GuestSsRpl = "27.3.1.2",
    /// Guest TR, FS, GS and (usable) LDTR bases are canonical.
    GuestBasesCanonical = "27.3.1.2",
    /// Guest CS and (usable) SS, DS, ES bases have bits 63:32 clear.
    GuestBasesHigh = "27.3.1.2",
    /// Guest CS type is 9, 11, 13 or 15 (accessed code).
    GuestCsType = "27.3.1.2",
    /// Guest SS (usable) type is 3 or 7 (read/write accessed data).
    GuestSsType = "27.3.1.2",
    /// Guest DS, ES, FS, GS (usable): accessed, and readable if code.
    GuestDataType = "27.3.1.2",
    /// Guest CS and usable SS, DS, ES, FS, GS have S (code/data) set.
    GuestSegmentS = "27.3.1.2",
    /// Guest CS DPL equals SS DPL (non-conforming) or is at most SS DPL (conforming).
    GuestCsDpl = "27.3.1.2",
    /// Guest SS DPL equals its selector's RPL.
    GuestSsDpl = "27.3.1.2",
    /// Guest DS, ES, FS, GS (usable, data or non-conforming code): DPL at least the selector's RPL.
    GuestDataDpl = "27.3.1.2",
    /// Guest CS and usable SS, DS, ES, FS, GS are present.
    GuestSegmentPresent = "27.3.1.2",
    /// Guest CS and usable SS, DS, ES, FS, GS have access-rights bits 11:8 and 31:17 clear.
    GuestSegmentReserved = "27.3.1.2",
    /// Guest CS with L set in an IA-32e mode guest has D/B clear.
    GuestCsDb = "27.3.1.2",
    /// Guest CS and usable SS, DS, ES, FS, GS: G clear if limit bits 11:0 are not all 1, G set if any of bits 31:20 is.
    GuestSegmentGranularity = "27.3.1.2",
    /// Guest TR type is 11 (busy 64-bit TSS) in an IA-32e mode guest, 3 or 11 otherwise.
    GuestTrType = "27.3.1.2",
    /// Guest TR is usable.
    GuestTrUsable = "27.3.1.2",
    /// Guest TR: S clear, P set, access-rights bits 11:8 and 31:17 clear, G consistent with the limit.
    GuestTrAccessRights = "27.3.1.2",
    /// Guest LDTR (usable): type 2, S clear, P set, reserved bits clear, G consistent with the limit.
    GuestLdtrAccessRights = "27.3.1.2",
    /// Guest GDTR and IDTR bases are canonical.
    GuestDtrBases = "27.3.1.3",
    /// Guest GDTR and IDTR limits have bits 31:16 clear.
    GuestDtrLimits = "27.3.1.3",
    /// Guest RIP: canonical in 64-bit code (IA-32e mode and CS.L), else bits 63:32 clear.
    GuestRip = "27.3.1.4",
    /// Guest RFLAGS: bits 63:22, 15, 5, 3 clear and bit 1 set.
    GuestRflagsReserved = "27.3.1.4",
    /// Guest RFLAGS.VM is clear in an IA-32e mode guest (or with CR0.PE clear).
    GuestRflagsVm = "27.3.1.4",
    /// Guest RFLAGS.IF is set when an external interrupt is injected.
    GuestRflagsIf = "27.3.1.4",
    /// Guest activity state is 0-3 and one IA32_VMX_MISC supports.
    GuestActivityState = "27.3.1.5",
    /// Guest activity state HLT needs SS.DPL 0.
    GuestActivityHltDpl = "27.3.1.5",
    /// Guest activity state is active when STI or MOV-SS blocking is set.
    GuestActivityBlocking = "27.3.1.5",
    /// Guest interruptibility state bits 31:5 are clear.
    GuestInterruptibilityReserved = "27.3.1.5",
    /// Guest interruptibility: STI and MOV-SS blocking are not both set.
    GuestInterruptibilityStiMovSs = "27.3.1.5",
    /// Guest interruptibility: STI blocking is clear when RFLAGS.IF is clear.
    GuestInterruptibilityStiIf = "27.3.1.5",
    /// Guest interruptibility against an injected external interrupt or NMI (no STI/MOV-SS blocking; no NMI blocking for a virtual NMI).
    GuestInterruptibilityInjection = "27.3.1.5",
    /// Guest interruptibility: SMI blocking clear outside SMM.
    GuestInterruptibilitySmi = "27.3.1.5",
    /// Guest pending debug exceptions: bits 11:4, 13, 15 and 63:17 clear.
    GuestPendingDebugReserved = "27.3.1.5",
    /// Guest pending debug exceptions under STI/MOV-SS blocking or HLT: BS set iff RFLAGS.TF set and IA32_DEBUGCTL.BTF clear.
    GuestPendingDebugBs = "27.3.1.5",
    /// Guest pending debug exceptions with bit 16 (RTM): bits 11:0, 14 and 15 clear, bit 12 set, no MOV-SS blocking.
    GuestPendingDebugRtm = "27.3.1.5",
    /// VMCS link pointer: all ones, which "VMCS shadowing" does not allow.
    VmcsLinkPointer = "27.3.1.5",
    /// A field the CPU consults for this VMCS was never written (fresh VMCS fields are undefined).
    FieldUnwritten = "checker",
    /// A control is on whose own checks this checker does not implement.
    ControlNotModeled = "checker",
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.section() == "checker" {
            write!(f, "{} (entry checker): {}", self.name(), self.what())
        } else {
            write!(f, "{} (SDM Vol. 3C {}): {}", self.name(), self.section(), self.what())
        }
    }
}

/// The checks a VMCS fails, and the first field found unwritten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Violations {
    set: u128,
    /// First consulted field that was never written ([`Check::FieldUnwritten`]).
    pub unwritten: Option<u32>,
}

impl Violations {
    fn add(&mut self, c: Check) {
        self.set |= 1 << c as u8;
    }
    pub fn contains(&self, c: Check) -> bool {
        self.set & (1 << c as u8) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.set == 0
    }
    pub fn len(&self) -> usize {
        self.set.count_ones() as usize
    }
    /// The violated checks, in [`Check::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = Check> + '_ {
        Check::ALL.iter().copied().filter(|&c| self.contains(c))
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no VM-entry check violated");
        }
        for (i, c) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{c}")?;
            if c == Check::FieldUnwritten {
                if let Some(field) = self.unwritten {
                    write!(f, " ({} {field:#x})", crate::vmcs::field_name(field))?;
                }
            }
        }
        Ok(())
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_CET: u64 = 1 << 23;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Intel's architectural EFER bits: SCE, LME, LMA, NXE.
const EFER_DEFINED: u64 = 1 | EFER_LME | EFER_LMA | (1 << 11);
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_VM: u64 = 1 << 17;
const DEBUGCTL_BTF: u64 = 1 << 1;
const AR_UNUSABLE: u64 = 1 << 16;

/// Control bits whose own entry checks are not implemented (see the module documentation).
const PIN_NOT_MODELED: u64 = Pin::POSTED_INTERRUPTS.bits() as u64;
const PROC_NOT_MODELED: u64 = P::USE_TPR_SHADOW.bits() as u64 | (1 << 17);
const PROC2_NOT_MODELED: u64 = (S::VIRTUALIZE_APIC.bits()
    | S::UNRESTRICTED_GUEST.bits()
    | S::VMCS_SHADOWING.bits()
    | S::ENABLE_PML.bits()
    | S::EPT_VIOLATION_VE.bits()
    | S::MODE_BASED_EPT.bits()
    | S::SUB_PAGE_EPT.bits()
    | S::INTEL_PT_GUEST_PHYSICAL.bits()) as u64;
/// Load IA32_PERF_GLOBAL_CTRL, and bits 26 and up (load CET state, load PKRS, ...).
const EXIT_NOT_MODELED: u64 = Ex::LOAD_IA32_PERF_GLOBAL_CTRL.bits() as u64 | !((1 << 26) - 1);
/// Load IA32_PERF_GLOBAL_CTRL, BNDCFGS, RTIT_CTL, and bits 19 and up (CET, PKRS, ...).
const ENTRY_NOT_MODELED: u64 =
    (En::LOAD_IA32_PERF_GLOBAL_CTRL.bits() | En::LOAD_IA32_BNDCFGS.bits() | En::LOAD_IA32_RTIT_CTL.bits()) as u64
        | !((1 << 19) - 1);

/// Whether `v` is canonical for `bits`-bit linear addresses.
fn canonical(v: u64, bits: u32) -> bool {
    let s = 64 - bits;
    (((v << s) as i64) >> s) as u64 == v
}

fn linear_bits(cr4: u64) -> u32 {
    if cr4 & CR4_LA57 != 0 {
        57
    } else {
        48
    }
}

/// Every PAT entry is a valid memory type (0, 1, 4, 5, 6, 7).
fn pat_valid(pat: u64) -> bool {
    pat.to_le_bytes().iter().all(|&b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// Whether a 32-bit control value honours its capability (allowed0 bits set, nothing
/// outside allowed1).
fn ctl_ok(value: u64, caps: &crate::caps::CtlCaps) -> bool {
    let (a0, a1) = if caps.present { (caps.allowed0, caps.allowed1) } else { (0, 0) };
    let (a0, a1) = (a0 & 0xffff_ffff, a1 & 0xffff_ffff);
    value & a0 == a0 && value & !a1 == 0
}

/// G (bit 15) against the limit: G clear if limit bits 11:0 are not all ones, G set if any
/// of bits 31:20 is.
fn granularity_ok(limit: u64, ar: u64) -> bool {
    let g = ar & (1 << 15) != 0;
    !((limit & 0xfff != 0xfff && g) || (limit & 0xfff0_0000 != 0 && !g))
}

struct Reader<'a> {
    f: &'a Fields,
    v: Violations,
}

impl Reader<'_> {
    /// A field the CPU consults: 0 and [`Check::FieldUnwritten`] when never written.
    fn r(&mut self, field: u32) -> u64 {
        match self.f.get(field) {
            Some(v) => v,
            None => {
                self.v.add(Check::FieldUnwritten);
                self.v.unwritten.get_or_insert(field);
                0
            }
        }
    }
    /// Like [`Self::r`], but None when never written (the checks on it are skipped).
    fn opt(&mut self, field: u32) -> Option<u64> {
        let v = self.f.get(field);
        if v.is_none() {
            self.r(field);
        }
        v
    }
    fn fail(&mut self, c: Check, bad: bool) {
        if bad {
            self.v.add(c);
        }
    }
}

/// Applies the VM-entry checks (see the module documentation) to `fields` on `m`.
pub fn check(fields: &Fields, m: &Machine) -> Violations {
    let mut r = Reader { f: fields, v: Violations::default() };
    let caps = m.caps;
    let phys = m.phys_bits.clamp(1, 63) as u32;
    // Data structures a VMCS points to: 32 bits when IA32_VMX_BASIC[48] is set.
    let struct_phys = if caps.basic.is_some_and(|b| b.phys_addr_32bit) { phys.min(32) } else { phys };
    let beyond = |v: u64, bits: u32| v >> bits != 0;

    // --- 27.2.1.1 VM-execution control fields
    let pin = r.r(control::PINBASED_EXEC_CONTROLS);
    let proc = r.r(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    let p = |b: P| proc & b.bits() as u64 != 0;
    let secondary = p(P::SECONDARY_CONTROLS);
    // Without "activate secondary controls" the CPU treats them as 0 (and need not read them).
    let proc2 = if secondary { r.r(control::SECONDARY_PROCBASED_EXEC_CONTROLS) } else { 0 };
    let s = |b: S| proc2 & b.bits() as u64 != 0;
    r.fail(Check::PinReserved, !ctl_ok(pin, &caps.pin));
    r.fail(Check::ProcReserved, !ctl_ok(proc, &caps.proc));
    r.fail(Check::Proc2Reserved, secondary && !ctl_ok(proc2, &caps.proc2));
    let cr3_targets = r.r(control::CR3_TARGET_COUNT);
    let max_targets = caps.misc.map_or(0, |x| x.cr3_targets as u64);
    r.fail(Check::Cr3TargetCount, cr3_targets > max_targets);
    if p(P::USE_IO_BITMAPS) {
        let a = r.r(control::IO_BITMAP_A_ADDR_FULL);
        let b = r.r(control::IO_BITMAP_B_ADDR_FULL);
        r.fail(Check::IoBitmapAddress, [a, b].iter().any(|&x| x & 0xfff != 0 || beyond(x, struct_phys)));
    }
    if p(P::USE_MSR_BITMAPS) {
        let a = r.r(control::MSR_BITMAPS_ADDR_FULL);
        r.fail(Check::MsrBitmapAddress, a & 0xfff != 0 || beyond(a, struct_phys));
    }
    let apic_virt = (S::VIRTUALIZE_X2APIC | S::VIRTUALIZE_APIC_REGISTER | S::VIRTUAL_INTERRUPT_DELIVERY).bits() as u64;
    r.fail(Check::TprShadowDependents, !p(P::USE_TPR_SHADOW) && proc2 & apic_virt != 0);
    let pin_has = |b: Pin| pin & b.bits() as u64 != 0;
    r.fail(Check::VirtualNmisNeedNmiExiting, !pin_has(Pin::NMI_EXITING) && pin_has(Pin::VIRTUAL_NMIS));
    r.fail(Check::NmiWindowNeedsVirtualNmis, !pin_has(Pin::VIRTUAL_NMIS) && p(P::NMI_WINDOW_EXITING));
    r.fail(
        Check::VirtualInterruptDeliveryNeedsExtIntExiting,
        s(S::VIRTUAL_INTERRUPT_DELIVERY) && !pin_has(Pin::EXTERNAL_INTERRUPT_EXITING),
    );
    if s(S::ENABLE_VPID) {
        let vpid = r.r(control::VPID);
        r.fail(Check::VpidNotZero, vpid & 0xffff == 0);
    }
    let ept_on = s(S::ENABLE_EPT);
    if let Some(eptp) = if ept_on { r.opt(control::EPTP_FULL) } else { None } {
        let e = &caps.ept_vpid;
        let mt_ok = match eptp & 7 {
            0 => e.memtype_uc,
            6 => e.memtype_wb,
            _ => false,
        };
        r.fail(Check::EptpMemoryType, !mt_ok);
        let walk_ok = match (eptp >> 3) & 7 {
            3 => e.pwl4,
            4 => e.pwl5,
            _ => false,
        };
        r.fail(Check::EptpWalkLength, !walk_ok);
        r.fail(Check::EptpAccessedDirty, eptp & (1 << 6) != 0 && !e.ad_bits);
        let reserved = 0xf00 | if e.supervisor_shadow_stack { 0 } else { 1 << 7 };
        r.fail(Check::EptpReserved, eptp & reserved != 0 || beyond(eptp, phys));
    }
    r.fail(Check::UnrestrictedGuestNeedsEpt, s(S::UNRESTRICTED_GUEST) && !ept_on);
    if s(S::ENABLE_VM_FUNCTIONS) {
        let vmfunc = r.r(control::VM_FUNCTION_CONTROLS_FULL);
        r.fail(Check::VmFunctionControls, vmfunc & !caps.vmfunc != 0);
        if vmfunc & 1 != 0 {
            let list = r.r(control::EPTP_LIST_ADDR_FULL);
            r.fail(Check::EptpSwitching, !ept_on || list & 0xfff != 0 || beyond(list, phys));
        }
    }

    // --- 27.2.1.2 VM-exit control fields
    let exit = r.r(control::VMEXIT_CONTROLS);
    let x = |b: Ex| exit & b.bits() as u64 != 0;
    r.fail(Check::ExitReserved, !ctl_ok(exit, &caps.exit));
    r.fail(
        Check::SavePreemptionTimerNeedsTimer,
        !pin_has(Pin::VMX_PREEMPTION_TIMER) && x(Ex::SAVE_VMX_PREEMPTION_TIMER),
    );
    let msr_area = |r: &mut Reader, count: u32, addr: u32, c: Check| {
        let n = r.r(count);
        if n != 0 {
            let a = r.r(addr);
            let end = a.checked_add(n.saturating_mul(16)).map(|e| e - 1);
            r.fail(c, a & 0xf != 0 || end.is_none_or(|e| beyond(e, struct_phys)));
        }
    };
    msr_area(&mut r, control::VMEXIT_MSR_STORE_COUNT, control::VMEXIT_MSR_STORE_ADDR_FULL, Check::ExitMsrStoreArea);
    msr_area(&mut r, control::VMEXIT_MSR_LOAD_COUNT, control::VMEXIT_MSR_LOAD_ADDR_FULL, Check::ExitMsrLoadArea);

    // --- 27.2.1.3 VM-entry control fields
    let entry = r.r(control::VMENTRY_CONTROLS);
    let n = |b: En| entry & b.bits() as u64 != 0;
    r.fail(Check::EntryReserved, !ctl_ok(entry, &caps.entry));
    let intr = r.r(control::VMENTRY_INTERRUPTION_INFO_FIELD);
    let injecting = intr & (1 << 31) != 0;
    let (itype, vector) = ((intr >> 8) & 7, intr & 0xff);
    if injecting {
        r.fail(Check::EntryInterruptionReserved, intr & 0x7fff_f000 != 0);
        let mtf = caps.mtf();
        r.fail(Check::EntryInterruptionType, itype == 1 || (itype == 7 && !mtf));
        let vec_ok = match itype {
            2 => vector == 2,
            3 => vector <= 31,
            7 => vector == 0,
            _ => true,
        };
        r.fail(Check::EntryInterruptionVector, !vec_ok);
    }
    msr_area(&mut r, control::VMENTRY_MSR_LOAD_COUNT, control::VMENTRY_MSR_LOAD_ADDR_FULL, Check::EntryMsrLoadArea);
    r.fail(Check::EntrySmmControls, n(En::ENTRY_TO_SMM) || n(En::DEACTIVATE_DUAL_MONITOR));
    r.fail(
        Check::ControlNotModeled,
        pin & PIN_NOT_MODELED != 0
            || proc & PROC_NOT_MODELED != 0
            || proc2 & PROC2_NOT_MODELED != 0
            || exit & EXIT_NOT_MODELED != 0
            || entry & ENTRY_NOT_MODELED != 0,
    );

    // --- 27.2.2 host control registers and MSRs
    let hcr0 = r.r(host::CR0);
    let hcr3 = r.r(host::CR3);
    let hcr4 = r.r(host::CR4);
    let fixed = |v: u64, f: &crate::caps::CrFixed| !f.present || f.accepts(v);
    r.fail(Check::HostCr0Fixed, !fixed(hcr0, &caps.cr0_fixed));
    r.fail(Check::HostCr4Fixed, !fixed(hcr4, &caps.cr4_fixed));
    r.fail(Check::HostCr3Width, beyond(hcr3, phys));
    r.fail(Check::HostCetNeedsWp, hcr4 & CR4_CET != 0 && hcr0 & CR0_WP == 0);
    let hbits = linear_bits(hcr4);
    let (hesp, heip) = (r.r(host::IA32_SYSENTER_ESP), r.r(host::IA32_SYSENTER_EIP));
    r.fail(Check::HostSysenterCanonical, !canonical(hesp, hbits) || !canonical(heip, hbits));
    let host64 = x(Ex::HOST_ADDRESS_SPACE_SIZE);
    if x(Ex::LOAD_IA32_PAT) {
        let pat = r.r(host::IA32_PAT_FULL);
        r.fail(Check::HostPat, !pat_valid(pat));
    }
    if x(Ex::LOAD_IA32_EFER) {
        let efer = r.r(host::IA32_EFER_FULL);
        let lm = |b: u64| (efer & b != 0) == host64;
        r.fail(Check::HostEfer, efer & !EFER_DEFINED != 0 || !lm(EFER_LMA) || !lm(EFER_LME));
    }

    // --- 27.2.3 host segment and descriptor-table registers
    let hsel = [
        host::ES_SELECTOR,
        host::CS_SELECTOR,
        host::SS_SELECTOR,
        host::DS_SELECTOR,
        host::FS_SELECTOR,
        host::GS_SELECTOR,
        host::TR_SELECTOR,
    ]
    .map(|f| r.r(f));
    r.fail(Check::HostSelectorRplTi, hsel.iter().any(|&s| s & 7 != 0));
    r.fail(Check::HostCsTrNotNull, hsel[1] == 0 || hsel[6] == 0);
    r.fail(Check::HostSsNotNull, !host64 && hsel[2] == 0);
    let hbases = [host::FS_BASE, host::GS_BASE, host::GDTR_BASE, host::IDTR_BASE, host::TR_BASE].map(|f| r.r(f));
    r.fail(Check::HostBasesCanonical, hbases.iter().any(|&b| !canonical(b, hbits)));

    // --- 27.2.4 address-space size (kdbt launches from 64-bit mode)
    let ia32e = n(En::IA32E_MODE_GUEST);
    r.fail(Check::HostAddressSpaceSize, !host64);
    r.fail(Check::Ia32eGuestNeedsHost64, !host64 && ia32e);
    let hrip = r.r(host::RIP);
    r.fail(Check::HostPae, host64 && hcr4 & CR4_PAE == 0);
    r.fail(Check::HostRip, if host64 { !canonical(hrip, hbits) } else { hrip >> 32 != 0 });

    // --- 27.3.1.1 guest control registers, debug registers, MSRs
    let cr0 = r.r(guest::CR0);
    let cr3 = r.r(guest::CR3);
    let cr4 = r.r(guest::CR4);
    r.fail(Check::GuestCr0Fixed, !fixed(cr0, &caps.cr0_fixed));
    r.fail(Check::GuestCr0PgNeedsPe, cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0);
    r.fail(Check::GuestCr4Fixed, !fixed(cr4, &caps.cr4_fixed));
    r.fail(Check::GuestCetNeedsWp, cr4 & CR4_CET != 0 && cr0 & CR0_WP == 0);
    let debugctl = r.r(guest::IA32_DEBUGCTL_FULL);
    if n(En::LOAD_DEBUG_CONTROLS) {
        r.fail(Check::GuestDebugctl, debugctl & (0x3c | !0xffff) != 0);
        let dr7 = r.r(guest::DR7);
        r.fail(Check::GuestDr7, dr7 >> 32 != 0);
    }
    r.fail(Check::GuestIa32ePaging, ia32e && (cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0));
    r.fail(Check::GuestPcideNeedsIa32e, !ia32e && cr4 & CR4_PCIDE != 0);
    r.fail(Check::GuestCr3Width, beyond(cr3, phys));
    let gbits = linear_bits(cr4);
    let (gesp, geip) = (r.r(guest::IA32_SYSENTER_ESP), r.r(guest::IA32_SYSENTER_EIP));
    r.fail(Check::GuestSysenterCanonical, !canonical(gesp, gbits) || !canonical(geip, gbits));
    if n(En::LOAD_IA32_PAT) {
        let pat = r.r(guest::IA32_PAT_FULL);
        r.fail(Check::GuestPat, !pat_valid(pat));
    }
    if n(En::LOAD_IA32_EFER) {
        let efer = r.r(guest::IA32_EFER_FULL);
        r.fail(Check::GuestEferReserved, efer & !EFER_DEFINED != 0);
        let lma = efer & EFER_LMA != 0;
        let lme = efer & EFER_LME != 0;
        r.fail(Check::GuestEferLma, lma != ia32e || (cr0 & CR0_PG != 0 && lme != lma));
    }

    // --- 27.3.1.2 guest segment registers (ES, CS, SS, DS, FS, GS, LDTR, TR)
    let seg_fields = [
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
        (guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS),
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
        (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS),
        (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS),
    ];
    // (selector, base, limit, access rights)
    let seg = seg_fields.map(|(s, b, l, a)| (r.r(s), r.r(b), r.r(l), r.r(a)));
    let usable = |i: usize| seg[i].3 & AR_UNUSABLE == 0;
    let (es, cs, ss, ldtr, tr) = (0, 1, 2, 6, 7);
    let ty = |i: usize| seg[i].3 & 0xf;
    let dpl = |i: usize| (seg[i].3 >> 5) & 3;
    let rpl = |i: usize| seg[i].0 & 3;
    let rflags = r.r(guest::RFLAGS);
    r.fail(Check::GuestTrTi, seg[tr].0 & 4 != 0);
    r.fail(Check::GuestLdtrTi, usable(ldtr) && seg[ldtr].0 & 4 != 0);
    r.fail(Check::GuestSsRpl, rpl(ss) != rpl(cs));
    let canon_bad =
        [tr, 4, 5].iter().any(|&i| !canonical(seg[i].1, gbits)) || (usable(ldtr) && !canonical(seg[ldtr].1, gbits));
    r.fail(Check::GuestBasesCanonical, canon_bad);
    let high_bad = seg[cs].1 >> 32 != 0 || [ss, 3, es].iter().any(|&i| usable(i) && seg[i].1 >> 32 != 0);
    r.fail(Check::GuestBasesHigh, high_bad);
    // CS is checked whether or not it is marked unusable; the others only when usable.
    let code_data: [usize; 6] = [cs, ss, 3, es, 4, 5];
    let checked = |i: usize| i == cs || usable(i);
    r.fail(Check::GuestCsType, !matches!(ty(cs), 9 | 11 | 13 | 15));
    r.fail(Check::GuestSsType, usable(ss) && !matches!(ty(ss), 3 | 7));
    let data_bad = [3, es, 4, 5].iter().any(|&i| usable(i) && (ty(i) & 1 == 0 || (ty(i) & 8 != 0 && ty(i) & 2 == 0)));
    r.fail(Check::GuestDataType, data_bad);
    r.fail(Check::GuestSegmentS, code_data.iter().any(|&i| checked(i) && seg[i].3 & (1 << 4) == 0));
    let cs_dpl_bad = match ty(cs) {
        9 | 11 => dpl(cs) != dpl(ss),
        13 | 15 => dpl(cs) > dpl(ss),
        _ => false,
    };
    r.fail(Check::GuestCsDpl, cs_dpl_bad);
    r.fail(Check::GuestSsDpl, dpl(ss) != rpl(ss));
    r.fail(Check::GuestDataDpl, [3, es, 4, 5].iter().any(|&i| usable(i) && ty(i) <= 11 && dpl(i) < rpl(i)));
    r.fail(Check::GuestSegmentPresent, code_data.iter().any(|&i| checked(i) && seg[i].3 & (1 << 7) == 0));
    let ar_reserved = 0xf00 | 0xfffe_0000;
    r.fail(Check::GuestSegmentReserved, code_data.iter().any(|&i| checked(i) && seg[i].3 & ar_reserved != 0));
    r.fail(Check::GuestCsDb, ia32e && seg[cs].3 & (1 << 13) != 0 && seg[cs].3 & (1 << 14) != 0);
    r.fail(
        Check::GuestSegmentGranularity,
        code_data.iter().any(|&i| checked(i) && !granularity_ok(seg[i].2, seg[i].3)),
    );
    r.fail(Check::GuestTrType, if ia32e { ty(tr) != 11 } else { !matches!(ty(tr), 3 | 11) });
    r.fail(Check::GuestTrUsable, !usable(tr));
    let sys_bad = |i: usize| {
        let ar = seg[i].3;
        ar & (1 << 4) != 0
            || ar & (1 << 7) == 0
            || ar & 0xf00 != 0
            || ar & 0xfffe_0000 != 0
            || !granularity_ok(seg[i].2, ar)
    };
    r.fail(Check::GuestTrAccessRights, sys_bad(tr));
    r.fail(Check::GuestLdtrAccessRights, usable(ldtr) && (ty(ldtr) != 2 || sys_bad(ldtr)));

    // --- 27.3.1.3 GDTR, IDTR
    let dtr =
        [(guest::GDTR_BASE, guest::GDTR_LIMIT), (guest::IDTR_BASE, guest::IDTR_LIMIT)].map(|(b, l)| (r.r(b), r.r(l)));
    r.fail(Check::GuestDtrBases, dtr.iter().any(|d| !canonical(d.0, gbits)));
    r.fail(Check::GuestDtrLimits, dtr.iter().any(|d| d.1 >> 16 != 0));

    // --- 27.3.1.4 RIP, RFLAGS
    let rip = r.r(guest::RIP);
    let long_code = ia32e && seg[cs].3 & (1 << 13) != 0;
    r.fail(Check::GuestRip, if long_code { !canonical(rip, gbits) } else { rip >> 32 != 0 });
    let rf_reserved = !((1u64 << 22) - 1) | (1 << 15) | (1 << 5) | (1 << 3);
    r.fail(Check::GuestRflagsReserved, rflags & rf_reserved != 0 || rflags & 2 == 0);
    r.fail(Check::GuestRflagsVm, (ia32e || cr0 & CR0_PE == 0) && rflags & RFLAGS_VM != 0);
    r.fail(Check::GuestRflagsIf, injecting && itype == 0 && rflags & RFLAGS_IF == 0);

    // --- 27.3.1.5 non-register state
    let activity = r.r(guest::ACTIVITY_STATE);
    let intr_state = r.r(guest::INTERRUPTIBILITY_STATE);
    let pending = r.r(guest::PENDING_DBG_EXCEPTIONS);
    let link = r.r(guest::LINK_PTR_FULL);
    let misc = caps.misc;
    let supported = match activity {
        0 => true,
        1 => misc.is_some_and(|m| m.activity_hlt),
        2 => misc.is_some_and(|m| m.activity_shutdown),
        3 => misc.is_some_and(|m| m.activity_wait_sipi),
        _ => false,
    };
    r.fail(Check::GuestActivityState, !supported);
    r.fail(Check::GuestActivityHltDpl, activity == 1 && dpl(ss) != 0);
    let (sti, movss) = (intr_state & 1 != 0, intr_state & 2 != 0);
    r.fail(Check::GuestActivityBlocking, (sti || movss) && activity != 0);
    r.fail(Check::GuestInterruptibilityReserved, intr_state & !0x1f != 0);
    r.fail(Check::GuestInterruptibilityStiMovSs, sti && movss);
    r.fail(Check::GuestInterruptibilityStiIf, sti && rflags & RFLAGS_IF == 0);
    let inj_bad = injecting
        && ((itype == 0 || itype == 2) && (sti || movss)
            || (itype == 2 && pin_has(Pin::VIRTUAL_NMIS) && intr_state & 8 != 0));
    r.fail(Check::GuestInterruptibilityInjection, inj_bad);
    r.fail(Check::GuestInterruptibilitySmi, intr_state & 4 != 0);
    let pd_reserved = 0xff0 | (1 << 13) | (1 << 15) | !((1u64 << 17) - 1);
    r.fail(Check::GuestPendingDebugReserved, pending & pd_reserved != 0);
    if sti || movss || activity == 1 {
        let bs = pending & (1 << 14) != 0;
        let want = rflags & RFLAGS_TF != 0 && debugctl & DEBUGCTL_BTF == 0;
        r.fail(Check::GuestPendingDebugBs, bs != want);
    }
    if pending & (1 << 16) != 0 {
        r.fail(Check::GuestPendingDebugRtm, pending & 0xffff != 0x1000 || movss);
    }
    // kdbt has no shadow VMCS: any pointer other than all ones would have to name a VMCS
    // region with the revision identifier (and be aligned and in width), which none is.
    r.fail(Check::VmcsLinkPointer, link != u64::MAX || s(S::VMCS_SHADOWING));
    r.v
}

#[cfg(test)]
mod tests;
