//! Kernel instruction classes: the privileged and kernel-specific
//! instructions the translator treats by rule, and how each is translated.
//!
//! | class | translation |
//! |---|---|
//! | `swapgs`, `sysretq`/`sysretl`, `sysexit`, `iretq`/`iret` | a *stop* ([`crate::StopKind::Privileged`]): the fragment ends before it and the environment resumes natively at that pc. `swapgs` changes the `%gs` base the exit stubs and clients address, so no translated instruction may run between a `swapgs` and its partner; the others leave kernel mode or switch stacks. In the kernel these live in entry text, which the environment declares native. |
//! | `cli`, `sti`, `pushf`, `popf`, `hlt` | copied: translated code runs at the guest's CPL with the guest's real IF, and no inserted sequence touches IF. `sti` is never separated from a following `hlt`/`mwait` (its one-instruction interrupt shadow must cover them: no client snippet goes between, and a block never ends between them). |
//! | `rdmsr`/`wrmsr`, moves to and from CR/DR, `lgdt`/`lidt`/`ltr`/`lldt`, `invlpg`, `invpcid` | copied; the hypervisor sees what it must through its own exits (MSR bitmap, descriptor-table exiting, CR exits). |
//! | `int3`, `int1`, `into`, `ud0`/`ud1`/`ud2` (BUG/WARN, kprobes, `text_poke_bp`) | a stop of its kind (`Breakpoint`, `Undefined`): the environment executes it at its native address so the kernel's handler sees the pc its tables know. |
//! | `int N`, `syscall`, `cpuid`, `endbr64` | copied. |
//! | `call`/`jmp` to a retpoline thunk (`__x86_indirect_thunk_<reg>`) | the indirect call or jump through `<reg>` it stands for ([`crate::Env::thunk`] names the thunks). |
//! | `jmp` to the return thunk (`__x86_return_thunk`) | a `ret`. |

use iced_x86::{Code, Instruction, Mnemonic, Register};

/// A kernel instruction class (see the module docs for each translation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum KClass {
    /// `swapgs`: the `%gs` base changes.
    Swapgs,
    /// `sysretq`, `sysexit`, `iretq`: returns out of the current context.
    ContextReturn,
    /// `cli`, `sti`, `pushf`, `popf`, `hlt`, `mwait`: interrupt-flag and idle.
    Interrupts,
    /// `rdmsr`, `wrmsr`, moves to/from control and debug registers,
    /// descriptor-table loads, TLB invalidation.
    SystemState,
    /// `int3`, `int1`, `into`: breakpoints.
    Breakpoint,
    /// `ud0`, `ud1`, `ud2`: BUG/WARN and other deliberate #UD.
    Undefined,
    /// `int N`, `syscall`, `sysenter`.
    SoftInterrupt,
    /// `endbr64`.
    Endbr,
    /// A direct call or jump to a retpoline thunk (recognized by address).
    RetpolineThunk,
    /// A direct jump to the return thunk (recognized by address).
    ReturnThunk,
}

impl KClass {
    pub const COUNT: usize = 10;
    pub const ALL: [KClass; KClass::COUNT] = [
        KClass::Swapgs,
        KClass::ContextReturn,
        KClass::Interrupts,
        KClass::SystemState,
        KClass::Breakpoint,
        KClass::Undefined,
        KClass::SoftInterrupt,
        KClass::Endbr,
        KClass::RetpolineThunk,
        KClass::ReturnThunk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KClass::Swapgs => "swapgs",
            KClass::ContextReturn => "sysret/sysexit/iret",
            KClass::Interrupts => "cli/sti/pushf/popf/hlt",
            KClass::SystemState => "msr/cr/dr/descriptor-tables/invlpg",
            KClass::Breakpoint => "int3/int1",
            KClass::Undefined => "ud0/ud1/ud2",
            KClass::SoftInterrupt => "int n/syscall",
            KClass::Endbr => "endbr64",
            KClass::RetpolineThunk => "retpoline thunk call/jmp",
            KClass::ReturnThunk => "return thunk jmp",
        }
    }
}

/// What a thunk address stands for ([`crate::Env::thunk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thunk {
    /// `__x86_indirect_thunk_<reg>`: an indirect branch through the register.
    Indirect(Register),
    /// `__x86_return_thunk`: a return.
    Return,
}

