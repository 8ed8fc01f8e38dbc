//! Microbenchmarks in RDTSC ticks per operation: getppid, fork+exit(+wait), exec of a
//! static binary, a page fault (first touch of an anonymous page), and CPUID (which always
//! exits under VT-x: loaded minus unloaded is the cost of one VM exit and re-entry).
//! Usage: ubench [--iters N] [--reps R] [--exec PATH] [--only NAME]. Each benchmark runs R
//! times (default 5); it prints the fastest repetition and the slowest, one line each:
//! `ubench name=<bench> ops=<n> ticks_per_op=<min> max_ticks_per_op=<max> reps=<R>`.
//!
//! The paging benchmarks run only when named with `--only` (`cargo xtask bench paging`):
//! `mmap_munmap` (map one anonymous page, touch it, unmap it), `pipe_pingpong` (one byte
//! there and back between two processes pinned to one CPU: two context switches per op),
//! `tlb_walk` (random reads, one per 4 KB page, over a 64 MB array with transparent huge
//! pages refused) and `macro` (a busybox shell script of pipelines: fork, exec, pipes, page
//! faults and exits, as in a build).
//! `file_read` (only with `--only`, `cargo xtask bench kernel-dbt`) opens a file, reads it to
//! the end and closes it (`--file PATH`, default `/proc/kdbt_testmod`: the test module's
//! code runs in the reader's context).
//! With `UBENCH_STATUS_DIR=DIR` set, `kdbt status --summary` is saved to DIR/before and
//! DIR/after around the repetitions of each benchmark (use it with one `--only` benchmark).
use kdbt_guest::rdtsc;

fn main() {
    let mut iters: u64 = 2000;
    let mut exec_path = String::from("/bin/true");
    let mut only: Option<String> = None;
    let mut reps: u32 = 5;
    let mut file = String::from("/proc/kdbt_testmod");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--iters", Some(v)) => iters = v.parse().unwrap_or_else(|_| die("--iters takes a number")),
            ("--exec", Some(v)) => exec_path = v.clone(),
            ("--file", Some(v)) => file = v.clone(),
            ("--reps", Some(v)) => {
                reps = v.parse().ok().filter(|&r| r > 0).unwrap_or_else(|| die("--reps takes a number > 0"))
            }
            ("--only", Some(v)) if DEFAULT.contains(&v.as_str()) || PAGING.contains(&v.as_str()) || v == "file_read" => {
                only = Some(v.clone())
            }
            _ => die("usage: ubench [--iters N] [--reps R] [--exec PATH] [--file PATH] [--only getppid|fork_exit|exec|page_fault|cpuid|mmap_munmap|pipe_pingpong|tlb_walk|macro|file_read]"),
        }
    }
    if only.as_deref() == Some("file_read") {
        file_read(reps, iters, &file);
        return;
    }
    if let Some(o) = only.as_deref().filter(|o| PAGING.contains(o)) {
        match o {
            "mmap_munmap" => mmap_munmap(reps, iters),
            "pipe_pingpong" => pipe_pingpong(reps, iters),
            "tlb_walk" => tlb_walk(reps, iters),
            _ => macro_script(reps, iters),
        }
        return;
    }
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("getppid") {
        report(reps, "getppid", iters * 10, || {
            // SAFETY: getppid has no side effects.
            unsafe { libc::getppid() };
        });
    }
    if run("cpuid") {
        report(reps, "cpuid", iters, || {
            // Leaf 0: a cheap leaf on every CPU (the value is not used).
            core::hint::black_box(core::arch::x86_64::__cpuid(0));
        });
    }
    if run("fork_exit") {
        report(reps, "fork_exit", iters / 10, || {
            kdbt_guest::fork_exit_wait(0);
        });
    }
    let path = std::ffi::CString::new(exec_path).unwrap_or_else(|_| die("bad --exec path"));
    if run("exec") {
        report(reps, "exec", iters / 20, || {
            kdbt_guest::fork_exec_wait(&path);
        });
    }
    if !run("page_fault") {
        return;
    }
    let pages = iters as usize * reps as usize;
    // SAFETY: a private anonymous mapping of `pages` pages, unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        die("mmap failed");
    }
    let mut page = 0usize;
    report(reps, "page_fault", iters, || {
        // SAFETY: `page` < `pages`, so the write is inside the mapping.
        unsafe { (mem as *mut u8).add(page * 4096).write_volatile(1) };
        page += 1;
    });
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(mem, pages * 4096) };
}

