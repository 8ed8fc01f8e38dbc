//! Hand-written entry/exit routines (not generated code): the dispatcher
//! entries reached from exit stubs (`jmp gs:[EXIT_ENTRY]`) and lookup misses
//! (`jmp gs:[MISS_ENTRY]`), the host entry `dbt_enter`, and two host-harness
//! helpers. Offsets refer to [`crate::scratch::Scratch`] and
//! [`crate::scratch::Frame`].
//!
//! Entry contracts (README "ABI"):
//! * exit entry: `[rsp]` = exit record address, below it nothing; the
//!   guest's rsp is `rsp + 8 + RZ`; every other register is the guest's.
//! * miss entry: `rcx` = guest target, `[rsp]` = guest rcx, `[rsp+8]` =
//!   guest rdx; the guest's rsp is `rsp + 16 + RZ`.
//!
//! Both push rflags and rax on the guest stack (the kernel variants then
//! `cli`), build a [`crate::scratch::Frame`] with the whole guest context at
//! the top of the per-CPU dispatcher stack, switch to it, save the extended
//! state (xsave, below the frame), and call the Rust dispatcher with
//! (block, frame). It returns the code-cache address to continue at: the
//! routine restores the extended state, the flags (kernel: with IF still
//! clear), every GPR from the frame, rsp last, and jumps: the host through
//! `gs:[TGT]`, the kernel through `[rsp-8]` (written before: below the
//! guest's rsp the kernel keeps nothing, and NMIs and #MC run on IST stacks),
//! preceded by `sti` when the guest had IF set, whose one-instruction shadow
//! covers the jump. On the host 0 means "back to `dbt_enter`'s caller".
//!
//! The routines reached by indirect jumps start with `endbr64`, for kernels
//! with CET IBT.

/// Red zone of host (SysV user) code: inserted sequences step over it.
pub const HOST_RED_ZONE: i64 = 128;

