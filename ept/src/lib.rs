//! EPT identity map of kdbt: memory types from the MTRRs ([`mtrr`]), the paging-structure
//! builder, software walk, per-4 KiB permission changes and remaps ([`table`]), and EPT-violation
//! diagnostics ([`diag`]). `no_std`, no allocation: paging structures come from a
//! [`table::FrameAllocator`], so all of it is unit-tested on the host.
#![no_std]

pub mod diag;
pub mod hide;
pub mod mtrr;
pub mod table;

pub use mtrr::{MemType, Mtrrs};
pub use table::{Ept, EptCaps, EptError, FrameAllocator, PageSize, Perms, Translation};
