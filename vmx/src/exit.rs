//! VM-exit handling: what the hypervisor does for each exit reason, written against the
//! [`ExitHw`] trait so that every path is unit-tested on the host with a fake VMCS.
//!
//! The kernel side's assembly stub saves the guest's general-purpose registers into a
//! [`GuestRegs`] on the host stack and calls its handler, which calls [`handle`] and acts on
//! the returned [`Action`]. Nothing here may fault, allocate or call the kernel: it runs in
//! VMX root mode with interrupts off.
//!
//! Every VMREAD and VMWRITE is checked ([`Vmcs`]: each returns a `Result`): the first one
//! that fails ends the exit's handling right there, with `?`, before anything acts on the
//! value, and [`handle`] turns it into [`Fatal::Vmcs`] naming the field and the
//! VM-instruction error; nothing is ever read as 0. On the hot path this costs one branch
//! per access on the flags VMREAD/VMWRITE set anyway.
use core::sync::atomic::{AtomicU64, Ordering};

use x86::vmx::vmcs::{control, guest, ro};

use crate::hypercall::{self, Call, Decoded};
use crate::vmcs::{VmFail, Vmcs, VmcsError};

/// Guest general-purpose registers in the order the exit stub pushes them (RSP is in the
/// VMCS). `#[repr(C)]`: the assembly depends on this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl GuestRegs {
    /// General-purpose register by its encoding (0 = RAX … 15 = R15); RSP (4) is `None`
    /// because it lives in the VMCS.
    pub(crate) fn gpr(&mut self, n: u8) -> Option<&mut u64> {
        Some(match n & 15 {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => return None,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        })
    }
}

/// What the exit handler needs from the hardware (VMX root mode): the current VMCS, with
/// checked accesses ([`Vmcs`]), and the instructions root mode executes for the guest.
pub trait ExitHw: Vmcs {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// XSETBV of a value [`crate::xsave::check_xsetbv`] accepted; false if it faulted
    /// anyway (#GP).
    fn xsetbv(&mut self, xcr: u32, value: u64) -> bool;
    fn wbinvd(&mut self);
    /// RDMSR/WRMSR with a fault fixup; None/false if the access faulted.
    fn rdmsr_safe(&mut self, msr: u32) -> Option<u64>;
    fn wrmsr_safe(&mut self, msr: u32, value: u64) -> bool;
    /// INVEPT all-context: drops every EPT-derived translation this CPU caches.
    fn invept_all(&mut self);
    /// Serves [`Call::EptSetPerms`], [`Call::EptQuery`] and [`Call::EptRemap`] (arguments:
    /// the guest's RBX and RCX, `rcx` used by [`Call::EptRemap`] only; returns the guest's
    /// RAX). Root mode holds the EPT tables, hidden from the guest; without a map (shadow
    /// paging, tests) they are unsupported.
    fn ept_call(&mut self, call: Call, rbx: u64, rcx: u64) -> u64 {
        let _ = (call, rbx, rcx);
        hypercall::ERR_UNSUPPORTED
    }
}

/// Basic exit reasons (SDM Vol. 3C, Appendix C) that kdbt names in its statistics.
pub mod reason {
    pub const EXCEPTION_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INIT: u32 = 3;
    pub const SIPI: u32 = 4;
    pub const NMI_WINDOW: u32 = 8;
    pub const CPUID: u32 = 10;
    pub const GETSEC: u32 = 11;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const INVLPG: u32 = 14;
    pub const VMCALL: u32 = 18;
    pub const VMCLEAR: u32 = 19;
    pub const VMXON: u32 = 27;
    pub const CR_ACCESS: u32 = 28;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u32 = 33;
    pub const ENTRY_FAIL_MSR_LOAD: u32 = 34;
    pub const MTF: u32 = 37;
    pub const ENTRY_FAIL_MCE: u32 = 41;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIG: u32 = 49;
    pub const INVEPT: u32 = 50;
    pub const INVVPID: u32 = 53;
    pub const XSETBV: u32 = 55;
    pub const INVPCID: u32 = 58;
    pub const VMFUNC: u32 = 59;
    /// Not an exit reason: the exit's reason field could not be read (counted in the last
    /// slot of the counters).
    pub const UNREADABLE: u32 = u32::MAX;
    /// Size of per-reason counter arrays.
    pub const COUNT: usize = 80;
}

/// Human name of a basic exit reason.
pub fn reason_name(r: u32) -> &'static str {
    match r {
        0 => "exception/NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT",
        4 => "SIPI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "CR access",
        29 => "DR access",
        30 => "I/O",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "entry failure (guest state)",
        34 => "entry failure (MSR load)",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "entry failure (machine check)",
        43 => "TPR below threshold",
        44 => "APIC access",
        46 => "GDTR/IDTR access",
        47 => "LDTR/TR access",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "preemption timer",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        61 => "RDSEED",
        63 => "XSAVES",
        64 => "XRSTORS",
        reason::UNREADABLE => "unreadable",
        _ => "other",
    }
}

/// Why the hypervisor cannot continue the guest normally; carried to a diagnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fatal {
    /// The guest triple-faulted (it would have reset natively).
    TripleFault,
    /// EPT violation on an access the EPT should allow, or where kdbt has no handler.
    EptViolation,
    EptMisconfig,
    /// An exit reason kdbt never enables or cannot handle.
    Unexpected,
    /// VM entry failed (exit reason bit 31): the guest did not run; it cannot be resumed.
    EntryFailed,
    /// The shadow MMU could not handle an exit (shadow paging; the error is reported
    /// beside the diagnostic).
    ShadowMmu,
    /// A VMREAD or VMWRITE failed while handling the exit (or settling the next entry, or
    /// reading the state to devirtualize): the handler stopped there.
    Vmcs(VmcsError),
}

impl Fatal {
    /// Whether the guest can still be entered, to hand it the diagnostic (an NMI that
    /// makes it panic): not after a triple fault or a failed entry, nor without a current
    /// VMCS (VMfailInvalid). A field that failed with VMfailValid leaves the VMCS usable.
    pub fn resumable(self) -> bool {
        !matches!(self, Fatal::TripleFault | Fatal::EntryFailed | Fatal::Vmcs(VmcsError { fail: VmFail::Invalid, .. }))
    }
}

/// A diagnostic snapshot of a fatal exit, formatted later outside root mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Diag {
    pub reason: u32,
    pub qualification: u64,
    pub guest_rip: u64,
    pub guest_rsp: u64,
    pub guest_cr3: u64,
    pub guest_physical: u64,
    pub guest_linear: u64,
    /// The fields above whose VMREAD failed ([`Diag::QUALIFICATION`] ...): 0 here, and
    /// shown as unreadable, never as a value.
    pub unreadable: u8,
}

impl Diag {
    pub const QUALIFICATION: u8 = 1 << 0;
    pub const RIP: u8 = 1 << 1;
    pub const RSP: u8 = 1 << 2;
    pub const CR3: u8 = 1 << 3;
    pub const PHYSICAL: u8 = 1 << 4;
    pub const LINEAR: u8 = 1 << 5;

    /// Whether the field of `bit` was read.
    pub fn readable(&self, bit: u8) -> bool {
        self.unreadable & bit == 0
    }
}

/// What the exit stub does after [`handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// VMRESUME.
    Resume,
    /// Leave VMX operation on this CPU and continue the guest natively (RIP already past
    /// the VMCALL, RAX = OK).
    Devirtualize,
    /// Cannot continue: the caller records `Diag` and makes the guest panic cleanly.
    Fatal(Fatal, Diag),
}

/// Per-CPU facts and live state the handler reads and updates: owned by that CPU's root
/// mode (nothing else reads it while the CPU is virtualized). The statistics other CPUs
/// read meanwhile are kept apart, in [`ExitCounters`].
#[derive(Clone, Debug)]
pub struct ExitCtx {
    /// kdbt's index of this CPU (reported in CPUID 0x40000001 ECX).
    pub cpu: u32,
    /// STATE_* bits for CPUID 0x40000001 EBX.
    pub state: u32,
    /// NMI virtualization is on ("NMI exiting" and "virtual NMIs", NMI-window exiting
    /// available): guest NMIs exit, and one that cannot be delivered yet waits for the
    /// NMI window.
    pub vnmi: bool,
    /// An NMI for the guest (from an NMI exit, or one that hit root mode) not delivered yet.
    pub nmi_pending: bool,
    /// Basic reason of the exit [`handle`] handled last.
    pub last_reason: u32,
}

impl ExitCtx {
    pub fn new(cpu: u32, state: u32) -> Self {
        ExitCtx { cpu, state, vnmi: false, nmi_pending: false, last_reason: 0 }
    }
}

/// Exit statistics of one CPU. Only that CPU's root mode writes them (one writer, so an
/// increment is a relaxed load and store, no locked instruction); any CPU may read them at
/// any time with [`ExitCounters::snapshot`]. Each counter is exact and never torn; a
/// snapshot taken while the CPU takes exits may mix counters from before and after one.
#[derive(Debug)]
pub struct ExitCounters {
    /// Exits by basic reason (index >= COUNT counted in the last slot).
    counts: [AtomicU64; reason::COUNT],
    total: AtomicU64,
    /// EptInvalidate hypercalls served.
    inveptions: AtomicU64,
    /// NMIs injected into the guest.
    nmis_injected: AtomicU64,
}

