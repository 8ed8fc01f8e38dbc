//! EPT steering, first stage: native kernel code made not executable in the guest's EPT
//! view is entered anyway, and lands in the dispatcher through a virtualization exception
//! (#VE, vector 20) delivered by the CPU without a VM exit; the dispatcher translates it
//! and it runs from the code cache (issue 10's "EPT as catch-all").
//!
//! The check (part of `kdbt dbt-selftest` when kdbt is loaded with EPT on a CPU with
//! EPT-violation #VE) uses the two pages at the end of the code cache that the engine
//! never gets ([`super::env::STEER_PAGES`]): a small native function in the first (the
//! "kernel code" to be caught), the #VE entry stub in the second. On this CPU, interrupts
//! off: the target page loses execute in EPT, an IDT copy whose gate 20 leads to the stub
//! is loaded, root mode switches #VE on ([`vmx::hypercall::Call::VeControl`]), and the
//! target is called natively. The fetch violates EPT, the CPU delivers #VE; the stub
//! re-arms the information area, counts the event and enters the engine's miss entry as
//! a lookup would (`rcx` = the native pc, the guest's rcx/rdx in a frame right below its
//! rsp); the target then runs translated and returns through the dispatcher to its native
//! caller. A #VE that is not a fetch of rip goes to a fallback that switches #VE off and
//! retries the access (a real violation then exits to root mode's diagnostic). Everything
//! is undone before interrupts come back on, so no other context ever sees the IDT copy
//! (under KPTI it is not mapped in user page tables) or #VE enabled.
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use dbt::ve::{steer_model, steer_target, ve_entry_stub, ve_fallback_stub};

use super::percpu::Blocks;
use crate::hv::launch::{sidt, RawDtr};
use crate::{ffi, hv};

/// #VEs the stub has taken (since load).
static VE_COUNT: AtomicU64 = AtomicU64::new(0);

/// The target's argument.
const ARG: u64 = 0x6b64_6274_7665;

/// # Safety
/// `d` describes a valid IDT that stays mapped while it is loaded.
unsafe fn lidt(d: &RawDtr) {
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) d, options(nostack, readonly)) };
}

/// A 64-bit interrupt gate (present, DPL 0, IST 0) to `target` through selector `sel`.
pub(super) fn gate(target: u64, sel: u16) -> [u64; 2] {
    let lo = (target & 0xffff) | (sel as u64) << 16 | 0x8E << 40 | ((target >> 16) & 0xffff) << 48;
    [lo, target >> 32]
}

/// Where a 64-bit gate (as [`gate`] encodes it) leads.
pub(super) fn gate_target(g: [u64; 2]) -> u64 {
    (g[0] & 0xffff) | ((g[0] >> 48) & 0xffff) << 16 | (g[1] & 0xffff_ffff) << 32
}

/// How the check went, for the self-test's report.
pub struct Steered {
    pub ves: u64,
    pub insns: u64,
}

