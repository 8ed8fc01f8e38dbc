//! VM exits of shadow paging (`kdbt load --paging shadow`): `#PF`, MOV to/from CR3, MOV to
//! CR0/CR4 of a paging-relevant bit, INVLPG and INVPCID, handed to the per-CPU
//! [`shadow::Mmu`]; every other exit goes to [`crate::exit::handle`].
//!
//! Written against [`ShadowHw`] (the exit hardware plus INVVPID and CR2) so that every
//! path is unit-tested on the host with a fake VMCS and fake guest memory. Runs in VMX root
//! mode: no allocation, no kernel calls. As in [`crate::exit`], every VMCS access is
//! checked: a failed one ends the exit as [`exit::Fatal::Vmcs`], naming the field.
use shadow::policy::NoPolicy;
use shadow::walk::{translate, Access, AccessKind};
use shadow::{FramePool, GuestMem, HwFlush, Mmu, MmuError, PagingCtx, PfOutcome, PolicyLookup};

use crate::hypercall::{self, Call};
use x86::vmx::vmcs::{control, guest, ro};

use crate::exit::{
    self, advance_rip, inject_exception, reason, Action, Diag, ExitCounters, ExitCtx, ExitHw, GuestRegs,
};
use crate::vmcs::{VmcsError, CR0_SHADOW_OWNED, CR4_SHADOW_OWNED, CR4_VMXE};

/// What shadow paging needs beyond [`ExitHw`].
pub trait ShadowHw: ExitHw {
    /// INVVPID of `kind` (0 individual address, 1 single context, 3 single context
    /// retaining globals) for `vpid` (and `la` for kind 0).
    fn invvpid(&mut self, kind: u64, vpid: u16, la: u64);
    /// Writes the real CR2 (VM entry does not load it: the guest sees this value).
    fn write_cr2(&mut self, value: u64);
}

/// The owner of the page policy: decides what a denied access does.
pub trait PolicyOwner: PolicyLookup {
    /// The guest's own tables allow `access` at `la` (guest-physical `gpa`) but the policy
    /// forbids it. True: the owner changed the policy (e.g. lifted it) and the guest
    /// resumes, re-executing the access; false: fatal.
    fn violation(&self, gpa: u64, la: u64, access: AccessKind) -> bool;
}

impl PolicyOwner for NoPolicy {
    fn violation(&self, _: u64, _: u64, _: AccessKind) -> bool {
        false
    }
}

/// INVVPID types the CPU supports, chosen at load: a type it lacks is replaced by
/// single-context (a superset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushCaps {
    pub individual_addr: bool,
    pub retaining_globals: bool,
    /// Test hook (`kdbt load --test-ignore-user-invlpg`): INVLPG of a user address is
    /// completed without telling the MMU, so stale shadow leaves survive.
    pub ignore_user_invlpg: bool,
}

/// The shadow-paging state of one CPU, as the exit handler sees it.
pub struct ShadowCtx<'a, F: FramePool, M: GuestMem, L: PolicyOwner> {
    pub mmu: &'a mut Mmu<F>,
    pub mem: &'a mut M,
    pub policy: &'a L,
    pub flush: FlushCaps,
    /// CPUID.80000008H:EAX\[7:0\] and CPUID.80000001H:EDX.Page1GB, for [`PagingCtx`].
    pub maxphyaddr: u8,
    pub pages_1g: bool,
}

/// A shadow exit that cannot be handled: the MMU's error and the diagnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowFatal {
    pub error: MmuError,
    pub diag: Diag,
}

const INTR_VALID: u64 = 1 << 31;
const INTR_TYPE_MASK: u64 = 7 << 8;
const INTR_TYPE_HW_EXCEPTION: u64 = 3 << 8;
/// VM-exit interruption information bit 12: "NMI unblocking due to IRET".
const INTR_NMI_UNBLOCKED_BY_IRET: u64 = 1 << 12;
/// Interruptibility state: blocking by NMI.
const BLOCKING_BY_NMI: u64 = 1 << 3;
const VECTOR_PF: u8 = 14;
const VECTOR_DF: u8 = 8;

/// Why the handling of a shadow exit stopped.
enum Stop {
    Mmu(MmuError),
    Vmcs(VmcsError),
}

impl From<MmuError> for Stop {
    fn from(e: MmuError) -> Self {
        Stop::Mmu(e)
    }
}

impl From<VmcsError> for Stop {
    fn from(e: VmcsError) -> Self {
        Stop::Vmcs(e)
    }
}

