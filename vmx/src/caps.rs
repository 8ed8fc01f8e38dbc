//! VMX capability reporting: the raw per-CPU values ([`RawCaps`], filled in the kernel by
//! [`RawCaps::read`] through the [`VmxHw`] trait and copied to user space unchanged) and
//! their decoding ([`VmxCaps::decode`], total: any bit pattern decodes without panicking).
//!
//! References: Intel SDM vol. 3, appendix A (VMX capability reporting facility) and
//! section 24.6/25.x (VM-execution controls).
use core::fmt::{self, Write};

use x86::msr;
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

/// IA32_VMX_PROCBASED_CTLS3 (not in the `x86` crate).
pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;

/// The only hardware access this crate needs. The kernel implements it; tests fake it.
pub trait VmxHw {
    /// RDMSR that returns `None` instead of faulting (#GP) for an unimplemented MSR.
    fn rdmsr_safe(&self, msr: u32) -> Option<u64>;
    /// CPUID `leaf`/`subleaf`, as `[eax, ebx, ecx, edx]`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// Current value of CR4.
    fn read_cr4(&self) -> u64;
}

/// Index into [`RawCaps::msrs`] of each MSR kdbt reads.
pub mod idx {
    pub const FEATURE_CONTROL: usize = 0;
    pub const BASIC: usize = 1;
    pub const PINBASED: usize = 2;
    pub const PROCBASED: usize = 3;
    pub const EXIT: usize = 4;
    pub const ENTRY: usize = 5;
    pub const MISC: usize = 6;
    pub const CR0_FIXED0: usize = 7;
    pub const CR0_FIXED1: usize = 8;
    pub const CR4_FIXED0: usize = 9;
    pub const CR4_FIXED1: usize = 10;
    pub const VMCS_ENUM: usize = 11;
    pub const PROCBASED2: usize = 12;
    pub const EPT_VPID_CAP: usize = 13;
    pub const TRUE_PINBASED: usize = 14;
    pub const TRUE_PROCBASED: usize = 15;
    pub const TRUE_EXIT: usize = 16;
    pub const TRUE_ENTRY: usize = 17;
    pub const VMFUNC: usize = 18;
    pub const PROCBASED3: usize = 19;
}

/// Number of MSRs in [`RawCaps::msrs`].
pub const MSR_COUNT: usize = 20;

/// `(index in RawCaps::msrs, MSR number, name)`, in index order: the kernel fills a
/// [`RawCaps`] with one loop over this table.
pub const MSR_TABLE: [(usize, u32, &str); MSR_COUNT] = [
    (idx::FEATURE_CONTROL, msr::IA32_FEATURE_CONTROL, "IA32_FEATURE_CONTROL"),
    (idx::BASIC, msr::IA32_VMX_BASIC, "IA32_VMX_BASIC"),
    (idx::PINBASED, msr::IA32_VMX_PINBASED_CTLS, "IA32_VMX_PINBASED_CTLS"),
    (idx::PROCBASED, msr::IA32_VMX_PROCBASED_CTLS, "IA32_VMX_PROCBASED_CTLS"),
    (idx::EXIT, msr::IA32_VMX_EXIT_CTLS, "IA32_VMX_EXIT_CTLS"),
    (idx::ENTRY, msr::IA32_VMX_ENTRY_CTLS, "IA32_VMX_ENTRY_CTLS"),
    (idx::MISC, msr::IA32_VMX_MISC, "IA32_VMX_MISC"),
    (idx::CR0_FIXED0, msr::IA32_VMX_CR0_FIXED0, "IA32_VMX_CR0_FIXED0"),
    (idx::CR0_FIXED1, msr::IA32_VMX_CR0_FIXED1, "IA32_VMX_CR0_FIXED1"),
    (idx::CR4_FIXED0, msr::IA32_VMX_CR4_FIXED0, "IA32_VMX_CR4_FIXED0"),
    (idx::CR4_FIXED1, msr::IA32_VMX_CR4_FIXED1, "IA32_VMX_CR4_FIXED1"),
    (idx::VMCS_ENUM, msr::IA32_VMX_VMCS_ENUM, "IA32_VMX_VMCS_ENUM"),
    (idx::PROCBASED2, msr::IA32_VMX_PROCBASED_CTLS2, "IA32_VMX_PROCBASED_CTLS2"),
    (idx::EPT_VPID_CAP, msr::IA32_VMX_EPT_VPID_CAP, "IA32_VMX_EPT_VPID_CAP"),
    (idx::TRUE_PINBASED, msr::IA32_VMX_TRUE_PINBASED_CTLS, "IA32_VMX_TRUE_PINBASED_CTLS"),
    (idx::TRUE_PROCBASED, msr::IA32_VMX_TRUE_PROCBASED_CTLS, "IA32_VMX_TRUE_PROCBASED_CTLS"),
    (idx::TRUE_EXIT, msr::IA32_VMX_TRUE_EXIT_CTLS, "IA32_VMX_TRUE_EXIT_CTLS"),
    (idx::TRUE_ENTRY, msr::IA32_VMX_TRUE_ENTRY_CTLS, "IA32_VMX_TRUE_ENTRY_CTLS"),
    (idx::VMFUNC, msr::IA32_VMX_VMFUNC, "IA32_VMX_VMFUNC"),
    (idx::PROCBASED3, IA32_VMX_PROCBASED_CTLS3, "IA32_VMX_PROCBASED_CTLS3"),
];

