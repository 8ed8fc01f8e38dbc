//! The code the translator inserts around guest instructions, and the
//! emitter that records, for every byte, the native state it stands for
//! (the pc map, see [`crate::pcmap`]).
//!
//! Kernel-safe ABI (README "ABI"): no guest value is ever held in per-CPU
//! memory. Each sequence spills to the guest stack with pushes (interrupts
//! push below rsp, so the slots survive nesting, preemption and migration),
//! after stepping over the red zone where the guest may have live data below
//! rsp (host: 128 bytes; kernel: none). A lookup leaves a *frame* at the
//! target: `[rsp] = guest rcx`, `[rsp+8] = guest rdx`, `rcx = guest target`,
//! native `rsp = rsp + 16 + RZ`; the target's check pops it.

use alloc::vec::Vec;
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

use crate::client::Snippet;
use crate::pcmap::{Flags, MapEnt, Npc};
use crate::scratch::{OFF_EXIT_ENTRY, OFF_LOOKUP_HITS, OFF_MISS_ENTRY};

pub(crate) const ENDBR64: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];

/// Saved-register bits of a lookup frame (rcx at [rsp], rdx at [rsp+8]).
const FRAME_SAVED: u16 = (1 << 1) | (1 << 2);

/// What the inserted sequences depend on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Abi {
    /// Bytes below rsp the guest may use (host 128, kernel 0).
    pub rz: i64,
    /// Address of the shared lookup table (`[rdx*8 + disp32]`), or None:
    /// every indirect transfer goes to the dispatcher.
    pub ibl: Option<i64>,
    pub count_hits: bool,
    /// Offset of the per-CPU block from the `%gs` base
    /// ([`crate::Config::gs_base`]): added to every `gs:` displacement of
    /// inserted code (the engine's and the client's, never the guest's).
    pub gs_base: i64,
}

/// `gs:[off]` with 64-bit addressing (iced's displacement size 8: a
/// sign-extended disp32; size 4 would mean 32-bit addressing, an `0x67`
/// prefix and a zero-extended offset).
/// `off` is relative to the per-CPU block, at `abi.gs_base` from the base.
pub(crate) fn gs(abi: &Abi, off: i64) -> MemoryOperand {
    MemoryOperand::new(Register::None, Register::None, 1, abi.gs_base + off, 8, false, Register::GS)
}

fn rsp_at(d: i64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RSP, d)
}

/// Offset from the native rsp of the lookup frame's low slot for a `ret n`
/// (the frame sits just below where the return leaves rsp, `rz` lower still).
fn ret_imm_frame(rz: i64, n: u16) -> i64 {
    i64::from(n) - rz - 8
}

/// Whether [`Emit::ret_imm_lookup`] translates `ret n` under red zone `rz`:
/// its frame must lie at or above `rsp - rz` and must either be the return
/// slot exactly (swapped with `xchg`) or miss it. The rest (kernel: n < 8 and
/// 8 < n < 16; host: n < 8 and 120 < n < 144 but 136) is a stop.
pub(crate) fn ret_imm_translatable(rz: i64, n: u16) -> bool {
    let f = ret_imm_frame(rz, n);
    n > 0 && f >= -rz && (f == 0 || f + 16 <= 0 || f >= 8) && f + 8 <= i64::from(i16::MAX)
}

/// Code emitter for one area (a fragment's hot code, its stubs).
pub(crate) struct Emit {
    pub base: u64,
    pub buf: Vec<u8>,
    /// RIP-relative references to 8-byte constants placed after the code by
    /// `finish`: (offset of the end of the referencing instruction, whose
    /// last 4 bytes are its disp32; value).
    pub consts: Vec<(usize, u64)>,
    /// The pc map of the bytes emitted so far.
    pub map: Vec<MapEnt>,
    enc: Encoder,
    pub err: bool,
    pub bad: u64,
    /// Where the native flags are (recorded by `st` in each map entry).
    flags: Flags,
}

