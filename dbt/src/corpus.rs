//! Corpus of real code run under the DBT by the tests and the benchmark.
//! Every case has the signature `extern "C" fn(buf: *mut u8, n: u64) -> u64`:
//! it may write to `buf` (`BUF_LEN` bytes, compared between native and
//! translated runs) and returns a checksum of its work.

use std::boxed::Box;
use std::vec::Vec;

pub const BUF_LEN: usize = 1 << 16;

pub type CaseFn = extern "C" fn(*mut u8, u64) -> u64;

pub struct Case {
    pub name: &'static str,
    pub f: CaseFn,
    /// Size parameter for tests (small: the inscount test single-steps
    /// every case with ptrace).
    pub test_n: u64,
    /// Size parameter for the benchmark.
    pub bench_n: u64,
}

extern "C" {
    fn c_switch(n: u64) -> u64;
    fn c_setjmp(n: u64) -> u64;
    fn c_varargs(n: u64) -> u64;
    fn c_qsort(buf: *mut u32, n: u64) -> u64;
    fn c_repmovs(dst: *mut u8, src: *const u8, n: u64) -> u64;
    fn c_simd(a: *const f32, b: *const f32, out: *mut f32, n: u64) -> u64;
    fn c_fnptr(n: u64) -> u64;
    fn c_getpc() -> u64;
    fn c_loop(n: u64) -> u64;
    fn c_tailcall(n: u64) -> u64;
    fn c_retimm(n: u64) -> u64;
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn out<'a>(buf: *mut u8) -> &'a mut [u8] {
    // SAFETY: every caller passes a BUF_LEN-byte buffer it owns.
    unsafe { core::slice::from_raw_parts_mut(buf, BUF_LEN) }
}

#[inline(never)]
extern "C" fn r_loops(buf: *mut u8, n: u64) -> u64 {
    let b = out(buf);
    let mut acc = 0u64;
    for i in 0..n {
        for j in 0..16u64 {
            acc = acc.wrapping_mul(6364136223846793005).wrapping_add(i ^ j);
            if acc & 1 == 0 {
                acc = acc.rotate_left(7);
            }
        }
        b[(i as usize) % BUF_LEN] = acc as u8;
    }
    acc
}

#[inline(never)]
fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1).wrapping_add(fib(n - 2))
    }
}

#[inline(never)]
extern "C" fn r_recursion(_buf: *mut u8, n: u64) -> u64 {
    fib(core::hint::black_box(n))
}

trait Shape {
    fn area(&self) -> u64;
    fn grow(&mut self, k: u64);
}
struct Sq(u64);
struct Rect(u64, u64);
struct Tri(u64, u64);
impl Shape for Sq {
    fn area(&self) -> u64 {
        self.0 * self.0
    }
    fn grow(&mut self, k: u64) {
        self.0 = self.0.wrapping_add(k) % 1000;
    }
}
impl Shape for Rect {
    fn area(&self) -> u64 {
        self.0 * self.1
    }
    fn grow(&mut self, k: u64) {
        self.1 = (self.1 + k) % 777;
    }
}
impl Shape for Tri {
    fn area(&self) -> u64 {
        self.0 * self.1 / 2
    }
    fn grow(&mut self, k: u64) {
        self.0 = (self.0 ^ k) % 555;
    }
}

#[inline(never)]
extern "C" fn r_dyn(_buf: *mut u8, n: u64) -> u64 {
    let mut shapes: Vec<Box<dyn Shape>> = Vec::new();
    for i in 0..8u64 {
        match i % 3 {
            0 => shapes.push(Box::new(Sq(i + 1))),
            1 => shapes.push(Box::new(Rect(i, i + 2))),
            _ => shapes.push(Box::new(Tri(i + 3, i))),
        }
    }
    let mut acc = 0u64;
    for r in 0..n {
        for s in shapes.iter_mut() {
            s.grow(r);
            acc = acc.wrapping_add(core::hint::black_box(&**s).area());
        }
    }
    acc
}

