//! The per-CPU block reached through `%gs`, and the client counter block.
//!
//! Kernel-safe ABI: no guest register or flag value is ever kept here.
//! Translated code spills to the guest stack (see README "ABI"); the block
//! holds only what translated code *reads* (the dispatcher entry addresses)
//! and what the dispatcher and the environment keep per CPU (its stack, the
//! engine, the host's resume state, client slots). It is 512 bytes; the
//! client counters (per CPU, `gs`-relative, written by instrumentation) are a
//! second block at `gs:[OFF_COUNTERS]`, and the extended-state save area is
//! on the dispatcher's stack. In the kernel both blocks are one 4 KiB
//! per-CPU allocation at `%gs` offset `Config::gs_base`; on the
//! host the harness allocates them together and points the user `%gs` base
//! `HOST_GS_BASE` below the first.
//!
//! The inline-lookup table is *shared* by all CPUs (see [`crate::ibl`]).

/// Number of per-CPU counters clients may address with `gs:[disp32]`: the
/// block and its counters make one 4 KB per-CPU area.
pub const COUNTERS: usize = 448;

/// Guest general purpose registers + rip + rflags, iced/hardware order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCtx {
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8 .. r15
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

impl GuestCtx {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
}

/// What the dispatcher entry routines build on the dispatcher stack: the
/// guest context as it was at the exit (the stub's or lookup's own pushes
/// undone), and what the exit passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    pub ctx: GuestCtx, // 0 .. 144
    /// Exit record address ([`Frame::KIND_EXIT`]) or guest target
    /// ([`Frame::KIND_IND`]).
    pub arg: u64, // 144
    pub kind: u64,     // 152
}

impl Frame {
    /// A direct exit: `arg` is the stub's exit record.
    pub const KIND_EXIT: u64 = 0;
    /// An inline-lookup miss: `arg` is the guest target.
    pub const KIND_IND: u64 = 1;
}

/// The per-CPU block. Field offsets are part of the generated code's and
/// `asm.rs`'s ABI and are checked at compile time below.
#[repr(C, align(64))]
pub struct Scratch {
    /// Linear address of this block (gs:[0]).
    pub self_ptr: u64, // 0
    /// Jump target of the host's final transfer into translated code
    /// (`jmp gs:[TGT]`, see README "ABI": only the host path uses it).
    pub tgt: u64, // 8
    /// Direct-exit entry of the dispatcher (`jmp gs:[EXIT_ENTRY]` in stubs).
    pub exit_entry: u64, // 16
    /// Lookup-miss entry of the dispatcher (`jmp gs:[MISS_ENTRY]`: empty
    /// table entries hold it too).
    pub miss_entry: u64, // 24
    /// Top of the dispatcher's own stack (16-byte aligned; the entry builds
    /// its [`Frame`] and the xsave area below it).
    pub dstack_top: u64, // 32
    /// Engine pointer (opaque to the asm).
    pub engine: u64, // 40
    /// Host rsp saved by `dbt_enter`.
    pub host_rsp: u64, // 48
    /// Rust dispatcher function
    /// (`extern "C" fn(*mut Scratch, *mut Frame) -> u64`).
    pub rust_dispatch: u64, // 56
    /// Non-zero: the dispatcher saves/restores extended state with xsave,
    /// and this is its requested-feature bitmap (edx:eax): only components
    /// whose standard-format layout ends within [`XSAVE_AREA`] (so not AMX
    /// tile data, which no dispatcher code touches).
    pub save_xstate: u64, // 64
    /// Why the run stopped when the dispatcher returned to the host.
    pub exit_reason: u64, // 72
    pub exit_pc: u64, // 80
    /// Linear address of this CPU's counter block (`gs:[OFF_COUNTERS]`).
    pub counters_ptr: u64, // 88
    /// Inline-lookup hits (`Config::count_lookups`).
    pub lookup_hits: u64, // 96
    /// Quiescence: dispatcher entries of this CPU (bumped under the engine
    /// lock). A CPU whose count moved since an invalidation has left the
    /// invalidated code.
    pub epoch: u64, // 104
    /// Slots owned by the client tools (ring positions, bases).
    pub client: [u64; 16], // 112 .. 240
    /// Non-zero while the CPU is outside translated code (the environment
    /// sets it around its entries and exits): quiescent.
    pub outside: u64, // 240
    /// The environment's: non-zero while this CPU runs the dispatcher (the
    /// kernel's allocator serves such a CPU from the dispatcher's pool).
    pub env: u64, // 248
    /// The guest context the host harness enters with and gets back.
    pub ctx: GuestCtx, // 256 .. 400
    /// The environment's: linear address of this CPU's #VE information area
    /// (read by the per-CPU #VE stub, [`crate::ve::ve_entry_stub_gs`]).
    pub ve_info: u64, // 400
    /// #VEs this CPU's stub steered into the dispatcher.
    pub ve_count: u64, // 408
    /// The environment's: dispatcher entries of this CPU.
    pub dispatches: u64, // 416
    pub _pad2: [u64; 11], // 424 .. 512
}