/// A copy of [`ExitCounters`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStats {
    pub counts: [u64; reason::COUNT],
    pub total: u64,
    pub inveptions: u64,
    pub nmis_injected: u64,
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitCounters {
    pub const fn new() -> Self {
        ExitCounters {
            counts: [const { AtomicU64::new(0) }; reason::COUNT],
            total: AtomicU64::new(0),
            inveptions: AtomicU64::new(0),
            nmis_injected: AtomicU64::new(0),
        }
    }

    /// Adds one. Only the owning CPU calls this (single writer).
    fn bump(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// Counts one exit of basic reason `basic`.
    pub fn count_exit(&self, basic: u32) {
        Self::bump(&self.total);
        Self::bump(&self.counts[(basic as usize).min(reason::COUNT - 1)]);
    }

    pub fn count_invept(&self) {
        Self::bump(&self.inveptions);
    }

    pub fn count_nmi_injected(&self) {
        Self::bump(&self.nmis_injected);
    }

    /// Exits taken so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> ExitStats {
        ExitStats {
            counts: core::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            total: self.total.load(Ordering::Relaxed),
            inveptions: self.inveptions.load(Ordering::Relaxed),
            nmis_injected: self.nmis_injected.load(Ordering::Relaxed),
        }
    }
}

use crate::caps::CR4_VMXE;
const RFLAGS_RF: u64 = 1 << 16;

/// VM-entry interruption types.
const INTR_TYPE_NMI: u32 = 2 << 8;
const INTR_TYPE_HW_EXCEPTION: u32 = 3 << 8;
const INTR_TYPE_MASK: u32 = 7 << 8;
/// Interruptibility state: blocking by STI, by MOV SS, by NMI (virtual-NMI blocking
/// when "virtual NMIs" is on).
const BLOCKS_NMI: u64 = 0b1011;
/// Primary processor-based control "NMI-window exiting".
pub const NMI_WINDOW_EXITING: u64 = 1 << 22;
const INTR_VALID: u32 = 1 << 31;
const INTR_DELIVER_ERROR_CODE: u32 = 1 << 11;

pub const VECTOR_UD: u8 = 6;
pub const VECTOR_GP: u8 = 13;

/// Queues a hardware exception for delivery at the next VM entry. The instruction that
/// caused the exit is not skipped (faults report the faulting instruction).
pub fn inject_exception(hw: &mut impl ExitHw, vector: u8, error_code: Option<u32>) -> Result<(), VmcsError> {
    let mut info = INTR_VALID | INTR_TYPE_HW_EXCEPTION | vector as u32;
    if let Some(code) = error_code {
        info |= INTR_DELIVER_ERROR_CODE;
        hw.write(control::VMENTRY_EXCEPTION_ERR_CODE, code as u64)?;
    }
    hw.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info as u64)
}

const RFLAGS_TF: u64 = 1 << 8;
/// IA32_DEBUGCTL.BTF: TF single-steps on branches only.
const DEBUGCTL_BTF: u64 = 1 << 1;
/// Pending debug exceptions, BS: a single-step trap is pending (SDM Vol. 3C, 25.4.2).
pub const PENDING_DBG_BS: u64 = 1 << 14;

/// Whether an instruction kdbt completed on the guest's behalf owes the guest a
/// single-step trap: RFLAGS.TF was set when it began (the instruction that sets TF, e.g.
/// POPF, only traps after its successor, and it never exits), unless IA32_DEBUGCTL.BTF
/// restricts single-stepping to branches (CPUID, XSETBV, VMCALL, RDMSR/WRMSR, INVD and
/// MOV to CR are no branches).
pub fn owes_single_step(rflags: u64, debugctl: u64) -> bool {
    rflags & RFLAGS_TF != 0 && debugctl & DEBUGCTL_BTF == 0
}

/// Skips the instruction that caused the exit, as its native completion would: clears RF
/// and STI/MOV-SS blocking, and with RFLAGS.TF set leaves the guest its single-step #DB
/// (BS in the pending debug exceptions: the CPU delivers the #DB right after VM entry, with
/// DR6.BS, as it would natively after the instruction).
pub fn advance_rip(hw: &mut impl ExitHw) -> Result<(), VmcsError> {
    let len = hw.read(ro::VMEXIT_INSTRUCTION_LEN)?;
    let rip = hw.read(guest::RIP)?;
    let rflags = hw.read(guest::RFLAGS)?;
    let intr = hw.read(guest::INTERRUPTIBILITY_STATE)?;
    // The VM exit saved the guest's IA32_DEBUGCTL ("save debug controls", required).
    let debugctl = hw.read(guest::IA32_DEBUGCTL_FULL)?;
    hw.write(guest::RIP, rip.wrapping_add(len))?;
    if rflags & RFLAGS_RF != 0 {
        hw.write(guest::RFLAGS, rflags & !RFLAGS_RF)?;
    }
    if intr & 0x3 != 0 {
        hw.write(guest::INTERRUPTIBILITY_STATE, intr & !0x3)?;
    }
    if owes_single_step(rflags, debugctl) {
        let pending = hw.read(guest::PENDING_DBG_EXCEPTIONS)?;
        hw.write(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_DBG_BS)?;
    }
    Ok(())
}

/// Current privilege level of the guest: SS.DPL (SDM 5.5; equals CS.RPL in 64-bit mode).
pub fn guest_cpl(hw: &impl ExitHw) -> Result<u8, VmcsError> {
    Ok(((hw.read(guest::SS_ACCESS_RIGHTS)? >> 5) & 3) as u8)
}

/// The diagnostic of a fatal exit of basic reason `reason`, read as far as the VMCS lets
/// it be read: a field that cannot be read is marked [`Diag::unreadable`].
pub fn diag(hw: &impl ExitHw, reason: u32) -> Diag {
    let mut unreadable = 0;
    let mut get = |field, bit| {
        hw.read(field).unwrap_or_else(|_| {
            unreadable |= bit;
            0
        })
    };
    let mut d = Diag {
        reason,
        qualification: get(ro::EXIT_QUALIFICATION, Diag::QUALIFICATION),
        guest_rip: get(guest::RIP, Diag::RIP),
        guest_rsp: get(guest::RSP, Diag::RSP),
        guest_cr3: get(guest::CR3, Diag::CR3),
        guest_physical: get(ro::GUEST_PHYSICAL_ADDR_FULL, Diag::PHYSICAL),
        guest_linear: get(ro::GUEST_LINEAR_ADDR, Diag::LINEAR),
        unreadable: 0,
    };
    d.unreadable = unreadable;
    d
}

/// The fatal outcome of a failed VMCS access `e` during an exit of basic reason `reason`.
pub fn vmcs_fatal(hw: &impl ExitHw, reason: u32, e: VmcsError) -> Action {
    Action::Fatal(Fatal::Vmcs(e), diag(hw, reason))
}

/// Handles one VM exit. A failed VMREAD or VMWRITE ends it as [`Fatal::Vmcs`].
pub fn handle(hw: &mut impl ExitHw, regs: &mut GuestRegs, ctx: &mut ExitCtx, stats: &ExitCounters) -> Action {
    let full = hw.read(ro::EXIT_REASON).map(|f| f as u32);
    let basic = full.map_or(reason::UNREADABLE, |f| f & 0xffff);
    ctx.last_reason = basic;
    stats.count_exit(basic);
    full.and_then(|full| dispatch(hw, regs, ctx, stats, full)).unwrap_or_else(|e| vmcs_fatal(hw, basic, e))
}

