//! Last-resort diagnostics from VMX root mode: polled writes to the first serial port.
//!
//! Root mode cannot call printk (it takes locks, may send IPIs, and the kernel's state is
//! the guest's). Fatal root-mode conditions are rare and leave the CPU halted, so the
//! message goes straight to COM1 (0x3f8), which the test bench (Bochs, QEMU) captures; on
//! a machine without a UART at 0x3f8 the writes go nowhere and the halt remains.
use core::fmt;

const COM1: u16 = 0x3f8;

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the legacy UART at CPL 0; writes to an absent device are ignored.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb; reading the line status register has no side effects.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

struct Com1;

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

fn put(b: u8) {
    // Wait (bounded) for the transmit holding register to empty.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// Prints a line on COM1.
pub fn line(args: fmt::Arguments<'_>) {
    let _ = fmt::write(&mut Com1, args);
    let _ = fmt::write(&mut Com1, format_args!("\n"));
}

/// Prints a line on COM1 and halts this CPU forever with interrupts off.
pub fn fatal(args: fmt::Arguments<'_>) -> ! {
    line(args);
    loop {
        // SAFETY: stopping this CPU is the documented outcome of a fatal root-mode error.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