impl Emit {
    pub fn new(base: u64) -> Self {
        Emit {
            base,
            buf: Vec::with_capacity(256),
            consts: Vec::new(),
            map: Vec::new(),
            enc: Encoder::new(64),
            err: false,
            bad: 0,
            flags: Flags::Live,
        }
    }
    pub fn pc(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
    /// From here on the native state is `npc`, rsp + `sp`, `saved` at `top`.
    pub fn st(&mut self, npc: Npc, sp: i64, saved: u16, top: i64) {
        let e = MapEnt { off: self.buf.len() as u32, npc, sp: sp as i32, saved, top: top as i16, flags: self.flags };
        match self.map.last_mut() {
            Some(l) if l.off == e.off => *l = e,
            Some(l) if MapEnt { off: e.off, ..*l } == e => {}
            _ => self.map.push(e),
        }
    }
    /// From here on: guest pc `pc`, nothing changed.
    pub fn guest(&mut self, pc: u64) {
        self.st(Npc::At(pc), 0, 0, 0);
    }
    pub fn ins(&mut self, i: Result<Instruction, iced_x86::IcedError>) {
        match i {
            Ok(i) => {
                let pc = self.pc();
                match self.enc.encode(&i, pc) {
                    Ok(_) => {
                        let b = self.enc.take_buffer();
                        self.buf.extend_from_slice(&b);
                    }
                    Err(_) => {
                        self.err = true;
                        self.bad = i.code() as u32 as u64;
                    }
                }
            }
            Err(_) => self.err = true,
        }
    }
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// Place the constants (8-byte aligned, after `int3` padding: never
    /// executed) and point their references at them.
    pub fn finish(&mut self) {
        if self.consts.is_empty() {
            return;
        }
        while !self.pc().is_multiple_of(8) {
            self.buf.push(0xCC);
        }
        for (end, v) in core::mem::take(&mut self.consts) {
            let disp = (self.buf.len() - end) as i32;
            self.buf[end - 4..end].copy_from_slice(&disp.to_le_bytes());
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Pad with nops so that a field at offset `field` of the next
    /// instruction starts 4-byte aligned.
    pub fn align_field(&mut self, field: u64) {
        while !(self.pc() + field).is_multiple_of(4) {
            self.buf.push(0x90);
        }
    }

    fn lea_rsp(&mut self, d: i64) {
        if d != 0 {
            self.ins(Instruction::with2(Code::Lea_r64_m, Register::RSP, rsp_at(d)));
        }
    }

    /// Push a 64-bit constant without a scratch register, as one 8-byte
    /// store: `push imm32` when it sign-extends from 32 bits (kernel text),
    /// else `push qword [rip + c]` with the constant after the code.
    pub fn push_u64(&mut self, v: u64) {
        if (v as i64) == (v as u32 as i32 as i64) {
            self.ins(Instruction::with1(Code::Pushq_imm32, v as u32 as i32));
        } else {
            self.raw(&[0xFF, 0x35, 0, 0, 0, 0]);
            self.consts.push((self.buf.len(), v));
        }
    }

    /// The end of a lookup (frame built, `rcx` = guest target, native state
    /// `Rcx` with native rsp = rsp + 16 + RZ): `movzx edx, cx; jmp [rdx*8 +
    /// table]`, or straight to the dispatcher's miss entry.
    fn lookup_jump(&mut self, abi: &Abi) {
        self.st(Npc::Rcx, 16 + abi.rz, FRAME_SAVED, 8);
        match abi.ibl {
            Some(t) => {
                self.ins(Instruction::with2(Code::Movzx_r32_rm16, Register::EDX, Register::CX));
                self.ins(Instruction::with1(
                    Code::Jmp_rm64,
                    MemoryOperand::new(Register::None, Register::RDX, 8, t, 8, false, Register::None),
                ));
            }
            None => self.ins(Instruction::with1(Code::Jmp_rm64, gs(abi, OFF_MISS_ENTRY))),
        }
    }

    /// `ret` at guest `pc`: the return address becomes the target, the frame
    /// ends up where the native `ret` leaves rsp. Flags-neutral.
    pub fn ret_lookup(&mut self, abi: &Abi, pc: u64) {
        self.guest(pc);
        if abi.rz == 0 {
            // push rcx; mov rcx,[rsp+8]; mov [rsp+8],rdx  (the return slot becomes the rdx slot)
            self.ins(Instruction::with1(Code::Push_r64, Register::RCX));
            self.st(Npc::At(pc), 8, 1 << 1, 0);
            self.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, rsp_at(8)));
            self.ins(Instruction::with2(Code::Mov_rm64_r64, rsp_at(8), Register::RDX));
        } else {
            // lea rsp,[rsp-(RZ-8)]; push rdx; push rcx; mov rcx,[rsp+RZ+8]
            self.lea_rsp(8 - abi.rz);
            self.st(Npc::At(pc), abi.rz - 8, 0, 0);
            self.ins(Instruction::with1(Code::Push_r64, Register::RDX));
            self.st(Npc::At(pc), abi.rz, 1 << 2, 0);
            self.ins(Instruction::with1(Code::Push_r64, Register::RCX));
            self.st(Npc::At(pc), abi.rz + 8, FRAME_SAVED, 8);
            self.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, rsp_at(abi.rz + 8)));
        }
        self.lookup_jump(abi);
    }

    /// `ret n` (n > 0, callee-popped stack arguments) at guest `pc`: the
    /// frame `ret_lookup` builds, n bytes higher, where the native `ret n`
    /// leaves rsp. Its two slots are written first, with rsp where it was, at
    /// or above the lowest byte the guest keeps (`rsp - rz`) and apart from
    /// the return slot (they land in the popped arguments or, on the host, the
    /// red zone, both dead after the return); rsp then moves onto them in one
    /// instruction, which is the transfer. So an interrupt never finds the
    /// return address below rsp before the transfer. Flags-neutral. Only for
    /// the `n` that [`ret_imm_translatable`] accepts.
    pub fn ret_imm_lookup(&mut self, abi: &Abi, pc: u64, n: u16) {
        let f = ret_imm_frame(abi.rz, n);
        self.guest(pc);
        if f == 0 {
            // The frame's rcx slot is the return slot: swap them in one step.
            // mov [rsp+8],rdx; xchg [rsp],rcx
            self.ins(Instruction::with2(Code::Mov_rm64_r64, rsp_at(8), Register::RDX));
            self.st(Npc::At(pc), 0, 1 << 2, 8);
            self.ins(Instruction::with2(Code::Xchg_rm64_r64, rsp_at(0), Register::RCX));
        } else {
            // mov [rsp+F],rcx; mov rcx,[rsp]; mov [rsp+F+8],rdx; lea rsp,[rsp+F]
            self.ins(Instruction::with2(Code::Mov_rm64_r64, rsp_at(f), Register::RCX));
            self.st(Npc::At(pc), 0, 1 << 1, f);
            self.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, rsp_at(0)));
            self.ins(Instruction::with2(Code::Mov_rm64_r64, rsp_at(f + 8), Register::RDX));
            self.st(Npc::At(pc), 0, FRAME_SAVED, f + 8);
            self.lea_rsp(f);
        }
        self.lookup_jump(abi);
    }

    /// `call r/m` / `jmp r/m` at guest `pc`: `load` puts the operand in rcx
    /// given how far rsp moved below the native rsp (`push_ret`: the call's
    /// native return address, pushed first as the native call does).
    /// `pre`: bytes already pushed below the native rsp (a cached-returns
    /// call pushed its pad).
    pub fn ind_lookup(&mut self, abi: &Abi, pc: u64, push_ret: Option<u64>, pre: i64, op: &Operand) {
        let mut sp = pre;
        self.st(Npc::At(pc), sp, 0, 0);
        if let Some(r) = push_ret {
            self.push_u64(r);
            sp += 8;
            self.st(Npc::At(pc), sp, 0, 0);
        }
        self.lea_rsp(-abi.rz);
        sp += abi.rz;
        self.st(Npc::At(pc), sp, 0, 0);
        self.ins(Instruction::with1(Code::Push_r64, Register::RDX));
        sp += 8;
        self.st(Npc::At(pc), sp, 1 << 2, 0);
        self.ins(Instruction::with1(Code::Push_r64, Register::RCX));
        sp += 8;
        self.st(Npc::At(pc), sp, FRAME_SAVED, 8);
        op.load_rcx(self, sp);
        self.lookup_jump(abi);
    }

    /// A fragment's (or pad's) indirect entry for guest `pc`: reached with a
    /// frame and the target in rcx; if the target is `pc`, pop the frame and
    /// fall into the body, else rebuild the target and go to the miss entry.
    /// Flags-neutral (lea/jrcxz/not/pop only).
    pub fn target_check(&mut self, abi: &Abi, pc: u64) {
        let fsp = 16 + abi.rz;
        let neg = (pc as i64).wrapping_neg();
        let mut miss = Emit::new(0);
        self.st(Npc::Rcx, fsp, FRAME_SAVED, 8);
        if neg == neg as i32 as i64 {
            // Kernel text (top 2 GiB): -pc fits a displacement.
            self.ins(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_displ(Register::RCX, neg),
            ));
            miss.ins(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_displ(Register::RCX, pc as i64),
            ));
        } else {
            self.ins(Instruction::with2(Code::Mov_r64_imm64, Register::RDX, neg as u64));
            self.ins(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::new(Register::RCX, Register::RDX, 1, 0, 0, false, Register::None),
            ));
            // rcx - rdx = rcx + !rdx + 1
            miss.ins(Instruction::with1(Code::Not_rm64, Register::RDX));
            miss.ins(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::new(Register::RCX, Register::RDX, 1, 1, 1, false, Register::None),
            ));
        }
        let miss_rebuild = miss.buf.len();
        miss.ins(Instruction::with1(Code::Jmp_rm64, gs(abi, OFF_MISS_ENTRY)));
        if miss.err || miss.buf.len() > 127 {
            self.err = true;
            return;
        }
        self.st(Npc::RcxPlus(pc), fsp, FRAME_SAVED, 8);
        self.raw(&[0xE3, miss.buf.len() as u8]); // jrcxz ok
        let miss_at = self.buf.len() as u32;
        self.raw(&miss.buf);
        // The miss path's own map: rcx = target - pc until the rebuild ends.
        self.map.push(MapEnt {
            off: miss_at + miss_rebuild as u32,
            npc: Npc::Rcx,
            sp: fsp as i32,
            saved: FRAME_SAVED,
            top: 8,
            flags: Flags::Live,
        });
        // ok: rcx is 0, the target is pc.
        self.st(Npc::At(pc), fsp, FRAME_SAVED, 8);
        if abi.count_hits {
            self.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, gs(abi, OFF_LOOKUP_HITS)));
            self.ins(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_displ(Register::RCX, 1),
            ));
            self.ins(Instruction::with2(Code::Mov_rm64_r64, gs(abi, OFF_LOOKUP_HITS), Register::RCX));
        }
        self.ins(Instruction::with1(Code::Pop_r64, Register::RCX));
        self.st(Npc::At(pc), fsp - 8, 1 << 2, 0);
        self.ins(Instruction::with1(Code::Pop_r64, Register::RDX));
        self.st(Npc::At(pc), abi.rz, 0, 0);
        self.lea_rsp(abi.rz);
        self.guest(pc);
    }

    /// A client snippet standing for native pc `pc`: the registers it
    /// clobbers (and rax, if the arithmetic flags are live and it clobbers
    /// them) pushed in descending order after the red zone, the flags as
    /// `lahf`/`seto` in one more slot, its rsp-relative operands adjusted for
    /// the pushes; everything undone after.
    pub fn snippet(&mut self, abi: &Abi, pc: u64, s: &Snippet, flags_live: u32) {
        let save_flags = s.clobbers_flags && flags_live != 0;
        let mut mask = 0u16;
        for r in s.clobbers.iter() {
            let r = r.full_register();
            if r.is_gpr64() && r != Register::RSP {
                mask |= 1 << (r as u32 - Register::RAX as u32);
            }
        }
        if save_flags {
            mask |= 1;
        }
        let regs: Vec<Register> =
            (0..16u32).rev().filter(|k| mask & (1 << k) != 0).map(|k| reg64(k as usize)).collect();
        self.guest(pc);
        self.lea_rsp(-abi.rz);
        let mut sp = abi.rz;
        let mut saved = 0u16;
        for r in regs.iter() {
            self.st(Npc::At(pc), sp, saved, sp - abi.rz - 8);
            self.ins(Instruction::with1(Code::Push_r64, *r));
            sp += 8;
            saved |= 1 << (*r as u32 - Register::RAX as u32);
        }
        let top = sp - abi.rz - 8;
        self.st(Npc::At(pc), sp, saved, top);
        if save_flags {
            // ah = SF ZF AF PF CF, al = OF
            self.ins(Ok(Instruction::with(Code::Lahf)));
            self.ins(Instruction::with1(Code::Seto_rm8, Register::AL));
            self.ins(Instruction::with1(Code::Push_r64, Register::RAX));
            sp += 8;
            // From here until the sahf the native flags are in the image.
            self.flags = Flags::Stack(0);
            self.st(Npc::At(pc), sp, saved, top + 8);
            // The client sees the guest's rax (its slot is right above).
            self.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RAX, rsp_at(8)));
        }
        for i in s.code.iter() {
            let mut i = *i;
            if i.memory_segment() == Register::GS
                && i.memory_base() == Register::None
                && i.memory_index() == Register::None
            {
                // The client addresses its slots relative to the per-CPU block.
                i.set_memory_displacement64((i.memory_displacement64() as i64 + abi.gs_base) as u64);
            }
            if i.memory_base() == Register::RSP {
                let d = i.memory_displacement64() as i64 + sp;
                i.set_memory_displacement64(d as u64);
                // iced: 8 = disp32 with 64-bit addressing.
                i.set_memory_displ_size(if d == d as i8 as i64 { 1 } else { 8 });
            }
            self.ins(Ok(i));
        }
        if save_flags {
            self.ins(Instruction::with1(Code::Pop_r64, Register::RAX));
            sp -= 8;
            self.flags = Flags::Rax;
            self.st(Npc::At(pc), sp, saved, top);
            // al = 1 iff OF was set: al + 0x7f overflows exactly then.
            self.ins(Instruction::with2(Code::Add_rm8_imm8, Register::AL, 0x7fu32));
            self.flags = Flags::Ah;
            self.st(Npc::At(pc), sp, saved, top);
            self.ins(Ok(Instruction::with(Code::Sahf)));
            self.flags = Flags::Live;
            self.st(Npc::At(pc), sp, saved, top);
        }
        for r in regs.iter().rev() {
            self.ins(Instruction::with1(Code::Pop_r64, *r));
            sp -= 8;
            saved &= !(1 << (*r as u32 - Register::RAX as u32));
            self.st(Npc::At(pc), sp, saved, sp - abi.rz - 8);
        }
        self.lea_rsp(abi.rz);
        self.guest(pc);
    }
}

