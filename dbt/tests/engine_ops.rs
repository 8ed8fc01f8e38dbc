//! Invalidation, flush, capacity reset, statistics, and randomized
//! differential tests (generated code run natively and translated).
use dbt::corpus::{cases, BUF_LEN};
use dbt::host::Harness;
use dbt::{Config, NullClient, StopKind};
use iced_x86::code_asm::*;

fn code_page() -> *mut u8 {
    let near = code_page as *const () as u64;
    dbt::host::rwx_near(near, 1 << 16).expect("code memory") as *mut u8
}

/// A fresh code page holding A at its start and B 64 bytes in:
/// `A: call B; add eax, 1; ret`  `B: mov eax, 10; ret` (A returns 11).
/// Returns (page, A, B).
fn call_pair() -> (*mut u8, u64, u64) {
    let p = code_page();
    let a = p as u64;
    let b = a + 64;
    let rel = (b as i64 - (a as i64 + 5)) as i32;
    let mut code_a = vec![0xE8];
    code_a.extend_from_slice(&rel.to_le_bytes());
    code_a.extend_from_slice(&[0x83, 0xC0, 0x01, 0xC3]);
    // SAFETY: p is our RWX page.
    unsafe {
        core::ptr::copy_nonoverlapping(code_a.as_ptr(), p, code_a.len());
        core::ptr::copy_nonoverlapping([0xB8, 10, 0, 0, 0, 0xC3].as_ptr(), p.add(64), 6);
    }
    (p, a, b)
}

/// The regex and miniz_oxide corpus cases, translated, give their native results (enough
/// code to fill a small cache several times).
fn regex_and_miniz_match_native(h: &mut Harness) {
    for c in cases().into_iter().filter(|c| c.name == "regex" || c.name == "miniz_oxide") {
        let mut nb = vec![0u8; BUF_LEN];
        let mut tb = vec![0u8; BUF_LEN];
        let n = h.run_native(c.addr(), &[nb.as_mut_ptr() as u64, c.test_n]);
        let t = h.run(c.addr(), &[tb.as_mut_ptr() as u64, c.test_n]);
        assert_eq!(t.stop, StopKind::Sentinel);
        assert_eq!(t.rax, n.rax, "{}", c.name);
        assert!(nb == tb);
    }
}

#[test]
fn invalidation_unlinks_and_retranslates() {
    let (p, a, b) = call_pair();
    let mut h = Harness::new(Some(Box::new(NullClient)));
    assert_eq!(h.run(a, &[]).rax, 11);
    assert_eq!(h.run(a, &[]).rax, 11);
    let links_before = h.engine.stats.links;
    assert!(links_before >= 1);
    // Modify B without telling the engine: the stale translation still runs.
    // SAFETY: our page.
    unsafe { *p.add(65) = 20 };
    assert_eq!(h.run(a, &[]).rax, 11, "cached translation is used until invalidated");
    let n = h.engine.invalidate(b + 1, b + 2);
    assert_eq!(n, 1);
    h.engine.reclaim();
    let s = h.engine.stats;
    assert_eq!(s.invalidations, 1);
    assert_eq!(s.invalidated_blocks, 1);
    assert!(s.unlinks >= 1, "A's call link into B was undone");
    assert_eq!(h.run(a, &[]).rax, 21);
    assert_eq!(h.run_native(a, &[]).rax, 21);
    // Invalidate a range nobody covers.
    assert_eq!(h.engine.invalidate(a + 1000, a + 2000), 0);
    // Full flush.
    h.engine.flush();
    assert_eq!(h.engine.fragment_count(), 0);
    assert_eq!(h.run(a, &[]).rax, 21);
    assert_eq!(h.engine.stats.flushes, 1);
}

