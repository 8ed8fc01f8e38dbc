//! Arbitrary bytes as guest code: translation must never panic, and every
//! emitted fragment (hot code and exit stubs) must decode back to valid
//! instructions.
#![no_main]
use dbt::client::MemTrace;
use dbt::{Config, Engine, Env, InsCount};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

struct FuzzEnv {
    guest_base: u64,
    code: std::rc::Rc<Vec<u8>>,
    cache: std::rc::Rc<RefCell<Vec<u8>>>,
    used: bool,
    entries: bool,
}

/// Where the fuzz environment pretends the dispatcher entries are.
const ENTRIES_AT: u64 = 0x1000_0000;

impl Env for FuzzEnv {
    fn alloc_code(&mut self, _near: u64, size: usize) -> Option<u64> {
        // The first allocation holds the dispatcher entries: never run here.
        if !self.entries {
            self.entries = true;
            return Some(ENTRIES_AT);
        }
        if self.used || size > self.cache.borrow().len() {
            return None;
        }
        self.used = true;
        Some(self.cache.borrow_mut().as_mut_ptr() as u64)
    }
    fn read_code(&self, pc: u64, buf: &mut [u8]) -> usize {
        let Some(off) = pc.checked_sub(self.guest_base) else { return 0 };
        let off = off as usize;
        if off >= self.code.len() {
            return 0;
        }
        let n = buf.len().min(self.code.len() - off);
        buf[..n].copy_from_slice(&self.code[off..off + n]);
        n
    }
    fn write_code(&mut self, at: u64, bytes: &[u8]) -> bool {
        if (ENTRIES_AT..ENTRIES_AT + 4096).contains(&at) {
            return true;
        }
        let mut c = self.cache.borrow_mut();
        let Some(off) = at.checked_sub(c.as_ptr() as u64) else { return false };
        let off = off as usize;
        if off + bytes.len() > c.len() {
            return false;
        }
        c[off..off + bytes.len()].copy_from_slice(bytes);
        true
    }
    fn patch_rel32(&mut self, at: u64, rel: i32) -> bool {
        self.write_code(at, &rel.to_le_bytes())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cfg = Config {
        hot_size: 1 << 20,
        stub_size: 1 << 19,
        ibt: data[0] & 4 != 0,
        cached_returns: data[0] & 8 != 0,
        ..Config::default()
    };
    let cache = std::rc::Rc::new(RefCell::new(vec![0u8; (cfg.hot_size + cfg.stub_size) as usize]));
    // Pretend the guest code sits right after the cache (within reach).
    let guest_base = cache.borrow().as_ptr() as u64 + cfg.hot_size + cfg.stub_size + 4096;
    let env = FuzzEnv { guest_base, code: std::rc::Rc::new(data.to_vec()), cache: cache.clone(), used: false, entries: false };
    let client: Box<dyn dbt::Client> = match data[0] % 3 {
        0 => Box::new(InsCount),
        1 => Box::new(MemTrace::new(8)),
        _ => Box::new(dbt::NullClient),
    };
    let Ok(mut e) = Engine::new(Box::new(env), Some(client), cfg) else { return };
    for start in [0usize, 1, data.len() / 2, data.len().saturating_sub(1)] {
        let _ = e.fragment_for(guest_base + start as u64);
    }
    for (entry, code_len, stub, stub_len) in e.fragments() {
        for (a, l) in [(entry, code_len), (stub, stub_len)] {
            // SAFETY: fragment memory lies inside `cache`, which we own.
            let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, l as usize) };
            let mut d = iced_x86::Decoder::with_ip(64, bytes, a, 0);
            // Exactly the emitted instructions: every one must decode.
            while d.can_decode() {
                let i = d.decode();
                assert!(!i.is_invalid(), "invalid emitted instruction at {:#x}", i.ip());
            }
        }
    }
});
