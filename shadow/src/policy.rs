//! The permission policy hook: per guest-physical 4 KiB page, "not writable" and/or "not
//! executable", for every virtual alias of the page. The same meaning as the EPT
//! permission changes of `ept::table` (minus execute-only, see `README.md`).
//!
//! The policy itself is shared by all CPUs and lives outside the per-CPU MMUs: the MMU
//! asks a [`PolicyLookup`] whenever it writes a shadow leaf, and
//! [`crate::Mmu::apply_policy`] restricts the shadow leaves already written. Changing a
//! page's policy is therefore: update the store, then call `apply_policy` on every CPU's
//! MMU (each under the lock that serializes it with its exit handler, or from an IPI) and
//! do the hardware flush it returns on that CPU, before relying on the new policy.
use core::sync::atomic::{AtomicU8, Ordering};

use bitflags::bitflags;

bitflags! {
    /// Restrictions on one guest-physical page.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PagePolicy: u8 {
        /// Shadow leaves mapping the page are never writable: a write faults to kdbt.
        const NOT_WRITABLE = 1 << 0;
        /// Shadow leaves mapping the page have XD set: a fetch faults to kdbt.
        const NOT_EXECUTABLE = 1 << 1;
    }
}

/// Where the MMU finds a page's policy.
pub trait PolicyLookup {
    /// The policy of the 4 KiB page containing `gpa`.
    fn policy(&self, gpa: u64) -> PagePolicy;
}

/// No restrictions anywhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPolicy;

impl PolicyLookup for NoPolicy {
    fn policy(&self, _gpa: u64) -> PagePolicy {
        PagePolicy::empty()
    }
}

/// The page is beyond the bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange(pub u64);

/// A policy store for `[0, 4 * 4096 * bits.len())`: two bits per 4 KiB page in memory the
/// caller provides (32 KiB covers 512 MiB, 8 MiB covers 128 GiB). Lock-free: readers on
/// any CPU, writers serialized by the caller or not (each update is one atomic RMW).
/// Pages beyond the end have no restrictions.
pub struct PolicyBitmap<'a> {
    bits: &'a [AtomicU8],
}

impl<'a> PolicyBitmap<'a> {
    pub fn new(bits: &'a [AtomicU8]) -> PolicyBitmap<'a> {
        PolicyBitmap { bits }
    }

    /// Number of guest-physical bytes covered.
    pub fn covers(&self) -> u64 {
        self.bits.len() as u64 * 4 * 4096
    }

    fn slot(&self, gpa: u64) -> Option<(&AtomicU8, u32)> {
        let page = gpa >> 12;
        let byte = usize::try_from(page / 4).ok()?;
        Some((self.bits.get(byte)?, (page % 4) as u32 * 2))
    }

    /// Sets the policy of the page containing `gpa`; returns the previous one.
    pub fn set(&self, gpa: u64, policy: PagePolicy) -> Result<PagePolicy, OutOfRange> {
        let (cell, shift) = self.slot(gpa).ok_or(OutOfRange(gpa))?;
        let mask = 0b11u8 << shift;
        let new = (policy.bits() & 0b11) << shift;
        let old = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some((v & !mask) | new));
        // fetch_update with a closure that always returns Some cannot fail.
        let old = old.unwrap_or_else(|v| v);
        Ok(PagePolicy::from_bits_truncate((old & mask) >> shift))
    }
}

impl PolicyLookup for PolicyBitmap<'_> {
    fn policy(&self, gpa: u64) -> PagePolicy {
        match self.slot(gpa) {
            Some((cell, shift)) => PagePolicy::from_bits_truncate((cell.load(Ordering::Acquire) >> shift) & 0b11),
            None => PagePolicy::empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_pages_independently() {
        let cells: [AtomicU8; 2] = [AtomicU8::new(0), AtomicU8::new(0)];
        let p = PolicyBitmap::new(&cells);
        assert_eq!(p.covers(), 8 * 4096);
        assert_eq!(p.set(0x3000, PagePolicy::NOT_WRITABLE), Ok(PagePolicy::empty()));
        assert_eq!(p.set(0x4fff, PagePolicy::all()), Ok(PagePolicy::empty()));
        assert_eq!(p.policy(0x3123), PagePolicy::NOT_WRITABLE);
        assert_eq!(p.policy(0x4000), PagePolicy::all());
        assert_eq!(p.policy(0x2000), PagePolicy::empty());
        assert_eq!(p.policy(0x5000), PagePolicy::empty());
        assert_eq!(p.set(0x3000, PagePolicy::NOT_EXECUTABLE), Ok(PagePolicy::NOT_WRITABLE));
        assert_eq!(p.policy(0x3000), PagePolicy::NOT_EXECUTABLE);
        assert_eq!(p.set(0x8000, PagePolicy::all()), Err(OutOfRange(0x8000)));
        assert_eq!(p.policy(0x8000), PagePolicy::empty());
        assert_eq!(p.policy(u64::MAX), PagePolicy::empty());
    }
}
