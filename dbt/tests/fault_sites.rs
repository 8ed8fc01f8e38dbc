//! Fault sites ([`dbt::Env::fault_slot`]): an instruction the environment's exception
//! tables know is placed alone in a slot the environment registered, so a fault there is
//! found by its address and continues at its fixup, as in the kernel (`__ex_table`). Here
//! a SIGSEGV handler plays the kernel's fixup search: a table of (faulting pc, fixup pc).
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use dbt::host::{rwx_near, Harness, HostEnv};
use dbt::{Config, StopKind};

/// (faulting pc, where to continue, times used): the "exception table" of this test.
static TABLE: [[AtomicU64; 3]; 2] = [
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
];
/// The slot the environment handed out (and the native pc it stands for).
static SLOT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

extern "C" fn on_segv(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let rip = unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] };
    for e in TABLE.iter() {
        if e[0].load(SeqCst) == *rip as u64 && *rip != 0 {
            *rip = e[1].load(SeqCst) as i64;
            e[2].fetch_add(1, SeqCst);
            return;
        }
    }
    // Not a known site: the default action (the test process dies on the real fault).
    // SAFETY: resetting this signal's disposition.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

fn install() {
    // SAFETY: a plain sigaction with a handler that only touches atomics and the context.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()), 0);
    }
}

fn set(i: usize, from: u64, to: u64) {
    TABLE[i][0].store(from, SeqCst);
    TABLE[i][1].store(to, SeqCst);
    TABLE[i][2].store(0, SeqCst);
}

fn record_slot(pc: u64, slot: u64) {
    SLOT[0].store(slot, SeqCst);
    SLOT[1].store(pc, SeqCst);
}

/// mov ecx, 5; mov rax, [rdi] (the fault site); add rax, rcx; ret;
/// fixup: mov rax, -14; add rax, rcx; ret
const CODE: [u8; 23] = [
    0xB9, 5, 0, 0, 0, // mov ecx, 5
    0x48, 0x8B, 0x07, // mov rax, [rdi]
    0x48, 0x01, 0xC8, // add rax, rcx
    0xC3, // ret
    0x48, 0xC7, 0xC0, 0xF2, 0xFF, 0xFF, 0xFF, // fixup: mov rax, -14
    0x48, 0x01, 0xC8, // add rax, rcx
    0xC3, // ret
];
const SITE: u64 = 5;
const FIXUP: u64 = 12;

