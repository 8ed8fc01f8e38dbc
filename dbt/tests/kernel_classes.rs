//! Kernel instruction classes in the translator: swapgs/sysret/iret stop
//! before they run, `sti` keeps the instruction its shadow covers, retpoline
//! and return thunks are translated as the branch they stand for.
use dbt::client::{BlockInfo, Client, Inserts, Snippet, Where};
use dbt::host::{rwx_near, Harness, HostEnv};
use dbt::{Config, Engine, KClass, NullClient, StopKind, Thunk};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, Register};

/// A fresh RWX page near this binary holding `code` at offset 0.
fn page_with(code: &[u8]) -> u64 {
    let p = rwx_near(page_with as *const () as u64, 1 << 16).expect("code memory");
    // SAFETY: our fresh page.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len()) };
    p
}

fn emitted(e: &Engine) -> Vec<Instruction> {
    let mut v = Vec::new();
    for (hot, len, stub, slen) in e.fragments() {
        for (at, n) in [(hot, len), (stub, slen)] {
            // SAFETY: code-cache bytes of a live fragment.
            let b = unsafe { std::slice::from_raw_parts(at as *const u8, n as usize) };
            v.extend(Decoder::with_ip(64, b, at, DecoderOptions::NONE));
        }
    }
    v
}

#[test]
fn swapgs_and_sysret_stop_before_running() {
    // mov eax, 1; swapgs; sysretq
    let f = page_with(&[0xB8, 1, 0, 0, 0, 0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07]);
    let mut h = Harness::new(Some(Box::new(NullClient)));
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Privileged, f + 5, 1));
    assert!(emitted(&h.engine).iter().all(|i| i.mnemonic() != Mnemonic::Swapgs && i.mnemonic() != Mnemonic::Sysretq));
    assert_eq!(h.engine.stats.kclass[KClass::Swapgs as usize], 1);
    // iretq stops too.
    let g = page_with(&[0x48, 0xCF]);
    assert_eq!(h.run(g, &[]).stop, StopKind::Privileged);
    assert_eq!(h.engine.stats.kclass[KClass::ContextReturn as usize], 1);
}

/// Asks for a snippet right before every `hlt`.
struct BeforeHlt;
impl Client for BeforeHlt {
    fn instrument(&mut self, b: &BlockInfo<'_>, o: &mut Inserts) {
        for (k, i) in b.insns.iter().enumerate() {
            if i.mnemonic() == Mnemonic::Hlt {
                let nop = Instruction::with(iced_x86::Code::Nopd);
                o.insert(Where::Before(k), Snippet { code: vec![nop; 3], clobbers: vec![], clobbers_flags: false });
            }
        }
    }
}

#[test]
fn sti_is_never_separated_from_hlt() {
    // 63 nops, sti, hlt, ret: the block length limit (64) falls right after sti.
    let mut code = vec![0x90; 63];
    code.extend_from_slice(&[0xFB, 0xF4, 0xC3]);
    let f = page_with(&code);
    let mut e = Engine::new(Box::new(HostEnv::new()), Some(Box::new(BeforeHlt)), Config::default()).unwrap();
    e.fragment_for(f).expect("translates");
    let v = emitted(&e);
    let sti = v.iter().position(|i| i.mnemonic() == Mnemonic::Sti).expect("sti copied");
    assert_eq!(v[sti + 1].mnemonic(), Mnemonic::Hlt, "sti; hlt kept together: {:?}", &v[sti..sti + 3]);
    assert_eq!(e.stats.kclass[KClass::Interrupts as usize], 2);
}

/// A page with a retpoline thunk for r11, a return thunk, and F that calls G
/// through the retpoline and returns through the return thunk:
///   T:  call 1f; 2: pause; lfence; jmp 2b; 1: mov [rsp], r11; ret
///   R:  ret; int3
///   F:  lea r11, [rip + G]; call T; add eax, 1; jmp R
///   G:  mov eax, 41; jmp R
fn thunk_page() -> (u64, u64, u64, u64) {
    use iced_x86::code_asm::*;
    let p = rwx_near(thunk_page as *const () as u64, 1 << 16).expect("code memory");
    let mut a = CodeAssembler::new(64).unwrap();
    let mut t = a.create_label();
    let mut r = a.create_label();
    let mut f = a.create_label();
    let mut g = a.create_label();
    let mut l1 = a.create_label();
    let mut l2 = a.create_label();
    a.set_label(&mut t).unwrap();
    a.call(l1).unwrap();
    a.set_label(&mut l2).unwrap();
    a.pause().unwrap();
    a.lfence().unwrap();
    a.jmp(l2).unwrap();
    a.set_label(&mut l1).unwrap();
    a.mov(qword_ptr(rsp), r11).unwrap();
    a.ret().unwrap();
    a.int3().unwrap();
    a.set_label(&mut r).unwrap();
    a.ret().unwrap();
    a.int3().unwrap();
    a.int3().unwrap();
    a.set_label(&mut f).unwrap();
    a.lea(r11, qword_ptr(g)).unwrap();
    a.call(t).unwrap();
    a.add(eax, 1).unwrap();
    a.jmp(r).unwrap();
    a.int3().unwrap();
    a.set_label(&mut g).unwrap();
    a.mov(eax, 41).unwrap();
    a.jmp(r).unwrap();
    let res = a.assemble_options(p, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).unwrap();
    let code = res.inner.code_buffer.clone();
    // SAFETY: our fresh page.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len()) };
    let at = |l: &CodeLabel| res.label_ip(l).unwrap();
    (at(&t), at(&r), at(&f), at(&g))
}

