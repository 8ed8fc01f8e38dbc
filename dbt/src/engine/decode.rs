//! Decoding guest code into blocks: block limits, stops, kernel classes,
//! thunks, and the arithmetic-flags liveness the snippets rely on.

use super::*;

/// Result of decoding one block.
/// A fragment's guest code: one or more basic blocks at consecutive guest
/// addresses, each but the last ending in a conditional branch whose
/// fall-through is the next one (an extended block).
pub(super) struct Block {
    pub(super) insns: Vec<Instruction>,
    /// The bytes of `insns` as decoded (they are consecutive from the first one's pc):
    /// what the translation copies. Reading the guest's code again for the copy could
    /// see other bytes (kernel text written meanwhile, e.g. the `int3` of `text_poke_bp`
    /// over the first byte of an instruction decoded before it).
    pub(super) code: Vec<u8>,
    /// Indices of the conditional branches that end a basic block inside the
    /// fragment (their fall-through path continues inline).
    pub(super) inline_jcc: Vec<usize>,
    pub(super) term: Term,
    pub(super) end: u64,
    /// Kernel-class instructions in the block (the stop instruction included).
    pub(super) classes: [u64; KClass::COUNT],
}

impl Block {
    /// The bytes `i` (one of `insns`) was decoded from.
    pub(super) fn bytes_of(&self, i: &Instruction) -> Option<&[u8]> {
        let off = i.ip().checked_sub(self.insns.first()?.ip())? as usize;
        self.code.get(off..off.checked_add(i.len())?)
    }

    /// Index ranges of the basic blocks.
    pub(super) fn basic_blocks(&self) -> Vec<core::ops::Range<usize>> {
        let mut v = Vec::with_capacity(self.inline_jcc.len() + 1);
        let mut a = 0;
        for &j in self.inline_jcc.iter() {
            v.push(a..j + 1);
            a = j + 1;
        }
        v.push(a..self.insns.len());
        v
    }
}

pub(super) enum Term {
    /// Fall through to `next` (block length limit).
    Fall(u64),
    /// Last instruction is a control transfer (index into insns).
    Cti,
    /// Stop at pc with kind; the stop instruction is not in `insns`.
    Stop(StopKind, u64),
    /// A native target's own fragment: jump to it (`Config::native_fragments`).
    Native(u64),
}

pub(super) fn classify_stop(i: &Instruction) -> Option<StopKind> {
    if matches!(kclass::classify(i), Some(KClass::Swapgs | KClass::ContextReturn)) {
        return Some(StopKind::Privileged);
    }
    match i.mnemonic() {
        Mnemonic::Int3 | Mnemonic::Int1 | Mnemonic::Into => return Some(StopKind::Breakpoint),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => return Some(StopKind::Undefined),
        Mnemonic::Syscall | Mnemonic::Int | Mnemonic::Sysenter | Mnemonic::Cpuid => return None,
        _ => {}
    }
    match i.flow_control() {
        FlowControl::Exception => Some(StopKind::Undefined),
        FlowControl::XbeginXabortXend => Some(StopKind::Unsupported),
        FlowControl::Interrupt => None,
        FlowControl::Return => match i.code() {
            Code::Retnq | Code::Retnq_imm16 => None,
            _ => Some(StopKind::Unsupported),
        },
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call => {
            if i.op0_kind() == OpKind::NearBranch64 {
                None
            } else {
                Some(StopKind::Unsupported)
            }
        }
        FlowControl::IndirectBranch | FlowControl::IndirectCall => match i.code() {
            Code::Jmp_rm64 | Code::Call_rm64 => None,
            _ => Some(StopKind::Unsupported),
        },
        FlowControl::Next => None,
    }
}

pub(super) fn is_cti(i: &Instruction) -> bool {
    // syscall/sysenter/int n return to the next instruction: copied as is.
    if matches!(i.mnemonic(), Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int | Mnemonic::Cpuid) {
        return false;
    }
    !matches!(i.flow_control(), FlowControl::Next | FlowControl::Interrupt)
}

pub(super) const ARITH: u32 =
    RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;

