//! The DBT engine: the environment trait, configuration, statistics, the
//! engine's state and lock. Its parts, by concern: [`decode`] (guest code into
//! blocks, flags liveness), [`translate`] (emitting a fragment), [`cache`]
//! (regions, placing fragments), [`link`] (patching exits), [`dispatch`] (the
//! dispatcher, native-pc recovery) and [`invalidate`] (invalidation,
//! quiescence, resets). The inserted sequences are in `crate::templates`, the
//! lock-free pc map in `crate::pcmap`.

mod cache;
mod decode;
mod dispatch;
mod invalidate;
mod link;
mod translate;

pub use decode::flags_liveness;
use decode::{Block, Term, ARITH};
pub use dispatch::dbt_rust_dispatch;
use translate::Emitted;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::ptr::read_volatile;
use core::sync::atomic::{AtomicU32, Ordering};
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, MemoryOperand, Mnemonic, OpKind, Register, RflagsBits,
};

use crate::client::{BlockInfo, Client, Inserts, Where};
use crate::ibl::{Ibl, IBL_BYTES};
use crate::kclass::{self, KClass, Thunk};
use crate::pcmap::{FragMeta, MapEnt, NativePc, Npc, PcIndex, RegionDir, GRANULE};
use crate::pool::TRANSLATE_RESERVE;
use crate::scratch::*;
use crate::templates::{exit_stub, exit_stub_len, stubs_layout, Abi, Emit, Operand, ENDBR64};

