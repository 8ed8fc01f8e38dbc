//! Late launch of one CPU: VMXON, program the VMCS with the CPU's current state as the
//! guest state, VMLAUNCH, and continue — now as a guest — right after the launch point.
//! Runs on the CPU being launched, in IPI context (interrupts off), with every page it
//! needs already allocated and zeroed.
use core::arch::asm;
use core::sync::atomic::Ordering;

use vmx::caps::CR4_VMXE;
use vmx::segment;
use vmx::vmcs::{Dtr, HostIn, LaunchState, Op, Segment, Vmcs, VmcsError};

use super::percpu::{PerCpu, GDT_CS, GDT_SS, GDT_TR};
use super::root::{vmread_checked, vmwrite_checked, LAUNCH_ENTRY_FAILED};
use super::{entry, Controls};

const MSR_FEATURE_CONTROL: u32 = 0x3a;
const FC_LOCKED: u64 = 1 << 0;
const FC_VMXON_OUTSIDE_SMX: u64 = 1 << 2;

/// Why a CPU could not be launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchError {
    VmxeAlreadySet,
    FeatureControlLocked,
    VmxonFailed,
    VmclearOrVmptrldFailed,
    /// VMLAUNCH failed with VMfailValid: VM-instruction error number.
    VmlaunchFailed(u32),
    VmlaunchFailInvalid,
    /// VMLAUNCH passed its checks but the VM entry failed: exit reason.
    EntryFailed(u32),
    /// The `fail_launch_cpu` module parameter named this CPU (testing the rollback).
    Injected,
    /// The CPU's state as the kernel has it cannot be kept in VMX operation (CR4.FRED, or
    /// CR4 bits its VMX does not allow), checked again here for CPUs that come online.
    Refused(vmx::preflight::Refusal),
    /// The shadow MMU could not start on this CPU's paging state.
    Shadow(shadow::MmuError),
    /// Programming the VMCS failed: the first failed VMWRITE (or VMREAD), named; `hooked`
    /// when the `fail_vmwrite_field` test hook made it fail.
    Vmcs {
        err: VmcsError,
        hooked: bool,
    },
}

impl core::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::VmxeAlreadySet => write!(f, "CR4.VMXE is already set: another hypervisor or KVM holds VMX"),
            Self::FeatureControlLocked => write!(
                f,
                "IA32_FEATURE_CONTROL is locked with VMXON outside SMX disabled (enable VT-x in the firmware)"
            ),
            Self::VmxonFailed => write!(f, "VMXON failed"),
            Self::VmclearOrVmptrldFailed => write!(f, "VMCLEAR/VMPTRLD failed"),
            Self::VmlaunchFailed(e) => {
                write!(f, "VMLAUNCH failed: VM-instruction error {e} ({})", vmx::vmcs::vm_instruction_error(*e))
            }
            Self::VmlaunchFailInvalid => write!(f, "VMLAUNCH failed: no current VMCS"),
            Self::EntryFailed(r) => write!(f, "VM entry failed: exit reason {r} ({})", vmx::exit::reason_name(*r)),
            Self::Injected => write!(f, "launch failed on purpose after VMXON (module parameter fail_launch_cpu)"),
            Self::Refused(r) => write!(f, "{r}"),
            Self::Shadow(e) => write!(f, "shadow paging cannot start: {e}"),
            Self::Vmcs { err, hooked } => {
                write!(f, "{err}")?;
                if *hooked {
                    write!(f, " (on purpose: module parameter fail_vmwrite_field set a reserved encoding bit)")?;
                }
                Ok(())
            }
        }
    }
}

fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}
fn read_cr3() -> u64 {
    let v;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}
