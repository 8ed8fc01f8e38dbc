//! Launch preflight: may kdbt put this CPU in VMX root operation, with the features it
//! needs? Pure logic over [`VmxCaps`]; the kernel side gathers the inputs on each CPU.
use core::fmt;

use bitflags::bitflags;
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PrimaryControls, SecondaryControls};

use crate::caps::{Cr0Bits, Cr4Bits, VendorStr, VmxCaps, CR4_FRED, CR4_VMXE};

bitflags! {
    /// Named VMX features a caller can require. [`VmxCaps::features`] reports the
    /// available ones.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// CPUID.1:ECX.VMX.
        const VMX = 1 << 0;
        /// Controls: "use MSR bitmaps" may be 1.
        const MSR_BITMAPS = 1 << 1;
        /// "use I/O bitmaps" may be 1.
        const IO_BITMAPS = 1 << 2;
        /// "activate secondary controls" may be 1.
        const SECONDARY_CONTROLS = 1 << 3;
        /// Exit control "host address-space size" (64-bit host) may be 1.
        const HOST_64BIT = 1 << 4;
        /// Entry control "IA-32e mode guest" may be 1.
        const GUEST_64BIT = 1 << 5;
        /// Exit "save/load IA32_EFER" and entry "load IA32_EFER" may be 1.
        const EFER_SWITCH = 1 << 6;
        /// Exit "save/load IA32_PAT" and entry "load IA32_PAT" may be 1.
        const PAT_SWITCH = 1 << 7;
        /// "enable EPT".
        const EPT = 1 << 8;
        /// EPT 4-level page walk.
        const EPT_PWL4 = 1 << 9;
        /// EPT paging-structure memory type WB.
        const EPT_WB = 1 << 10;
        /// EPT execute-only translations.
        const EPT_EXECUTE_ONLY = 1 << 11;
        const EPT_2M = 1 << 12;
        const EPT_1G = 1 << 13;
        const EPT_AD = 1 << 14;
        /// INVEPT with the all-context type.
        const INVEPT_ALL = 1 << 15;
        /// INVEPT with the single-context type.
        const INVEPT_SINGLE = 1 << 16;
        /// "enable VPID".
        const VPID = 1 << 17;
        /// INVVPID with the all-context type.
        const INVVPID_ALL = 1 << 18;
        /// INVVPID with the single-context type.
        const INVVPID_SINGLE = 1 << 19;
        const UNRESTRICTED_GUEST = 1 << 20;
        /// Monitor trap flag.
        const MTF = 1 << 21;
        /// VM function 0, EPTP switching.
        const VMFUNC_EPTP = 1 << 22;
        /// EPT-violation #VE.
        const VE = 1 << 23;
        /// VMX-preemption timer.
        const PREEMPTION_TIMER = 1 << 24;
        /// "enable RDTSCP" (the guest kernel uses RDTSCP/RDPID: must not #UD).
        const RDTSCP = 1 << 25;
        /// "enable INVPCID".
        const INVPCID = 1 << 26;
        /// "enable XSAVES/XRSTORS".
        const XSAVES = 1 << 27;
        /// Entry/exit "load debug controls" may be 1.
        const DEBUG_CONTROLS = 1 << 28;
        /// "CR3-load exiting" and "CR3-store exiting" may be 1 (shadow paging).
        const CR3_EXITING = 1 << 29;
        /// "INVLPG exiting" may be 1 (shadow paging; with "enable INVPCID" it makes
        /// INVPCID exit too).
        const INVLPG_EXITING = 1 << 30;
    }
}

