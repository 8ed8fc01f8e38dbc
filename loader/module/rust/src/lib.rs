//! Kernel-side logic of `kdbt.ko`.
//!
//! The C glue (`../kdbt_glue.c`) calls [`kdbt_rs_init`], [`kdbt_rs_exit`] and
//! [`kdbt_rs_ioctl`]; everything else reaches the kernel through `ffi` (one header,
//! `kdbt_glue.h`). Hardware access goes through [`hw::KernelHw`], the implementation of
//! the `vmx` crate's hardware trait, so the logic in `vmx`/`ept` stays host-testable.
#![no_std]

extern crate alloc;

mod ffi;
mod hw;
mod ioctl;
mod kalloc;
#[macro_use]
mod klog;

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
    0
}

/// Module exit, after `/dev/kdbt` is gone.
#[no_mangle]
pub extern "C" fn kdbt_rs_exit() {
    kinfo!("unloaded");
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
