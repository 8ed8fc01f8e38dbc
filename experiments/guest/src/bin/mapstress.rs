//! Changes mappings hard and checks every byte read back: anonymous and file-backed
//! mmap/munmap, mprotect, fork with copy-on-write in both directions, madvise(DONTNEED)
//! (anonymous pages read as zero afterwards; a shared file mapping reads the file again;
//! skipped, and said so, on kernels without madvise).
//! Deterministic (seeded PRNG): the output must be byte-identical natively and under kdbt.
//! Usage: mapstress [--n ROUNDS] [--seed S] [--dir DIR]
use std::io::{Read, Write};

const PAGE: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn die(msg: &str) -> ! {
    eprintln!("mapstress: {msg}");
    std::process::exit(2)
}

fn map(len: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: a fresh mapping chosen by the kernel; the result is checked.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        die(&format!("mmap {len}: {}", std::io::Error::last_os_error()));
    }
    p.cast()
}

/// madvise(DONTNEED); false if the kernel has no madvise (tinyconfig kernels lack
/// CONFIG_ADVISE_SYSCALLS: ENOSYS), any other failure ends the program.
fn dontneed(p: *mut u8, len: usize) -> bool {
    // SAFETY: the caller passes a page-aligned range of its own mapping.
    if unsafe { libc::madvise(p.cast(), len, libc::MADV_DONTNEED) } == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSYS) {
        return false;
    }
    die(&format!("madvise: {e}"))
}

fn check(rc: i32, what: &str) {
    if rc != 0 {
        die(&format!("{what}: {}", std::io::Error::last_os_error()));
    }
}