impl fmt::Display for Features {
    /// Names separated by spaces ("(none)" when empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, _) in self.iter_names() {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(name)?;
            first = false;
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

impl VmxCaps {
    /// The [`Features`] this CPU offers.
    pub fn features(&self) -> Features {
        let mut f = Features::empty();
        if !self.vmx {
            return f;
        }
        let e = &self.ept_vpid;
        let p = |m: PrimaryControls| self.proc.may_set(m.bits() as u64);
        let s = |m: SecondaryControls| self.proc2.may_set(m.bits() as u64);
        let x = |m: ExitControls| self.exit.may_set(m.bits() as u64);
        let n = |m: EntryControls| self.entry.may_set(m.bits() as u64);
        let ept = self.ept();
        let vpid = self.vpid();
        for (flag, ok) in [
            (Features::VMX, true),
            (Features::MSR_BITMAPS, p(PrimaryControls::USE_MSR_BITMAPS)),
            (Features::IO_BITMAPS, p(PrimaryControls::USE_IO_BITMAPS)),
            (Features::SECONDARY_CONTROLS, p(PrimaryControls::SECONDARY_CONTROLS)),
            (Features::HOST_64BIT, x(ExitControls::HOST_ADDRESS_SPACE_SIZE)),
            (Features::GUEST_64BIT, n(EntryControls::IA32E_MODE_GUEST)),
            (
                Features::EFER_SWITCH,
                x(ExitControls::SAVE_IA32_EFER | ExitControls::LOAD_IA32_EFER) && n(EntryControls::LOAD_IA32_EFER),
            ),
            (
                Features::PAT_SWITCH,
                x(ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT) && n(EntryControls::LOAD_IA32_PAT),
            ),
            (Features::EPT, ept),
            (Features::EPT_PWL4, ept && e.pwl4),
            (Features::EPT_WB, ept && e.memtype_wb),
            (Features::EPT_EXECUTE_ONLY, self.ept_execute_only()),
            (Features::EPT_2M, ept && e.pages_2m),
            (Features::EPT_1G, ept && e.pages_1g),
            (Features::EPT_AD, ept && e.ad_bits),
            (Features::INVEPT_ALL, ept && e.invept && e.invept_all_context),
            (Features::INVEPT_SINGLE, ept && e.invept && e.invept_single_context),
            (Features::VPID, vpid),
            (Features::INVVPID_ALL, vpid && e.invvpid && e.invvpid_all_context),
            (Features::INVVPID_SINGLE, vpid && e.invvpid && e.invvpid_single_context),
            (Features::UNRESTRICTED_GUEST, self.unrestricted_guest()),
            (Features::MTF, self.mtf()),
            (Features::VMFUNC_EPTP, self.vmfunc_eptp()),
            (Features::VE, self.ve()),
            (Features::PREEMPTION_TIMER, self.preemption_timer()),
            (Features::RDTSCP, s(SecondaryControls::ENABLE_RDTSCP)),
            (Features::INVPCID, s(SecondaryControls::ENABLE_INVPCID)),
            (Features::XSAVES, s(SecondaryControls::ENABLE_XSAVES_XRSTORS)),
            (Features::DEBUG_CONTROLS, x(ExitControls::SAVE_DEBUG_CONTROLS) && n(EntryControls::LOAD_DEBUG_CONTROLS)),
            (Features::CR3_EXITING, p(PrimaryControls::CR3_LOAD_EXITING | PrimaryControls::CR3_STORE_EXITING)),
            (Features::INVLPG_EXITING, p(PrimaryControls::INVLPG_EXITING)),
        ] {
            f.set(flag, ok);
        }
        f
    }
}

/// Why a CPU cannot be launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// CPUID.1:ECX.VMX is clear (or masked).
    NoVmx { vendor: [u8; 12] },
    /// CR4.VMXE is already set: someone else is in VMX operation.
    VmxAlreadyInUse,
    /// IA32_FEATURE_CONTROL is locked with "VMXON outside SMX" clear.
    FeatureControlLockedOff,
    /// IA32_FEATURE_CONTROL could not be read.
    FeatureControlUnreadable,
    /// IA32_VMX_BASIC or a control capability MSR could not be read.
    CapabilityMsrsUnreadable,
    /// IA32_VMX_BASIC reports a VMCS memory type other than WB (kdbt's allocations are WB).
    VmcsMemTypeNotWb,
    /// Required features that are absent (or masked).
    Missing(Features),
    /// CR4.FRED is set: with FRED, events in root mode would be delivered through the FRED
    /// MSRs, never through kdbt's host IDT.
    Fred,
    /// The kernel's CR4 has bits VMX operation on this CPU does not allow (IA32_VMX_CR4_FIXED0
    /// and FIXED1): launching would have to change them under the kernel. See
    /// [`cr4_disallowed`].
    Cr4Fixed(CrConflict),
    /// The kernel's CR0 has bits VMX operation does not allow (IA32_VMX_CR0_FIXED0 and
    /// FIXED1; PE and PG may be clear with unrestricted guest): launching would have to
    /// change them under the kernel. See [`cr0_disallowed`].
    Cr0Fixed(CrConflict),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoVmx { vendor } => {
                write!(f, "no VT-x: CPUID.1:ECX.VMX is clear (vendor {})", VendorStr::new(*vendor))
            }
            Refusal::VmxAlreadyInUse => {
                f.write_str("CR4.VMXE is already set: another hypervisor or KVM holds VMX (unload kvm_intel first)")
            }
            Refusal::FeatureControlLockedOff => f.write_str(
                "IA32_FEATURE_CONTROL is locked with VMXON outside SMX disabled: enable VT-x in the firmware setup",
            ),
            Refusal::FeatureControlUnreadable => f.write_str("IA32_FEATURE_CONTROL cannot be read"),
            Refusal::CapabilityMsrsUnreadable => {
                f.write_str("VMX capability MSRs (IA32_VMX_BASIC or control MSRs) cannot be read")
            }
            Refusal::VmcsMemTypeNotWb => f.write_str("IA32_VMX_BASIC reports a VMCS memory type other than write-back"),
            Refusal::Missing(m) => write!(f, "required VMX features missing: {m}"),
            Refusal::Fred => f.write_str(
                "CR4.FRED is set (FRED event delivery, Linux >= 6.9 on FRED hardware): events in root mode \
                 would bypass kdbt's host IDT (boot with fred=off)",
            ),
            Refusal::Cr4Fixed(c) => c.describe(f, "CR4", |f, v| write!(f, "{}", Cr4Bits(v))),
            Refusal::Cr0Fixed(c) => c.describe(f, "CR0", |f, v| write!(f, "{}", Cr0Bits(v))),
        }
    }
}

