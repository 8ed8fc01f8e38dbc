//! Entry into the dispatcher from a virtualization exception (#VE, vector 20): the stub
//! an environment points its IDT's gate 20 at when EPT makes native code not executable,
//! so that an escape from the code cache lands in the dispatcher (issue 10's "EPT as
//! catch-all"; the kernel's check is `loader/module/rust/src/kernel_dbt/steer.rs`).
//!
//! At entry the CPU has pushed, on the interrupted stack (kernel to kernel, IST 0, no
//! error code), after aligning rsp down to 16: rip (the native pc whose fetch violated
//! EPT), cs, rflags, rsp, ss. The stub re-arms the #VE information area (its busy word
//! at offset 4; the CPU delivers no further #VE while it is non-zero), counts the event,
//! and `iretq`s into the engine's miss entry with the state a lookup miss leaves (README,
//! "ABI"): rsp = interrupted rsp - 16, `[rsp]` = the guest's rcx, `[rsp+8]` = its rdx,
//! rcx = the native pc, every other register and rflags as interrupted. The two frame
//! slots lie in the area the CPU's own frame occupied (dead once it is read), so nothing
//! is ever written below the final rsp: interrupts may arrive at the miss entry at once.
//!
//! Only a fetch of the interrupted rip's instruction is a steering event (information
//! area: qualification bit 2, guest-linear address in `rip..=rip+15`: an instruction that
//! begins on an executable page, a native region or a page written a moment ago, and
//! ends on one that is not, faults at the second page's first byte). A write (qualification bit 1) goes,
//! if the environment gives one, to its write handler, `extern "C" fn(gpa, gla) -> u64`,
//! called on the interrupted stack (rsp aligned to 16, DF clear, every caller-saved
//! register saved around it, the information area re-armed: the handler may itself be
//! steered into the cache): it returns 0 when it has dealt with the write (the stub
//! re-arms the information area and `iretq`s, so the write is retried with every
//! register as interrupted), anything else to pass it on. Any other #VE (a read, a write
//! the handler passed on, a stale translation while #VE is on) goes, with every register
//! and the CPU's frame as they were, to the environment's `fallback` (the kernel's
//! switches #VE off and retries the access, so that a real violation exits to root
//! mode's diagnostic).
use alloc::vec::Vec;

use iced_x86::code_asm::*;

/// Where the #VE stub finds a value: at an absolute address (the stub is one CPU's), or
/// in the per-CPU block at `gs:[gs_base + offset]` (one stub for every CPU).
#[derive(Clone, Copy, Debug)]
enum Src {
    /// The value itself (information area, miss entry) or the counter's address.
    Abs(u64),
    /// `gs:[disp]` holds the value (the counter: is the value).
    Gs(i64),
}

/// The #VE entry stub at `ip`: `info` is the information area's address, `count` a
/// `u64` it increments (locked), `miss` the engine's miss entry (`Scratch::miss_entry`),
/// `fallback` where a #VE that is not a fetch of rip goes (the CPU's frame at rsp).
pub fn ve_entry_stub(ip: u64, info: u64, count: u64, miss: u64, fallback: u64) -> Result<Vec<u8>, IcedError> {
    stub(ip, Src::Abs(info), Src::Abs(count), Src::Abs(miss), None, fallback)
}

