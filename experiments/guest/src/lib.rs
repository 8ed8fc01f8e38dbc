//! Helpers shared by the guest programs: CPU pinning, CPUID, RDTSC.

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it;
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu has no preconditions.
    unsafe { libc::sched_getcpu() }
}

/// CPUID (leaf, subleaf) -> [eax, ebx, ecx, edx].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // CPUID is available on every x86-64 CPU and has no side effects.
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged unless CR4.TSD is set, which Linux does not do.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The hypervisor signature CPUID 0x40000000 reports, as text (12 bytes of EBX, ECX, EDX).
pub fn hypervisor_signature() -> (u32, String) {
    let r = cpuid(0x4000_0000, 0);
    let mut b = Vec::with_capacity(12);
    for w in [r[1], r[2], r[3]] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    (r[0], String::from_utf8_lossy(&b).trim_end_matches('\0').to_string())
}

/// Forks a child that exits at once with `code`; returns the raw wait status.
pub fn fork_exit_wait(code: i32) -> i32 {
    // SAFETY: the child only calls _exit; the parent reaps it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(code);
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        st
    }
}

/// Forks a child that execs `path` with an empty argv/envp (exit 127 if exec fails);
/// returns the raw wait status.
pub fn fork_exec_wait(path: &std::ffi::CStr) -> i32 {
    // SAFETY: the child execs a program or exits; `path` outlives the call; the parent
    // reaps the child.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        st
    }
}
