//! Invalidation, quiescence, reclaim, flush and capacity resets.

use super::*;

impl Engine {
    /// Invalidate every fragment whose guest bytes overlap [lo, hi).
    /// Returns how many fragments were removed. Their space is reclaimed by
    /// [`Engine::reclaim`] (see README: every CPU must have passed a
    /// quiescent point in between).
    pub fn invalidate(&mut self, lo: u64, hi: u64) -> usize {
        self.stats.invalidations += 1;
        let from = lo.saturating_sub(MAX_BLOCK_BYTES as u64 + 16);
        let victims: Vec<u64> =
            self.frags.range(from..hi).filter(|(_, f)| f.start < hi && f.end > lo).map(|(k, _)| *k).collect();
        for v in victims.iter() {
            self.remove_fragment(*v);
        }
        self.stats.invalidated_blocks += victims.len() as u64;
        victims.len()
    }

    pub(super) fn remove_fragment(&mut self, start: u64) {
        let Some(mut f) = self.frags.remove(&start) else {
            return;
        };
        // 1. Unlink incoming branches: point them back at their own stubs.
        let mut rp = f.incoming;
        while !rp.is_null() {
            // SAFETY: incoming records belong to live fragments (a fragment
            // removes its records from targets' lists when it dies).
            let r = unsafe { &mut *rp };
            rp = r.next_in;
            r.next_in = core::ptr::null_mut();
            if r.linked == start {
                let (at, stub) = (r.patch_at, r.stub);
                self.write_rel32(at, stub);
                r.linked = u64::MAX;
                self.stats.unlinks += 1;
            }
        }
        // 2. Our own outgoing links: drop us from the targets' lists. Then
        // the records die: a CPU still inside this fragment may take one of
        // its exits until quiescence, and the dispatcher must not link it (a
        // later unlink would write into whatever reuses this space).
        for r in f.exits.iter_mut() {
            let p = &mut **r as *mut ExitRecord;
            if r.linked != u64::MAX {
                if let Some(t) = self.frags.get_mut(&r.linked) {
                    let mut link: *mut *mut ExitRecord = &mut t.incoming;
                    // SAFETY: the list holds live records of live fragments.
                    unsafe {
                        while !(*link).is_null() {
                            if *link == p {
                                *link = (*p).next_in;
                                break;
                            }
                            link = &mut (**link).next_in;
                        }
                    }
                }
                r.linked = u64::MAX;
            }
            r.next_in = core::ptr::null_mut();
            r.patch_at = 0;
        }
        // 3. Lookup entry (one shared table: one compare-and-swap) and pc map.
        if let Some(t) = &self.ibl {
            t.clear_if(start, f.hot);
        }
        self.index.retract(&f.meta);
        // 4. Space and records: deferred until quiescence. A fragment holding
        // return pads keeps its space and records for good: a stack may still
        // return to a pad, which jumps on through its (now unlinked) exit stub.
        self.hot_total = self.hot_total.saturating_sub(f.hot_len);
        self.pending.push(Pending {
            region: f.region,
            hot: f.hot,
            hot_len: f.hot_len,
            stub: f.stub_addr,
            stub_len: f.stub_len,
            exits: core::mem::take(&mut f.exits),
            meta: f.meta,
            reuse: !f.has_pads,
            epochs: self.epochs(),
        });
    }

    /// Return space of invalidated fragments to the allocator. Call only
    /// when every CPU has passed through the dispatcher (or is outside the
    /// code cache) since the invalidations (see [`Engine::reclaim_quiescent`]
    /// for the checked version).
    pub fn reclaim(&mut self) {
        self.reclaim_if(|_| true);
    }

    /// Reclaim what every CPU has provably left: each registered CPU is
    /// `current` (the caller, in the dispatcher), outside translated code, or
    /// has entered the dispatcher since the invalidation. Returns how many
    /// invalidated fragments stay pending.
    pub fn reclaim_quiescent(&mut self, current: *const Scratch) -> usize {
        let cpus: Vec<(*mut Scratch, u64, u64)> = self
            .cpus
            .iter()
            // SAFETY: registered blocks stay valid (attach_cpu contract);
            // other CPUs write these words concurrently: volatile reads.
            .map(|&c| unsafe { (c, read_volatile(&(*c).epoch), read_volatile(&(*c).outside)) })
            .collect();
        self.reclaim_if(|p| {
            cpus.iter().enumerate().all(|(i, &(c, epoch, outside))| {
                core::ptr::eq(c, current) || outside != 0 || p.epochs.get(i).is_none_or(|&e| e != epoch)
            })
        });
        self.pending.len()
    }

