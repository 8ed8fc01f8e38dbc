//! VMX root mode: the VM-exit handler and the devirtualize path.
use core::arch::asm;
use core::sync::atomic::Ordering;

use vmx::exit::{self, Action, Diag, ExitHw, Fatal, GuestRegs};
use vmx::vmcs::{DevirtState, Op, VmFail, Vmcs, VmcsError};

use super::entry;
use super::launch::RawDtr;
use super::percpu::{self, PerCpu};

/// Checked VMWRITE to the current VMCS: the CPU's VMfailInvalid/VMfailValid (with the
/// VM-instruction error) instead of ignoring failure.
pub fn vmwrite_checked(field: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMX root operation (callers have a current VMCS or get VMfailInvalid); the
    // flags are read in the same asm block, right after the instruction.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}", f = in(reg) field as u64, v = in(reg) value,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    vmx_status(cf, zf)
}

/// Checked VMREAD of the current VMCS.
pub fn vmread_checked(field: u32) -> Result<u64, VmFail> {
    let (cf, zf): (u8, u8);
    let value: u64;
    // SAFETY: as for `vmwrite_checked`; VMREAD only writes the output register.
    unsafe {
        asm!("vmread {v}, {f}", "setc {cf}", "setz {zf}", f = in(reg) field as u64, v = out(reg) value,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    vmx_status(cf, zf).map(|()| value)
}

/// Checked VMCLEAR of the VMCS at physical address `pa`.
fn vmclear_checked(pa: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMX root operation; VMCLEAR reads the 8-byte operand (`pa`, on our stack) and
    // flushes that VMCS, which is this CPU's own; flags read in the same block.
    unsafe {
        asm!("vmclear [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &pa, cf = out(reg_byte) cf,
             zf = out(reg_byte) zf, options(nostack));
    }
    vmx_status(cf, zf)
}

/// Checked VMXOFF.
fn vmxoff_checked() -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMX root operation, about to leave it; flags read in the same block.
    unsafe { asm!("vmxoff", "setc {cf}", "setz {zf}", cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack)) };
    vmx_status(cf, zf)
}

fn vmx_status(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        // VMfailValid: the error number is in the current VMCS.
        let mut e: u64 = 0;
        let zf2: u8;
        // SAFETY: VMREAD of the VM-instruction error field of the current VMCS (there is
        // one: VMfailValid says so); flags read in the same block.
        unsafe {
            asm!("vmread {v}, {f}", "setbe {z}", f = in(reg) x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR as u64,
                 v = inout(reg) e, z = out(reg_byte) zf2, options(nostack));
        }
        if zf2 != 0 {
            e = 0;
        }
        Err(VmFail::Valid(e as u32))
    } else {
        Ok(())
    }
}

/// The hardware of the exit handler in root mode: the current VMCS through checked
/// VMREAD/VMWRITE, whose failures the handler reports.
pub struct RootHw;

impl Vmcs for RootHw {
    fn read(&self, field: u32) -> Result<u64, VmcsError> {
        vmread_checked(field).map_err(|fail| VmcsError { op: Op::Read, field, fail })
    }
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError> {
        vmwrite_checked(field, value).map_err(|fail| VmcsError { op: Op::Write, field, fail })
    }
}

impl ExitHw for RootHw {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    fn xsetbv(&mut self, xcr: u32, value: u64) -> bool {
        // The exit handler calls this only for a value `vmx::xsave::check_xsetbv` accepted
        // against this CPU's CPUID.(0DH,0) (the SDM's XCR0 rules, AVX-512, MPX and AMX
        // included), so XSETBV cannot #GP here, in root mode.
        // SAFETY: CR4.OSXSAVE is set (the guest executed XSETBV without #UD), the value is
        // one hardware accepts (above), and root mode and the guest share XCR0 anyway.
        unsafe {
            asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
        };
        true
    }
    fn wbinvd(&mut self) {
        // SAFETY: WBINVD at CPL 0 only writes back and invalidates caches.
        unsafe { asm!("wbinvd", options(nostack)) };
    }
    fn rdmsr_safe(&mut self, msr: u32) -> Option<u64> {
        entry::rdmsr_safe(msr)
    }
    fn wrmsr_safe(&mut self, msr: u32, value: u64) -> bool {
        entry::wrmsr_safe(msr, value)
    }
    fn invept_all(&mut self) {
        invept_all();
    }
    fn ept_call(&mut self, call: vmx::hypercall::Call, rbx: u64, rcx: u64) -> u64 {
        super::ept::root_call(call, rbx, rcx)
    }
}