/// What the environment supplies.
pub trait Env {
    /// `size` bytes of writable+executable memory whose every byte is within
    /// ±(2 GiB − 16 MiB) of `near`, or None.
    fn alloc_code(&mut self, near: u64, size: usize) -> Option<u64>;
    /// Code memory for the engine's generated dispatcher entries (reached
    /// only through absolute pointers: any executable place will do; the
    /// default takes it from [`Env::alloc_code`]).
    fn alloc_entries(&mut self, near: u64, size: usize) -> Option<u64> {
        self.alloc_code(near, size)
    }
    /// Copy guest code at `pc` into `buf`; return how many bytes are readable.
    fn read_code(&self, pc: u64, buf: &mut [u8]) -> usize;
    /// Write `bytes` of code at the code-cache address `at` (inside memory
    /// `alloc_code` returned). The cache's executable address need not be
    /// writable: the environment writes through its own alias (a second
    /// mapping, an EPT view). Every byte the engine places goes through here.
    /// False: the write could not be made (the engine then fails the
    /// translation or the link; nothing half-written is ever executed).
    fn write_code(&mut self, at: u64, bytes: &[u8]) -> bool;
    /// Retarget the 4-byte-aligned rel32 field at code-cache address `at` with
    /// one atomic aligned 32-bit store (through the writable alias), so that a
    /// CPU executing the branch concurrently sees the old or the new target.
    fn patch_rel32(&mut self, at: u64, rel: i32) -> bool;
    /// What a direct call/jump target stands for when it is a retpoline or
    /// return thunk (kernel: `__x86_indirect_thunk_<reg>`,
    /// `__x86_return_thunk`, by address). The translator then emits the
    /// indirect branch or return itself instead of translating the thunk.
    fn thunk(&self, _target: u64) -> Option<Thunk> {
        None
    }
    /// `bytes` of zeroed, writable, 8-byte aligned data memory for the shared
    /// lookup table, at an address translated code can use as a
    /// sign-extended disp32 (low 2 GiB, or the top 2 GiB where kernel
    /// modules live), valid as long as the engine. None: no inline lookup
    /// (every indirect transfer goes to the dispatcher).
    fn alloc_table(&mut self, _bytes: usize) -> Option<u64> {
        None
    }
    /// Whether `pc` lies in a *native region*: code the engine never
    /// translates (kernel: entry text that runs on the user CR3 under KPTI,
    /// where the cache is not mapped; `noinstr` code). Control that reaches
    /// one leaves translated code with [`StopKind::Native`] at that pc, and
    /// the environment runs it natively (and brings control back into the
    /// cache through its own entry, e.g. an execute-only view of those pages).
    fn native(&self, _pc: u64) -> bool {
        false
    }
    /// Whether `pc` must run natively *for now*: its page is being written (kernel:
    /// a `text_poke` burst; the page is writable and executable in EPT until the
    /// environment re-protects it and invalidates its translations again), so a
    /// translation made now could copy bytes in the middle of a patch (an `int3` whose
    /// handler then finds the patch done). Asked at every dispatch before anything is
    /// translated or linked for `pc`, never cached: the dispatch leaves at `pc`
    /// ([`StopKind::Native`]) with nothing recorded. The environment makes sure the
    /// native run can fetch there (kernel: an INVEPT on this CPU, whose cached EPT
    /// translation may still say not executable).
    fn native_now(&mut self, _pc: u64) -> bool {
        false
    }
    /// Whether this dispatcher entry, whose guest context is `ctx`, is a *quiescent
    /// point* of this CPU: nothing translated lies interrupted beneath it on this CPU, so
    /// the CPU has left every fragment it was in and invalidated fragments may be
    /// reclaimed as far as it is concerned. False where the guest may be running a
    /// handler that interrupted translated code (kernel: hard interrupt, NMI or softirq
    /// context, interrupts off; any context under full preemption, where a task can
    /// sleep preempted in the cache): the interrupted fragment must outlive the handler,
    /// which returns into it. Then this entry neither advances the CPU's epoch nor counts
    /// the CPU as quiescent (no reclaim on its behalf, no flush in a capacity reset).
    fn quiescent_entry(&self, _ctx: &GuestCtx) -> bool {
        true
    }
    /// Bytes the dispatcher's memory (the environment's [`crate::pool::Pool`])
    /// can still hand out in one piece. Below [`TRANSLATE_RESERVE`] the engine
    /// refuses to translate ([`StopKind::NoMemory`]) instead of failing an
    /// allocation halfway through; a new code-cache region needs its pc-index
    /// directory on top.
    fn memory_left(&self) -> usize {
        usize::MAX
    }
    /// A stop at `pc` ([`StopKind::Undefined`], [`StopKind::Breakpoint`],
    /// [`StopKind::Invalid`], ...) that the environment cannot leave to the CPU at
    /// its native address (kernel: translated text is not executable there, so
    /// `ud2` would come straight back to the dispatcher): the environment may
    /// deliver the exception itself as the CPU would at `pc`, rewriting `ctx` (the
    /// guest's state at `pc`: native, a block boundary) and returning the guest pc
    /// to continue at (the kernel's handler, reached natively as a native region
    /// or translated). The engine continues there as at any other target. None:
    /// the stop leaves to the environment at `pc` as usual.
    fn deliver(&mut self, _kind: StopKind, _pc: u64, _ctx: &mut GuestCtx) -> Option<u64> {
        None
    }
    /// Whether the instruction at `pc` (decoded from `bytes`) is a *fault site*: one the
    /// environment's exception tables know by its address (kernel: an
    /// `__ex_table` entry of its module, as for a user access or `rdmsr_safe`),
    /// so that a fault there continues at a fixup found by the faulting pc. If so,
    /// the environment returns the code-cache address of a slot of
    /// [`FAULT_SLOT_BYTES`] that it has registered under the same fixup (kernel: an
    /// entry of its own exception table, rewritten before the slot is used); the
    /// engine places the instruction alone there at its native length (so a fixup
    /// that is the next instruction may be given as `slot + bytes.len()`), followed by
    /// a jump out (back into the fragment, or to the next native pc with
    /// [`Config::fault_slot_native_return`]), and the fragment jumps to the slot in its
    /// place. The slot is the engine's from then on and never given to another
    /// instruction while any fragment may jump to it. With
    /// [`Config::fault_slot_native_return`] the slot's code depends only on `pc` and
    /// `bytes`, so the environment may give the same slot again for the same pc and
    /// bytes (the engine rewrites the same code there). None: not a fault site, or no
    /// slot left (the instruction is copied in line as any other).
    fn fault_slot(&mut self, _pc: u64, _bytes: &[u8]) -> Option<u64> {
        None
    }
}