#[test]
fn a_target_native_for_now_is_left_untranslated_and_unlinked() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_p, a, b) = call_pair();
    let env = dbt::host::HostEnv::new();
    let range = env.native_now.clone();
    let mut h = Harness::with_env(Some(Box::new(NullClient)), Config::default(), env);
    // B is being written: A runs translated, its call of B leaves at B.
    range[0].store(b, Relaxed);
    range[1].store(b + 6, Relaxed);
    let r = h.run(a, &[]);
    assert_eq!((r.stop, r.stop_pc), (StopKind::Native, b));
    assert!(h.engine.lookup(b).is_none(), "nothing translated for B");
    assert_eq!(h.engine.stats.native_now, 1);
    let r = h.run(a, &[]);
    assert_eq!((r.stop, r.stop_pc), (StopKind::Native, b), "nothing linked to B either");
    assert_eq!(h.engine.stats.native_now, 2);
    // Re-protected: B is translated and linked as usual.
    range[1].store(0, Relaxed);
    assert_eq!(h.run(a, &[]).rax, 11);
    assert!(h.engine.lookup(b).is_some());
    assert_eq!(h.run(a, &[]).rax, 11);
    assert_eq!(h.engine.stats.native_now, 2);
}

/// Dispatches in a handler that interrupted translated code (`Env::quiescent_entry`
/// false: a kernel interrupt) are no quiescent point: an invalidated fragment keeps its
/// space, which the interrupted code may return into, until a dispatch at base level.
#[test]
fn dispatches_in_a_handler_over_translated_code_reclaim_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_p, a, b) = call_pair();
    let env = dbt::host::HostEnv::new();
    let nested = env.nested.clone();
    let mut h = Harness::with_env(Some(Box::new(NullClient)), Config::default(), env);
    assert_eq!(h.run(a, &[]).rax, 11);
    assert_eq!(h.engine.invalidate(b + 1, b + 2), 1);
    assert_eq!(h.engine.pending_count(), 1);
    nested.store(true, Relaxed);
    let before = h.engine.stats.dispatches;
    for _ in 0..200 {
        assert_eq!(h.run(a, &[]).rax, 11);
    }
    assert!(h.engine.stats.dispatches - before >= 128, "reclaim was tried: {:?}", h.engine.stats);
    assert_eq!(h.engine.pending_count(), 1, "reclaimed under a handler");
    // A quiescent point outside the dispatcher (kernel: a work item on that CPU).
    let s: *mut dbt::scratch::Scratch = h.scratch();
    // SAFETY: the harness's own registered block; nothing runs translated now.
    assert_eq!(unsafe { h.engine.note_quiescent(s) }, 0);
    assert_eq!(h.engine.invalidate(b + 1, b + 2), 1);
    nested.store(false, Relaxed);
    for _ in 0..200 {
        assert_eq!(h.run(a, &[]).rax, 11);
    }
    assert_eq!(h.engine.pending_count(), 0, "reclaimed at base level");
}

/// A capacity reset from a handler over translated code invalidates instead of
/// flushing, even with no other CPU in the cache: the interrupted fragment survives.
#[test]
fn a_capacity_reset_in_a_handler_over_translated_code_never_flushes() {
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = Config { max_hot_bytes: 64 << 10, ..Config::default() };
    let env = dbt::host::HostEnv::new();
    env.nested.store(true, Relaxed);
    let mut h = Harness::with_env(Some(Box::new(NullClient)), cfg, env);
    regex_and_miniz_match_native(&mut h);
    let s = h.engine.stats;
    assert!(s.resets > 0 && s.flushes == 0, "{s:?}");
}

/// A full cache whose reset frees nothing (every fragment pending: here the dispatch is
/// in a handler over translated code) ends the translation with `NoSpace`, to be retried
/// later. Before, the allocator reset again and again, recursing until the dispatcher's
/// stack overflowed.
#[test]
fn a_full_cache_whose_reset_frees_nothing_stops_with_no_space() {
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = Config { hot_size: 64 << 10, stub_size: 32 << 10, max_hot_bytes: 1 << 30, ..Config::default() };
    let env = dbt::host::HostEnv::new();
    env.nested.store(true, Relaxed);
    let mut h = Harness::with_env(Some(Box::new(NullClient)), cfg, env);
    let c = cases().into_iter().find(|c| c.name == "regex").expect("the regex case");
    let mut tb = vec![0u8; BUF_LEN];
    let t = h.run(c.addr(), &[tb.as_mut_ptr() as u64, c.test_n]);
    assert_eq!(t.stop, StopKind::NoSpace, "{:?}", h.engine.stats);
    assert!(h.engine.stats.resets > 0 && h.engine.pending_count() > 0);
}