fn dispatch(
    hw: &mut impl ExitHw,
    regs: &mut GuestRegs,
    ctx: &mut ExitCtx,
    stats: &ExitCounters,
    full: u32,
) -> Result<Action, VmcsError> {
    let basic = full & 0xffff;
    // Bit 31: VM-entry failure (the guest never ran).
    if full & (1 << 31) != 0 {
        return Ok(Action::Fatal(Fatal::EntryFailed, diag(hw, basic)));
    }
    Ok(match basic {
        reason::EXCEPTION_NMI => {
            // With an empty exception bitmap only NMIs exit here: queue it for the guest
            // (`prepare_entry` delivers it when the guest can take it).
            let info = hw.read(ro::VMEXIT_INTERRUPTION_INFO)? as u32;
            if info & INTR_VALID != 0 && info & INTR_TYPE_MASK == INTR_TYPE_NMI {
                ctx.nmi_pending = true;
                Action::Resume
            } else {
                Action::Fatal(Fatal::Unexpected, diag(hw, basic))
            }
        }
        // The guest can take an NMI now: `prepare_entry` injects the pending one.
        reason::NMI_WINDOW => Action::Resume,
        reason::CPUID => {
            advance_rip(hw)?;
            cpuid(hw, regs, ctx);
            Action::Resume
        }
        reason::VMCALL => vmcall(hw, regs, stats)?,
        reason::CR_ACCESS => cr_access(hw, regs)?,
        reason::XSETBV => {
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            // Executed in root mode only if hardware would accept it for the guest: an
            // invalid value gives the guest the #GP(0) it would get natively.
            let ecx = regs.rcx as u32;
            let supported = crate::xsave::supported_xcr0(hw.cpuid(0xd, 0));
            if guest_cpl(hw)? != 0
                || crate::xsave::check_xsetbv(ecx, value, supported).is_err()
                || !hw.xsetbv(ecx, value)
            {
                inject_exception(hw, VECTOR_GP, Some(0))?;
            } else {
                advance_rip(hw)?;
            }
            Action::Resume
        }
        reason::INVD => {
            // INVD would drop dirty lines of the hypervisor too; WBINVD is the safe superset.
            hw.wbinvd();
            advance_rip(hw)?;
            Action::Resume
        }
        reason::RDMSR => {
            match hw.rdmsr_safe(regs.rcx as u32) {
                Some(v) => {
                    advance_rip(hw)?;
                    regs.rax = v & 0xffff_ffff;
                    regs.rdx = v >> 32;
                }
                None => inject_exception(hw, VECTOR_GP, Some(0))?,
            }
            Action::Resume
        }
        reason::WRMSR => {
            let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            if hw.wrmsr_safe(regs.rcx as u32, value) {
                advance_rip(hw)?;
            } else {
                inject_exception(hw, VECTOR_GP, Some(0))?;
            }
            Action::Resume
        }
        // VMX instructions in the guest: kdbt offers no nested VMX; #UD as on a CPU without
        // VMX (the guest sees CR4.VMXE clear).
        reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID | reason::VMFUNC => {
            inject_exception(hw, VECTOR_UD, None)?;
            Action::Resume
        }
        reason::TRIPLE_FAULT => Action::Fatal(Fatal::TripleFault, diag(hw, basic)),
        reason::EPT_VIOLATION => ept_violation(hw, basic)?,
        reason::EPT_MISCONFIG => Action::Fatal(Fatal::EptMisconfig, diag(hw, basic)),
        _ => Action::Fatal(Fatal::Unexpected, diag(hw, basic)),
    })
}

/// Everything to settle before VMRESUME (after [`handle`] returned [`Action::Resume`]):
///
/// 1. An event whose delivery the VM exit interrupted (IDT-vectoring information valid)
///    is delivered again, unless the handler queued an event itself.
/// 2. A pending NMI is injected if the guest can take it (no blocking by STI, MOV SS or
///    NMI, no other event queued); otherwise, with NMI virtualization, NMI-window exiting
///    is armed so that the CPU exits as soon as it can, and disarmed once nothing waits.
///    (Without it the NMI waits for a later exit.)
///
/// A failed VMREAD or VMWRITE stops it: the guest must not be resumed then (an event
/// could be lost, e.g. with the vectoring information unread), the caller makes it fatal.
pub fn prepare_entry(hw: &mut impl ExitHw, ctx: &mut ExitCtx, stats: &ExitCounters) -> Result<(), VmcsError> {
    let vectoring = hw.read(ro::IDT_VECTORING_INFO)? as u32;
    if vectoring & INTR_VALID != 0 && hw.read(control::VMENTRY_INTERRUPTION_INFO_FIELD)? as u32 & INTR_VALID == 0 {
        // Bit 12 is undefined in the vectoring field and reserved in the entry field.
        hw.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, (vectoring & !(1 << 12)) as u64)?;
        if vectoring & INTR_DELIVER_ERROR_CODE != 0 {
            let code = hw.read(ro::IDT_VECTORING_ERR_CODE)?;
            hw.write(control::VMENTRY_EXCEPTION_ERR_CODE, code)?;
        }
        // Software interrupts and exceptions (types 4, 5, 6) need their instruction length.
        if matches!((vectoring & INTR_TYPE_MASK) >> 8, 4..=6) {
            let len = hw.read(ro::VMEXIT_INSTRUCTION_LEN)?;
            hw.write(control::VMENTRY_INSTRUCTION_LEN, len)?;
        }
    }
    if ctx.nmi_pending {
        let blocked = hw.read(guest::INTERRUPTIBILITY_STATE)? & BLOCKS_NMI != 0
            || hw.read(control::VMENTRY_INTERRUPTION_INFO_FIELD)? as u32 & INTR_VALID != 0;
        if !blocked {
            hw.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, (INTR_VALID | INTR_TYPE_NMI | 2) as u64)?;
            ctx.nmi_pending = false;
            stats.count_nmi_injected();
        }
    }
    if ctx.vnmi {
        let proc = hw.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS)?;
        let want = if ctx.nmi_pending { proc | NMI_WINDOW_EXITING } else { proc & !NMI_WINDOW_EXITING };
        if want != proc {
            hw.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, want)?;
        }
    }
    Ok(())
}

fn cpuid(hw: &mut impl ExitHw, regs: &mut GuestRegs, ctx: &ExitCtx) {
    let leaf = regs.rax as u32;
    let sub = regs.rcx as u32;
    let r = match leaf {
        hypercall::CPUID_SIGNATURE_LEAF => [
            hypercall::CPUID_INFO_LEAF,
            hypercall::SIGNATURE_WORD,
            hypercall::SIGNATURE_WORD,
            hypercall::SIGNATURE_WORD,
        ],
        hypercall::CPUID_INFO_LEAF => [hypercall::VERSION, ctx.state, ctx.cpu, 0],
        _ => hw.cpuid(leaf, sub),
    };
    regs.rax = r[0] as u64;
    regs.rbx = r[1] as u64;
    regs.rcx = r[2] as u64;
    regs.rdx = r[3] as u64;
}

fn vmcall(hw: &mut impl ExitHw, regs: &mut GuestRegs, stats: &ExitCounters) -> Result<Action, VmcsError> {
    if guest_cpl(hw)? != 0 {
        inject_exception(hw, VECTOR_UD, None)?;
        return Ok(Action::Resume);
    }
    let call = match hypercall::decode(regs.rax) {
        Decoded::Foreign => {
            inject_exception(hw, VECTOR_UD, None)?;
            return Ok(Action::Resume);
        }
        Decoded::Unknown(_) => {
            advance_rip(hw)?;
            regs.rax = hypercall::ERR_UNKNOWN_CALL;
            return Ok(Action::Resume);
        }
        Decoded::Call(c) => c,
    };
    advance_rip(hw)?;
    Ok(match call {
        Call::Ping => {
            regs.rax = hypercall::MAGIC | hypercall::VERSION as u64;
            regs.rbx = !regs.rbx;
            Action::Resume
        }
        Call::ExitCount => {
            regs.rax = stats.total();
            Action::Resume
        }
        Call::Devirtualize => {
            regs.rax = hypercall::OK;
            Action::Devirtualize
        }
        Call::EptInvalidate => {
            // The caller changed EPT entries (in memory it owns) and now wants every
            // cached translation of this CPU gone; it issues this on each CPU.
            hw.invept_all();
            stats.count_invept();
            regs.rax = hypercall::OK;
            Action::Resume
        }
        // Served by `shadow_exit` when shadow paging runs; under EPT there is no shadow.
        Call::ShadowApplyPolicy => {
            regs.rax = hypercall::ERR_UNSUPPORTED;
            Action::Resume
        }
        Call::EptSetPerms | Call::EptQuery | Call::EptRemap => {
            regs.rax = hw.ept_call(call, regs.rbx, regs.rcx);
            Action::Resume
        }
        Call::VeControl => {
            regs.rax = ve_control(hw, regs.rbx)?;
            Action::Resume
        }
    })
}

/// An EPT violation. After kdbt raises a page's rights, a CPU may still use a translation
/// it cached with the old ones until its INVEPT, which reaches it by IPI some time later
/// (SDM Vol. 3C 29.4.3.1: raising rights does not invalidate cached translations, and a
/// stale one may cause an EPT violation). So root mode looks the page up in the tables
/// now: if they allow the access the qualification names (bits 0-2: read, write,
/// fetch), the violation is stale; INVEPT on this CPU, and the access is retried when the
/// guest resumes (its count is the exit count of reason 48: every other EPT violation is
/// fatal). The same retry when the tables are busy (another CPU is changing them): a real
/// violation comes back. Otherwise fatal, with kdbt's diagnostic.
fn ept_violation(hw: &mut impl ExitHw, basic: u32) -> Result<Action, VmcsError> {
    let q = hw.read(ro::EXIT_QUALIFICATION)?;
    let gpa = hw.read(ro::GUEST_PHYSICAL_ADDR_FULL)?;
    let access = q & 7;
    let now = hw.ept_call(Call::EptQuery, gpa, 0);
    let stale = now & (1 << 63) == 0 && access != 0 && now & access == access;
    if stale || now == hypercall::ERR_BUSY {
        hw.invept_all();
        // An IRET that unblocked NMIs faulted (qualification bit 12, no event being
        // delivered): the retried IRET unblocks them again, so they must be blocked until
        // then (SDM Vol. 3C 28.2.3).
        if q & (1 << 12) != 0 && hw.read(ro::IDT_VECTORING_INFO)? & (1 << 31) == 0 {
            let intr = hw.read(guest::INTERRUPTIBILITY_STATE)?;
            hw.write(guest::INTERRUPTIBILITY_STATE, intr | 1 << 3)?; // blocking by NMI
        }
        return Ok(Action::Resume);
    }
    Ok(Action::Fatal(Fatal::EptViolation, diag(hw, basic)))
}