core::arch::global_asm!(
    // DBT_LOAD_GPRS: every GPR but rbx and rsp from the frame at rbx.
    ".macro DBT_LOAD_GPRS",
    "mov rax, [rbx]",
    "mov rcx, [rbx+8]",
    "mov rdx, [rbx+16]",
    "mov rbp, [rbx+40]",
    "mov rsi, [rbx+48]",
    "mov rdi, [rbx+56]",
    "mov r8, [rbx+64]",
    "mov r9, [rbx+72]",
    "mov r10, [rbx+80]",
    "mov r11, [rbx+88]",
    "mov r12, [rbx+96]",
    "mov r13, [rbx+104]",
    "mov r14, [rbx+112]",
    "mov r15, [rbx+120]",
    ".endm",
    // DBT_LOAD_ALL: every GPR from the frame at rbx, rsp and then rbx last.
    ".macro DBT_LOAD_ALL",
    "DBT_LOAD_GPRS",
    "mov rsp, [rbx+32]",
    "mov rbx, [rbx+24]",
    ".endm",
    // DBT_RESUME_HOST: the guest's flags and registers from the frame at rbx,
    // then the jump to gs:[TGT] (host only: see the module docs).
    ".macro DBT_RESUME_HOST",
    "push qword ptr [rbx+136]",
    "popfq",
    "DBT_LOAD_ALL",
    "jmp qword ptr gs:[8]",
    ".endm",
    // DBT_ENTRY_START kernel?: rflags and rax pushed on the guest stack
    // (kernel: interrupts off from here), rax = the Frame at the top of the
    // dispatcher stack.
    ".macro DBT_ENTRY_START kernel",
    "endbr64",
    "pushfq",
    ".if \\kernel",
    "cli",
    ".endif",
    "push rax",
    "mov rax, qword ptr gs:[32]",
    "sub rax, 160",
    ".endm",
    // DBT_ENTRIES exit, miss, red zone, kernel?
    ".macro DBT_ENTRIES exitn, missn, rz, kernel",
    ".globl \\exitn",
    ".p2align 4",
    "\\exitn:",
    "DBT_ENTRY_START \\kernel",
    "mov [rax+8], rcx",
    "mov [rax+16], rdx",
    "mov rcx, [rsp+16]",
    "mov [rax+144], rcx",
    "mov qword ptr [rax+152], 0",
    "lea rcx, [rsp+24+\\rz]",
    "mov [rax+32], rcx",
    "jmp 1f",
    ".globl \\missn",
    ".p2align 4",
    "\\missn:",
    "DBT_ENTRY_START \\kernel",
    "mov [rax+144], rcx",
    "mov qword ptr [rax+152], 1",
    "mov rcx, [rsp+16]",
    "mov [rax+8], rcx",
    "mov rcx, [rsp+24]",
    "mov [rax+16], rcx",
    "lea rcx, [rsp+32+\\rz]",
    "mov [rax+32], rcx",
    "1:",
    "mov [rax+24], rbx",
    "mov [rax+40], rbp",
    "mov [rax+48], rsi",
    "mov [rax+56], rdi",
    "mov [rax+64], r8",
    "mov [rax+72], r9",
    "mov [rax+80], r10",
    "mov [rax+88], r11",
    "mov [rax+96], r12",
    "mov [rax+104], r13",
    "mov [rax+112], r14",
    "mov [rax+120], r15",
    "mov rcx, [rsp]",
    "mov [rax], rcx",
    "mov rcx, [rsp+8]",
    "mov [rax+136], rcx",
    "mov rsp, rax",
    "mov rbx, rax",
    "cld",
    "sub rsp, 4096",
    "and rsp, -64",
    "cmp qword ptr gs:[64], 0",
    "je 2f",
    "mov eax, -1",
    "mov edx, -1",
    "xsave64 [rsp]",
    "2:",
    "mov rdi, qword ptr gs:[0]",
    "mov rsi, rbx",
    "call qword ptr [rdi+56]",
    "mov r12, rax",
    "cmp qword ptr gs:[64], 0",
    "je 3f",
    "mov eax, -1",
    "mov edx, -1",
    "xrstor64 [rsp]",
    "3:",
    "test r12, r12",
    "jz 5f",
    ".if \\kernel",
    "mov rcx, [rbx+32]",
    "mov [rcx-8], r12",
    "mov rcx, [rbx+136]",
    "bt rcx, 9",
    "jc 4f",
    "push rcx",
    "popfq",
    "DBT_LOAD_ALL",
    "jmp qword ptr [rsp-8]",
    "4:",
    "btr rcx, 9",
    "push rcx",
    "popfq",
    "DBT_LOAD_ALL",
    "sti",
    "jmp qword ptr [rsp-8]",
    ".else",
    "mov qword ptr gs:[8], r12",
    "DBT_RESUME_HOST",
    ".endif",
    "5:",
    ".if \\kernel",
    // The kernel environment's dispatcher always returns a target (a
    // native pc for a stop).
    "ud2",
    ".else",
    "mov rsp, qword ptr gs:[48]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".endif",
    ".endm",
    ".globl dbt_asm_start",
    "dbt_asm_start:",
    "DBT_ENTRIES dbt_exit_entry, dbt_miss_entry, 128, 0",
    "DBT_ENTRIES dbt_kexit_entry, dbt_kmiss_entry, 0, 1",
    // dbt_enter(): enter translated code at gs:[TGT] with the guest context
    // from the per-CPU block; returns when the dispatcher decides to leave
    // (exit reason and context in the block).
    ".globl dbt_enter",
    ".p2align 4",
    "dbt_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov qword ptr gs:[48], rsp",
    "mov rbx, qword ptr gs:[0]",
    "add rbx, 256",
    "DBT_RESUME_HOST",
    ".globl dbt_asm_end",
    "dbt_asm_end:",
    // Sentinel return address for harness runs: never executed natively.
    ".globl dbt_sentinel",
    ".p2align 4",
    "dbt_sentinel:",
    "ud2",
    // dbt_native_call(ctx: *mut GuestCtx, f: u64): call f natively with the
    // argument and callee-saved registers from ctx and the other registers
    // zero (the state a translated run starts from); store rax, rdx and the
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
    // Enter f with rax, r10 and r11 zero and the flags from ctx, as a
    // translated run enters it (a `call rax` would leave f's address in rax
    // and the flags of the last test): push the return address and f, load
    // the flags, zero the registers with flag-neutral moves, `ret` into f.
    "lea r10, [rip + dbt_native_ret]",
    "push r10",
    "push rax",
    "push qword ptr [r11+136]",
    "popfq",
    "mov eax, 0",
    "mov r10d, 0",
    "mov r11d, 0",
    "ret",
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
    /// Dispatcher entry from exit stubs, host ABI (never called from Rust).
    pub fn dbt_exit_entry();
    /// Dispatcher entry from lookup misses, host ABI (never called from Rust).
    pub fn dbt_miss_entry();
    /// Kernel-ABI variants (interrupts off inside; never run on the host).
    pub fn dbt_kexit_entry();
    pub fn dbt_kmiss_entry();
    /// Bounds of the dispatcher entry routines and `dbt_enter` (an
    /// interrupted pc in there is inside the dispatcher, not guest code).
    pub fn dbt_asm_start();
    pub fn dbt_asm_end();
    /// Enter translated code (see module docs).
    pub fn dbt_enter();
    /// Sentinel return address.
    pub fn dbt_sentinel();
    /// Native call helper.
    pub fn dbt_native_call(ctx: *mut crate::scratch::GuestCtx, f: u64);
    /// Return address inside `dbt_native_call`.
    pub fn dbt_native_ret();
}

/// (exit entry, miss entry) of the host or kernel ABI.
pub fn entries(kernel: bool) -> (u64, u64) {
    let a = |f: unsafe extern "C" fn()| f as *const () as usize as u64;
    if kernel {
        (a(dbt_kexit_entry), a(dbt_kmiss_entry))
    } else {
        (a(dbt_exit_entry), a(dbt_miss_entry))
    }
}