#[test]
fn capacity_limit_resets_and_stays_correct() {
    let cfg = Config { max_hot_bytes: 64 << 10, ..Config::default() };
    let mut h = Harness::with_config(Some(Box::new(NullClient)), cfg);
    regex_and_miniz_match_native(&mut h);
    assert!(h.engine.stats.resets > 0, "{:?}", h.engine.stats);
}

/// The pc whose first byte `int3_after_first_read` overwrites with `int3`.
static POKE_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A [`dbt::host::HostEnv::after_read`] hook: a writer puts `int3` over the first byte
/// of the instruction at `POKE_AT` right after the engine first read it, as
/// `text_poke_bp` does on another CPU.
fn int3_after_first_read(pc: u64) {
    use std::sync::atomic::Ordering::SeqCst;
    if pc != 0 && POKE_AT.compare_exchange(pc, 0, SeqCst, SeqCst).is_ok() {
        // SAFETY: the test's RWX code page.
        unsafe { *(pc as *mut u8) = 0xCC };
    }
}

/// A translation copies the bytes its instructions were decoded from, not what the code
/// holds when the copy is made: with the code read again for the copy, the `int3`
/// written meanwhile ran from the cache (a SIGTRAP here; in the kernel, an `int3` whose
/// handler knew no such pc).
#[test]
fn a_translation_copies_the_bytes_it_decoded() {
    let p = code_page();
    // nop (66 90); mov eax, 42; ret
    let code = [0x66u8, 0x90, 0xB8, 42, 0, 0, 0, 0xC3];
    // SAFETY: our page.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len()) };
    let mut env = dbt::host::HostEnv::new();
    env.after_read = Some(int3_after_first_read);
    let mut h = Harness::with_env(Some(Box::new(NullClient)), Config::default(), env);
    POKE_AT.store(p as u64, std::sync::atomic::Ordering::SeqCst);
    let r = h.run(p as u64, &[]);
    assert_eq!(POKE_AT.load(std::sync::atomic::Ordering::SeqCst), 0, "the writer wrote");
    assert_eq!((r.stop, r.rax), (StopKind::Sentinel, 42), "the code as decoded ran");
    // SAFETY: our page.
    assert_eq!(unsafe { *p }, 0xCC);
    // Invalidated (as a write to translated code is): the new bytes are translated.
    assert_eq!(h.engine.invalidate(p as u64, p as u64 + 1), 1);
    let r = h.run(p as u64, &[]);
    assert_eq!((r.stop, r.stop_pc), (StopKind::Breakpoint, p as u64));
}

