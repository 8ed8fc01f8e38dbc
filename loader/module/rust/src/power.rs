//! Suspend, hibernation, reboot and emergencies while loaded.
//!
//! - Suspend/hibernation: a CPU loses its VMX state in S3 (it wakes up natively while
//!   kdbt would believe it virtualized). Before the machine sleeps, kdbt unloads (every
//!   CPU devirtualized, everything freed) from the glue's PM notifier, with every CPU still
//!   online; afterwards it loads again, so the counters start over.
//! - Emergencies (an emergency restart, the stop of a panic, the NMI shootdown before a
//!   crash kernel): the kernel's emergency virtualization-disable callback, where the
//!   kernel exports it, and a panic notifier, devirtualize the CPU they run on without a
//!   lock or an allocation. Nothing is freed: the machine is going down.
//! - A normal reboot, halt, power-off or kexec: the reboot notifier unloads.
use alloc::string::String;
use core::ffi::c_int;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::{ffi, hv};

/// Keeps the kernel's emergency callback registered exactly while a CPU may be
/// virtualized (the kernel holds one such callback; KVM's, when it is used).
pub fn sync_emergency() {
    // SAFETY: process context; the glue's arm is idempotent.
    unsafe { ffi::kdbt_glue_emergency_arm(hv::is_loaded()) };
}

/// The flags of the last `kdbt load` (the paging mode), for the load after a resume.
static LAST_FLAGS: AtomicU32 = AtomicU32::new(0);

/// `kdbt load` and every other load: launch, then arm the emergency callback.
pub fn load(flags: u32) -> Result<(), String> {
    LAST_FLAGS.store(flags, Ordering::Relaxed);
    let r = hv::load(flags);
    sync_emergency();
    r
}

/// `kdbt unload` and every other unload: devirtualize, then disarm if nothing is left.
pub fn unload() -> Result<(), String> {
    // The kernel DBT first: its steering needs the hypervisor.
    crate::kernel_dbt::session::stop_if_started();
    let r = hv::unload();
    sync_emergency();
    r
}

/// Before a suspend or hibernation: 1 when kdbt was loaded and is now unloaded, 0 when it
/// was not loaded, -EBUSY when a CPU could not be devirtualized (the glue refuses the
/// suspend).
pub fn suspend() -> c_int {
    if !hv::is_loaded() {
        return 0;
    }
    match unload() {
        Ok(()) => {
            kinfo!("suspend: every CPU devirtualized; kdbt loads again on resume");
            1
        }
        Err(e) => {
            kerr!("suspend refused: {}", e);
            -(kdbt_abi::errno::EBUSY)
        }
    }
}

/// After the suspend or hibernation: load again, in the paging mode of the last load.
pub fn resume() -> c_int {
    match load(LAST_FLAGS.load(Ordering::Relaxed)) {
        Ok(()) => {
            kinfo!("resume: every online CPU virtualized again");
            0
        }
        Err(e) => {
            kerr!("resume: cannot virtualize again, kdbt stays unloaded (`kdbt load` retries): {}", e);
            -(kdbt_abi::errno::EIO)
        }
    }
}

/// Whether kdbt virtualizes the CPU this runs on: its CPUID signature leaf answers. CPUID
/// is safe anywhere; natively, and in kdbt's root mode, the leaf is not kdbt's.
fn kdbt_on_this_cpu() -> bool {
    use vmx::hypercall::{CPUID_SIGNATURE_LEAF, SIGNATURE_WORD};
    let r = core::arch::x86_64::__cpuid_count(CPUID_SIGNATURE_LEAF, 0);
    [r.ebx, r.ecx, r.edx] == [SIGNATURE_WORD; 3]
}

/// Emergency devirtualize of the current CPU (any context, NMI included, interrupts off).
pub fn emergency_devirtualize() {
    if kdbt_on_this_cpu() {
        // A failure cannot be reported from here (no lock, maybe no console): the CPU
        // stays virtualized, as it would have without this call.
        let _ = hv::hypercall(vmx::hypercall::Call::Devirtualize, 0);
    }
}
