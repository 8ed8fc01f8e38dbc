//! The hypervisor: late launch beneath the running kernel on every CPU, and devirtualize.
//!
//! Serialization: load, unload and permission changes run from ioctls (serialized by the
//! glue's mutex) and take the CPU hotplug read lock *before* [`STATE`]; the hotplug
//! callbacks run under the hotplug write lock and then take [`STATE`]. With that order at
//! most one of them holds [`STATE`] at a time, and neither waits for the other while
//! holding it (taking [`STATE`] first would let a hotplug callback spin on it while the
//! ioctl waits for the hotplug lock: a deadlock). Status reads take [`STATE`] alone.
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use spin::Mutex;

use crate::{ffi, hw};

mod entry;
mod ept;
mod fatal;
mod hotplug;
pub mod launch;
mod lifecycle;
pub mod percpu;
mod perms;
mod root;
mod selftest;
mod serial;
pub mod shadow;
mod status;

pub use hotplug::{cpu_offline, cpu_online};
pub use lifecycle::{load, unload};
use lifecycle::*;
pub use perms::{remap_pages, set_page_perms, set_pages_perms};
use perms::*;
pub use selftest::{ept_check, ept_violation_check, nmi_check, shadow_policy_check};
pub use status::{fatal_message, fatal_pending, status};

use percpu::{PerCpu, PERCPU_ORDER};
use vmx::caps::{RawCaps, VmxCaps};
pub use vmx::policy::Controls;
use vmx::policy::{choose_controls, required};
use vmx::preflight::{preflight, Features, Request};

struct Cpu {
    pc: *mut PerCpu,
    /// The block's guest-visible page (the block itself is hidden under EPT: the kernel
    /// side must not even read its `shared` field).
    shared: *const percpu::Shared,
}

impl Cpu {
    fn shared(&self) -> &percpu::Shared {
        // SAFETY: the shared page stays allocated while the CPU is in `cpus`.
        unsafe { &*self.shared }
    }
}

// SAFETY: the per-CPU block is only touched by its own CPU in root mode and by the
// serialized load/unload/status paths (see the module comment).
unsafe impl Send for Cpu {}

struct State {
    controls: Controls,
    /// The identity map all CPUs share (in a page of its own, hidden once handed to root
    /// mode).
    ept: Option<ept::MapPage>,
    /// The map was handed to root mode ([`ept::hide_initial`], at the first launch).
    handed: bool,
    /// Host page tables: a PML4 page sharing the kernel half of the kernel's.
    host_pml4: *mut u64,
    cpus: Vec<Option<Cpu>>,
}

// SAFETY: see `Cpu`; the host PML4 page is read-only after load.
unsafe impl Send for State {}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// VMCALL from the current CPU (CPL 0).
pub fn hypercall(call: vmx::hypercall::Call, arg: u64) -> u64 {
    let mut rax = call.rax();
    // SAFETY: VMCALL in VMX non-root operation exits to kdbt's handler, which implements
    // `call` and returns in RAX (RBX may be written by Ping); outside VMX it would #UD,
    // so callers only use it on CPUs kdbt virtualized.
    unsafe {
        core::arch::asm!("xchg {a}, rbx", "vmcall", "xchg {a}, rbx", a = inout(reg) arg => _, inout("rax") rax, options(nostack));
    }
    rax
}

/// VMCALL from the current CPU (CPL 0) with two arguments, in RBX and RCX.
pub fn hypercall2(call: vmx::hypercall::Call, rbx: u64, rcx: u64) -> u64 {
    let mut rax = call.rax();
    // SAFETY: as in `hypercall`: VMCALL in VMX non-root operation exits to kdbt's handler,
    // which implements `call` and returns in RAX (RBX and RCX are declared clobbered, so
    // a call may write them); callers only use it on CPUs kdbt virtualized.
    unsafe {
        core::arch::asm!("xchg {a}, rbx", "vmcall", "xchg {a}, rbx", a = inout(reg) rbx => _, inout("rax") rax,
                         inout("rcx") rcx => _, options(nostack));
    }
    rax
}

pub fn is_loaded() -> bool {
    STATE.lock().is_some()
}

/// Why EPT-violation #VE cannot be switched on ([`vmx::hypercall::Call::VeControl`]),
/// or `Ok` when kdbt is loaded with EPT on a CPU model that allows it.
pub fn ve_unavailable() -> Result<(), &'static str> {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return Err("kdbt is not loaded") };
    if st.ept.is_none() {
        return Err("kdbt runs with shadow paging (no EPT)");
    }
    if !st.controls.ve {
        return Err("this CPU has no EPT-violation #VE");
    }
    Ok(())
}