#[test]
fn thunks_are_translated_as_the_branch_they_stand_for() {
    let (t, r, f, _) = thunk_page();
    let native = dbt::host::run_native(f, &[]).rax;
    assert_eq!(native, 42);
    // Without the thunks declared the translator translates them (correct, slower).
    let mut plain = Harness::new(Some(Box::new(NullClient)));
    assert_eq!(plain.run(f, &[]).rax, native);
    assert!(plain.engine.lookup(t).is_some() && plain.engine.lookup(r).is_some());
    // Declared: `call T` is `call r11`, `jmp R` is `ret`; neither thunk is translated.
    let mut env = HostEnv::new();
    env.thunks = vec![(t, Thunk::Indirect(Register::R11)), (r, Thunk::Return)];
    let mut h = Harness::with_env(Some(Box::new(NullClient)), Config::default(), env);
    assert_eq!(h.run(f, &[]).rax, native);
    assert!(h.engine.lookup(t).is_none(), "the retpoline thunk was translated");
    assert!(h.engine.lookup(r).is_none(), "the return thunk was translated");
    assert_eq!(h.engine.stats.kclass[KClass::RetpolineThunk as usize], 1);
    assert_eq!(h.engine.stats.kclass[KClass::ReturnThunk as usize], 2);
    // The same with cached returns (a recognized return thunk is a real `ret`).
    let mut env = HostEnv::new();
    env.thunks = vec![(t, Thunk::Indirect(Register::R11)), (r, Thunk::Return)];
    let mut h =
        Harness::with_env(Some(Box::new(NullClient)), Config { cached_returns: true, ..Config::default() }, env);
    assert_eq!(h.run(f, &[]).rax, native);
}

/// Native regions: a call into one, and a block that runs into one, leave
/// translated code with `StopKind::Native` at the region's pc, and nothing
/// of the region is ever translated.
#[test]
fn native_regions_are_left_not_translated() {
    // f: mov eax, 7; call g; ret      g (native): mov eax, 9; ret
    // h: mov eax, 5; nop; <native from here> mov eax, 6; ret
    let mut code = vec![0xB8, 7, 0, 0, 0, 0xE8, 0, 0, 0, 0, 0xC3];
    let g_off = 0x40;
    let rel = (g_off as i32) - 10;
    code[6..10].copy_from_slice(&rel.to_le_bytes());
    code.resize(g_off, 0xCC);
    code.extend_from_slice(&[0xB8, 9, 0, 0, 0, 0xC3]);
    let h_off = 0x80;
    code.resize(h_off, 0xCC);
    code.extend_from_slice(&[0xB8, 5, 0, 0, 0, 0x90, 0xB8, 6, 0, 0, 0, 0xC3]);
    let p = page_with(&code);
    let (g, h) = (p + g_off as u64, p + h_off as u64);
    let mut env = HostEnv::new();
    env.native = vec![(g, g + 6), (h + 6, h + 12)];
    let mut hs = Harness::with_env(Some(Box::new(NullClient)), Config::default(), env);
    let r = hs.run(p, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Native, g, 7), "the call into the region");
    let r = hs.run(h, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Native, h + 6, 5), "the block running into it");
    let r = hs.run(g, &[]);
    assert_eq!((r.stop, r.stop_pc), (StopKind::Native, g), "entering it directly");
    let spans: Vec<(u64, u64)> = [p, h].iter().filter_map(|&pc| hs.engine.fragment_span(pc)).collect();
    assert_eq!(spans, vec![(p, p + 10), (h, h + 6)], "f ends at its call, h where the region begins");
    assert!(hs.engine.lookup(g).is_none() && hs.engine.lookup(h + 6).is_none(), "nothing native translated");
}