/// Bytes of a fault-site slot ([`Env::fault_slot`]): the instruction (at most 15
/// bytes, re-encoded for the slot's address when RIP-relative) and a `jmp rel32`
/// out, padded with `int3`.
pub const FAULT_SLOT_BYTES: usize = 32;

/// Why translated execution stopped and control went back to the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum StopKind {
    /// Control reached the environment's sentinel address.
    Sentinel = 1,
    /// Undecodable bytes at `exit_pc`.
    Invalid = 2,
    /// `int3` (or `int1`/`into`) at `exit_pc`.
    Breakpoint = 3,
    /// `ud0`/`ud1`/`ud2` at `exit_pc`.
    Undefined = 4,
    /// An instruction the translator does not handle (far transfers,
    /// `iret`, `sysret`, transactional memory, ...) at `exit_pc`.
    Unsupported = 5,
    /// The block at `exit_pc` could not be placed (no code memory, RIP-relative
    /// operand out of reach).
    NoSpace = 6,
    /// `swapgs`, `sysret`, `sysexit` or `iret` at `exit_pc`: it changes the
    /// `%gs` base translated code relies on or leaves the context; the
    /// environment resumes natively there (kernel: entry text, a native region).
    Privileged = 7,
    /// `exit_pc` lies in a native region ([`Env::native`]).
    Native = 8,
    /// The block at `exit_pc` was not translated: the dispatcher's memory
    /// pool is low ([`Env::memory_left`]).
    NoMemory = 9,
}

impl StopKind {
    pub fn from_u64(v: u64) -> Option<StopKind> {
        Some(match v {
            1 => StopKind::Sentinel,
            2 => StopKind::Invalid,
            3 => StopKind::Breakpoint,
            4 => StopKind::Undefined,
            5 => StopKind::Unsupported,
            6 => StopKind::NoSpace,
            7 => StopKind::Privileged,
            8 => StopKind::Native,
            9 => StopKind::NoMemory,
            _ => return None,
        })
    }
}

/// An exit of a fragment: its stub passes this record's address.
#[repr(C)]
#[derive(Debug)]
pub struct ExitRecord {
    /// Guest target.
    pub target: u64,
    /// Address of the 4-byte-aligned rel32 of the branch to patch (0: none).
    pub patch_at: u64,
    /// Exit stub address (what `patch_at` points at when unlinked).
    pub stub: u64,
    /// 0 = direct branch; otherwise a `StopKind`.
    pub stop: u64,
    /// Guest start of the fragment owning this exit.
    pub owner: u64,
    /// Guest start of the fragment it is linked to, or `u64::MAX`.
    pub linked: u64,
    /// Next record in the incoming-link list of the fragment this one is
    /// linked to (intrusive: linking never allocates).
    pub next_in: *mut ExitRecord,
}

impl ExitRecord {
    fn new(target: u64, stop: u64, owner: u64) -> ExitRecord {
        ExitRecord { target, patch_at: 0, stub: 0, stop, owner, linked: u64::MAX, next_in: core::ptr::null_mut() }
    }
}

/// Engine statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub blocks: u64,
    pub guest_insns: u64,
    pub hot_bytes: u64,
    pub stub_bytes: u64,
    pub links: u64,
    pub unlinks: u64,
    /// Inline lookups that reached the dispatcher, i.e. the misses (hits never
    /// leave translated code: with `Config::count_lookups` they are counted per
    /// CPU, see [`Engine::lookup_hits`]).
    pub lookups: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub invalidated_blocks: u64,
    pub flushes: u64,
    pub resets: u64,
    pub dispatches: u64,
    /// Return pads made (cached returns).
    pub pads: u64,
    /// Far trampolines made (links to another region out of rel32 reach).
    pub trampolines: u64,
    /// Kernel-class instructions met by the translator, by
    /// [`KClass`] (`kclass[KClass::Swapgs as usize]`, ...).
    pub kclass: [u64; KClass::COUNT],
    /// Stops the environment delivered itself ([`Env::deliver`]).
    pub delivered: u64,
    /// Dispatches that left at once because the target runs natively for now
    /// ([`Env::native_now`]).
    pub native_now: u64,
    /// Fault-site instructions placed in slots ([`Env::fault_slot`]).
    pub fault_sites: u64,
}