/// Fills `s` from the PRNG.
fn fill(rng: &mut Rng, s: &mut [u8]) {
    for c in s.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn main() {
    let mut n: u64 = 20;
    let mut seed: u64 = 0x6b64_6274;
    let mut dir = String::from("/tmp");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--n", Some(v)) => n = v.parse().unwrap_or_else(|_| die("--n takes a number")),
            ("--seed", Some(v)) => seed = v.parse().unwrap_or_else(|_| die("--seed takes a number")),
            ("--dir", Some(v)) => dir = v.clone(),
            _ => die("usage: mapstress [--n ROUNDS] [--seed S] [--dir DIR]"),
        }
    }
    let mut rng = Rng(seed | 1);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut errors = 0u64;
    let mut no_madvise = false;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    for round in 0..n {
        // --- anonymous: fill, mprotect read-only and back, fork (COW both ways), DONTNEED.
        let pages = 1 + rng.below(48) as usize;
        let len = pages * PAGE;
        let p = map(len, rw, anon, -1);
        // SAFETY: `p` maps `len` bytes read/write.
        let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
        fill(&mut rng, s);
        let want = s.to_vec();
        // SAFETY: our mapping.
        check(unsafe { libc::mprotect(p.cast(), len, libc::PROT_READ) }, "mprotect r");
        errors += (s != want.as_slice()) as u64;
        h = fnv(h, s);
        // SAFETY: our mapping.
        check(unsafe { libc::mprotect(p.cast(), len, rw) }, "mprotect rw");
        let mut fds = [0i32; 2];
        // SAFETY: a pipe for the child's checksum.
        check(unsafe { libc::pipe(fds.as_mut_ptr()) }, "pipe");
        let child_seed = rng.next();
        // SAFETY: fork in a single-threaded program; the child only computes, writes to
        // the pipe and _exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            die("fork");
        }
        if pid == 0 {
            // Child: overwrite every other page (COW copies), check the rest is the
            // parent's, send a checksum of its view.
            let mut r = Rng(child_seed | 1);
            for pg in (0..pages).step_by(2) {
                fill(&mut r, &mut s[pg * PAGE..(pg + 1) * PAGE]);
            }
            let mut bad = 0u8;
            for pg in (1..pages).step_by(2) {
                bad |= (s[pg * PAGE..(pg + 1) * PAGE] != want[pg * PAGE..(pg + 1) * PAGE]) as u8;
            }
            let mut msg = fnv(0xcbf2_9ce4_8422_2325, s).to_le_bytes().to_vec();
            msg.push(bad);
            // SAFETY: writing our buffer to the pipe, then leaving without unwinding.
            unsafe {
                libc::write(fds[1], msg.as_ptr().cast(), msg.len());
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        // Parent: write the odd pages meanwhile (COW copies on its side).
        let mut r2 = Rng(child_seed ^ 0x55);
        for pg in (1..pages).step_by(2) {
            fill(&mut r2, &mut s[pg * PAGE..(pg + 1) * PAGE]);
        }
        let mut msg = [0u8; 9];
        // SAFETY: reading into our buffer; the child wrote 9 bytes.
        let got = unsafe { libc::read(fds[0], msg.as_mut_ptr().cast(), 9) };
        // SAFETY: closing the read end; reaping the child.
        unsafe {
            libc::close(fds[0]);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
        errors += (got != 9 || msg[8] != 0) as u64;
        h = fnv(h, &msg[..8]);
        // The even pages must still be the parent's own (the child's writes were copies).
        for pg in (0..pages).step_by(2) {
            errors += (s[pg * PAGE..(pg + 1) * PAGE] != want[pg * PAGE..(pg + 1) * PAGE]) as u64;
        }
        h = fnv(h, s);
        // DONTNEED a random range: it reads as zeros, the rest is unchanged.
        let a = rng.below(pages as u64) as usize;
        let b = a + 1 + rng.below((pages - a) as u64) as usize;
        // SAFETY: a page-aligned range inside our mapping.
        if dontneed(unsafe { p.add(a * PAGE) }, (b - a) * PAGE) {
            errors += s[a * PAGE..b * PAGE].iter().any(|&c| c != 0) as u64;
        } else {
            no_madvise = true;
        }
        h = fnv(h, s);
        // Unmap a random prefix, then the rest.
        let cut = rng.below(pages as u64) as usize;
        // SAFETY: page-aligned pieces of our mapping, not used afterwards.
        unsafe {
            if cut > 0 {
                check(libc::munmap(p.cast(), cut * PAGE), "munmap");
            }
            check(libc::munmap(p.add(cut * PAGE).cast(), len - cut * PAGE), "munmap");
        }

        // --- file-backed: shared mapping written, unmapped, mapped again and read; a
        // private mapping's writes stay private; DONTNEED on the shared one rereads the file.
        let path = format!("{dir}/kdbt-mapstress.{round}");
        let fpages = 1 + rng.below(16) as usize;
        let flen = fpages * PAGE;
        let mut data = vec![0u8; flen];
        fill(&mut rng, &mut data);
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
        f.write_all(&vec![0u8; flen]).unwrap_or_else(|e| die(&format!("{path}: {e}")));
        drop(f);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap_or_else(|e| die(&format!("{e}")));
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let q = map(flen, rw, libc::MAP_SHARED, fd);
        // SAFETY: `q` maps `flen` bytes of the file read/write.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), q, flen) };
        // SAFETY: our mapping.
        unsafe {
            check(libc::msync(q.cast(), flen, libc::MS_SYNC), "msync");
            check(libc::munmap(q.cast(), flen), "munmap file");
        }
        let q = map(flen, libc::PROT_READ, libc::MAP_SHARED, fd);
        // SAFETY: `q` maps `flen` readable bytes.
        let qs = unsafe { std::slice::from_raw_parts(q, flen) };
        errors += (qs != data.as_slice()) as u64;
        // Shared file pages come back from the file.
        no_madvise |= !dontneed(q, flen);
        errors += (qs != data.as_slice()) as u64;
        h = fnv(h, qs);
        let pv = map(flen, rw, libc::MAP_PRIVATE, fd);
        // SAFETY: `pv` maps `flen` bytes read/write, private.
        let ps = unsafe { std::slice::from_raw_parts_mut(pv, flen) };
        let k = rng.below(flen as u64) as usize;
        ps[k] ^= 0xff;
        errors += (qs != data.as_slice() || ps[k] == data[k]) as u64;
        h = fnv(h, ps);
        // SAFETY: our mappings, not used afterwards.
        unsafe {
            check(libc::munmap(pv.cast(), flen), "munmap private");
            check(libc::munmap(q.cast(), flen), "munmap shared");
        }
        let mut back = Vec::new();
        std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut back)).unwrap_or_else(|e| die(&format!("{e}")));
        errors += (back != data) as u64;
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
    let madv = if no_madvise { " madvise=absent" } else { "" };
    println!("mapstress rounds={n} fnv1a={h:016x} errors={errors}{madv}");
    if errors != 0 {
        std::process::exit(1);
    }
}
