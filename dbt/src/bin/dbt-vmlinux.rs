//! A real kernel as corpus: translates every function of a `vmlinux` offline,
//! block by block, with that kernel's retpoline and return thunks, into a code
//! cache placed (fictitiously) in module space above the kernel's text.
//!
//! `dbt-vmlinux VMLINUX SYSTEM.MAP`: function starts and ends come from the
//! `T`/`t` symbols of System.map (`--no-symbols` instead: from the kernel's
//! `endbr64`s, `__fentry__` calls and call targets, for kernels shipped without symbols, see [`discover`]); every block reachable inside a function
//! from its start (branch targets, fall-throughs, the continuations of calls
//! and stops) is translated; every emitted instruction (hot code and exit
//! stubs) must decode back and map back to a native pc (`Engine::native_state`). Prints one summary line
//! `functions=N translated=M blocks=B instructions=I`, the counts by kernel
//! instruction class, and the untranslatable blocks with their reasons; exits
//! non-zero if the translator panics on any function or emits bytes that do
//! not decode.
use dbt::{Config, Engine, Env, KClass, StopKind, Thunk};
use iced_x86::{Decoder, DecoderOptions, Register};
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

/// Where the offline cache pretends to live: module space (±2 GiB of kernel text).
const CACHE_BASE: u64 = 0xffff_ffff_c000_0000;
/// Where the dispatcher entries pretend to be (just below the cache).
const ENTRIES_AT: u64 = CACHE_BASE - 0x1_0000;

struct Image {
    /// (virtual address, bytes, executable) of each loadable segment.
    segs: Vec<(u64, Vec<u8>, bool)>,
}

impl Image {
    /// The PT_LOAD segments of an ELF64 little-endian x86-64 file.
    fn parse(b: &[u8]) -> Result<Image, String> {
        let rd = |o: usize, n: usize| -> Result<u64, String> {
            let s = b.get(o..o + n).ok_or_else(|| format!("ELF truncated at {o:#x}"))?;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(s);
            Ok(u64::from_le_bytes(v))
        };
        if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
            return Err("not a 64-bit little-endian ELF file".into());
        }
        if rd(18, 2)? != 62 {
            return Err("not an x86-64 ELF file".into());
        }
        let (phoff, phentsize, phnum) = (rd(32, 8)? as usize, rd(54, 2)? as usize, rd(56, 2)? as usize);
        let mut segs = Vec::new();
        for k in 0..phnum {
            let ph = phoff + k * phentsize;
            if rd(ph, 4)? != 1 {
                continue; // not PT_LOAD
            }
            let (off, vaddr, filesz) = (rd(ph + 8, 8)? as usize, rd(ph + 16, 8)?, rd(ph + 32, 8)? as usize);
            let exec = rd(ph + 4, 4)? & 1 != 0;
            let data = b.get(off..off + filesz).ok_or("PT_LOAD segment outside the file")?;
            segs.push((vaddr, data.to_vec(), exec));
        }
        if segs.is_empty() {
            return Err("no PT_LOAD segment".into());
        }
        Ok(Image { segs })
    }

    fn read(&self, pc: u64, buf: &mut [u8]) -> usize {
        for (va, data, _) in self.segs.iter() {
            if pc >= *va && pc < va + data.len() as u64 {
                let off = (pc - va) as usize;
                let n = buf.len().min(data.len() - off);
                buf[..n].copy_from_slice(&data[off..off + n]);
                return n;
            }
        }
        0
    }
}

/// The offline environment: guest code from the image, the cache a host
/// buffer standing in for memory at `CACHE_BASE` (its writable alias).
struct OfflineEnv {
    image: std::rc::Rc<Image>,
    cache: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
    thunks: std::rc::Rc<BTreeMap<u64, Thunk>>,
    allocated: bool,
    /// Whether the dispatcher entries got their (pretend) memory.
    entries: bool,
    /// The lookup table's memory (mapped once, kept for the process).
    table: u64,
}