/// At most this many refusals are reported (one per [`Refusal`] variant).
pub const MAX_REFUSALS: usize = 10;

impl Refusal {
    /// The variant's place in [`Refusals`] (the order in which [`preflight`] checks;
    /// `Cr0Fixed`, last, only the launch checks).
    fn kind(&self) -> u32 {
        match self {
            Refusal::NoVmx { .. } => 0,
            Refusal::VmxAlreadyInUse => 1,
            Refusal::Fred => 2,
            Refusal::Cr4Fixed(_) => 3,
            Refusal::FeatureControlLockedOff => 4,
            Refusal::FeatureControlUnreadable => 5,
            Refusal::CapabilityMsrsUnreadable => 6,
            Refusal::VmcsMemTypeNotWb => 7,
            Refusal::Missing(_) => 8,
            Refusal::Cr0Fixed(_) => 9,
        }
    }
}

/// The reasons a CPU is refused, at most one of each variant, stored compactly (no
/// allocation): which variants are present, and their payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Refusals {
    /// Bit `Refusal::kind()`: that variant is present.
    kinds: u16,
    vendor: [u8; 12],
    missing: u64,
    cr4: CrConflict,
    cr0: CrConflict,
}

impl Refusals {
    /// Records `r`; a second refusal of the same variant replaces the first.
    fn push(&mut self, r: Refusal) {
        self.kinds |= 1 << r.kind();
        match r {
            Refusal::NoVmx { vendor } => self.vendor = vendor,
            Refusal::Missing(m) => self.missing = m.bits(),
            Refusal::Cr4Fixed(c) => self.cr4 = c,
            Refusal::Cr0Fixed(c) => self.cr0 = c,
            _ => {}
        }
    }
    fn get(&self, kind: u32) -> Option<Refusal> {
        if self.kinds & (1 << kind) == 0 {
            return None;
        }
        Some(match kind {
            0 => Refusal::NoVmx { vendor: self.vendor },
            1 => Refusal::VmxAlreadyInUse,
            2 => Refusal::Fred,
            3 => Refusal::Cr4Fixed(self.cr4),
            4 => Refusal::FeatureControlLockedOff,
            5 => Refusal::FeatureControlUnreadable,
            6 => Refusal::CapabilityMsrsUnreadable,
            7 => Refusal::VmcsMemTypeNotWb,
            9 => Refusal::Cr0Fixed(self.cr0),
            _ => Refusal::Missing(Features::from_bits_retain(self.missing)),
        })
    }
    /// The refusals, in the order preflight checks them.
    pub fn iter(&self) -> impl Iterator<Item = Refusal> + '_ {
        (0..MAX_REFUSALS as u32).filter_map(|k| self.get(k))
    }
    pub fn len(&self) -> usize {
        self.kinds.count_ones() as usize
    }
    pub fn is_empty(&self) -> bool {
        self.kinds == 0
    }
    pub fn contains(&self, r: &Refusal) -> bool {
        self.get(r.kind()).as_ref() == Some(r)
    }
}

