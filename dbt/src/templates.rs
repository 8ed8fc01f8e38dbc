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
