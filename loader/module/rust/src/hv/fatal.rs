//! The fatal-exit record: written once, in root mode, by the CPU whose VM exit kdbt cannot
//! handle; read by that CPU's guest-side NMI handler, which panics with the description.
//! Lock-free: root mode may not wait, and the NMI handler may interrupt anything. The
//! record is never cleared: a fatal exit ends in a kernel panic.
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmx::exit::{Diag, Fatal};

const NO_OWNER: u32 = u32::MAX;

/// The CPU that claimed the record.
static OWNER: AtomicU32 = AtomicU32::new(NO_OWNER);
/// The record is written.
static READY: AtomicBool = AtomicBool::new(false);

/// A fatal exit as root mode saw it: for an EPT violation also the page's mapping at the
/// exit (root mode walked the tables, which the guest cannot read) and which hypervisor
/// object it is, if one.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub kind: Fatal,
    pub diag: Diag,
    pub now: ::ept::diag::Now,
    pub hidden: Option<::ept::hide::Hidden>,
}

struct Record(UnsafeCell<Option<Entry>>);
// SAFETY: written once by the CPU that won OWNER (before READY, release), read only after
// READY (acquire).
unsafe impl Sync for Record {}
static RECORD: Record = Record(UnsafeCell::new(None));

/// Claims the record for `cpu` and stores the exit; false if it is already claimed (by
/// another CPU, or by this one on an earlier fatal exit).
pub fn record(cpu: u32, entry: Entry) -> bool {
    if OWNER.compare_exchange(NO_OWNER, cpu, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return false;
    }
    // SAFETY: we won OWNER, so no one else writes; readers wait for READY.
    unsafe { *RECORD.0.get() = Some(entry) };
    READY.store(true, Ordering::Release);
    true
}

/// The recorded exit, if `cpu` took it.
pub fn for_cpu(cpu: u32) -> Option<Entry> {
    if READY.load(Ordering::Acquire) && OWNER.load(Ordering::Relaxed) == cpu {
        // SAFETY: written before READY was set, never written again.
        unsafe { *RECORD.0.get() }
    } else {
        None
    }
}

/// One line describing a fatal exit: EPT violations decoded from their qualification
/// (access, rights at the time) and, when walked, the page's mapping now.
pub struct Describe {
    pub cpu: u32,
    pub kind: Fatal,
    pub diag: Diag,
    pub now: ::ept::diag::Now,
    /// The page is hypervisor memory hidden from the guest: which object.
    pub hidden: Option<::ept::hide::Hidden>,
}

/// A field of a [`Diag`]: its value, or "unreadable" when its VMREAD failed.
struct Field(u64, bool);

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(f, "{:#x}", self.0)
        } else {
            f.write_str("unreadable")
        }
    }
}

impl fmt::Display for Describe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.diag;
        let field = |value, bit| Field(value, d.readable(bit));
        let decodable = d.readable(Diag::PHYSICAL | Diag::LINEAR | Diag::QUALIFICATION);
        write!(f, "fatal VM exit on cpu{}: ", self.cpu)?;
        let qualification = field(d.qualification, Diag::QUALIFICATION);
        match self.kind {
            Fatal::EptViolation if decodable => {
                ::ept::diag::format_violation(f, d.guest_physical, d.guest_linear, d.qualification, self.now)?;
                if let Some(h) = self.hidden {
                    write!(f, "; {h}")?;
                }
            }
            Fatal::Vmcs(e) => {
                write!(f, "{e} handling a {} exit, qualification {qualification}", vmx::exit::reason_name(d.reason))?;
            }
            kind => {
                write!(f, "{kind:?} ({}) qualification {qualification}", vmx::exit::reason_name(d.reason))?;
                if matches!(kind, Fatal::EptMisconfig | Fatal::EptViolation) {
                    write!(f, " gpa={}", field(d.guest_physical, Diag::PHYSICAL))?;
                }
            }
        }
        write!(
            f,
            " at rip={} rsp={} cr3={}",
            field(d.guest_rip, Diag::RIP),
            field(d.guest_rsp, Diag::RSP),
            field(d.guest_cr3, Diag::CR3)
        )
    }
}