/// Runs the check (see the module comment). `no_steer`: the target keeps its execute
/// right (a test hook: the call then runs natively and the check must fail). `counted`
/// sums the inscount counters of every CPU.
pub fn check(kenv: (u64, u64), blocks: &Blocks, no_steer: bool, counted: impl Fn() -> u64) -> Result<Steered, String> {
    hv::ve_unavailable().map_err(String::from)?;
    let (tx, tw) = kenv;
    let (sx, sw) = (tx + 4096, tw + 4096);
    let miss = blocks.iter().next().map(|b| {
        // SAFETY: a live block, attached to the engine (its entries are the engine's).
        unsafe { (*b).miss_entry }
    });
    let miss = miss.filter(|&m| m != 0).ok_or("no dispatcher entry")?;
    // SAFETY: one zeroed page for the #VE information area; freed below.
    let info = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u32;
    // SAFETY: likewise, for the IDT copy.
    let idt = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u8;
    let r = run(tx, tw, sx, sw, miss, info, idt, no_steer, &counted);
    // SAFETY: the pages allocated above; nothing uses them any more (#VE is off, the
    // original IDT is loaded again).
    unsafe {
        if !info.is_null() {
            ffi::kdbt_glue_free_pages(info.cast(), 0);
        }
        if !idt.is_null() {
            ffi::kdbt_glue_free_pages(idt.cast(), 0);
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn run(
    tx: u64,
    tw: u64,
    sx: u64,
    sw: u64,
    miss: u64,
    info: *mut u32,
    idt: *mut u8,
    no_steer: bool,
    counted: &dyn Fn() -> u64,
) -> Result<Steered, String> {
    if info.is_null() || idt.is_null() {
        return Err("out of memory".into());
    }
    let target = steer_target(tx).map_err(|e| format!("assembling the target: {e}"))?;
    // The stub page: the entry stub, and at +2048 its fallback (#VE off, retry).
    let fx = sx + 2048;
    let fallback = ve_fallback_stub(fx, vmx::hypercall::Call::VeControl.rax(), 0)
        .map_err(|e| format!("assembling the fallback: {e}"))?;
    let stub = ve_entry_stub(sx, info as u64, VE_COUNT.as_ptr() as u64, miss, fx)
        .map_err(|e| format!("assembling the stub: {e}"))?;
    if target.len() > 4096 || stub.len() > 2048 || fallback.len() > 2048 {
        return Err("steering code larger than its page".into());
    }
    // SAFETY: the writable alias of the two pages the engine never gets.
    unsafe {
        core::ptr::copy_nonoverlapping(target.as_ptr(), tw as *mut u8, target.len());
        core::ptr::copy_nonoverlapping(stub.as_ptr(), sw as *mut u8, stub.len());
        core::ptr::copy_nonoverlapping(fallback.as_ptr(), (sw + 2048) as *mut u8, fallback.len());
    }
    // SAFETY: the target just written, executable (module text), `extern "C" fn(u64) -> u64`.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(tx as usize) };
    let want = steer_model(ARG);
    let native = f(ARG);
    if native != want {
        return Err(format!("the native target computed {native:#x}, expected {want:#x}"));
    }
    // SAFETY: module memory (the code cache section).
    let gpa = unsafe { ffi::kdbt_glue_vmalloc_to_phys(tx as *const _) };
    // SAFETY: a page from alloc_pages (direct map).
    let info_pa = unsafe { ffi::kdbt_glue_virt_to_phys(info as *const _) };
    if gpa == 0 {
        return Err("no physical address for the target page".into());
    }
    if !no_steer {
        hv::set_page_perms(gpa, ::ept::Perms::RW).map_err(|e| format!("target page not executable: {e}"))?;
    }
    let ves0 = VE_COUNT.load(Ordering::Relaxed);
    let insns0 = counted();
    // SAFETY: irq save/restore pair: nothing else runs on this CPU while the IDT copy is
    // loaded and #VE is on.
    let flags = unsafe { ffi::kdbt_glue_irq_save() };
    let old = sidt();
    let len = (old.limit as usize + 1).min(4096);
    let kcs: u16;
    // SAFETY: reads CS.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) kcs, options(nomem, nostack, preserves_flags)) };
    // SAFETY: the IDT is readable kernel memory of `len` bytes; `idt` is our page.
    unsafe { core::ptr::copy_nonoverlapping(old.base as *const u8, idt, len) };
    let g = gate(sx, kcs);
    // SAFETY: gate 20 lies in our page (20 * 16 + 16 <= 4096).
    unsafe { core::ptr::copy_nonoverlapping(g.as_ptr() as *const u8, idt.add(20 * 16), 16) };
    let copy = RawDtr { limit: old.limit.max(20 * 16 + 15), base: idt as u64 };
    // SAFETY: a complete copy of the IDT in a page that outlives its use (restored below).
    unsafe { lidt(&copy) };
    let on = hv::hypercall(vmx::hypercall::Call::VeControl, info_pa);
    let got = if on == vmx::hypercall::OK { Some(f(ARG)) } else { None };
    let off = hv::hypercall(vmx::hypercall::Call::VeControl, 0);
    // SAFETY: the IDT that was loaded before.
    unsafe { lidt(&old) };
    // SAFETY: restores what irq_save returned.
    unsafe { ffi::kdbt_glue_irq_restore(flags) };
    let restore = if no_steer { Ok(::ept::Perms::RWX) } else { hv::set_page_perms(gpa, ::ept::Perms::RWX) };
    let ves = VE_COUNT.load(Ordering::Relaxed) - ves0;
    let insns = counted().wrapping_sub(insns0);
    restore.map_err(|e| format!("target page executable again: {e}"))?;
    if on != vmx::hypercall::OK || off != vmx::hypercall::OK {
        return Err(format!("root mode refused #VE on/off: {on:#x}/{off:#x}"));
    }
    let got = got.unwrap_or(0);
    if got != want {
        return Err(format!("the steered call returned {got:#x}, expected {want:#x}"));
    }
    if ves == 0 || insns == 0 {
        return Err(format!(
            "the call ran natively: {ves} #VEs, {insns} instructions from the cache (EPT steering did not happen)"
        ));
    }
    // SAFETY: our page, written by the CPU at the #VE: exit reason, busy, qualification,
    // guest-linear and guest-physical address.
    let (reason, gla, vgpa) = unsafe {
        (info.read_volatile(), (info.add(4) as *const u64).read_volatile(), (info.add(6) as *const u64).read_volatile())
    };
    if reason != 48 || gla != tx || vgpa != gpa {
        return Err(format!(
            "#VE information: reason {reason}, linear {gla:#x}, physical {vgpa:#x}; expected 48 (EPT violation), {tx:#x}, {gpa:#x}"
        ));
    }
    Ok(Steered { ves, insns })
}