/// Handles the exit if it belongs to shadow paging: `None` leaves it to
/// [`crate::exit::handle`] (which then counts it). A handled exit is counted here. A
/// failed VMCS access (also while telling whether the exit is ours) is an
/// `Ok(Action::Fatal(Fatal::Vmcs ..))`; `Err` is the shadow MMU's.
pub fn handle<H: ShadowHw, F: FramePool, M: GuestMem, L: PolicyOwner>(
    hw: &mut H,
    regs: &mut GuestRegs,
    ctx: &mut ExitCtx,
    stats: &ExitCounters,
    sh: &mut ShadowCtx<'_, F, M, L>,
) -> Option<Result<Action, ShadowFatal>> {
    let full = hw.read(ro::EXIT_REASON).map(|f| f as u32);
    if matches!(full, Ok(f) if f & (1 << 31) != 0) {
        return None;
    }
    let basic = full.map_or(reason::UNREADABLE, |f| f & 0xffff);
    let ours = full.and_then(|_| ours(hw, regs, basic));
    if ours == Ok(false) {
        return None;
    }
    ctx.last_reason = basic;
    stats.count_exit(basic);
    let r = ours.map_err(Stop::Vmcs).and_then(|_| dispatch(hw, regs, sh, basic));
    Some(match r {
        Ok(()) => Ok(Action::Resume),
        Err(Stop::Vmcs(e)) => Ok(exit::vmcs_fatal(hw, basic, e)),
        Err(Stop::Mmu(error)) => Err(ShadowFatal { error, diag: exit::diag(hw, basic) }),
    })
}

/// Whether the exit of basic reason `basic` is one of shadow paging's.
fn ours(hw: &impl ShadowHw, regs: &GuestRegs, basic: u32) -> Result<bool, VmcsError> {
    Ok(match basic {
        reason::EXCEPTION_NMI => {
            let info = hw.read(ro::VMEXIT_INTERRUPTION_INFO)?;
            info & INTR_VALID != 0 && info & INTR_TYPE_MASK == INTR_TYPE_HW_EXCEPTION && info & 0xff == VECTOR_PF as u64
        }
        reason::CR_ACCESS => {
            let q = hw.read(ro::EXIT_QUALIFICATION)?;
            let (cr, access) = (q & 0xf, (q >> 4) & 3);
            matches!((cr, access), (3, 0) | (3, 1) | (0, 0) | (4, 0))
        }
        reason::INVLPG | reason::INVPCID => true,
        reason::VMCALL => regs.rax == Call::ShadowApplyPolicy.rax() && exit::guest_cpl(hw)? == 0,
        _ => false,
    })
}

fn dispatch<F: FramePool, M: GuestMem, L: PolicyOwner>(
    hw: &mut impl ShadowHw,
    regs: &mut GuestRegs,
    sh: &mut ShadowCtx<'_, F, M, L>,
    basic: u32,
) -> Result<(), Stop> {
    match basic {
        reason::EXCEPTION_NMI => page_fault(hw, sh),
        reason::CR_ACCESS => cr_access(hw, regs, sh),
        reason::INVLPG => {
            let la = hw.read(ro::EXIT_QUALIFICATION)?;
            if !(sh.flush.ignore_user_invlpg && la >> 47 == 0) {
                let f = sh.mmu.on_invlpg(la);
                do_flush(hw, sh.flush, f)?;
            }
            advance_rip(hw)?;
            Ok(())
        }
        reason::VMCALL => {
            // The caller changed the policy of the page in RBX: restrict this CPU's leaves.
            let gpa = regs.rbx;
            let f = sh.mmu.apply_policy(gpa, sh.policy.policy(gpa));
            do_flush(hw, sh.flush, f)?;
            advance_rip(hw)?;
            regs.rax = hypercall::OK;
            Ok(())
        }
        _ => invpcid(hw, regs, sh),
    }
}

/// Performs `f` on this CPU's TLB (the guest's VPID).
pub fn do_flush(hw: &mut impl ShadowHw, caps: FlushCaps, f: HwFlush) -> Result<(), VmcsError> {
    if f == HwFlush::None {
        return Ok(());
    }
    let vpid = hw.read(control::VPID)? as u16;
    match f {
        HwFlush::None => {}
        HwFlush::Page(la) if caps.individual_addr => hw.invvpid(0, vpid, la),
        HwFlush::NonGlobal if caps.retaining_globals => hw.invvpid(3, vpid, 0),
        _ => hw.invvpid(1, vpid, 0),
    }
    Ok(())
}

