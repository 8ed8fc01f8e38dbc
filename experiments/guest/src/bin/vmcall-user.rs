//! Executes kdbt's VMCALL (ping) from user space. Under kdbt the hypervisor must refuse it
//! with #UD, so this program dies of SIGILL (exit status 132 in a shell); without a
//! hypervisor VMCALL raises #UD natively, with the same result. If it ever returns, the
//! hypervisor accepted a hypercall from CPL 3: that is printed and the status is 1.
fn main() {
    println!("vmcall-user: executing VMCALL at CPL 3");
    let mut rax: u64 = 0x7462_646b_0000_0001; // kdbt magic | Ping
                                              // SAFETY: VMCALL either raises #UD (SIGILL, the expected outcome) or, if a hypervisor
                                              // answered, returns with RAX (and RBX for ping) changed, which we declare.
    unsafe {
        core::arch::asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx", b = inout(reg) 0u64 => _, inout("rax") rax);
    }
    println!("vmcall-user: VMCALL returned rax={rax:#x}: a hypercall was accepted from user space");
    std::process::exit(1);
}