/// Raw capability values of one CPU, exactly as read. Plain old data with a fixed layout
/// (`#[repr(C)]`, only `u32`/`u64`, explicit padding, no implicit padding): it crosses the
/// kernel/user boundary as bytes.
///
/// | offset | field |
/// |---|---|
/// | 0 | `version` ([`RawCaps::VERSION`]) |
/// | 4 | `size` ([`RawCaps::SIZE`]) |
/// | 8 | `cpu` |
/// | 12 | `cpuid1_ecx` |
/// | 16 | `vendor` (CPUID.0: EBX, EDX, ECX: "GenuineIntel" in byte order) |
/// | 28 | `_pad0` |
/// | 32 | `cr4` |
/// | 40 | `msr_valid` (bit i set: `msrs[i]` was read without a fault) |
/// | 44 | `_pad1` |
/// | 48 | `msrs[MSR_COUNT]`, indexed as in [`MSR_TABLE`] |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCaps {
    pub version: u32,
    pub size: u32,
    pub cpu: u32,
    pub cpuid1_ecx: u32,
    pub vendor: [u32; 3],
    pub _pad0: u32,
    pub cr4: u64,
    pub msr_valid: u32,
    pub _pad1: u32,
    pub msrs: [u64; MSR_COUNT],
}

const _: () = assert!(core::mem::size_of::<RawCaps>() == RawCaps::SIZE);
const _: () = assert!(core::mem::align_of::<RawCaps>() == 8);
const _: () = assert!(core::mem::offset_of!(RawCaps, cr4) == 32);
const _: () = assert!(core::mem::offset_of!(RawCaps, msr_valid) == 40);
const _: () = assert!(core::mem::offset_of!(RawCaps, msrs) == 48);

impl Default for RawCaps {
    fn default() -> Self {
        RawCaps {
            version: Self::VERSION,
            size: Self::SIZE as u32,
            cpu: 0,
            cpuid1_ecx: 0,
            vendor: [0; 3],
            _pad0: 0,
            cr4: 0,
            msr_valid: 0,
            _pad1: 0,
            msrs: [0; MSR_COUNT],
        }
    }
}

impl RawCaps {
    /// Layout version; bump on any layout change.
    pub const VERSION: u32 = 1;
    /// Size in bytes.
    pub const SIZE: usize = 48 + 8 * MSR_COUNT;

    /// Reads this CPU's values. Must run on CPU `cpu` (the caller pins it). MSRs are read
    /// only when CPUID reports VMX (IA32_FEATURE_CONTROL is read regardless), and each
    /// read may fail without harm.
    pub fn read(hw: &impl VmxHw, cpu: u32) -> RawCaps {
        let mut r = RawCaps { cpu, ..RawCaps::default() };
        let v = hw.cpuid(0, 0);
        r.vendor = [v[1], v[3], v[2]];
        r.cpuid1_ecx = hw.cpuid(1, 0)[2];
        r.cr4 = hw.read_cr4();
        let vmx = r.cpuid1_ecx & CPUID1_ECX_VMX != 0;
        for &(i, msr, _) in MSR_TABLE.iter() {
            if !vmx && i != idx::FEATURE_CONTROL {
                continue;
            }
            if let Some(v) = hw.rdmsr_safe(msr) {
                r.set(i, v);
            }
        }
        r
    }

    /// Records `msrs[i] = value` and marks it valid (ignored when `i` is out of range).
    pub fn set(&mut self, i: usize, value: u64) {
        if i < MSR_COUNT {
            self.msrs[i] = value;
            self.msr_valid |= 1 << i;
        }
    }

    /// `msrs[i]` if it was read successfully.
    pub fn get(&self, i: usize) -> Option<u64> {
        (i < MSR_COUNT && self.msr_valid & (1 << i) != 0).then(|| self.msrs[i])
    }

    /// Every MSR as `(name, MSR number, value or None when the read failed)`.
    pub fn msrs(&self) -> impl Iterator<Item = (&'static str, u32, Option<u64>)> + '_ {
        MSR_TABLE.iter().map(move |&(i, msr, name)| (name, msr, self.get(i)))
    }

    /// The vendor string bytes ("GenuineIntel", "AuthenticAMD", ...).
    pub fn vendor_bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        for (k, w) in self.vendor.iter().enumerate() {
            b[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Parses bytes produced by [`RawCaps::as_bytes`] (native = little-endian x86 order).
    /// `None` unless the length is exactly [`RawCaps::SIZE`] and the version and size
    /// fields match.
    pub fn from_bytes(b: &[u8]) -> Option<RawCaps> {
        if b.len() != Self::SIZE {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
        let mut r = RawCaps {
            version: u32_at(0),
            size: u32_at(4),
            cpu: u32_at(8),
            cpuid1_ecx: u32_at(12),
            vendor: [u32_at(16), u32_at(20), u32_at(24)],
            _pad0: u32_at(28),
            cr4: u64_at(32),
            msr_valid: u32_at(40),
            _pad1: u32_at(44),
            msrs: [0; MSR_COUNT],
        };
        for (i, m) in r.msrs.iter_mut().enumerate() {
            *m = u64_at(48 + 8 * i);
        }
        (r.version == Self::VERSION && r.size as usize == Self::SIZE).then_some(r)
    }

    /// The struct's bytes, as they cross the kernel/user boundary.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: RawCaps is #[repr(C)] with only u32/u64 fields and explicit padding
        // fields (no implicit padding: checked by the const asserts above), so all SIZE
        // bytes are initialized; the slice borrows `self` and lives no longer than it.
        unsafe { core::slice::from_raw_parts(self as *const RawCaps as *const u8, Self::SIZE) }
    }
}

/// CPUID.1:ECX.VMX.
pub const CPUID1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX.SMX.
pub const CPUID1_ECX_SMX: u32 = 1 << 6;
/// CR4.VMXE.
pub const CR4_VMXE: u64 = 1 << 13;
/// CR4.FRED (flexible return and event delivery).
pub const CR4_FRED: u64 = 1 << 32;

/// IA32_FEATURE_CONTROL bits kdbt cares about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeatureControl {
    pub raw: u64,
    /// Bit 0: locked until reset.
    pub locked: bool,
    /// Bit 1: VMXON allowed inside SMX operation.
    pub vmxon_inside_smx: bool,
    /// Bit 2: VMXON allowed outside SMX operation.
    pub vmxon_outside_smx: bool,
}

/// Memory type of the VMCS/VMXON regions (IA32_VMX_BASIC\[53:50\]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasicMemType {
    Uc,
    Wb,
    /// Reserved encoding.
    Other(u8),
}

/// Decoded IA32_VMX_BASIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxBasic {
    pub raw: u64,
    /// Bits 30:0.
    pub revision_id: u32,
    /// Bits 44:32: bytes to allocate for VMXON/VMCS regions.
    pub vmcs_size: u32,
    /// Bit 48: region addresses limited to 32 bits.
    pub phys_addr_32bit: bool,
    /// Bit 49: dual-monitor treatment of SMIs/SMM.
    pub dual_monitor: bool,
    pub mem_type: BasicMemType,
    /// Bit 54: VM-exit instruction information reported for INS/OUTS.
    pub ins_outs_info: bool,
    /// Bit 55: the TRUE_*_CTLS MSRs exist and report default1 controls that may be 0.
    pub true_ctls: bool,
    /// Bit 56: VM entry may deliver hardware exceptions without an error code.
    pub no_err_code_required: bool,
}

