//! The per-CPU scratch block reached through `%gs`.
//!
//! Translated code never touches the guest stack for its own state: every
//! spill slot, the inline indirect-branch table and the dispatcher's saved
//! guest context live here. In the kernel `%gs` already points at per-CPU
//! data, so the environment places one `Scratch` per CPU at a fixed offset
//! from the per-CPU base (and `SELF` holds its linear address); on the host
//! the harness points the user `%gs` base at a per-thread block.

/// Number of entries of the inline lookup table (indexed by the low 16 bits
/// of the guest target; extracting those with `movzx` leaves the flags alone).
pub const IBL_ENTRIES: usize = 1 << 16;
/// Number of per-CPU counters clients may address with `gs:[disp32]`.
pub const COUNTERS: usize = 4096;

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

/// The per-CPU block. Field offsets are part of the generated code's ABI and
/// are checked at compile time below.
#[repr(C, align(64))]
pub struct Scratch {
    /// Linear address of this block (gs:[0]); the dispatcher uses it to get
    /// a normal pointer.
    pub self_ptr: u64, // 0
    /// Guest rax while an exit stub / dispatcher entry runs.
    pub save_rax: u64, // 8
    /// Guest rcx / rdx during an inline lookup.
    pub save_rcx: u64, // 16
    pub save_rdx: u64, // 24
    /// Jump target slot (`jmp gs:[TGT]`).
    pub tgt: u64, // 32
    /// Address of the dispatcher entry routine (`jmp gs:[DISPATCH]`).
    pub dispatch_entry: u64, // 40
    /// Top of the dispatcher's own stack.
    pub dstack_top: u64, // 48
    /// Engine pointer (opaque to the asm).
    pub engine: u64, // 56
    /// Host rsp saved by `dbt_enter`.
    pub host_rsp: u64, // 64
    /// Argument of the last exit: an exit record address or `EXIT_IND`.
    pub exit_arg: u64, // 72
    /// Guest target of an indirect branch that missed the inline table.
    pub ind_target: u64, // 80
    /// Rust dispatcher function (`extern "C" fn(*mut Scratch) -> u64`).
    pub rust_dispatch: u64, // 88
    /// Non-zero: the dispatcher saves/restores extended state with xsave.
    pub save_xstate: u64, // 96
    /// Why the run stopped when the dispatcher returned to the host.
    pub exit_reason: u64, // 104
    pub exit_pc: u64,  // 112
    /// Shared inline-lookup miss routine (`asm::dbt_ind_miss`): what empty
    /// table entries hold, and where a fragment's target check goes when the
    /// entry belonged to another guest pc.
    pub ind_miss: u64, // 120
    /// Saved guest context while the dispatcher runs.
    pub ctx: GuestCtx, // 128 .. 272
    /// Inline-lookup hits (`Config::count_lookups`; the misses reach the
    /// dispatcher and are counted there).
    pub lookup_hits: u64, // 272
    pub _pad1: u64,    // 280
    /// Spill slots for instrumentation (engine-managed: registers the client
    /// clobbers and the arithmetic flags).
    pub spill: [u64; 16], // 288 .. 416
    /// Slots owned by the client tools (counters, ring positions).
    pub client: [u64; 16], // 416 .. 544
    pub _pad2: [u64; 4], // 544 .. 576
    /// xsave area of the guest's extended state while the dispatcher runs.
    pub xsave: [u8; 4096], // 576 (64-aligned)
    /// Counters owned by the client tools (e.g. inscount's, spread over
    /// many slots so that blocks do not all update one memory location).
    pub counters: [u64; COUNTERS],
    /// Inline indirect-branch lookup: entry `t & 0xffff` holds the indirect
    /// entry (target check) of a fragment whose guest pc has those low bits,
    /// or `ind_miss`. No tags: the fragment's own check compares the guest
    /// target with its pc (see README "Indirect branches").
    pub ibl: [u64; IBL_ENTRIES],
}

pub const OFF_SELF: i64 = 0;
pub const OFF_SAVE_RAX: i64 = 8;
pub const OFF_SAVE_RCX: i64 = 16;
pub const OFF_SAVE_RDX: i64 = 24;
pub const OFF_TGT: i64 = 32;
pub const OFF_DISPATCH: i64 = 40;
pub const OFF_IND_TARGET: i64 = 80;
pub const OFF_IND_MISS: i64 = 120;
pub const OFF_CTX: i64 = 128;
pub const OFF_SPILL: i64 = 288;
pub const OFF_CLIENT: i64 = 416;
pub const OFF_IBL: i64 = core::mem::offset_of!(Scratch, ibl) as i64;
pub const OFF_LOOKUP_HITS: i64 = 272;
pub const OFF_COUNTERS: i64 = core::mem::offset_of!(Scratch, counters) as i64;

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, save_rax) == 8);
    assert!(offset_of!(Scratch, save_rcx) == 16);
    assert!(offset_of!(Scratch, save_rdx) == 24);
    assert!(offset_of!(Scratch, tgt) == 32);
    assert!(offset_of!(Scratch, dispatch_entry) == 40);
    assert!(offset_of!(Scratch, dstack_top) == 48);
    assert!(offset_of!(Scratch, engine) == 56);
    assert!(offset_of!(Scratch, host_rsp) == 64);
    assert!(offset_of!(Scratch, exit_arg) == 72);
    assert!(offset_of!(Scratch, ind_target) == 80);
    assert!(offset_of!(Scratch, rust_dispatch) == 88);
    assert!(offset_of!(Scratch, save_xstate) == 96);
    assert!(offset_of!(Scratch, ind_miss) == 120);
    assert!(offset_of!(Scratch, ctx) == 128);
    assert!(offset_of!(Scratch, lookup_hits) == OFF_LOOKUP_HITS as usize);
    assert!(offset_of!(Scratch, spill) == 288);
    assert!(offset_of!(Scratch, client) == 416);
    assert!(offset_of!(Scratch, xsave) == 576);
    assert!(offset_of!(Scratch, xsave) % 64 == 0);
    // gs:[disp32 + idx*8] must reach the table.
    assert!(offset_of!(Scratch, ibl) + IBL_ENTRIES * 8 < (1 << 31));
};

impl Scratch {
    /// Initialise a block in place (all lookup entries empty).
    pub fn init(&mut self) {
        self.self_ptr = self as *mut Scratch as u64;
        self.ind_miss = crate::asm::dbt_ind_miss as *const () as usize as u64;
        self.clear_ibl();
    }

    /// Drop every inline lookup entry.
    pub fn clear_ibl(&mut self) {
        self.ibl.fill(self.ind_miss);
    }
}