fn page_fault<F: FramePool, M: GuestMem, L: PolicyOwner>(
    hw: &mut impl ShadowHw,
    sh: &mut ShadowCtx<'_, F, M, L>,
) -> Result<(), Stop> {
    let la = hw.read(ro::EXIT_QUALIFICATION)?;
    let info = hw.read(ro::VMEXIT_INTERRUPTION_INFO)?;
    let ec = hw.read(ro::VMEXIT_INTERRUPTION_ERR_CODE)? as u32;
    let rflags = hw.read(guest::RFLAGS)?;
    match sh.mmu.on_page_fault(sh.mem, sh.policy, la, ec, rflags)? {
        PfOutcome::Resolved { flush } => {
            do_flush(hw, sh.flush, flush)?;
            // The faulting instruction runs again. If it was an IRET that unblocked NMIs
            // before faulting, blocking by NMI must hold again (SDM 27.2.3), unless the
            // fault hit the delivery of an event (then bit 12 is undefined).
            if info & INTR_NMI_UNBLOCKED_BY_IRET != 0 && hw.read(ro::IDT_VECTORING_INFO)? & INTR_VALID == 0 {
                let s = hw.read(guest::INTERRUPTIBILITY_STATE)?;
                hw.write(guest::INTERRUPTIBILITY_STATE, s | BLOCKING_BY_NMI)?;
            }
            Ok(())
        }
        PfOutcome::Reflect { error_code, cr2 } => {
            let vect = hw.read(ro::IDT_VECTORING_INFO)?;
            hw.write_cr2(cr2);
            if vect & INTR_VALID != 0 && vect & INTR_TYPE_MASK == INTR_TYPE_HW_EXCEPTION && vect & 0xff == 14 {
                // A #PF while delivering a #PF: a double fault, as natively.
                inject_exception(hw, VECTOR_DF, Some(0))?;
            } else {
                inject_exception(hw, VECTOR_PF, Some(error_code.bits()))?;
            }
            Ok(())
        }
        PfOutcome::Policy { la, gpa, access } => {
            if sh.policy.violation(gpa, la, access) {
                Ok(())
            } else {
                Err(MmuError::Unsupported("a page policy denied an access").into())
            }
        }
    }
}

