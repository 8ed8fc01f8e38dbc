//! Root-mode entry points in assembly: the VM-exit stub (host RIP), the host IDT stubs, and
//! the MSR accessors whose #GP the host IDT fixes up.
//!
//! Both stubs are typed as functions and exported to the C glue, which marks them
//! `STACK_FRAME_NON_STANDARD` so objtool skips them as it skips the kernel's own entry code
//! (they switch stacks and end in VMRESUME/IRETQ, which no unwinder ever walks through).
//!
//! Root mode never uses the kernel's IDT, stack or per-CPU data. The VM-exit stub runs on
//! the per-CPU host stack with interrupts off; the host IDT handles an NMI (recorded and
//! re-injected into the guest at the next VM entry), fixes up #GP on the two MSR
//! accessors, and turns any other exception into a diagnostic on the serial port followed
//! by a halt (an exception in root mode is a kdbt bug; there is nothing safe to return to).
use core::arch::{asm, global_asm};
use core::fmt;
use core::mem::offset_of;

use vmx::exit::GuestRegs;
use vmx::vmcs::{vm_instruction_error, VmFail};
use x86::vmx::vmcs::{guest, ro};

use super::percpu::{self, Control, PerCpu};
use super::root::vmread_checked;

/// Byte offsets in the per-CPU block used by the NMI stub.
const NMI_PENDING_OFF: usize = offset_of!(PerCpu, ctl) + offset_of!(Control, nmi_pending);
const NMI_VMCS_LIVE_OFF: usize = offset_of!(PerCpu, ctl) + offset_of!(Control, nmi_vmcs_live);

// Register save/restore shared by the stubs: the push order makes the saved registers a
// `GuestRegs` (RAX at the lowest address).
global_asm!(
    r#"
    .macro KDBT_PUSH_GPRS
    push %r15; push %r14; push %r13; push %r12; push %r11; push %r10; push %r9; push %r8
    push %rdi; push %rsi; push %rbp; push %rbx; push %rdx; push %rcx; push %rax
    .endm
    .macro KDBT_POP_GPRS_BUT_R15
    pop %rax; pop %rcx; pop %rdx; pop %rbx; pop %rbp; pop %rsi; pop %rdi
    pop %r8; pop %r9; pop %r10; pop %r11; pop %r12; pop %r13; pop %r14
    .endm
    .macro KDBT_POP_GPRS
    KDBT_POP_GPRS_BUT_R15
    pop %r15
    .endm
"#,
    options(att_syntax)
);

// The VM-exit stub. Guest GPRs are pushed so that they form a `GuestRegs` (RAX at the
// lowest address). Host RSP (VMCS) is 8 mod 16, so after 15 pushes the stack is 16-byte
// aligned for the call. The handler returns 0 to resume the guest, or 1 after it left VMX
// operation: then the iret frame it wrote just above the saved registers continues the
// guest natively.
global_asm!(
    r#"
    .pushsection .text.kdbt_vmexit, "ax", @progbits
    .globl kdbt_vmexit_entry
    .type kdbt_vmexit_entry, @function
    .balign 16
kdbt_vmexit_entry:
    endbr64
    KDBT_PUSH_GPRS
    mov %rsp, %rdi
    call kdbt_vmexit_handler
    mov %rax, %r15
    KDBT_POP_GPRS_BUT_R15
    test %r15, %r15
    pop %r15
    jnz 2f
    vmresume
    mov %rsp, %rdi
    call kdbt_vmresume_failed
    ud2
2:
    iretq
    .size kdbt_vmexit_entry, . - kdbt_vmexit_entry
    .popsection
"#,
    options(att_syntax)
);

// Host IDT stubs: 256 entries of 16 bytes at kdbt_idt_stubs + 16 * vector. Each pushes a
// dummy error code where the CPU pushes none, then the vector, and jumps to the common
// path. The NMI path sets the per-CPU flag (found by masking RSP) and, when NMI
// virtualization is live on the current VMCS, arms NMI-window exiting (primary
// processor-based controls, field 0x4002, bit 22) so the guest gets the NMI as soon as it
// can even if the exit handler already made its last check; then it returns. (The
// handler's own read-modify-write of that field may undo ours, but then it sees the flag
// and settles again.) A VMREAD that fails (CF or ZF) skips the VMWRITE: RAX would still
// hold the interrupted code's value; the flag alone then reaches the handler.
global_asm!(
    r#"
    .pushsection .text.kdbt_idt, "ax", @progbits
    .balign 16
    .globl kdbt_idt_stubs
    .type kdbt_idt_stubs, @function
kdbt_idt_stubs:
    .set kdbt_vec, 0
    .rept 256
    .balign 16
    endbr64
    .if (kdbt_vec == 8) || (kdbt_vec == 10) || (kdbt_vec == 11) || (kdbt_vec == 12) || (kdbt_vec == 13) || (kdbt_vec == 14) || (kdbt_vec == 17) || (kdbt_vec == 21) || (kdbt_vec == 29) || (kdbt_vec == 30)
    .else
    pushq $0
    .endif
    pushq $kdbt_vec
    jmp kdbt_idt_common
    .set kdbt_vec, kdbt_vec + 1
    .endr

kdbt_idt_common:
    cmpq $2, (%rsp)
    jne 1f
    push %rax
    push %rcx
    push %rdx
    mov %rsp, %rdx
    and ${mask}, %rdx
    movb $1, {nmi}(%rdx)
    cmpb $0, {live}(%rdx)
    je 3f
    mov $0x4002, %ecx
    vmread %rcx, %rax
    jbe 3f
    or $0x400000, %eax
    vmwrite %rax, %rcx
3:
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq
1:
    KDBT_PUSH_GPRS
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    call kdbt_host_exception
    mov %rbx, %rsp
    KDBT_POP_GPRS
    add $16, %rsp
    iretq
    .size kdbt_idt_stubs, . - kdbt_idt_stubs
    .popsection
"#,
    mask = const !(percpu::PERCPU_SIZE as u64 - 1),
    nmi = const NMI_PENDING_OFF,
    live = const NMI_VMCS_LIVE_OFF,
    options(att_syntax)
);