/// The 64-bit GPR of x86 encoding number `k` (0 = rax .. 15 = r15; `k & 15`).
pub fn reg64(k: usize) -> Register {
    const R: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    R[k & 15]
}

/// The operand of an indirect `call`/`jmp`.
pub(crate) enum Operand {
    Reg(Register),
    Mem(MemoryOperand),
    /// A known target (a fault slot's way back: the next instruction's native pc).
    Imm(u64),
}

impl Operand {
    pub fn of(i: &Instruction) -> Operand {
        if i.op0_kind() == iced_x86::OpKind::Register {
            Operand::Reg(i.op0_register())
        } else {
            Operand::Mem(MemoryOperand::new(
                i.memory_base(),
                i.memory_index(),
                i.memory_index_scale(),
                i.memory_displacement64() as i64,
                i.memory_displ_size(),
                false,
                i.segment_prefix(),
            ))
        }
    }

    /// rcx <- the operand as the guest would see it, rsp being `moved`
    /// bytes below the native rsp.
    fn load_rcx(&self, e: &mut Emit, moved: i64) {
        match self {
            Operand::Reg(Register::RSP) => {
                e.ins(Instruction::with2(Code::Lea_r64_m, Register::RCX, rsp_at(moved)));
            }
            Operand::Reg(r) => e.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, *r)),
            Operand::Imm(v) if *v as i64 == *v as i64 as i32 as i64 => {
                e.ins(Instruction::with2(Code::Mov_rm64_imm32, Register::RCX, *v as i64))
            }
            Operand::Imm(v) => e.ins(Instruction::with2(Code::Mov_r64_imm64, Register::RCX, *v)),
            Operand::Mem(m) => {
                let mut m = *m;
                if m.base == Register::RSP {
                    m.displacement += moved;
                    // iced: 8 = disp32 with 64-bit addressing.
                    m.displ_size = if m.displacement == m.displacement as i8 as i64 { 1 } else { 8 };
                }
                e.ins(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, m));
            }
        }
    }
}