/// With `Config::native_fragments`, a native pc gets a fragment whose body jumps to it
/// (so exits to it can be linked and returns to it hit the lookup table), with nothing
/// of the region decoded or instrumented, and a block that runs into a region ends in a
/// plain, linkable exit to it instead of a stop.
#[test]
fn native_fragments_jump_to_the_native_pc() {
    // g (native): mov eax, 9; ret      h: mov eax, 5; nop; <native from here> mov eax, 6; ret
    let mut code = vec![0xB8, 9, 0, 0, 0, 0xC3];
    let h_off = 0x40;
    code.resize(h_off, 0xCC);
    code.extend_from_slice(&[0xB8, 5, 0, 0, 0, 0x90, 0xB8, 6, 0, 0, 0, 0xC3]);
    let p = page_with(&code);
    let (g, h) = (p, p + h_off as u64);
    for on in [true, false] {
        let mut env = HostEnv::new();
        env.native = vec![(g, g + 6), (h + 6, h + 12)];
        let cfg = Config { native_fragments: on, ..Config::default() };
        let mut e = Engine::new(Box::new(env), Some(Box::new(dbt::InsCount)), cfg).unwrap();
        if !on {
            assert_eq!(e.fragment_for(g), Err(StopKind::Native), "without native fragments: a stop");
            e.fragment_for(h).expect("h translates");
            let recs = e.exit_records(h);
            // SAFETY: records of a live fragment.
            let stops: Vec<(u64, u64)> = recs.iter().map(|&r| unsafe { ((*r).target, (*r).stop) }).collect();
            assert_eq!(stops, vec![(h + 6, StopKind::Native as u64)]);
            continue;
        }
        e.fragment_for(g).expect("a native fragment");
        let (entry, body) = e.entries().into_iter().find(|_| true).expect("one fragment");
        assert!(entry <= body);
        let v = emitted(&e);
        let jmp = v.iter().find(|i| i.ip() >= body).expect("a body");
        assert_eq!((jmp.mnemonic(), jmp.near_branch_target()), (Mnemonic::Jmp, g), "the body jumps to g: {v:?}");
        assert!(!v.iter().any(|i| i.mnemonic() == Mnemonic::Mov && i.immediate32() == 9), "g was not copied");
        assert_eq!(e.stats.guest_insns, 0, "nothing of g decoded");
        e.fragment_for(h).expect("h translates");
        let recs = e.exit_records(h);
        // SAFETY: as above.
        let stops: Vec<(u64, u64)> = recs.iter().map(|&r| unsafe { ((*r).target, (*r).stop) }).collect();
        assert_eq!(stops, vec![(h + 6, 0)], "a plain exit into the region");
        // SAFETY: the record of a live fragment; linking it makes the region's fragment.
        let to = unsafe { e.take_exit(recs[0]) }.expect("the exit is taken");
        assert_eq!(Some(to), e.lookup(h + 6), "to the region's native fragment");
        assert_eq!(e.stats.links, 1, "and linked");
    }
}

/// A stand-in for the kernel's #UD handler: what WARN's does to the context (the
/// handler's own effect on rax stands for its work), then on after the `ud2`.
fn deliver_ud(kind: StopKind, pc: u64, ctx: &mut dbt::GuestCtx) -> Option<u64> {
    (kind == StopKind::Undefined).then(|| {
        ctx.gpr[dbt::GuestCtx::RAX] += 100;
        pc + 2
    })
}

/// Delivers every stop to a "handler" that lies in a native region.
fn deliver_to_native(_: StopKind, _: u64, ctx: &mut dbt::GuestCtx) -> Option<u64> {
    ctx.gpr[dbt::GuestCtx::RAX] = 7;
    Some(NATIVE_HANDLER.with(|h| h.get()))
}

thread_local!(static NATIVE_HANDLER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });

#[test]
fn the_environment_delivers_stops_it_cannot_leave_to_the_cpu() {
    // mov eax, 1; ud2; add eax, 41; ret
    let code = [0xB8, 1, 0, 0, 0, 0x0F, 0x0B, 0x83, 0xC0, 0x29, 0xC3];
    let f = page_with(&code);
    // No hook: the stop leaves at the ud2, as before.
    let mut h = Harness::new(None);
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Undefined, f + 5, 1));
    assert_eq!(h.engine.stats.delivered, 0);

    // Delivered: the context as the handler left it, and translated execution goes on
    // where it said (past the ud2) up to the sentinel.
    let mut env = HostEnv::new();
    env.deliver = Some(deliver_ud);
    let mut h = Harness::with_env(None, Config::default(), env);
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.rax), (StopKind::Sentinel, 1 + 100 + 41));
    assert_eq!(h.engine.stats.delivered, 1);
    // Again, from the cache: the block ending at the ud2 is translated once.
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.rax, h.engine.stats.delivered), (StopKind::Sentinel, 142, 2));

    // A handler in a native region: the engine leaves there (no second delivery), with
    // the rewritten context.
    let handler = page_with(&[0xC3]);
    NATIVE_HANDLER.with(|h| h.set(handler));
    let mut env = HostEnv::new();
    env.deliver = Some(deliver_to_native);
    env.native = vec![(handler, handler + 1)];
    let mut h = Harness::with_env(None, Config::default(), env);
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Native, handler, 7));
    assert_eq!(h.engine.stats.delivered, 1);
}

#[test]
fn a_ret_imm_whose_frame_would_overlap_its_return_slot_stops_before_it() {
    // mov eax, 1; ret 128: on the host the lookup frame would straddle the return slot.
    let f = page_with(&[0xB8, 1, 0, 0, 0, 0xC2, 0x80, 0x00]);
    let mut h = Harness::new(Some(Box::new(NullClient)));
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.stop_pc, r.rax), (StopKind::Unsupported, f + 5, 1));
    // `ret 8` and the other frame placements: the corpus's c_retimm.
}
