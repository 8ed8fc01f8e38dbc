//! Single-stepping over CPUID (which always exits under VT-x, so a hypervisor emulates it).
//!
//! 1. `--n N` times: POPF sets RFLAGS.TF right before a CPUID, so natively the single-step
//!    trap (SIGTRAP) comes right after the CPUID, at the label that follows it. The
//!    handler records where it stopped and clears TF.
//! 2. Once: TF set across a fixed sequence of 8 instructions, CPUID among them, the handler
//!    counting every trap and leaving TF as it is.
//!
//! Prints `traps=… at_label=… seq_traps=…`; the figures must be the same with and without
//! a hypervisor. Exit status 0 when every trap of part 1 came right after its CPUID.
use std::sync::atomic::{AtomicU64, Ordering};

static TRAPS: AtomicU64 = AtomicU64::new(0);
static LAST_RIP: AtomicU64 = AtomicU64::new(0);
/// Part 1 clears TF in the handler; part 2 leaves it.
static CLEAR_TF: AtomicU64 = AtomicU64::new(1);

const TF: i64 = 1 << 8;

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    TRAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    LAST_RIP.store(uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64, Ordering::Relaxed);
    if CLEAR_TF.load(Ordering::Relaxed) != 0 {
        uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF;
    }
}

/// POPF with TF, CPUID, label: returns the label's address.
fn step_over_cpuid() -> u64 {
    let label: u64;
    // SAFETY: sets TF (the handler clears it at the first trap) and runs CPUID; RBX, which
    // CPUID writes and Rust reserves, is saved and restored; EAX..EDX are declared clobbered.
    unsafe {
        core::arch::asm!(
            "mov {save}, rbx",
            "lea {label}, [rip + 2f]",
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "cpuid",
            "2:",
            "mov rbx, {save}",
            save = out(reg) _,
            label = out(reg) label,
            inout("eax") 0 => _,
            inout("ecx") 0 => _,
            out("edx") _,
        );
    }
    label
}

/// TF across 8 instructions, CPUID the third; TF cleared by the last POPF.
fn sequence() {
    // SAFETY: as above; TF is clear again when the block ends (the final POPF).
    unsafe {
        core::arch::asm!(
            "mov {save}, rbx",
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "nop",
            "nop",
            "cpuid",
            "nop",
            "nop",
            "pushfq",
            "and qword ptr [rsp], -0x101",
            "popfq",
            "mov rbx, {save}",
            save = out(reg) _,
            inout("eax") 0 => _,
            inout("ecx") 0 => _,
            out("edx") _,
        );
    }
}

fn main() {
    let mut n = 50u64;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--n") {
        match args.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(v) => n = v,
            None => {
                eprintln!("tf-cpuid: --n needs a number");
                std::process::exit(2);
            }
        }
    }
    // SAFETY: installs a plain SA_SIGINFO handler for SIGTRAP; the struct is zeroed first.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_trap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()) != 0 {
            eprintln!("tf-cpuid: sigaction: {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
    }
    let mut at_label = 0u64;
    let mut wrong = None;
    for _ in 0..n {
        let before = TRAPS.load(Ordering::Relaxed);
        let label = step_over_cpuid();
        if TRAPS.load(Ordering::Relaxed) == before + 1 && LAST_RIP.load(Ordering::Relaxed) == label {
            at_label += 1;
        } else if wrong.is_none() {
            wrong = Some((label, LAST_RIP.load(Ordering::Relaxed)));
        }
    }
    let traps = TRAPS.load(Ordering::Relaxed);
    CLEAR_TF.store(0, Ordering::Relaxed);
    sequence();
    let seq_traps = TRAPS.load(Ordering::Relaxed) - traps;
    println!("traps={traps} at_label={at_label} seq_traps={seq_traps}");
    if let Some((label, rip)) = wrong {
        println!("tf-cpuid: first trap not right after CPUID: label={label:#x} trap rip={rip:#x}");
    }
    std::process::exit(if at_label == n { 0 } else { 1 });
}