extern "C" {
    fn kdbt_vmexit_entry();
    static kdbt_idt_stubs: u8;
}

/// Host RIP for the VMCS.
pub fn vmexit_entry() -> u64 {
    kdbt_vmexit_entry as *const () as u64
}

/// Entry points of the 256 host IDT stubs.
pub fn idt_stubs() -> [u64; 256] {
    let base = core::ptr::addr_of!(kdbt_idt_stubs) as u64;
    core::array::from_fn(|v| base + 16 * v as u64)
}

/// Registers and frame of a root-mode exception, as the common stub leaves them.
#[repr(C)]
pub struct ExceptionFrame {
    pub regs: GuestRegs,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Marker the MSR accessors put in R8 around RDMSR/WRMSR; the root-mode #GP handler only
/// skips an MSR instruction that carries it (and clears it to report the fault).
const MSR_MARKER: u64 = 0x6b64_6274_6d73_7221;

/// RDMSR in VMX root mode that returns None instead of faulting: the host IDT's #GP path
/// skips the instruction and clears the marker. Root mode only (the kernel's IDT knows
/// nothing of this protocol).
pub fn rdmsr_safe(msr: u32) -> Option<u64> {
    let lo: u32;
    let hi: u32;
    let mut marker = MSR_MARKER;
    // SAFETY: RDMSR at CPL 0 in root mode; a #GP for an unimplemented MSR is handled by
    // kdbt_host_exception, which resumes after the 2-byte instruction with R8 = 0.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, inout("r8") marker, options(nostack));
    }
    (marker == MSR_MARKER).then_some(((hi as u64) << 32) | lo as u64)
}

/// WRMSR in VMX root mode that returns false instead of faulting; see [`rdmsr_safe`].
pub fn wrmsr_safe(msr: u32, value: u64) -> bool {
    let mut marker = MSR_MARKER;
    // SAFETY: as for rdmsr_safe; the guest asked to write this MSR with this value, which
    // is what it would have done natively.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             inout("r8") marker, options(nostack));
    }
    marker == MSR_MARKER
}

/// Called by the common IDT stub for every vector but NMI.
#[no_mangle]
extern "C" fn kdbt_host_exception(frame: &mut ExceptionFrame) {
    if frame.vector == 13 && frame.regs.r8 == MSR_MARKER {
        // SAFETY: RIP points at the faulting instruction in kdbt's own code (root mode runs
        // nothing else), which is mapped; we read its two opcode bytes.
        let op = unsafe { (frame.rip as *const [u8; 2]).read_unaligned() };
        if op == [0x0f, 0x32] || op == [0x0f, 0x30] {
            frame.regs.r8 = 0;
            frame.rip += 2;
            return;
        }
    }
    let pc = percpu::from_rsp(frame as *const _ as u64);
    // SAFETY: the frame lies on this CPU's host or IST stack inside its per-CPU block.
    let cpu = unsafe { (*pc).ctl.cpu };
    super::serial::fatal(format_args!(
        "kdbt: cpu{}: exception {} (error {:#x}) in VMX root mode at {:#x}, rsp {:#x}; halting this CPU",
        cpu, frame.vector, frame.error_code, frame.rip, frame.rsp
    ));
}

/// A VMCS field for a diagnostic: its value, or "unreadable" with the reason.
struct Readable(Result<u64, VmFail>);

impl fmt::Display for Readable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(v) => write!(f, "{v:#x}"),
            Err(fail) => write!(f, "unreadable ({fail})"),
        }
    }
}

/// The VM-instruction error field for a diagnostic: its number and name, or "unreadable".
struct InstructionError(Result<u64, VmFail>);

impl fmt::Display for InstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(e) => write!(f, "{e} ({})", vm_instruction_error(e as u32)),
            Err(fail) => write!(f, "unreadable ({fail})"),
        }
    }
}

/// VMRESUME failed (VMfail): a kdbt bug in the VMCS; report and halt.
#[no_mangle]
extern "C" fn kdbt_vmresume_failed(rsp: u64) -> ! {
    let pc = percpu::from_rsp(rsp);
    // SAFETY: rsp is this CPU's host stack pointer inside its per-CPU block.
    let (cpu, reason) = unsafe { ((*pc).ctl.cpu, (*pc).ctl.exits.last_reason) };
    let err = InstructionError(vmread_checked(ro::VM_INSTRUCTION_ERROR));
    let rip = Readable(vmread_checked(guest::RIP));
    super::serial::fatal(format_args!(
        "kdbt: cpu{cpu}: VMRESUME failed after a {} exit, VM-instruction error {err}, guest rip {rip}; \
         halting this CPU",
        vmx::exit::reason_name(reason)
    ));
}
