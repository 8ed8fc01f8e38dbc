//! kdbt's choice of VMX controls for a launch: what every CPU must offer
//! ([`REQUIRED`], [`REQUIRED_SHADOW`]), which optional controls are switched on when
//! present, and the resulting [`Controls`] (the same on every CPU of a machine). Pure
//! logic over [`VmxCaps`]; the kernel side runs [`crate::preflight::preflight`] on each
//! CPU and then [`choose_controls`].
use core::fmt;

use x86::vmx::vmcs::control::{
    EntryControls as En, ExitControls as Ex, PinbasedControls as Pin, PrimaryControls as P, SecondaryControls as S,
};

use crate::caps::{CtlKind, VmxCaps};
use crate::controls::{adjust_kind, MissingBits};
use crate::preflight::Features;
use crate::shadow_exit::FlushCaps;
use crate::vmcs::ControlsIn;

/// VMX controls and fixed bits chosen for a CPU (identical on all CPUs of a machine; each
/// CPU computes its own and they are checked for equality).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    pub revision: u32,
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// CR0 bits the guest may clear (PE, PG with unrestricted guest; unused: 0).
    pub cr0_unrestricted_free: u64,
    pub vpid: u32,
    pub vpid_base: u16,
    /// NMI virtualization: "NMI exiting" + "virtual NMIs" on, NMI-window exiting usable.
    pub vnmi: bool,
    pub eptp: u64,
    pub host_cr3: u64,
    /// EPT capabilities (for building the map once, and for the CPUID state leaf).
    pub ept: ept::EptCaps,
    /// Shadow paging instead of EPT (`kdbt load --paging shadow`).
    pub shadow: bool,
    /// INVVPID types the shadow MMU's flushes may use.
    pub flush: FlushCaps,
    /// EPT-violation #VE may be switched on ([`crate::hypercall::Call::VeControl`]): EPT
    /// mode and the CPU allows secondary control bit 18.
    pub ve: bool,
}

/// What kdbt needs of every CPU. Optional features Linux may use natively (RDTSCP,
/// INVPCID, XSAVES, user wait/pause) and VPID are enabled when present, so no guest
/// instruction faults that would not fault natively.
pub const REQUIRED_BASE: Features = Features::VMX
    .union(Features::MSR_BITMAPS)
    .union(Features::SECONDARY_CONTROLS)
    .union(Features::HOST_64BIT)
    .union(Features::GUEST_64BIT)
    .union(Features::EFER_SWITCH)
    .union(Features::PAT_SWITCH)
    .union(Features::DEBUG_CONTROLS);
/// What EPT mode needs on top of [`REQUIRED_BASE`].
pub const REQUIRED: Features =
    REQUIRED_BASE.union(Features::EPT).union(Features::EPT_PWL4).union(Features::EPT_WB).union(Features::INVEPT_ALL);
/// What shadow paging needs on top of [`REQUIRED_BASE`]: CR3-load/store exiting, INVLPG
/// exiting (INVPCID exits through it), and VPID with single-context INVVPID for the shadow
/// MMU's TLB flushes (all-context for the launch).
pub const REQUIRED_SHADOW: Features = REQUIRED_BASE
    .union(Features::CR3_EXITING)
    .union(Features::INVLPG_EXITING)
    .union(Features::VPID)
    .union(Features::INVVPID_SINGLE)
    .union(Features::INVVPID_ALL);

/// The features a launch in this paging mode requires.
pub fn required(shadow: bool) -> Features {
    if shadow {
        REQUIRED_SHADOW
    } else {
        REQUIRED
    }
}

/// Why no controls could be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChooseError {
    /// Wanted bits the CPU does not allow.
    Missing(MissingBits),
    /// EPT mode, but the CPU forces CR3-load/store exiting on.
    ForcedCr3Exiting,
}

