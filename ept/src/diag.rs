//! EPT-violation diagnostics: decoding the exit qualification (SDM vol. 3, table 28-7
//! "Exit Qualification for EPT Violations") and formatting one line for the log.
use core::fmt::{self, Write};

use crate::table::{Perms, Translation};

/// Decoded exit qualification of an EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationQual {
    pub raw: u64,
    /// Bits 0-2: the access was a data read / data write / instruction fetch.
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// Bits 3-5: the guest-physical address was readable / writable / executable
    /// (supervisor-mode executable with MBEC).
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// Bit 6: user-mode executable (MBEC only).
    pub user_executable: bool,
    /// Bit 7: the guest linear-address field is valid.
    pub gla_valid: bool,
    /// Bit 8 (when bit 7 is set): the access was to the translated linear address (true)
    /// or to a guest paging-structure entry (false).
    pub gla_translated: bool,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
    /// Bit 13: shadow-stack access.
    pub shadow_stack: bool,
    /// Bit 16: asynchronous to instruction execution (e.g. a trace-output write).
    pub asynchronous: bool,
}

impl ViolationQual {
    pub fn decode(raw: u64) -> ViolationQual {
        let b = |n: u32| raw & (1 << n) != 0;
        ViolationQual {
            raw,
            read: b(0),
            write: b(1),
            fetch: b(2),
            readable: b(3),
            writable: b(4),
            executable: b(5),
            user_executable: b(6),
            gla_valid: b(7),
            gla_translated: b(7) && b(8),
            nmi_unblocking: b(12),
            shadow_stack: b(13),
            asynchronous: b(16),
        }
    }

    /// The rights the page had according to the qualification.
    pub fn had(&self) -> Perms {
        let mut p = Perms::empty();
        p.set(Perms::R, self.readable);
        p.set(Perms::W, self.writable);
        p.set(Perms::X, self.executable);
        p
    }

    /// The access as a short word.
    pub fn access(&self) -> &'static str {
        match (self.read, self.write, self.fetch) {
            (_, true, _) => "write",
            (_, _, true) => "fetch",
            (true, _, _) => "read",
            _ => "none",
        }
    }
}

/// What a software walk of the EPT says of the page now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Now {
    /// Not walked (e.g. in VMX root mode, where the tables' lock cannot be waited for).
    Unknown,
    Unmapped,
    Mapped(Translation),
}

/// Formats one line describing an EPT violation: GPA, access, rights at the time (from
/// the qualification), the current mapping (from a software walk, when there was one),
/// and the guest linear address when valid. `gla` is the VMCS guest-linear-address field.
pub fn format_violation(out: &mut impl Write, gpa: u64, gla: u64, qual: u64, now: Now) -> fmt::Result {
    let q = ViolationQual::decode(qual);
    write!(out, "EPT violation: gpa={gpa:#x} access={} (qual={qual:#x}) had={}", q.access(), q.had())?;
    match now {
        Now::Mapped(t) => {
            write!(out, " now={} type={} page={}K", t.perms, t.memtype.name(), t.page_size.bytes() / 1024)?
        }
        Now::Unmapped => write!(out, " now=unmapped")?,
        Now::Unknown => {}
    }
    if q.gla_valid {
        write!(
            out,
            " gla={gla:#x} ({})",
            if q.gla_translated { "translated address" } else { "guest paging-structure access" }
        )?;
    } else {
        write!(out, " gla=invalid")?;
    }
    if q.nmi_unblocking {
        write!(out, " nmi-unblocking")?;
    }
    if q.shadow_stack {
        write!(out, " shadow-stack")?;
    }
    if q.asynchronous {
        write!(out, " async")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mtrr::MemType;
    use crate::table::PageSize;

    extern crate std;
    use std::string::String;

    #[test]
    fn decode_bits() {
        // Write to a read-only page, linear address valid and translated.
        let q = ViolationQual::decode(0b1_1000_1010);
        assert!(q.write && !q.read && !q.fetch);
        assert!(q.readable && !q.writable && !q.executable);
        assert!(q.gla_valid && q.gla_translated);
        assert_eq!(q.had(), Perms::R);
        assert_eq!(q.access(), "write");
        // Fetch from a non-executable page during a guest page walk.
        let q = ViolationQual::decode(0b0_1001_1100);
        assert!(q.fetch && q.readable && q.writable && !q.executable && q.gla_valid && !q.gla_translated);
        assert_eq!(q.access(), "fetch");
        // Bit 8 means nothing without bit 7.
        assert!(!ViolationQual::decode(1 << 8).gla_translated);
        let q = ViolationQual::decode(u64::MAX);
        assert!(q.nmi_unblocking && q.shadow_stack && q.asynchronous && q.user_executable);
    }

    #[test]
    fn formats_one_line() {
        let mut s = String::new();
        let t = Translation {
            hpa: 0x1234_5000,
            perms: Perms::RX,
            memtype: MemType::Wb,
            page_size: PageSize::Size4K,
            ignore_pat: false,
        };
        format_violation(&mut s, 0x1234_5678, 0xffff_8880_1234_5678, 0b1_1010_1010, Now::Mapped(t)).unwrap();
        assert_eq!(
            s,
            "EPT violation: gpa=0x12345678 access=write (qual=0x1aa) had=r-x now=r-x type=WB page=4K gla=0xffff888012345678 (translated address)"
        );
        let mut s = String::new();
        format_violation(&mut s, 0x10_0000_0000, 0, 0x1 | 1 << 12, Now::Unmapped).unwrap();
        assert_eq!(
            s,
            "EPT violation: gpa=0x1000000000 access=read (qual=0x1001) had=--- now=unmapped gla=invalid nmi-unblocking"
        );
    }
}