/// [`Call::VeControl`] on this CPU's VMCS: with a page-aligned physical address, the
/// virtualization-exception information area is set there, the EPTP index to 0, and
/// "EPT-violation #VE" (secondary bit 18) switched on, so that an EPT violation on a
/// page whose entry has "suppress #VE" clear is delivered to the guest as vector 20
/// instead of exiting (SDM Vol. 3C 26.5.7); 0 switches it off. Refused unless EPT is on
/// and the CPU allows the control.
fn ve_control(hw: &mut impl ExitHw, info_pa: u64) -> Result<u64, VmcsError> {
    const EPT_VIOLATION_VE: u64 = 1 << 18;
    const ENABLE_EPT: u64 = 1 << 1;
    const ACTIVATE_SECONDARY: u64 = 1 << 31;
    const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    let allowed1 = hw.rdmsr_safe(IA32_VMX_PROCBASED_CTLS2).map_or(0, |v| v >> 32);
    let proc = hw.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS)?;
    let proc2 = hw.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS)?;
    if allowed1 & EPT_VIOLATION_VE == 0 || proc & ACTIVATE_SECONDARY == 0 || proc2 & ENABLE_EPT == 0 {
        return Ok(hypercall::ERR_UNSUPPORTED);
    }
    if info_pa & 0xfff != 0 {
        return Ok(hypercall::ERR_BAD_ARGUMENT);
    }
    // The CPU writes the area by physical address, past the guest's EPT view: only a page
    // the guest may write itself (never hidden hypervisor memory).
    let rw = hypercall::EPT_QUERY_R | hypercall::EPT_QUERY_W;
    if info_pa != 0 && hw.ept_call(Call::EptQuery, info_pa, 0) & (1 << 63 | rw) != rw {
        return Ok(hypercall::ERR_BAD_ARGUMENT);
    }
    if info_pa == 0 {
        hw.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, proc2 & !EPT_VIOLATION_VE)?;
    } else {
        hw.write(control::VIRT_EXCEPTION_INFO_ADDR_FULL, info_pa)?;
        hw.write(control::EPTP_INDEX, 0)?;
        hw.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, proc2 | EPT_VIOLATION_VE)?;
    }
    Ok(hypercall::OK)
}