/// The #VE entry stub for every CPU at `ip`: each CPU's information area, #VE counter
/// and miss entry are the fields `ve_info`, `ve_count` and `miss_entry` of its per-CPU
/// block at `gs:[gs_base]` (`Config::gs_base`; a #VE only arrives in kernel mode, on
/// the kernel's `%gs`). `lookup`: where the stub goes instead of the miss entry, with the
/// same state (a [`ve_lookup`] routine: a pc steered before is found in the engine's
/// lookup table without a dispatch). `write`: the write handler (module comment), called
/// with a rel32 call, so within ±2 GB of the stub. `fallback` as for [`ve_entry_stub`].
pub fn ve_entry_stub_gs(
    ip: u64,
    gs_base: i32,
    lookup: Option<u64>,
    write: Option<u64>,
    fallback: u64,
) -> Result<Vec<u8>, IcedError> {
    use crate::scratch::{OFF_MISS_ENTRY, OFF_VE_COUNT, OFF_VE_INFO};
    let g = gs_base as i64;
    let to = lookup.map_or(Src::Gs(g + OFF_MISS_ENTRY), Src::Abs);
    stub(ip, Src::Gs(g + OFF_VE_INFO), Src::Gs(g + OFF_VE_COUNT), to, write, fallback)
}

/// The end of an inline lookup at `ip`, for [`ve_entry_stub_gs`]: with the lookup-miss
/// state (rcx = the native pc, the guest's rcx and rdx at rsp), `movzx edx, cx; jmp
/// [rdx*8 + table]`, as translated code ends its lookups (`table`: the engine's lookup
/// table, [`crate::ibl`], addressed as a sign-extended disp32). None if it is not.
pub fn ve_lookup(ip: u64, table: u64) -> Option<Result<Vec<u8>, IcedError>> {
    if !crate::ibl::reachable(table) {
        return None;
    }
    let run = || {
        let mut a = CodeAssembler::new(64)?;
        a.movzx(edx, cx)?;
        a.jmp(qword_ptr(rdx * 8 + table as i64 as i32))?;
        a.assemble(ip)
    };
    Some(run())
}

fn load(a: &mut CodeAssembler, r: AsmRegister64, s: Src) -> Result<(), IcedError> {
    match s {
        Src::Abs(v) => a.mov(r, v),
        Src::Gs(d) => a.mov(r, qword_ptr(d as u64).gs()),
    }
}

