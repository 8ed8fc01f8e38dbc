//! Shadow-paging MMU of kdbt (issue 9), host-tested logic only: not wired into the
//! hypervisor yet.
//!
//! - [`walk`]: a software walker of the guest's 4-level page tables that gives either the
//!   translation or the exact `#PF` error code the CPU would push, and sets accessed and
//!   dirty bits in the guest's entries the way the CPU does.
//! - [`mmu`]: per-CPU shadow page tables built lazily on `#PF` from the guest walk, the
//!   entry points the VM-exit handler calls (CR3 writes, INVLPG, INVPCID, `#PF`), and the
//!   counters.
//! - [`policy`]: the per-guest-physical-page permission hook (not writable / not
//!   executable), the same meaning as the EPT one.
//! - [`pool`]: the frames the shadow tables live in, taken once from a [`pool::FramePool`].
//!
//! `no_std`, no allocation: guest memory is reached through [`GuestMem`], shadow frames
//! through [`pool::FramePool`], so everything runs against fake memory in unit tests.
//! See `README.md` for the design, what the exit handler must do, and the limits.
#![no_std]

pub mod mmu;
pub mod policy;
pub mod pool;
mod tree;
pub mod walk;

#[cfg(test)]
pub(crate) mod testmem;

pub use mmu::{Cr3Action, HwFlush, Mmu, MmuError, PfOutcome};
pub use policy::{PagePolicy, PolicyLookup};
pub use pool::FramePool;
pub use walk::{Access, AccessKind, PageSize, PagingCtx, PfErrorCode, Translation, WalkError};

/// Guest-physical memory as the walker sees it.
///
/// In kdbt the guest is the kernel kdbt was loaded under and runs without EPT in shadow
/// mode, so a guest-physical address is a host-physical one; the implementation reaches it
/// through the kernel's direct map.
pub trait GuestMem {
    /// The 8 bytes at `gpa` (8-byte aligned). `None` if `gpa` is not memory the
    /// implementation is willing to read (the walk then stops with
    /// [`WalkError::Unbacked`]).
    fn read_u64(&self, gpa: u64) -> Option<u64>;
    /// Atomic compare-exchange of the 8 bytes at `gpa` (8-byte aligned): if they equal
    /// `expected`, store `new`. Returns the value found before (the exchange happened iff
    /// it equals `expected`), `None` if `gpa` is not memory.
    ///
    /// Must be one atomic read-modify-write as seen by other CPUs (`lock cmpxchg`), because
    /// the guest changes its entries concurrently on other CPUs: setting the accessed or
    /// dirty bit with a plain store could resurrect an entry another CPU just cleared.
    fn cmpxchg_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Option<u64>;
}
