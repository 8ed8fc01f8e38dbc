//! Microbenchmarks in RDTSC ticks per operation: getppid, fork+exit(+wait), exec of a
//! static binary, and a page fault (first touch of an anonymous page).
//! Usage: ubench [--iters N] [--exec PATH] [--only NAME]. Prints one line per benchmark:
//! `ubench name=<bench> ops=<n> ticks_per_op=<t>`.
use kdbt_guest::rdtsc;

fn main() {
    let mut iters: u64 = 2000;
    let mut exec_path = String::from("/bin/true");
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--iters", Some(v)) => iters = v.parse().unwrap_or_else(|_| die("--iters takes a number")),
            ("--exec", Some(v)) => exec_path = v.clone(),
            ("--only", Some(v)) if ["getppid", "fork_exit", "exec", "page_fault"].contains(&v.as_str()) => {
                only = Some(v.clone())
            }
            _ => die("usage: ubench [--iters N] [--exec PATH] [--only getppid|fork_exit|exec|page_fault]"),
        }
    }
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("getppid") {
        report("getppid", iters * 10, || {
            // SAFETY: getppid has no side effects.
            unsafe { libc::getppid() };
        });
    }
    if run("fork_exit") {
        report("fork_exit", iters / 10, || {
            // SAFETY: the child only calls _exit; the parent reaps it.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        });
    }
    let path = std::ffi::CString::new(exec_path).unwrap_or_else(|_| die("bad --exec path"));
    if run("exec") {
        report("exec", iters / 20, || {
            // SAFETY: the child execs a static binary with an empty argv/envp or exits 127.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    let argv = [path.as_ptr(), std::ptr::null()];
                    let envp = [std::ptr::null()];
                    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                    libc::_exit(127);
                }
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        });
    }
    if !run("page_fault") {
        return;
    }
    let pages = iters as usize;
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
    report("page_fault", pages as u64, || {
        // SAFETY: `page` < `pages`, so the write is inside the mapping.
        unsafe { (mem as *mut u8).add(page * 4096).write_volatile(1) };
        page += 1;
    });
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(mem, pages * 4096) };
}

fn report(name: &str, ops: u64, mut f: impl FnMut()) {
    let ops = ops.max(1);
    let t0 = rdtsc();
    for _ in 0..ops {
        f();
    }
    let t = rdtsc() - t0;
    println!("ubench name={name} ops={ops} ticks_per_op={}", t / ops);
}

fn die(msg: &str) -> ! {
    eprintln!("ubench: {msg}");
    std::process::exit(2);
}