#[test]
fn stops_on_int3_ud2_and_invalid_bytes() {
    let p = code_page();
    let mut h = Harness::new(Some(Box::new(NullClient)));
    for (bytes, kind, off) in [
        (&[0x90u8, 0xCC][..], StopKind::Breakpoint, 1u64),
        (&[0x31, 0xC0, 0x0F, 0x0B][..], StopKind::Undefined, 2),
        (&[0x90, 0x90, 0x06][..], StopKind::Invalid, 2), // push es: invalid in 64-bit mode
    ] {
        // SAFETY: our page.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        h.engine.flush();
        let r = h.run(p as u64, &[]);
        assert_eq!(r.stop, kind);
        assert_eq!(r.stop_pc, p as u64 + off);
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random function `f(out: *mut u64)`: random ALU/flag/cmov/setcc code on
/// nine registers, optionally with forward branches and a counted loop, then
/// stores every register and the arithmetic flags to `out`.
fn gen(rng: &mut Rng, branchy: bool, at: u64) -> Option<Vec<u8>> {
    let regs = [rax, rcx, rdx, rsi, r8, r9, r10, rbx, rbp];
    let mut a = CodeAssembler::new(64).ok()?;
    a.push(rbx).ok()?;
    a.push(rbp).ok()?;
    a.mov(r11, rdi).ok()?;
    for r in regs.iter() {
        a.mov(*r, rng.next()).ok()?;
    }
    let n = 20 + rng.below(40);
    let mut labels = Vec::new();
    for k in 0..n {
        let d = regs[rng.below(9) as usize];
        let s = regs[rng.below(9) as usize];
        let imm = rng.next() as i32;
        match rng.below(16) {
            0 => a.add(d, s).ok()?,
            1 => a.sub(d, imm).ok()?,
            2 => a.xor(d, s).ok()?,
            3 => a.imul_2(d, s).ok()?,
            4 => a.shl(d, (rng.below(63) + 1) as u32).ok()?,
            5 => a.adc(d, s).ok()?,
            6 => a.sbb(d, imm).ok()?,
            7 => a.cmp(d, s).ok()?,
            8 => a.cmovb(d, s).ok()?,
            9 => a.lea(d, qword_ptr(s + d * 2 + 17)).ok()?,
            10 => a.rol(d, (rng.below(63) + 1) as u32).ok()?,
            11 => a.neg(d).ok()?,
            12 => a.test(d, imm).ok()?,
            13 => a.bswap(d).ok()?,
            14 => a.inc(d).ok()?,
            _ => a.or(d, imm).ok()?,
        }
        if branchy && k % 5 == 4 {
            let mut l = a.create_label();
            match rng.below(4) {
                0 => a.jne(l).ok()?,
                1 => a.jl(l).ok()?,
                2 => a.jbe(l).ok()?,
                _ => a.js(l).ok()?,
            }
            a.xor(regs[rng.below(9) as usize], imm).ok()?;
            a.set_label(&mut l).ok()?;
            a.nop().ok()?;
            labels.push(());
        }
    }
    if branchy {
        // counted loop with a data-dependent body
        let mut top = a.create_label();
        a.mov(rdi, 5 + rng.below(20)).ok()?;
        a.set_label(&mut top).ok()?;
        a.add(rax, rcx).ok()?;
        a.rol(rdx, 3).ok()?;
        a.dec(rdi).ok()?;
        a.jnz(top).ok()?;
    }
    a.pushfq().ok()?;
    a.pop(rdi).ok()?;
    a.and(rdi, 0x8d5).ok()?;
    for (k, r) in regs.iter().chain([rdi].iter()).enumerate() {
        a.mov(qword_ptr(r11 + 8 * k as i32), *r).ok()?;
    }
    a.pop(rbp).ok()?;
    a.pop(rbx).ok()?;
    a.ret().ok()?;
    a.assemble(at).ok()
}

fn differential(branchy: bool, seed: u64) {
    differential_with(Harness::new(Some(Box::new(NullClient))), branchy, seed, false);
}

/// Generated functions run natively and translated; registers and flags must
/// match, and with `count` the inscount result must equal the single-step
/// count.
fn differential_with(mut h: Harness, branchy: bool, seed: u64, count: bool) {
    let p = code_page();
    let mut rng = Rng(seed);
    for _ in 0..150 {
        let code = gen(&mut rng, branchy, p as u64).expect("assemble");
        assert!(code.len() < 1 << 16);
        // SAFETY: our page.
        unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len()) };
        h.engine.flush();
        let mut no = [0u64; 10];
        let mut to = [0u64; 10];
        h.run_native(p as u64, &[no.as_mut_ptr() as u64]);
        let r = h.run(p as u64, &[to.as_mut_ptr() as u64]);
        assert_eq!(r.stop, StopKind::Sentinel);
        assert_eq!(no, to, "register/flags state differs");
        assert_eq!(r.callee_saved, dbt::host::CALLEE_SEED);
        if count {
            let got = h.inscount();
            h.reset_inscount();
            assert_eq!(Some(got), h.ptrace_count(p as u64, &[no.as_mut_ptr() as u64]), "inscount");
        }
    }
}

#[test]
fn random_branchy_code_one_basic_block_per_fragment_matches_native() {
    let cfg = Config { max_basic_blocks: 1, ..Config::default() };
    differential_with(Harness::with_config(Some(Box::new(NullClient)), cfg), true, 0x0bb1_0c45_1de5_7a11, false);
}

#[test]
fn random_branchy_code_under_inscount_matches_native_and_single_step() {
    differential_with(Harness::new(Some(Box::new(dbt::InsCount))), true, 0x005e_ed0f_1a65, true);
}