/// Backward flags liveness over a block: `live[i]` = arithmetic flags live
/// before instruction i. Everything is assumed live after the block.
///
/// An instruction kills only the flags it always writes with a defined value:
/// flags the SDM calls *undefined* afterwards (AF after logic ops, SF/ZF/AF/PF
/// after `imul`, OF after multi-bit shifts, ...) may keep their old value on
/// some CPU, so they stay live through it. Shifts and rotates whose count is
/// `cl`, or an immediate that masks to 0, may leave every flag unchanged:
/// they read what they write.
pub fn flags_liveness(insns: &[Instruction]) -> Vec<u32> {
    let mut live = alloc::vec![0u32; insns.len() + 1];
    let mut cur = ARITH;
    live[insns.len()] = cur;
    for (k, i) in insns.iter().enumerate().rev() {
        let written = i.rflags_modified() & !i.rflags_undefined() & ARITH;
        let read = i.rflags_read() & ARITH;
        cur = (cur & !written) | read;
        if is_shift_or_rotate(i) && shift_may_be_zero(i) {
            cur |= written;
        }
        if i.mnemonic() == Mnemonic::Int3 || i.flow_control() == FlowControl::Interrupt {
            cur = ARITH;
        }
        live[k] = cur;
    }
    live
}

pub(super) fn is_shift_or_rotate(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

/// Whether a shift/rotate's count may be 0 after masking (then it changes no
/// flag): a `cl` count, or an immediate that masks to 0. The one-operand
/// forms (`shl r/m, 1`) always shift.
pub(super) fn shift_may_be_zero(i: &Instruction) -> bool {
    let last = i.op_count().saturating_sub(1);
    match i.op_kind(last) {
        OpKind::Register => i.op_register(last) == Register::CL,
        OpKind::Immediate8 => {
            let wide = i.op0_kind() == OpKind::Register && i.op0_register().is_gpr64()
                || i.op0_kind() == OpKind::Memory && i.memory_size().size() == 8;
            i.immediate8() & if wide { 63 } else { 31 } == 0
        }
        _ => false,
    }
}

impl Engine {
    pub(super) fn decode_block(&self, pc: u64) -> Block {
        let mut insns = Vec::new();
        let mut code = Vec::new();
        let mut inline_jcc = Vec::new();
        let mut cur = pc;
        let mut buf = [0u8; 16];
        let mut classes = [0u64; KClass::COUNT];
        let done = |insns, code, inline_jcc, term, end, classes| Block { insns, code, inline_jcc, term, end, classes };
        loop {
            // A block never ends right after `sti` (its interrupt shadow must
            // cover the guest's next instruction, e.g. `sti; hlt`).
            let after_sti = insns.last().is_some_and(kclass::keeps_next);
            if !after_sti && (insns.len() >= self.cfg.max_block_insns || (cur - pc) as usize > MAX_BLOCK_BYTES) {
                return done(insns, code, inline_jcc, Term::Fall(cur), cur, classes);
            }
            // A block ends where a native region begins; its exit leaves
            // translated code there (the region's entry is never linked).
            if cur != pc && self.env.native(cur) {
                // With native fragments, a plain exit: linked to the native pc's fragment.
                let t = if self.cfg.native_fragments { Term::Fall(cur) } else { Term::Stop(StopKind::Native, cur) };
                return done(insns, code, inline_jcc, t, cur, classes);
            }
            let n = self.env.read_code(cur, &mut buf[..15]).min(15);
            let mut d = Decoder::with_ip(64, &buf[..n], cur, DecoderOptions::NONE);
            let mut i = d.decode();
            if i.is_invalid() {
                return done(insns, code, inline_jcc, Term::Stop(StopKind::Invalid, cur), cur + 1, classes);
            }
            if let Some(c) = kclass::classify(&i) {
                classes[c as usize] += 1;
            }
            if let Some(t) = self.thunk_branch(&i) {
                classes[if t.code() == Code::Retnq { KClass::ReturnThunk } else { KClass::RetpolineThunk } as usize] +=
                    1;
                i = t;
            }
            if let Some(k) = classify_stop(&i) {
                return done(insns, code, inline_jcc, Term::Stop(k, cur), i.next_ip(), classes);
            }
            // `ret n` whose lookup frame would overlap its return slot (copied
            // as is with cached returns: the stack holds a pad).
            if i.code() == Code::Retnq_imm16
                && !self.cfg.cached_returns
                && i.immediate16() != 0
                && !crate::templates::ret_imm_translatable(self.abi.rz, i.immediate16())
            {
                return done(insns, code, inline_jcc, Term::Stop(StopKind::Unsupported, cur), i.next_ip(), classes);
            }
            let cti = is_cti(&i);
            cur = i.next_ip();
            code.extend_from_slice(&buf[..i.len()]);
            insns.push(i);
            if cti {
                let jcc_rel32able = i.flow_control() == FlowControl::ConditionalBranch
                    && !matches!(
                        i.mnemonic(),
                        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz
                    );
                if jcc_rel32able && inline_jcc.len() + 1 < self.cfg.max_basic_blocks {
                    inline_jcc.push(insns.len() - 1);
                    continue;
                }
                return done(insns, code, inline_jcc, Term::Cti, cur, classes);
            }
        }
    }

    /// A direct `call`/`jmp` to a thunk the environment names, as the
    /// instruction it stands for (`call reg`, `jmp reg`, `ret`) at the same
    /// guest address and length.
    pub(super) fn thunk_branch(&self, i: &Instruction) -> Option<Instruction> {
        let call = match i.code() {
            Code::Call_rel32_64 => true,
            Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => false,
            _ => return None,
        };
        let mut t = match (self.env.thunk(i.near_branch_target())?, call) {
            (Thunk::Indirect(r), true) => Instruction::with1(Code::Call_rm64, r).ok()?,
            (Thunk::Indirect(r), false) => Instruction::with1(Code::Jmp_rm64, r).ok()?,
            (Thunk::Return, false) => Instruction::with(Code::Retnq),
            // A call to the return thunk is not a return: translate it as is.
            (Thunk::Return, true) => return None,
        };
        t.set_ip(i.ip());
        t.set_len(i.len());
        t.set_next_ip(i.next_ip());
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    const CF: u32 = RflagsBits::CF;
    const ZF: u32 = RflagsBits::ZF;
    const AF: u32 = RflagsBits::AF;

    #[test]
    fn defined_writes_kill_flags() {
        // add rax, rcx; jz: everything dead before the add, ZF live before jz.
        let l = flags_liveness(&decode(&[0x48, 0x01, 0xC8, 0x74, 0x00]));
        assert_eq!(l[0], 0);
        assert_eq!(l[1], ARITH);
    }

    #[test]
    fn undefined_flags_stay_live() {
        // imul rax, rcx leaves SF/ZF/AF/PF undefined: ZF read by jz stays live.
        let l = flags_liveness(&decode(&[0x48, 0x0F, 0xAF, 0xC1, 0x74, 0x00]));
        assert_ne!(l[0] & ZF, 0);
        assert_eq!(l[0] & CF, 0, "imul defines CF");
        // xor eax, eax leaves AF undefined: lahf reads it.
        let l = flags_liveness(&decode(&[0x31, 0xC0, 0x9F]));
        assert_eq!(l[0], AF);
    }

    #[test]
    fn shifts_that_may_not_shift_keep_flags_live() {
        // shl rax, cl; shl rax, 0; shl rax, 64 (masks to 0): all pass flags through.
        for bytes in [&[0x48, 0xD3, 0xE0][..], &[0x48, 0xC1, 0xE0, 0x00], &[0x48, 0xC1, 0xE0, 0x40]] {
            let l = flags_liveness(&decode(bytes));
            assert_eq!(l[0], ARITH, "{bytes:x?}");
        }
        // shl rax, 3 defines CF/SF/ZF/PF (OF and AF undefined): those die.
        let l = flags_liveness(&decode(&[0x48, 0xC1, 0xE0, 0x03]));
        assert_eq!(l[0], RflagsBits::OF | AF);
        // shl eax, 32 masks to 0 for a 32-bit operand.
        assert_eq!(flags_liveness(&decode(&[0xC1, 0xE0, 0x20]))[0], ARITH);
    }
}