impl VmxBasic {
    pub fn decode(raw: u64) -> VmxBasic {
        VmxBasic {
            raw,
            revision_id: (raw & 0x7fff_ffff) as u32,
            vmcs_size: ((raw >> 32) & 0x1fff) as u32,
            phys_addr_32bit: raw & (1 << 48) != 0,
            dual_monitor: raw & (1 << 49) != 0,
            mem_type: match (raw >> 50) & 0xf {
                0 => BasicMemType::Uc,
                6 => BasicMemType::Wb,
                t => BasicMemType::Other(t as u8),
            },
            ins_outs_info: raw & (1 << 54) != 0,
            true_ctls: raw & (1 << 55) != 0,
            no_err_code_required: raw & (1 << 56) != 0,
        }
    }
}

/// The state one control bit must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlState {
    MustBe0,
    Either,
    MustBe1,
    /// Must be 1 (allowed-0) yet may not be 1 (allowed-1): inconsistent report.
    Contradictory,
}

impl CtlState {
    pub fn as_str(self) -> &'static str {
        match self {
            CtlState::MustBe0 => "must-be-0",
            CtlState::Either => "may-be-either",
            CtlState::MustBe1 => "must-be-1",
            CtlState::Contradictory => "contradictory",
        }
    }
}

/// Which VM-execution/exit/entry control field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlKind {
    Pin,
    Proc,
    Proc2,
    Proc3,
    Exit,
    Entry,
}

impl CtlKind {
    pub const ALL: [CtlKind; 6] =
        [CtlKind::Pin, CtlKind::Proc, CtlKind::Proc2, CtlKind::Proc3, CtlKind::Exit, CtlKind::Entry];
    pub fn name(self) -> &'static str {
        match self {
            CtlKind::Pin => "pin-based",
            CtlKind::Proc => "primary processor-based",
            CtlKind::Proc2 => "secondary processor-based",
            CtlKind::Proc3 => "tertiary processor-based",
            CtlKind::Exit => "VM-exit",
            CtlKind::Entry => "VM-entry",
        }
    }
    /// Known bits of this field: `(bit mask, name)`.
    pub fn known_bits(self) -> &'static [(u64, &'static str)] {
        match self {
            CtlKind::Pin => PIN_BITS,
            CtlKind::Proc => PROC_BITS,
            CtlKind::Proc2 => PROC2_BITS,
            CtlKind::Proc3 => PROC3_BITS,
            CtlKind::Exit => EXIT_BITS,
            CtlKind::Entry => ENTRY_BITS,
        }
    }
}

macro_rules! bits32 {
    ($ty:ident: $($flag:ident),* $(,)?) => {
        &[$(($ty::$flag.bits() as u64, stringify!($flag))),*]
    };
}

static PIN_BITS: &[(u64, &str)] = bits32!(PinbasedControls:
    EXTERNAL_INTERRUPT_EXITING, NMI_EXITING, VIRTUAL_NMIS, VMX_PREEMPTION_TIMER, POSTED_INTERRUPTS);