/// The kernel class of an instruction by its encoding (thunk calls are
/// recognized by target address in the translator, not here).
pub fn classify(i: &Instruction) -> Option<KClass> {
    Some(match i.mnemonic() {
        Mnemonic::Swapgs => KClass::Swapgs,
        Mnemonic::Sysret | Mnemonic::Sysretq | Mnemonic::Sysexit | Mnemonic::Sysexitq | Mnemonic::Iret => {
            KClass::ContextReturn
        }
        Mnemonic::Iretd | Mnemonic::Iretq => KClass::ContextReturn,
        Mnemonic::Cli
        | Mnemonic::Sti
        | Mnemonic::Pushf
        | Mnemonic::Pushfq
        | Mnemonic::Popf
        | Mnemonic::Popfq
        | Mnemonic::Hlt
        | Mnemonic::Mwait => KClass::Interrupts,
        Mnemonic::Rdmsr
        | Mnemonic::Wrmsr
        | Mnemonic::Lgdt
        | Mnemonic::Lidt
        | Mnemonic::Ltr
        | Mnemonic::Lldt
        | Mnemonic::Invlpg
        | Mnemonic::Invpcid
        | Mnemonic::Wbinvd
        | Mnemonic::Invd => KClass::SystemState,
        Mnemonic::Mov if is_cr_dr_move(i) => KClass::SystemState,
        Mnemonic::Int3 | Mnemonic::Int1 | Mnemonic::Into => KClass::Breakpoint,
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => KClass::Undefined,
        Mnemonic::Int | Mnemonic::Syscall | Mnemonic::Sysenter => KClass::SoftInterrupt,
        Mnemonic::Endbr64 => KClass::Endbr,
        _ => return None,
    })
}

fn is_cr_dr_move(i: &Instruction) -> bool {
    matches!(
        i.code(),
        Code::Mov_r64_cr | Code::Mov_cr_r64 | Code::Mov_r64_dr | Code::Mov_dr_r64 | Code::Mov_r32_cr | Code::Mov_cr_r32
    )
}

/// Whether `i` must not be separated from the instruction after it: `sti`
/// (its interrupt shadow covers exactly the next instruction; `sti; hlt`
/// split by a jump would take the wake-up interrupt before the `hlt`).
pub fn keeps_next(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Sti
}

/// Most instructions a [`gs_window`] holds between its two `swapgs`.
pub const GS_WINDOW_INSNS: usize = 6;