impl fmt::Display for ChooseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChooseError::Missing(m) => write!(f, "{m}"),
            ChooseError::ForcedCr3Exiting => {
                f.write_str("this CPU forces CR3-load/store exiting (no TRUE controls); kdbt needs them off")
            }
        }
    }
}

impl From<MissingBits> for ChooseError {
    fn from(m: MissingBits) -> Self {
        ChooseError::Missing(m)
    }
}

/// Picks the VMCS controls for a CPU that passed preflight with `avail` features. EPT is
/// not switched on here: [`Controls::enable_ept`] does it once the identity map exists.
pub fn choose_controls(caps: &VmxCaps, avail: Features, shadow: bool) -> Result<Controls, ChooseError> {
    let mut want = P::USE_MSR_BITMAPS | P::SECONDARY_CONTROLS;
    if shadow {
        want |= P::CR3_LOAD_EXITING | P::CR3_STORE_EXITING | P::INVLPG_EXITING;
    }
    let proc = adjust_kind(CtlKind::Proc, &caps.proc, want.bits() as u64)?;
    if !shadow && proc & (P::CR3_LOAD_EXITING | P::CR3_STORE_EXITING).bits() as u64 != 0 {
        return Err(ChooseError::ForcedCr3Exiting);
    }
    let mut want2 = S::empty();
    for (f, c) in [
        (Features::RDTSCP, S::ENABLE_RDTSCP),
        (Features::INVPCID, S::ENABLE_INVPCID),
        (Features::XSAVES, S::ENABLE_XSAVES_XRSTORS),
    ] {
        if avail.contains(f) {
            want2 |= c;
        }
    }
    if caps.proc2.may_set(S::ENABLE_USER_WAIT_PAUSE.bits() as u64) {
        want2 |= S::ENABLE_USER_WAIT_PAUSE;
    }
    // NMI virtualization when the CPU offers all three controls: guest NMIs exit and are
    // re-injected, and an NMI that cannot be delivered yet (the guest blocks NMIs, or it
    // arrived in root mode) gets the NMI window instead of waiting for some later exit.
    let nmi_pin = (Pin::NMI_EXITING | Pin::VIRTUAL_NMIS).bits() as u64;
    let vnmi = caps.pin.may_set(nmi_pin) && caps.proc.may_set(P::NMI_WINDOW_EXITING.bits() as u64);
    let vpid = avail.contains(Features::VPID | Features::INVVPID_ALL);
    if vpid {
        want2 |= S::ENABLE_VPID;
    }
    let exit = Ex::HOST_ADDRESS_SPACE_SIZE
        | Ex::SAVE_DEBUG_CONTROLS
        | Ex::SAVE_IA32_PAT
        | Ex::LOAD_IA32_PAT
        | Ex::SAVE_IA32_EFER
        | Ex::LOAD_IA32_EFER;
    let entry = En::LOAD_DEBUG_CONTROLS | En::IA32E_MODE_GUEST | En::LOAD_IA32_PAT | En::LOAD_IA32_EFER;
    Ok(Controls {
        revision: caps.basic.map_or(0, |b| b.revision_id),
        pin: adjust_kind(CtlKind::Pin, &caps.pin, if vnmi { nmi_pin } else { 0 })? as u32,
        proc: proc as u32,
        proc2: adjust_kind(CtlKind::Proc2, &caps.proc2, want2.bits() as u64)? as u32,
        exit: adjust_kind(CtlKind::Exit, &caps.exit, exit.bits() as u64)? as u32,
        entry: adjust_kind(CtlKind::Entry, &caps.entry, entry.bits() as u64)? as u32,
        cr0_fixed0: caps.cr0_fixed.fixed0,
        cr0_fixed1: if caps.cr0_fixed.present { caps.cr0_fixed.fixed1 } else { u64::MAX },
        cr4_fixed0: caps.cr4_fixed.fixed0,
        cr4_fixed1: if caps.cr4_fixed.present { caps.cr4_fixed.fixed1 } else { u64::MAX },
        cr0_unrestricted_free: 0,
        vpid: vpid as u32,
        vpid_base: 1,
        vnmi,
        eptp: 0,
        host_cr3: 0,
        ept: ept::EptCaps::from_ept_vpid_cap(caps.ept_vpid.raw),
        shadow,
        flush: FlushCaps {
            individual_addr: caps.ept_vpid.invvpid_individual_addr,
            retaining_globals: caps.ept_vpid.invvpid_single_context_retaining_globals,
            ignore_user_invlpg: false,
        },
        ve: !shadow && caps.ve(),
    })
}