static PROC_BITS: &[(u64, &str)] = &[
    (PrimaryControls::INTERRUPT_WINDOW_EXITING.bits() as u64, "INTERRUPT_WINDOW_EXITING"),
    (PrimaryControls::USE_TSC_OFFSETTING.bits() as u64, "USE_TSC_OFFSETTING"),
    (PrimaryControls::HLT_EXITING.bits() as u64, "HLT_EXITING"),
    (PrimaryControls::INVLPG_EXITING.bits() as u64, "INVLPG_EXITING"),
    (PrimaryControls::MWAIT_EXITING.bits() as u64, "MWAIT_EXITING"),
    (PrimaryControls::RDPMC_EXITING.bits() as u64, "RDPMC_EXITING"),
    (PrimaryControls::RDTSC_EXITING.bits() as u64, "RDTSC_EXITING"),
    (PrimaryControls::CR3_LOAD_EXITING.bits() as u64, "CR3_LOAD_EXITING"),
    (PrimaryControls::CR3_STORE_EXITING.bits() as u64, "CR3_STORE_EXITING"),
    (1 << 17, "ACTIVATE_TERTIARY_CONTROLS"),
    (PrimaryControls::CR8_LOAD_EXITING.bits() as u64, "CR8_LOAD_EXITING"),
    (PrimaryControls::CR8_STORE_EXITING.bits() as u64, "CR8_STORE_EXITING"),
    (PrimaryControls::USE_TPR_SHADOW.bits() as u64, "USE_TPR_SHADOW"),
    (PrimaryControls::NMI_WINDOW_EXITING.bits() as u64, "NMI_WINDOW_EXITING"),
    (PrimaryControls::MOV_DR_EXITING.bits() as u64, "MOV_DR_EXITING"),
    (PrimaryControls::UNCOND_IO_EXITING.bits() as u64, "UNCOND_IO_EXITING"),
    (PrimaryControls::USE_IO_BITMAPS.bits() as u64, "USE_IO_BITMAPS"),
    (PrimaryControls::MONITOR_TRAP_FLAG.bits() as u64, "MONITOR_TRAP_FLAG"),
    (PrimaryControls::USE_MSR_BITMAPS.bits() as u64, "USE_MSR_BITMAPS"),
    (PrimaryControls::MONITOR_EXITING.bits() as u64, "MONITOR_EXITING"),
    (PrimaryControls::PAUSE_EXITING.bits() as u64, "PAUSE_EXITING"),
    (PrimaryControls::SECONDARY_CONTROLS.bits() as u64, "SECONDARY_CONTROLS"),
];
static PROC2_BITS: &[(u64, &str)] = bits32!(SecondaryControls:
    VIRTUALIZE_APIC, ENABLE_EPT, DTABLE_EXITING, ENABLE_RDTSCP, VIRTUALIZE_X2APIC, ENABLE_VPID,
    WBINVD_EXITING, UNRESTRICTED_GUEST, VIRTUALIZE_APIC_REGISTER, VIRTUAL_INTERRUPT_DELIVERY,
    PAUSE_LOOP_EXITING, RDRAND_EXITING, ENABLE_INVPCID, ENABLE_VM_FUNCTIONS, VMCS_SHADOWING,
    ENCLS_EXITING, RDSEED_EXITING, ENABLE_PML, EPT_VIOLATION_VE, CONCEAL_VMX_FROM_PT,
    ENABLE_XSAVES_XRSTORS, MODE_BASED_EPT, SUB_PAGE_EPT, INTEL_PT_GUEST_PHYSICAL,
    USE_TSC_SCALING, ENABLE_USER_WAIT_PAUSE, ENCLV_EXITING);
/// Tertiary controls (SDM 25.6.2, table 25-8); not in the `x86` crate.
static PROC3_BITS: &[(u64, &str)] = &[
    (1 << 0, "LOADIWKEY_EXITING"),
    (1 << 1, "ENABLE_HLAT"),
    (1 << 2, "EPT_PAGING_WRITE_CONTROL"),
    (1 << 3, "GUEST_PAGING_VERIFICATION"),
    (1 << 4, "IPI_VIRTUALIZATION"),
    (1 << 7, "VIRTUALIZE_IA32_SPEC_CTRL"),
];
static EXIT_BITS: &[(u64, &str)] = bits32!(ExitControls:
    SAVE_DEBUG_CONTROLS, HOST_ADDRESS_SPACE_SIZE, LOAD_IA32_PERF_GLOBAL_CTRL,
    ACK_INTERRUPT_ON_EXIT, SAVE_IA32_PAT, LOAD_IA32_PAT, SAVE_IA32_EFER, LOAD_IA32_EFER,
    SAVE_VMX_PREEMPTION_TIMER, CLEAR_IA32_BNDCFGS, CONCEAL_VMX_FROM_PT, CLEAR_IA32_RTIT_CTL);
static ENTRY_BITS: &[(u64, &str)] = bits32!(EntryControls:
    LOAD_DEBUG_CONTROLS, IA32E_MODE_GUEST, ENTRY_TO_SMM, DEACTIVATE_DUAL_MONITOR,
    LOAD_IA32_PERF_GLOBAL_CTRL, LOAD_IA32_PAT, LOAD_IA32_EFER, LOAD_IA32_BNDCFGS,
    CONCEAL_VMX_FROM_PT, LOAD_IA32_RTIT_CTL);

/// Allowed settings of one control field. Bit set in `allowed0`: the control must be 1;
/// bit clear in `allowed1`: the control must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtlCaps {
    /// The MSR could be read (and, for secondary/tertiary, the field can be activated).
    pub present: bool,
    /// The values came from an IA32_VMX_TRUE_* MSR.
    pub from_true_msr: bool,
    /// Bits that must be 1 ("allowed-0 settings" clear).
    pub allowed0: u64,
    /// Bits that may be 1 ("allowed-1 settings").
    pub allowed1: u64,
}

impl CtlCaps {
    /// From a 32+32 capability MSR (low half: allowed-0, high half: allowed-1).
    fn from_pair(v: Option<u64>, from_true_msr: bool) -> CtlCaps {
        match v {
            Some(v) => CtlCaps { present: true, from_true_msr, allowed0: v & 0xffff_ffff, allowed1: v >> 32 },
            None => CtlCaps::default(),
        }
    }
    pub fn state(&self, mask: u64) -> CtlState {
        match (self.allowed0 & mask != 0, self.allowed1 & mask != 0) {
            (false, false) => CtlState::MustBe0,
            (false, true) => CtlState::Either,
            (true, true) => CtlState::MustBe1,
            (true, false) => CtlState::Contradictory,
        }
    }
    /// The control may be set to 1.
    pub fn may_set(&self, mask: u64) -> bool {
        self.present && self.allowed1 & mask == mask
    }
}

/// Decoded IA32_VMX_EPT_VPID_CAP (all false when not readable or neither EPT nor VPID can
/// be enabled, as the SDM says the MSR exists only then).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptVpidCaps {
    pub raw: u64,
    pub execute_only: bool,
    pub pwl4: bool,
    pub pwl5: bool,
    pub memtype_uc: bool,
    pub memtype_wb: bool,
    pub pages_2m: bool,
    pub pages_1g: bool,
    pub invept: bool,
    pub ad_bits: bool,
    pub advanced_exit_info: bool,
    pub supervisor_shadow_stack: bool,
    pub invept_single_context: bool,
    pub invept_all_context: bool,
    pub invvpid: bool,
    pub invvpid_individual_addr: bool,
    pub invvpid_single_context: bool,
    pub invvpid_all_context: bool,
    pub invvpid_single_context_retaining_globals: bool,
}