/// INVEPT, all-context type (EPT mode only: preflight required Features::INVEPT_ALL).
/// VMX root operation only.
pub(super) fn invept_all() {
    let desc = [0u64; 2];
    // SAFETY: called in VMX root operation (the launcher after VMXON, root mode's exit
    // handler); all-context INVEPT, which preflight required, with a valid descriptor.
    unsafe { asm!("invept {t}, [{d}]", t = in(reg) 2u64, d = in(reg) &desc, options(nostack)) };
}

impl vmx::shadow_exit::ShadowHw for RootHw {
    fn invvpid(&mut self, kind: u64, vpid: u16, la: u64) {
        let desc = [vpid as u64, la];
        // SAFETY: VMX root operation; the shadow MMU's flush of this CPU's guest VPID, of a
        // type the load path checked (single-context required; the others only when the
        // CPU reports them, see `FlushCaps`).
        unsafe { asm!("invvpid {t}, [{d}]", t = in(reg) kind, d = in(reg) &desc, options(nostack)) };
    }
    fn write_cr2(&mut self, value: u64) {
        // SAFETY: root mode never takes a #PF (it would be fatal anyway) and VM entry does
        // not load CR2: this is the value the guest's #PF handler reads.
        unsafe { asm!("mov cr2, {}", in(reg) value, options(nostack, nomem)) };
    }
}

/// Shadow paging's share of an exit (None: not one of its exits, or EPT mode).
fn shadow_exit(pc: &mut PerCpu, regs: &mut GuestRegs) -> Option<Action> {
    // SAFETY: the shadow block lives as long as the per-CPU block; in root mode only this
    // CPU touches its MMU.
    let sc = unsafe { pc.ctl.shadow.as_mut() }?;
    let super::shadow::ShadowCpu { mmu, mem, maxphyaddr, pages_1g, .. } = sc;
    let mmu = mmu.as_mut()?;
    // SAFETY: the shared page lives as long as the block.
    let shared = unsafe { &*pc.ctl.shared };
    let mut sh = vmx::shadow_exit::ShadowCtx {
        mmu,
        mem,
        policy: &super::shadow::POLICY,
        flush: pc.ctl.flush,
        maxphyaddr: *maxphyaddr,
        pages_1g: *pages_1g,
    };
    let r = vmx::shadow_exit::handle(&mut RootHw, regs, &mut pc.ctl.exits, &shared.stats, &mut sh)?;
    sc.publish();
    Some(match r {
        Ok(a) => a,
        Err(f) => {
            super::serial::line(format_args!("kdbt: cpu{}: shadow MMU: {}", pc.ctl.cpu, f.error));
            Action::Fatal(exit::Fatal::ShadowMmu, f.diag)
        }
    })
}

/// Result code the launcher sees when the first VM entry failed after VMLAUNCH passed its
/// checks (exit reason in the low bits).
pub const LAUNCH_ENTRY_FAILED: u64 = 0xdead_0000_0000_0000;

