//! The #VE entry stub (`dbt::ve::ve_entry_stub`) run on the host: a harness builds, on
//! its own stack, the frame the CPU pushes for a #VE (rsp aligned down to 16, then ss,
//! rsp, rflags, cs, rip) and jumps to the stub, which must `iretq` into the "miss entry"
//! (here a capture routine) with the lookup-miss state: rcx = the native pc, rsp = the
//! interrupted rsp - 16 with the guest's rcx and rdx there, rax and rflags as
//! interrupted; and it must have cleared the information area's busy word and counted.
//! (`iretq` to the same privilege level works in user mode too.) Also the steering
//! target against its model.
use std::sync::atomic::{AtomicU64, Ordering};

use dbt::scratch::Scratch;
use dbt::ve::{steer_model, steer_target, ve_entry_stub, ve_entry_stub_gs, ve_lookup};

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
    mov rax, [r15 + 64]
    test rax, rax
    jnz 1f
    mov rax, 0x4444
1:
    push rax
    mov rax, 0x1111
    mov rcx, 0x2222
    mov rdx, 0x3333
    jmp r12

    .globl kdbt_ve_fallback
kdbt_ve_fallback:
    mov [r15 + 104], rax
    mov [r15 + 112], rcx
    mov [r15 + 120], rdx
    mov r14, [rsp]
    mov [r15 + 8], rsp
    mov [r15], r14
    jmp 3f

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
3:
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
    fn kdbt_ve_fallback();
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
        // A fetch (qualification bit 2) of the interrupted rip (0x4444).
        (info[2], info[4], info[5]) = (4, 0x4444, 0);
        stub_at(page, info.as_mut_ptr(), &COUNT);
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
        // SAFETY: our array (the stub wrote it through a raw pointer).
        assert_eq!(unsafe { info.as_ptr().add(1).read_volatile() }, 0, "busy word cleared");
    }
}

/// The stub written into `page`, with its information area at `info` (which the stub
/// writes: read it back with `read_volatile`).
fn stub_at(page: *mut u8, info: *mut u32, count: &AtomicU64) -> Vec<u8> {
    let stub = ve_entry_stub(
        page as u64,
        info as u64,
        count.as_ptr() as u64,
        kdbt_ve_capture as *const () as u64,
        kdbt_ve_fallback as *const () as u64,
    )
    .expect("stub assembles");
    assert!(stub.len() <= 4096);
    // SAFETY: our RWX page, large enough (checked).
    unsafe { std::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len()) };
    stub
}

/// A #VE that is not a fetch of rip (a data access; a fetch elsewhere) reaches the
/// fallback with the CPU's frame at rsp and every register as interrupted, uncounted.
#[test]
fn ve_stub_hands_anything_but_a_fetch_of_rip_to_the_fallback() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let page = rwx(4096);
    for (qual, gla) in [(2u32, 0x4444u32), (4, 0x5555), (1, 0)] {
        let mut info = [0u32; 8];
        info[1] = 0xffff_ffff;
        (info[2], info[4]) = (qual, gla);
        stub_at(page, info.as_mut_ptr(), &COUNT);
        let mut out = [0u64; 16];
        // SAFETY: as in the test above; the fallback comes back the same way.
        unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), 0) };
        assert_eq!(out[0], 0x4444, "[rsp] = the frame's rip (qualification {qual:#x})");
        assert_eq!(out[1], (out[11] & !15) - 40, "rsp = the CPU's frame");
        assert_eq!((out[13], out[14], out[15]), (0x1111, 0x2222, 0x3333), "rax, rcx, rdx as interrupted");
        assert_eq!(COUNT.load(Ordering::Relaxed), 0, "not counted");
        // SAFETY: as above.
        assert_eq!(unsafe { info.as_ptr().add(1).read_volatile() }, 0xffff_ffff, "busy word left alone");
    }
}

