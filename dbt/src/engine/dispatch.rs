//! The dispatcher proper (guest context in a `Frame`), leaving to the
//! environment, and native-pc recovery for interrupted cache addresses.

use super::*;

/// Rust side of the dispatcher entry.
///
/// # Safety
/// Called only by the asm entry routines with the per-CPU block whose
/// `engine` field points at the live engine and the frame they built.
pub unsafe extern "C" fn dbt_rust_dispatch(s: *mut Scratch, f: *mut Frame) -> u64 {
    // SAFETY: see function contract; the dispatcher runs on its own stack with
    // the guest context saved, and the engine is not otherwise borrowed while
    // translated code runs.
    let (s, f) = unsafe { (&mut *s, &mut *f) };
    // SAFETY: as above; `locked` serializes CPUs.
    unsafe { Engine::locked(s.engine as *mut Engine, |e| e.dispatch(s, f)) }
}

impl Engine {
    /// Look up or translate `pc`.
    pub fn fragment_for(&mut self, pc: u64) -> Result<u64, StopKind> {
        if let Some(f) = self.frags.get(&pc) {
            return Ok(f.entry);
        }
        self.translate(pc)
    }

    /// The dispatcher proper (called from the asm entry with the guest
    /// context in `f`). Returns the code-cache address to continue at, or 0
    /// to return to the environment (reason in `s.exit_reason`, the guest
    /// context in `s.ctx`).
    pub fn dispatch(&mut self, s: &mut Scratch, f: &mut Frame) -> u64 {
        // At a quiescent entry this CPU has left whatever fragment it was in
        // (but the exit record it passed stays in use until the end of this
        // dispatch). Not in a handler that interrupted translated code: that
        // fragment is resumed when the handler returns.
        let quiescent = self.env.quiescent_entry(&f.ctx);
        if quiescent {
            s.epoch = s.epoch.wrapping_add(1);
        }
        self.current = s;
        self.current_quiescent = quiescent;
        let to = self.dispatch_inner(s, f);
        // Done with the record: now a quiescent CPU is quiescent for every
        // pending fragment (it resumes at a live entry or leaves); a nested
        // one only for what its last quiescent entry already passed.
        if !self.pending.is_empty() && self.stats.dispatches.is_multiple_of(64) {
            self.reclaim_quiescent(if quiescent { s } else { core::ptr::null() });
        }
        to
    }

    pub(super) fn dispatch_inner(&mut self, s: &mut Scratch, f: &mut Frame) -> u64 {
        self.stats.dispatches += 1;
        let ind = f.kind == Frame::KIND_IND;
        self.trace[(self.stats.dispatches % 8) as usize] = if ind {
            f.arg | (1 << 63)
        } else {
            // SAFETY: see below.
            unsafe { (*(f.arg as *const ExitRecord)).owner }
        };
        let (target, rec) = if ind {
            self.stats.lookups += 1;
            self.stats.misses += 1;
            (f.arg, None)
        } else {
            let rp = f.arg as *mut ExitRecord;
            // SAFETY: a stub only ever passes the address of its own boxed
            // exit record, live or pending reclaim.
            let r = unsafe { &*rp };
            if r.stop != 0 {
                return self.stop(s, f, r.stop, r.target);
            }
            (r.target, Some(rp))
        };
        if target == self.stop_pc {
            return self.leave(s, f, StopKind::Sentinel as u64, target);
        }
        // Cached returns: an indirect jump to a return pad (a longjmp to an address
        // setjmp read off the stack) continues at the pad.
        if self.pads.contains(&target) {
            if ind {
                if let Some(entry) = self.pad_entry(target) {
                    if let Some(t) = &self.ibl {
                        t.set(target, entry);
                    }
                }
            }
            return target;
        }
        // A page being written runs natively until the environment re-protects it:
        // nothing is translated or linked for it meanwhile.
        if self.env.native_now(target) {
            self.stats.native_now += 1;
            return self.leave(s, f, StopKind::Native as u64, target);
        }
        // SAFETY: `rp` is the record a stub passed (see above).
        let r = match rec {
            Some(rp) => unsafe { self.take_exit(rp) },
            None => self.fragment_for(target),
        };
        match r {
            Ok(entry) => {
                if ind {
                    if let (Some(t), Some(fr)) = (&self.ibl, self.frags.get(&target)) {
                        t.set(target, fr.hot);
                    }
                }
                entry
            }
            Err(k) => self.stop(s, f, k as u64, target),
        }
    }

    /// A stop at guest `pc`: the environment may deliver it itself
    /// ([`Env::deliver`]: the context rewritten, a new target), else it leaves.
    fn stop(&mut self, s: &mut Scratch, f: &mut Frame, reason: u64, pc: u64) -> u64 {
        let Some(kind) = StopKind::from_u64(reason) else { return self.leave(s, f, reason, pc) };
        if kind == StopKind::Sentinel {
            return self.leave(s, f, reason, pc);
        }
        let Some(to) = self.env.deliver(kind, pc, &mut f.ctx) else { return self.leave(s, f, reason, pc) };
        self.stats.delivered += 1;
        if to == self.stop_pc {
            return self.leave(s, f, StopKind::Sentinel as u64, to);
        }
        match self.fragment_for(to) {
            Ok(entry) => entry,
            // No second delivery: the handler itself is a stop (a native region).
            Err(k) => self.leave(s, f, k as u64, to),
        }
    }

    /// Give control back to the environment at guest `pc`: the host harness
    /// gets 0 (its `dbt_enter` returns, the context in `s.ctx`); the kernel
    /// continues natively at `pc` with the guest's context (a native region,
    /// the environment's own code that called into the cache, or an
    /// instruction the translator leaves to the CPU: `int3`, `ud2` and the
    /// privileged stops then trap with their native pc, as the kernel expects).
    /// The reason and pc stay in the block either way.
    pub(super) fn leave(&self, s: &mut Scratch, f: &Frame, reason: u64, pc: u64) -> u64 {
        s.exit_reason = reason;
        s.exit_pc = pc;
        s.ctx = f.ctx;
        s.ctx.rip = pc;
        if self.cfg.kernel {
            pc
        } else {
            0
        }
    }

    /// The native pc and register state for an interrupted code-cache
    /// address `regs.rip` (see [`PcIndex::native_state`]); lock-free.
    ///
    /// # Safety
    /// As [`PcIndex::native_state`].
    pub unsafe fn native_state(&self, regs: &mut GuestCtx) -> Option<NativePc> {
        // SAFETY: the caller's contract.
        unsafe { self.index.native_state(regs) }
    }

    /// The lock-free pc index (what a fault or NMI handler keeps a pointer
    /// to; it lives as long as the engine).
    pub fn pc_index(&self) -> *const PcIndex {
        &*self.index
    }
}
