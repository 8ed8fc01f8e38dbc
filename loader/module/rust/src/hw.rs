//! Hardware and CPU access for the kernel side: the implementation of the `vmx` crate's
//! hardware trait, and "run this on a given CPU".
use core::ffi::c_void;

use crate::ffi;

/// Number of CPUs online now.
pub fn online_cpus() -> u32 {
    // SAFETY: reads a kernel counter; no arguments.
    unsafe { ffi::kdbt_glue_num_online_cpus() }
}

/// `nr_cpu_ids`: CPU numbers are below this.
pub fn cpu_ids() -> u32 {
    // SAFETY: reads a kernel variable; no arguments.
    unsafe { ffi::kdbt_glue_nr_cpu_ids() }
}

pub fn cpu_online(cpu: u32) -> bool {
    // SAFETY: the glue range-checks `cpu`.
    unsafe { ffi::kdbt_glue_cpu_online(cpu) }
}

/// Runs `f` on `cpu` (in IPI context: interrupts off, must not sleep or allocate) and
/// waits for it. Err(-errno) if the CPU is offline.
pub fn run_on_cpu<F: FnMut() + Send>(cpu: u32, mut f: F) -> Result<(), i32> {
    unsafe extern "C" fn trampoline<F: FnMut()>(arg: *mut c_void) {
        // SAFETY: `arg` is the `&mut F` passed below, alive until run_on_cpu returns,
        // since the glue waits for the call to complete (wait=1).
        let f = unsafe { &mut *(arg as *mut F) };
        f();
    }
    // SAFETY: the trampoline matches the glue's callback type; `f` outlives the
    // synchronous call.
    let rc = unsafe { ffi::kdbt_glue_run_on_cpu(cpu, trampoline::<F>, &mut f as *mut F as *mut c_void) };
    if rc == 0 {
        Ok(())
    } else {
        Err(-rc)
    }
}

/// Holds the CPU hotplug read lock while alive, so the set of online CPUs is stable.
pub struct CpusReadGuard(());

impl CpusReadGuard {
    pub fn lock() -> Self {
        // SAFETY: paired with the unlock in Drop; may sleep, process context only.
        unsafe { ffi::kdbt_glue_cpus_read_lock() };
        CpusReadGuard(())
    }
}

impl Drop for CpusReadGuard {
    fn drop(&mut self) {
        // SAFETY: we hold the lock taken in `lock`.
        unsafe { ffi::kdbt_glue_cpus_read_unlock() };
    }
}

/// The kernel's implementation of the `vmx` hardware trait.
pub struct KernelHw;

impl vmx::caps::VmxHw for KernelHw {
    fn rdmsr_safe(&self, msr: u32) -> Option<u64> {
        let mut v = 0u64;
        // SAFETY: the glue uses rdmsrl_safe, whose exception-table entry turns a #GP for an
        // unimplemented MSR into an error return; `v` is a valid out pointer.
        let rc = unsafe { ffi::kdbt_glue_rdmsr_safe(msr, &mut v) };
        (rc == 0).then_some(v)
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        // CPUID is unprivileged, always present on x86-64, and has no side effects.
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn read_cr4(&self) -> u64 {
        read_cr4()
    }
}

/// This CPU's CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 at CPL 0 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The CPU this runs on (stable only with preemption or interrupts off).
pub fn this_cpu() -> u32 {
    // SAFETY: raw_smp_processor_id(); no arguments.
    unsafe { ffi::kdbt_glue_this_cpu() }
}
