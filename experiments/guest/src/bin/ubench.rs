//! Microbenchmarks in RDTSC ticks per operation: getppid, fork+exit(+wait), exec of a
//! static binary, a page fault (first touch of an anonymous page), and CPUID (which always
//! exits under VT-x: loaded minus unloaded is the cost of one VM exit and re-entry).
//! Usage: ubench [--iters N] [--reps R] [--exec PATH] [--only NAME]. Each benchmark runs R
//! times (default 5); it prints the fastest repetition and the slowest, one line each:
//! `ubench name=<bench> ops=<n> ticks_per_op=<min> max_ticks_per_op=<max> reps=<R>`.
use kdbt_guest::rdtsc;

fn main() {
    let mut iters: u64 = 2000;
    let mut exec_path = String::from("/bin/true");
    let mut only: Option<String> = None;
    let mut reps: u32 = 5;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--iters", Some(v)) => iters = v.parse().unwrap_or_else(|_| die("--iters takes a number")),
            ("--exec", Some(v)) => exec_path = v.clone(),
            ("--reps", Some(v)) => {
                reps = v.parse().ok().filter(|&r| r > 0).unwrap_or_else(|| die("--reps takes a number > 0"))
            }
            ("--only", Some(v)) if ["getppid", "fork_exit", "exec", "page_fault", "cpuid"].contains(&v.as_str()) => {
                only = Some(v.clone())
            }
            _ => die(
                "usage: ubench [--iters N] [--reps R] [--exec PATH] [--only getppid|fork_exit|exec|page_fault|cpuid]",
            ),
        }
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

fn report(reps: u32, name: &str, ops: u64, mut f: impl FnMut()) {
    let ops = ops.max(1);
    let (mut min, mut max) = (u64::MAX, 0);
    for _ in 0..reps {
        let t0 = rdtsc();
        for _ in 0..ops {
            f();
        }
        let per_op = (rdtsc() - t0) / ops;
        min = min.min(per_op);
        max = max.max(per_op);
    }
    println!("ubench name={name} ops={ops} ticks_per_op={min} max_ticks_per_op={max} reps={reps}");
}

fn die(msg: &str) -> ! {
    eprintln!("ubench: {msg}");
    std::process::exit(2);
}
