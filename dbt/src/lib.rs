//! kdbt dynamic binary translator engine (see README.md).
#![no_std]
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod asm;
pub mod client;
pub mod engine;
pub mod ibl;
pub mod kclass;
pub mod pcmap;
pub mod pool;
pub mod scratch;
pub mod templates;

#[cfg(feature = "host")]
pub mod host;

pub use client::{BbCov, BlockInfo, Client, InsCount, Inserts, MemTrace, NullClient, Snippet, Where};
pub use engine::{Config, Engine, Env, Stats, StopKind};
pub use kclass::{KClass, Thunk};
pub use pcmap::{NativePc, PcIndex};
pub use scratch::{Frame, GuestCtx, Scratch};
#[cfg(feature = "host")]
pub mod corpus;
#[cfg(feature = "host")]
pub mod host_alloc;