/// Called by the VM-exit stub with the guest's registers on the host stack. Returns 0 to
/// VMRESUME, 1 when this CPU has left VMX operation and the iret frame is ready.
#[no_mangle]
extern "C" fn kdbt_vmexit_handler(regs: &mut GuestRegs) -> u64 {
    // SAFETY: `regs` lives on this CPU's host stack, inside its per-CPU block, which stays
    // allocated while the CPU is virtualized; only this CPU touches it in root mode.
    let pc = unsafe { &mut *percpu::from_rsp(regs as *mut GuestRegs as u64) };
    // SAFETY: the shared page lives as long as the block.
    let shared = unsafe { &*pc.ctl.shared };
    // The first exit after VMLAUNCH ends the launch (the guest cannot write this block);
    // a fatal one returns to the launcher only while the guest is still in it (a CPU may
    // make its first exit long after the load: a triple fault in the kernel's emergency
    // restart was once taken for a failed launch, devirtualized and given the launcher's
    // rax). A failed entry never left it.
    let launching = core::mem::replace(&mut pc.ctl.launching, false) && !shared.left_launcher.load(Ordering::Acquire);
    let action = match shadow_exit(pc, regs) {
        Some(a) => a,
        None => exit::handle(&mut RootHw, regs, &mut pc.ctl.exits, &shared.stats),
    };
    if pc.ctl.exits.last_reason == exit::reason::EXCEPTION_NMI {
        unblock_nmis();
    }
    match action {
        Action::Resume => {
            // Settle events and NMIs; again if an NMI hit root mode meanwhile (one that
            // arrives after the last check arms the NMI window itself: see entry.rs).
            loop {
                if pc.ctl.nmi_pending.swap(0, Ordering::Relaxed) != 0 {
                    pc.ctl.exits.nmi_pending = true;
                }
                if let Err(e) = exit::prepare_entry(&mut RootHw, &mut pc.ctl.exits, &shared.stats) {
                    // Not resumed with an event lost or a control half set: fatal.
                    let reason = pc.ctl.exits.last_reason;
                    return fatal(pc, regs, launching, Fatal::Vmcs(e), exit::diag(&RootHw, reason));
                }
                if pc.ctl.nmi_pending.load(Ordering::Relaxed) == 0 {
                    break;
                }
            }
            0
        }
        Action::Devirtualize => match devirtualize(pc) {
            Ok(()) => 1,
            // Still virtualized, nothing changed: the guest gets the diagnostic.
            Err(e) => fatal(pc, regs, launching, Fatal::Vmcs(e), exit::diag(&RootHw, pc.ctl.exits.last_reason)),
        },
        Action::Fatal(kind, diag) => fatal(pc, regs, launching, kind, diag),
    }
}

/// A fatal exit (`kind`, `diag`): the exit handler's return value.
fn fatal(pc: &mut PerCpu, regs: &mut GuestRegs, launching: bool, kind: Fatal, diag: Diag) -> u64 {
    let cpu = pc.ctl.cpu;
    if launching {
        // The first entry failed (e.g. invalid guest state) or the launcher's own code
        // could not run as a guest: return to the launcher, which reports the reason and
        // cleans up.
        regs.rax = LAUNCH_ENTRY_FAILED | diag.reason as u64;
        if let Err(e) = devirtualize(pc) {
            // Neither the launcher (VMX operation cannot be left with this state) nor the
            // guest (the entry may have failed) can be returned to.
            super::serial::fatal(format_args!(
                "kdbt: cpu{cpu}: the launch's first VM exit was fatal and devirtualize cannot read \
                 the state to restore: {e}; halting this CPU"
            ));
        }
        return 1;
    }
    // SAFETY: the shared page lives as long as the block.
    let shared = unsafe { &*pc.ctl.shared };
    let (now, hidden) = if kind == Fatal::EptViolation && diag.readable(Diag::PHYSICAL) {
        super::ept::root_describe(diag.guest_physical)
    } else {
        (::ept::diag::Now::Unknown, None)
    };
    super::serial::line(format_args!("kdbt: {}", super::fatal::Describe { cpu, kind, diag, now, hidden }));
    // Make the guest panic with this diagnostic: record it and deliver an NMI, whose kdbt
    // handler panics (at any CPL, from the faulting context, and without root mode writing
    // guest memory). The CPU halts instead where that cannot work: the guest triple-faulted,
    // the entry itself failed or there is no current VMCS (`Fatal::resumable`), this CPU is
    // still on its way to that NMI (a second fatal exit), or another CPU already holds the
    // record.
    if !(kind.resumable() && super::fatal::record(cpu, super::fatal::Entry { kind, diag, now, hidden })) {
        super::serial::fatal(format_args!("kdbt: cpu{cpu}: cannot hand the fatal exit to the guest; halting this CPU"));
    }
    pc.ctl.exits.nmi_pending = true;
    if let Err(e) = exit::prepare_entry(&mut RootHw, &mut pc.ctl.exits, &shared.stats) {
        super::serial::fatal(format_args!(
            "kdbt: cpu{cpu}: cannot hand the fatal exit to the guest: {e}; halting this CPU"
        ));
    }
    0
}