/// The per-CPU stub (one for every CPU, its information area, counter and miss entry in
/// the `%gs` block) takes the same path, reading this thread's block.
#[test]
fn per_cpu_ve_stub_uses_its_gs_block() {
    const GS_BASE: i32 = 0x2000;
    let page = rwx(4096);
    let mut info = [0u32; 8];
    let block: &mut Scratch = Box::leak(Box::new(
        // SAFETY: Scratch is plain integers: all-zero is a valid value.
        unsafe { std::mem::zeroed::<Scratch>() },
    ));
    block.miss_entry = kdbt_ve_capture as *const () as u64;
    block.ve_info = info.as_mut_ptr() as u64;
    let base = (block as *mut Scratch as u64).wrapping_sub(GS_BASE as u64);
    // SAFETY: sets this test thread's user %gs base (nothing in a Rust program uses %gs).
    assert_eq!(unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1001, base) }, 0, "ARCH_SET_GS");
    let stub = ve_entry_stub_gs(page as u64, GS_BASE, None, None, kdbt_ve_fallback as *const () as u64)
        .expect("stub assembles");
    // SAFETY: our RWX page, large enough.
    unsafe { std::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len()) };
    let mut steered_so_far = 0;
    // 0x4450: the fetch of an instruction at 0x4444 that crosses into a page at 0x4450 (it
    // began on an executable page); 0x4454 is past the longest instruction.
    for (qual, gla, steered) in
        [(4u32, 0x4444u32, true), (4, 0x4450, true), (2, 0x4444, false), (4, 0x5555, false), (4, 0x4454, false)]
    {
        info[1] = 0xffff_ffff;
        (info[2], info[4], info[5]) = (qual, gla, 0);
        let mut out = [0u64; 16];
        // SAFETY: as in the tests above.
        unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), 0) };
        let old_rsp = out[11];
        // SAFETY: the block and the array, written by the stub through raw pointers.
        let (count, busy) =
            unsafe { (std::ptr::addr_of!(block.ve_count).read_volatile(), info.as_ptr().add(1).read_volatile()) };
        if steered {
            assert_eq!((out[0], out[1]), (0x4444, old_rsp - 16), "the miss entry's state");
            assert_eq!((out[2], out[3], out[4]), (0x2222, 0x3333, 0x1111));
            steered_so_far += 1;
            assert_eq!((count, busy), (steered_so_far, 0), "counted in the block, busy word cleared");
        } else {
            assert_eq!((out[13], out[14], out[15]), (0x1111, 0x2222, 0x3333), "to the fallback as interrupted");
            assert_eq!(
                (count, busy),
                (steered_so_far, 0xffff_ffff),
                "not counted (qualification {qual:#x}, linear {gla:#x})"
            );
        }
    }
}

/// With a lookup routine, the per-CPU stub goes through the lookup table (indexed by
/// the pc's low 16 bits) instead of the miss entry, with the same state.
#[test]
fn per_cpu_ve_stub_goes_through_the_lookup_table() {
    const GS_BASE: i32 = 0x2000;
    let page = rwx(4096);
    // SAFETY: a fresh anonymous mapping in the low 2 GB (the table is addressed by a
    // sign-extended disp32), never unmapped.
    let table = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            dbt::ibl::IBL_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    assert_ne!(table, libc::MAP_FAILED);
    let t = table as *mut u64;
    // SAFETY: entry 0x4444 of the table.
    unsafe { t.add(0x4444).write(kdbt_ve_capture as *const () as u64) };
    let mut info = [0u32; 8];
    let block: &mut Scratch = Box::leak(Box::new(
        // SAFETY: Scratch is plain integers: all-zero is a valid value.
        unsafe { std::mem::zeroed::<Scratch>() },
    ));
    block.miss_entry = kdbt_ve_fallback as *const () as u64; // must not be taken
    block.ve_info = info.as_mut_ptr() as u64;
    let base = (block as *mut Scratch as u64).wrapping_sub(GS_BASE as u64);
    // SAFETY: sets this test thread's user %gs base.
    assert_eq!(unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1001, base) }, 0, "ARCH_SET_GS");
    let lookup = page as u64 + 2048;
    let stub =
        ve_entry_stub_gs(page as u64, GS_BASE, Some(lookup), None, kdbt_ve_fallback as *const () as u64).unwrap();
    let thunk = ve_lookup(lookup, table as u64).expect("table reachable").unwrap();
    assert!(ve_lookup(lookup, 0x1_0000_0000).is_none(), "a table out of disp32 reach is refused");
    // SAFETY: our RWX page: the stub, and the lookup at +2048.
    unsafe {
        std::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len());
        std::ptr::copy_nonoverlapping(thunk.as_ptr(), page.add(2048), thunk.len());
    }
    let ip = info.as_mut_ptr();
    // SAFETY: our array, which the stub reads through its raw pointer.
    unsafe {
        ip.add(1).write_volatile(0xffff_ffff);
        ip.add(2).write_volatile(4);
        ip.add(4).write_volatile(0x4444);
    }
    let mut out = [0u64; 16];
    // SAFETY: as in the tests above.
    unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), 0) };
    let old_rsp = out[11];
    assert_eq!((out[0], out[1]), (0x4444, old_rsp - 16), "the table's target got the miss entry's state");
    assert_eq!((out[2], out[3], out[4]), (0x2222, 0x3333, 0x1111));
}