#[test]
fn a_fault_in_a_slot_continues_at_its_fixup() {
    install();
    let f = rwx_near(a_fault_in_a_slot_continues_at_its_fixup as *const () as u64, 4096).expect("code memory");
    // SAFETY: our fresh page.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), f as *mut u8, CODE.len()) };
    let good = Box::new(37u64);
    let good = &*good as *const u64 as u64;
    let bad = 16u64; // never mapped

    // Natively: the table knows the native pc.
    set(0, f + SITE, f + FIXUP);
    let mut h = Harness::new(None);
    assert_eq!(h.run_native(f, &[good]).rax, 42);
    assert_eq!(h.run_native(f, &[bad]).rax as i64, -9);
    assert_eq!(TABLE[0][2].load(SeqCst), 1, "the native fault went through the table");

    // Translated, the site in a slot: the slot is registered as the native pc was.
    let mut env = HostEnv::new();
    env.fault_sites = vec![f + SITE];
    env.on_fault_slot = Some(record_slot);
    let mut h = Harness::with_env(None, Config::default(), env);
    let r = h.run(f, &[good]);
    assert_eq!((r.stop, r.rax), (StopKind::Sentinel, 42));
    let slot = SLOT[0].load(SeqCst);
    assert_eq!(SLOT[1].load(SeqCst), f + SITE);
    assert_ne!(slot, 0);
    assert_eq!(h.engine.stats.fault_sites, 1);
    // The slot holds the instruction and a jump back; the fragment jumps to it.
    // SAFETY: code-cache bytes of the slot.
    let sb = unsafe { std::slice::from_raw_parts(slot as *const u8, 8) };
    assert_eq!(&sb[..3], &CODE[SITE as usize..SITE as usize + 3]);
    assert_eq!(sb[3], 0xE9);
    // The fixup continues translated (as the kernel's #VE would bring it into the cache).
    let fixup_entry = h.engine.fragment_for(f + FIXUP).expect("fixup translated");
    set(1, slot, fixup_entry);
    let r = h.run(f, &[bad]);
    assert_eq!((r.stop, r.rax as i64), (StopKind::Sentinel, -9));
    assert_eq!(TABLE[1][2].load(SeqCst), 1, "the translated fault was at the slot");
    assert_eq!(TABLE[0][2].load(SeqCst), 1, "and not at the native pc");

    // Without the slot the translated fault happens at an address no table knows (the
    // inline copy, inside the fragment): the "kernel" finds no fixup and the process
    // dies of the fault, as the kernel would oops. (In a child: this file holds one test,
    // so the fork copies no other test's thread.)
    let mut h = Harness::new(None);
    assert_eq!(h.run(f, &[good]).rax, 42);
    assert_eq!(h.engine.stats.fault_sites, 0);
    // SAFETY: fork; the child only runs the translation and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let r = h.run(f, &[bad]);
        // SAFETY: leaving the child without unwinding into the test harness.
        unsafe { libc::_exit(if r.rax as i64 == -9 { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV, "status {status:#x}");

    rip_relative_fault_site();
    native_return_slot(f);
}

/// With `Config::fault_slot_native_return` (the kernel's choice) the slot depends on no
/// fragment: after its instruction it looks the next instruction's native pc up in the
/// shared table (a lookup frame, as an indirect jump builds), so the run goes on in the
/// cache (here the next pc, mid-fragment, is a miss and gets its own fragment); without
/// the table it would jump to the native pc (kernel: a #VE back in; on the host the
/// native code would escape the cache and return to the sentinel natively).
fn native_return_slot(f: u64) {
    let mut env = HostEnv::new();
    env.fault_sites = vec![f + SITE];
    env.on_fault_slot = Some(record_slot);
    let cfg = Config { fault_slot_native_return: true, ..Config::default() };
    let mut h = Harness::with_env(None, cfg, env);
    let good = Box::new(37u64);
    let r = h.run(f, &[&*good as *const u64 as u64]);
    assert_eq!((r.stop, r.rax), (StopKind::Sentinel, 42));
    let slot = SLOT[0].load(SeqCst);
    assert_eq!(SLOT[1].load(SeqCst), f + SITE);
    assert!(h.engine.lookup(f + SITE + 3).is_some(), "the next pc was reached through the lookup, translated");
    // SAFETY: code-cache bytes of the slot.
    let sb = unsafe { std::slice::from_raw_parts(slot as *const u8, dbt::FAULT_SLOT_BYTES) };
    assert_eq!(&sb[..3], &CODE[SITE as usize..SITE as usize + 3]);
    let mut d = iced_x86::Decoder::with_ip(64, &sb[3..], slot + 3, iced_x86::DecoderOptions::NONE);
    let tail: Vec<_> = (0..6).map(|_| d.decode()).collect();
    use iced_x86::{Mnemonic::*, Register};
    let m: Vec<_> = tail.iter().map(|i| i.mnemonic()).collect();
    assert_eq!(m, [Lea, Push, Push, Mov, Movzx, Jmp], "{tail:?}");
    assert_eq!((tail[2].op0_register(), tail[3].op0_register()), (Register::RCX, Register::RCX));
    assert_eq!(tail[3].immediate(1), f + SITE + 3, "the lookup's target is the next native pc");
    assert!(tail.iter().all(|i| i.rflags_modified() == 0));
}

/// A RIP-relative fault site is re-encoded for the slot's address.
fn rip_relative_fault_site() {
    // mov rax, [rip + 0x100 - 7]; add rax, 1; ret   (data at +0x100)
    let mut code = vec![0x48, 0x8B, 0x05];
    code.extend_from_slice(&(0x100i32 - 7).to_le_bytes());
    code.extend_from_slice(&[0x48, 0x83, 0xC0, 0x01, 0xC3]);
    let f = rwx_near(rip_relative_fault_site as *const () as u64, 4096).expect("code memory");
    // SAFETY: our fresh page: the code, and the data word at +0x100.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), f as *mut u8, code.len());
        ((f + 0x100) as *mut u64).write(0x1234);
    }
    let mut env = HostEnv::new();
    env.fault_sites = vec![f];
    let mut h = Harness::with_env(None, Config::default(), env);
    let r = h.run(f, &[]);
    assert_eq!((r.stop, r.rax), (StopKind::Sentinel, 0x1235));
    assert_eq!(h.engine.stats.fault_sites, 1);
}