struct Region {
    /// The guest pc the region was made for ([`Config::region_span`]).
    anchor: u64,
    base: u64,
    hot_size: u64,
    stub_size: u64,
    hot_used: u64,
    stub_used: u64,
    hot_free: Vec<(u64, u64)>,
    stub_free: Vec<(u64, u64)>,
}

struct Fragment {
    start: u64,
    end: u64,
    /// Start of the fragment's hot allocation: its indirect entry (the target
    /// check) when the inline lookup is on, else its body.
    hot: u64,
    /// Body entry: what direct branches and the dispatcher jump to.
    entry: u64,
    /// Size of the hot allocation.
    hot_len: u64,
    /// Bytes of instructions at `hot` (constants and `int3` slack follow).
    code_len: u64,
    /// Holds return pads (cached returns): its space is never reused.
    has_pads: bool,
    stub_addr: u64,
    /// Size of the stub allocation (stubs, then their records' addresses).
    stub_len: u64,
    /// Bytes of stub instructions at `stub_addr`.
    stub_code_len: u64,
    region: usize,
    /// Boxed: exit stubs and incoming-link lists hold the records' addresses.
    #[allow(clippy::vec_box)]
    exits: Vec<Box<ExitRecord>>,
    /// Head of the list (through `ExitRecord::next_in`) of the exit records
    /// of other fragments linked to this one.
    incoming: *mut ExitRecord,
    /// Its pc map, published in the lock-free index.
    meta: Box<FragMeta>,
}

/// Space and exit records of an invalidated fragment, kept until every CPU
/// has passed a quiescent point ([`Engine::reclaim`]): a CPU may still be
/// executing the fragment and take one of its exits.
struct Pending {
    region: usize,
    hot: u64,
    hot_len: u64,
    stub: u64,
    stub_len: u64,
    /// Dead records (no patch site: the dispatcher never links them).
    #[allow(clippy::vec_box)]
    exits: Vec<Box<ExitRecord>>,
    /// Its pc map, already retracted from the index (a handler that read
    /// the pointer before may still use it until quiescence).
    meta: Box<FragMeta>,
    /// False for fragments holding return pads: their space is never reused.
    reuse: bool,
    /// Each registered CPU's `epoch` when the fragment was invalidated.
    epochs: Vec<u64>,
}