/// After a VM exit caused by an NMI the CPU blocks NMIs until the next IRET (Bochs: an
/// IRET outside the guest; an IRET inside it only ends virtual-NMI blocking). Root mode
/// never executes one on its own, so an NMI arriving later (e.g. the guest's NMI handler
/// sending itself another) would be held back until some devirtualize: run an IRET to the
/// next instruction now, as KVM does. An NMI pending already arrives right here, through
/// the host IDT, and is recorded for the guest.
fn unblock_nmis() {
    // SAFETY: builds an interrupt frame for the current context (host SS, current RSP,
    // RFLAGS, host CS, the label) and returns to it; nothing else changes.
    unsafe {
        asm!(
            "mov {tmp}, rsp",
            "push {ss}",
            "push {tmp}",
            "pushfq",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            tmp = out(reg) _,
            ss = in(reg) percpu::GDT_SS as u64,
            cs = in(reg) percpu::GDT_CS as u64,
        );
    }
}

/// Leaves VMX operation on this CPU and restores the guest's state so that the stub's
/// IRETQ continues it natively, right after its VMCALL (or at the launch point).
///
/// Order matters:
/// - VMCLEAR (the CPU may cache VMCS data; the page is freed afterwards), VMXOFF, CR4
///   without VMXE, CR0.
/// - Every TLB entry flushed (CR4.PGE toggled: all PCIDs, global entries too): the guest
///   ran under its own VPID, so its INVLPGs and CR3 loads never reached the VPID-0
///   translations cached before the launch, which now apply again.
/// - The guest's GDT through its writable alias so that LTR can mark the TSS busy (the
///   GDT the guest uses is mapped read-only); TR; the read-only GDT with its real limit;
///   LDTR (a VM exit nulls it).
/// - Data segments, FS/GS selectors then bases, the MSRs the VM exit replaced, DR7.
/// - The IDT with its real limit, then CR3.
///
/// NMIs: until LIDT the host IDT records them (its gates use the same selectors as the
/// kernel's GDT, and RSP stays on the host stack, where the handler finds this block);
/// the caller re-raises a recorded one once native. After LIDT the kernel's own handler
/// runs, with its GS base already back.
///
/// Failures: the whole state is read first, every VMREAD checked; a field that cannot be
/// read returns its error with nothing changed (still in VMX operation, the VMCS current),
/// and the caller makes it a fatal exit instead of loading a 0 into CR3, the IDT or the GS
/// base. A failed VMCLEAR or VMXOFF halts this CPU with the error: neither VMX operation
/// nor the guest can be continued then.
fn devirtualize(pc: &mut PerCpu) -> Result<(), VmcsError> {
    let s = DevirtState::read(&RootHw)?;
    // Shadow paging: the VMCS holds the shadow root; the guest's own CR3 is the MMU's.
    // SAFETY: the shadow block lives as long as the per-CPU block.
    let cr3 = unsafe { pc.ctl.shadow.as_ref() }.and_then(|sc| sc.guest_cr3()).unwrap_or(s.cr3);
    let cr4 = s.cr4;
    let cpu = pc.ctl.cpu;
    let gdt_rw = pc.ctl.tables.gdt_rw;
    let vmcs_pa = pc.phys_of(pc.vmcs.as_ptr());
    const CR4_PGE: u64 = 1 << 7;
    // From here on the NMI handler must not touch the VMCS; an NMI still queued for the
    // guest is re-raised natively by the caller, like one that hits this path.
    pc.ctl.nmi_vmcs_live.store(0, Ordering::Relaxed);
    if pc.ctl.exits.nmi_pending {
        pc.ctl.exits.nmi_pending = false;
        pc.ctl.nmi_pending.store(1, Ordering::Relaxed);
    }

    let rw_gdt = RawDtr { limit: s.gdtr.limit, base: gdt_rw };
    let ro_gdt = RawDtr { limit: s.gdtr.limit, base: s.gdtr.base };
    let idt = RawDtr { limit: s.idtr.limit, base: s.idtr.base };
    let tr = s.tr;

    // The CPU may cache VMCS data, and the page is freed afterwards.
    if let Err(fail) = vmclear_checked(vmcs_pa) {
        super::serial::fatal(format_args!("kdbt: cpu{cpu}: devirtualize: VMCLEAR failed: {fail}; halting this CPU"));
    }
    if let Err(fail) = vmxoff_checked() {
        super::serial::fatal(format_args!("kdbt: cpu{cpu}: devirtualize: VMXOFF failed: {fail}; halting this CPU"));
    }
    // SAFETY: this is the architectural sequence for leaving VMX operation on this CPU
    // (VMXOFF just succeeded) with the guest's (the kernel's) own state, every value read
    // from the VMCS the CPU saved at this exit; the TSS descriptor write goes through the
    // kernel's writable alias of its own GDT (`gdt_page`), recorded at launch.
    unsafe {
        pc.ctl.shared().virtualized.store(false, Ordering::Release);
        asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        asm!("mov cr0, {}", in(reg) s.cr0, options(nostack));
        asm!("mov cr4, {}", "mov cr4, {}", in(reg) cr4 ^ CR4_PGE, in(reg) cr4, options(nostack));
        // TSS descriptor: mark available so LTR accepts it (LTR marks it busy again).
        let desc = (gdt_rw + (tr & !7) as u64) as *mut u64;
        desc.write_volatile(vmx::segment::tss_mark_available(desc.read_volatile()));
        asm!("lgdt [{}]", in(reg) &rw_gdt, options(nostack));
        asm!("ltr {0:x}", in(reg) tr, options(nostack));
        asm!("lgdt [{}]", in(reg) &ro_gdt, options(nostack));
        asm!("lldt {0:x}", in(reg) s.ldtr, options(nostack));
        asm!("mov ds, {0:x}", "mov es, {1:x}", in(reg) s.ds, in(reg) s.es, options(nostack));
        // Loading FS/GS selectors clobbers the bases: selectors first, then the MSRs.
        asm!("mov fs, {0:x}", "mov gs, {1:x}", in(reg) s.fs, in(reg) s.gs, options(nostack));
        wrmsr(x86::msr::IA32_FS_BASE, s.fs_base);
        wrmsr(x86::msr::IA32_GS_BASE, s.gs_base);
        wrmsr(x86::msr::IA32_SYSENTER_CS, s.sysenter[0]);
        wrmsr(x86::msr::IA32_SYSENTER_ESP, s.sysenter[1]);
        wrmsr(x86::msr::IA32_SYSENTER_EIP, s.sysenter[2]);
        wrmsr(x86::msr::IA32_DEBUGCTL, s.debugctl);
        wrmsr(x86::msr::IA32_PAT, s.pat);
        wrmsr(x86::msr::IA32_EFER, s.efer);
        asm!("mov dr7, {}", in(reg) s.dr7, options(nostack));
        asm!("lidt [{}]", in(reg) &idt, options(nostack));
        asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    *pc.iret_frame() = [s.rip, s.cs as u64, s.rflags, s.rsp, s.ss as u64];
    Ok(())
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only called by `devirtualize` with architectural MSRs and the values the
    // CPU itself saved for them.
    unsafe { x86::msr::wrmsr(msr, v) }
}
