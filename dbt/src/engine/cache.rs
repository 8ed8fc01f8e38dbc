//! The code cache: regions and their allocator, placing a translated
//! fragment (hot code, exit stubs, record slots, pc map), return pads.

use super::*;

impl Region {
    /// `len` rounded up to [`GRANULE`] (so a pc-map granule belongs to one
    /// allocation), first fit from the free list, else from the unused end.
    pub(super) fn alloc(free: &mut Vec<(u64, u64)>, used: &mut u64, start: u64, size: u64, len: u64) -> Option<u64> {
        let len = len.div_ceil(GRANULE) * GRANULE;
        if let Some(i) = free.iter().position(|&(_, l)| l >= len) {
            let (a, l) = free[i];
            if l == len {
                free.swap_remove(i);
            } else {
                free[i] = (a + len, l - len);
            }
            return Some(a);
        }
        if *used + len > size {
            return None;
        }
        let a = start + *used;
        *used += len;
        Some(a)
    }
}

impl Engine {
    /// The region for code translated from `pc`, a new one if none is in
    /// reach. A new region needs its pc-index directory (a quarter of its
    /// size, as a pool block) on top of the translation reserve: without that
    /// much dispatcher memory the translation is refused (`NoMemory`); no
    /// code memory near `pc` is `NoSpace`.
    pub(super) fn region_for(&mut self, pc: u64) -> Result<usize, StopKind> {
        let span = self.cfg.region_span.min(REACH);
        let near = |r: &Region| {
            let lo = r.base;
            let hi = r.base + r.hot_size + r.stub_size;
            pc.abs_diff(lo) < REACH && pc.abs_diff(hi) < REACH && pc.abs_diff(r.anchor) < span
        };
        if let Some(i) = self.regions.iter().position(&near) {
            return Ok(i);
        }
        let size = self.cfg.hot_size + self.cfg.stub_size;
        if self.env.memory_left() < RegionDir::bytes_for(size).saturating_add(TRANSLATE_RESERVE) {
            return Err(StopKind::NoMemory);
        }
        let base = self.env.alloc_code(pc, size as usize).ok_or(StopKind::NoSpace)?;
        let r = Region {
            anchor: pc,
            base,
            hot_size: self.cfg.hot_size,
            stub_size: self.cfg.stub_size,
            hot_used: 0,
            stub_used: 0,
            hot_free: Vec::new(),
            stub_free: Vec::new(),
        };
        if !near(&r) || !base.is_multiple_of(GRANULE) || !self.index.add_region(self.regions.len(), base, size) {
            return Err(StopKind::NoSpace);
        }
        self.regions.push(r);
        Ok(self.regions.len() - 1)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn place(
        &mut self,
        pc: u64,
        end: u64,
        ri: usize,
        hot: u64,
        hot_len: u64,
        em: Emitted,
        ninsns: usize,
    ) -> Result<u64, StopKind> {
        let Emitted { mut buf, fixups, exits, body_off, code_len, pads, map, slots: fault_slots } = em;
        let code_len_bytes = buf.len();
        // Exit stubs, in the cold area.
        let mut recs: Vec<Box<ExitRecord>> = exits.into_iter().map(Box::new).collect();
        let n_stubs = recs.len() as u64;
        let mut stub_code = Vec::new();
        let mut stub_map: Vec<MapEnt> = Vec::new();
        let stub_len_each = exit_stub_len(&self.abi);
        let (slots, stub_bytes) = stubs_layout(&self.abi, recs.len() as u64);
        let stub_total = stub_bytes.div_ceil(GRANULE) * GRANULE;
        let stub = if stub_total == 0 {
            Some(hot + hot_len) // no exits (ret / indirect only): nothing to place
        } else {
            let r = &mut self.regions[ri];
            Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, stub_total)
        };
        let Some(stub) = stub else {
            self.regions[ri].hot_free.push((hot, hot_len));
            if self.make_room() != Some(true) {
                return Err(StopKind::NoSpace);
            }
            return self.translate(pc);
        };
        for (k, rec) in recs.iter_mut().enumerate() {
            let addr = stub + k as u64 * stub_len_each;
            rec.stub = addr;
            let t = exit_stub(&self.abi, addr, stub + slots + 8 * k as u64, rec.target);
            if t.err {
                return Err(StopKind::NoSpace);
            }
            let base = stub_code.len() as u32;
            stub_map.extend(t.map.iter().map(|m| MapEnt { off: m.off + base, ..*m }));
            stub_code.extend_from_slice(&t.buf);
        }
        // The record slots the stubs push from.
        stub_code.resize(slots as usize, 0xCC);
        for rec in recs.iter() {
            stub_code.extend_from_slice(&(&**rec as *const ExitRecord as u64).to_le_bytes());
        }
        for (off, x) in fixups.iter() {
            let at = hot + *off as u64;
            let rel = recs[*x].stub.wrapping_sub(at + 4) as i64;
            if rel != rel as i32 as i64 {
                return Err(StopKind::NoSpace);
            }
            buf[*off..*off + 4].copy_from_slice(&(rel as i32).to_le_bytes());
            if recs[*x].stop == 0 && self.cfg.link {
                recs[*x].patch_at = at;
            }
        }
        // [hot, hot+hot_len) and [stub, stub+stub_code.len()) were allocated
        // from this engine's region and nothing executes them yet. Slack after
        // the code: int3, never executed.
        buf.resize(hot_len as usize, 0xCC);
        // Fault-site slots first: the fragment jumps to them once it is written.
        let slots_ok = fault_slots.iter().all(|(at, code)| self.env.write_code(*at, code));
        if !slots_ok || !self.env.write_code(hot, &buf) || !self.env.write_code(stub, &stub_code) {
            let r = &mut self.regions[ri];
            r.hot_free.push((hot, hot_len));
            if stub_total != 0 {
                r.stub_free.push((stub, stub_total));
            }
            return Err(StopKind::NoSpace);
        }
        buf.truncate(code_len_bytes);
        let meta = Box::new(FragMeta {
            start: pc,
            hot,
            hot_len,
            stub,
            stub_len: stub_total,
            hot_map: map.into_boxed_slice(),
            stub_map: stub_map.into_boxed_slice(),
        });
        self.index.publish(&meta);
        // Pads exist once their code is in place.
        self.pads.extend(pads.iter().map(|&off| hot + off as u64));
        self.stats.pads += pads.len() as u64;
        self.stats.blocks += 1;
        self.stats.guest_insns += ninsns as u64;
        self.stats.hot_bytes += buf.len() as u64;
        self.stats.stub_bytes += stub_code.len() as u64;
        self.hot_total += hot_len;
        let f = Fragment {
            start: pc,
            end,
            hot,
            entry: hot + body_off,
            hot_len,
            code_len,
            has_pads: !pads.is_empty(),
            stub_addr: stub,
            stub_len: stub_total,
            stub_code_len: stub_len_each * n_stubs,
            region: ri,
            exits: recs,
            incoming: core::ptr::null_mut(),
            meta,
        };
        // Eagerly link exits whose targets already exist.
        self.frags.insert(pc, f);
        if self.cfg.link {
            let targets: Vec<(usize, u64)> = self.frags[&pc]
                .exits
                .iter()
                .enumerate()
                .filter(|(_, r)| r.patch_at != 0)
                .map(|(k, r)| (k, r.target))
                .collect();
            for (k, t) in targets {
                if self.frags.contains_key(&t) {
                    let rp = &mut *self.frags.get_mut(&pc).map(|f| &mut f.exits[k]).ok_or(StopKind::NoSpace)?
                        as &mut ExitRecord as *mut ExitRecord;
                    self.link(rp);
                }
            }
        }
        Ok(hot + body_off)
    }