/// An exit stub at `at` whose exit record's address is stored at `slot`
/// (data after the area's stubs, so the stubs themselves are only
/// instructions), for guest target `target`:
/// `[lea rsp,[rsp-RZ]]; push qword [rip -> slot]; jmp gs:[EXIT_ENTRY]`
/// (always the same length). Its map: native pc `target` (the branch into
/// the stub has happened), rsp adjusted for the step and the push.
pub(crate) fn exit_stub(abi: &Abi, at: u64, slot: u64, target: u64) -> Emit {
    let mut t = Emit::new(at);
    t.guest(target);
    t.lea_rsp(-abi.rz);
    t.st(Npc::At(target), abi.rz, 0, 0);
    t.raw(&[0xFF, 0x35, 0, 0, 0, 0]);
    let end = t.pc();
    let disp = slot.wrapping_sub(end) as i64;
    if disp != disp as i32 as i64 {
        t.err = true;
    }
    let n = t.buf.len();
    t.buf[n - 4..].copy_from_slice(&(disp as i32).to_le_bytes());
    t.st(Npc::At(target), abi.rz + 8, 0, 0);
    t.ins(Instruction::with1(Code::Jmp_rm64, gs(abi, OFF_EXIT_ENTRY)));
    t
}

/// Bytes of one exit stub.
pub(crate) fn exit_stub_len(abi: &Abi) -> u64 {
    exit_stub(abi, 0, 0, 0).buf.len() as u64
}