impl fmt::Display for Refusals {
    /// One reason per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// What preflight checks against.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Features kdbt needs on this CPU.
    pub required: Features,
    /// Features to *pretend are missing* (test hook for the refusal paths, e.g. a module
    /// parameter `fake_missing=`): every flag set here is removed from what the CPU offers
    /// before checking. Masking [`Features::VMX`] makes the CPU look like one without VT-x
    /// ([`Refusal::NoVmx`]). `Features::empty()` in normal operation.
    pub mask: Features,
}

/// Outcome of a successful preflight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cleared {
    /// IA32_FEATURE_CONTROL is unlocked: before VMXON the caller must write it with bits 0
    /// (lock) and 2 (VMXON outside SMX) set, as firmware normally does (keeping other bits).
    pub needs_lock: bool,
    /// Features available after masking.
    pub available: Features,
}

/// The value to write to IA32_FEATURE_CONTROL when [`Cleared::needs_lock`] is set.
pub fn feature_control_lock_value(current: u64) -> u64 {
    current | 0b101
}

/// Bits of a control register (CR0 or CR4) that VMX operation does not allow as the
/// kernel has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CrConflict {
    /// Set in the register, but its IA32_VMX_CRn_FIXED1 has them clear (must be 0 in VMX
    /// operation).
    pub set_but_must_be_0: u64,
    /// Clear in the register, but its IA32_VMX_CRn_FIXED0 has them set (must be 1); for
    /// CR4, VMXE aside (kdbt sets it itself and hides it from the kernel).
    pub clear_but_must_be_1: u64,
}

impl CrConflict {
    pub fn is_empty(&self) -> bool {
        self.set_but_must_be_0 == 0 && self.clear_but_must_be_1 == 0
    }