fn cr_access<F: FramePool, M: GuestMem, L: PolicyOwner>(
    hw: &mut impl ShadowHw,
    regs: &mut GuestRegs,
    sh: &mut ShadowCtx<'_, F, M, L>,
) -> Result<(), Stop> {
    let q = hw.read(ro::EXIT_QUALIFICATION)?;
    let cr = q & 0xf;
    let access = (q >> 4) & 3;
    let reg = ((q >> 8) & 0xf) as u8;
    let value = if reg == 4 { hw.read(guest::RSP)? } else { regs.gpr(reg).map_or(0, |r| *r) };
    match (cr, access) {
        (3, 1) => {
            // MOV from CR3: the guest's own value, never the shadow root.
            let v = sh.mmu.guest_cr3();
            match regs.gpr(reg) {
                Some(r) => *r = v,
                None => hw.write(guest::RSP, v)?,
            }
        }
        (3, _) => {
            let cr4 = hw.read(guest::CR4)?;
            match sh.mmu.on_cr3_write(value, cr4) {
                Ok(a) => {
                    hw.write(guest::CR3, a.shadow_cr3)?;
                    do_flush(hw, sh.flush, a.flush)?;
                }
                Err(MmuError::InvalidCr3(_)) => {
                    inject_exception(hw, exit::VECTOR_GP, Some(0))?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        _ => {
            // MOV to CR0/CR4: the guest's view takes the value; the real register takes it
            // too, except the bits VMX operation fixes (they keep their real values).
            let (real_f, shadow_f, mask_f, own) = if cr == 4 {
                (guest::CR4, control::CR4_READ_SHADOW, control::CR4_GUEST_HOST_MASK, CR4_SHADOW_OWNED)
            } else {
                (guest::CR0, control::CR0_READ_SHADOW, control::CR0_GUEST_HOST_MASK, CR0_SHADOW_OWNED)
            };
            let mask = hw.read(mask_f)?;
            let fixed = mask & !own | if cr == 4 { CR4_VMXE } else { 0 };
            let old_real = hw.read(real_f)?;
            let new_real = (value & !fixed) | (old_real & fixed);
            let (cr0, cr4) = if cr == 4 { (hw.read(guest::CR0)?, new_real) } else { (new_real, hw.read(guest::CR4)?) };
            let efer = hw.read(guest::IA32_EFER_FULL)?;
            let pctx =
                PagingCtx::from_regs(cr0, cr4, efer, sh.maxphyaddr, sh.pages_1g).map_err(MmuError::Unsupported)?;
            let f = sh.mmu.set_ctx(pctx)?;
            hw.write(shadow_f, value & mask)?;
            hw.write(real_f, new_real)?;
            // A PCIDE change re-tags the current hierarchy.
            hw.write(guest::CR3, sh.mmu.shadow_cr3())?;
            do_flush(hw, sh.flush, f)?;
        }
    }
    advance_rip(hw)?;
    Ok(())
}

/// INVPCID: type in the register operand, the 16-byte descriptor (PCID, linear address)
/// in memory, read through the guest's own tables.
fn invpcid<F: FramePool, M: GuestMem, L: PolicyOwner>(
    hw: &mut impl ShadowHw,
    regs: &mut GuestRegs,
    sh: &mut ShadowCtx<'_, F, M, L>,
) -> Result<(), Stop> {
    let info = hw.read(ro::VMEXIT_INSTRUCTION_INFO)?;
    let disp = hw.read(ro::EXIT_QUALIFICATION)?;
    let rsp = hw.read(guest::RSP)?;
    let mut reg = |n: u64| -> u64 {
        let n = (n & 0xf) as u8;
        if n == 4 {
            rsp
        } else {
            regs.gpr(n).map_or(0, |r| *r)
        }
    };
    let scale = info & 3;
    let addr_size = (info >> 7) & 7;
    let seg = (info >> 15) & 7;
    let index = if info & (1 << 22) == 0 { reg(info >> 18) << scale } else { 0 };
    let base = if info & (1 << 27) == 0 { reg(info >> 23) } else { 0 };
    let kind = reg(info >> 28);
    let seg_base = match seg {
        4 => hw.read(guest::FS_BASE)?,
        5 => hw.read(guest::GS_BASE)?,
        _ => 0,
    };
    let mut la = seg_base.wrapping_add(base).wrapping_add(index).wrapping_add(disp);
    match addr_size {
        0 => la &= 0xffff,
        1 => la &= 0xffff_ffff,
        _ => {}
    }
    if la & 7 != 0 {
        // Linux's descriptors are 8-aligned; an unaligned one is not emulated.
        return Err(MmuError::Unsupported("INVPCID descriptor not 8-byte aligned").into());
    }
    // An explicit supervisor read (SMAP applies unless RFLAGS.AC).
    let ac = hw.read(guest::RFLAGS)? & (1 << 18) != 0;
    let access = Access { ac, ..Access::sup(AccessKind::Read) };
    let w = translate(&*sh.mem, sh.mmu.ctx(), sh.mmu.guest_cr3(), la, access)
        .map_err(|_| MmuError::Unsupported("INVPCID descriptor not readable"))?;
    let gpa = w.translation.gpa;
    // Both halves lie in the same page (8-aligned, 16 bytes, unless it straddles).
    let gpa_hi = if (la & 0xfff) == 0xff8 {
        translate(&*sh.mem, sh.mmu.ctx(), sh.mmu.guest_cr3(), la + 8, access)
            .map_err(|_| MmuError::Unsupported("INVPCID descriptor not readable"))?
            .translation
            .gpa
    } else {
        gpa + 8
    };
    let d0 = sh.mem.read_u64(gpa).ok_or(MmuError::Unbacked(gpa))?;
    let d1 = sh.mem.read_u64(gpa_hi).ok_or(MmuError::Unbacked(gpa_hi))?;
    if d0 >> 12 != 0 {
        inject_exception(hw, exit::VECTOR_GP, Some(0))?;
        return Ok(());
    }
    match sh.mmu.on_invpcid(kind, d0 & 0xfff, d1) {
        Ok(f) => do_flush(hw, sh.flush, f)?,
        Err(MmuError::InvalidInvpcid) => {
            inject_exception(hw, exit::VECTOR_GP, Some(0))?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    advance_rip(hw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    use super::*;

    use core::cell::RefCell;

    use crate::exit::Fatal;
    use crate::vmcs::{field_name, Op, VmFail, Vmcs};

    /// Fake VMCS, CPU and guest memory.
    #[derive(Clone, Default)]
    struct Fake {
        f: BTreeMap<u32, u64>,
        /// The one VMCS access that fails (VMfailValid, error 12).
        fail: Option<(Op, u32)>,
        /// Every access through [`Vmcs`], in order.
        log: RefCell<Vec<(Op, u32)>>,
        invvpids: Vec<(u64, u16, u64)>,
        cr2: Option<u64>,
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
            [leaf, sub, 0, 0]
        }
        fn xsetbv(&mut self, _: u32, _: u64) -> bool {
            false
        }
        fn wbinvd(&mut self) {}
        fn rdmsr_safe(&mut self, _: u32) -> Option<u64> {
            None
        }
        fn wrmsr_safe(&mut self, _: u32, _: u64) -> bool {
            false
        }
        fn invept_all(&mut self) {}
    }

    impl ShadowHw for Fake {
        fn invvpid(&mut self, kind: u64, vpid: u16, la: u64) {
            self.invvpids.push((kind, vpid, la));
        }
        fn write_cr2(&mut self, value: u64) {
            self.cr2 = Some(value);
        }
    }

    #[derive(Default)]
    struct Mem(BTreeMap<u64, u64>);
    impl GuestMem for Mem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            (gpa < 1 << 30).then(|| self.0.get(&gpa).copied().unwrap_or(0))
        }
        fn cmpxchg_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Option<u64> {
            let old = self.read_u64(gpa)?;
            if old == expected {
                self.0.insert(gpa, new);
            }
            Some(old)
        }
    }

    /// Shadow frames at 0x1000_0000 and up, in a map.
    #[derive(Default)]
    struct Pool {
        next: u64,
        m: BTreeMap<(u64, usize), u64>,
    }
    impl FramePool for Pool {
        fn take_frame(&mut self) -> Option<u64> {
            self.next += 1;
            (self.next <= 64).then(|| 0x1000_0000 + self.next * 0x1000)
        }
        fn return_frame(&mut self, _: u64) {}
        fn read_entry(&self, pa: u64, i: usize) -> u64 {
            self.m.get(&(pa, i)).copied().unwrap_or(0)
        }
        fn write_entry(&mut self, pa: u64, i: usize, v: u64) {
            self.m.insert((pa, i), v);
        }
    }

    const CR3: u64 = 0x1000;
    const LA: u64 = 0x40_0000;
    const LINUX_CR0: u64 = 0x8005_0033;
    const LINUX_CR4: u64 = 0x3506f0 | CR4_VMXE;
    const EFER: u64 = 0xd01;

    /// Guest tables: LA -> 0x5000 (present, writable, user, dirty); LA + 4K not present.
    fn guest() -> Mem {
        let mut m = Mem::default();
        let (p, rw, us) = (1u64, 2u64, 4u64);
        m.0.insert(CR3, 0x2000 | p | rw | us);
        m.0.insert(0x2000, 0x3000 | p | rw | us);
        m.0.insert(0x3000 + 2 * 8, 0x4000 | p | rw | us);
        m.0.insert(0x4000, 0x5000 | p | rw | us | (1 << 6));
        m
    }

    fn mmu() -> Mmu<Pool> {
        let ctx = PagingCtx::from_regs(LINUX_CR0, LINUX_CR4, EFER, 46, true).unwrap();
        Mmu::new(Pool::default(), 64, ctx, CR3).map_err(|e| e.0).unwrap()
    }

    fn exit(reason: u32) -> Fake {
        let mut f = Fake::default();
        f.vmwrite(ro::EXIT_REASON, reason as u64);
        f.vmwrite(ro::VMEXIT_INSTRUCTION_LEN, 3);
        f.vmwrite(guest::RIP, 0xffff_ffff_8100_0000);
        f.vmwrite(guest::CR0, LINUX_CR0);
        f.vmwrite(guest::CR4, LINUX_CR4);
        f.vmwrite(guest::IA32_EFER_FULL, EFER);
        f.vmwrite(control::VPID, 3);
        f
    }

    fn pf(la: u64, ec: u64) -> Fake {
        let mut f = exit(reason::EXCEPTION_NMI);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, INTR_VALID | INTR_TYPE_HW_EXCEPTION | (1 << 11) | 14);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_ERR_CODE, ec);
        f.vmwrite(ro::EXIT_QUALIFICATION, la);
        f
    }

    fn run(
        f: &mut Fake,
        m: &mut Mmu<Pool>,
        mem: &mut Mem,
        regs: &mut GuestRegs,
    ) -> Option<Result<Action, ShadowFatal>> {
        let mut ctx = ExitCtx::new(0, 0);
        let stats = ExitCounters::new();
        let mut sh = ShadowCtx {
            mmu: m,
            mem,
            policy: &NoPolicy,
            flush: FlushCaps { individual_addr: true, retaining_globals: true, ignore_user_invlpg: false },
            maxphyaddr: 46,
            pages_1g: true,
        };
        handle(f, regs, &mut ctx, &stats, &mut sh)
    }

    fn injected(f: &Fake) -> Option<(u8, u32)> {
        let info = f.vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD);
        (info & INTR_VALID != 0).then(|| (info as u8, f.vmread(control::VMENTRY_EXCEPTION_ERR_CODE) as u32))
    }

    #[test]
    fn page_faults_resolve_or_reflect() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        // A user write to the mapped page: resolved, the instruction runs again.
        let mut f = pf(LA + 0x10, 0b110);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(injected(&f), None);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000);
        assert_eq!(m.shadow_leaf(LA) & !0xfff & ((1 << 52) - 1), 0x5000);
        assert_eq!(m.counters().faults_resolved, 1);
        // A read of the page after it, which the guest does not map: #PF reflected.
        let mut f = pf(LA + 0x1008, 0b100);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(injected(&f), Some((14, 0b100)));
        assert_eq!(f.cr2, Some(LA + 0x1008));
        // The same during the delivery of a #PF: #DF.
        let mut f = pf(LA + 0x1008, 0b100);
        f.vmwrite(ro::IDT_VECTORING_INFO, INTR_VALID | INTR_TYPE_HW_EXCEPTION | 14);
        run(&mut f, &mut m, &mut mem, &mut r);
        assert_eq!(injected(&f), Some((8, 0)));
    }

    #[test]
    fn cr3_reads_see_the_guest_value_and_writes_switch_roots() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        // mov rbx, cr3 (access 1, reg 3).
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 3 | (1 << 4) | (3 << 8));
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(r.rbx, CR3);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
        // mov cr3, rax with another PML4: the VMCS gets a shadow root, never the guest's.
        r.rax = 0x9000;
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 3);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        let root = f.vmread(guest::CR3);
        assert!(root >= 0x1000_0000, "{root:#x}");
        assert_eq!(m.guest_cr3(), 0x9000);
        // A flushing CR3 write: non-global INVVPID of the guest's VPID.
        assert!(f.invvpids.iter().any(|&(k, v, _)| k == 3 && v == 3) || f.invvpids.iter().any(|&(k, _, _)| k == 1));
        // Bit 63 without PCIDE: #GP(0), RIP unchanged.
        r.rax = 0x9000 | 1 << 63;
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 3);
        run(&mut f, &mut m, &mut mem, &mut r);
        assert_eq!(injected(&f), Some((13, 0)));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000);
    }

    #[test]
    fn invlpg_flushes_the_page_and_cr4_reaches_the_mmu() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        run(&mut pf(LA, 0b100), &mut m, &mut mem, &mut r);
        assert_ne!(m.shadow_leaf(LA), 0);
        let mut f = exit(reason::INVLPG);
        f.vmwrite(ro::EXIT_QUALIFICATION, LA);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(m.shadow_leaf(LA), 0);
        assert!(f.invvpids.contains(&(0, 3, LA)) || f.invvpids.iter().any(|&(k, _, _)| k == 1));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
        // mov cr4, rcx clearing PGE: real CR4 follows (VMXE kept), the guest reads its
        // value, the MMU flushed everything.
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE | CR4_SHADOW_OWNED);
        f.vmwrite(ro::EXIT_QUALIFICATION, 4 | (1 << 8));
        r.rcx = (LINUX_CR4 & !CR4_VMXE) & !(1 << 7);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(f.vmread(guest::CR4), LINUX_CR4 & !(1 << 7));
        assert_eq!(f.vmread(control::CR4_READ_SHADOW) & CR4_VMXE, 0);
        assert!(!m.ctx().pge);
        assert!(f.invvpids.iter().any(|&(k, _, _)| k == 1));
    }

    #[test]
    fn invpcid_reads_its_descriptor_through_the_guest_tables() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        run(&mut pf(LA, 0b100), &mut m, &mut mem, &mut r);
        assert_ne!(m.shadow_leaf(LA), 0);
        // Descriptor on a supervisor page (SMAP is on): LA + 0x2100 -> gpa 0x6100, holding
        // PCID 0 and address LA.
        mem.0.insert(0x4000 + 2 * 8, 0x6000 | 0b11 | (1 << 6));
        mem.0.insert(0x6100, 0);
        mem.0.insert(0x6108, LA);
        // invpcid rax, [rbx + 0x80]: base RBX (3), no index, 64-bit addressing, type in RAX.
        let info = (2 << 7) | (1 << 22) | (3 << 23);
        let exit_invpcid = |kind: u64, r: &mut GuestRegs| {
            r.rax = kind;
            r.rbx = LA + 0x2080;
            let mut f = exit(reason::INVPCID);
            f.vmwrite(ro::VMEXIT_INSTRUCTION_INFO, info);
            f.vmwrite(ro::EXIT_QUALIFICATION, 0x80);
            f
        };
        let mut f = exit_invpcid(0, &mut r);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), Some(Ok(Action::Resume)));
        assert_eq!(m.shadow_leaf(LA), 0);
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0003);
        assert_eq!(m.counters().invpcids, 1);
        // Type 4 does not exist: #GP(0), RIP unchanged.
        let mut f = exit_invpcid(4, &mut r);
        run(&mut f, &mut m, &mut mem, &mut r);
        assert_eq!(injected(&f), Some((13, 0)));
        assert_eq!(f.vmread(guest::RIP), 0xffff_ffff_8100_0000);
        // Bits 63:12 of the PCID quadword set: #GP(0).
        mem.0.insert(0x6100, 1 << 12);
        let mut f = exit_invpcid(2, &mut r);
        run(&mut f, &mut m, &mut mem, &mut r);
        assert_eq!(injected(&f), Some((13, 0)));
    }

    #[test]
    fn other_exits_are_left_to_the_generic_handler() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        assert_eq!(run(&mut exit(reason::CPUID), &mut m, &mut mem, &mut r), None);
        // An NMI exit (type 2) is not a #PF.
        let mut f = exit(reason::EXCEPTION_NMI);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, INTR_VALID | (2 << 8) | 2);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), None);
        // CLTS (access 2) neither.
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 2 << 4);
        assert_eq!(run(&mut f, &mut m, &mut mem, &mut r), None);
    }

    fn failed(op: Op, field: u32) -> VmcsError {
        VmcsError { op, field, fail: VmFail::Valid(12) }
    }

    fn vmcs_failure(r: Option<Result<Action, ShadowFatal>>) -> Option<VmcsError> {
        match r {
            Some(Ok(Action::Fatal(Fatal::Vmcs(e), _))) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn a_failed_vmcs_access_ends_a_shadow_exit_naming_the_field() {
        let (mut m, mut mem, mut r) = (mmu(), guest(), GuestRegs::default());
        // The faulting address unreadable: the MMU is never asked, nothing injected.
        let mut f = pf(LA + 0x10, 0b110);
        f.fail = Some((Op::Read, ro::EXIT_QUALIFICATION));
        assert_eq!(vmcs_failure(run(&mut f, &mut m, &mut mem, &mut r)), Some(failed(Op::Read, ro::EXIT_QUALIFICATION)));
        assert_eq!((m.counters().faults_resolved, m.shadow_leaf(LA), injected(&f)), (0, 0, None));
        // Whether an exit is shadow paging's cannot be told: fatal here, not passed on as
        // someone else's (the #PF would reach the generic handler as an unexpected one).
        let mut f = pf(LA + 0x10, 0b110);
        f.fail = Some((Op::Read, ro::VMEXIT_INTERRUPTION_INFO));
        assert_eq!(
            vmcs_failure(run(&mut f, &mut m, &mut mem, &mut r)),
            Some(failed(Op::Read, ro::VMEXIT_INTERRUPTION_INFO))
        );
        let mut f = exit(reason::VMCALL);
        f.fail = Some((Op::Read, guest::SS_ACCESS_RIGHTS));
        let mut r = GuestRegs { rax: Call::ShadowApplyPolicy.rax(), rbx: 0x5000, ..Default::default() };
        assert_eq!(
            vmcs_failure(run(&mut f, &mut m, &mut mem, &mut r)),
            Some(failed(Op::Read, guest::SS_ACCESS_RIGHTS))
        );
        assert_eq!(r.rax, Call::ShadowApplyPolicy.rax());
        let mut f = exit(reason::INVLPG);
        f.fail = Some((Op::Read, ro::EXIT_REASON));
        assert_eq!(vmcs_failure(run(&mut f, &mut m, &mut mem, &mut r)), Some(failed(Op::Read, ro::EXIT_REASON)));
    }

    /// Shadow exits that each end in a resumed guest, with their own MMU and guest memory.
    fn resumed_exits() -> Vec<(&'static str, Fake, GuestRegs, Mem)> {
        let mut v = Vec::new();
        let mut f = pf(LA + 0x10, 0b110);
        f.vmwrite(ro::VMEXIT_INTERRUPTION_INFO, f.vmread(ro::VMEXIT_INTERRUPTION_INFO) | INTR_NMI_UNBLOCKED_BY_IRET);
        v.push(("#PF resolved after an IRET", f, GuestRegs::default(), guest()));
        v.push(("#PF reflected", pf(LA + 0x1008, 0b100), GuestRegs::default(), guest()));
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 3 | (1 << 4) | (4 << 8));
        v.push(("mov rsp, cr3", f, GuestRegs::default(), guest()));
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(ro::EXIT_QUALIFICATION, 3);
        v.push(("mov cr3, rax", f, GuestRegs { rax: 0x9000, ..Default::default() }, guest()));
        let mut f = exit(reason::CR_ACCESS);
        f.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE | CR4_SHADOW_OWNED);
        f.vmwrite(ro::EXIT_QUALIFICATION, 4 | (1 << 8));
        v.push((
            "mov cr4, rcx",
            f,
            GuestRegs { rcx: (LINUX_CR4 & !CR4_VMXE) & !(1 << 7), ..Default::default() },
            guest(),
        ));
        let mut f = exit(reason::INVLPG);
        f.vmwrite(ro::EXIT_QUALIFICATION, LA);
        v.push(("invlpg", f, GuestRegs::default(), guest()));
        let r = GuestRegs { rax: Call::ShadowApplyPolicy.rax(), rbx: 0x5000, ..Default::default() };
        v.push(("apply policy", exit(reason::VMCALL), r, guest()));
        // invpcid rax, [rbx + 0x80] with a descriptor at LA + 0x2100 (see the INVPCID test).
        let mut mem = guest();
        mem.0.insert(0x4000 + 2 * 8, 0x6000 | 0b11 | (1 << 6));
        mem.0.insert(0x6108, LA);
        let mut f = exit(reason::INVPCID);
        f.vmwrite(ro::VMEXIT_INSTRUCTION_INFO, (2 << 7) | (1 << 22) | (3 << 23) | (5 << 15));
        f.vmwrite(ro::EXIT_QUALIFICATION, 0x80);
        v.push(("invpcid", f, GuestRegs { rax: 0, rbx: LA + 0x2080, ..Default::default() }, mem));
        v
    }

    #[test]
    fn every_vmcs_access_of_a_shadow_exit_that_fails_ends_it_naming_the_field() {
        let mut reached = Vec::new();
        for (what, f, regs, mem) in resumed_exits() {
            let (mut f0, mut r0, mut mem0, mut m0) = (f.clone(), regs, Mem(mem.0.clone()), mmu());
            assert_eq!(run(&mut f0, &mut m0, &mut mem0, &mut r0), Some(Ok(Action::Resume)), "{what}");
            for (op, field) in f0.log.take() {
                if !reached.contains(&(op, field)) {
                    reached.push((op, field));
                }
                assert_ne!(field_name(field), "field", "{what}: {field:#x} has no name");
                let mut f1 = Fake { fail: Some((op, field)), ..f.clone() };
                let (mut r1, mut mem1, mut m1) = (regs, Mem(mem.0.clone()), mmu());
                let got = vmcs_failure(run(&mut f1, &mut m1, &mut mem1, &mut r1));
                assert_eq!(got, Some(failed(op, field)), "{what}: {op:?} {}", field_name(field));
            }
        }
        for access in [
            (Op::Read, control::VPID),
            (Op::Read, ro::VMEXIT_INSTRUCTION_INFO),
            (Op::Read, guest::GS_BASE),
            (Op::Write, guest::CR3),
            (Op::Write, guest::RSP),
            (Op::Write, guest::INTERRUPTIBILITY_STATE),
            (Op::Write, control::VMENTRY_INTERRUPTION_INFO_FIELD),
        ] {
            assert!(reached.contains(&access), "{access:?} not reached");
        }
    }
}