    /// The indirect entry of a return pad (cached returns): the target check for
    /// the pad's own address and a jump to it, in its region's stub area; made
    /// the first time an indirect jump targets the pad, kept until a flush.
    pub(super) fn pad_entry(&mut self, pad: u64) -> Option<u64> {
        if let Some(&entry) = self.pad_entries.get(&pad) {
            return Some(entry);
        }
        let ri = self.regions.iter().position(|r| pad >= r.base && pad < r.base + r.hot_size)?;
        let emit = |at: u64| {
            let mut e = Emit::new(at);
            if self.cfg.ibt {
                e.raw(&ENDBR64);
            }
            e.target_check(&self.abi, pad);
            let rel = pad.wrapping_sub(e.pc() + 5) as i64;
            e.raw(&[0xE9]);
            e.raw(&(rel as i32).to_le_bytes());
            (!e.err && rel == rel as i32 as i64).then_some(e.buf)
        };
        let size = emit(pad)?.len().div_ceil(GRANULE as usize) as u64 * GRANULE;
        let r = &mut self.regions[ri];
        let at = Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, size)?;
        let code = emit(at).filter(|c| c.len().div_ceil(GRANULE as usize) as u64 * GRANULE == size)?;
        if !self.env.write_code(at, &code) {
            self.regions[ri].stub_free.push((at, size));
            return None;
        }
        self.pad_entries.insert(pad, at);
        Some(at)
    }

    /// The address a run's outermost return must go to with cached returns (the
    /// environment puts it where the sentinel would go): an exit stub whose
    /// record targets `stop_pc`, placed near `near` (the guest code). Made once
    /// per flush.
    pub fn env_return_pad(&mut self, near: u64) -> Result<u64, StopKind> {
        if let Some((stub, _)) = &self.env_pad {
            return Ok(*stub);
        }
        let ri = self.region_for(near)?;
        let rec = Box::new(ExitRecord::new(self.stop_pc, 0, 0));
        let (slot, bytes) = stubs_layout(&self.abi, 1);
        let size = bytes.div_ceil(GRANULE) * GRANULE;
        let r = &mut self.regions[ri];
        let stub = Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, size)
            .ok_or(StopKind::NoSpace)?;
        let mut code = exit_stub(&self.abi, stub, stub + slot, self.stop_pc).buf;
        code.resize(slot as usize, 0xCC);
        code.extend_from_slice(&(&*rec as *const ExitRecord as u64).to_le_bytes());
        if !self.env.write_code(stub, &code) {
            self.regions[ri].stub_free.push((stub, size));
            return Err(StopKind::NoSpace);
        }
        self.pads.insert(stub);
        self.env_pad = Some((stub, rec));
        Ok(stub)
    }
}
