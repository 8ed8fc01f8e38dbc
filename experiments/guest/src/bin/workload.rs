//! A deterministic workload whose output must be byte-identical with and without kdbt:
//! a getppid loop, fork+exit with distinct statuses, fork+exec of a static binary, and a
//! file written, synced and read back. Usage: workload [--dir DIR] [--exec PATH] [--n N]
use std::io::{Read, Write};

fn main() {
    let mut dir = String::from("/tmp");
    let mut exec = String::from("/bin/true");
    let mut n: u64 = 200;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--dir", Some(v)) => dir = v.clone(),
            ("--exec", Some(v)) => exec = v.clone(),
            ("--n", Some(v)) => n = v.parse().unwrap_or_else(|_| die("--n takes a number")),
            _ => die("usage: workload [--dir DIR] [--exec PATH] [--n N]"),
        }
    }
    // getppid: the sum is n * ppid, identical on every run from the same shell.
    let mut sum: u64 = 0;
    for _ in 0..n * 100 {
        // SAFETY: getppid has no side effects.
        sum = sum.wrapping_add(unsafe { libc::getppid() } as u64);
    }
    // SAFETY: as above.
    let ppid = unsafe { libc::getppid() } as u64;
    println!("getppid ok={}", sum == ppid * n * 100);

    // fork+exit: children exit with i % 251; the parent sums what waitpid reports.
    let mut statuses: u64 = 0;
    for i in 0..n {
        let st = kdbt_guest::fork_exit_wait((i % 251) as i32);
        statuses += libc::WEXITSTATUS(st) as u64;
    }
    println!("fork_exit statuses={statuses}");

    // fork+exec: count successful executions.
    let path = std::ffi::CString::new(exec.clone()).unwrap_or_else(|_| die("bad --exec"));
    let mut ok = 0;
    for _ in 0..n / 10 {
        let st = kdbt_guest::fork_exec_wait(&path);
        ok += (libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) as u32;
    }
    println!("exec {exec} ok={ok}/{}", n / 10);

    // File: 1 MB of a fixed pattern, fsync, read back, checksum (FNV-1a).
    let file = format!("{dir}/kdbt-workload.bin");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut f = std::fs::File::create(&file).unwrap_or_else(|e| die(&format!("{file}: {e}")));
    f.write_all(&data).unwrap_or_else(|e| die(&format!("write {file}: {e}")));
    f.sync_all().unwrap_or_else(|e| die(&format!("fsync {file}: {e}")));
    drop(f);
    let mut back = Vec::new();
    std::fs::File::open(&file)
        .and_then(|mut f| f.read_to_end(&mut back))
        .unwrap_or_else(|e| die(&format!("read {file}: {e}")));
    let fnv = back.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    println!("file bytes={} equal={} fnv1a={fnv:016x}", back.len(), back == data);
    let _ = std::fs::remove_file(&file);
}

fn die(msg: &str) -> ! {
    eprintln!("workload: {msg}");
    std::process::exit(2);
}