/// Engine configuration.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub hot_size: u64,
    pub stub_size: u64,
    /// Capacity limit on total hot bytes; exceeding it resets the cache.
    pub max_hot_bytes: u64,
    pub max_block_insns: usize,
    /// Link direct branches (off: every direct exit goes to the dispatcher).
    pub link: bool,
    /// Use the inline lookup table for indirect branches.
    pub inline_lookup: bool,
    /// Count inline-lookup hits in translated code (three flags-free
    /// instructions on every hit: off by default), for [`Engine::lookup_hits`].
    pub count_lookups: bool,
    /// Non-transparent returns (BTKernel-style; off by default): a translated
    /// call executes a real `call`, so the stack holds a code-cache *return pad*
    /// (a jump to the return site's fragment) instead of the native return
    /// address, and `ret` runs natively, predicted by the CPU's return stack.
    /// What it breaks is listed in the README ("Cached returns"): code that
    /// reads its return address sees a code-cache address. Pads are never
    /// reclaimed, and a full cache stops with `NoSpace` instead of resetting
    /// (a reset would free pads that stacks still hold).
    pub cached_returns: bool,
    /// Basic blocks per fragment: a fragment continues through up to this
    /// many - 1 not-taken conditional branches (1: one basic block per
    /// fragment, every not-taken branch costs a `jmp` to the next fragment).
    pub max_basic_blocks: usize,
    /// Start both entries of every fragment (the indirect entry and the body,
    /// which the dispatcher reaches with `jmp gs:[TGT]`) with `endbr64`, as
    /// kernels with CET indirect branch tracking (`CONFIG_X86_KERNEL_IBT`)
    /// require of every indirect-jump target. (The hand-written routines in
    /// `asm.rs` always start with it.)
    pub ibt: bool,
    /// Kernel ABI: no red zone below rsp (user code has 128 bytes, which
    /// inserted code steps over before pushing), and the kernel variants of
    /// the dispatcher entries (`asm::entry_code(true, ..)`: interrupts off
    /// from the entry's second instruction, the guest's IF back only at the
    /// final transfer). Host runs use `false`.
    pub kernel: bool,
    /// Guest pcs a region serves around the first pc it was made for (at
    /// most the rel32 reach); smaller values make more regions (tests use it
    /// to exercise far links between regions).
    pub region_span: u64,
    /// Offset of the per-CPU block ([`Scratch`], the client counters
    /// [`crate::scratch::OFF_COUNTERS`] after it) from the `%gs` base: every
    /// `gs:` access of generated code and of the dispatcher entries adds it
    /// (kernel: the `alloc_percpu` offset of the block; host: the harness's
    /// [`crate::asm::HOST_GS_BASE`]).
    pub gs_base: i32,
    /// A native target ([`Env::native`]) gets a fragment of its own whose body jumps to
    /// it (`jmp rel32`; `jmp [rip]` beyond rel32 reach): exits to it are linked and
    /// returns to it hit the lookup table, so leaving translated code for a native region
    /// costs no dispatch after the first. Off: every such exit goes through the
    /// dispatcher ([`StopKind::Native`]). Only for environments where native-ness of a pc
    /// does not change while fragments live (invalidate what changes).
    pub native_fragments: bool,
    /// Where a fault-site slot ([`Env::fault_slot`]) continues after its instruction:
    /// off, back into its fragment (`jmp` to the next instruction's translation); on, to
    /// the next instruction's *native* pc, for environments where native text steers
    /// itself back into the cache (kernel: not executable in EPT, a #VE). On, a slot
    /// depends on no fragment's memory: a task asleep in a fault at the slot (regs->ip
    /// is the slot while a page fault on user memory sleeps) may resume after its
    /// fragment was reclaimed, or after the session ended (then the native pc runs
    /// natively). The way there is a lookup of that pc in the shared table when the
    /// slot has room for it (a hit when the pc is translated: no steering event), else
    /// a jump to it (one steering event per execution of the slot).
    pub fault_slot_native_return: bool,
    /// What a CPU does while it waits for the engine lock, every 128 spins
    /// (kernel: nothing more, interrupts are off; host: sleep a little, since the
    /// lock holder, or the thread whose ticket is next, may be preempted).
    pub relax: fn(),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hot_size: 8 << 20,
            stub_size: 4 << 20,
            max_hot_bytes: 64 << 20,
            max_block_insns: 64,
            link: true,
            inline_lookup: true,
            max_basic_blocks: 8,
            ibt: false,
            count_lookups: false,
            cached_returns: false,
            kernel: false,
            region_span: REACH,
            gs_base: crate::asm::HOST_GS_BASE,
            native_fragments: false,
            fault_slot_native_return: false,
            relax: || {},
        }
    }
}

/// The DBT engine (one per system; per-CPU state lives in `Scratch`).
pub struct Engine {
    pub cfg: Config,
    env: Box<dyn Env>,
    client: Option<Box<dyn Client>>,
    regions: Vec<Region>,
    frags: BTreeMap<u64, Fragment>,
    /// Per-CPU blocks whose lookup tables must be kept coherent.
    cpus: Vec<*mut Scratch>,
    /// Invalidated fragments waiting for every CPU to pass a quiescent point.
    pending: Vec<Pending>,
    /// Guest address at which a run returns to the environment.
    pub stop_pc: u64,
    pub stats: Stats,
    /// Last dispatcher exits (debugging aid).
    pub trace: [u64; 8],
    /// Code of the last instruction iced refused to encode (debugging aid).
    pub trace_bad: core::cell::Cell<u64>,
    generation: u64,
    hot_total: u64,
    /// Return pads (cached returns): code-cache addresses stacks may hold.
    pads: BTreeSet<u64>,
    /// The pad a run's outermost return goes to (cached returns): an exit
    /// stub whose record targets `stop_pc`.
    env_pad: Option<(u64, Box<ExitRecord>)>,
    /// Indirect entries of pads that indirect jumps target (a longjmp to an
    /// address setjmp read off the stack), for the lookup table.
    pad_entries: BTreeMap<u64, u64>,
    /// What the inserted sequences depend on (red zone, table).
    abi: Abi,
    /// The shared inline-lookup table (None: `inline_lookup` off, or the
    /// environment gave no table memory).
    ibl: Option<Ibl>,
    /// Lock-free map from code-cache addresses to native state.
    index: Box<PcIndex>,
    /// Maps of far trampolines (one per link through one), until a flush.
    #[allow(clippy::vec_box)]
    tramp_metas: Vec<Box<FragMeta>>,
    /// The per-CPU block of the CPU in the dispatcher (null outside it).
    current: *const Scratch,
    /// Whether the current dispatcher entry is a quiescent point of its CPU
    /// ([`Env::quiescent_entry`]).
    current_quiescent: bool,
    /// The generated dispatcher entries in the code cache (exit entry, miss
    /// entry, bytes): see [`crate::asm::entry_code`].
    entry_code: (u64, u64, u64),
    /// Serializes the dispatcher and every other user of the engine across
    /// CPUs ([`Engine::locked`]): a ticket lock (next ticket, now serving),
    /// so that CPUs get it in arrival order and a CPU that invalidates is not
    /// starved by CPUs that keep entering the dispatcher.
    lock: [AtomicU32; 2],
}

