//! Kernel-side logic of `kdbt.ko`.
//!
//! The C glue (`../kdbt_glue.c`) calls [`kdbt_rs_init`], [`kdbt_rs_exit`] and
//! [`kdbt_rs_ioctl`]; everything else reaches the kernel through `ffi` (one header,
//! `kdbt_glue.h`). Hardware access goes through [`hw::KernelHw`], the implementation of
//! the `vmx` crate's hardware trait, so the logic in `vmx`/`ept` stays host-testable.
#![no_std]

extern crate alloc;

#[macro_use]
mod klog;
mod ffi;
mod hv;
mod hw;
mod ioctl;
mod kalloc;
mod kernel_dbt;
mod power;

use core::ffi::c_int;

#[global_allocator]
static ALLOCATOR: kalloc::KernelAllocator = kalloc::KernelAllocator;

/// Module init, before `/dev/kdbt` exists. 0 or -errno.
#[no_mangle]
pub extern "C" fn kdbt_rs_init() -> c_int {
    kinfo!(
        "loaded (version {}, ABI {}), {} CPUs online",
        env!("CARGO_PKG_VERSION"),
        kdbt_abi::ABI_VERSION,
        hw::online_cpus()
    );
    // SAFETY: a constant answer of the glue.
    if !unsafe { ffi::kdbt_glue_has_emergency_callback() } {
        kwarn!(
            "this kernel exports no emergency virtualization callback: after a panic or an emergency restart \
             only the panicking CPU leaves VMX operation"
        );
    }
    0
}

/// Module exit, after `/dev/kdbt` is gone: devirtualizes every CPU if still loaded.
/// 0, or -EBUSY if a CPU stays virtualized (the glue then panics).
#[no_mangle]
pub extern "C" fn kdbt_rs_exit() -> c_int {
    if hv::is_loaded() {
        if let Err(e) = power::unload() {
            kerr!("module exit: {}", e);
            return -(kdbt_abi::errno::EBUSY);
        }
    }
    kinfo!("unloaded");
    0
}

/// CPU hotplug: `cpu` came online (runs on it). 0 or -errno.
#[no_mangle]
pub extern "C" fn kdbt_rs_cpu_online(cpu: u32) -> c_int {
    match hv::cpu_online(cpu) {
        Ok(()) => {
            kernel_dbt::session::cpu_online(cpu);
            0
        }
        Err(_) => -(kdbt_abi::errno::EIO),
    }
}

/// CPU hotplug: `cpu` is going offline (runs on it). Devirtualizes it first.
#[no_mangle]
pub extern "C" fn kdbt_rs_cpu_offline(cpu: u32) -> c_int {
    match hv::cpu_offline(cpu) {
        Ok(()) => 0,
        Err(_) => -(kdbt_abi::errno::EIO),
    }
}

/// Reboot, halt, power-off or kexec: leave every CPU as it was.
#[no_mangle]
pub extern "C" fn kdbt_rs_shutdown() {
    if hv::is_loaded() {
        match power::unload() {
            Ok(()) => kinfo!("reboot: every CPU devirtualized"),
            Err(e) => kerr!("reboot: {}", e),
        }
    }
}

/// Before a suspend or hibernation: unload. 1 (was loaded), 0 (was not) or -errno.
#[no_mangle]
pub extern "C" fn kdbt_rs_pm_suspend() -> c_int {
    power::suspend()
}

/// After a suspend or hibernation: load again. 0 or -errno (logged).
#[no_mangle]
pub extern "C" fn kdbt_rs_pm_resume() -> c_int {
    power::resume()
}

/// Emergency (any context): devirtualize this CPU if kdbt virtualizes it.
#[no_mangle]
pub extern "C" fn kdbt_rs_emergency_devirtualize() {
    power::emergency_devirtualize()
}

/// Whether this CPU took a fatal VM exit (the glue's NMI handler then panics).
#[no_mangle]
pub extern "C" fn kdbt_rs_fatal_pending() -> bool {
    hv::fatal_pending()
}