#[inline(never)]
extern "C" fn r_sha2(buf: *mut u8, n: u64) -> u64 {
    use sha2::Digest;
    let mut data = [0u8; 1024];
    let mut s = 0x1234_5678u64;
    for d in data.iter_mut() {
        *d = xorshift(&mut s) as u8;
    }
    let mut h = sha2::Sha256::new();
    for _ in 0..n {
        h.update(data);
    }
    let d = h.finalize();
    out(buf)[..32].copy_from_slice(&d);
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[inline(never)]
extern "C" fn r_crc32(_buf: *mut u8, n: u64) -> u64 {
    let mut data = [0u8; 1024];
    let mut s = 0x9e37_79b9u64;
    for d in data.iter_mut() {
        *d = xorshift(&mut s) as u8;
    }
    let mut h = crc32fast::Hasher::new();
    for _ in 0..n {
        h.update(&data);
    }
    h.finalize() as u64
}

#[inline(never)]
extern "C" fn r_miniz(buf: *mut u8, n: u64) -> u64 {
    let mut data = Vec::with_capacity(n as usize);
    let mut s = 0x5151u64;
    for i in 0..n {
        let r = xorshift(&mut s);
        data.push(if r.is_multiple_of(4) { (r >> 8) as u8 } else { b"abcdefgh"[(i % 8) as usize] });
    }
    let c = miniz_oxide::deflate::compress_to_vec(&data, 6);
    let d = miniz_oxide::inflate::decompress_to_vec(&c).unwrap_or_default();
    let o = out(buf);
    let k = c.len().min(BUF_LEN);
    o[..k].copy_from_slice(&c[..k]);
    (c.len() as u64) << 32 | (d == data) as u64
}

#[inline(never)]
extern "C" fn r_regex(_buf: *mut u8, n: u64) -> u64 {
    let Ok(re) = regex::Regex::new(r"([a-z]+)@([a-z]+)\.(com|org)") else {
        return u64::MAX;
    };
    let mut text = std::string::String::new();
    let names = ["alice", "bob", "carol", "dave"];
    for i in 0..n {
        text.push_str(names[(i % 4) as usize]);
        text.push_str(if i % 3 == 0 { "@example.com " } else { " at nowhere; " });
    }
    let mut acc = 0u64;
    for c in re.captures_iter(&text) {
        acc = acc.wrapping_mul(31).wrapping_add(c.get(1).map_or(0, |m| m.len() as u64));
    }
    acc
}

#[inline(never)]
extern "C" fn k_switch(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_switch(n) }
}
#[inline(never)]
extern "C" fn k_setjmp(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function (setjmp/longjmp stay inside C).
    unsafe { c_setjmp(n) }
}
#[inline(never)]
extern "C" fn k_varargs(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_varargs(n) }
}
#[inline(never)]
extern "C" fn k_qsort(buf: *mut u8, n: u64) -> u64 {
    let n = n.min((BUF_LEN / 4) as u64);
    let mut s = 77u64;
    let p = buf as *mut u32;
    for i in 0..n as usize {
        // SAFETY: i < BUF_LEN/4.
        unsafe { *p.add(i) = xorshift(&mut s) as u32 };
    }
    // SAFETY: p has n u32s.
    unsafe { c_qsort(p, n) }
}
#[inline(never)]
extern "C" fn k_repmovs(buf: *mut u8, n: u64) -> u64 {
    // n bytes, in passes of at most BUF_LEN / 2.
    let passes = (n / (BUF_LEN / 2) as u64).max(1);
    let n = n.min((BUF_LEN / 2) as u64);
    let mut s = 3u64;
    for i in 0..n as usize {
        // SAFETY: i < BUF_LEN/2.
        unsafe { *buf.add(BUF_LEN / 2 + i) = (xorshift(&mut s) % 90) as u8 };
    }
    let mut acc = 0u64;
    for _ in 0..passes {
        // SAFETY: dst = buf[0..n), src = buf[BUF_LEN/2..+n).
        acc = acc.wrapping_mul(31).wrapping_add(unsafe { c_repmovs(buf, buf.add(BUF_LEN / 2), n) });
    }
    acc
}
#[inline(never)]
extern "C" fn k_simd(buf: *mut u8, n: u64) -> u64 {
    // n elements, in passes of at most 1024.
    let passes = (n / 1024).max(1);
    let n = n.min(1024) as usize;
    let mut a = [0f32; 1024];
    let mut b = [0f32; 1024];
    for i in 0..n {
        a[i] = i as f32 * 0.5;
        b[i] = (n - i) as f32 * 0.25;
    }
    let mut acc = 0u64;
    for _ in 0..passes {
        // SAFETY: buf holds 1024 f32s; the case exists only where the CPU has
        // avx2 (`cases`).
        acc = acc.wrapping_mul(31).wrapping_add(unsafe { c_simd(a.as_ptr(), b.as_ptr(), buf as *mut f32, n as u64) });
    }
    acc
}
#[inline(never)]
extern "C" fn k_fnptr(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_fnptr(n) }
}
#[inline(never)]
extern "C" fn k_getpc(_b: *mut u8, _n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_getpc() }
}
#[inline(never)]
extern "C" fn k_loop(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_loop(n) }
}
#[inline(never)]
extern "C" fn k_tailcall(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: plain C function.
    unsafe { c_tailcall(n) }
}

