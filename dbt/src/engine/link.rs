//! Linking: patching a fragment's exit branch to its target (directly or
//! through a far trampoline), the incoming-link lists, taking an exit.

use super::*;

impl Engine {
    /// Retarget the rel32 field at `at` (4-byte aligned, inside a live
    /// fragment) to `dest`, atomically through the environment.
    pub(super) fn write_rel32(&mut self, at: u64, dest: u64) -> bool {
        let rel = dest.wrapping_sub(at + 4) as i64;
        if rel != rel as i32 as i64 || !at.is_multiple_of(4) {
            return false;
        }
        self.env.patch_rel32(at, rel as i32)
    }

    /// Link an exit record to its target fragment (which must exist).
    pub(super) fn link(&mut self, rec: *mut ExitRecord) {
        // SAFETY: `rec` points into a live fragment's boxed exit records.
        let r = unsafe { &mut *rec };
        if r.patch_at == 0 || r.linked != u64::MAX {
            return;
        }
        let Some(tf) = self.frags.get(&r.target) else {
            return;
        };
        let mut dest = tf.entry;
        if !self.write_rel32(r.patch_at, dest) {
            // Target out of rel32 reach (another region): a far trampoline
            // `jmp [rip+0]; dq entry` in the source region's stub area.
            let Some(of) = self.frags.get(&r.owner) else {
                return;
            };
            let ri = of.region;
            let rg = &mut self.regions[ri];
            let Some(t) =
                Region::alloc(&mut rg.stub_free, &mut rg.stub_used, rg.base + rg.hot_size, rg.stub_size, GRANULE)
            else {
                return;
            };
            let mut e = Emit::new(t);
            e.guest(r.target);
            e.ins(Instruction::with1(Code::Jmp_rm64, MemoryOperand::with_base_displ(Register::RIP, (t + 6) as i64)));
            e.raw(&dest.to_le_bytes());
            if e.err || e.buf.len() > GRANULE as usize || !self.env.write_code(t, &e.buf) {
                let rg = &mut self.regions[ri];
                rg.stub_free.push((t, GRANULE));
                return;
            }
            let meta = Box::new(FragMeta {
                start: r.target,
                hot: t,
                hot_len: GRANULE,
                stub: t,
                stub_len: 0,
                hot_map: e.map.into_boxed_slice(),
                stub_map: Box::new([]),
            });
            self.index.publish(&meta);
            self.tramp_metas.push(meta);
            self.stats.trampolines += 1;
            dest = t;
            if !self.write_rel32(r.patch_at, dest) {
                return;
            }
        }
        r.linked = r.target;
        if let Some(tf) = self.frags.get_mut(&r.target) {
            r.next_in = tf.incoming;
            tf.incoming = rec;
        }
        self.stats.links += 1;
    }

    /// The exit records of the fragment for `pc` (what its stubs pass to the
    /// dispatcher), for tests and diagnostics.
    pub fn exit_records(&mut self, pc: u64) -> Vec<*mut ExitRecord> {
        self.frags
            .get_mut(&pc)
            .map(|f| f.exits.iter_mut().map(|r| &mut **r as *mut ExitRecord).collect())
            .unwrap_or_default()
    }

    /// What the dispatcher does when a CPU takes the direct exit `rec` (a
    /// stub passed it): find or translate the target and, unless the record
    /// is dead (its fragment was invalidated) or a reset happened meanwhile,
    /// link the exit to it. Returns the target's body entry.
    ///
    /// # Safety
    /// `rec` is a record of a live fragment, or of an invalidated one not yet
    /// reclaimed (a CPU still inside it may take its exits until then).
    pub unsafe fn take_exit(&mut self, rec: *mut ExitRecord) -> Result<u64, StopKind> {
        // SAFETY: the caller's contract.
        let target = unsafe { (*rec).target };
        let gen = self.generation;
        let entry = self.fragment_for(target)?;
        if gen == self.generation && self.cfg.link {
            self.link(rec);
        }
        Ok(entry)
    }
}