impl Env for OfflineEnv {
    fn alloc_code(&mut self, _near: u64, size: usize) -> Option<u64> {
        // The first allocation holds the dispatcher entries: never run here.
        if !self.entries {
            self.entries = true;
            return Some(ENTRIES_AT);
        }
        if self.allocated {
            return None;
        }
        self.allocated = true;
        self.cache.borrow_mut().resize(size, 0xCC);
        Some(CACHE_BASE)
    }
    fn read_code(&self, pc: u64, buf: &mut [u8]) -> usize {
        self.image.read(pc, buf)
    }
    fn write_code(&mut self, at: u64, bytes: &[u8]) -> bool {
        if (ENTRIES_AT..CACHE_BASE).contains(&at) {
            return true;
        }
        let mut c = self.cache.borrow_mut();
        let Some(off) = at.checked_sub(CACHE_BASE).map(|o| o as usize) else { return false };
        if off + bytes.len() > c.len() {
            return false;
        }
        c[off..off + bytes.len()].copy_from_slice(bytes);
        true
    }
    fn patch_rel32(&mut self, at: u64, rel: i32) -> bool {
        self.write_code(at, &rel.to_le_bytes())
    }
    fn thunk(&self, target: u64) -> Option<Thunk> {
        self.thunks.get(&target).copied()
    }
    fn alloc_table(&mut self, bytes: usize) -> Option<u64> {
        // Real memory (the engine fills it); in the kernel it is module data
        // in the top 2 GiB, here the low 2 GiB: the same disp32 form.
        if self.table == 0 {
            self.table = dbt::host::low_table(bytes)?;
        }
        Some(self.table)
    }
}

/// The register a `__x86_indirect_thunk_<reg>` stands for.
fn thunk_reg(name: &str) -> Option<Register> {
    use Register::*;
    Some(match name {
        "rax" => RAX,
        "rcx" => RCX,
        "rdx" => RDX,
        "rbx" => RBX,
        "rsp" => RSP,
        "rbp" => RBP,
        "rsi" => RSI,
        "rdi" => RDI,
        "r8" => R8,
        "r9" => R9,
        "r10" => R10,
        "r11" => R11,
        "r12" => R12,
        "r13" => R13,
        "r14" => R14,
        "r15" => R15,
        _ => return Option::None,
    })
}

struct Symbols {
    /// (start, end, name) of every text symbol, by address.
    funcs: Vec<(u64, u64, String)>,
    thunks: BTreeMap<u64, Thunk>,
}