/// The client counter block, at `gs:[OFF_COUNTERS]`.
#[repr(C, align(64))]
pub struct Counters {
    pub c: [u64; COUNTERS],
}

/// A CPU's whole `gs`-relative area as the host harness allocates it.
#[repr(C, align(64))]
pub struct PerCpuArea {
    pub scratch: Scratch,
    pub counters: Counters,
}

pub const OFF_SELF: i64 = 0;
pub const OFF_TGT: i64 = 8;
pub const OFF_EXIT_ENTRY: i64 = 16;
pub const OFF_MISS_ENTRY: i64 = 24;
pub const OFF_LOOKUP_HITS: i64 = 96;
pub const OFF_CLIENT: i64 = 112;
pub const OFF_ENV: i64 = 248;
pub const OFF_VE_INFO: i64 = 400;
pub const OFF_VE_COUNT: i64 = 408;
/// Offset of the counter block from the `%gs` base.
pub const OFF_COUNTERS: i64 = 512;

/// Size of the xsave area on the dispatcher stack.
pub const XSAVE_AREA: usize = 4096;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(Scratch, tgt) == OFF_TGT as usize);
    assert!(offset_of!(Scratch, exit_entry) == OFF_EXIT_ENTRY as usize);
    assert!(offset_of!(Scratch, miss_entry) == OFF_MISS_ENTRY as usize);
    assert!(offset_of!(Scratch, dstack_top) == 32);
    assert!(offset_of!(Scratch, engine) == 40);
    assert!(offset_of!(Scratch, host_rsp) == 48);
    assert!(offset_of!(Scratch, rust_dispatch) == 56);
    assert!(offset_of!(Scratch, save_xstate) == 64);
    assert!(offset_of!(Scratch, env) == OFF_ENV as usize);
    assert!(offset_of!(Scratch, counters_ptr) == 88);
    assert!(offset_of!(Scratch, lookup_hits) == OFF_LOOKUP_HITS as usize);
    assert!(offset_of!(Scratch, client) == OFF_CLIENT as usize);
    assert!(offset_of!(Scratch, ctx) == 256);
    assert!(offset_of!(Scratch, ve_info) == OFF_VE_INFO as usize);
    assert!(offset_of!(Scratch, ve_count) == OFF_VE_COUNT as usize);
    assert!(size_of::<Scratch>() == 512);
    assert!(size_of::<Scratch>() <= 4096);
    assert!(size_of::<PerCpuArea>() == 4096);
    assert!(offset_of!(PerCpuArea, counters) == OFF_COUNTERS as usize);
    assert!(size_of::<Frame>() == 160);
    assert!(offset_of!(Frame, arg) == 144);
    assert!(offset_of!(Frame, kind) == 152);
};

impl Scratch {
    /// Initialise a block in place.
    pub fn init(&mut self) {
        self.self_ptr = self as *mut Scratch as u64;
        self.outside = 1;
    }

    /// This CPU's counters.
    ///
    /// # Safety
    /// `counters_ptr` is this CPU's live counter block (set by the
    /// environment), and no `&mut` to it exists.
    pub unsafe fn counters(&self) -> &Counters {
        // SAFETY: the caller's contract.
        unsafe { &*(self.counters_ptr as *const Counters) }
    }
}
