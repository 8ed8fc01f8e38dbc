//! Hand-written entry/exit routines: the dispatcher entries reached from
//! exit stubs (`jmp gs:[EXIT_ENTRY]`) and lookup misses
//! (`jmp gs:[MISS_ENTRY]`), and (host only) the harness entry `dbt_enter`
//! and two helpers. Offsets refer to [`crate::scratch::Scratch`] and
//! [`crate::scratch::Frame`].
//!
//! The dispatcher entries are *templates*, assembled into a read-only data
//! section: every engine copies the template of its ABI into its code cache
//! with each `gs:[disp32]` rebased by the offset of its per-CPU block from
//! the `%gs` base ([`entry_code`]; the environment chooses it: the kernel's
//! is an `alloc_percpu` offset, the host harness's [`HOST_GS_BASE`]). So the
//! module's text holds no code a kernel's objtool would have to be told
//! about, and the same bytes run on the host and in the kernel.
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
    ".macro DBT_ENTRIES exitn, missn, endn, rz, kernel",
    ".globl \\exitn",
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
    // int3 padding: one-byte instructions, so the template decodes
    // linearly (it is relocated by decoding it).
    ".balign 16, 0xcc",
    ".globl \\missn",
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
    // The requested-feature bitmap is the block's save_xstate (the
    // environment leaves out what the area cannot hold and the dispatcher
    // never uses: AMX tile data is 8 KB).
    "mov eax, dword ptr gs:[64]",
    "mov edx, dword ptr gs:[68]",
    "xsave64 [rsp]",
    "2:",
    "mov rdi, qword ptr gs:[0]",
    "mov rsi, rbx",
    "call qword ptr [rdi+56]",
    "mov r12, rax",
    "cmp qword ptr gs:[64], 0",
    "je 3f",
    "mov eax, dword ptr gs:[64]",
    "mov edx, dword ptr gs:[68]",
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
    ".globl \\endn",
    "\\endn:",
    ".endm",
    // The templates are data: never executed where they are assembled (the
    // engine copies them into its code cache with their `gs:` offsets
    // rebased, see `entry_code`), so a kernel's objtool never sees them as
    // text.
    ".pushsection .rodata.dbt_entry_templates, \"a\"",
    ".balign 16, 0xcc",
    "DBT_ENTRIES dbt_tmpl_exit, dbt_tmpl_miss, dbt_tmpl_end, 128, 0",
    ".balign 16, 0xcc",
    "DBT_ENTRIES dbt_tmpl_kexit, dbt_tmpl_kmiss, dbt_tmpl_kend, 0, 1",
    ".popsection",
);

/// Where the host harness puts its per-CPU block relative to the thread's
/// `%gs` base: not 0, so that every host run exercises the rebasing of the
/// generated entries and of the inserted code (the kernel's offset is an
/// `alloc_percpu` offset).
pub const HOST_GS_BASE: i32 = 4096;

// Host harness routines (text, host only).
#[cfg(feature = "host")]
core::arch::global_asm!(
    // dbt_enter(s: *mut Scratch): enter translated code at s.tgt with the
    // guest context s.ctx (s is this thread's block, at gs:[HOST_GS_BASE]);
    // returns when the dispatcher decides to leave (exit reason and context
    // in the block; the generated host exit entry restores the rsp saved
    // here and pops what this pushed).
    ".globl dbt_enter",
    ".p2align 4",
    "dbt_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi+48], rsp",
    "lea rbx, [rdi+256]",
    "push qword ptr [rbx+136]",
    "popfq",
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
    "mov rsp, [rbx+32]",
    "mov rbx, [rbx+24]",
    "jmp qword ptr gs:[{tgt}]",
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
    tgt = const HOST_GS_BASE as i64 + crate::scratch::OFF_TGT,
);

extern "C" {
    static dbt_tmpl_exit: u8;
    static dbt_tmpl_miss: u8;
    static dbt_tmpl_end: u8;
    static dbt_tmpl_kexit: u8;
    static dbt_tmpl_kmiss: u8;
    static dbt_tmpl_kend: u8;
}

#[cfg(feature = "host")]
extern "C" {
    /// Enter translated code (see the routine's comment).
    pub fn dbt_enter(s: *mut crate::scratch::Scratch);
    /// Sentinel return address.
    pub fn dbt_sentinel();
    /// Native call helper.
    pub fn dbt_native_call(ctx: *mut crate::scratch::GuestCtx, f: u64);
    /// Return address inside `dbt_native_call`.
    pub fn dbt_native_ret();
}