    /// "`reg` bits the CPU's VMX does not allow: set but must be 0 ...; clear but must be
    /// 1 ...", the bits named by `names`.
    fn describe(
        &self,
        f: &mut fmt::Formatter<'_>,
        reg: &str,
        names: impl Fn(&mut fmt::Formatter<'_>, u64) -> fmt::Result,
    ) -> fmt::Result {
        write!(f, "{reg} bits the CPU's VMX does not allow:")?;
        if self.set_but_must_be_0 != 0 {
            f.write_str(" set but must be 0 in VMX operation: ")?;
            names(f, self.set_but_must_be_0)?;
        }
        if self.set_but_must_be_0 != 0 && self.clear_but_must_be_1 != 0 {
            f.write_str(";")?;
        }
        if self.clear_but_must_be_1 != 0 {
            f.write_str(" clear but must be 1 in VMX operation: ")?;
            names(f, self.clear_but_must_be_1)?;
        }
        Ok(())
    }
}

/// The bits of `cr4` (the kernel's CR4) that VMX operation with these fixed-bit MSRs
/// (`fixed0`: bits that must be 1, `fixed1`: bits that may be 1) does not allow. Launching
/// with a non-empty result would have to change CR4 under the kernel (clear a feature it
/// enabled, or set one it did not), so kdbt refuses instead.
pub fn cr4_disallowed(cr4: u64, fixed0: u64, fixed1: u64) -> CrConflict {
    CrConflict { set_but_must_be_0: cr4 & !fixed1, clear_but_must_be_1: fixed0 & !cr4 & !CR4_VMXE }
}

/// The bits of `cr0` (the kernel's CR0) that VMX operation with these fixed-bit MSRs does
/// not allow, as [`cr4_disallowed`] for CR4; `unrestricted_free` are the FIXED0 bits the
/// guest may have clear anyway (PE and PG with unrestricted guest). The launch used to
/// apply the fixed bits to the kernel's CR0 silently; it refuses instead.
pub fn cr0_disallowed(cr0: u64, fixed0: u64, fixed1: u64, unrestricted_free: u64) -> CrConflict {
    CrConflict { set_but_must_be_0: cr0 & !fixed1, clear_but_must_be_1: fixed0 & !unrestricted_free & !cr0 }
}

/// Checks whether this CPU can be launched. `cr4` is CR4 read on that CPU now (not the
/// value captured in the caps, which may be stale). All reasons are reported, not just the
/// first.
pub fn preflight(caps: &VmxCaps, cr4: u64, req: &Request) -> Result<Cleared, Refusals> {
    let mut refusals = Refusals::default();
    let available = caps.features() & !req.mask;
    let mut needs_lock = false;
    if !available.contains(Features::VMX) {
        refusals.push(Refusal::NoVmx { vendor: caps.vendor });
        // Nothing else is meaningful without VMX.
        return Err(refusals);
    }
    if cr4 & CR4_VMXE != 0 {
        refusals.push(Refusal::VmxAlreadyInUse);
    }
    if cr4 & CR4_FRED != 0 {
        refusals.push(Refusal::Fred);
    }
    if caps.cr4_fixed.present {
        // FRED has its own refusal above; the rest is named here.
        let c = cr4_disallowed(cr4 & !CR4_FRED, caps.cr4_fixed.fixed0, caps.cr4_fixed.fixed1);
        if !c.is_empty() {
            refusals.push(Refusal::Cr4Fixed(c));
        }
    }
    match caps.feature_control {
        None => refusals.push(Refusal::FeatureControlUnreadable),
        Some(fc) if fc.locked && !fc.vmxon_outside_smx => refusals.push(Refusal::FeatureControlLockedOff),
        Some(fc) => needs_lock = !fc.locked,
    }
    match caps.basic {
        None => refusals.push(Refusal::CapabilityMsrsUnreadable),
        Some(b) if b.mem_type != crate::caps::BasicMemType::Wb => refusals.push(Refusal::VmcsMemTypeNotWb),
        Some(_) if !(caps.pin.present && caps.proc.present && caps.exit.present && caps.entry.present) => {
            refusals.push(Refusal::CapabilityMsrsUnreadable)
        }
        Some(_) => {}
    }
    let missing = req.required & !available & !Features::VMX;
    if !missing.is_empty() {
        refusals.push(Refusal::Missing(missing));
    }
    if refusals.is_empty() {
        Ok(Cleared { needs_lock, available })
    } else {
        Err(refusals)
    }
}

/// The secondary controls a guest needs so that instructions this CPU executes natively
/// do not raise #UD in VMX non-root operation, from its CPUID (`cpuid(leaf, subleaf)` ->
/// EAX, EBX, ECX, EDX): RDTSCP and RDPID need "enable RDTSCP" (CPUID.80000001H:EDX[27],
/// CPUID.(7,0):ECX[22]), INVPCID needs "enable INVPCID" (CPUID.(7,0):EBX[10]), XSAVES
/// and XRSTORS need "enable XSAVES/XRSTORS" (CPUID.(0DH,1):EAX[3]). Adding these to
/// [`Request::required`] makes preflight refuse, naming the feature, a CPU whose VMX
/// cannot pass them through instead of letting the guest fault later.
pub fn native_needs(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Features {
    let max = cpuid(0, 0)[0];
    let max_ext = cpuid(0x8000_0000, 0)[0];
    let mut f = Features::empty();
    let (l7_ebx, l7_ecx) = if max >= 7 { (cpuid(7, 0)[1], cpuid(7, 0)[2]) } else { (0, 0) };
    let ext_edx = if max_ext >= 0x8000_0001 { cpuid(0x8000_0001, 0)[3] } else { 0 };
    if ext_edx & (1 << 27) != 0 || l7_ecx & (1 << 22) != 0 {
        f |= Features::RDTSCP;
    }
    if l7_ebx & (1 << 10) != 0 {
        f |= Features::INVPCID;
    }
    if max >= 0xd && cpuid(0xd, 1)[0] & (1 << 3) != 0 {
        f |= Features::XSAVES;
    }
    f
}

#[cfg(test)]
mod tests;
