//! Launch preflight: may kdbt put this CPU in VMX root operation, with the features it
//! needs? Pure logic over [`VmxCaps`]; the kernel side gathers the inputs on each CPU.
use core::fmt;

use bitflags::bitflags;
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PrimaryControls, SecondaryControls};

use crate::caps::{VendorStr, VmxCaps, CR4_VMXE};

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
        }
    }
}

/// At most this many refusals are reported (one per [`Refusal`] variant).
pub const MAX_REFUSALS: usize = 7;

/// The reasons a CPU is refused, in a fixed-capacity list (no allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Refusals {
    items: [Option<Refusal>; MAX_REFUSALS],
}

impl Refusals {
    fn push(&mut self, r: Refusal) {
        if let Some(slot) = self.items.iter_mut().find(|s| s.is_none()) {
            *slot = Some(r);
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = &Refusal> {
        self.items.iter().flatten()
    }
    pub fn len(&self) -> usize {
        self.iter().count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, r: &Refusal) -> bool {
        self.iter().any(|x| x == r)
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

/// Checks whether this CPU can be launched. `cr4_vmxe` is CR4.VMXE read on that CPU now
/// (not the value captured in the caps, which may be stale). All reasons are reported, not
/// just the first.
pub fn preflight(caps: &VmxCaps, cr4_vmxe: bool, req: &Request) -> Result<Cleared, Refusals> {
    let mut refusals = Refusals::default();
    let available = caps.features() & !req.mask;
    let mut needs_lock = false;
    if !available.contains(Features::VMX) {
        refusals.push(Refusal::NoVmx { vendor: caps.vendor });
        // Nothing else is meaningful without VMX.
        return Err(refusals);
    }
    if cr4_vmxe {
        refusals.push(Refusal::VmxAlreadyInUse);
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

/// Convenience: [`preflight`] with CR4.VMXE taken from the caps' CR4 snapshot.
pub fn preflight_snapshot(caps: &VmxCaps, req: &Request) -> Result<Cleared, Refusals> {
    preflight(caps, caps.cr4 & CR4_VMXE != 0, req)
}

#[cfg(test)]
mod tests;