    /// The CPU of block `s` is at a quiescent point outside the dispatcher
    /// (kernel: a work item of its own, in task context, where nothing
    /// translated lies interrupted beneath it): counts as a dispatch at base
    /// level would for quiescence, then reclaims what that frees. Returns how
    /// many invalidated fragments stay pending.
    ///
    /// # Safety
    /// `s` is a block registered with this engine ([`Engine::attach_cpu`]) of
    /// the calling CPU, which is at such a point.
    pub unsafe fn note_quiescent(&mut self, s: *mut Scratch) -> usize {
        // SAFETY: the caller's contract: this CPU's registered block; the
        // engine lock orders this with other CPUs' reads.
        unsafe { (*s).epoch = (*s).epoch.wrapping_add(1) };
        self.reclaim_quiescent(s)
    }

    pub(super) fn reclaim_if(&mut self, quiescent: impl Fn(&Pending) -> bool) {
        let mut keep = Vec::new();
        for p in core::mem::take(&mut self.pending) {
            if !p.reuse || !quiescent(&p) {
                keep.push(p);
                continue;
            }
            if let Some(r) = self.regions.get_mut(p.region) {
                r.hot_free.push((p.hot, p.hot_len));
                if p.stub_len != 0 {
                    r.stub_free.push((p.stub, p.stub_len));
                }
            }
            // The dead records and the map are freed here: no CPU can reach
            // their stubs, no interrupted CPU's handler can be reading the map.
            drop(p.exits);
            drop(p.meta);
        }
        self.pending = keep;
    }

    /// Each registered CPU's current `epoch`.
    pub(super) fn epochs(&self) -> Vec<u64> {
        // SAFETY: as in `reclaim_quiescent`.
        self.cpus.iter().map(|&c| unsafe { read_volatile(&(*c).epoch) }).collect()
    }

    /// Whether every registered CPU but `current` is outside translated code.
    pub(super) fn alone(&self, current: *const Scratch) -> bool {
        // SAFETY: as in `reclaim_quiescent`.
        self.cpus.iter().all(|&c| core::ptr::eq(c, current) || unsafe { read_volatile(&(*c).outside) } != 0)
    }

    /// Invalidate every fragment (the concurrent-safe flush: space comes
    /// back through [`Engine::reclaim_quiescent`]).
    pub fn invalidate_all(&mut self) -> usize {
        self.invalidate(0, u64::MAX)
    }

    /// Drop everything (all fragments, links, lookup entries, space).
    /// Requires every CPU to be outside the code cache.
    pub fn flush(&mut self) {
        self.stats.flushes += 1;
        for f in self.frags.values() {
            self.index.retract(&f.meta);
        }
        for m in self.tramp_metas.iter() {
            self.index.retract(m);
        }
        self.tramp_metas.clear();
        self.frags.clear();
        self.pending.clear();
        self.pads.clear();
        self.env_pad = None;
        self.pad_entries.clear();
        for r in self.regions.iter_mut() {
            r.hot_used = 0;
            r.stub_used = 0;
            r.hot_free.clear();
            r.stub_free.clear();
        }
        if let Some(t) = &self.ibl {
            t.clear();
        }
        self.hot_total = 0;
        self.generation += 1;
    }

    /// Makes room when the cache is full: a reset, except with cached returns,
    /// where stacks may hold pads a reset would free (then nothing: the caller
    /// stops with `NoSpace`). The reset never frees code another CPU may be
    /// running: when every other CPU is outside translated code (and this one
    /// is not in a handler over it, [`Env::quiescent_entry`]) it flushes;
    /// otherwise it invalidates everything and reclaims what is quiescent
    /// (the rest comes back at later dispatches). None: refused; else whether
    /// space came back (a caller whose allocation failed retries only then:
    /// otherwise it would reset again and again, recursing, while the space it
    /// needs waits for other CPUs, which wait for the engine's lock).
    pub(super) fn make_room(&mut self) -> Option<bool> {
        if self.cfg.cached_returns {
            return None;
        }
        self.stats.resets += 1;
        // A CPU in a handler over translated code is not outside it: never a
        // flush then, whatever the other CPUs do.
        if (self.current.is_null() || self.current_quiescent) && self.alone(self.current) {
            // A flush bumps the generation: the dispatcher then leaves the
            // (freed) exit record it holds alone.
            self.flush();
            Some(true)
        } else {
            self.invalidate_all();
            let pending = self.pending.len();
            // Not exempting the current CPU: the exit record it is being
            // dispatched for may belong to a fragment just invalidated.
            Some(self.reclaim_quiescent(core::ptr::null()) < pending)
        }
    }
}