/// The dispatcher entries of one ABI as assembled (a template: data, never
/// run in place): the bytes, and the offset of the miss entry (the exit
/// entry is at 0).
pub fn entry_template(kernel: bool) -> (&'static [u8], usize) {
    // SAFETY: the labels delimit one contiguous template in a read-only
    // section of this object (the global_asm above), start before miss
    // before end.
    unsafe {
        let (a, m, e) = if kernel {
            (&raw const dbt_tmpl_kexit, &raw const dbt_tmpl_kmiss, &raw const dbt_tmpl_kend)
        } else {
            (&raw const dbt_tmpl_exit, &raw const dbt_tmpl_miss, &raw const dbt_tmpl_end)
        };
        (core::slice::from_raw_parts(a, e as usize - a as usize), m as usize - a as usize)
    }
}

/// Generated dispatcher entries: the template of one ABI with every
/// `gs:[disp32]` (no base, no index) rebased by `gs_base`, the offset of the
/// per-CPU block from the `%gs` base, for the code-cache address `at`.
pub struct EntryCode {
    pub bytes: alloc::vec::Vec<u8>,
    pub miss_off: usize,
    /// How many `gs:` operands were rebased.
    pub rebased: usize,
}

/// Build the entries (see [`EntryCode`]); None if a rebased displacement
/// would not fit in 32 bits or the template does not decode.
pub fn entry_code(kernel: bool, gs_base: i32) -> Option<EntryCode> {
    use iced_x86::{Decoder, DecoderOptions, Register};
    let (t, miss_off) = entry_template(kernel);
    let mut bytes = t.to_vec();
    let mut rebased = 0;
    let mut d = Decoder::with_ip(64, t, 0, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return None;
        }
        let mem = (0..i.op_count()).any(|k| i.op_kind(k) == iced_x86::OpKind::Memory);
        if mem
            && i.memory_segment() == Register::GS
            && i.memory_base() == Register::None
            && i.memory_index() == Register::None
        {
            let co = d.get_constant_offsets(&i);
            if !co.has_displacement() || co.displacement_size() != 4 {
                return None;
            }
            let at = i.ip() as usize + co.displacement_offset();
            let old = i32::from_le_bytes(bytes[at..at + 4].try_into().ok()?);
            let new = old.checked_add(gs_base)?;
            bytes[at..at + 4].copy_from_slice(&new.to_le_bytes());
            rebased += 1;
        }
    }
    Some(EntryCode { bytes, miss_off, rebased })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Register};

    fn text(b: &[u8]) -> alloc::vec::Vec<alloc::string::String> {
        let mut f = IntelFormatter::new();
        let mut out = alloc::vec::Vec::new();
        for i in Decoder::with_ip(64, b, 0, DecoderOptions::NONE).iter() {
            let mut s = alloc::string::String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn generated_entries_rebase_every_gs_operand_and_nothing_else() {
        for kernel in [false, true] {
            let (t, miss) = entry_template(kernel);
            let plain = entry_code(kernel, 0).unwrap();
            assert_eq!(plain.bytes, t, "offset 0 changes nothing");
            let g = entry_code(kernel, 0x12340).unwrap();
            assert_eq!(g.miss_off, miss);
            assert_eq!(g.bytes.len(), t.len());
            // Every gs operand of the template: the block's dispatcher stack
            // (once per entry), its xsave mask (tested and loaded as two
            // halves, around xsave and xrstor) and self pointer; the host's
            // also the resume target (written, jumped through) and saved rsp.
            let gs = |b: &[u8]| {
                Decoder::with_ip(64, b, 0, DecoderOptions::NONE)
                    .iter()
                    .filter(|i| i.memory_segment() == Register::GS && i.memory_base() == Register::None)
                    .map(|i| i.memory_displacement64() as i64)
                    .collect::<alloc::vec::Vec<_>>()
            };
            let (a, b) = (gs(t), gs(&g.bytes));
            assert_eq!(a.len(), g.rebased);
            assert_eq!(a.len(), if kernel { 9 } else { 12 }, "{:?}", text(t));
            assert!(a.iter().zip(&b).all(|(x, y)| y - x == 0x12340), "{a:x?} {b:x?}");
            // Apart from the displacements, the same instructions.
            let strip = |v: alloc::vec::Vec<alloc::string::String>| {
                v.into_iter().map(|s| if s.contains("gs:[") { "gs".into() } else { s }).collect::<alloc::vec::Vec<_>>()
            };
            assert_eq!(strip(text(t)), strip(text(&g.bytes)));
            // Both entries start with endbr64 (kernels with IBT).
            assert_eq!(&g.bytes[..4], &crate::templates::ENDBR64);
            assert_eq!(&g.bytes[miss..miss + 4], &crate::templates::ENDBR64);
        }
        assert!(entry_code(true, i32::MAX).is_none(), "an offset that overflows a disp32 is refused");
    }

    #[test]
    fn kernel_entries_enable_interrupts_only_at_the_final_jump() {
        let (t, _) = entry_template(true);
        let v = text(t);
        assert_eq!(v[1], "pushfq");
        assert_eq!(v[2], "cli");
        for (k, s) in v.iter().enumerate() {
            if s == "sti" {
                assert_eq!(v[k + 1], "jmp qword ptr [rsp-8]");
            }
        }
    }
}
