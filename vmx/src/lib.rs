//! VT-x logic of kdbt, independent of the kernel: capability decoding, the choice of
//! controls, VMCS programming, VM-exit handling, the hypercall ABI, segment descriptors. `no_std`; hardware access goes through small
//! traits so everything is unit-tested on the host.
#![no_std]

pub mod caps;
pub mod controls;
pub mod entry_check;
pub mod exit;
pub mod hypercall;
pub mod policy;
pub mod preflight;
pub mod segment;
pub mod shadow_exit;
pub mod vmcs;
pub mod xsave;