/// A write #VE goes to the write handler with (guest-physical, guest-linear address):
/// when it returns 0 the stub re-arms the information area and `iretq`s to the
/// interrupted rip with every register and rsp as interrupted (the write is retried);
/// otherwise the #VE goes to the fallback as any other. A fetch of rip still steers.
#[test]
fn per_cpu_ve_stub_hands_writes_to_the_write_handler() {
    const GS_BASE: i32 = 0x2000;
    static ARGS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    static VERDICT: AtomicU64 = AtomicU64::new(0);
    extern "C" fn on_write(gpa: u64, gla: u64) -> u64 {
        ARGS[0].store(gpa, Ordering::Relaxed);
        ARGS[1].store(gla, Ordering::Relaxed);
        ARGS[2].fetch_add(1, Ordering::Relaxed);
        VERDICT.load(Ordering::Relaxed)
    }
    let page = rwx(4096);
    // The handler through a thunk on the stub's page (the stub's call is rel32).
    let thunk_at = page as u64 + 3072;
    let thunk = {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rax, on_write as *const () as u64).unwrap();
        a.jmp(rax).unwrap();
        a.assemble(thunk_at).unwrap()
    };
    let mut info = [0u32; 8];
    let block: &mut Scratch = Box::leak(Box::new(
        // SAFETY: Scratch is plain integers: all-zero is a valid value.
        unsafe { std::mem::zeroed::<Scratch>() },
    ));
    block.miss_entry = kdbt_ve_capture as *const () as u64;
    block.ve_info = info.as_mut_ptr() as u64;
    let base = (block as *mut Scratch as u64).wrapping_sub(GS_BASE as u64);
    // SAFETY: sets this test thread's user %gs base.
    assert_eq!(unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1001, base) }, 0, "ARCH_SET_GS");
    let stub =
        ve_entry_stub_gs(page as u64, GS_BASE, None, Some(thunk_at), kdbt_ve_fallback as *const () as u64).unwrap();
    assert!(stub.len() <= 3072);
    // SAFETY: our RWX page: the stub, and the thunk at +3072.
    unsafe {
        std::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len());
        std::ptr::copy_nonoverlapping(thunk.as_ptr(), page.add(3072), thunk.len());
    }
    let capture = kdbt_ve_capture as *const () as u64;
    for (verdict, misalign) in [(0u64, 0u64), (0, 8), (1, 0)] {
        VERDICT.store(verdict, Ordering::Relaxed);
        let calls = ARGS[2].load(Ordering::Relaxed);
        info[1] = 0xffff_ffff;
        // A write (qualification bit 1) of guest-linear 0x7000_1234, physical 0x5_6789_a234.
        (info[2], info[4], info[5], info[6], info[7]) = (2, 0x7000_1234, 0, 0x6789_a234, 5);
        let mut out = [0u64; 16];
        // The interrupted rip: the capture routine (the write "retried").
        out[8] = capture;
        // SAFETY: as in the tests above.
        unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), misalign) };
        let old_rsp = out[11];
        assert_eq!(ARGS[2].load(Ordering::Relaxed), calls + 1, "the handler ran once");
        assert_eq!(ARGS[0].load(Ordering::Relaxed), 0x5_6789_a234, "gpa");
        assert_eq!(ARGS[1].load(Ordering::Relaxed), 0x7000_1234, "gla");
        // SAFETY: the block and the array, written by the stub through raw pointers.
        let (count, busy) =
            unsafe { (std::ptr::addr_of!(block.ve_count).read_volatile(), info.as_ptr().add(1).read_volatile()) };
        assert_eq!(count, 0, "a write is not a steering event");
        if verdict == 0 {
            assert_eq!(out[0], 0x2222, "rcx as interrupted");
            assert_eq!(out[4], 0x1111, "rax as interrupted");
            assert_eq!(out[1], old_rsp, "rsp as interrupted (misalign {misalign})");
            assert_eq!(out[5] & !0x10000, out[12] & !0x10000, "rflags as interrupted");
            assert_eq!(busy, 0, "information area re-armed");
        } else {
            assert_eq!(out[0], capture, "[rsp] = the frame's rip: the fallback");
            assert_eq!((out[13], out[14], out[15]), (0x1111, 0x2222, 0x3333), "to the fallback as interrupted");
            assert_eq!(busy, 0xffff_ffff, "busy word left for the fallback");
        }
    }
    // A fetch of rip is still steered, without the handler.
    let calls = ARGS[2].load(Ordering::Relaxed);
    let ip = info.as_mut_ptr();
    // SAFETY: our array, which the stub reads through its raw pointer.
    unsafe {
        for (i, v) in [(1, 0xffff_ffff), (2, 4), (4, 0x4444), (5, 0)] {
            ip.add(i).write_volatile(v);
        }
    }
    let mut out = [0u64; 16];
    // SAFETY: as above.
    unsafe { kdbt_ve_harness(page as u64, out.as_mut_ptr(), 0) };
    assert_eq!((out[0], out[1]), (0x4444, out[11] - 16), "steered");
    assert_eq!(ARGS[2].load(Ordering::Relaxed), calls, "no handler call for a fetch");
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