/// The benchmarks a run without `--only` does.
const DEFAULT: [&str; 5] = ["getppid", "fork_exit", "exec", "page_fault", "cpuid"];
/// The paging benchmarks: only with `--only`.
const PAGING: [&str; 4] = ["mmap_munmap", "pipe_pingpong", "tlb_walk", "macro"];

/// Opens `path`, reads it to the end and closes it, `iters` times per repetition; the bytes
/// read must be the same every time (a changed or short read stops the benchmark).
fn file_read(reps: u32, iters: u64, path: &str) {
    use std::io::Read;
    let read = || {
        let mut v = Vec::with_capacity(4096);
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut v))
            .unwrap_or_else(|e| die(&format!("cannot read {path}: {e}")));
        v
    };
    let first = read();
    report(reps, "file_read", iters, || {
        if read() != first {
            die(&format!("{path} read differently"));
        }
    });
}

/// Maps one private anonymous page, writes it (a page fault) and unmaps it (a TLB flush of
/// that page), `iters` times per repetition.
fn mmap_munmap(reps: u32, iters: u64) {
    report(reps, "mmap_munmap", iters, || {
        // SAFETY: a fresh private anonymous mapping of one page, written inside its bounds
        // and unmapped before the next operation.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                die("mmap failed");
            }
            (p as *mut u8).write_volatile(1);
            if libc::munmap(p, 4096) != 0 {
                die("munmap failed");
            }
        }
    });
}