/// A *`%gs` window* at the start of `bytes` (the code at `pc`): `swapgs`, at most
/// [`GS_WINDOW_INSNS`] instructions that fall through, address no memory through
/// rip or `%gs` and are not themselves kernel-class instructions but for
/// `rdgsbase`/`wrgsbase`/`rdmsr`/`wrmsr`, then the closing `swapgs` (the kernel's
/// `__rdgsbase_inactive`/`__wrgsbase_inactive`: `swapgs; rdgsbase rax; swapgs`).
/// Its length in bytes. No translated instruction can run inside one (the exit stubs
/// address the per-CPU block through `%gs`), so an environment runs a window as it is,
/// from a copy that ends in a jump to `pc + len`.
pub fn gs_window(bytes: &[u8], pc: u64) -> Option<usize> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let mut d = Decoder::with_ip(64, bytes, pc, DecoderOptions::NONE);
    let first = d.decode();
    if first.is_invalid() || classify(&first) != Some(KClass::Swapgs) {
        return None;
    }
    for _ in 0..=GS_WINDOW_INSNS {
        if !d.can_decode() {
            return None;
        }
        let i = d.decode();
        if i.is_invalid() {
            return None;
        }
        if classify(&i) == Some(KClass::Swapgs) {
            return Some(d.position());
        }
        let plain = matches!(i.mnemonic(), Mnemonic::Rdgsbase | Mnemonic::Wrgsbase | Mnemonic::Rdmsr | Mnemonic::Wrmsr)
            || classify(&i).is_none();
        let memory = (0..i.op_count()).any(|k| i.op_kind(k) == iced_x86::OpKind::Memory);
        let bad_memory = memory && (i.is_ip_rel_memory_operand() || i.memory_segment() == Register::GS);
        if i.flow_control() != FlowControl::Next || !plain || bad_memory {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    #[test]
    fn gs_windows() {
        let pc = 0xffff_ffff_8124_b947;
        // swapgs; rdgsbase rax; swapgs; ret
        let w = [0x0F, 0x01, 0xF8, 0xF3, 0x48, 0x0F, 0xAE, 0xC8, 0x0F, 0x01, 0xF8, 0xC3];
        assert_eq!(gs_window(&w, pc), Some(11));
        // swapgs; wrgsbase rdi; swapgs
        assert_eq!(gs_window(&[0x0F, 0x01, 0xF8, 0xF3, 0x48, 0x0F, 0xAE, 0xDF, 0x0F, 0x01, 0xF8], pc), Some(11));
        // Not a window: no closing swapgs in reach, a branch, a %gs or rip-relative access,
        // a sysretq, or not starting with swapgs.
        assert_eq!(gs_window(&w[..8], pc), None);
        assert_eq!(gs_window(&[0x0F, 0x01, 0xF8, 0xC3, 0x0F, 0x01, 0xF8], pc), None);
        assert_eq!(
            gs_window(&[0x0F, 0x01, 0xF8, 0x65, 0x48, 0x8B, 0x04, 0x25, 0, 0, 0, 0, 0x0F, 0x01, 0xF8], pc),
            None
        );
        assert_eq!(gs_window(&[0x0F, 0x01, 0xF8, 0x48, 0x8B, 0x05, 0, 0, 0, 0, 0x0F, 0x01, 0xF8], pc), None);
        assert_eq!(gs_window(&[0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07], pc), None);
        assert_eq!(gs_window(&w[3..], pc), None);
        let long: alloc::vec::Vec<u8> =
            [0x0F, 0x01, 0xF8].into_iter().chain([0x90; GS_WINDOW_INSNS + 1]).chain([0x0F, 0x01, 0xF8]).collect();
        assert_eq!(gs_window(&long, pc), None);
    }

    fn class_of(bytes: &[u8]) -> Option<KClass> {
        classify(&Decoder::with_ip(64, bytes, 0xffff_ffff_8100_0000, DecoderOptions::NONE).decode())
    }

    #[test]
    fn classes_by_encoding() {
        let cases: &[(&[u8], Option<KClass>)] = &[
            (&[0x0F, 0x01, 0xF8], Some(KClass::Swapgs)),
            (&[0x48, 0x0F, 0x07], Some(KClass::ContextReturn)), // sysretq
            (&[0x48, 0xCF], Some(KClass::ContextReturn)),       // iretq
            (&[0x48, 0x0F, 0x35], Some(KClass::ContextReturn)), // sysexitq
            (&[0xFA], Some(KClass::Interrupts)),                // cli
            (&[0xFB], Some(KClass::Interrupts)),                // sti
            (&[0x9C], Some(KClass::Interrupts)),                // pushfq
            (&[0x9D], Some(KClass::Interrupts)),                // popfq
            (&[0xF4], Some(KClass::Interrupts)),                // hlt
            (&[0x0F, 0x30], Some(KClass::SystemState)),         // wrmsr
            (&[0x0F, 0x32], Some(KClass::SystemState)),         // rdmsr
            (&[0x0F, 0x22, 0xD8], Some(KClass::SystemState)),   // mov cr3, rax
            (&[0x0F, 0x20, 0xE0], Some(KClass::SystemState)),   // mov rax, cr4
            (&[0x0F, 0x23, 0xF8], Some(KClass::SystemState)),   // mov dr7, rax
            (&[0x0F, 0x01, 0x10], Some(KClass::SystemState)),   // lgdt [rax]
            (&[0x0F, 0x01, 0x18], Some(KClass::SystemState)),   // lidt [rax]
            (&[0x0F, 0x00, 0xD8], Some(KClass::SystemState)),   // ltr ax
            (&[0x0F, 0x01, 0x38], Some(KClass::SystemState)),   // invlpg [rax]
            (&[0xCC], Some(KClass::Breakpoint)),
            (&[0x0F, 0x0B], Some(KClass::Undefined)), // ud2 (BUG/WARN)
            (&[0x0F, 0xB9, 0x40, 0x10], Some(KClass::Undefined)), // ud1
            (&[0xCD, 0x80], Some(KClass::SoftInterrupt)),
            (&[0x0F, 0x05], Some(KClass::SoftInterrupt)),
            (&[0xF3, 0x0F, 0x1E, 0xFA], Some(KClass::Endbr)),
            (&[0x48, 0x89, 0xC8], None), // mov rax, rcx
            (&[0xC3], None),             // ret
        ];
        for (bytes, want) in cases {
            assert_eq!(class_of(bytes), *want, "{bytes:02x?}");
        }
    }

    #[test]
    fn only_sti_keeps_its_successor() {
        let d = |b: &[u8]| Decoder::with_ip(64, b, 0, DecoderOptions::NONE).decode();
        assert!(keeps_next(&d(&[0xFB])));
        assert!(!keeps_next(&d(&[0xFA])));
        assert!(!keeps_next(&d(&[0xF4])));
    }

    #[test]
    fn class_names_are_distinct() {
        for (k, a) in KClass::ALL.iter().enumerate() {
            assert_eq!(*a as usize, k);
            assert!(KClass::ALL[k + 1..].iter().all(|b| b.name() != a.name()));
        }
    }
}
