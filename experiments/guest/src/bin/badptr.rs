//! System calls with bad user pointers must fail with EFAULT (the kernel's exception-table
//! fixups), never oops. Usage: badptr --write PATH | --read PATH
//! `--write PATH` writes one byte to PATH from an unmapped address; `--read PATH` reads PATH
//! into an unmapped buffer. Prints `badptr <op> PATH: EFAULT` and exits 0 when the call
//! failed with EFAULT; anything else (success, another error) prints what happened and
//! exits 1; usage or open errors exit 2.
use std::ffi::CString;

/// An address no process maps: the first page (mmap_min_addr keeps it unmapped).
const BAD: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (op, path) = match args.as_slice() {
        [op, path] if op == "--write" || op == "--read" => (op.trim_start_matches("--").to_string(), path.clone()),
        _ => die("usage: badptr --write PATH | --read PATH"),
    };
    let c = CString::new(path.clone()).unwrap_or_else(|_| die("bad path"));
    let flags = if op == "write" { libc::O_WRONLY } else { libc::O_RDONLY };
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        die(&format!("cannot open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel checks the user pointer; BAD is never mapped, so the call must
    // fail with EFAULT and touch no memory of this process.
    let r = unsafe {
        if op == "write" {
            libc::write(fd, BAD as *const libc::c_void, 1)
        } else {
            libc::read(fd, BAD as *mut libc::c_void, 64)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    if r < 0 && err.raw_os_error() == Some(libc::EFAULT) {
        println!("badptr {op} {path}: EFAULT");
        return;
    }
    if r < 0 {
        println!("badptr {op} {path}: failed with {err}, not EFAULT");
    } else {
        println!("badptr {op} {path}: returned {r}, not EFAULT");
    }
    std::process::exit(1);
}

fn die(msg: &str) -> ! {
    eprintln!("badptr: {msg}");
    std::process::exit(2);
}