impl EptVpidCaps {
    pub fn decode(raw: u64) -> EptVpidCaps {
        let b = |n: u32| raw & (1u64 << n) != 0;
        EptVpidCaps {
            raw,
            execute_only: b(0),
            pwl4: b(6),
            pwl5: b(7),
            memtype_uc: b(8),
            memtype_wb: b(14),
            pages_2m: b(16),
            pages_1g: b(17),
            invept: b(20),
            ad_bits: b(21),
            advanced_exit_info: b(22),
            supervisor_shadow_stack: b(23),
            invept_single_context: b(25),
            invept_all_context: b(26),
            invvpid: b(32),
            invvpid_individual_addr: b(40),
            invvpid_single_context: b(41),
            invvpid_all_context: b(42),
            invvpid_single_context_retaining_globals: b(43),
        }
    }
}

/// Decoded IA32_VMX_MISC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMisc {
    pub raw: u64,
    /// Bits 4:0: the preemption timer counts down by 1 every 2^rate TSC ticks.
    pub preemption_timer_rate: u8,
    /// Bit 5: VM exits store EFER.LMA into the "IA-32e mode guest" entry control.
    pub store_lma: bool,
    /// Bits 8:6: activity states HLT, shutdown, wait-for-SIPI supported.
    pub activity_hlt: bool,
    pub activity_shutdown: bool,
    pub activity_wait_sipi: bool,
    /// Bit 14: Intel PT usable in VMX operation.
    pub pt_in_vmx: bool,
    /// Bits 24:16: number of CR3-target values.
    pub cr3_targets: u16,
    /// Bits 27:25: recommended maximum MSR-list entries = 512 * (N + 1).
    pub max_msr_list: u32,
    /// Bit 29: VMWRITE can write VM-exit information fields.
    pub vmwrite_any_field: bool,
    /// Bit 30: VM entry can inject software interrupts/exceptions with length 0.
    pub inject_zero_len: bool,
    /// Bits 63:32: MSEG revision.
    pub mseg_revision: u32,
}

impl VmxMisc {
    pub fn decode(raw: u64) -> VmxMisc {
        VmxMisc {
            raw,
            preemption_timer_rate: (raw & 0x1f) as u8,
            store_lma: raw & (1 << 5) != 0,
            activity_hlt: raw & (1 << 6) != 0,
            activity_shutdown: raw & (1 << 7) != 0,
            activity_wait_sipi: raw & (1 << 8) != 0,
            pt_in_vmx: raw & (1 << 14) != 0,
            cr3_targets: ((raw >> 16) & 0x1ff) as u16,
            max_msr_list: 512 * ((((raw >> 25) & 7) as u32) + 1),
            vmwrite_any_field: raw & (1 << 29) != 0,
            inject_zero_len: raw & (1 << 30) != 0,
            mseg_revision: (raw >> 32) as u32,
        }
    }
}

/// Fixed bits of a control register in VMX operation (IA32_VMX_CRn_FIXED0/1, A.7/A.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrFixed {
    pub present: bool,
    /// FIXED0: bits set here must be 1.
    pub fixed0: u64,
    /// FIXED1: bits clear here must be 0.
    pub fixed1: u64,
}

impl CrFixed {
    pub fn must_be_1(&self) -> u64 {
        self.fixed0
    }
    pub fn must_be_0(&self) -> u64 {
        !self.fixed1
    }
    /// Would `value` be valid in VMX operation? (`true` when unknown.)
    pub fn accepts(&self, value: u64) -> bool {
        !self.present || (value & self.fixed0 == self.fixed0 && value & !self.fixed1 == 0)
    }
}

/// Everything kdbt knows about one CPU's VMX support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    pub cpu: u32,
    pub vendor: [u8; 12],
    /// CPUID.1:ECX.VMX.
    pub vmx: bool,
    /// CPUID.1:ECX.SMX.
    pub smx: bool,
    pub cr4: u64,
    /// None when IA32_FEATURE_CONTROL could not be read.
    pub feature_control: Option<FeatureControl>,
    /// None when IA32_VMX_BASIC could not be read.
    pub basic: Option<VmxBasic>,
    pub pin: CtlCaps,
    pub proc: CtlCaps,
    pub proc2: CtlCaps,
    pub proc3: CtlCaps,
    pub exit: CtlCaps,
    pub entry: CtlCaps,
    pub misc: Option<VmxMisc>,
    pub cr0_fixed: CrFixed,
    pub cr4_fixed: CrFixed,
    /// IA32_VMX_VMCS_ENUM bits 9:1: highest index value used in VMCS field encodings.
    pub vmcs_max_index: Option<u16>,
    pub ept_vpid: EptVpidCaps,
    /// IA32_VMX_VMFUNC (0 when VM functions can't be enabled or the MSR is unreadable).
    pub vmfunc: u64,
}

const PROC_ACTIVATE_SECONDARY: u64 = 1 << 31;
const PROC_ACTIVATE_TERTIARY: u64 = 1 << 17;