/// Function starts and thunks of a kernel without symbols (Debian ships a
/// placeholder System.map). A function start is a 16-byte aligned address
/// (kernel functions are 16-byte aligned) of an executable segment holding
/// either an `endbr64` (Debian's 6.12 is built with IBT, so every function
/// whose address is taken starts with one) or the `call __fentry__` that
/// starts every ftrace-able function (Debian's 6.1 has no IBT; in the file
/// the call is still there, the kernel patches it at boot): `__fentry__` is
/// the target most 16-byte aligned direct calls share, if over a thousand do.
/// Then every direct-call target inside an executable segment starts one too.
/// A function ends at the next start. The return thunk is the most frequent
/// direct-jump target whose code starts with `ret` (the thunk is `ret` padded
/// for an alternative, then `int3`); a retpoline thunk is a call target whose
/// code is a `call` a few bytes ahead (over a speculation trap: `int3` on
/// 6.12, `pause; lfence; jmp` on 6.1) to `mov [rsp], reg`.
fn discover(image: &Image) -> Symbols {
    const ENDBR: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];
    let aligned = || {
        image.segs.iter().filter(|s| s.2).flat_map(|(va, data, _)| {
            let skip = ((16 - (va % 16)) % 16) as usize;
            (skip..data.len().saturating_sub(5)).step_by(16).map(move |off| (va + off as u64, &data[off..off + 5]))
        })
    };
    let call_target = |at: u64, b: &[u8]| {
        (b[0] == 0xE8).then(|| at.wrapping_add(5).wrapping_add(i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as u64))
    };
    let mut aligned_calls: BTreeMap<u64, u64> = BTreeMap::new();
    for (at, b) in aligned() {
        if let Some(t) = call_target(at, b) {
            *aligned_calls.entry(t).or_default() += 1;
        }
    }
    let fentry = aligned_calls.iter().max_by_key(|(_, &n)| n).filter(|(_, &n)| n > 1000).map(|(&t, _)| t);
    let mut starts = BTreeSet::new();
    for (at, b) in aligned() {
        if b[..4] == ENDBR || (fentry.is_some() && call_target(at, b) == fentry) {
            starts.insert(at);
        }
    }
    let in_text = |a: u64| image.segs.iter().any(|(va, d, x)| *x && a >= *va && a < va + d.len() as u64);
    let ends = |starts: &BTreeSet<u64>| -> Vec<(u64, u64, String)> {
        let v: Vec<u64> = starts.iter().copied().collect();
        v.iter()
            .enumerate()
            .map(|(k, &a)| {
                let end = v.get(k + 1).copied().unwrap_or(a + 4096).min(a + (1 << 16));
                (a, end, format!("fn@{a:#x}"))
            })
            .collect()
    };
    let mut buf = Vec::new();
    let mut targets = BTreeSet::new();
    for (a, end, _) in ends(&starts) {
        buf.resize((end - a) as usize, 0);
        let n = image.read(a, &mut buf);
        for i in Decoder::with_ip(64, &buf[..n], a, DecoderOptions::NONE) {
            if i.code() == iced_x86::Code::Call_rel32_64 && in_text(i.near_branch_target()) {
                targets.insert(i.near_branch_target());
            }
        }
    }
    starts.extend(targets);
    let funcs = ends(&starts);
    // Direct branch targets over every function body.
    let mut jmps: BTreeMap<u64, u64> = BTreeMap::new();
    let mut calls: BTreeSet<u64> = BTreeSet::new();
    let mut buf = Vec::new();
    for &(a, end, _) in funcs.iter() {
        buf.resize((end - a) as usize, 0);
        let n = image.read(a, &mut buf);
        for i in Decoder::with_ip(64, &buf[..n], a, DecoderOptions::NONE) {
            match i.code() {
                iced_x86::Code::Jmp_rel32_64 => *jmps.entry(i.near_branch_target()).or_default() += 1,
                iced_x86::Code::Call_rel32_64 => {
                    calls.insert(i.near_branch_target());
                }
                _ => {}
            }
        }
    }
    let mut thunks = BTreeMap::new();
    let code = |a: u64, n: usize| {
        let mut b = vec![0u8; n];
        let got = image.read(a, &mut b);
        b.truncate(got);
        b
    };
    if let Some((&t, _)) = jmps.iter().filter(|(&t, _)| code(t, 1) == [0xC3]).max_by_key(|(_, &n)| n) {
        thunks.insert(t, Thunk::Return);
    }
    for &t in calls.iter().chain(jmps.keys()) {
        let b = code(t, 32);
        if b.len() < 10 || b[0] != 0xE8 || !(1..=16).contains(&b[1]) || b[2..5] != [0, 0, 0] {
            continue;
        }
        let at = 5 + b[1] as usize;
        let Some(rest) = b.get(at..) else { continue };
        let mov = Decoder::with_ip(64, rest, t + at as u64, DecoderOptions::NONE).decode();
        if mov.code() == iced_x86::Code::Mov_rm64_r64
            && mov.memory_base() == Register::RSP
            && mov.memory_displacement64() == 0
            && mov.memory_index() == Register::None
        {
            thunks.insert(t, Thunk::Indirect(mov.op1_register()));
        }
    }
    Symbols { funcs, thunks }
}

fn parse_map(text: &str, image: &Image) -> Symbols {
    let mut all: Vec<(u64, char, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let a = u64::from_str_radix(w.next()?, 16).ok()?;
            let t = w.next()?.chars().next()?;
            Some((a, t, w.next()?))
        })
        .collect();
    all.sort_by_key(|s| s.0);
    let mut thunks = BTreeMap::new();
    for &(a, _, n) in all.iter() {
        if n == "__x86_return_thunk" {
            thunks.insert(a, Thunk::Return);
        } else if let Some(r) = n.strip_prefix("__x86_indirect_thunk_").and_then(thunk_reg) {
            thunks.insert(a, Thunk::Indirect(r));
        }
    }
    let mut funcs = Vec::new();
    for (k, &(a, t, n)) in all.iter().enumerate() {
        if !matches!(t, 'T' | 't') || image.read(a, &mut [0u8; 1]) == 0 {
            continue;
        }
        // A function ends where the next symbol at a higher address starts.
        let end = all[k + 1..].iter().map(|s| s.0).find(|&b| b > a).unwrap_or(a + 4096);
        funcs.push((a, end.min(a + (1 << 20)), n.to_string()));
    }
    funcs.dedup_by_key(|f| f.0);
    Symbols { funcs, thunks }
}

