//! Hand-written entry/exit routines (not generated code): the dispatcher
//! entry reached by `jmp gs:[DISPATCH]`, the host entry `dbt_enter`, and two
//! host-harness helpers. Offsets refer to [`crate::scratch::Scratch`].
//!
//! Dispatcher entry contract: guest state is live in registers except rax,
//! which is in gs:[SAVE_RAX]; rax holds the exit argument (exit record address
//! or `EXIT_IND`). The routine saves the full guest context into the per-CPU
//! block, switches to the dispatcher stack, saves rflags and (optionally) the
//! extended state with xsave, calls the Rust dispatcher, and either restores
//! everything and jumps to the returned code-cache address or, when it
//! returns 0, goes back to whoever called `dbt_enter`.
//!
//! The routines reached by indirect jumps (`dbt_dispatch_entry`,
//! `dbt_ind_miss`) start with `endbr64`, for kernels with CET IBT.

core::arch::global_asm!(
    // DBT_RESUME_GUEST: load the guest's rflags and every GPR (rsp last) from the
    // context in the per-CPU block and jump to gs:[TGT]. The stack it starts on is
    // only used for the rflags push/pop.
    ".macro DBT_RESUME_GUEST",
    "push qword ptr gs:[264]",
    "popfq",
    "mov rax, qword ptr gs:[128]",
    "mov rcx, qword ptr gs:[136]",
    "mov rdx, qword ptr gs:[144]",
    "mov rbx, qword ptr gs:[152]",
    "mov rbp, qword ptr gs:[168]",
    "mov rsi, qword ptr gs:[176]",
    "mov rdi, qword ptr gs:[184]",
    "mov r8, qword ptr gs:[192]",
    "mov r9, qword ptr gs:[200]",
    "mov r10, qword ptr gs:[208]",
    "mov r11, qword ptr gs:[216]",
    "mov r12, qword ptr gs:[224]",
    "mov r13, qword ptr gs:[232]",
    "mov r14, qword ptr gs:[240]",
    "mov r15, qword ptr gs:[248]",
    "mov rsp, qword ptr gs:[160]",
    "jmp qword ptr gs:[32]",
    ".endm",
    ".globl dbt_dispatch_entry",
    ".p2align 4",
    "dbt_dispatch_entry:",
    "endbr64",
    "mov qword ptr gs:[72], rax",
    "mov rax, qword ptr gs:[0]",
    "mov [rax+136], rcx",
    "mov [rax+144], rdx",
    "mov [rax+152], rbx",
    "mov [rax+160], rsp",
    "mov [rax+168], rbp",
    "mov [rax+176], rsi",
    "mov [rax+184], rdi",
    "mov [rax+192], r8",
    "mov [rax+200], r9",
    "mov [rax+208], r10",
    "mov [rax+216], r11",
    "mov [rax+224], r12",
    "mov [rax+232], r13",
    "mov [rax+240], r14",
    "mov [rax+248], r15",
    "mov rcx, qword ptr gs:[8]",
    "mov [rax+128], rcx",
    "mov rsp, [rax+48]",
    "pushfq",
    "pop rcx",
    "mov [rax+264], rcx",
    "cld",
    "mov rbx, rax",
    "cmp qword ptr [rbx+96], 0",
    "je 2f",
    "mov eax, -1",
    "mov edx, -1",
    "xsave64 [rbx+576]",
    "2:",
    "mov rdi, rbx",
    "call qword ptr [rbx+88]",
    "test rax, rax",
    "jz 4f",
    "mov [rbx+32], rax",
    "cmp qword ptr [rbx+96], 0",
    "je 3f",
    "mov eax, -1",
    "mov edx, -1",
    "xrstor64 [rbx+576]",
    "3:",
    "DBT_RESUME_GUEST",
    "4:",
    "cmp qword ptr [rbx+96], 0",
    "je 5f",
    "mov eax, -1",
    "mov edx, -1",
    "xrstor64 [rbx+576]",
    "5:",
    "mov rsp, [rbx+64]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // dbt_ind_miss: inline lookup miss (empty table entry, or the entry's
    // fragment checked a different guest pc). rcx = guest target; the guest's
    // rcx and rdx are in gs:[SAVE_RCX] / gs:[SAVE_RDX]; every other register
    // is the guest's. Leaves through the dispatcher entry with EXIT_IND.
    // Flags are untouched.
    ".globl dbt_ind_miss",
    ".p2align 4",
    "dbt_ind_miss:",
    "endbr64",
    "mov qword ptr gs:[80], rcx",
    "mov rcx, qword ptr gs:[16]",
    "mov rdx, qword ptr gs:[24]",
    "mov qword ptr gs:[8], rax",
    "mov eax, 1",
    "jmp qword ptr gs:[40]",
    // dbt_enter(scratch): enter translated code at gs:[TGT] with the guest
    // context from the per-CPU block; returns when the dispatcher decides to
    // leave (exit reason in the block).
    ".globl dbt_enter",
    ".p2align 4",
    "dbt_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov qword ptr gs:[64], rsp",
    "DBT_RESUME_GUEST",
    // Sentinel return address for harness runs: never executed natively.
    ".globl dbt_sentinel",
    ".p2align 4",
    "dbt_sentinel:",
    "ud2",
    // dbt_native_call(ctx: *mut GuestCtx, f: u64): call f natively with the
    // argument and callee-saved registers from ctx; store rax, rdx and the
    // callee-saved registers back. `dbt_native_ret` is the return address.
    // If ctx.rsp (gpr[4]) is non-zero it is a 16-byte aligned stack top T
    // with 8 writable bytes at T: f runs on that stack, entered with
    // rsp = T - 8 exactly as a translated run (which puts its sentinel at
    // T - 8), so code whose path depends on stack addresses (memcpy
    // alignment paths) executes identically in both. The host rsp is kept
    // at [rsp] across the call in both cases.
    ".globl dbt_native_call",
    ".globl dbt_native_ret",
    ".p2align 4",
    "dbt_native_call:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, rsi",
    "mov r11, rdi",
    "mov r10, [r11+32]",
    "test r10, r10",
    "jz 6f",
    "mov [r10], rsp",
    "mov rsp, r10",
    "jmp 7f",
    "6:",
    "push rsp",
    "push qword ptr [rsp]",
    "7:",
    "mov rbx, [r11+24]",
    "mov rbp, [r11+40]",
    "mov r12, [r11+96]",
    "mov r13, [r11+104]",
    "mov r14, [r11+112]",
    "mov r15, [r11+120]",
    "mov rsi, [r11+48]",
    "mov rdx, [r11+16]",
    "mov rcx, [r11+8]",
    "mov r8, [r11+64]",
    "mov r9, [r11+72]",
    "mov rdi, [r11+56]",
    "call rax",
    "dbt_native_ret:",
    "mov rsp, [rsp]",
    "mov r11, [rsp]",
    "mov [r11+0], rax",
    "mov [r11+16], rdx",
    "mov [r11+24], rbx",
    "mov [r11+40], rbp",
    "mov [r11+96], r12",
    "mov [r11+104], r13",
    "mov [r11+112], r14",
    "mov [r11+120], r15",
    "pop rdi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

extern "C" {
    /// Dispatcher entry (never called from Rust; its address goes into
    /// `Scratch::dispatch_entry`).
    pub fn dbt_dispatch_entry();
    /// Inline-lookup miss routine (never called from Rust; its address fills
    /// empty lookup entries).
    pub fn dbt_ind_miss();
    /// Enter translated code (see module docs).
    pub fn dbt_enter();
    /// Sentinel return address.
    pub fn dbt_sentinel();
    /// Native call helper.
    pub fn dbt_native_call(ctx: *mut crate::scratch::GuestCtx, f: u64);
    /// Return address inside `dbt_native_call`.
    pub fn dbt_native_ret();
}