impl VmxCaps {
    /// Decodes `raw`. Total: never panics, whatever the bits; missing MSRs decode as
    /// "not supported".
    pub fn decode(raw: &RawCaps) -> VmxCaps {
        let vmx = raw.cpuid1_ecx & CPUID1_ECX_VMX != 0;
        // Without CPUID.VMX, the VMX MSRs are meaningless: ignore whatever is there.
        let get = |i: usize| if vmx || i == idx::FEATURE_CONTROL { raw.get(i) } else { None };
        let basic = get(idx::BASIC).map(VmxBasic::decode);
        let use_true = basic.is_some_and(|b| b.true_ctls);
        let ctl = |plain: usize, tru: usize| {
            if use_true {
                if let Some(v) = get(tru) {
                    return CtlCaps::from_pair(Some(v), true);
                }
            }
            CtlCaps::from_pair(get(plain), false)
        };
        let pin = ctl(idx::PINBASED, idx::TRUE_PINBASED);
        let proc = ctl(idx::PROCBASED, idx::TRUE_PROCBASED);
        let exit = ctl(idx::EXIT, idx::TRUE_EXIT);
        let entry = ctl(idx::ENTRY, idx::TRUE_ENTRY);
        let proc2 = if proc.may_set(PROC_ACTIVATE_SECONDARY) {
            CtlCaps::from_pair(get(idx::PROCBASED2), false)
        } else {
            CtlCaps::default()
        };
        // Tertiary controls: a 64-bit allowed-1 mask; no bit is ever required (A.3.4).
        let proc3 = match get(idx::PROCBASED3) {
            Some(v) if proc.may_set(PROC_ACTIVATE_TERTIARY) => {
                CtlCaps { present: true, from_true_msr: false, allowed0: 0, allowed1: v }
            }
            _ => CtlCaps::default(),
        };
        let ept_or_vpid = proc2.may_set(SecondaryControls::ENABLE_EPT.bits() as u64)
            || proc2.may_set(SecondaryControls::ENABLE_VPID.bits() as u64);
        let ept_vpid = match get(idx::EPT_VPID_CAP) {
            Some(v) if ept_or_vpid => EptVpidCaps::decode(v),
            _ => EptVpidCaps::default(),
        };
        let vmfunc = match get(idx::VMFUNC) {
            Some(v) if proc2.may_set(SecondaryControls::ENABLE_VM_FUNCTIONS.bits() as u64) => v,
            _ => 0,
        };
        let fixed = |i0: usize, i1: usize| match (get(i0), get(i1)) {
            (Some(f0), Some(f1)) => CrFixed { present: true, fixed0: f0, fixed1: f1 },
            _ => CrFixed::default(),
        };
        VmxCaps {
            cpu: raw.cpu,
            vendor: raw.vendor_bytes(),
            vmx,
            smx: raw.cpuid1_ecx & CPUID1_ECX_SMX != 0,
            cr4: raw.cr4,
            feature_control: get(idx::FEATURE_CONTROL).map(|v| FeatureControl {
                raw: v,
                locked: v & 1 != 0,
                vmxon_inside_smx: v & 2 != 0,
                vmxon_outside_smx: v & 4 != 0,
            }),
            basic,
            pin,
            proc,
            proc2,
            proc3,
            exit,
            entry,
            misc: get(idx::MISC).map(VmxMisc::decode),
            cr0_fixed: fixed(idx::CR0_FIXED0, idx::CR0_FIXED1),
            cr4_fixed: fixed(idx::CR4_FIXED0, idx::CR4_FIXED1),
            vmcs_max_index: get(idx::VMCS_ENUM).map(|v| ((v >> 1) & 0x1ff) as u16),
            ept_vpid,
            vmfunc,
        }
    }

    /// The control field of `kind`.
    pub fn ctl(&self, kind: CtlKind) -> &CtlCaps {
        match kind {
            CtlKind::Pin => &self.pin,
            CtlKind::Proc => &self.proc,
            CtlKind::Proc2 => &self.proc2,
            CtlKind::Proc3 => &self.proc3,
            CtlKind::Exit => &self.exit,
            CtlKind::Entry => &self.entry,
        }
    }

    /// Vendor string (non-printable bytes shown as '?').
    pub fn vendor_str(&self) -> VendorStr {
        VendorStr(self.vendor)
    }

    fn p2(&self, f: SecondaryControls) -> bool {
        self.proc2.may_set(f.bits() as u64)
    }

    /// EPT can be enabled (secondary control "enable EPT" may be 1).
    pub fn ept(&self) -> bool {
        self.vmx && self.p2(SecondaryControls::ENABLE_EPT)
    }
    /// EPT execute-only translations.
    pub fn ept_execute_only(&self) -> bool {
        self.ept() && self.ept_vpid.execute_only
    }
    pub fn vpid(&self) -> bool {
        self.vmx && self.p2(SecondaryControls::ENABLE_VPID)
    }
    pub fn unrestricted_guest(&self) -> bool {
        self.ept() && self.p2(SecondaryControls::UNRESTRICTED_GUEST)
    }
    /// Monitor trap flag (primary bit 27).
    pub fn mtf(&self) -> bool {
        self.vmx && self.proc.may_set(PrimaryControls::MONITOR_TRAP_FLAG.bits() as u64)
    }
    /// VM function 0 (EPTP switching) usable.
    pub fn vmfunc_eptp(&self) -> bool {
        self.ept() && self.p2(SecondaryControls::ENABLE_VM_FUNCTIONS) && self.vmfunc & 1 != 0
    }
    /// EPT-violation #VE (secondary bit 18).
    pub fn ve(&self) -> bool {
        self.ept() && self.p2(SecondaryControls::EPT_VIOLATION_VE)
    }
    /// VMX-preemption timer (pin bit 6).
    pub fn preemption_timer(&self) -> bool {
        self.vmx && self.pin.may_set(PinbasedControls::VMX_PREEMPTION_TIMER.bits() as u64)
    }
    pub fn fc_locked(&self) -> bool {
        self.feature_control.is_some_and(|f| f.locked)
    }
    pub fn fc_outside_smx(&self) -> bool {
        self.feature_control.is_some_and(|f| f.vmxon_outside_smx)
    }