impl Controls {
    /// Switches EPT on with the identity map's EPT pointer (EPT mode, once the map exists).
    pub fn enable_ept(&mut self, eptp: u64) {
        self.eptp = eptp;
        self.proc2 |= S::ENABLE_EPT.bits();
    }

    /// CR0 in VMX operation for a CPU whose CR0 is `cr0` now: the fixed bits applied.
    pub fn vmx_cr0(&self, cr0: u64) -> u64 {
        (cr0 | self.cr0_fixed0) & self.cr0_fixed1
    }

    /// The controls part of a launch's [`crate::vmcs::LaunchState`] for `cpu`, whose MSR
    /// bitmap is at `msr_bitmap_pa`: VPID `vpid_base + cpu` when VPID is on, the EPT
    /// pointer when EPT is on.
    pub fn launch_controls(&self, cpu: u32, msr_bitmap_pa: u64) -> ControlsIn {
        ControlsIn {
            pin: self.pin,
            proc: self.proc,
            proc2: self.proc2,
            exit: self.exit,
            entry: self.entry,
            cr0_fixed0: self.cr0_fixed0,
            cr0_unrestricted_free: self.cr0_unrestricted_free,
            cr4_fixed0: self.cr4_fixed0,
            vpid: (self.vpid != 0).then(|| self.vpid_base.wrapping_add(cpu as u16)),
            eptp: (self.eptp != 0).then_some(self.eptp),
            msr_bitmap_pa,
            shadow: self.shadow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{profiles::PROFILES, tests::profile_raw, RawCaps};
    use crate::preflight::{preflight, Request};

    extern crate std;
    use std::string::ToString;

    fn caps_of(raw: &RawCaps) -> VmxCaps {
        VmxCaps::decode(raw)
    }

    /// What the kernel's load path does for one CPU: preflight, then the choice.
    fn chosen(raw: &RawCaps, shadow: bool) -> Result<Controls, ChooseError> {
        let caps = caps_of(raw);
        let req = Request { required: required(shadow), mask: Features::empty() };
        let cleared = preflight(&caps, raw.cr4, &req).expect("profile passes preflight");
        choose_controls(&caps, cleared.available, shadow)
    }

    #[test]
    fn bochs_ept_mode() {
        let raw = profile_raw(&PROFILES[0]);
        let c = chosen(&raw, false).unwrap();
        assert_eq!(c.revision, 0x2b);
        // TRUE controls: the default1 bits only, plus what kdbt wants.
        assert_eq!(c.proc as u64, (P::USE_MSR_BITMAPS | P::SECONDARY_CONTROLS).bits() as u64 | 0x0400_6172);
        assert_eq!(c.proc & (P::CR3_LOAD_EXITING | P::CR3_STORE_EXITING).bits(), 0);
        // Bochs has NMI exiting, virtual NMIs and NMI-window exiting.
        assert!(c.vnmi);
        assert_eq!(c.pin, 0x16 | (Pin::NMI_EXITING | Pin::VIRTUAL_NMIS).bits());
        let want2 = S::ENABLE_RDTSCP | S::ENABLE_INVPCID | S::ENABLE_XSAVES_XRSTORS | S::ENABLE_VPID;
        assert_eq!(c.proc2, want2.bits(), "no EPT until the map exists; no user wait/pause in Bochs");
        assert_eq!(c.vpid, 1);
        assert_eq!(c.vpid_base, 1);
        assert_eq!(
            (c.cr0_fixed0, c.cr0_fixed1, c.cr4_fixed0, c.cr4_fixed1),
            (0x8000_0021, 0xffff_ffff, 0x2000, 0x37_27ff)
        );
        assert!(c.ept.pages_1g && c.ept.wb_allowed && c.ept.ad_bits && c.ept.execute_only);
        assert!(c.flush.individual_addr && c.flush.retaining_globals);
        assert_eq!(c.entry & En::IA32E_MODE_GUEST.bits(), En::IA32E_MODE_GUEST.bits());
        assert_eq!(c.exit & Ex::HOST_ADDRESS_SPACE_SIZE.bits(), Ex::HOST_ADDRESS_SPACE_SIZE.bits());
        let mut e = c;
        e.enable_ept(0x1234_501e);
        assert_eq!((e.eptp, e.proc2), (0x1234_501e, c.proc2 | S::ENABLE_EPT.bits()));
    }

    #[test]
    fn bochs_shadow_mode() {
        let raw = profile_raw(&PROFILES[0]);
        let c = chosen(&raw, true).unwrap();
        let cr3 = (P::CR3_LOAD_EXITING | P::CR3_STORE_EXITING | P::INVLPG_EXITING).bits();
        assert_eq!(c.proc & cr3, cr3);
        assert!(c.shadow);
        assert_eq!(c.eptp, 0);
        assert_eq!(c.proc2 & S::ENABLE_EPT.bits(), 0);
    }

    #[test]
    fn launch_controls_per_cpu() {
        let raw = profile_raw(&PROFILES[0]);
        let mut c = chosen(&raw, false).unwrap();
        let l = c.launch_controls(3, 0x7a0_3000);
        assert_eq!((l.vpid, l.eptp, l.msr_bitmap_pa, l.shadow), (Some(4), None, 0x7a0_3000, false));
        c.enable_ept(0x5000_001e);
        c.vpid = 0;
        let l = c.launch_controls(3, 0x7a0_3000);
        assert_eq!((l.vpid, l.eptp), (None, Some(0x5000_001e)));
        assert_eq!(c.vmx_cr0(0x33), 0x8000_0033);
    }

    #[test]
    fn without_true_controls_cr3_exiting_is_forced_and_refused() {
        // The same CPU without IA32_VMX_BASIC[55]: the non-TRUE PROCBASED MSR forces
        // CR3-load/store exiting (bits 15, 16 of its allowed-0 half).
        let mut raw = profile_raw(&PROFILES[0]);
        let basic = crate::caps::idx::BASIC;
        let v = raw.get(basic).unwrap();
        raw.set(basic, v & !(1 << 55));
        let caps = caps_of(&raw);
        let avail = caps.features();
        assert_eq!(choose_controls(&caps, avail, false), Err(ChooseError::ForcedCr3Exiting));
        assert_eq!(
            ChooseError::ForcedCr3Exiting.to_string(),
            "this CPU forces CR3-load/store exiting (no TRUE controls); kdbt needs them off"
        );
        // Shadow paging wants them anyway.
        assert!(choose_controls(&caps, avail, true).is_ok());
    }

    #[test]
    fn a_missing_wanted_control_is_named() {
        let raw = profile_raw(&PROFILES[0]);
        let mut caps = caps_of(&raw);
        caps.exit.allowed1 &= !(Ex::LOAD_IA32_PAT.bits() as u64);
        let e = choose_controls(&caps, caps.features(), false).unwrap_err();
        assert!(matches!(e, ChooseError::Missing(m) if m.kind == Some(CtlKind::Exit)), "{e:?}");
        assert!(e.to_string().contains("LOAD_IA32_PAT"), "{e}");
    }
}