#[test]
fn random_straight_line_code_matches_native() {
    differential(false, 0x1234_5678_9abc_def1);
}

#[test]
fn random_branchy_code_matches_native() {
    differential(true, 0x0fed_cba9_8765_4321);
}

/// Code for `indirect_targets`: a loop that calls, alternately, `t1` and
/// `t2` through a register with CF set, and adds CF back after each return
/// (so the indirect call, the target check and the return lookup must all
/// leave the flags alone). Returns the code and the expected result.
fn alternating_calls(base: u64, t1: u64, t2: u64, n: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.push(rbx).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(rbx, rsi).unwrap();
    a.mov(r8, t1).unwrap();
    a.mov(r9, t2).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rcx, r8).unwrap();
    a.test(bl, 1).unwrap();
    a.cmovne(rcx, r9).unwrap();
    a.stc().unwrap();
    a.call(rcx).unwrap();
    a.adc(rax, 0).unwrap();
    a.dec(rbx).unwrap();
    a.jne(top).unwrap();
    a.pop(rbx).unwrap();
    a.ret().unwrap();
    let main = a.assemble(base).unwrap();
    let callee = |add: i32, at: u64| {
        let mut c = CodeAssembler::new(64).unwrap();
        c.lea(rax, qword_ptr(rax + add)).unwrap();
        c.ret().unwrap();
        c.assemble(at).unwrap()
    };
    let expect = n / 2 * 1000 + (n - n / 2) * 2 + n;
    (vec![(base, main), (t1, callee(2, t1)), (t2, callee(1000, t2))], expect)
}

/// Indirect calls and returns through the inline lookup: targets whose low
/// 16 bits collide (they keep evicting each other's table entry, so every
/// other lookup lands on the wrong fragment's target check and must take its
/// miss path) and targets that do not; once with code near the harness
/// (64-bit target check) and once below 2 GiB (the `lea rcx, [rcx - pc]`
/// check used for kernel addresses).
#[test]
fn indirect_targets_collide_and_check_their_pc() {
    let low = {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the result is
        // checked before use.
        let p = unsafe {
            libc::mmap(
                0x4000_0000 as *mut libc::c_void,
                0x30000,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as u64, 0x4000_0000, "cannot map test code below 2 GiB");
        p as *mut u8
    };
    let high = dbt::host::rwx_near(code_page as *const () as u64, 0x30000).expect("code memory") as *mut u8;
    for base in [low, high] {
        let b = base as u64;
        for (t2_off, colliding) in [(0x11000u64, true), (0x11040, false)] {
            let n = 200;
            let (parts, expect) = alternating_calls(b, b + 0x1000, b + t2_off, n);
            for (at, code) in parts.iter() {
                // SAFETY: inside our RWX mapping.
                unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), (*at) as *mut u8, code.len()) };
            }
            let mut h = Harness::new(Some(Box::new(NullClient)));
            assert_eq!(h.run_native(b, &[0, n]).rax, expect);
            let r = h.run(b, &[0, n]);
            assert_eq!(r.stop, StopKind::Sentinel);
            assert_eq!(r.rax, expect, "base {b:#x} colliding={colliding}");
            let misses = h.engine.stats.misses;
            if colliding {
                assert!(misses >= n, "every alternation misses: {misses}");
            } else {
                assert!(misses < 10, "distinct entries stay cached: {misses}");
            }
        }
    }
}

#[test]
fn random_branchy_code_with_cached_returns_under_inscount_matches_single_step() {
    let cfg = Config { cached_returns: true, ..Config::default() };
    differential_with(Harness::with_config(Some(Box::new(dbt::InsCount)), cfg), true, 0x0cac_4ed0_0e75, true);
}

