//! Translating a decoded block: emitting its hot code (copied
//! instructions, control transfers, client snippets) at a cache address.

use super::*;

/// A branch to patch once the stubs are placed: (offset of rel32 in the hot
/// buffer, exit index).
pub(super) type Fixup = (usize, usize);

/// A fragment's hot code as emitted, before placement.
pub(super) struct Emitted {
    pub(super) buf: Vec<u8>,
    pub(super) fixups: Vec<Fixup>,
    pub(super) exits: Vec<ExitRecord>,
    /// Offset of the body (after the indirect-entry target check).
    pub(super) body_off: u64,
    /// Bytes of instructions at the start of `buf` (constants follow).
    pub(super) code_len: u64,
    /// Offsets of return pads (cached returns).
    pub(super) pads: Vec<usize>,
    /// The pc map of `buf`.
    pub(super) map: Vec<MapEnt>,
    /// Fault-site slots ([`Env::fault_slot`]) and their code, written before the
    /// fragment (nothing jumps to a slot until the fragment is in place).
    pub(super) slots: Vec<(u64, Vec<u8>)>,
}

impl Engine {
    /// A patchable branch to `exit`: `opcode` then a rel32, hand-emitted after
    /// NOP padding so that the rel32 is 4-byte aligned and can be retargeted
    /// with one atomic store.
    pub(super) fn patch_branch(e: &mut Emit, fix: &mut Vec<Fixup>, opcode: &[u8], exit: usize) {
        e.align_field(opcode.len() as u64);
        e.raw(opcode);
        fix.push((e.buf.len(), exit));
        e.raw(&[0, 0, 0, 0]);
    }

    /// Patchable `jmp rel32` (E9).
    pub(super) fn patch_jmp(e: &mut Emit, fix: &mut Vec<Fixup>, exit: usize) {
        Self::patch_branch(e, fix, &[0xE9], exit);
    }

    /// Patchable `jcc rel32` (0F 8x).
    pub(super) fn patch_jcc(e: &mut Emit, fix: &mut Vec<Fixup>, cc: u8, exit: usize) {
        Self::patch_branch(e, fix, &[0x0F, 0x80 | (cc & 15)], exit);
    }

    /// Copy a non-control-transfer instruction of `blk`: the bytes it was decoded
    /// from unless it is RIP-relative (then re-encoded by iced for its new address).
    pub(super) fn copy_insn(e: &mut Emit, blk: &Block, i: &Instruction) {
        if i.code() == Code::Retnq {
            // Also a `jmp __x86_return_thunk` recognized as a return.
            e.raw(&[0xC3]);
        } else if i.is_ip_rel_memory_operand() {
            e.ins(Ok(*i));
        } else {
            match blk.bytes_of(i) {
                Some(b) => e.raw(b),
                None => e.err = true,
            }
        }
    }