/// MOV to CR0/CR4 that touched a host-owned bit (the guest/host masks). The guest's view
/// (read shadow) takes the written value; the real register keeps the bits VMX operation
/// requires (CR4.VMXE, the CR0 fixed bits). MOV from CR, CLTS and LMSW never exit with
/// kdbt's masks; if one does, it is emulated the same way.
fn cr_access(hw: &mut impl ExitHw, regs: &mut GuestRegs) -> Result<Action, VmcsError> {
    let q = hw.read(ro::EXIT_QUALIFICATION)?;
    let cr = (q & 0xf) as u8;
    let access = (q >> 4) & 3;
    let reg = ((q >> 8) & 0xf) as u8;
    if access != 0 || (cr != 0 && cr != 4) {
        return Ok(Action::Fatal(Fatal::Unexpected, diag(hw, reason::CR_ACCESS)));
    }
    let value = if reg == 4 { hw.read(guest::RSP)? } else { regs.gpr(reg).map_or(0, |r| *r) };
    let (real, shadow, mask) = if cr == 4 {
        (guest::CR4, control::CR4_READ_SHADOW, control::CR4_GUEST_HOST_MASK)
    } else {
        (guest::CR0, control::CR0_READ_SHADOW, control::CR0_GUEST_HOST_MASK)
    };
    let mask_v = hw.read(mask)?;
    let old_real = hw.read(real)?;
    hw.write(shadow, value & mask_v)?;
    // Host-owned bits keep their real values; the rest is the guest's.
    let new_real = (value & !mask_v) | (old_real & mask_v);
    debug_assert!(cr != 4 || new_real & CR4_VMXE != 0 || old_real & CR4_VMXE == 0);
    hw.write(real, new_real)?;
    advance_rip(hw)?;
    Ok(Action::Resume)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::cell::RefCell;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    use super::*;

    use crate::vmcs::{field_name, Op};

    /// A fake VMCS and CPU: fields in a map (an unwritten one reads as 0, as in a VMCS
    /// the launch zeroed), CPUID from a fixed table.
    #[derive(Clone, Default)]
    struct Fake {
        f: BTreeMap<u32, u64>,
        /// The one access that fails, as hardware fails an unsupported field (VMfailValid,
        /// error 12).
        fail: Option<(Op, u32)>,
        /// Every access through [`Vmcs`], in order.
        log: RefCell<Vec<(Op, u32)>>,
        xcr0: u64,
        /// XCR0 bits CPUID.(0DH,0) reports.
        xcr0_supported: u64,
        /// XSETBVs executed in root mode.
        xsetbvs: u32,
        msrs: BTreeMap<u32, u64>,
        wbinvd: u32,
        invept: u32,
        /// What EptQuery answers (None: no map, unsupported).
        ept_query: Option<u64>,
        /// Every `ept_call` other than EptQuery: (call, RBX, RCX), answered with
        /// `ept_answer` (None: unsupported).
        ept_calls: Vec<(Call, u64, u64)>,
        ept_answer: Option<u64>,
    }

    impl Fake {
        /// The test's own view of a field, never failing.
        fn vmread(&self, field: u32) -> u64 {
            self.f.get(&field).copied().unwrap_or(0)
        }
        fn vmwrite(&mut self, field: u32, value: u64) {
            self.f.insert(field, value);
        }
    }

    impl Vmcs for Fake {
        fn read(&self, field: u32) -> Result<u64, VmcsError> {
            crate::vmcs::testing::fake_access(&self.log, self.fail, Op::Read, field)?;
            Ok(self.vmread(field))
        }
        fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError> {
            crate::vmcs::testing::fake_access(&self.log, self.fail, Op::Write, field)?;
            self.vmwrite(field, value);
            Ok(())
        }
    }

    impl ExitHw for Fake {
        fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
            if (leaf, sub) == (0xd, 0) {
                return [self.xcr0_supported as u32, 0x340, 0x340, (self.xcr0_supported >> 32) as u32];
            }
            [leaf, sub, 0x1111, 0x2222]
        }
        fn xsetbv(&mut self, xcr: u32, value: u64) -> bool {
            // Root mode: the handler must only get here with a value hardware accepts.
            self.xsetbvs += 1;
            self.xcr0 = value;
            xcr == 0 && crate::xsave::check_xsetbv(xcr, value, self.xcr0_supported).is_ok()
        }
        fn wbinvd(&mut self) {
            self.wbinvd += 1;
        }
        fn invept_all(&mut self) {
            self.invept += 1;
        }
        fn ept_call(&mut self, call: Call, rbx: u64, rcx: u64) -> u64 {
            match (call, self.ept_query) {
                (Call::EptQuery, Some(v)) => v,
                (Call::EptQuery, None) => hypercall::ERR_UNSUPPORTED,
                _ => {
                    self.ept_calls.push((call, rbx, rcx));
                    self.ept_answer.unwrap_or(hypercall::ERR_UNSUPPORTED)
                }
            }
        }
        fn rdmsr_safe(&mut self, msr: u32) -> Option<u64> {
            self.msrs.get(&msr).copied()
        }
        fn wrmsr_safe(&mut self, msr: u32, value: u64) -> bool {
            if !self.msrs.contains_key(&msr) {
                return false;
            }
            self.msrs.insert(msr, value);
            true
        }
    }

    #[test]
    fn a_stale_ept_violation_is_retried_and_a_real_one_is_fatal() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let violation = |q: u64, now: Option<u64>| {
            let mut f = exit(reason::EPT_VIOLATION, 0, 0);
            f.vmwrite(ro::GUEST_PHYSICAL_ADDR_FULL, 0x12_3000);
            f.vmwrite(ro::EXIT_QUALIFICATION, q);
            f.ept_query = now;
            f
        };
        // A write (bit 1) to a page the tables now map RW: stale, INVEPT and retry.
        let mut f = violation(0x182, Some(0b011));
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        assert_eq!((f.invept, f.vmread(guest::RIP)), (1, 0xffff_ffff_8100_0000), "retried, not skipped");
        // A fetch (bit 2) from a page still not executable: fatal.
        let mut f = violation(0x184, Some(0b011));
        assert!(matches!(
            handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats),
            Action::Fatal(Fatal::EptViolation, _)
        ));
        assert_eq!(f.invept, 0);
        // The tables busy: retried; a query error: fatal.
        let mut f = violation(0x181, Some(hypercall::ERR_BUSY));
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        let mut f = violation(0x181, Some(hypercall::ERR_BAD_ARGUMENT));
        assert!(matches!(
            handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats),
            Action::Fatal(Fatal::EptViolation, _)
        ));
        // A stale violation of an IRET that unblocked NMIs: blocked again for the retry.
        let mut f = violation(0x1181, Some(0b001));
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        assert_eq!(f.vmread(guest::INTERRUPTIBILITY_STATE) & 8, 8);
        let mut f = violation(0x181, Some(0b001));
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        assert_eq!(f.vmread(guest::INTERRUPTIBILITY_STATE) & 8, 0);
    }

    #[test]
    fn ve_control_switches_the_control_and_sets_the_area() {
        let vmcall = |f: &mut Fake, arg: u64| {
            f.vmwrite(ro::EXIT_REASON, reason::VMCALL as u64);
            let mut r = GuestRegs { rax: Call::VeControl.rax(), rbx: arg, ..Default::default() };
            let mut ctx = ExitCtx::new(0, 0);
            handle(f, &mut r, &mut ctx, &ExitCounters::default());
            r.rax
        };
        let mut f = exit(reason::VMCALL, 3, 0);
        f.vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, 1 << 31);
        f.vmwrite(control::SECONDARY_PROCBASED_EXEC_CONTROLS, 1 << 1);
        // The CPU does not allow the control: refused, nothing written.
        assert_eq!(vmcall(&mut f, 0x5000), hypercall::ERR_UNSUPPORTED);
        assert_eq!(f.vmread(control::VIRT_EXCEPTION_INFO_ADDR_FULL), 0);
        f.msrs.insert(0x48B, (1 << 18 | 1 << 1) << 32);
        assert_eq!(vmcall(&mut f, 0x5008), hypercall::ERR_BAD_ARGUMENT);
        // A page the guest cannot write (hidden hypervisor memory, or no map): refused.
        assert_eq!(vmcall(&mut f, 0x5000), hypercall::ERR_BAD_ARGUMENT);
        f.ept_query = Some(0b001);
        assert_eq!(vmcall(&mut f, 0x5000), hypercall::ERR_BAD_ARGUMENT);
        assert_eq!(f.vmread(control::VIRT_EXCEPTION_INFO_ADDR_FULL), 0);
        f.ept_query = Some(0b111);
        assert_eq!(vmcall(&mut f, 0x5000), hypercall::OK);
        assert_eq!(f.vmread(control::VIRT_EXCEPTION_INFO_ADDR_FULL), 0x5000);
        assert_eq!(f.vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS), 1 << 18 | 1 << 1);
        assert_eq!(vmcall(&mut f, 0), hypercall::OK);
        assert_eq!(f.vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS), 1 << 1);
        // Without EPT (shadow paging): refused.
        f.vmwrite(control::SECONDARY_PROCBASED_EXEC_CONTROLS, 0);
        assert_eq!(vmcall(&mut f, 0x5000), hypercall::ERR_UNSUPPORTED);
        assert_eq!(f.vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS), 0);
    }

    fn exit(reason: u32, len: u64, cpl: u8) -> Fake {
        let mut f = Fake::default();
        f.vmwrite(ro::EXIT_REASON, reason as u64);
        f.vmwrite(ro::VMEXIT_INSTRUCTION_LEN, len);
        f.vmwrite(guest::RIP, 0xffff_ffff_8100_0000);
        f.vmwrite(guest::SS_ACCESS_RIGHTS, 0xc093 | ((cpl as u64) << 5));
        f.xcr0_supported = 0x6_02e7; // x87 SSE AVX AVX-512 PKRU AMX
        f
    }

    fn injected(f: &Fake) -> Option<(u8, Option<u32>)> {
        let info = f.vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32;
        (info & INTR_VALID != 0).then(|| {
            let code =
                (info & INTR_DELIVER_ERROR_CODE != 0).then(|| f.vmread(control::VMENTRY_EXCEPTION_ERR_CODE) as u32);
            (info as u8, code)
        })
    }

    #[test]
    fn cpuid_signature_and_passthrough() {
        let mut ctx = ExitCtx::new(1, hypercall::STATE_VIRTUALIZED);
        let stats = ExitCounters::new();
        let mut f = exit(reason::CPUID, 2, 0);
        let mut r = GuestRegs { rax: 0x4000_0000, ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!(r.rbx as u32, hypercall::SIGNATURE_WORD);
        assert_eq!(r.rax as u32, hypercall::CPUID_INFO_LEAF);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0002);

        let mut f = exit(reason::CPUID, 2, 3);
        let mut r = GuestRegs { rax: 0x4000_0001, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!((r.rax, r.rbx, r.rcx), (1, 1, 1));

        let mut f = exit(reason::CPUID, 2, 0);
        let mut r = GuestRegs { rax: 7, rcx: 1, rbx: 99, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!((r.rax, r.rbx, r.rcx, r.rdx), (7, 1, 0x1111, 0x2222));
        assert_eq!(stats.snapshot().counts[reason::CPUID as usize], 3);
        assert_eq!(stats.snapshot().total, 3);
    }

    #[test]
    fn vmcall_only_at_cpl0_and_with_magic() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        // User space: #UD, RIP unchanged.
        let mut f = exit(reason::VMCALL, 3, 3);
        let mut r = GuestRegs { rax: Call::Devirtualize.rax(), ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!(injected(&f), Some((VECTOR_UD, None)));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000);
        // Kernel without the magic: #UD too.
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: 3, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(injected(&f), Some((VECTOR_UD, None)));
        // Ping.
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::Ping.rax(), rbx: 0x55, ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!(r.rax, hypercall::MAGIC | 1);
        assert_eq!(r.rbx, !0x55);
        assert_eq!(injected(&f), None);
        // Unknown function: error code, instruction completed.
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: hypercall::MAGIC | 0x77, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(r.rax, hypercall::ERR_UNKNOWN_CALL);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
        // Devirtualize.
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::Devirtualize.rax(), ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Devirtualize);
        assert_eq!(r.rax, hypercall::OK);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
    }

    #[test]
    fn cr4_write_keeps_vmxe_and_updates_shadow() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::CR_ACCESS, 3, 0);
        f.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
        f.vmwrite(guest::CR4, 0x3506f0 | CR4_VMXE);
        // mov cr4, rbx (reg 3) setting VMXE from the guest's view (e.g. KVM loading).
        f.vmwrite(ro::EXIT_QUALIFICATION, 4 | (3 << 8));
        let mut r = GuestRegs { rbx: 0x3506f0 | CR4_VMXE | 0x80, ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!(f.vmread(control::CR4_READ_SHADOW), CR4_VMXE);
        assert_eq!(f.vmread(guest::CR4), 0x3506f0 | 0x80 | CR4_VMXE);
        // And clearing it again from the guest's view leaves the real bit set.
        let mut f2 = exit(reason::CR_ACCESS, 3, 0);
        f2.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
        f2.vmwrite(guest::CR4, 0x3506f0 | CR4_VMXE);
        f2.vmwrite(ro::EXIT_QUALIFICATION, 4 | (3 << 8));
        let mut r = GuestRegs { rbx: 0x3506f0, ..Default::default() };
        handle(&mut f2, &mut r, &mut ctx, &stats);
        assert_eq!(f2.vmread(control::CR4_READ_SHADOW), 0);
        assert_eq!(f2.vmread(guest::CR4), 0x3506f0 | CR4_VMXE);
    }

    #[test]
    fn msr_and_xsetbv_faults_are_reflected_as_gp() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::RDMSR, 2, 0);
        f.msrs.insert(0x4000_0100, 0x1234_5678_9abc_def0);
        let mut r = GuestRegs { rcx: 0x4000_0100, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!((r.rax, r.rdx), (0x9abc_def0, 0x1234_5678));
        let mut r = GuestRegs { rcx: 0x4000_0200, ..Default::default() };
        let mut f = exit(reason::RDMSR, 2, 0);
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(injected(&f), Some((VECTOR_GP, Some(0))));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000);

        let mut f = exit(reason::XSETBV, 3, 0);
        let mut r = GuestRegs { rcx: 0, rax: 7, rdx: 0, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(f.xcr0, 7);
        let mut f = exit(reason::XSETBV, 3, 0);
        let mut r = GuestRegs { rcx: 0, rax: 6, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(injected(&f), Some((VECTOR_GP, Some(0))));
    }

    #[test]
    fn vmx_instructions_raise_ud_and_fatal_exits_carry_diagnostics() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        for reason in [19u32, 20, 21, 22, 23, 24, 25, 26, 27, 50, 53, 59] {
            let mut f = exit(reason, 3, 0);
            assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
            assert_eq!(injected(&f), Some((VECTOR_UD, None)), "reason {reason}");
        }
        let mut f = exit(reason::EPT_VIOLATION, 0, 0);
        f.vmwrite(ro::GUEST_PHYSICAL_ADDR_FULL, 0xfee0_0000);
        f.vmwrite(ro::EXIT_QUALIFICATION, 0x182);
        match handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats) {
            Action::Fatal(Fatal::EptViolation, d) => {
                assert_eq!(d.guest_physical, 0xfee0_0000);
                assert_eq!(d.qualification, 0x182);
                assert_eq!(d.guest_rip, 0xffff_ffff_8100_0000);
            }
            other => panic!("{other:?}"),
        }
        let mut f = exit(reason::TRIPLE_FAULT, 0, 0);
        assert!(matches!(
            handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats),
            Action::Fatal(Fatal::TripleFault, _)
        ));
        // Entry failure flag.
        let mut f = exit(reason::ENTRY_FAIL_GUEST_STATE | 1 << 31, 0, 0);
        assert!(matches!(
            handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats),
            Action::Fatal(Fatal::EntryFailed, _)
        ));
        // Out-of-range reasons are counted in the last slot, never indexed past the end.
        let mut f = exit(0xffff, 0, 0);
        handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats);
        assert_eq!(stats.snapshot().counts[reason::COUNT - 1], 1);
        let names: Vec<_> = (0..70).map(reason_name).collect();
        assert_eq!(names[48], "EPT violation");
    }

    #[test]
    fn ept_invalidate_runs_invept_at_cpl0_only() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::EptInvalidate.rax(), ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!((f.invept, r.rax, stats.snapshot().inveptions), (1, hypercall::OK, 1));
        let mut f = exit(reason::VMCALL, 3, 3);
        let mut r = GuestRegs { rax: Call::EptInvalidate.rax(), ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!((f.invept, stats.snapshot().inveptions), (0, 1));
        assert_eq!(injected(&f), Some((VECTOR_UD, None)));
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::EptSetPerms.rax(), ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(r.rax, hypercall::ERR_UNSUPPORTED);
        // Without an EPT map in this hardware (the fake's default `ept_call`), queries too.
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::EptQuery.rax(), rbx: 0x1000, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(r.rax, hypercall::ERR_UNSUPPORTED);
    }

    #[test]
    fn ept_remap_reaches_ept_call_with_rbx_and_rcx() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let answer = hypercall::EPT_CHANGED | 7;
        let mut f = exit(reason::VMCALL, 3, 0);
        f.ept_answer = Some(answer);
        let mut r = GuestRegs { rax: Call::EptRemap.rax(), rbx: 0x1234_5005, rcx: 0x6789_a000, ..Default::default() };
        assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
        assert_eq!(f.ept_calls, [(Call::EptRemap, 0x1234_5005, 0x6789_a000)]);
        assert_eq!((r.rax, r.rbx, r.rcx), (answer, 0x1234_5005, 0x6789_a000));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
        // EptSetPerms is passed RCX too (root mode ignores it).
        let mut f = exit(reason::VMCALL, 3, 0);
        let mut r = GuestRegs { rax: Call::EptSetPerms.rax(), rbx: 0x5003, rcx: 9, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert_eq!(
            (f.ept_calls.as_slice(), r.rax),
            ([(Call::EptSetPerms, 0x5003, 9)].as_slice(), hypercall::ERR_UNSUPPORTED)
        );
        // From CPL 3: #UD, root mode's tables untouched.
        let mut f = exit(reason::VMCALL, 3, 3);
        f.ept_answer = Some(answer);
        let mut r = GuestRegs { rax: Call::EptRemap.rax(), rbx: 0x1234_5005, rcx: 0x6789_a000, ..Default::default() };
        handle(&mut f, &mut r, &mut ctx, &stats);
        assert!(f.ept_calls.is_empty());
        assert_eq!(injected(&f), Some((VECTOR_UD, None)));
    }

    #[test]
    fn invd_becomes_wbinvd() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::INVD, 2, 0);
        handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats);
        assert_eq!(f.wbinvd, 1);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0002);
    }

    fn single_step_pending(f: &Fake) -> bool {
        f.vmread(guest::PENDING_DBG_EXCEPTIONS) & PENDING_DBG_BS != 0
    }

    #[test]
    fn single_step_over_emulated_instructions_keeps_the_guests_db() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        // The decision: TF set, BTF clear.
        assert!(owes_single_step(RFLAGS_TF | 0x2, 0));
        assert!(!owes_single_step(0x2, 0));
        assert!(!owes_single_step(RFLAGS_TF | 0x2, DEBUGCTL_BTF));
        // Every instruction kdbt completes for the guest: CPUID, XSETBV, INVD, RDMSR,
        // WRMSR, VMCALL (ping), MOV to CR4.
        let completed: &[(u32, GuestRegs)] = &[
            (reason::CPUID, GuestRegs { rax: 1, ..Default::default() }),
            (reason::XSETBV, GuestRegs { rax: 3, ..Default::default() }),
            (reason::INVD, GuestRegs::default()),
            (reason::RDMSR, GuestRegs { rcx: 0x10, ..Default::default() }),
            (reason::WRMSR, GuestRegs { rcx: 0x10, ..Default::default() }),
            (reason::VMCALL, GuestRegs { rax: Call::Ping.rax(), ..Default::default() }),
            (reason::CR_ACCESS, GuestRegs { rbx: 0x3506f0, ..Default::default() }),
        ];
        for (tf, btf, want) in [(true, false, true), (false, false, false), (true, true, false)] {
            for (reason, regs) in completed {
                let mut f = exit(*reason, 2, 0);
                f.msrs.insert(0x10, 5);
                f.vmwrite(ro::EXIT_QUALIFICATION, 4 | (3 << 8));
                f.vmwrite(guest::RFLAGS, 0x202 | if tf { RFLAGS_TF } else { 0 });
                f.vmwrite(guest::IA32_DEBUGCTL_FULL, if btf { DEBUGCTL_BTF } else { 0 });
                // A data breakpoint already pending (B0) stays pending.
                f.vmwrite(guest::PENDING_DBG_EXCEPTIONS, 1);
                // Blocking by MOV SS ends with the emulated instruction, as natively.
                f.vmwrite(guest::INTERRUPTIBILITY_STATE, 2);
                let mut r = *regs;
                assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
                let what = std::format!("reason {reason} tf={tf} btf={btf}");
                assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0002, "{what}");
                assert_eq!(single_step_pending(&f), want, "{what}");
                assert_eq!(f.vmread(guest::PENDING_DBG_EXCEPTIONS) & 1, 1, "{what}");
                assert_eq!(f.vmread(guest::INTERRUPTIBILITY_STATE), 0, "{what}");
                assert_eq!(injected(&f), None, "{what}");
            }
        }
        // A faulting instruction does not complete: no single-step trap, RIP unchanged.
        let mut f = exit(reason::XSETBV, 3, 3);
        f.vmwrite(guest::RFLAGS, 0x202 | RFLAGS_TF);
        handle(&mut f, &mut GuestRegs { rax: 3, ..Default::default() }, &mut ctx, &stats);
        assert_eq!(injected(&f), Some((VECTOR_GP, Some(0))));
        assert!(!single_step_pending(&f));
        let mut f = exit(reason::VMCALL, 3, 3);
        f.vmwrite(guest::RFLAGS, 0x202 | RFLAGS_TF);
        handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats);
        assert!(!single_step_pending(&f) && f.vmread(guest::RIP) == 0xffff_ffff_8100_0000);
    }

    fn nmi_exit() -> Fake {
        let mut f = exit(reason::EXCEPTION_NMI, 0, 0);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, (INTR_VALID | INTR_TYPE_NMI | 2) as u64);
        f
    }

    fn injected_nmi(f: &Fake) -> bool {
        f.vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 == INTR_VALID | INTR_TYPE_NMI | 2
    }

    fn window_armed(f: &Fake) -> bool {
        f.vmread(control::PRIMARY_PROCBASED_EXEC_CONTROLS) & NMI_WINDOW_EXITING != 0
    }

    #[test]
    fn guest_nmi_is_reinjected_when_the_guest_can_take_it() {
        let mut ctx = ExitCtx { vnmi: true, ..ExitCtx::new(0, 0) };
        let stats = ExitCounters::new();
        let mut f = nmi_exit();
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert!(injected_nmi(&f));
        assert!(!ctx.nmi_pending && !window_armed(&f));
        assert_eq!(stats.snapshot().nmis_injected, 1);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000, "an NMI exit skips nothing");
    }

    #[test]
    fn blocked_nmi_waits_for_the_nmi_window() {
        let mut ctx = ExitCtx { vnmi: true, ..ExitCtx::new(0, 0) };
        let stats = ExitCounters::new();
        // The guest is in its NMI handler (virtual-NMI blocking) when the next NMI exits.
        let mut f = nmi_exit();
        f.vmwrite(guest::INTERRUPTIBILITY_STATE, 1 << 3);
        handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert!(!injected_nmi(&f) && ctx.nmi_pending && window_armed(&f));
        // It executes IRET; the CPU exits at the NMI window (the control stays as it was).
        let proc = f.vmread(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
        let mut f = exit(reason::NMI_WINDOW, 0, 0);
        f.vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc);
        assert_eq!(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats), Action::Resume);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert!(injected_nmi(&f) && !ctx.nmi_pending && !window_armed(&f));
        assert_eq!(stats.snapshot().counts[reason::NMI_WINDOW as usize], 1);
        // STI and MOV SS blocking hold an NMI back too.
        for blocking in [1u64, 2] {
            let mut f = exit(reason::CPUID, 2, 0);
            f.vmwrite(guest::INTERRUPTIBILITY_STATE, blocking);
            ctx.nmi_pending = true;
            prepare_entry(&mut f, &mut ctx, &stats).unwrap();
            assert!(!injected_nmi(&f) && window_armed(&f), "blocking {blocking}");
        }
    }

    #[test]
    fn without_nmi_virtualization_a_blocked_nmi_stays_pending() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        ctx.nmi_pending = true;
        let mut f = exit(reason::CPUID, 2, 0);
        f.vmwrite(guest::INTERRUPTIBILITY_STATE, 1 << 3);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert!(ctx.nmi_pending && !window_armed(&f) && !injected_nmi(&f));
        f.vmwrite(guest::INTERRUPTIBILITY_STATE, 0);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert!(injected_nmi(&f) && !ctx.nmi_pending);
    }

    #[test]
    fn interrupted_event_delivery_is_redone() {
        let mut ctx = ExitCtx { vnmi: true, ..ExitCtx::new(0, 0) };
        let stats = ExitCounters::new();
        // A page fault (vector 14, error code 2) was being delivered.
        let mut f = exit(reason::CPUID, 0, 0);
        f.vmwrite(ro::IDT_VECTORING_INFO, (INTR_VALID | INTR_TYPE_HW_EXCEPTION | INTR_DELIVER_ERROR_CODE | 14) as u64);
        f.vmwrite(ro::IDT_VECTORING_ERR_CODE, 2);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert_eq!(injected(&f), Some((14, Some(2))));
        // A software interrupt (int 0x80: type 4) needs its instruction length; a pending
        // NMI waits behind it for the window.
        let mut f = exit(reason::CPUID, 2, 0);
        f.vmwrite(ro::IDT_VECTORING_INFO, (INTR_VALID | (4 << 8) | 0x80 | (1 << 12)) as u64);
        ctx.nmi_pending = true;
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert_eq!(f.vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32, INTR_VALID | (4 << 8) | 0x80);
        assert_eq!(f.vmread(control::VMENTRY_INSTRUCTION_LEN), 2);
        assert!(ctx.nmi_pending && window_armed(&f));
        // An event the handler queued itself wins over the interrupted one.
        let mut f = exit(reason::VMCALL, 3, 3);
        f.vmwrite(ro::IDT_VECTORING_INFO, (INTR_VALID | INTR_TYPE_HW_EXCEPTION | 14) as u64);
        ctx.nmi_pending = false;
        handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats);
        prepare_entry(&mut f, &mut ctx, &stats).unwrap();
        assert_eq!(injected(&f), Some((VECTOR_UD, None)));
    }

    #[test]
    fn an_exception_exit_other_than_nmi_is_fatal() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::EXCEPTION_NMI, 0, 0);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, (INTR_VALID | INTR_TYPE_HW_EXCEPTION | 14) as u64);
        assert!(matches!(
            handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats),
            Action::Fatal(Fatal::Unexpected, _)
        ));
    }

    #[test]
    fn counters_are_read_while_the_owning_cpu_counts() {
        // Root mode on one CPU handles exits while `kdbt status` on another reads the
        // counters: the reader shares them (`&ExitCounters`) with the writer, and sees every
        // counter only grow, never torn, up to the exact final figures.
        const N: u64 = 20_000;
        let stats = ExitCounters::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut ctx = ExitCtx::new(0, 0);
                for i in 0..N {
                    let r = if i % 2 == 0 { reason::CPUID } else { reason::XSETBV };
                    let mut f = exit(r, 2, 0);
                    let mut regs = GuestRegs { rax: 1, ..Default::default() };
                    handle(&mut f, &mut regs, &mut ctx, &stats);
                }
            });
            s.spawn(|| {
                let mut last = stats.snapshot();
                while last.total < N {
                    let now = stats.snapshot();
                    assert!(now.total >= last.total && now.total <= N, "{} then {}", last.total, now.total);
                    assert!(now.counts[reason::CPUID as usize] >= last.counts[reason::CPUID as usize]);
                    assert!(now.counts[reason::CPUID as usize] <= N / 2);
                    last = now;
                }
            });
        });
        let end = stats.snapshot();
        assert_eq!(
            (end.total, end.counts[reason::CPUID as usize], end.counts[reason::XSETBV as usize]),
            (N, N / 2, N / 2)
        );
    }

    #[test]
    fn invalid_xcr0_values_give_the_guest_gp_without_reaching_root_mode() {
        use crate::xsave::*;
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        // (ECX, value, CPL) -> executed in root mode (RIP advanced) or #GP(0) to the guest.
        let cases: &[(u64, u64, u8, bool)] = &[
            (0, X87 | SSE | AVX, 0, true),
            (0, X87 | SSE | AVX | AVX512, 0, true),
            (0, X87 | SSE | AVX | AVX512 | AMX | (1 << 9), 0, true),
            // Upper half of RCX is ignored: ECX is what counts.
            (0xffff_ffff_0000_0000, X87 | SSE, 0, true),
            (0, X87 | SSE | AVX, 3, false),
            (1, X87 | SSE, 0, false),
            (0, SSE, 0, false),
            (0, X87 | AVX, 0, false),
            (0, X87 | SSE | AVX | OPMASK, 0, false),
            (0, X87 | SSE | AVX512, 0, false),
            (0, X87 | SSE | AVX | AMX_TILEDATA, 0, false),
            (0, X87 | MPX_BNDREGS, 0, false),
            // MPX is not supported by this fake CPU at all.
            (0, X87 | MPX, 0, false),
            (0, X87 | (1 << 40), 0, false),
        ];
        for &(rcx, value, cpl, ok) in cases {
            let mut f = exit(reason::XSETBV, 3, cpl);
            let mut r = GuestRegs {
                rcx,
                rax: value & 0xffff_ffff | 0xdead_0000_0000_0000,
                rdx: value >> 32,
                ..Default::default()
            };
            assert_eq!(handle(&mut f, &mut r, &mut ctx, &stats), Action::Resume);
            let what = std::format!("rcx={rcx:#x} value={value:#x} cpl={cpl}");
            if ok {
                assert_eq!((f.xsetbvs, f.xcr0, injected(&f)), (1, value, None), "{what}");
                assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003, "{what}");
            } else {
                assert_eq!((f.xsetbvs, injected(&f)), (0, Some((VECTOR_GP, Some(0)))), "{what}");
                assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000, "{what}");
            }
        }
    }

    fn failed(op: Op, field: u32) -> VmcsError {
        VmcsError { op, field, fail: VmFail::Valid(12) }
    }

    /// The fatal outcome of a failed VMCS access, with its diagnostic.
    fn vmcs_failure(a: Action) -> Option<(VmcsError, Diag)> {
        match a {
            Action::Fatal(Fatal::Vmcs(e), d) => Some((e, d)),
            _ => None,
        }
    }

    /// [`vmcs_failure`], which must be one.
    fn must_fail(a: Action) -> (VmcsError, Diag) {
        vmcs_failure(a).unwrap_or_else(|| panic!("{a:?}, not a fatal VMCS access"))
    }

    #[test]
    fn an_unreadable_cpl_is_fatal_never_cpl_0() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        // User space executes VMCALL Devirtualize; SS's access rights (its CPL) cannot be
        // read. Read as 0 it would be a kernel call: the CPU would leave VMX operation.
        let mut f = exit(reason::VMCALL, 3, 3);
        f.fail = Some((Op::Read, guest::SS_ACCESS_RIGHTS));
        let mut r = GuestRegs { rax: Call::Devirtualize.rax(), ..Default::default() };
        let (e, d) = must_fail(handle(&mut f, &mut r, &mut ctx, &stats));
        assert_eq!(e, failed(Op::Read, guest::SS_ACCESS_RIGHTS));
        assert_eq!((d.reason, d.guest_rip), (reason::VMCALL, 0xffff_ffff_8100_0000));
        assert_eq!(field_name(e.field), "GUEST_SS_AR_BYTES");
        assert_eq!(
            (r.rax, f.vmread(guest::RIP), injected(&f)),
            (Call::Devirtualize.rax(), 0xffff_ffff_8100_0000, None)
        );
        // The guest gets the diagnostic (the VMCS still works: VMfailValid).
        assert!(Fatal::Vmcs(e).resumable());
        // The same for XSETBV: not executed in root mode, no #GP either.
        let mut f = exit(reason::XSETBV, 3, 3);
        f.fail = Some((Op::Read, guest::SS_ACCESS_RIGHTS));
        let mut r = GuestRegs { rax: 7, ..Default::default() };
        let (e, _) = must_fail(handle(&mut f, &mut r, &mut ctx, &stats));
        assert_eq!(e, failed(Op::Read, guest::SS_ACCESS_RIGHTS));
        assert_eq!((f.xsetbvs, injected(&f)), (0, None));
    }

    #[test]
    fn an_unreadable_instruction_length_is_fatal_not_a_cpuid_storm() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        // Read as 0, RIP would stay on the CPUID: the guest would exit on it forever.
        let mut f = exit(reason::CPUID, 2, 0);
        f.fail = Some((Op::Read, ro::VMEXIT_INSTRUCTION_LEN));
        let mut r = GuestRegs { rax: 1, ..Default::default() };
        let (e, d) = must_fail(handle(&mut f, &mut r, &mut ctx, &stats));
        assert_eq!(e, failed(Op::Read, ro::VMEXIT_INSTRUCTION_LEN));
        assert_eq!(d.reason, reason::CPUID);
        assert_eq!((f.vmread(guest::RIP), r.rax), (0xffff_ffff_8100_0000, 1), "nothing done");
        assert_eq!(
            std::format!("{e}"),
            "VMREAD VM_EXIT_INSTRUCTION_LEN (0x440c) failed: VM-instruction error 12 \
             (VMREAD/VMWRITE from/to unsupported VMCS component)"
        );
        // A failed VMWRITE of the new RIP likewise.
        let mut f = exit(reason::CPUID, 2, 0);
        f.fail = Some((Op::Write, guest::RIP));
        let (e, _) = must_fail(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats));
        assert_eq!(e, failed(Op::Write, guest::RIP));
    }

    #[test]
    fn an_unreadable_vectoring_field_stops_the_entry() {
        let mut ctx = ExitCtx { vnmi: true, ..ExitCtx::new(0, 0) };
        let stats = ExitCounters::new();
        // A #PF was being delivered; read as 0 it would be dropped.
        let mut f = exit(reason::CPUID, 0, 0);
        f.vmwrite(ro::IDT_VECTORING_INFO, (INTR_VALID | INTR_TYPE_HW_EXCEPTION | INTR_DELIVER_ERROR_CODE | 14) as u64);
        f.fail = Some((Op::Read, ro::IDT_VECTORING_INFO));
        assert_eq!(prepare_entry(&mut f, &mut ctx, &stats), Err(failed(Op::Read, ro::IDT_VECTORING_INFO)));
        // Its error code.
        f.fail = Some((Op::Read, ro::IDT_VECTORING_ERR_CODE));
        assert_eq!(prepare_entry(&mut f, &mut ctx, &stats), Err(failed(Op::Read, ro::IDT_VECTORING_ERR_CODE)));
    }

    #[test]
    fn the_diagnostic_marks_what_it_could_not_read() {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut f = exit(reason::CPUID, 2, 0);
        f.vmwrite(guest::RSP, 0x1000);
        f.fail = Some((Op::Read, guest::RIP));
        let (e, d) = must_fail(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats));
        assert_eq!(e, failed(Op::Read, guest::RIP));
        assert_eq!(d.unreadable, Diag::RIP);
        assert!(!d.readable(Diag::RIP) && d.readable(Diag::RSP) && d.guest_rsp == 0x1000);
        // No reason at all: fatal, counted apart.
        let mut f = exit(reason::CPUID, 2, 0);
        f.fail = Some((Op::Read, ro::EXIT_REASON));
        let (e, d) = must_fail(handle(&mut f, &mut GuestRegs::default(), &mut ctx, &stats));
        assert_eq!(
            (e, d.reason, reason_name(d.reason)),
            (failed(Op::Read, ro::EXIT_REASON), reason::UNREADABLE, "unreadable")
        );
        assert_eq!(stats.snapshot().counts[reason::COUNT - 1], 1);
        // Without a current VMCS the guest cannot be entered again.
        assert!(!Fatal::Vmcs(VmcsError { op: Op::Read, field: guest::RIP, fail: VmFail::Invalid }).resumable());
        assert!(!Fatal::TripleFault.resumable() && !Fatal::EntryFailed.resumable() && Fatal::Unexpected.resumable());
    }

    /// Exits that each end in a resumed guest, between them reaching every VMCS access of
    /// `handle` and `prepare_entry`.
    fn resumed_exits() -> Vec<(&'static str, Fake, GuestRegs, ExitCtx)> {
        let ctx = ExitCtx::new(0, 0);
        let vnmi = ExitCtx { vnmi: true, nmi_pending: true, ..ctx.clone() };
        let mut v = Vec::new();
        let mut f = exit(reason::CPUID, 2, 0);
        f.vmwrite(guest::RFLAGS, 0x202 | RFLAGS_TF | RFLAGS_RF);
        f.vmwrite(guest::INTERRUPTIBILITY_STATE, 1);
        v.push(("cpuid, single-stepped", f, GuestRegs { rax: 1, ..Default::default() }, vnmi.clone()));
        v.push((
            "vmcall ping",
            exit(reason::VMCALL, 3, 0),
            GuestRegs { rax: Call::Ping.rax(), ..Default::default() },
            ctx.clone(),
        ));
        v.push(("vmcall from user", exit(reason::VMCALL, 3, 3), GuestRegs::default(), ctx.clone()));
        let mut f = exit(reason::VMCALL, 3, 0);
        f.vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, 1 << 31);
        f.vmwrite(control::SECONDARY_PROCBASED_EXEC_CONTROLS, 1 << 1);
        f.msrs.insert(0x48B, (1 << 18 | 1 << 1) << 32);
        f.ept_query = Some(0b111);
        v.push((
            "vmcall ve control",
            f,
            GuestRegs { rax: Call::VeControl.rax(), rbx: 0x5000, ..Default::default() },
            ctx.clone(),
        ));
        v.push(("xsetbv", exit(reason::XSETBV, 3, 0), GuestRegs { rax: 7, ..Default::default() }, ctx.clone()));
        v.push(("xsetbv #GP", exit(reason::XSETBV, 3, 0), GuestRegs { rax: 6, ..Default::default() }, ctx.clone()));
        v.push(("invd", exit(reason::INVD, 2, 0), GuestRegs::default(), ctx.clone()));
        let mut f = exit(reason::RDMSR, 2, 0);
        f.msrs.insert(0x10, 5);
        v.push(("rdmsr", f, GuestRegs { rcx: 0x10, ..Default::default() }, ctx.clone()));
        v.push(("wrmsr #GP", exit(reason::WRMSR, 2, 0), GuestRegs { rcx: 0x10, ..Default::default() }, ctx.clone()));
        v.push(("vmxon #UD", exit(reason::VMXON, 4, 0), GuestRegs::default(), ctx.clone()));
        let mut f = exit(reason::CR_ACCESS, 3, 0);
        f.vmwrite(ro::EXIT_QUALIFICATION, 4 | (4 << 8));
        f.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
        v.push(("mov cr4, rsp", f, GuestRegs::default(), ctx.clone()));
        let mut f = exit(reason::EPT_VIOLATION, 0, 0);
        f.vmwrite(ro::EXIT_QUALIFICATION, 0x1181);
        f.ept_query = Some(0b001);
        v.push(("stale ept violation", f, GuestRegs::default(), ctx.clone()));
        let mut f = exit(reason::EXCEPTION_NMI, 0, 0);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, (INTR_VALID | INTR_TYPE_NMI | 2) as u64);
        v.push(("nmi", f, GuestRegs::default(), vnmi.clone()));
        let mut f = exit(reason::CPUID, 2, 0);
        f.vmwrite(ro::IDT_VECTORING_INFO, (INTR_VALID | (6 << 8) | INTR_DELIVER_ERROR_CODE | 3) as u64);
        v.push(("cpuid during int3 delivery", f, GuestRegs::default(), vnmi));
        v
    }

    /// `handle`, then for a resumed guest `prepare_entry`.
    fn exit_and_entry(f: &mut Fake, regs: &mut GuestRegs, ctx: &mut ExitCtx) -> Result<Action, VmcsError> {
        let a = handle(f, regs, ctx, &ExitCounters::new());
        if a == Action::Resume {
            prepare_entry(f, ctx, &ExitCounters::new())?;
        }
        Ok(a)
    }

    #[test]
    fn every_vmcs_access_of_an_exit_that_fails_ends_it_naming_the_field() {
        let mut reached = Vec::new();
        for (what, f, regs, ctx) in resumed_exits() {
            let (mut f0, mut r0, mut c0) = (Fake { log: RefCell::default(), ..f.clone() }, regs, ctx.clone());
            assert_eq!(exit_and_entry(&mut f0, &mut r0, &mut c0), Ok(Action::Resume), "{what}");
            let accesses = f0.log.take();
            for &(op, field) in &accesses {
                if !reached.contains(&(op, field)) {
                    reached.push((op, field));
                }
                assert_ne!(field_name(field), "field", "{what}: {field:#x} has no name");
                let (mut f1, mut r1, mut c1) =
                    (Fake { fail: Some((op, field)), log: RefCell::default(), ..f.clone() }, regs, ctx.clone());
                let what = std::format!("{what}: {op:?} {}", field_name(field));
                match exit_and_entry(&mut f1, &mut r1, &mut c1) {
                    // Failed in `handle`: fatal, never a resumed guest.
                    Ok(a) => assert_eq!(vmcs_failure(a).map(|(e, _)| e), Some(failed(op, field)), "{what}"),
                    // Failed in `prepare_entry`: reported to the caller.
                    Err(e) => assert_eq!(e, failed(op, field), "{what}"),
                }
            }
        }
        // Between them the exits reach the accesses that matter most.
        for access in [
            (Op::Read, guest::SS_ACCESS_RIGHTS),
            (Op::Read, ro::VMEXIT_INSTRUCTION_LEN),
            (Op::Read, ro::IDT_VECTORING_INFO),
            (Op::Read, ro::IDT_VECTORING_ERR_CODE),
            (Op::Write, guest::RIP),
            (Op::Write, control::VMENTRY_INTERRUPTION_INFO_FIELD),
            (Op::Write, control::VMENTRY_INSTRUCTION_LEN),
            (Op::Write, control::PRIMARY_PROCBASED_EXEC_CONTROLS),
            (Op::Write, guest::PENDING_DBG_EXCEPTIONS),
            (Op::Write, control::VIRT_EXCEPTION_INFO_ADDR_FULL),
            (Op::Write, guest::INTERRUPTIBILITY_STATE),
            (Op::Write, control::CR4_READ_SHADOW),
        ] {
            assert!(reached.contains(&access), "{access:?} not reached");
        }
        assert!(reached.len() >= 30, "{} accesses", reached.len());
    }
}