/// Text of the last fatal VM exit on this CPU, for the guest's panic message.
///
/// # Safety
/// `buf` is null or points to `len` writable bytes (the glue's panic buffer).
#[no_mangle]
pub unsafe extern "C" fn kdbt_rs_fatal_message(buf: *mut u8, len: usize) -> usize {
    if buf.is_null() || len == 0 {
        return 0;
    }
    let mut out = klog::FixedBuf::<512>::new();
    hv::fatal_message(&mut out);
    let s = out.as_bytes();
    let n = s.len().min(len);
    // SAFETY: the glue passes a writable buffer of `len` bytes; we copy at most that.
    unsafe { core::ptr::copy_nonoverlapping(s.as_ptr(), buf, n) };
    n
}

/// The kernel DBT's re-protection work (process context, the glue's work item): text pages
/// written while started become read-only and not executable again.
#[no_mangle]
pub extern "C" fn kdbt_rs_dbt_reprotect() {
    kernel_dbt::wprotect::reprotect()
}

/// A work item of the kernel DBT's quiescence pass (task context, on each online CPU):
/// this CPU is at a quiescent point.
#[no_mangle]
pub extern "C" fn kdbt_rs_dbt_quiesce_here() {
    kernel_dbt::wprotect::quiesce_here()
}

/// The kernel DBT's reclaim tick (process context, the glue's delayed work): a
/// quiescence pass when invalidated translations wait. Milliseconds to the next tick (0:
/// no more).
#[no_mangle]
pub extern "C" fn kdbt_rs_dbt_reclaim_tick() -> core::ffi::c_uint {
    kernel_dbt::wprotect::reclaim_tick()
}

/// The glue's die notifier, on an oops in kernel mode (interrupts off, any context):
/// `regs` are its registers in `dbt::GuestCtx` order (rax, rcx, rdx, rbx, rsp, rbp, rsi,
/// rdi, r8..r15, rip, rflags). Returns 1 if they were rewritten to the native state of
/// translated code, 0 if rip is in the code cache but no live translation covers it, -1
/// otherwise.
///
/// # Safety
/// `regs` points at 18 writable words.
#[no_mangle]
pub unsafe extern "C" fn kdbt_rs_dbt_oops_regs(regs: *mut u64) -> core::ffi::c_int {
    // SAFETY: the caller's contract.
    let w = unsafe { core::slice::from_raw_parts_mut(regs, 18) };
    let mut ctx = dbt::GuestCtx { gpr: [0; 16], rip: w[16], rflags: w[17] };
    ctx.gpr.copy_from_slice(&w[..16]);
    match kernel_dbt::oops::native_regs(&mut ctx) {
        kernel_dbt::oops::Oops::NotTranslated => -1,
        kernel_dbt::oops::Oops::Unmapped => 0,
        kernel_dbt::oops::Oops::Native => {
            w[..16].copy_from_slice(&ctx.gpr);
            w[16] = ctx.rip;
            w[17] = ctx.rflags;
            1
        }
    }
}

/// ioctl on `/dev/kdbt`, serialized by the glue's mutex, process context. `arg` is a user
/// pointer. Returns >= 0 or -errno.
#[no_mangle]
pub extern "C" fn kdbt_rs_ioctl(cmd: u32, arg: u64) -> i64 {
    match ioctl::dispatch(cmd, arg) {
        Ok(v) => v,
        Err(errno) => -(errno as i64),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut buf = klog::FixedBuf::<256>::new();
    let _ = core::fmt::write(&mut buf, format_args!("{}", info));
    let s = buf.as_bytes();
    // SAFETY: `s` is a valid byte slice for the duration of the call; the glue prints it
    // with an explicit length and never returns.
    unsafe { ffi::kdbt_glue_panic(s.as_ptr(), s.len()) }
}