/// Layout of `n` stubs and their record slots: (offset of the slots, total
/// bytes before rounding to the allocation unit).
pub(crate) fn stubs_layout(abi: &Abi, n: u64) -> (u64, u64) {
    let slots = (exit_stub_len(abi) * n).div_ceil(8) * 8;
    (slots, slots + 8 * n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn text(b: &[u8]) -> Vec<String> {
        text_at(b, 0)
    }

    fn text_at(b: &[u8], ip: u64) -> Vec<String> {
        let mut f = IntelFormatter::new();
        Decoder::with_ip(64, b, ip, DecoderOptions::NONE)
            .into_iter()
            .map(|i| {
                let mut s = String::new();
                f.format(&i, &mut s);
                s
            })
            .collect()
    }
    extern crate std;
    use std::string::String;

    const KERNEL: Abi = Abi { rz: 0, ibl: Some(-0x100_0000), count_hits: false, gs_base: 0 };
    const HOST: Abi = Abi { rz: 128, ibl: Some(0x10_0000), count_hits: false, gs_base: 0 };

    /// Runs a `ret n` translation's inserted code (up to the table jump) on a
    /// model machine, and at every instruction boundary first destroys what
    /// an interrupt may (every byte below `rsp - rz`), then recovers the
    /// native state with the pc map: before the transfer it must be the
    /// native state at the `ret` (rsp, rcx, rdx and the return slot intact),
    /// after it the state after the return (target in rcx, rsp past the
    /// popped arguments, rcx and rdx restorable).
    fn run_ret_imm(abi: &Abi, n: u16) {
        use std::collections::BTreeMap;
        const S: u64 = 0x1_0000;
        const RET: u64 = 0x4141_4242_4343_4444;
        const RCX: u64 = 0x1111;
        const RDX: u64 = 0x2222;
        let pc = 0xffff_ffff_8100_0000;
        let mut e = Emit::new(0);
        e.ret_imm_lookup(abi, pc, n);
        let mut mem: BTreeMap<u64, u8> = BTreeMap::new();
        let put = |m: &mut BTreeMap<u64, u8>, a: u64, v: u64| {
            for (k, b) in v.to_le_bytes().into_iter().enumerate() {
                m.insert(a + k as u64, b);
            }
        };
        let get = |m: &BTreeMap<u64, u8>, a: u64| {
            u64::from_le_bytes(core::array::from_fn(|k| m.get(&(a + k as u64)).copied().unwrap_or(0xEE)))
        };
        put(&mut mem, S, RET);
        for k in 0..64 {
            put(&mut mem, S + 8 + 8 * k, 0x5000 + k);
        }
        // rsp apart; the sequence touches no other register than rcx and rdx.
        let mut rsp = S;
        let mut gpr = [0u64; 16];
        gpr[Register::RCX.number()] = RCX;
        gpr[Register::RDX.number()] = RDX;
        let insns: Vec<Instruction> = Decoder::with_ip(64, &e.buf, 0, DecoderOptions::NONE).into_iter().collect();
        let mut transferred = false;
        for i in &insns {
            // An interrupt here: everything below the guest's floor is gone.
            let floor = rsp - abi.rz as u64;
            mem.retain(|&a, _| a >= floor);
            let ent = *e.map.iter().rev().find(|m| u64::from(m.off) <= i.ip()).expect("mapped");
            let nrsp = rsp.wrapping_add(ent.sp as i64 as u64);
            let mut native = gpr;
            let mut slot = rsp.wrapping_add(ent.top as i64 as u64);
            for r in (0..16).rev() {
                if ent.saved & (1 << r) != 0 {
                    native[r] = get(&mem, slot);
                    slot = slot.wrapping_sub(8);
                }
            }
            let at = std::format!("n={n} rz={} at `{i}`", abi.rz);
            let (c, d) = (Register::RCX.number(), Register::RDX.number());
            assert_eq!((native[c], native[d]), (RCX, RDX), "{at}: rcx, rdx");
            match ent.npc {
                Npc::At(p) => {
                    assert!(!transferred, "{at}: back before the transfer");
                    assert_eq!((p, nrsp, get(&mem, S)), (pc, S, RET), "{at}: the native state at the ret");
                }
                Npc::Rcx => {
                    transferred = true;
                    assert_eq!((gpr[c], nrsp), (RET, S + 8 + u64::from(n)), "{at}: the state after the return");
                }
                Npc::RcxPlus(_) => panic!("{at}: no target check here"),
            }
            let addr = |i: &Instruction| {
                assert_eq!(i.memory_base(), Register::RSP, "only rsp-relative accesses");
                rsp.wrapping_add(i.memory_displacement64())
            };
            match i.code() {
                Code::Mov_rm64_r64 => put(&mut mem, addr(i), gpr[i.op1_register().number()]),
                Code::Mov_r64_rm64 => gpr[i.op0_register().number()] = get(&mem, addr(i)),
                Code::Xchg_rm64_r64 => {
                    let (a, r) = (addr(i), i.op1_register().number());
                    let v = get(&mem, a);
                    put(&mut mem, a, gpr[r]);
                    gpr[r] = v;
                }
                Code::Lea_r64_m if i.op0_register() == Register::RSP => rsp = addr(i),
                // The lookup itself (`movzx edx,cx; jmp [table]`): the frame is built.
                Code::Movzx_r32_rm16 => break,
                c => panic!("unexpected {c:?} in the ret n sequence"),
            }
        }
        assert!(transferred, "n={n} rz={}: never reached the lookup", abi.rz);
    }

    #[test]
    fn ret_imm_keeps_a_native_state_at_every_instruction() {
        for n in [8, 16, 24, 32, 20, 200, 4096] {
            assert!(ret_imm_translatable(KERNEL.rz, n), "kernel n={n}");
            run_ret_imm(&KERNEL, n);
        }
        for n in [8, 16, 112, 120, 136, 144, 152, 200, 4096] {
            assert!(ret_imm_translatable(HOST.rz, n), "host n={n}");
            run_ret_imm(&HOST, n);
        }
        // Frames that would overlap the return slot, and no room below rsp: stops.
        for n in [0, 1, 4, 7, 9, 12, 15, 0xffff] {
            assert!(!ret_imm_translatable(KERNEL.rz, n), "kernel n={n}");
        }
        for n in [0, 4, 121, 128, 135, 137, 143] {
            assert!(!ret_imm_translatable(HOST.rz, n), "host n={n}");
        }
        let mut e = Emit::new(0);
        e.ret_imm_lookup(&KERNEL, 0xffff_ffff_8100_0000, 8);
        assert_eq!(
            text(&e.buf),
            ["mov [rsp+8],rdx", "xchg [rsp],rcx", "movzx edx,cx", "jmp qword ptr [rdx*8-1000000h]"]
        );
        let mut e = Emit::new(0);
        e.ret_imm_lookup(&KERNEL, 0xffff_ffff_8100_0000, 16);
        assert_eq!(
            text(&e.buf),
            [
                "mov [rsp+8],rcx",
                "mov rcx,[rsp]",
                "mov [rsp+10h],rdx",
                "lea rsp,[rsp+8]",
                "movzx edx,cx",
                "jmp qword ptr [rdx*8-1000000h]"
            ]
        );
    }

    #[test]
    fn kernel_ret_never_writes_below_rsp() {
        let mut e = Emit::new(0);
        e.ret_lookup(&KERNEL, 0xffff_ffff_8100_0000);
        assert_eq!(
            text(&e.buf),
            ["push rcx", "mov rcx,[rsp+8]", "mov [rsp+8],rdx", "movzx edx,cx", "jmp qword ptr [rdx*8-1000000h]"]
        );
    }

    #[test]
    fn host_sequences_step_over_the_red_zone() {
        let mut e = Emit::new(0);
        e.ind_lookup(&HOST, 0x40_0000, None, 0, &Operand::Mem(MemoryOperand::with_base_displ(Register::RSP, 8)));
        assert_eq!(
            text(&e.buf),
            [
                "lea rsp,[rsp-80h]",
                "push rdx",
                "push rcx",
                "mov rcx,[rsp+98h]",
                "movzx edx,cx",
                "jmp qword ptr [rdx*8+100000h]"
            ]
        );
        let s = exit_stub(&HOST, 0x1000, 0x1018, 0x40_0000);
        assert!(!s.err);
        assert_eq!(text_at(&s.buf, 0x1000), ["lea rsp,[rsp-80h]", "push qword ptr [1018h]", "jmp qword ptr gs:[10h]"]);
        assert_eq!(exit_stub_len(&KERNEL), 14, "no address-size prefix");
        assert_eq!(stubs_layout(&KERNEL, 3), (48, 72));
    }

    #[test]
    fn kernel_indirect_call_pushes_the_native_return_first() {
        let mut e = Emit::new(0);
        e.ind_lookup(&KERNEL, 0xffff_ffff_8100_0000, Some(0xffff_ffff_8100_0005), 0, &Operand::Reg(Register::RAX));
        assert_eq!(
            text(&e.buf),
            [
                "push 0FFFFFFFF81000005h",
                "push rdx",
                "push rcx",
                "mov rcx,rax",
                "movzx edx,cx",
                "jmp qword ptr [rdx*8-1000000h]"
            ]
        );
        // The map after the two pushes: native rsp 24 above, rcx/rdx saved.
        let last = e.map.last().unwrap();
        assert_eq!((last.npc, last.sp, last.saved, last.top), (Npc::Rcx, 16, FRAME_SAVED, 8));
    }
}
