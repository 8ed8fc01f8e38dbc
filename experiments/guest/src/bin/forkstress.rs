//! Fork-heavy stress with verified results: each of W workers (processes) forks N children,
//! one after another. A child writes its own pattern over part of a copy-on-write copy of
//! its worker's 64 KB buffer, checks that the rest still holds the worker's bytes, and
//! exits with a status computed from what it read; the worker checks every child's status
//! against the value it computes itself, and that its own buffer did not change (the
//! children's writes must stay private). One line per worker and a total; the output is a
//! function of W, N and the seed only, so it must be byte-identical natively and under kdbt.
//! Usage: forkstress [--workers W] [--forks N] [--seed S]
use std::process::exit;

const BUF: usize = 64 * 1024;

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn die(msg: &str) -> ! {
    eprintln!("forkstress: {msg}");
    exit(2)
}

/// The worker's buffer: bytes from its seed.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..BUF)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Which bytes child `k` overwrites, and with what: a page-sized window that moves with k.
fn window(k: u64) -> (usize, u8) {
    (((k * 4099) as usize) % (BUF - 4096), (k as u8).wrapping_mul(37) | 1)
}

/// The exit status child `k` must give: from the bytes it keeps and those it wrote.
fn expected(buf: &[u8], k: u64) -> i32 {
    let (at, v) = window(k);
    let mut c = buf.to_vec();
    c[at..at + 4096].fill(v);
    (fnv(0xcbf2_9ce4_8422_2325 ^ k, &c) % 200) as i32 + 1
}

fn child(buf: &mut [u8], k: u64) -> ! {
    let (at, v) = window(k);
    buf[at..at + 4096].fill(v);
    let s = (fnv(0xcbf2_9ce4_8422_2325 ^ k, buf) % 200) as i32 + 1;
    // SAFETY: _exit in the child (no atexit handlers, no stdio flush of the parent's buffers).
    unsafe { libc::_exit(s) }
}

fn worker(w: u64, forks: u64, seed: u64) -> (u64, u64) {
    let mut buf = pattern(seed.wrapping_add(w));
    let before = fnv(0xcbf2_9ce4_8422_2325, &buf);
    let mut sum = 0u64;
    let mut bad = 0u64;
    for k in 0..forks {
        let want = expected(&buf, k);
        // SAFETY: fork in a single-threaded process; the child only touches its own copy
        // of `buf` and then calls _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            die(&format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            child(&mut buf, k);
        }
        let mut st = 0;
        // SAFETY: waiting for the child just forked.
        if unsafe { libc::waitpid(pid, &mut st, 0) } != pid {
            die(&format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        let got = if libc::WIFEXITED(st) { libc::WEXITSTATUS(st) } else { -1 };
        if got != want {
            bad += 1;
            eprintln!("forkstress: worker {w} child {k}: status {got} (raw {st:#x}), want {want}");
        }
        sum = sum.wrapping_mul(31).wrapping_add(got as u64);
    }
    if fnv(0xcbf2_9ce4_8422_2325, &buf) != before {
        bad += 1;
        eprintln!("forkstress: worker {w}: its buffer changed (a child's write leaked)");
    }
    (sum, bad)
}

fn main() {
    let (mut workers, mut forks, mut seed) = (2u64, 100u64, 1u64);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val =
            || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| die(&format!("{a} needs a number")));
        match a.as_str() {
            "--workers" => workers = val(),
            "--forks" => forks = val(),
            "--seed" => seed = val(),
            _ => die("usage: forkstress [--workers W] [--forks N] [--seed S]"),
        }
    }
    if workers == 0 || workers > 64 {
        die("--workers must be 1..64");
    }
    // Each worker is a process of its own; it reports through a pipe.
    let mut kids = Vec::new();
    for w in 0..workers {
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe into a local array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            die(&format!("pipe: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fork before any thread exists.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            die(&format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            let (sum, bad) = worker(w, forks, seed);
            let line = format!("worker={w} forks={forks} sum={sum:016x} errors={bad}\n");
            // SAFETY: writing our own bytes to the pipe's write end, then _exit.
            unsafe {
                libc::write(fds[1], line.as_ptr().cast(), line.len());
                libc::_exit(if bad == 0 { 0 } else { 1 })
            }
        }
        // SAFETY: the parent's copy of the write end.
        unsafe { libc::close(fds[1]) };
        kids.push((pid, fds[0]));
    }
    let mut total_bad = 0;
    for (pid, fd) in kids {
        let mut out = Vec::new();
        let mut b = [0u8; 256];
        loop {
            // SAFETY: reading into a local buffer from our pipe end.
            let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&b[..n as usize]);
        }
        let mut st = 0;
        // SAFETY: waiting for our own worker.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) || out.is_empty() {
            total_bad += 1;
        }
        print!("{}", String::from_utf8_lossy(&out));
    }
    println!("workers={workers} forks={} errors={total_bad}", workers * forks);
    exit(if total_bad == 0 { 0 } else { 1 });
}
