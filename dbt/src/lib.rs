//! kdbt dynamic binary translator engine (see README.md).
#![no_std]
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod asm;
pub mod client;
pub mod engine;
pub mod entry_calls;
pub mod extable;
pub mod ibl;
pub mod kclass;
pub mod pcmap;
pub mod pool;
pub mod scratch;
pub mod templates;
pub mod ve;

#[cfg(feature = "host")]
pub mod host;

pub use client::{BbCov, BlockInfo, Client, CovBlock, InsCount, Inserts, MemTrace, NullClient, Snippet, Where};
pub use engine::{Config, Engine, Env, Stats, StopKind, FAULT_SLOT_BYTES};
pub use kclass::{KClass, Thunk};
pub use pcmap::{NativePc, PcIndex};
pub use scratch::{Frame, GuestCtx, Scratch};
#[cfg(feature = "host")]
pub mod corpus;
#[cfg(feature = "host")]
pub mod host_alloc;

/// Builds the decoder's and encoder's static tables, which `iced-x86` builds
/// lazily on first use and never frees (about 1.4 MB in the kernel build).
/// An environment whose dispatcher allocates from a pool it later returns
/// ([`pool::Pool`]) calls this first, with its ordinary allocator, so the
/// tables do not land in (and outlive) the pool.
pub fn warm_up() {
    use iced_x86::{Decoder, DecoderOptions, Encoder};
    let insn = Decoder::with_ip(64, &[0x48, 0x89, 0x04, 0x24], 0, DecoderOptions::NONE).decode();
    let _ = insn.op_code();
    let _ = Encoder::new(64).encode(&insn, 0);
}