/// One byte to a child and back through two pipes; parent and child are pinned to the same
/// CPU, so every op is two context switches (two address-space switches). No sleeps: the
/// child exits when the parent closes its end.
fn pipe_pingpong(reps: u32, iters: u64) {
    if let Err(e) = kdbt_guest::pin_to_cpu(0) {
        die(&format!("pin to cpu 0: {e}"));
    }
    let (mut to_child, mut to_parent) = ([0i32; 2], [0i32; 2]);
    // SAFETY: pipe() writes two descriptors into each array.
    if unsafe { libc::pipe(to_child.as_mut_ptr()) } != 0 || unsafe { libc::pipe(to_parent.as_mut_ptr()) } != 0 {
        die("pipe failed");
    }
    // SAFETY: the child only reads, writes and exits (it inherits the CPU pinning); the
    // parent reaps it below.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        die("fork failed");
    }
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: one-byte reads and writes on the child's ends of the pipes, then _exit.
        unsafe {
            libc::close(to_child[1]);
            libc::close(to_parent[0]);
            while libc::read(to_child[0], (&mut b as *mut u8).cast(), 1) == 1 {
                if libc::write(to_parent[1], (&b as *const u8).cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing the parent's copies of the child's ends.
    unsafe {
        libc::close(to_child[0]);
        libc::close(to_parent[1]);
    }
    let mut b = 0u8;
    report(reps, "pipe_pingpong", iters, || {
        // SAFETY: one-byte write and read on the parent's ends of the pipes.
        let ok = unsafe {
            libc::write(to_child[1], (&b as *const u8).cast(), 1) == 1
                && libc::read(to_parent[0], (&mut b as *mut u8).cast(), 1) == 1
        };
        if !ok {
            die("pipe ping-pong failed");
        }
    });
    // SAFETY: closing the write end makes the child's read return 0 and the child exit;
    // then it is reaped.
    unsafe {
        libc::close(to_child[1]);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// Random reads over a 64 MB array in 4 KB pages (transparent huge pages refused with
/// MADV_NOHUGEPAGE), every page written once first so the walk itself takes no faults:
/// each read lands on a page chosen by a xorshift generator, far more pages than any TLB
/// holds. `iters * 100` reads per repetition.
fn tlb_walk(reps: u32, iters: u64) {
    const PAGES: usize = 16384;
    let len = PAGES * 4096;
    // SAFETY: a private anonymous mapping of `len` bytes, unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        die("mmap failed");
    }
    // SAFETY: advice on the mapping just made.
    if unsafe { libc::madvise(mem, len, libc::MADV_NOHUGEPAGE) } != 0 {
        // Kernels without THP refuse the advice: the pages are 4 KB anyway.
        eprintln!("ubench: madvise(MADV_NOHUGEPAGE) refused (no THP?)");
    }
    let base = mem as *mut u8;
    for p in 0..PAGES {
        // SAFETY: p * 4096 < len.
        unsafe { base.add(p * 4096).write_volatile(p as u8) };
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sum = 0u64;
    report(reps, "tlb_walk", iters * 100, || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (x as usize) % PAGES;
        // SAFETY: page < PAGES and the offset < 4096, so the read is inside the mapping.
        sum = sum.wrapping_add(u64::from(unsafe { base.add(page * 4096 + (x as usize >> 52)).read_volatile() }));
    });
    core::hint::black_box(sum);
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(mem, len) };
}

/// The macro workload: `sh -c SCRIPT` with a busybox shell, 8 rounds of a three-process
/// pipeline and a file write per op. `iters / 500` ops (at least 1) per repetition.
fn macro_script(reps: u32, iters: u64) {
    const SCRIPT: &str = "i=0; while [ $i -lt 8 ]; do i=$((i+1)); \
        echo $i abc def | tr a-z A-Z | sort > /tmp/ubench-macro.$$; cat /tmp/ubench-macro.$$ > /dev/null; done; \
        rm -f /tmp/ubench-macro.$$";
    let sh = std::ffi::CString::new("/bin/sh").unwrap_or_else(|_| die("bad path"));
    let dash_c = std::ffi::CString::new("-c").unwrap_or_else(|_| die("bad arg"));
    let script = std::ffi::CString::new(SCRIPT).unwrap_or_else(|_| die("bad script"));
    report(reps, "macro", (iters / 500).max(1), || {
        // SAFETY: the child execs the shell with a null-terminated argv of C strings that
        // outlive the call, or exits; the parent reaps it.
        let st = unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let argv = [sh.as_ptr(), dash_c.as_ptr(), script.as_ptr(), std::ptr::null()];
                let envp = [c"PATH=/bin:/usr/bin".as_ptr(), std::ptr::null()];
                libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            st
        };
        if st != 0 {
            die(&format!("macro script failed: wait status {st}"));
        }
    });
}

/// With `UBENCH_STATUS_DIR` set, writes `kdbt status --summary` to `<dir>/<tag>`: taken
/// just before the first repetition and just after the last, it brackets the VM exits of
/// the measured loop alone (not the program's start, exit or set-up).
fn snapshot(tag: &str) {
    let Some(dir) = std::env::var_os("UBENCH_STATUS_DIR") else { return };
    let out = std::process::Command::new("kdbt")
        .args(["status", "--summary"])
        .output()
        .unwrap_or_else(|e| die(&format!("kdbt status: {e}")));
    if !out.status.success() {
        die(&format!("kdbt status failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let path = std::path::Path::new(&dir).join(tag);
    std::fs::write(&path, &out.stdout).unwrap_or_else(|e| die(&format!("write {}: {e}", path.display())));
}

fn report(reps: u32, name: &str, ops: u64, mut f: impl FnMut()) {
    let ops = ops.max(1);
    let (mut min, mut max) = (u64::MAX, 0);
    snapshot("before");
    for _ in 0..reps {
        let t0 = rdtsc();
        for _ in 0..ops {
            f();
        }
        let per_op = (rdtsc() - t0) / ops;
        min = min.min(per_op);
        max = max.max(per_op);
    }
    snapshot("after");
    println!("ubench name={name} ops={ops} ticks_per_op={min} max_ticks_per_op={max} reps={reps}");
}

fn die(msg: &str) -> ! {
    eprintln!("ubench: {msg}");
    std::process::exit(2);
}