    /// One line for scripts; keys and order are fixed:
    /// `cpu=<n> vmx=<0|1> ept=<0|1> ept_xo=<0|1> vpid=<0|1> ug=<0|1> mtf=<0|1>
    /// vmfunc_eptp=<0|1> ve=<0|1> fc_locked=<0|1> fc_outside_smx=<0|1>`.
    pub fn summary(&self) -> Summary {
        let mut s = Summary { buf: [0; SUMMARY_CAP], len: 0 };
        let b = |x: bool| x as u8;
        // Cannot fail: the longest line (cpu=4294967295) is well under SUMMARY_CAP.
        let _ = write!(
            s,
            "cpu={} vmx={} ept={} ept_xo={} vpid={} ug={} mtf={} vmfunc_eptp={} ve={} fc_locked={} fc_outside_smx={}",
            self.cpu,
            b(self.vmx),
            b(self.ept()),
            b(self.ept_execute_only()),
            b(self.vpid()),
            b(self.unrestricted_guest()),
            b(self.mtf()),
            b(self.vmfunc_eptp()),
            b(self.ve()),
            b(self.fc_locked()),
            b(self.fc_outside_smx()),
        );
        s
    }
}

const SUMMARY_CAP: usize = 160;

/// The summary line, in a fixed buffer (no allocation); derefs to `str`.
#[derive(Clone, Copy)]
pub struct Summary {
    buf: [u8; SUMMARY_CAP],
    len: usize,
}

impl Summary {
    pub fn as_str(&self) -> &str {
        // Only whole `str`s are ever appended (see write_str), so this never fails.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Write for Summary {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        if end > SUMMARY_CAP {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl core::ops::Deref for Summary {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Displays a CPUID vendor string.
pub struct VendorStr([u8; 12]);

impl VendorStr {
    pub fn new(bytes: [u8; 12]) -> VendorStr {
        VendorStr(bytes)
    }
}

impl fmt::Display for VendorStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &c in self.0.iter() {
            f.write_char(if (0x20..0x7f).contains(&c) { c as char } else { '?' })?;
        }
        Ok(())
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

static CR0_NAMES: &[(u32, &str)] = &[
    (0, "PE"),
    (1, "MP"),
    (2, "EM"),
    (3, "TS"),
    (4, "ET"),
    (5, "NE"),
    (16, "WP"),
    (18, "AM"),
    (29, "NW"),
    (30, "CD"),
    (31, "PG"),
];
static CR4_NAMES: &[(u32, &str)] = &[
    (0, "VME"),
    (1, "PVI"),
    (2, "TSD"),
    (3, "DE"),
    (4, "PSE"),
    (5, "PAE"),
    (6, "MCE"),
    (7, "PGE"),
    (8, "PCE"),
    (9, "OSFXSR"),
    (10, "OSXMMEXCPT"),
    (11, "UMIP"),
    (12, "LA57"),
    (13, "VMXE"),
    (14, "SMXE"),
    (16, "FSGSBASE"),
    (17, "PCIDE"),
    (18, "OSXSAVE"),
    (19, "KL"),
    (20, "SMEP"),
    (21, "SMAP"),
    (22, "PKE"),
    (23, "CET"),
    (24, "PKS"),
    (25, "UINTR"),
    (27, "LASS"),
    (28, "LAM_SUP"),
    (32, "FRED"),
];

/// CR4 bits, shown by name (`bitN` for bits without one), separated by spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr4Bits(pub u64);

/// CR0 bits, shown as [`Cr4Bits`] shows CR4's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr0Bits(pub u64);

impl fmt::Display for Cr4Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        named_bits(f, self.0, CR4_NAMES)
    }
}

impl fmt::Display for Cr0Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        named_bits(f, self.0, CR0_NAMES)
    }
}

/// The set bits of `v` by name, space-separated; `(none)` for none.
fn named_bits(f: &mut fmt::Formatter<'_>, v: u64, names: &[(u32, &str)]) -> fmt::Result {
    let mut first = true;
    for bit in 0..64u32 {
        if v & (1u64 << bit) == 0 {
            continue;
        }
        if !first {
            f.write_str(" ")?;
        }
        first = false;
        match names.iter().find(|(b, _)| *b == bit) {
            Some((_, n)) => f.write_str(n)?,
            None => write!(f, "bit{bit}")?,
        }
    }
    if first {
        f.write_str("(none)")?;
    }
    Ok(())
}

fn write_bits(f: &mut fmt::Formatter<'_>, v: u64, names: &[(u32, &str)]) -> fmt::Result {
    let mut any = false;
    for bit in 0..64u32 {
        if v & (1u64 << bit) == 0 {
            continue;
        }
        match names.iter().find(|(b, _)| *b == bit) {
            Some((_, n)) => write!(f, " {n}")?,
            None => write!(f, " bit{bit}")?,
        }
        any = true;
    }
    if !any {
        f.write_str(" (none)")?;
    }
    Ok(())
}