#[inline(never)]
extern "C" fn k_retimm(_b: *mut u8, n: u64) -> u64 {
    // SAFETY: an assembly function of the C corpus with the C calling convention.
    unsafe { c_retimm(n) }
}

impl Case {
    /// Entry address of the case's function.
    pub fn addr(&self) -> u64 {
        self.f as usize as u64
    }
}

pub fn cases() -> Vec<Case> {
    let mut v = std::vec![
        Case { name: "loops", f: r_loops, test_n: 40, bench_n: 2_000_000 },
        Case { name: "recursion", f: r_recursion, test_n: 12, bench_n: 32 },
        Case { name: "dyn_dispatch", f: r_dyn, test_n: 20, bench_n: 2_000_000 },
        Case { name: "sha2", f: r_sha2, test_n: 1, bench_n: 20_000 },
        Case { name: "crc32fast", f: r_crc32, test_n: 1, bench_n: 100_000 },
        Case { name: "miniz_oxide", f: r_miniz, test_n: 120, bench_n: 2_000_000 },
        Case { name: "regex", f: r_regex, test_n: 8, bench_n: 200_000 },
        Case { name: "c_switch", f: k_switch, test_n: 200, bench_n: 20_000_000 },
        Case { name: "c_setjmp", f: k_setjmp, test_n: 20, bench_n: 2_000_000 },
        Case { name: "c_varargs", f: k_varargs, test_n: 20, bench_n: 5_000_000 },
        Case { name: "c_qsort", f: k_qsort, test_n: 100, bench_n: 16384 },
        Case { name: "c_repmovs", f: k_repmovs, test_n: 1000, bench_n: 32768 * 2000 },
        Case { name: "c_fnptr", f: k_fnptr, test_n: 100, bench_n: 20_000_000 },
        Case { name: "c_getpc", f: k_getpc, test_n: 1, bench_n: 1 },
        Case { name: "c_loop", f: k_loop, test_n: 100, bench_n: 100_000_000 },
        Case { name: "c_tailcall", f: k_tailcall, test_n: 100, bench_n: 20_000_000 },
        Case { name: "c_retimm", f: k_retimm, test_n: 4, bench_n: 2_000_000 },
    ];
    if std::is_x86_feature_detected!("avx2") {
        v.push(Case { name: "c_simd_avx2", f: k_simd, test_n: 200, bench_n: 1024 * 50_000 });
    }
    v
}