// SAFETY: the raw pointers (per-CPU blocks, exit records) are only used under
// the engine's owner discipline (a single lock around the engine in the
// kernel); they point at memory owned by the environment / the engine.
unsafe impl Send for Engine {}

const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// How far from its guest code a region may be: RIP-relative operands and
/// branches reach ±2 GiB, minus a margin for the region's own size.
const REACH: u64 = (1 << 31) - (32 << 20);

impl Engine {
    /// A new engine: its dispatcher entries are generated into code memory
    /// from `env` (the only failure: no such memory, or a `gs_base` that
    /// does not fit the entries' displacements).
    pub fn new(
        mut env: Box<dyn Env>,
        client: Option<Box<dyn Client>>,
        mut cfg: Config,
    ) -> Result<Engine, &'static str> {
        let code =
            crate::asm::entry_code(cfg.kernel, cfg.gs_base).ok_or("the per-CPU block's gs offset is out of reach")?;
        let near = crate::asm::entry_template(cfg.kernel).0.as_ptr() as u64;
        let len = code.bytes.len() as u64;
        let at = env.alloc_entries(near, code.bytes.len()).ok_or("no code memory for the dispatcher entries")?;
        if !env.write_code(at, &code.bytes) {
            return Err("cannot write the dispatcher entries");
        }
        let (exit, miss) = (at, at + code.miss_off as u64);
        let ibl = if cfg.inline_lookup {
            // SAFETY: the environment's table memory is ours for the engine's
            // life (`Env::alloc_table` contract); `Ibl::new` checks reach.
            env.alloc_table(IBL_BYTES).and_then(|t| unsafe { Ibl::new(t, miss) })
        } else {
            None
        };
        cfg.inline_lookup = ibl.is_some();
        let abi = Abi {
            rz: if cfg.kernel { 0 } else { crate::asm::HOST_RED_ZONE },
            ibl: ibl.as_ref().map(|t| t.disp()),
            count_hits: cfg.count_lookups,
            gs_base: cfg.gs_base as i64,
        };
        Ok(Engine {
            abi,
            ibl,
            entry_code: (exit, miss, len),
            index: Box::default(),
            tramp_metas: Vec::new(),
            current: core::ptr::null(),
            current_quiescent: false,
            lock: [AtomicU32::new(0), AtomicU32::new(0)],
            cfg,
            env,
            client,
            regions: Vec::new(),
            frags: BTreeMap::new(),
            cpus: Vec::new(),
            pending: Vec::new(),
            stop_pc: 0,
            stats: Stats::default(),
            trace: [0; 8],
            trace_bad: core::cell::Cell::new(0),
            generation: 0,
            hot_total: 0,
            pads: BTreeSet::new(),
            env_pad: None,
            pad_entries: BTreeMap::new(),
        })
    }

    /// The code-cache range of the generated dispatcher entries (an
    /// interrupted pc in there is inside the dispatcher, not guest code).
    pub fn entry_range(&self) -> (u64, u64) {
        (self.entry_code.0, self.entry_code.0 + self.entry_code.2)
    }

    /// Run `f` on the engine with its lock held (a spinlock: in the kernel
    /// the dispatcher holds it with interrupts off; nothing that can wait for
    /// translated code to make progress may run under it).
    ///
    /// # Safety
    /// `e` points at a live engine that is only ever used through this
    /// function while more than one CPU runs (the dispatcher does).
    pub unsafe fn locked<R>(e: *mut Engine, f: impl FnOnce(&mut Engine) -> R) -> R {
        // SAFETY: the lock words are only accessed atomically, through a raw
        // pointer (no reference to the engine exists before it is held).
        let [next, serving] = unsafe { &*core::ptr::addr_of!((*e).lock) };
        let ticket = next.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `cfg` is written only at construction.
        let relax = unsafe { (*core::ptr::addr_of!((*e).cfg)).relax };
        let mut spins = 0u32;
        while serving.load(Ordering::Acquire) != ticket {
            core::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(128) {
                relax();
            }
        }
        // SAFETY: we hold the lock: no other `&mut` to the engine exists.
        let r = f(unsafe { &mut *e });
        // SAFETY: as above.
        unsafe { (*e).current = core::ptr::null() };
        serving.store(ticket.wrapping_add(1), Ordering::Release);
        r
    }

    /// Register a per-CPU block (its lookup table is kept coherent with
    /// invalidations) and fill in its engine fields.
    ///
    /// # Safety
    /// `s` must stay valid (and registered) as long as the engine lives.
    pub unsafe fn attach_cpu(&mut self, s: *mut Scratch, dstack_top: u64) {
        // SAFETY: the caller guarantees `s` is a valid, exclusively ours block.
        let sc = unsafe { &mut *s };
        sc.init();
        (sc.exit_entry, sc.miss_entry) = (self.entry_code.0, self.entry_code.1);
        sc.rust_dispatch = dbt_rust_dispatch as *const () as usize as u64;
        sc.dstack_top = dstack_top & !15;
        sc.engine = self as *mut Engine as u64;
        self.cpus.push(s);
    }

    /// Inline-lookup hits on every registered CPU (counted only with
    /// `Config::count_lookups`; a CPU running translated code meanwhile may be
    /// a few behind).
    pub fn lookup_hits(&self) -> u64 {
        // SAFETY: registered per-CPU blocks stay valid (attach_cpu contract); a
        // concurrent increment only makes the sum slightly stale.
        self.cpus.iter().map(|&c| unsafe { core::ptr::read_volatile(&(*c).lookup_hits) }).sum()
    }

    /// Client access (e.g. to read bbcov results).
    pub fn client_mut(&mut self) -> Option<&mut (dyn Client + 'static)> {
        self.client.as_deref_mut()
    }

    /// Invalidated fragments whose space waits for quiescence.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn fragment_count(&self) -> usize {
        self.frags.len()
    }

    /// Code-cache entry of the fragment for `pc`, if translated.
    pub fn lookup(&self, pc: u64) -> Option<u64> {
        self.frags.get(&pc).map(|f| f.entry)
    }

    /// Guest range `[start, end)` of the fragment for `pc`, if translated.
    pub fn fragment_span(&self, pc: u64) -> Option<(u64, u64)> {
        self.frags.get(&pc).map(|f| (f.start, f.end))
    }

    /// (indirect entry, code length, exit stubs, stubs length) of each
    /// fragment: the instructions it emitted, which the fuzz target and tests
    /// decode back (the hot allocation's constants and slack are left out).
    pub fn fragments(&self) -> Vec<(u64, u64, u64, u64)> {
        self.frags.values().map(|f| (f.hot, f.code_len, f.stub_addr, f.stub_code_len)).collect()
    }

    /// (indirect entry, body entry) of each fragment: the addresses
    /// translated code reaches by indirect jumps (through the lookup table and
    /// from the dispatcher).
    pub fn entries(&self) -> Vec<(u64, u64)> {
        self.frags.values().map(|f| (f.hot, f.entry)).collect()
    }
}