impl fmt::Display for VmxCaps {
    /// Multi-line human-readable report of one CPU.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cpu {}: vendor {}", self.cpu, self.vendor_str())?;
        if !self.vmx {
            writeln!(f, "  no VT-x: CPUID.1:ECX.VMX is clear (vendor {})", self.vendor_str())?;
            return Ok(());
        }
        writeln!(f, "  CPUID.1:ECX.VMX: yes (SMX: {})", yn(self.smx))?;
        writeln!(
            f,
            "  CR4.VMXE when read: {}{}",
            yn(self.cr4 & CR4_VMXE != 0),
            if self.cr4 & CR4_VMXE != 0 { " (another hypervisor or KVM holds VMX)" } else { "" }
        )?;
        match self.feature_control {
            None => writeln!(f, "  IA32_FEATURE_CONTROL: unreadable")?,
            Some(fc) => writeln!(
                f,
                "  IA32_FEATURE_CONTROL = {:#x}: locked={} vmxon_inside_smx={} vmxon_outside_smx={}{}",
                fc.raw,
                yn(fc.locked),
                yn(fc.vmxon_inside_smx),
                yn(fc.vmxon_outside_smx),
                if fc.locked && !fc.vmxon_outside_smx {
                    " -> VMXON forbidden: enable VT-x in firmware setup"
                } else if !fc.locked {
                    " -> unlocked: kdbt must set bits 0 and 2 (lock) before VMXON"
                } else {
                    ""
                }
            )?,
        }
        match self.basic {
            None => writeln!(f, "  IA32_VMX_BASIC: unreadable")?,
            Some(b) => {
                writeln!(
                    f,
                    "  IA32_VMX_BASIC = {:#018x}: revision {:#x}, VMCS size {} bytes, memory type {}",
                    b.raw,
                    b.revision_id,
                    b.vmcs_size,
                    match b.mem_type {
                        BasicMemType::Uc => "UC",
                        BasicMemType::Wb => "WB",
                        BasicMemType::Other(_) => "reserved",
                    }
                )?;
                writeln!(
                    f,
                    "    32-bit phys addr limit: {}, dual-monitor SMM: {}, INS/OUTS info: {}, true controls: {}, no-error-code exceptions: {}",
                    yn(b.phys_addr_32bit),
                    yn(b.dual_monitor),
                    yn(b.ins_outs_info),
                    yn(b.true_ctls),
                    yn(b.no_err_code_required)
                )?;
            }
        }
        if let Some(n) = self.vmcs_max_index {
            writeln!(f, "  IA32_VMX_VMCS_ENUM: highest VMCS field index {n:#x}")?;
        }
        writeln!(f, "  features:")?;
        let e = &self.ept_vpid;
        let p2 = |c: SecondaryControls| yn(self.p2(c));
        writeln!(
            f,
            "    EPT: {}  execute-only: {}  4-level walk: {}  5-level walk: {}  UC: {}  WB: {}  2MB: {}  1GB: {}  A/D: {}",
            yn(self.ept()),
            yn(e.execute_only),
            yn(e.pwl4),
            yn(e.pwl5),
            yn(e.memtype_uc),
            yn(e.memtype_wb),
            yn(e.pages_2m),
            yn(e.pages_1g),
            yn(e.ad_bits)
        )?;
        writeln!(
            f,
            "    INVEPT: {} (single-context {}, all-context {})  advanced EPT exit info: {}  supervisor shadow stack: {}",
            yn(e.invept),
            yn(e.invept_single_context),
            yn(e.invept_all_context),
            yn(e.advanced_exit_info),
            yn(e.supervisor_shadow_stack)
        )?;
        writeln!(
            f,
            "    VPID: {}  INVVPID: {} (individual-address {}, single-context {}, all-context {}, single-context-retaining-globals {})",
            yn(self.vpid()),
            yn(e.invvpid),
            yn(e.invvpid_individual_addr),
            yn(e.invvpid_single_context),
            yn(e.invvpid_all_context),
            yn(e.invvpid_single_context_retaining_globals)
        )?;
        writeln!(
            f,
            "    unrestricted guest: {}  MTF: {}  #VE: {}  VMFUNC: {} (EPTP switching: {})  PML: {}  VMCS shadowing: {}",
            yn(self.unrestricted_guest()),
            yn(self.mtf()),
            yn(self.ve()),
            p2(SecondaryControls::ENABLE_VM_FUNCTIONS),
            yn(self.vmfunc_eptp()),
            p2(SecondaryControls::ENABLE_PML),
            p2(SecondaryControls::VMCS_SHADOWING)
        )?;
        writeln!(
            f,
            "    RDTSCP: {}  INVPCID: {}  XSAVES/XRSTORS: {}  MBEC: {}  TSC scaling: {}  user wait/pause: {}",
            p2(SecondaryControls::ENABLE_RDTSCP),
            p2(SecondaryControls::ENABLE_INVPCID),
            p2(SecondaryControls::ENABLE_XSAVES_XRSTORS),
            p2(SecondaryControls::MODE_BASED_EPT),
            p2(SecondaryControls::USE_TSC_SCALING),
            p2(SecondaryControls::ENABLE_USER_WAIT_PAUSE)
        )?;
        match self.misc {
            None => writeln!(f, "  IA32_VMX_MISC: unreadable")?,
            Some(m) => {
                write!(f, "    preemption timer: {}", yn(self.preemption_timer()))?;
                if self.preemption_timer() {
                    write!(f, " (ticks every 2^{} TSC cycles)", m.preemption_timer_rate)?;
                }
                writeln!(
                    f,
                    "  activity HLT/shutdown/wait-SIPI: {}/{}/{}  CR3 targets: {}  max MSR list: {}  VMWRITE any field: {}",
                    yn(m.activity_hlt),
                    yn(m.activity_shutdown),
                    yn(m.activity_wait_sipi),
                    m.cr3_targets,
                    m.max_msr_list,
                    yn(m.vmwrite_any_field)
                )?;
            }
        }
        for (name, fx, names) in [("CR0", &self.cr0_fixed, CR0_NAMES), ("CR4", &self.cr4_fixed, CR4_NAMES)] {
            if !fx.present {
                writeln!(f, "  {name} fixed bits: unreadable")?;
                continue;
            }
            write!(f, "  {name} in VMX operation: must be 1:")?;
            write_bits(f, fx.must_be_1(), names)?;
            write!(f, "; must be 0 (low 32 bits):")?;
            write_bits(f, fx.must_be_0() & 0xffff_ffff, names)?;
            writeln!(f)?;
        }
        if self.unrestricted_guest() {
            writeln!(f, "    (unrestricted guest lets the guest run with CR0.PE/PG clear)")?;
        }
        for kind in CtlKind::ALL {
            let c = self.ctl(kind);
            if !c.present {
                writeln!(f, "  {} controls: not available", kind.name())?;
                continue;
            }
            writeln!(
                f,
                "  {} controls{}: must-be-1 {:#x}, may-be-1 {:#x}",
                kind.name(),
                if c.from_true_msr { " (TRUE MSR)" } else { "" },
                c.allowed0,
                c.allowed1
            )?;
            for &(mask, name) in kind.known_bits() {
                writeln!(f, "    {:<28} {}", name, c.state(mask).as_str())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod profiles;
#[cfg(test)]
pub(crate) mod tests;