/// Cached returns: invalidating fragments that hold return pads (a stack may still
/// return to one) never frees their space: after invalidation and reclaim the next
/// translation of the caller lands elsewhere, with a pad of its own, and runs right.
#[test]
fn return_pads_keep_their_space_after_invalidation() {
    let (_, a, _) = call_pair();
    let cfg = Config { cached_returns: true, ..Config::default() };
    let mut h = Harness::with_config(Some(Box::new(NullClient)), cfg);
    assert_eq!(h.run(a, &[]).rax, 11);
    let pads = h.engine.stats.pads;
    assert_eq!(pads, 1, "one call, one pad");
    let old_a = h.engine.lookup(a).expect("A translated");
    // A, its return site and B.
    assert_eq!(h.engine.invalidate(a, a + 64 + 6), 3);
    h.engine.reclaim();
    assert_eq!(h.run(a, &[]).rax, 11);
    assert_ne!(h.engine.lookup(a), Some(old_a), "the pad's fragment space is not reused");
    assert_eq!(h.engine.stats.pads, 2);
}

/// An invalidated fragment's exits are dead: a CPU still inside it (between
/// the invalidation and quiescence) that takes one must not get it linked, or
/// the target's later unlink would write a rel32 into whatever fragment
/// reuses the space after `reclaim`.
#[test]
fn dead_exit_records_are_never_linked() {
    let (p, a, b) = call_pair();
    // H at p+128: `jmp C` with C at p+192 (`ret`), a fragment no larger than
    // A's (A: call B), so it is placed first-fit into A's reclaimed space;
    // nothing in H is linked to B.
    let h_pc = a + 128;
    let rel = (192i32 - (128 + 5)).to_le_bytes();
    // SAFETY: our page.
    unsafe {
        core::ptr::copy_nonoverlapping([0xE9, rel[0], rel[1], rel[2], rel[3]].as_ptr(), p.add(128), 5);
        *p.add(192) = 0xC3;
    }

    let mut h = Harness::new(Some(Box::new(NullClient)));
    let e = &mut h.engine;
    e.fragment_for(a).expect("A translates");
    let (a_hot, a_len, _, _) = e.fragments()[0];
    let recs = e.exit_records(a);
    // SAFETY: A's records, read while A is live.
    let to_b = *recs.iter().find(|&&r| unsafe { (*r).target } == b).expect("A has an exit to B");
    assert_eq!(e.invalidate(a, a + 1), 1);
    // A CPU still inside A takes its exit to B: B is translated, the dead
    // record must stay unlinked.
    // SAFETY: A is invalidated but not reclaimed: its records are alive.
    unsafe { e.take_exit(to_b) }.expect("B translates");
    let links = e.stats.links;
    e.reclaim();
    e.fragment_for(h_pc).expect("H translates");
    assert!(e.fragments().iter().any(|f| f.0 == a_hot), "H reuses A's space");
    // A's old bytes, now H's (its patch sites lie inside).
    let before = read_code(a_hot, a_len);
    // B's invalidation unlinks every exit linked to B.
    assert_eq!(e.invalidate(b, b + 1), 1);
    assert_eq!(read_code(a_hot, a_len), before, "unlinking B wrote into H");
    assert_eq!(links, 0, "the dead record was linked");
}

fn read_code(at: u64, len: u64) -> Vec<u8> {
    // SAFETY: code-cache memory of a live fragment (readable and executable).
    unsafe { std::slice::from_raw_parts(at as *const u8, len as usize) }.to_vec()
}

/// The code cache runs from a read+execute mapping: every byte the engine
/// placed, linked and unlinked above went through the environment's
/// writable alias (`Env::write_code` / `Env::patch_rel32`), since a direct
/// store to the executable address would fault.
#[test]
fn code_cache_is_not_writable_where_it_executes() {
    let (_, a, _) = call_pair();
    let mut h = Harness::new(Some(Box::new(NullClient)));
    assert_eq!(h.run(a, &[]).rax, 11);
    assert!(h.engine.stats.links >= 1);
    let hot = h.engine.fragments()[0].0;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let perms = maps
        .lines()
        .find_map(|l| {
            let (range, rest) = l.split_once(' ')?;
            let (lo, hi) = range.split_once('-')?;
            let (lo, hi) = (u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?);
            (lo..hi).contains(&hot).then(|| rest[..4].to_string())
        })
        .expect("the fragment's mapping");
    assert_eq!(perms, "r-xs", "code cache mapping at {hot:#x}");
}
