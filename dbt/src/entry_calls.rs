//! Entry redirects: the direct calls and jumps by which native entry code (a kernel's
//! entry text, a native region) reaches translated text, and the trampolines that take
//! them into the code cache without an exception.
//!
//! Natively, `call do_syscall_64` in the entry text lands on a page that is not
//! executable while started, and the fetch is steered by #VE: one exception per system
//! call and per interrupt. The environment instead runs a copy of the entry pages in
//! which each such site's rel32 leads to a [`trampoline`] for its target; the trampoline
//! builds a lookup frame (`[rsp]` = rcx, `[rsp+8]` = rdx, rcx = the native target; the
//! return address the call pushed stays above it, where the native call left it) and
//! enters the engine's lookup routine, so a target translated before is reached through
//! the lookup table with no dispatch, and a new one through the miss entry. A trampoline
//! holds no engine state: it stays valid across invalidation and resets.
//!
//! [`direct_sites`] finds the sites by decoding the range linearly: entry text is code
//! and padding only (nops, `int3`), which decodes at every function start; an
//! undecodable instruction is reported (the caller then redirects nothing).
use alloc::vec::Vec;

use iced_x86::{Code, Decoder, DecoderOptions};

/// Bytes of one [`trampoline`].
pub const TRAMPOLINE_BYTES: usize = 14;

/// A direct `call rel32` or `jmp rel32` of native code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// Address of the instruction.
    pub at: u64,
    /// Its length (the rel32 is its last four bytes).
    pub len: u8,
    /// Where it goes natively.
    pub target: u64,
    /// A call (else a jump).
    pub call: bool,
}

impl Site {
    /// Address of the rel32 field.
    pub fn rel_at(&self) -> u64 {
        self.at + self.len as u64 - 4
    }

    /// The rel32 that makes this instruction go to `to`, if in reach.
    pub fn rel_to(&self, to: u64) -> Option<i32> {
        i32::try_from(to.wrapping_sub(self.at + self.len as u64) as i64).ok()
    }
}

/// The direct calls and jumps (rel32 forms) of `code` (the bytes at `lo`..) whose target
/// `wanted` accepts, in address order; `Err(pc)`: the instruction at `pc` does not
/// decode (or runs past the end), so the range is not plain code.
pub fn direct_sites(code: &[u8], lo: u64, wanted: impl Fn(u64) -> bool) -> Result<Vec<Site>, u64> {
    let mut d = Decoder::with_ip(64, code, lo, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        let insn = d.decode();
        if insn.is_invalid() {
            return Err(insn.ip());
        }
        let call = match insn.code() {
            Code::Call_rel32_64 => true,
            Code::Jmp_rel32_64 => false,
            _ => continue,
        };
        let target = insn.near_branch64();
        if wanted(target) {
            out.push(Site { at: insn.ip(), len: insn.len() as u8, target, call });
        }
    }
    Ok(out)
}

/// The trampoline at `at` that enters the cache for native `target` (above 2 GB from the
/// top: its sign-extended imm32 form) through `lookup` (the routine that takes a lookup
/// frame with rcx = the target): `push rdx; push rcx; mov rcx, target; jmp lookup`.
/// Flags untouched, nothing written below rsp but by its pushes. None if `target` or
/// `lookup` is out of reach.
pub fn trampoline(at: u64, target: u64, lookup: u64) -> Option<[u8; TRAMPOLINE_BYTES]> {
    let imm = i32::try_from(target as i64).ok()?;
    let rel = i32::try_from(lookup.wrapping_sub(at + TRAMPOLINE_BYTES as u64) as i64).ok()?;
    let mut b = [0u8; TRAMPOLINE_BYTES];
    b[0] = 0x52; // push rdx
    b[1] = 0x51; // push rcx
    b[2..5].copy_from_slice(&[0x48, 0xC7, 0xC1]); // mov rcx, imm32 (sign-extended)
    b[5..9].copy_from_slice(&imm.to_le_bytes());
    b[9] = 0xE9; // jmp rel32
    b[10..14].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use iced_x86::{Mnemonic, Register};

    const LO: u64 = 0xffff_ffff_8200_0000;

    #[test]
    fn finds_calls_and_jumps_into_the_wanted_range() {
        // nop; call +0x100; int3; jmp +0x20 (out of range); mov eax,1; call -5 (self); ret
        let mut code = vec![0x90, 0xE8];
        code.extend_from_slice(&0x100i32.to_le_bytes());
        code.push(0xCC);
        code.push(0xE9);
        code.extend_from_slice(&0x20i32.to_le_bytes());
        code.extend_from_slice(&[0xB8, 1, 0, 0, 0, 0xE8]);
        code.extend_from_slice(&(-5i32).to_le_bytes());
        code.push(0xC3);
        let wanted = |t: u64| t >= LO + 0x100;
        let s = direct_sites(&code, LO, wanted).unwrap();
        assert_eq!(s, vec![Site { at: LO + 1, len: 5, target: LO + 6 + 0x100, call: true }]);
        assert_eq!(s[0].rel_at(), LO + 2);
        let all = direct_sites(&code, LO, |_| true).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1], Site { at: LO + 7, len: 5, target: LO + 12 + 0x20, call: false });
        assert_eq!(all[2].target, LO + 17);
        // The rel32 that makes a site reach another target.
        assert_eq!(s[0].rel_to(LO + 6), Some(0));
        assert_eq!(s[0].rel_to(LO + 6 - 8), Some(-8));
        assert_eq!(s[0].rel_to(0x1_0000_0000), None);
    }

    #[test]
    fn undecodable_or_truncated_code_is_reported() {
        // 0x06 (push es) is invalid in 64-bit mode.
        assert_eq!(direct_sites(&[0x90, 0x06, 0x90], LO, |_| true), Err(LO + 1));
        // A call whose rel32 runs past the end.
        assert_eq!(direct_sites(&[0x90, 0xE8, 0, 0], LO, |_| true), Err(LO + 1));
    }

    #[test]
    fn trampoline_encodes_the_lookup_frame() {
        let at = 0xffff_ffff_c010_0000;
        let target = 0xffff_ffff_8100_1230;
        let lookup = at + 0x400;
        let b = trampoline(at, target, lookup).unwrap();
        let mut d = Decoder::with_ip(64, &b, at, DecoderOptions::NONE);
        let i: Vec<_> = core::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        assert_eq!(i.len(), 4);
        assert_eq!((i[0].mnemonic(), i[0].op0_register()), (Mnemonic::Push, Register::RDX));
        assert_eq!((i[1].mnemonic(), i[1].op0_register()), (Mnemonic::Push, Register::RCX));
        assert_eq!((i[2].mnemonic(), i[2].op0_register()), (Mnemonic::Mov, Register::RCX));
        assert_eq!(i[2].immediate(1), target);
        assert_eq!((i[3].mnemonic(), i[3].near_branch64()), (Mnemonic::Jmp, lookup));
        // Nothing there touches the flags.
        assert!(i.iter().all(|x| x.rflags_modified() == 0));
        // Out of reach: a target below the top 2 GB, a lookup more than 2 GB away.
        assert!(trampoline(at, 0x1_0000_0000, lookup).is_none());
        assert!(trampoline(at, target, at - (3 << 30)).is_none());
    }
}