    /// Translate the block at `pc`, place it, return its entry.
    pub(super) fn translate(&mut self, pc: u64) -> Result<u64, StopKind> {
        let native = self.env.native(pc);
        if native && !self.cfg.native_fragments {
            return Err(StopKind::Native);
        }
        if self.env.memory_left() < TRANSLATE_RESERVE {
            return Err(StopKind::NoMemory);
        }
        let blk = if native {
            Block {
                insns: Vec::new(),
                code: Vec::new(),
                inline_jcc: Vec::new(),
                term: Term::Native(pc),
                end: pc + 1,
                classes: [0; KClass::COUNT],
            }
        } else {
            self.decode_block(pc)
        };
        for (n, c) in self.stats.kclass.iter_mut().zip(blk.classes.iter()) {
            *n += c;
        }
        // Over the limit: reset (what is still pending then needs no space now).
        if self.hot_total > self.cfg.max_hot_bytes && self.make_room().is_none() {
            return Err(StopKind::NoSpace);
        }
        let ri = self.region_for(pc)?;
        // Fault sites get their slots once, before any emission attempt (a slot is
        // the environment's registration of the instruction's fixup).
        let body_end = if matches!(blk.term, Term::Cti) { blk.insns.len() - 1 } else { blk.insns.len() };
        let slots: Vec<(usize, u64)> = if native {
            Vec::new()
        } else {
            (0..body_end)
                .filter(|k| !blk.inline_jcc.contains(k))
                .filter_map(|k| {
                    let i = &blk.insns[k];
                    blk.bytes_of(i).and_then(|b| self.env.fault_slot(i.ip(), b)).map(|s| (k, s))
                })
                .collect()
        };
        self.stats.fault_sites += slots.len() as u64;
        // Flags liveness and instrumentation, per basic block (the client sees
        // basic blocks; its instruction indices are mapped to the fragment's).
        let mut ins = Inserts::default();
        let mut live = alloc::vec![ARITH; blk.insns.len() + 1];
        for r in blk.basic_blocks().into_iter().filter(|_| !native) {
            let l = flags_liveness(&blk.insns[r.clone()]);
            live[r.clone()].copy_from_slice(&l[..r.len()]);
            if let Some(c) = self.client.as_mut() {
                // An empty basic block (a stop right at its start) starts where
                // the previous one ended.
                let start = match (blk.insns.get(r.start), r.start.checked_sub(1)) {
                    (Some(i), _) => i.ip(),
                    (None, Some(p)) => blk.insns[p].next_ip(),
                    (None, None) => pc,
                };
                let mut sub = Inserts::default();
                c.instrument(&BlockInfo { start, insns: &blk.insns[r.clone()], flags_live: &l }, &mut sub);
                for (w, s) in sub.list {
                    // Nothing goes between `sti` and the instruction its
                    // interrupt shadow covers: such a snippet runs before the `sti`.
                    let sti = |k: usize| kclass::keeps_next(&blk.insns[k]);
                    match w {
                        Where::Before(k) if k < r.len() => {
                            let k = r.start + k;
                            let k = if k > r.start && sti(k - 1) { k - 1 } else { k };
                            ins.list.push((Where::Before(k), s))
                        }
                        Where::After(k) if k < r.len() => {
                            let k = r.start + k;
                            ins.list.push((if sti(k) { Where::Before(k) } else { Where::After(k) }, s))
                        }
                        _ => {}
                    }
                }
            }
        }
        // Emit at a provisional base to learn the size, then at the real one
        // (sizes do not depend on the address except RIP-relative encodings,
        // which keep their size; padding is recomputed).
        let mut attempt = 0;
        let mut hot_guess = 0u64;
        loop {
            attempt += 1;
            let hot_len_try = (hot_guess + 16).div_ceil(GRANULE) * GRANULE;
            let hot = {
                let r = &mut self.regions[ri];
                Region::alloc(&mut r.hot_free, &mut r.hot_used, r.base, r.hot_size, hot_len_try)
            };
            let Some(hot) = hot else {
                if attempt > 3 || self.make_room() != Some(true) {
                    return Err(StopKind::NoSpace);
                }
                return self.translate(pc);
            };
            let em = self.emit_block(pc, &blk, &ins, &live, hot, &slots)?;
            if (em.buf.len() as u64) > hot_len_try {
                // too small: give it back and retry with the real size
                self.regions[ri].hot_free.push((hot, hot_len_try));
                hot_guess = em.buf.len() as u64;
                if attempt > 4 {
                    return Err(StopKind::NoSpace);
                }
                continue;
            }
            return self.place(pc, blk.end, ri, hot, hot_len_try, em, blk.insns.len());
        }
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn emit_block(
        &self,
        pc: u64,
        blk: &Block,
        ins: &Inserts,
        live: &[u32],
        hot: u64,
        slots: &[(usize, u64)],
    ) -> Result<Emitted, StopKind> {
        let mut e = Emit::new(hot);
        let mut slot_code: Vec<(u64, Vec<u8>)> = Vec::new();
        if self.abi.ibl.is_some() {
            if self.cfg.ibt {
                e.st(Npc::Rcx, 16 + self.abi.rz, 0b110, 8);
                e.raw(&ENDBR64);
            }
            e.target_check(&self.abi, pc);
        }
        let body_off = e.buf.len() as u64;
        e.guest(pc);
        if self.cfg.ibt {
            e.raw(&ENDBR64);
        }
        let mut fix: Vec<Fixup> = Vec::new();
        let mut pads: Vec<usize> = Vec::new();
        let mut exits: Vec<ExitRecord> = Vec::new();
        let mut new_exit = |target: u64, stop: u64| {
            exits.push(ExitRecord::new(target, stop, pc));
            exits.len() - 1
        };
        let n = blk.insns.len();
        let body_end = if matches!(blk.term, Term::Cti) { n - 1 } else { n };
        let abi = self.abi;
        let before = |e: &mut Emit, k: usize| {
            for (w, s) in ins.list.iter() {
                if *w == Where::Before(k) {
                    e.snippet(&abi, blk.insns[k].ip(), s, live[k]);
                }
            }
        };
        let after = |e: &mut Emit, k: usize| {
            for (w, s) in ins.list.iter() {
                if *w == Where::After(k) {
                    e.snippet(&abi, blk.insns[k].next_ip(), s, live[k + 1]);
                }
            }
        };
        for k in 0..body_end {
            before(&mut e, k);
            let i = &blk.insns[k];
            e.guest(i.ip());
            if blk.inline_jcc.contains(&k) {
                // Taken: exit (linked later); not taken: the next basic block, inline.
                let xt = new_exit(i.near_branch_target(), 0);
                Self::patch_jcc(&mut e, &mut fix, (i.condition_code() as u8).wrapping_sub(1), xt);
                continue;
            }
            match slots.iter().find(|(sk, _)| *sk == k) {
                // A fault site: `jmp slot`, and the slot is the instruction and a
                // `jmp` out (back into the fragment, or to the next native pc with
                // `Config::fault_slot_native_return`). The jump's map entry is the
                // instruction's native pc.
                Some(&(_, slot)) => {
                    let rel = slot.wrapping_sub(e.pc() + 5) as i64;
                    if rel != rel as i32 as i64 {
                        return Err(StopKind::NoSpace);
                    }
                    e.ins(Instruction::with_branch(Code::Jmp_rel32_64, slot));
                    let mut se = Emit::new(slot);
                    Self::copy_insn(&mut se, blk, i);
                    // At its native length (RIP-relative re-encodings keep it), so the
                    // environment may point a fixup at `slot + len` (the jump out).
                    if se.buf.len() != i.len() {
                        return Err(StopKind::NoSpace);
                    }
                    let back = if self.cfg.fault_slot_native_return { i.next_ip() } else { e.pc() };
                    if self.cfg.fault_slot_native_return {
                        // Back through the lookup (a table hit when the next pc is
                        // translated: no steering event), if that fits the slot; the
                        // lookup depends on no fragment either.
                        let mut le = Emit::new(se.pc());
                        le.ind_lookup(&self.abi, back, None, 0, &Operand::Imm(back));
                        if !le.err && se.buf.len() + le.buf.len() <= FAULT_SLOT_BYTES {
                            se.buf.extend_from_slice(&le.buf);
                        } else {
                            se.ins(Instruction::with_branch(Code::Jmp_rel32_64, back));
                        }
                    } else {
                        se.ins(Instruction::with_branch(Code::Jmp_rel32_64, back));
                    }
                    if se.err || se.buf.len() > FAULT_SLOT_BYTES {
                        return Err(StopKind::NoSpace);
                    }
                    se.buf.resize(FAULT_SLOT_BYTES, 0xCC);
                    slot_code.push((slot, se.buf));
                }
                None => Self::copy_insn(&mut e, blk, i),
            }
            after(&mut e, k);
        }
        match blk.term {
            Term::Fall(next) => {
                e.guest(next);
                let x = new_exit(next, 0);
                Self::patch_jmp(&mut e, &mut fix, x);
            }
            Term::Stop(kind, at) => {
                e.guest(at);
                let x = new_exit(at, kind as u64);
                Self::patch_jmp(&mut e, &mut fix, x);
            }
            Term::Native(at) => {
                e.guest(at);
                let rel = at.wrapping_sub(e.pc() + 5) as i64;
                if rel == rel as i32 as i64 {
                    e.ins(Instruction::with_branch(Code::Jmp_rel32_64, at));
                } else {
                    // jmp [rip+0]; dq at
                    e.raw(&[0xFF, 0x25, 0, 0, 0, 0]);
                    e.raw(&at.to_le_bytes());
                }
            }
            Term::Cti => {
                let k = n - 1;
                before(&mut e, k);
                let i = &blk.insns[k];
                let next = i.next_ip();
                e.guest(i.ip());
                match i.flow_control() {
                    FlowControl::UnconditionalBranch => {
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_jmp(&mut e, &mut fix, x);
                    }
                    FlowControl::ConditionalBranch => {
                        let t = i.near_branch_target();
                        match i.mnemonic() {
                            Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz => {
                                // These exist only with rel8. A loop back to the block's own
                                // start branches straight to the body when rel8 reaches it:
                                //   op body; jmp fall
                                // anything else goes through a local patchable jmp:
                                //   op L_taken; jmp fall; L_taken: jmp taken
                                let len = i.len() as u64; // same form re-encoded
                                let op_pc = e.pc();
                                let body = e.base + body_off;
                                let self_loop = t == pc && body as i64 - (op_pc + len) as i64 >= -128;
                                let dest = if self_loop {
                                    body
                                } else {
                                    let mut pad1 = 0;
                                    while !(op_pc + len + pad1 + 1).is_multiple_of(4) {
                                        pad1 += 1;
                                    }
                                    op_pc + len + pad1 + 5
                                };
                                let mut j = *i;
                                j.set_near_branch64(dest);
                                let before_len = e.buf.len();
                                e.ins(Ok(j));
                                if e.buf.len() - before_len != len as usize {
                                    e.err = true;
                                }
                                e.guest(next);
                                let xf = new_exit(next, 0);
                                Self::patch_jmp(&mut e, &mut fix, xf);
                                if !self_loop {
                                    e.guest(t);
                                    let xt = new_exit(t, 0);
                                    Self::patch_jmp(&mut e, &mut fix, xt);
                                }
                            }
                            _ => {
                                let cc = (i.condition_code() as u8).wrapping_sub(1);
                                let xt = new_exit(t, 0);
                                Self::patch_jcc(&mut e, &mut fix, cc, xt);
                                e.guest(next);
                                let xf = new_exit(next, 0);
                                Self::patch_jmp(&mut e, &mut fix, xf);
                            }
                        }
                    }
                    FlowControl::Call if self.cfg.cached_returns => {
                        // call callee (patchable); pad: jmp next (patchable)
                        e.guest(i.ip());
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_branch(&mut e, &mut fix, &[0xE8], x);
                        pads.push(e.buf.len());
                        e.guest(next);
                        let xr = new_exit(next, 0);
                        Self::patch_jmp(&mut e, &mut fix, xr);
                    }
                    FlowControl::Call => {
                        e.guest(i.ip());
                        e.push_u64(next);
                        // The push undone: the call has not happened yet.
                        e.st(Npc::At(i.ip()), 8, 0, 0);
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_jmp(&mut e, &mut fix, x);
                    }
                    FlowControl::IndirectBranch | FlowControl::IndirectCall => {
                        let op = Operand::of(i);
                        let call = i.flow_control() == FlowControl::IndirectCall;
                        if call && self.cfg.cached_returns {
                            // call L; pad: jmp next (patchable); L: the lookup, its
                            // operand read with the pad pushed.
                            e.guest(i.ip());
                            e.raw(&[0xE8, 0, 0, 0, 0]);
                            let call_end = e.buf.len();
                            pads.push(call_end);
                            e.guest(next);
                            let xr = new_exit(next, 0);
                            Self::patch_jmp(&mut e, &mut fix, xr);
                            let rel = (e.buf.len() - call_end) as i32;
                            e.buf[call_end - 4..call_end].copy_from_slice(&rel.to_le_bytes());
                            e.ind_lookup(&self.abi, i.ip(), None, 8, &op);
                        } else {
                            e.ind_lookup(&self.abi, i.ip(), call.then_some(next), 0, &op);
                        }
                    }
                    // Cached returns: the stack holds a pad; return natively to it.
                    FlowControl::Return if self.cfg.cached_returns => {
                        e.guest(i.ip());
                        Self::copy_insn(&mut e, blk, i)
                    }
                    FlowControl::Return if i.code() == Code::Retnq_imm16 && i.immediate16() != 0 => {
                        e.ret_imm_lookup(&self.abi, i.ip(), i.immediate16())
                    }
                    FlowControl::Return => e.ret_lookup(&self.abi, i.ip()),
                    _ => return Err(StopKind::Unsupported),
                }
            }
        }
        let code_len = e.buf.len() as u64;
        e.finish();
        if e.err {
            self.trace_bad.set(e.bad);
            return Err(StopKind::NoSpace);
        }
        Ok(Emitted { buf: e.buf, fixups: fix, exits, body_off, code_len, pads, map: e.map, slots: slot_code })
    }
}