#[derive(Default)]
struct Totals {
    functions: u64,
    translated: u64,
    blocks: u64,
    instructions: u64,
    emitted: u64,
    panics: Vec<String>,
    undecodable: Vec<String>,
    /// Stops by kind: (count, first instance: function+offset and mnemonic).
    stops: BTreeMap<String, (u64, String)>,
    untranslatable: BTreeMap<String, (u64, String)>,
    kclass: [u64; KClass::COUNT],
    /// Emitted instructions whose native pc lies in the function / outside
    /// it (an exit stub's target, the continuation of a call).
    mapped_inside: u64,
    mapped_outside: u64,
    unmapped: Vec<String>,
}

fn new_engine(sym: &Symbols, image: &std::rc::Rc<Image>) -> (Engine, std::rc::Rc<std::cell::RefCell<Vec<u8>>>) {
    let cache = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let env = OfflineEnv {
        image: image.clone(),
        cache: cache.clone(),
        thunks: std::rc::Rc::new(sym.thunks.clone()),
        allocated: false,
        entries: false,
        table: 0,
    };
    // IBT: Debian's kernels are built with it (endbr64 at indirect targets).
    // The kernel ABI: no red zone.
    let cfg = Config { ibt: true, kernel: true, hot_size: 4 << 20, stub_size: 2 << 20, ..Config::default() };
    (Engine::new(Box::new(env), None, cfg).expect("an offline engine has its entries' pretend memory"), cache)
}

/// Translates every block of one function reachable from its start; returns
/// whether it translated at least its first block.
fn translate_function(
    e: &mut Engine,
    cache: &std::cell::RefCell<Vec<u8>>,
    image: &Image,
    f: &(u64, u64, String),
    t: &mut Totals,
) -> bool {
    let e_read = |pc: u64, b: &mut [u8]| image.read(pc, b);
    let (start, end, name) = f;
    let mut work = vec![*start];
    let mut seen = BTreeSet::new();
    let mut first_ok = false;
    while let Some(pc) = work.pop() {
        if pc < *start || pc >= *end || !seen.insert(pc) {
            continue;
        }
        match e.fragment_for(pc) {
            Ok(_) => {
                first_ok |= pc == *start;
                t.blocks += 1;
                let mut padding = false;
                for r in e.exit_records(pc) {
                    // SAFETY: records of a live fragment.
                    let (target, stop) = unsafe { ((*r).target, (*r).stop) };
                    if stop != 0 {
                        let k = StopKind::from_u64(stop);
                        // int3 (and undecodable bytes) in kernel text is padding, not code.
                        padding |= matches!(k, Some(StopKind::Breakpoint | StopKind::Invalid));
                        let ent = t.stops.entry(k.map(|k| format!("{k:?}")).unwrap_or_default()).or_default();
                        ent.0 += 1;
                        if ent.1.is_empty() {
                            let mut b = [0u8; 15];
                            let n = e_read(target, &mut b);
                            let i = Decoder::with_ip(64, &b[..n], target, DecoderOptions::NONE).decode();
                            ent.1 = format!("{name}+{:#x}: {:?}", target.wrapping_sub(*start), i.mnemonic());
                        }
                    } else {
                        work.push(target);
                    }
                }
                // The continuation of a call or a stop (WARN goes on after its ud2).
                if let (false, Some((_, fend))) = (padding, e.fragment_span(pc)) {
                    work.push(fend);
                }
            }
            Err(k) => {
                let ent = t.untranslatable.entry(format!("{k:?}")).or_insert((0, String::new()));
                ent.0 += 1;
                if ent.1.is_empty() {
                    ent.1 = format!("{name}+{:#x}", pc - start);
                }
            }
        }
    }
    // Every emitted instruction decodes back.
    let cache = cache.borrow();
    for (hot, len, stub, slen) in e.fragments() {
        for (at, n) in [(hot, len), (stub, slen)] {
            let off = (at - CACHE_BASE) as usize;
            let Some(bytes) = cache.get(off..off + n as usize) else {
                t.undecodable.push(format!("{name}: fragment at {at:#x} outside the cache"));
                continue;
            };
            for i in Decoder::with_ip(64, bytes, at, DecoderOptions::NONE) {
                t.emitted += 1;
                if i.is_invalid() {
                    t.undecodable.push(format!("{name}: invalid instruction at {:#x}", i.ip()));
                    break;
                }
                // Every emitted instruction maps back to a native pc: in the
                // function, or a branch target it leaves for.
                let mut regs = dbt::GuestCtx { rip: i.ip(), ..Default::default() };
                let mut stack = [0u64; 64];
                regs.gpr[dbt::GuestCtx::RSP] = stack.as_mut_ptr() as u64 + 256;
                regs.gpr[dbt::GuestCtx::RCX] = *start;
                // SAFETY: `regs` points into `stack`, readable around rsp as far
                // as any map slot reaches (lookup frames: 16 bytes).
                match unsafe { e.native_state(&mut regs) } {
                    Some(n) if n.pc >= *start && n.pc < *end => t.mapped_inside += 1,
                    Some(_) => t.mapped_outside += 1,
                    None => t.unmapped.push(format!("{name}: cache address {:#x} has no native pc", i.ip())),
                }
            }
        }
    }
    first_ok
}

