//! The #VE entry stub (`dbt::ve::ve_entry_stub`) run on the host: a harness builds, on
//! its own stack, the frame the CPU pushes for a #VE (rsp aligned down to 16, then ss,
//! rsp, rflags, cs, rip) and jumps to the stub, which must `iretq` into the "miss entry"
//! (here a capture routine) with the lookup-miss state: rcx = the native pc, rsp = the
//! interrupted rsp - 16 with the guest's rcx and rdx there, rax and rflags as
//! interrupted; and it must have cleared the information area's busy word and counted.
//! (`iretq` to the same privilege level works in user mode too.) Also the steering
//! target against its model.
use std::sync::atomic::{AtomicU64, Ordering};

use dbt::ve::{steer_model, steer_target, ve_entry_stub};

std::arch::global_asm!(
    r#"
    .globl kdbt_ve_harness
kdbt_ve_harness:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov r15, rsi
    mov [r15 + 80], rsp
    mov r12, rdi
    lea r13, [rsp - 1024]
    and r13, -16
    sub r13, rdx
    mov [r15 + 88], r13
    mov rsp, r13
    and rsp, -16
    xor eax, eax
    mov ax, ss
    push rax
    push r13
    pushfq
    mov r14, [rsp]
    mov [r15 + 96], r14
    xor eax, eax
    mov ax, cs
    push rax
    mov rax, 0x4444
    push rax
    mov rax, 0x1111
    mov rcx, 0x2222
    mov rdx, 0x3333
    jmp r12

    .globl kdbt_ve_capture
kdbt_ve_capture:
    mov [r15], rcx
    mov [r15 + 8], rsp
    mov r14, [rsp]
    mov [r15 + 16], r14
    mov r14, [rsp + 8]
    mov [r15 + 24], r14
    mov [r15 + 32], rax
    pushfq
    pop r14
    mov [r15 + 40], r14
    mov rsp, [r15 + 80]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);

extern "C" {
    fn kdbt_ve_harness(stub: u64, out: *mut u64, misalign: u64);
    fn kdbt_ve_capture();
}

/// `len` bytes of fresh read-write-execute memory.
fn rwx(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping, never unmapped (test process).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

#[test]
fn ve_stub_enters_the_miss_entry_with_the_lookup_state() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let page = rwx(4096);
    let mut info = [0u32; 8];
    for misalign in [0u64, 8] {
        info[1] = 0xffff_ffff;
        let stub = ve_entry_stub(
            page as u64,
            info.as_mut_ptr() as u64,
            COUNT.as_ptr() as u64,
            kdbt_ve_capture as *const () as u64,
        )
        .expect("stub assembles");
        // SAFETY: our RWX page, large enough (checked).
        assert!(stub.len() <= 4096);
        unsafe { std::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len()) };
        let before = COUNT.load(Ordering::Relaxed);
        let mut out = [0u64; 16];
        // SAFETY: the harness builds a #VE frame below its own stack and comes back
        // through the capture routine with every callee-saved register restored.
        unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), misalign) };
        let old_rsp = out[11];
        assert_eq!(old_rsp % 16, misalign);
        assert_eq!(out[0], 0x4444, "rcx = the native pc");
        assert_eq!(out[1], old_rsp - 16, "rsp = interrupted rsp - 16 (misalign {misalign})");
        assert_eq!((out[2], out[3]), (0x2222, 0x3333), "[rsp], [rsp+8] = guest rcx, rdx");
        assert_eq!(out[4], 0x1111, "rax as interrupted");
        assert_eq!(out[5] & !0x10000, out[12] & !0x10000, "rflags as interrupted");
        assert_eq!(COUNT.load(Ordering::Relaxed), before + 1, "counted");
        assert_eq!(info[1], 0, "busy word cleared");
    }
}

#[test]
fn steer_target_computes_its_model() {
    let page = rwx(4096);
    let code = steer_target(page as u64).expect("target assembles");
    // SAFETY: our RWX page.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), page, code.len()) };
    // SAFETY: the code is `extern "C" fn(u64) -> u64` (endbr64, a loop, ret).
    let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(page) };
    for n in [0u64, 1, 0x6b64_6274_7665, u64::MAX] {
        assert_eq!(f(n), steer_model(n), "n = {n:#x}");
    }
}