fn write_cr4(v: u64) {
    // SAFETY: only called to set or clear CR4.VMXE (and fixed bits) around VMXON, with
    // interrupts off on this CPU.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}
fn rdmsr(msr: u32) -> u64 {
    // SAFETY: kdbt only reads architectural MSRs that exist on every VMX-capable CPU
    // (the load path checked CPUID.1:ECX.VMX before getting here).
    unsafe { x86::msr::rdmsr(msr) }
}

/// The memory operand of SGDT/SIDT, LGDT/LIDT.
#[repr(C, packed)]
#[derive(Default)]
pub(crate) struct RawDtr {
    pub limit: u16,
    pub base: u64,
}

fn sgdt() -> RawDtr {
    let mut d = RawDtr::default();
    // SAFETY: SGDT stores 10 bytes into `d`.
    unsafe { asm!("sgdt [{}]", in(reg) &mut d, options(nostack)) };
    d
}
pub(crate) fn sidt() -> RawDtr {
    let mut d = RawDtr::default();
    // SAFETY: SIDT stores 10 bytes into `d`.
    unsafe { asm!("sidt [{}]", in(reg) &mut d, options(nostack)) };
    d
}

/// LAR on a selector: access rights, or None if the selector is null/invalid (ZF clear).
fn lar(sel: u16) -> Option<u32> {
    let v: u32;
    let ok: u8;
    // SAFETY: LAR only reads the descriptor table; a bad selector clears ZF, no fault.
    unsafe { asm!("lar {0:e}, {1:e}", "setz {2}", out(reg) v, in(reg) sel as u32, out(reg_byte) ok, options(nostack)) };
    (ok != 0).then_some(v)
}

fn lsl(sel: u16) -> u32 {
    let v: u32;
    let ok: u8;
    // SAFETY: LSL only reads the descriptor table; a bad selector clears ZF, no fault.
    unsafe { asm!("lsl {0:e}, {1:e}", "setz {2}", out(reg) v, in(reg) sel as u32, out(reg_byte) ok, options(nostack)) };
    if ok != 0 {
        v
    } else {
        0
    }
}

fn selectors() -> [u16; 8] {
    let (mut cs, mut ss, mut ds, mut es, mut fs, mut gs, mut tr, mut ldtr): (u16, u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: reading segment selectors, TR and LDTR has no side effects.
    unsafe {
        asm!("mov {0:x}, cs", "mov {1:x}, ss", "mov {2:x}, ds", "mov {3:x}, es",
             out(reg) cs, out(reg) ss, out(reg) ds, out(reg) es, options(nomem, nostack, preserves_flags));
        asm!("mov {0:x}, fs", "mov {1:x}, gs", "str {2:x}", "sldt {3:x}",
             out(reg) fs, out(reg) gs, out(reg) tr, out(reg) ldtr, options(nomem, nostack, preserves_flags));
    }
    [es, cs, ss, ds, fs, gs, ldtr, tr]
}

/// Base of a system descriptor (TSS/LDT) at `sel` in the GDT at `gdt`.
fn system_base(gdt: u64, sel: u16) -> u64 {
    if sel & !7 == 0 {
        return 0;
    }
    let p = (gdt + (sel & !7) as u64) as *const u64;
    // SAFETY: `sel` is the TR/LDTR this CPU has loaded, so its 16-byte descriptor lies
    // inside the live GDT, which is mapped (readable) for the kernel.
    let (lo, hi) = unsafe { (p.read_volatile(), p.add(1).read_volatile()) };
    segment::system_descriptor_base(lo, hi)
}

/// Launches this CPU. On success we return in VMX non-root operation. `fail_on_purpose`
/// (testing) stops after VMXON, VMCLEAR and VMPTRLD and leaves VMX operation again;
/// `corrupt_vmwrite` (testing) names a field whose VMWRITE the CPU is made to fail.
/// Any failure after VMXON leaves VMX operation again, with CR4 as it was.
pub fn launch(
    pc: &mut PerCpu,
    c: &Controls,
    fail_on_purpose: bool,
    corrupt_vmwrite: Option<u32>,
) -> Result<(), LaunchError> {
    let cr4 = crate::hw::read_cr4();
    if cr4 & CR4_VMXE != 0 {
        return Err(LaunchError::VmxeAlreadySet);
    }
    // Refuse rather than change the kernel's CR4 under it (as preflight does on load).
    if cr4 & vmx::caps::CR4_FRED != 0 {
        return Err(LaunchError::Refused(vmx::preflight::Refusal::Fred));
    }
    let conflict = vmx::preflight::cr4_disallowed(cr4, c.cr4_fixed0, c.cr4_fixed1);
    if !conflict.is_empty() {
        return Err(LaunchError::Refused(vmx::preflight::Refusal::Cr4Fixed(conflict)));
    }
    // The same for CR0 (the fixed bits were once applied to it silently).
    let native_cr0 = read_cr0();
    let conflict = vmx::preflight::cr0_disallowed(native_cr0, c.cr0_fixed0, c.cr0_fixed1, c.cr0_unrestricted_free);
    if !conflict.is_empty() {
        return Err(LaunchError::Refused(vmx::preflight::Refusal::Cr0Fixed(conflict)));
    }
    let fc = rdmsr(MSR_FEATURE_CONTROL);
    if fc & FC_LOCKED == 0 {
        // Firmware left it unlocked: enable VMXON outside SMX and lock, as firmware should.
        // SAFETY: writing the architectural FEATURE_CONTROL bits while unlocked.
        unsafe { x86::msr::wrmsr(MSR_FEATURE_CONTROL, vmx::preflight::feature_control_lock_value(fc)) };
    } else if fc & FC_VMXON_OUTSIDE_SMX == 0 {
        return Err(LaunchError::FeatureControlLocked);
    }

    let t0 = tsc();
    // Unchanged but for FIXED0 bits unrestricted guest frees (set in any running kernel).
    let cr0 = c.vmx_cr0(native_cr0);
    // The fixed bits hold for `cr4` apart from VMXE (checked above).
    let cr4v = cr4 | CR4_VMXE;
    write_cr4(cr4v);
    let rev = c.revision & 0x7fff_ffff;
    pc.vmxon[..4].copy_from_slice(&rev.to_le_bytes());
    pc.vmcs[..4].copy_from_slice(&rev.to_le_bytes());
    let vmxon_pa = pc.phys_of(pc.vmxon.as_ptr());
    let vmcs_pa = pc.phys_of(pc.vmcs.as_ptr());

    // SAFETY: VMXON with a page-aligned, revision-tagged region of this CPU, CR4.VMXE set
    // and the fixed CR bits respected.
    if unsafe { x86::bits64::vmx::vmxon(vmxon_pa) }.is_err() {
        write_cr4(cr4);
        return Err(LaunchError::VmxonFailed);
    }
    // SAFETY: the VMCS region is this CPU's, page aligned and revision-tagged.
    let ok = unsafe { x86::bits64::vmx::vmclear(vmcs_pa).is_ok() && x86::bits64::vmx::vmptrld(vmcs_pa).is_ok() };
    if !ok {
        vmx_off(cr4, None);
        return Err(LaunchError::VmclearOrVmptrldFailed);
    }
    if fail_on_purpose {
        vmx_off(cr4, Some(vmcs_pa));
        return Err(LaunchError::Injected);
    }

    let mut state = launch_state(pc, c, cr0, cr4v);
    if c.shadow {
        // The guest runs on the shadow root; its own CR3 lives in the MMU.
        // SAFETY: the shadow block was allocated for this CPU before the launch and is
        // exclusively ours until the CPU is launched.
        let Some(sc) = (unsafe { pc.ctl.shadow.as_mut() }) else {
            vmx_off(cr4, Some(vmcs_pa));
            return Err(LaunchError::Shadow(shadow::MmuError::OutOfFrames));
        };
        match sc.start(cr0, cr4v, state.efer, state.cr3) {
            Ok(root) => state.cr3 = root,
            Err(e) => {
                vmx_off(cr4, Some(vmcs_pa));
                return Err(LaunchError::Shadow(e));
            }
        }
    }
    if let Err(err) = vmx::vmcs::program(&mut LaunchVmcs { corrupt: corrupt_vmwrite }, &state) {
        vmx_off(cr4, Some(vmcs_pa));
        return Err(LaunchError::Vmcs { err, hooked: corrupt_vmwrite == Some(err.field) });
    }
    // Nothing cached for this EPTP/VPID may survive from an earlier load.
    if c.eptp != 0 {
        super::root::invept_all();
    }
    if c.vpid != 0 {
        invvpid_all();
    }
    pc.ctl.launching = true;
    // The guest-visible page, through a copy of the pointer: after VMLAUNCH this code runs
    // in the guest, which must not even read the (hidden) block.
    // SAFETY: allocated with the block, freed only with it.
    let shared = unsafe { &*pc.ctl.shared };
    shared.virtualized.store(true, Ordering::Release);
    shared.left_launcher.store(false, Ordering::Release);
    pc.ctl.nmi_vmcs_live.store(c.vnmi as u8, Ordering::Relaxed);
    let rc = vmlaunch_here();
    // In the guest now (rc 0): the block is hidden, only `Shared` may be touched; root mode
    // cleared `launching` at the first exit. Otherwise native again.
    match rc {
        0 => {
            shared.left_launcher.store(true, Ordering::Release);
            shared.launch_cycles.store(tsc() - t0, Ordering::Relaxed);
            Ok(())
        }
        r if r & LAUNCH_ENTRY_FAILED == LAUNCH_ENTRY_FAILED => {
            // The exit handler already left VMX operation and restored our state.
            pc.ctl.launching = false;
            shared.virtualized.store(false, Ordering::Release);
            Err(LaunchError::EntryFailed(r as u32))
        }
        r => {
            pc.ctl.launching = false;
            shared.virtualized.store(false, Ordering::Release);
            let err = if r == 2 {
                match (LaunchVmcs { corrupt: None }).read(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR) {
                    Ok(e) => LaunchError::VmlaunchFailed(e as u32),
                    Err(err) => LaunchError::Vmcs { err, hooked: false },
                }
            } else {
                LaunchError::VmlaunchFailInvalid
            };
            vmx_off(cr4, Some(vmcs_pa));
            Err(err)
        }
    }
}

/// INVVPID, all-context type (only used when preflight found Features::INVVPID_ALL).
fn invvpid_all() {
    let desc = [0u64; 2];
    // SAFETY: VMX root operation; type 2 (all-context) with a valid descriptor.
    unsafe { asm!("invvpid {t}, [{d}]", t = in(reg) 2u64, d = in(reg) &desc, options(nostack)) };
}

/// Leaves VMX operation after a failed launch; VMCLEARs `vmcs` first if it was made
/// current (the CPU may cache VMCS data, and the page is freed afterwards).
fn vmx_off(cr4: u64, vmcs: Option<u64>) {
    // SAFETY: we are in VMX root operation on this CPU (VMXON succeeded) and leave it;
    // `vmcs` is this CPU's VMCS region.
    unsafe {
        if let Some(pa) = vmcs {
            let _ = x86::bits64::vmx::vmclear(pa);
        }
        let _ = x86::bits64::vmx::vmxoff();
    }
    write_cr4(cr4);
}

pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// VMLAUNCH with guest RSP/RIP set so that the guest continues right here. Returns 0 when
/// running as a guest; 1 for VMfailInvalid, 2 for VMfailValid; or the value the exit
/// handler put in RAX when the entry failed after its checks.
#[inline(never)]
fn vmlaunch_here() -> u64 {
    let rc: u64;
    // SAFETY: the current VMCS is fully programmed. VM entry keeps every general-purpose
    // register, so at label 2 (the guest RIP) all registers and the stack (guest RSP) are
    // exactly as at VMLAUNCH; RAX is 0 unless the exit handler reported an entry failure.
    unsafe {
        asm!(
            "mov {f}, 0x681C",
            "vmwrite {f}, rsp",
            "lea {v}, [rip + 2f]",
            "mov {f}, 0x681E",
            "vmwrite {f}, {v}",
            "xor eax, eax",
            "vmlaunch",
            "mov eax, 2",
            "jnc 2f",
            "mov eax, 1",
            "2:",
            f = out(reg) _,
            v = out(reg) _,
            out("rax") rc,
        );
    }
    rc
}

/// Collects this CPU's state at the launch point, kdbt's host tables and the controls
/// into what `vmx::vmcs::program` writes.
fn launch_state(pc: &PerCpu, c: &Controls, cr0: u64, cr4: u64) -> LaunchState {
    let gdt = sgdt();
    let idt = sidt();
    let sels = selectors();
    let gdt_base = gdt.base;
    let segments = core::array::from_fn(|i| {
        let sel = sels[i];
        let base = match i {
            4 => rdmsr(x86::msr::IA32_FS_BASE),
            5 => rdmsr(x86::msr::IA32_GS_BASE),
            6 | 7 => system_base(gdt_base, sel),
            _ => 0,
        };
        Segment { selector: sel, limit: lsl(sel), access_rights: segment::access_rights(sel, lar(sel)), base }
    });
    let dr7: u64;
    // SAFETY: reading DR7 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, dr7", out(reg) dr7, options(nomem, nostack, preserves_flags)) };
    let rflags: u64;
    // SAFETY: PUSHF/POP on our own stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    LaunchState {
        controls: c.launch_controls(pc.ctl.cpu, pc.phys_of(pc.msr_bitmap.as_ptr())),
        host: HostIn {
            cr3: c.host_cr3,
            cs: GDT_CS,
            ss: GDT_SS,
            tr: GDT_TR,
            tr_base: &pc.ctl.tss as *const _ as u64,
            gdtr_base: pc.ctl.gdt.as_ptr() as u64,
            idtr_base: pc.idt.as_ptr() as u64,
            rsp: pc.host_rsp(),
            rip: entry::vmexit_entry(),
        },
        cr0,
        cr4,
        segments,
        gdtr: Dtr { base: gdt_base, limit: gdt.limit },
        idtr: Dtr { base: idt.base, limit: idt.limit },
        cr3: read_cr3(),
        dr7,
        rflags,
        debugctl: rdmsr(x86::msr::IA32_DEBUGCTL),
        sysenter_cs: rdmsr(x86::msr::IA32_SYSENTER_CS),
        sysenter_esp: rdmsr(x86::msr::IA32_SYSENTER_ESP),
        sysenter_eip: rdmsr(x86::msr::IA32_SYSENTER_EIP),
        efer: rdmsr(x86::msr::IA32_EFER),
        pat: rdmsr(x86::msr::IA32_PAT),
    }
}

/// Reserved encoding bit (bits 31:15 of a VMCS field encoding must be 0) that the
/// `fail_vmwrite_field` test hook sets: the CPU then fails that VMWRITE itself (VMfailValid,
/// "unsupported VMCS component").
const HOOK_RESERVED_ENCODING_BIT: u32 = 1 << 30;

/// The current VMCS, through checked VMWRITE/VMREAD. `corrupt` (testing) names a field
/// whose VMWRITE is issued with a reserved encoding bit set, so that hardware fails it.
struct LaunchVmcs {
    corrupt: Option<u32>,
}

impl Vmcs for LaunchVmcs {
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError> {
        let enc = if self.corrupt == Some(field) { field | HOOK_RESERVED_ENCODING_BIT } else { field };
        vmwrite_checked(enc, value).map_err(|fail| VmcsError { op: Op::Write, field, fail })
    }
    fn read(&self, field: u32) -> Result<u64, VmcsError> {
        vmread_checked(field).map_err(|fail| VmcsError { op: Op::Read, field, fail })
    }
}