/// The direct calls and jumps of the entry text (`__entry_text_start`..`_end` in the
/// map) into the rest of the text, as the kernel DBT redirects them
/// ([`dbt::entry_calls`]): the whole range must decode, and `do_syscall_64` (the
/// system-call path) must be among the targets. Prints one line.
fn entry_redirects(image: &Image, sym: &Symbols, map: &str) -> bool {
    let addr = |name: &str| {
        map.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            let a = u64::from_str_radix(w.next()?, 16).ok()?;
            (w.nth(1)? == name).then_some(a)
        })
    };
    let (Some(lo), Some(hi)) = (addr("__entry_text_start"), addr("__entry_text_end")) else {
        println!("entry text: no __entry_text_start/_end in the map");
        return false;
    };
    let mut code = vec![0u8; hi.saturating_sub(lo) as usize];
    if image.read(lo, &mut code) != code.len() {
        println!("entry text {lo:#x}..{hi:#x}: not in the image");
        return false;
    }
    let text = |t: u64| !(lo..hi).contains(&t) && !sym.thunks.contains_key(&t) && image.read(t, &mut [0u8; 1]) == 1;
    match dbt::entry_calls::direct_sites(&code, lo, text) {
        Err(pc) => {
            println!("entry text: undecodable at {pc:#x} (+{:#x})", pc - lo);
            false
        }
        Ok(sites) => {
            let targets: BTreeSet<u64> = sites.iter().map(|s| s.target).collect();
            let sys = addr("do_syscall_64");
            let found = sys.is_some_and(|a| targets.contains(&a));
            println!(
                "entry text: {} bytes, {} direct calls/jumps into the text to {} targets, do_syscall_64 among them: {}",
                code.len(),
                sites.len(),
                targets.len(),
                if found { "yes" } else { "NO" }
            );
            found
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: dbt-vmlinux VMLINUX (SYSTEM.MAP | --no-symbols)");
        return ExitCode::from(2);
    }
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let map = if args[2] == "--no-symbols" { Ok(Vec::new()) } else { read(&args[2]) };
    let (elf, map) = match (read(&args[1]), map) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let image = match Image::parse(&elf) {
        Ok(i) => std::rc::Rc::new(i),
        Err(e) => {
            eprintln!("error: {}: {e}", args[1]);
            return ExitCode::from(2);
        }
    };
    let sym = if args[2] == "--no-symbols" {
        eprintln!(
            "no symbols: function starts are the 16-byte aligned endbr64s and calls of __fentry__ of the text and the direct-call targets, thunks found by their code"
        );
        let s = discover(&image);
        for (a, t) in s.thunks.iter() {
            eprintln!("  thunk at {a:#x}: {t:?}");
        }
        s
    } else {
        parse_map(&String::from_utf8_lossy(&map), &image)
    };
    eprintln!(
        "{} functions, {} thunks (return thunk: {})",
        sym.funcs.len(),
        sym.thunks.len(),
        if sym.thunks.values().any(|t| *t == Thunk::Return) { "yes" } else { "no" }
    );
    let mut t = Totals::default();
    let (mut e, mut cache) = new_engine(&sym, &image);
    for (k, f) in sym.funcs.iter().enumerate() {
        if k % 10_000 == 0 && k > 0 {
            eprintln!("  {k} functions ...");
        }
        t.functions += 1;
        let before = e.stats;
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut tt = Totals::default();
            let ok = translate_function(&mut e, &cache, &image, f, &mut tt);
            (ok, tt)
        }));
        match ok {
            Ok((ok, tt)) => {
                t.translated += ok as u64;
                t.blocks += tt.blocks;
                t.emitted += tt.emitted;
                t.undecodable.extend(tt.undecodable);
                t.unmapped.extend(tt.unmapped);
                t.mapped_inside += tt.mapped_inside;
                t.mapped_outside += tt.mapped_outside;
                for (k, v) in tt.stops {
                    let ent = t.stops.entry(k).or_insert((0, v.1.clone()));
                    ent.0 += v.0;
                }
                for (k, v) in tt.untranslatable {
                    let ent = t.untranslatable.entry(k).or_insert((0, v.1.clone()));
                    ent.0 += v.0;
                }
                t.instructions += e.stats.guest_insns - before.guest_insns;
                for (n, (a, b)) in t.kclass.iter_mut().zip(e.stats.kclass.iter().zip(before.kclass.iter())) {
                    *n += a - b;
                }
                e.flush();
            }
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                t.panics.push(format!("{}: {}", f.2, msg.unwrap_or_default()));
                let (ne, nc) = new_engine(&sym, &image);
                e = ne;
                cache = nc;
            }
        }
    }
    println!(
        "functions={} translated={} blocks={} instructions={} emitted_instructions={}",
        t.functions, t.translated, t.blocks, t.instructions, t.emitted
    );
    println!(
        "native_state: {} emitted instructions map into their function, {} to a branch target outside it, {} unmapped",
        t.mapped_inside,
        t.mapped_outside,
        t.unmapped.len()
    );
    println!("kernel instruction classes (instructions met by the translator):");
    for c in KClass::ALL {
        println!("  {:>10}  {}", t.kclass[c as usize], c.name());
    }
    println!("stops (fragments end before the instruction; the environment runs it natively):");
    for (k, (v, first)) in t.stops.iter() {
        println!("  {v:>10}  {k} (first: {first})");
    }
    println!("untranslatable blocks:");
    if t.untranslatable.is_empty() {
        println!("  none");
    }
    for (k, (n, first)) in t.untranslatable.iter() {
        println!("  {n:>10}  {k} (first: {first})");
    }
    for p in t.panics.iter().take(20) {
        println!("PANIC {p}");
    }
    for u in t.undecodable.iter().take(20) {
        println!("UNDECODABLE {u}");
    }
    for u in t.unmapped.iter().take(20) {
        println!("UNMAPPED {u}");
    }
    let entry_ok = if args[2] == "--no-symbols" {
        println!("entry text: no symbols, not checked");
        true
    } else {
        entry_redirects(&image, &sym, &String::from_utf8_lossy(&map))
    };
    if t.panics.is_empty() && t.undecodable.is_empty() && t.unmapped.is_empty() && t.translated > 0 && entry_ok {
        ExitCode::SUCCESS
    } else {
        println!(
            "FAILED: {} panics, {} undecodable fragments, {} unmapped instructions{}",
            t.panics.len(),
            t.undecodable.len(),
            t.unmapped.len(),
            if entry_ok { "" } else { ", entry text not redirectable" }
        );
        ExitCode::FAILURE
    }
}
