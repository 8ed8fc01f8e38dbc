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

/// What CPUID 0x40000000 says about a hypervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// No hypervisor answers the leaf: without one, CPUs return other data there (Intel:
    /// the highest basic leaf's), which is neither a leaf number of the hypervisor range in
    /// EAX nor a printable vendor string.
    None,
    /// A hypervisor: its maximum leaf (EAX) and its vendor string (EBX, ECX, EDX).
    Vendor { max_leaf: u32, vendor: String },
}

impl Hypervisor {
    /// Decodes the registers of CPUID 0x40000000 (`[eax, ebx, ecx, edx]`). A hypervisor is
    /// taken to be there when EAX is 0 (some hypervisors answer 0 for "0x40000001") or a
    /// leaf of the hypervisor range (0x40000000..=0x4000ffff), and the 12 vendor bytes,
    /// without trailing NULs, are non-empty printable ASCII.
    pub fn decode(regs: [u32; 4]) -> Hypervisor {
        let max_leaf = regs[0];
        let mut b = Vec::with_capacity(12);
        for w in [regs[1], regs[2], regs[3]] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        while b.last() == Some(&0) {
            b.pop();
        }
        let leaf_ok = max_leaf == 0 || (0x4000_0000..=0x4000_ffff).contains(&max_leaf);
        let printable = !b.is_empty() && b.iter().all(|&c| c == b' ' || c.is_ascii_graphic());
        if !leaf_ok || !printable {
            return Hypervisor::None;
        }
        // Printable ASCII is valid UTF-8.
        match String::from_utf8(b) {
            Ok(vendor) => Hypervisor::Vendor { max_leaf, vendor },
            Err(_) => Hypervisor::None,
        }
    }

    /// True when the vendor string is kdbt's.
    pub fn is_kdbt(&self) -> bool {
        matches!(self, Hypervisor::Vendor { vendor, .. } if vendor == "kdbtkdbtkdbt")
    }
}

/// What CPUID 0x40000000 says on the calling CPU.
pub fn hypervisor_signature() -> Hypervisor {
    Hypervisor::decode(cpuid(0x4000_0000, 0))
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

#[cfg(test)]
mod tests {
    use super::Hypervisor;

    fn regs(max_leaf: u32, vendor: &[u8; 12]) -> [u32; 4] {
        let w = |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        [max_leaf, w(0), w(4), w(8)]
    }

    #[test]
    fn kdbt_signature() {
        let h = Hypervisor::decode(regs(0x4000_0001, b"kdbtkdbtkdbt"));
        assert_eq!(h, Hypervisor::Vendor { max_leaf: 0x4000_0001, vendor: "kdbtkdbtkdbt".into() });
        assert!(h.is_kdbt());
    }

    #[test]
    fn other_vendors_printable() {
        let h = Hypervisor::decode(regs(0x4000_0010, b"KVMKVMKVM\0\0\0"));
        assert_eq!(h, Hypervisor::Vendor { max_leaf: 0x4000_0010, vendor: "KVMKVMKVM".into() });
        assert!(!h.is_kdbt());
        // Old KVM answers EAX = 0.
        let h = Hypervisor::decode(regs(0, b"Microsoft Hv"));
        assert_eq!(h, Hypervisor::Vendor { max_leaf: 0, vendor: "Microsoft Hv".into() });
    }

    #[test]
    fn no_hypervisor() {
        // Seen after `kdbt unload` in Bochs: Intel returns the highest basic leaf's data
        // (sig=\xef\xbf\xbdd max_leaf=0xdac before this decoding).
        let h = Hypervisor::decode([0xdac, 0x0000_64ff, 0, 0]);
        assert_eq!(h, Hypervisor::None);
        assert!(!h.is_kdbt());
        // All zero (AMD without a hypervisor).
        assert_eq!(Hypervisor::decode([0; 4]), Hypervisor::None);
        // Printable bytes but EAX outside the hypervisor range.
        assert_eq!(Hypervisor::decode(regs(0xd, b"GenuineIntel")), Hypervisor::None);
        // A leaf in range but a control byte in the vendor.
        assert_eq!(Hypervisor::decode(regs(0x4000_0001, b"kdbt\x01dbtkdbt")), Hypervisor::None);
        // NULs inside (not trailing) are not printable.
        assert_eq!(Hypervisor::decode(regs(0x4000_0001, b"kd\0tkdbtkdbt")), Hypervisor::None);
    }
}