fn stub(ip: u64, info: Src, count: Src, miss: Src, write: Option<u64>, fallback: u64) -> Result<Vec<u8>, IcedError> {
    // F = rsp at entry: [F] rip, [F+8] cs, [F+16] rflags, [F+24] rsp, [F+32] ss.
    let mut a = CodeAssembler::new(64)?;
    let mut other = a.create_label();
    let mut fallback_at = a.create_label();
    a.endbr64()?;
    a.push(rax)?; // F-8
    a.push(rcx)?; // F-16
    a.push(rdx)?; // F-24
    load(&mut a, rax, info)?;
    a.test(byte_ptr(rax + 8), 4)?; // qualification: instruction fetch
    a.jz(other)?;
    a.mov(rcx, qword_ptr(rax + 16))?; // guest-linear address
    a.sub(rcx, qword_ptr(rsp + 24))?; // minus the frame's rip
    a.cmp(rcx, 15)?; // the fetch of rip's instruction (it may begin on an executable page)
    a.ja(other)?;
    a.mov(dword_ptr(rax + 4), 0)?;
    match count {
        Src::Abs(c) => {
            a.mov(rax, c)?;
            a.lock().inc(qword_ptr(rax))?;
        }
        // This CPU's own counter, interrupts off (an interrupt gate): no lock needed.
        Src::Gs(d) => a.inc(qword_ptr(d as u64).gs())?,
    }
    // A new iret frame below, into the miss entry.
    a.mov(rax, qword_ptr(rsp + 56))?; // ss (F+32)
    a.push(rax)?;
    a.mov(rax, qword_ptr(rsp + 56))?; // interrupted rsp (F+24)
    a.sub(rax, 16)?;
    a.push(rax)?;
    a.push(qword_ptr(rsp + 56))?; // rflags (F+16)
    a.push(qword_ptr(rsp + 56))?; // cs (F+8)
    load(&mut a, rax, miss)?;
    a.push(rax)?; // rsp = F-64
                  // The lookup frame at the interrupted rsp - 16.
    a.mov(rdx, qword_ptr(rsp + 24))?;
    a.mov(rax, qword_ptr(rsp + 48))?; // guest rcx
    a.mov(qword_ptr(rdx), rax)?;
    a.mov(rax, qword_ptr(rsp + 40))?; // guest rdx
    a.mov(qword_ptr(rdx + 8), rax)?;
    a.mov(rcx, qword_ptr(rsp + 64))?; // native pc
    a.mov(rax, qword_ptr(rsp + 56))?; // guest rax
    a.iretq()?;
    a.set_label(&mut other)?; // rax = the information area, rax rcx rdx pushed
    if let Some(handler) = write {
        let mut plain = a.create_label();
        a.test(byte_ptr(rax + 8), 2)?; // qualification: write
        a.jz(plain)?;
        for r in [rsi, rdi, r8, r9, r10, r11, rbp] {
            a.push(r)?;
        }
        a.mov(rbp, rsp)?;
        a.and(rsp, -16)?;
        a.cld()?;
        a.mov(rdi, qword_ptr(rax + 24))?; // guest-physical address
        a.mov(rsi, qword_ptr(rax + 16))?; // guest-linear address
                                          // Re-armed before the call: the handler may run code that is itself steered
                                          // (kernel text, not executable while started), whose #VE must be delivered.
        a.mov(dword_ptr(rax + 4), 0)?;
        a.call(handler)?;
        a.mov(rsp, rbp)?;
        for r in [rbp, r11, r10, r9, r8, rdi, rsi] {
            a.pop(r)?;
        }
        let mut handled = a.create_label();
        a.test(rax, rax)?;
        a.jz(handled)?;
        // Passed on: busy again, as the CPU left it, for the fallback.
        load(&mut a, rax, info)?;
        a.mov(dword_ptr(rax + 4), -1)?;
        a.jmp(plain)?;
        a.set_label(&mut handled)?;
        load(&mut a, rax, info)?;
        a.mov(dword_ptr(rax + 4), 0)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        a.iretq()?;
        a.set_label(&mut plain)?;
    }
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.jmp(qword_ptr(fallback_at))?;
    a.set_label(&mut fallback_at)?;
    a.dq(&[fallback])?;
    a.assemble(ip)
}

/// Loop count and multiplier of [`steer_target`].
const ROUNDS: u32 = 37;
const MUL: i32 = 0x4F1B_BCDD;

/// A small native function (`extern "C" fn(u64) -> u64`, endbr64 first, a loop) at `ip`
/// for steering checks: code that is neither the engine's nor the kernel's, so it can
/// have a page of its own to take the execute right from.
pub fn steer_target(ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.endbr64()?;
    a.mov(rax, rdi)?;
    a.mov(ecx, ROUNDS)?;
    a.set_label(&mut top)?;
    a.imul_3(rax, rax, MUL)?;
    a.add(rax, rcx)?;
    a.ror(rax, 7u32)?;
    a.dec(ecx)?;
    a.jne(top)?;
    a.ret()?;
    a.assemble(ip)
}

/// What [`steer_target`] returns for `n`.
pub fn steer_model(n: u64) -> u64 {
    let mut x = n;
    for c in (1..=ROUNDS as u64).rev() {
        x = x.wrapping_mul(MUL as i64 as u64).wrapping_add(c).rotate_right(7);
    }
    x
}

/// A fallback for [`ve_entry_stub`] at `ip`: one VMCALL with rax = `call_rax` and
/// rbx = `call_rbx` (the environment's hypercall that switches #VE off on this CPU), then
/// `iretq` to retry the access with every register as interrupted, so that a real EPT
/// violation now exits to the hypervisor instead.
pub fn ve_fallback_stub(ip: u64, call_rax: u64, call_rbx: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.endbr64()?;
    a.push(rax)?;
    a.push(rbx)?;
    a.mov(rax, call_rax)?;
    a.mov(rbx, call_rbx)?;
    a.vmcall()?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()?;
    a.assemble(ip)
}
