//! Oops reports from translated code. While started, a die notifier (the glue's, on the
//! kernel's `DIE_OOPS`) asks [`native_regs`] for the native state of an oops whose rip is
//! in the code cache. The kernel has printed its report by then (it calls the notifiers
//! after the registers and the trace, whose RIP is `kdbt_cache_start+…`); the glue then
//! prints the native rip, registers and a call trace unwound from them, and puts them
//! into the oops' registers for later readers (kdump). The oopsing task never resumes at
//! those registers: an oops ends it (or panics the machine).
//!
//! The notifier reads the engine's lock-free pc index ([`dbt::PcIndex`]): the oops may
//! have interrupted a CPU holding the engine's lock. An oops runs with interrupts off, so
//! its CPU passes no quiescent point and the fragment metadata the index points at stays
//! valid while it reads.

use core::sync::atomic::{AtomicPtr, Ordering};

use dbt::pcmap::PcIndex;
use dbt::scratch::GuestCtx;

use crate::ffi;

/// The started engine's pc index; non-null exactly while the die notifier is registered.
static INDEX: AtomicPtr<PcIndex> = AtomicPtr::new(core::ptr::null_mut());

/// What [`native_regs`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Oops {
    /// Not in the code cache (or not started): the report stays as it is.
    NotTranslated,
    /// In the code cache, but no live translation covers the address.
    Unmapped,
    /// The registers now hold the native state.
    Native,
}

/// Start answering oopses for the engine whose pc index this is (process context, at
/// `kdbt start`; the index lives until [`retract`]).
pub fn publish(index: *const PcIndex) {
    INDEX.store(index.cast_mut(), Ordering::Release);
    // SAFETY: process context.
    unsafe { ffi::kdbt_glue_oops_notifier(true) };
}

/// Stop answering (process context, before the engine is freed): the notifier is
/// unregistered, which waits for one running on another CPU (an RCU grace period).
pub fn retract() {
    // The unregistration waits for a notifier that read the index before it went.
    if !INDEX.swap(core::ptr::null_mut(), Ordering::AcqRel).is_null() {
        // SAFETY: process context.
        unsafe { ffi::kdbt_glue_oops_notifier(false) };
    }
}

/// The die notifier's question: rewrite `regs` (an oops' registers) to the native state
/// if its rip is in translated code.
pub fn native_regs(regs: &mut GuestCtx) -> Oops {
    let index = INDEX.load(Ordering::Acquire);
    if index.is_null() {
        return Oops::NotTranslated;
    }
    // SAFETY: constant bounds of the module's cache section.
    let (start, size) = unsafe { (ffi::kdbt_glue_cache_start(), ffi::kdbt_glue_cache_size()) };
    if regs.rip.wrapping_sub(start) >= size {
        return Oops::NotTranslated;
    }
    // SAFETY: the index lives until `retract`, which waits for a notifier in progress;
    // `regs` are the oopsing CPU's registers at rip, and its stack is mapped (the
    // kernel prints it next).
    match unsafe { (*index).native_state(regs) } {
        Some(_) => Oops::Native,
        None => Oops::Unmapped,
    }
}
