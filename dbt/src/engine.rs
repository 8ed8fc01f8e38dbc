//! Translator, code cache, linking, dispatcher logic, invalidation.

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
use crate::pcmap::{FragMeta, MapEnt, NativePc, Npc, PcIndex, GRANULE};
use crate::scratch::*;
use crate::templates::{exit_stub, exit_stub_len, stubs_layout, Abi, Emit, Operand, ENDBR64};

/// What the environment supplies.
pub trait Env {
    /// `size` bytes of writable+executable memory whose every byte is within
    /// ±(2 GiB − 16 MiB) of `near`, or None.
    fn alloc_code(&mut self, near: u64, size: usize) -> Option<u64>;
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
}

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

impl Region {
    /// `len` rounded up to [`GRANULE`] (so a pc-map granule belongs to one
    /// allocation), first fit from the free list, else from the unused end.
    fn alloc(free: &mut Vec<(u64, u64)>, used: &mut u64, start: u64, size: u64, len: u64) -> Option<u64> {
        let len = len.div_ceil(GRANULE) * GRANULE;
        if let Some(i) = free.iter().position(|&(_, l)| l >= len) {
            let (a, l) = free[i];
            if l == len {
                free.swap_remove(i);
            } else {
                free[i] = (a + len, l - len);
            }
            return Some(a);
        }
        if *used + len > size {
            return None;
        }
        let a = start + *used;
        *used += len;
        Some(a)
    }
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
    /// the dispatcher entries (`asm::dbt_kexit_entry`, ...: interrupts off
    /// from the entry's second instruction, the guest's IF back only at the
    /// final transfer). Host runs use `false`.
    pub kernel: bool,
    /// Guest pcs a region serves around the first pc it was made for (at
    /// most the rel32 reach); smaller values make more regions (tests use it
    /// to exercise far links between regions).
    pub region_span: u64,
    /// What a CPU does while it waits for the engine lock, every 128 spins
    /// (kernel: nothing more, interrupts are off; host: yield the thread,
    /// whose lock holder may be preempted).
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

/// Result of decoding one block.
/// A fragment's guest code: one or more basic blocks at consecutive guest
/// addresses, each but the last ending in a conditional branch whose
/// fall-through is the next one (an extended block).
struct Block {
    insns: Vec<Instruction>,
    /// Indices of the conditional branches that end a basic block inside the
    /// fragment (their fall-through path continues inline).
    inline_jcc: Vec<usize>,
    term: Term,
    end: u64,
    /// Kernel-class instructions in the block (the stop instruction included).
    classes: [u64; KClass::COUNT],
}

impl Block {
    /// Index ranges of the basic blocks.
    fn basic_blocks(&self) -> Vec<core::ops::Range<usize>> {
        let mut v = Vec::with_capacity(self.inline_jcc.len() + 1);
        let mut a = 0;
        for &j in self.inline_jcc.iter() {
            v.push(a..j + 1);
            a = j + 1;
        }
        v.push(a..self.insns.len());
        v
    }
}

enum Term {
    /// Fall through to `next` (block length limit).
    Fall(u64),
    /// Last instruction is a control transfer (index into insns).
    Cti,
    /// Stop at pc with kind; the stop instruction is not in `insns`.
    Stop(StopKind, u64),
}

fn classify_stop(i: &Instruction) -> Option<StopKind> {
    if matches!(kclass::classify(i), Some(KClass::Swapgs | KClass::ContextReturn)) {
        return Some(StopKind::Privileged);
    }
    match i.mnemonic() {
        Mnemonic::Int3 | Mnemonic::Int1 | Mnemonic::Into => return Some(StopKind::Breakpoint),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => return Some(StopKind::Undefined),
        Mnemonic::Syscall | Mnemonic::Int | Mnemonic::Sysenter | Mnemonic::Cpuid => return None,
        _ => {}
    }
    match i.flow_control() {
        FlowControl::Exception => Some(StopKind::Undefined),
        FlowControl::XbeginXabortXend => Some(StopKind::Unsupported),
        FlowControl::Interrupt => None,
        FlowControl::Return => match i.code() {
            Code::Retnq | Code::Retnq_imm16 => None,
            _ => Some(StopKind::Unsupported),
        },
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call => {
            if i.op0_kind() == OpKind::NearBranch64 {
                None
            } else {
                Some(StopKind::Unsupported)
            }
        }
        FlowControl::IndirectBranch | FlowControl::IndirectCall => match i.code() {
            Code::Jmp_rm64 | Code::Call_rm64 => None,
            _ => Some(StopKind::Unsupported),
        },
        FlowControl::Next => None,
    }
}

fn is_cti(i: &Instruction) -> bool {
    // syscall/sysenter/int n return to the next instruction: copied as is.
    if matches!(i.mnemonic(), Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int | Mnemonic::Cpuid) {
        return false;
    }
    !matches!(i.flow_control(), FlowControl::Next | FlowControl::Interrupt)
}

const ARITH: u32 = RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;

/// Backward flags liveness over a block: `live[i]` = arithmetic flags live
/// before instruction i. Everything is assumed live after the block.
///
/// An instruction kills only the flags it always writes with a defined value:
/// flags the SDM calls *undefined* afterwards (AF after logic ops, SF/ZF/AF/PF
/// after `imul`, OF after multi-bit shifts, ...) may keep their old value on
/// some CPU, so they stay live through it. Shifts and rotates whose count is
/// `cl`, or an immediate that masks to 0, may leave every flag unchanged:
/// they read what they write.
pub fn flags_liveness(insns: &[Instruction]) -> Vec<u32> {
    let mut live = alloc::vec![0u32; insns.len() + 1];
    let mut cur = ARITH;
    live[insns.len()] = cur;
    for (k, i) in insns.iter().enumerate().rev() {
        let written = i.rflags_modified() & !i.rflags_undefined() & ARITH;
        let read = i.rflags_read() & ARITH;
        cur = (cur & !written) | read;
        if is_shift_or_rotate(i) && shift_may_be_zero(i) {
            cur |= written;
        }
        if i.mnemonic() == Mnemonic::Int3 || i.flow_control() == FlowControl::Interrupt {
            cur = ARITH;
        }
        live[k] = cur;
    }
    live
}

fn is_shift_or_rotate(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

/// Whether a shift/rotate's count may be 0 after masking (then it changes no
/// flag): a `cl` count, or an immediate that masks to 0. The one-operand
/// forms (`shl r/m, 1`) always shift.
fn shift_may_be_zero(i: &Instruction) -> bool {
    let last = i.op_count().saturating_sub(1);
    match i.op_kind(last) {
        OpKind::Register => i.op_register(last) == Register::CL,
        OpKind::Immediate8 => {
            let wide = i.op0_kind() == OpKind::Register && i.op0_register().is_gpr64()
                || i.op0_kind() == OpKind::Memory && i.memory_size().size() == 8;
            i.immediate8() & if wide { 63 } else { 31 } == 0
        }
        _ => false,
    }
}

/// A branch to patch once the stubs are placed: (offset of rel32 in the hot
/// buffer, exit index).
type Fixup = (usize, usize);

/// A fragment's hot code as emitted, before placement.
struct Emitted {
    buf: Vec<u8>,
    fixups: Vec<Fixup>,
    exits: Vec<ExitRecord>,
    /// Offset of the body (after the indirect-entry target check).
    body_off: u64,
    /// Bytes of instructions at the start of `buf` (constants follow).
    code_len: u64,
    /// Offsets of return pads (cached returns).
    pads: Vec<usize>,
    /// The pc map of `buf`.
    map: Vec<MapEnt>,
}

impl Engine {
    pub fn new(mut env: Box<dyn Env>, client: Option<Box<dyn Client>>, mut cfg: Config) -> Engine {
        let (_, miss) = crate::asm::entries(cfg.kernel);
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
        };
        Engine {
            abi,
            ibl,
            index: Box::default(),
            tramp_metas: Vec::new(),
            current: core::ptr::null(),
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
        }
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
            spins += 1;
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
        (sc.exit_entry, sc.miss_entry) = crate::asm::entries(self.cfg.kernel);
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

    fn region_for(&mut self, pc: u64) -> Option<usize> {
        let span = self.cfg.region_span.min(REACH);
        let near = |r: &Region| {
            let lo = r.base;
            let hi = r.base + r.hot_size + r.stub_size;
            pc.abs_diff(lo) < REACH && pc.abs_diff(hi) < REACH && pc.abs_diff(r.anchor) < span
        };
        if let Some(i) = self.regions.iter().position(&near) {
            return Some(i);
        }
        let size = self.cfg.hot_size + self.cfg.stub_size;
        let base = self.env.alloc_code(pc, size as usize)?;
        let r = Region {
            anchor: pc,
            base,
            hot_size: self.cfg.hot_size,
            stub_size: self.cfg.stub_size,
            hot_used: 0,
            stub_used: 0,
            hot_free: Vec::new(),
            stub_free: Vec::new(),
        };
        if !near(&r) || !base.is_multiple_of(GRANULE) || !self.index.add_region(self.regions.len(), base, size) {
            return None;
        }
        self.regions.push(r);
        Some(self.regions.len() - 1)
    }

    fn decode_block(&self, pc: u64) -> Block {
        let mut insns = Vec::new();
        let mut inline_jcc = Vec::new();
        let mut cur = pc;
        let mut buf = [0u8; 16];
        let mut classes = [0u64; KClass::COUNT];
        let done = |insns, inline_jcc, term, end, classes| Block { insns, inline_jcc, term, end, classes };
        loop {
            // A block never ends right after `sti` (its interrupt shadow must
            // cover the guest's next instruction, e.g. `sti; hlt`).
            let after_sti = insns.last().is_some_and(kclass::keeps_next);
            if !after_sti && (insns.len() >= self.cfg.max_block_insns || (cur - pc) as usize > MAX_BLOCK_BYTES) {
                return done(insns, inline_jcc, Term::Fall(cur), cur, classes);
            }
            let n = self.env.read_code(cur, &mut buf[..15]).min(15);
            let mut d = Decoder::with_ip(64, &buf[..n], cur, DecoderOptions::NONE);
            let mut i = d.decode();
            if i.is_invalid() {
                return done(insns, inline_jcc, Term::Stop(StopKind::Invalid, cur), cur + 1, classes);
            }
            if let Some(c) = kclass::classify(&i) {
                classes[c as usize] += 1;
            }
            if let Some(t) = self.thunk_branch(&i) {
                classes[if t.code() == Code::Retnq { KClass::ReturnThunk } else { KClass::RetpolineThunk } as usize] +=
                    1;
                i = t;
            }
            if let Some(k) = classify_stop(&i) {
                return done(insns, inline_jcc, Term::Stop(k, cur), i.next_ip(), classes);
            }
            let cti = is_cti(&i);
            cur = i.next_ip();
            insns.push(i);
            if cti {
                let jcc_rel32able = i.flow_control() == FlowControl::ConditionalBranch
                    && !matches!(
                        i.mnemonic(),
                        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz
                    );
                if jcc_rel32able && inline_jcc.len() + 1 < self.cfg.max_basic_blocks {
                    inline_jcc.push(insns.len() - 1);
                    continue;
                }
                return done(insns, inline_jcc, Term::Cti, cur, classes);
            }
        }
    }

    /// A direct `call`/`jmp` to a thunk the environment names, as the
    /// instruction it stands for (`call reg`, `jmp reg`, `ret`) at the same
    /// guest address and length.
    fn thunk_branch(&self, i: &Instruction) -> Option<Instruction> {
        let call = match i.code() {
            Code::Call_rel32_64 => true,
            Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => false,
            _ => return None,
        };
        let mut t = match (self.env.thunk(i.near_branch_target())?, call) {
            (Thunk::Indirect(r), true) => Instruction::with1(Code::Call_rm64, r).ok()?,
            (Thunk::Indirect(r), false) => Instruction::with1(Code::Jmp_rm64, r).ok()?,
            (Thunk::Return, false) => Instruction::with(Code::Retnq),
            // A call to the return thunk is not a return: translate it as is.
            (Thunk::Return, true) => return None,
        };
        t.set_ip(i.ip());
        t.set_len(i.len());
        t.set_next_ip(i.next_ip());
        Some(t)
    }

    /// A patchable branch to `exit`: `opcode` then a rel32, hand-emitted after
    /// NOP padding so that the rel32 is 4-byte aligned and can be retargeted
    /// with one atomic store.
    fn patch_branch(e: &mut Emit, fix: &mut Vec<Fixup>, opcode: &[u8], exit: usize) {
        e.align_field(opcode.len() as u64);
        e.raw(opcode);
        fix.push((e.buf.len(), exit));
        e.raw(&[0, 0, 0, 0]);
    }

    /// Patchable `jmp rel32` (E9).
    fn patch_jmp(e: &mut Emit, fix: &mut Vec<Fixup>, exit: usize) {
        Self::patch_branch(e, fix, &[0xE9], exit);
    }

    /// Patchable `jcc rel32` (0F 8x).
    fn patch_jcc(e: &mut Emit, fix: &mut Vec<Fixup>, cc: u8, exit: usize) {
        Self::patch_branch(e, fix, &[0x0F, 0x80 | (cc & 15)], exit);
    }

    /// Copy a non-control-transfer instruction: original bytes unless it is
    /// RIP-relative (then re-encoded by iced for its new address).
    fn copy_insn(&self, e: &mut Emit, i: &Instruction) {
        if i.code() == Code::Retnq {
            // Also a `jmp __x86_return_thunk` recognized as a return.
            e.raw(&[0xC3]);
        } else if i.is_ip_rel_memory_operand() {
            e.ins(Ok(*i));
        } else {
            let mut b = [0u8; 16];
            let n = self.env.read_code(i.ip(), &mut b[..i.len()]);
            if n < i.len() {
                e.err = true;
                return;
            }
            e.raw(&b[..i.len()]);
        }
    }

    /// Translate the block at `pc`, place it, return its entry.
    fn translate(&mut self, pc: u64) -> Result<u64, StopKind> {
        let blk = self.decode_block(pc);
        for (n, c) in self.stats.kclass.iter_mut().zip(blk.classes.iter()) {
            *n += c;
        }
        if self.hot_total > self.cfg.max_hot_bytes && !self.make_room() {
            return Err(StopKind::NoSpace);
        }
        let ri = self.region_for(pc).ok_or(StopKind::NoSpace)?;
        // Flags liveness and instrumentation, per basic block (the client sees
        // basic blocks; its instruction indices are mapped to the fragment's).
        let mut ins = Inserts::default();
        let mut live = alloc::vec![ARITH; blk.insns.len() + 1];
        for r in blk.basic_blocks() {
            let l = flags_liveness(&blk.insns[r.clone()]);
            live[r.clone()].copy_from_slice(&l[..r.len()]);
            if let Some(c) = self.client.as_mut() {
                // An empty basic block (a stop right at its start) starts where
                // the previous one ended.
                let start = match (blk.insns.get(r.start), r.start.checked_sub(1)) {
                    (Some(i), _) => i.ip(),
                    (None, Some(p)) => blk.insns[p].next_ip(),
                    (None, None) => pc,
                };
                let mut sub = Inserts::default();
                c.instrument(&BlockInfo { start, insns: &blk.insns[r.clone()], flags_live: &l }, &mut sub);
                for (w, s) in sub.list {
                    // Nothing goes between `sti` and the instruction its
                    // interrupt shadow covers: such a snippet runs before the `sti`.
                    let sti = |k: usize| kclass::keeps_next(&blk.insns[k]);
                    match w {
                        Where::Before(k) if k < r.len() => {
                            let k = r.start + k;
                            let k = if k > r.start && sti(k - 1) { k - 1 } else { k };
                            ins.list.push((Where::Before(k), s))
                        }
                        Where::After(k) if k < r.len() => {
                            let k = r.start + k;
                            ins.list.push((if sti(k) { Where::Before(k) } else { Where::After(k) }, s))
                        }
                        _ => {}
                    }
                }
            }
        }
        // Emit at a provisional base to learn the size, then at the real one
        // (sizes do not depend on the address except RIP-relative encodings,
        // which keep their size; padding is recomputed).
        let mut attempt = 0;
        let mut hot_guess = 0u64;
        loop {
            attempt += 1;
            let hot_len_try = (hot_guess + 16).div_ceil(GRANULE) * GRANULE;
            let hot = {
                let r = &mut self.regions[ri];
                Region::alloc(&mut r.hot_free, &mut r.hot_used, r.base, r.hot_size, hot_len_try)
            };
            let Some(hot) = hot else {
                if attempt > 3 || !self.make_room() {
                    return Err(StopKind::NoSpace);
                }
                return self.translate(pc);
            };
            let em = self.emit_block(pc, &blk, &ins, &live, hot)?;
            if (em.buf.len() as u64) > hot_len_try {
                // too small: give it back and retry with the real size
                self.regions[ri].hot_free.push((hot, hot_len_try));
                hot_guess = em.buf.len() as u64;
                if attempt > 4 {
                    return Err(StopKind::NoSpace);
                }
                continue;
            }
            return self.place(pc, blk.end, ri, hot, hot_len_try, em, blk.insns.len());
        }
    }

    #[allow(clippy::type_complexity)]
    fn emit_block(&self, pc: u64, blk: &Block, ins: &Inserts, live: &[u32], hot: u64) -> Result<Emitted, StopKind> {
        let mut e = Emit::new(hot);
        if self.abi.ibl.is_some() {
            if self.cfg.ibt {
                e.st(Npc::Rcx, 16 + self.abi.rz, 0b110, 8);
                e.raw(&ENDBR64);
            }
            e.target_check(&self.abi, pc);
        }
        let body_off = e.buf.len() as u64;
        e.guest(pc);
        if self.cfg.ibt {
            e.raw(&ENDBR64);
        }
        let mut fix: Vec<Fixup> = Vec::new();
        let mut pads: Vec<usize> = Vec::new();
        let mut exits: Vec<ExitRecord> = Vec::new();
        let mut new_exit = |target: u64, stop: u64| {
            exits.push(ExitRecord::new(target, stop, pc));
            exits.len() - 1
        };
        let n = blk.insns.len();
        let body_end = if matches!(blk.term, Term::Cti) { n - 1 } else { n };
        let abi = self.abi;
        let before = |e: &mut Emit, k: usize| {
            for (w, s) in ins.list.iter() {
                if *w == Where::Before(k) {
                    e.snippet(&abi, blk.insns[k].ip(), s, live[k]);
                }
            }
        };
        let after = |e: &mut Emit, k: usize| {
            for (w, s) in ins.list.iter() {
                if *w == Where::After(k) {
                    e.snippet(&abi, blk.insns[k].next_ip(), s, live[k + 1]);
                }
            }
        };
        for k in 0..body_end {
            before(&mut e, k);
            let i = &blk.insns[k];
            e.guest(i.ip());
            if blk.inline_jcc.contains(&k) {
                // Taken: exit (linked later); not taken: the next basic block, inline.
                let xt = new_exit(i.near_branch_target(), 0);
                Self::patch_jcc(&mut e, &mut fix, (i.condition_code() as u8).wrapping_sub(1), xt);
                continue;
            }
            self.copy_insn(&mut e, i);
            after(&mut e, k);
        }
        match blk.term {
            Term::Fall(next) => {
                e.guest(next);
                let x = new_exit(next, 0);
                Self::patch_jmp(&mut e, &mut fix, x);
            }
            Term::Stop(kind, at) => {
                e.guest(at);
                let x = new_exit(at, kind as u64);
                Self::patch_jmp(&mut e, &mut fix, x);
            }
            Term::Cti => {
                let k = n - 1;
                before(&mut e, k);
                let i = &blk.insns[k];
                let next = i.next_ip();
                e.guest(i.ip());
                match i.flow_control() {
                    FlowControl::UnconditionalBranch => {
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_jmp(&mut e, &mut fix, x);
                    }
                    FlowControl::ConditionalBranch => {
                        let t = i.near_branch_target();
                        match i.mnemonic() {
                            Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz => {
                                // These exist only with rel8. A loop back to the block's own
                                // start branches straight to the body when rel8 reaches it:
                                //   op body; jmp fall
                                // anything else goes through a local patchable jmp:
                                //   op L_taken; jmp fall; L_taken: jmp taken
                                let len = i.len() as u64; // same form re-encoded
                                let op_pc = e.pc();
                                let body = e.base + body_off;
                                let self_loop = t == pc && body as i64 - (op_pc + len) as i64 >= -128;
                                let dest = if self_loop {
                                    body
                                } else {
                                    let mut pad1 = 0;
                                    while !(op_pc + len + pad1 + 1).is_multiple_of(4) {
                                        pad1 += 1;
                                    }
                                    op_pc + len + pad1 + 5
                                };
                                let mut j = *i;
                                j.set_near_branch64(dest);
                                let before_len = e.buf.len();
                                e.ins(Ok(j));
                                if e.buf.len() - before_len != len as usize {
                                    e.err = true;
                                }
                                e.guest(next);
                                let xf = new_exit(next, 0);
                                Self::patch_jmp(&mut e, &mut fix, xf);
                                if !self_loop {
                                    e.guest(t);
                                    let xt = new_exit(t, 0);
                                    Self::patch_jmp(&mut e, &mut fix, xt);
                                }
                            }
                            _ => {
                                let cc = (i.condition_code() as u8).wrapping_sub(1);
                                let xt = new_exit(t, 0);
                                Self::patch_jcc(&mut e, &mut fix, cc, xt);
                                e.guest(next);
                                let xf = new_exit(next, 0);
                                Self::patch_jmp(&mut e, &mut fix, xf);
                            }
                        }
                    }
                    FlowControl::Call if self.cfg.cached_returns => {
                        // call callee (patchable); pad: jmp next (patchable)
                        e.guest(i.ip());
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_branch(&mut e, &mut fix, &[0xE8], x);
                        pads.push(e.buf.len());
                        e.guest(next);
                        let xr = new_exit(next, 0);
                        Self::patch_jmp(&mut e, &mut fix, xr);
                    }
                    FlowControl::Call => {
                        e.guest(i.ip());
                        e.push_u64(next);
                        // The push undone: the call has not happened yet.
                        e.st(Npc::At(i.ip()), 8, 0, 0);
                        let x = new_exit(i.near_branch_target(), 0);
                        Self::patch_jmp(&mut e, &mut fix, x);
                    }
                    FlowControl::IndirectBranch | FlowControl::IndirectCall => {
                        let op = Operand::of(i);
                        let call = i.flow_control() == FlowControl::IndirectCall;
                        if call && self.cfg.cached_returns {
                            // call L; pad: jmp next (patchable); L: the lookup, its
                            // operand read with the pad pushed.
                            e.guest(i.ip());
                            e.raw(&[0xE8, 0, 0, 0, 0]);
                            let call_end = e.buf.len();
                            pads.push(call_end);
                            e.guest(next);
                            let xr = new_exit(next, 0);
                            Self::patch_jmp(&mut e, &mut fix, xr);
                            let rel = (e.buf.len() - call_end) as i32;
                            e.buf[call_end - 4..call_end].copy_from_slice(&rel.to_le_bytes());
                            e.ind_lookup(&self.abi, i.ip(), None, 8, &op);
                        } else {
                            e.ind_lookup(&self.abi, i.ip(), call.then_some(next), 0, &op);
                        }
                    }
                    // Cached returns: the stack holds a pad; return natively to it.
                    FlowControl::Return if self.cfg.cached_returns => {
                        e.guest(i.ip());
                        self.copy_insn(&mut e, i)
                    }
                    FlowControl::Return => e.ret_lookup(&self.abi, i.ip()),
                    _ => return Err(StopKind::Unsupported),
                }
            }
        }
        let code_len = e.buf.len() as u64;
        e.finish();
        if e.err {
            self.trace_bad.set(e.bad);
            return Err(StopKind::NoSpace);
        }
        Ok(Emitted { buf: e.buf, fixups: fix, exits, body_off, code_len, pads, map: e.map })
    }

    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        pc: u64,
        end: u64,
        ri: usize,
        hot: u64,
        hot_len: u64,
        em: Emitted,
        ninsns: usize,
    ) -> Result<u64, StopKind> {
        let Emitted { mut buf, fixups, exits, body_off, code_len, pads, map } = em;
        let code_len_bytes = buf.len();
        // Exit stubs, in the cold area.
        let mut recs: Vec<Box<ExitRecord>> = exits.into_iter().map(Box::new).collect();
        let n_stubs = recs.len() as u64;
        let mut stub_code = Vec::new();
        let mut stub_map: Vec<MapEnt> = Vec::new();
        let stub_len_each = exit_stub_len(&self.abi);
        let (slots, stub_bytes) = stubs_layout(&self.abi, recs.len() as u64);
        let stub_total = stub_bytes.div_ceil(GRANULE) * GRANULE;
        let stub = if stub_total == 0 {
            Some(hot + hot_len) // no exits (ret / indirect only): nothing to place
        } else {
            let r = &mut self.regions[ri];
            Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, stub_total)
        };
        let Some(stub) = stub else {
            self.regions[ri].hot_free.push((hot, hot_len));
            if !self.make_room() {
                return Err(StopKind::NoSpace);
            }
            return self.translate(pc);
        };
        for (k, rec) in recs.iter_mut().enumerate() {
            let addr = stub + k as u64 * stub_len_each;
            rec.stub = addr;
            let t = exit_stub(&self.abi, addr, stub + slots + 8 * k as u64, rec.target);
            if t.err {
                return Err(StopKind::NoSpace);
            }
            let base = stub_code.len() as u32;
            stub_map.extend(t.map.iter().map(|m| MapEnt { off: m.off + base, ..*m }));
            stub_code.extend_from_slice(&t.buf);
        }
        // The record slots the stubs push from.
        stub_code.resize(slots as usize, 0xCC);
        for rec in recs.iter() {
            stub_code.extend_from_slice(&(&**rec as *const ExitRecord as u64).to_le_bytes());
        }
        for (off, x) in fixups.iter() {
            let at = hot + *off as u64;
            let rel = recs[*x].stub.wrapping_sub(at + 4) as i64;
            if rel != rel as i32 as i64 {
                return Err(StopKind::NoSpace);
            }
            buf[*off..*off + 4].copy_from_slice(&(rel as i32).to_le_bytes());
            if recs[*x].stop == 0 && self.cfg.link {
                recs[*x].patch_at = at;
            }
        }
        // [hot, hot+hot_len) and [stub, stub+stub_code.len()) were allocated
        // from this engine's region and nothing executes them yet. Slack after
        // the code: int3, never executed.
        buf.resize(hot_len as usize, 0xCC);
        if !self.env.write_code(hot, &buf) || !self.env.write_code(stub, &stub_code) {
            let r = &mut self.regions[ri];
            r.hot_free.push((hot, hot_len));
            if stub_total != 0 {
                r.stub_free.push((stub, stub_total));
            }
            return Err(StopKind::NoSpace);
        }
        buf.truncate(code_len_bytes);
        let meta = Box::new(FragMeta {
            start: pc,
            hot,
            hot_len,
            stub,
            stub_len: stub_total,
            hot_map: map.into_boxed_slice(),
            stub_map: stub_map.into_boxed_slice(),
        });
        self.index.publish(&meta);
        // Pads exist once their code is in place.
        self.pads.extend(pads.iter().map(|&off| hot + off as u64));
        self.stats.pads += pads.len() as u64;
        self.stats.blocks += 1;
        self.stats.guest_insns += ninsns as u64;
        self.stats.hot_bytes += buf.len() as u64;
        self.stats.stub_bytes += stub_code.len() as u64;
        self.hot_total += hot_len;
        let f = Fragment {
            start: pc,
            end,
            hot,
            entry: hot + body_off,
            hot_len,
            code_len,
            has_pads: !pads.is_empty(),
            stub_addr: stub,
            stub_len: stub_total,
            stub_code_len: stub_len_each * n_stubs,
            region: ri,
            exits: recs,
            incoming: core::ptr::null_mut(),
            meta,
        };
        // Eagerly link exits whose targets already exist.
        self.frags.insert(pc, f);
        if self.cfg.link {
            let targets: Vec<(usize, u64)> = self.frags[&pc]
                .exits
                .iter()
                .enumerate()
                .filter(|(_, r)| r.patch_at != 0)
                .map(|(k, r)| (k, r.target))
                .collect();
            for (k, t) in targets {
                if self.frags.contains_key(&t) {
                    let rp = &mut *self.frags.get_mut(&pc).map(|f| &mut f.exits[k]).ok_or(StopKind::NoSpace)?
                        as &mut ExitRecord as *mut ExitRecord;
                    self.link(rp);
                }
            }
        }
        Ok(hot + body_off)
    }

    /// Retarget the rel32 field at `at` (4-byte aligned, inside a live
    /// fragment) to `dest`, atomically through the environment.
    fn write_rel32(&mut self, at: u64, dest: u64) -> bool {
        let rel = dest.wrapping_sub(at + 4) as i64;
        if rel != rel as i32 as i64 || !at.is_multiple_of(4) {
            return false;
        }
        self.env.patch_rel32(at, rel as i32)
    }

    /// Link an exit record to its target fragment (which must exist).
    fn link(&mut self, rec: *mut ExitRecord) {
        // SAFETY: `rec` points into a live fragment's boxed exit records.
        let r = unsafe { &mut *rec };
        if r.patch_at == 0 || r.linked != u64::MAX {
            return;
        }
        let Some(tf) = self.frags.get(&r.target) else {
            return;
        };
        let mut dest = tf.entry;
        if !self.write_rel32(r.patch_at, dest) {
            // Target out of rel32 reach (another region): a far trampoline
            // `jmp [rip+0]; dq entry` in the source region's stub area.
            let Some(of) = self.frags.get(&r.owner) else {
                return;
            };
            let ri = of.region;
            let rg = &mut self.regions[ri];
            let Some(t) =
                Region::alloc(&mut rg.stub_free, &mut rg.stub_used, rg.base + rg.hot_size, rg.stub_size, GRANULE)
            else {
                return;
            };
            let mut e = Emit::new(t);
            e.guest(r.target);
            e.ins(Instruction::with1(Code::Jmp_rm64, MemoryOperand::with_base_displ(Register::RIP, (t + 6) as i64)));
            e.raw(&dest.to_le_bytes());
            if e.err || e.buf.len() > GRANULE as usize || !self.env.write_code(t, &e.buf) {
                let rg = &mut self.regions[ri];
                rg.stub_free.push((t, GRANULE));
                return;
            }
            let meta = Box::new(FragMeta {
                start: r.target,
                hot: t,
                hot_len: GRANULE,
                stub: t,
                stub_len: 0,
                hot_map: e.map.into_boxed_slice(),
                stub_map: Box::new([]),
            });
            self.index.publish(&meta);
            self.tramp_metas.push(meta);
            self.stats.trampolines += 1;
            dest = t;
            if !self.write_rel32(r.patch_at, dest) {
                return;
            }
        }
        r.linked = r.target;
        if let Some(tf) = self.frags.get_mut(&r.target) {
            r.next_in = tf.incoming;
            tf.incoming = rec;
        }
        self.stats.links += 1;
    }

    /// The exit records of the fragment for `pc` (what its stubs pass to the
    /// dispatcher), for tests and diagnostics.
    pub fn exit_records(&mut self, pc: u64) -> Vec<*mut ExitRecord> {
        self.frags
            .get_mut(&pc)
            .map(|f| f.exits.iter_mut().map(|r| &mut **r as *mut ExitRecord).collect())
            .unwrap_or_default()
    }

    /// What the dispatcher does when a CPU takes the direct exit `rec` (a
    /// stub passed it): find or translate the target and, unless the record
    /// is dead (its fragment was invalidated) or a reset happened meanwhile,
    /// link the exit to it. Returns the target's body entry.
    ///
    /// # Safety
    /// `rec` is a record of a live fragment, or of an invalidated one not yet
    /// reclaimed (a CPU still inside it may take its exits until then).
    pub unsafe fn take_exit(&mut self, rec: *mut ExitRecord) -> Result<u64, StopKind> {
        // SAFETY: the caller's contract.
        let target = unsafe { (*rec).target };
        let gen = self.generation;
        let entry = self.fragment_for(target)?;
        if gen == self.generation && self.cfg.link {
            self.link(rec);
        }
        Ok(entry)
    }

    /// Look up or translate `pc`.
    pub fn fragment_for(&mut self, pc: u64) -> Result<u64, StopKind> {
        if let Some(f) = self.frags.get(&pc) {
            return Ok(f.entry);
        }
        self.translate(pc)
    }

    /// The dispatcher proper (called from the asm entry with the guest
    /// context in `f`). Returns the code-cache address to continue at, or 0
    /// to return to the environment (reason in `s.exit_reason`, the guest
    /// context in `s.ctx`).
    pub fn dispatch(&mut self, s: &mut Scratch, f: &mut Frame) -> u64 {
        // This CPU has left whatever fragment it was in (but the exit record
        // it passed stays in use until the end of this dispatch).
        s.epoch = s.epoch.wrapping_add(1);
        self.current = s;
        let to = self.dispatch_inner(s, f);
        // Done with the record: now this CPU is quiescent for every pending
        // fragment (it resumes at a live entry or leaves).
        if !self.pending.is_empty() && self.stats.dispatches.is_multiple_of(64) {
            self.reclaim_quiescent(s);
        }
        to
    }

    fn dispatch_inner(&mut self, s: &mut Scratch, f: &mut Frame) -> u64 {
        self.stats.dispatches += 1;
        let ind = f.kind == Frame::KIND_IND;
        self.trace[(self.stats.dispatches % 8) as usize] = if ind {
            f.arg | (1 << 63)
        } else {
            // SAFETY: see below.
            unsafe { (*(f.arg as *const ExitRecord)).owner }
        };
        let (target, rec) = if ind {
            self.stats.lookups += 1;
            self.stats.misses += 1;
            (f.arg, None)
        } else {
            let rp = f.arg as *mut ExitRecord;
            // SAFETY: a stub only ever passes the address of its own boxed
            // exit record, live or pending reclaim.
            let r = unsafe { &*rp };
            if r.stop != 0 {
                return Self::leave(s, f, r.stop, r.target);
            }
            (r.target, Some(rp))
        };
        if target == self.stop_pc {
            return Self::leave(s, f, StopKind::Sentinel as u64, target);
        }
        // Cached returns: an indirect jump to a return pad (a longjmp to an address
        // setjmp read off the stack) continues at the pad.
        if self.pads.contains(&target) {
            if ind {
                if let Some(entry) = self.pad_entry(target) {
                    if let Some(t) = &self.ibl {
                        t.set(target, entry);
                    }
                }
            }
            return target;
        }
        // SAFETY: `rp` is the record a stub passed (see above).
        let r = match rec {
            Some(rp) => unsafe { self.take_exit(rp) },
            None => self.fragment_for(target),
        };
        match r {
            Ok(entry) => {
                if ind {
                    if let (Some(t), Some(fr)) = (&self.ibl, self.frags.get(&target)) {
                        t.set(target, fr.hot);
                    }
                }
                entry
            }
            Err(k) => Self::leave(s, f, k as u64, target),
        }
    }

    /// Give control back to the environment at guest `pc`.
    fn leave(s: &mut Scratch, f: &Frame, reason: u64, pc: u64) -> u64 {
        s.exit_reason = reason;
        s.exit_pc = pc;
        s.ctx = f.ctx;
        s.ctx.rip = pc;
        0
    }

    /// The native pc and register state for an interrupted code-cache
    /// address `regs.rip` (see [`PcIndex::native_state`]); lock-free.
    ///
    /// # Safety
    /// As [`PcIndex::native_state`].
    pub unsafe fn native_state(&self, regs: &mut GuestCtx) -> Option<NativePc> {
        // SAFETY: the caller's contract.
        unsafe { self.index.native_state(regs) }
    }

    /// The lock-free pc index (what a fault or NMI handler keeps a pointer
    /// to; it lives as long as the engine).
    pub fn pc_index(&self) -> *const PcIndex {
        &*self.index
    }

    /// Invalidate every fragment whose guest bytes overlap [lo, hi).
    /// Returns how many fragments were removed. Their space is reclaimed by
    /// [`Engine::reclaim`] (see README: every CPU must have passed a
    /// quiescent point in between).
    pub fn invalidate(&mut self, lo: u64, hi: u64) -> usize {
        self.stats.invalidations += 1;
        let from = lo.saturating_sub(MAX_BLOCK_BYTES as u64 + 16);
        let victims: Vec<u64> =
            self.frags.range(from..hi).filter(|(_, f)| f.start < hi && f.end > lo).map(|(k, _)| *k).collect();
        for v in victims.iter() {
            self.remove_fragment(*v);
        }
        self.stats.invalidated_blocks += victims.len() as u64;
        victims.len()
    }

    fn remove_fragment(&mut self, start: u64) {
        let Some(mut f) = self.frags.remove(&start) else {
            return;
        };
        // 1. Unlink incoming branches: point them back at their own stubs.
        let mut rp = f.incoming;
        while !rp.is_null() {
            // SAFETY: incoming records belong to live fragments (a fragment
            // removes its records from targets' lists when it dies).
            let r = unsafe { &mut *rp };
            rp = r.next_in;
            r.next_in = core::ptr::null_mut();
            if r.linked == start {
                let (at, stub) = (r.patch_at, r.stub);
                self.write_rel32(at, stub);
                r.linked = u64::MAX;
                self.stats.unlinks += 1;
            }
        }
        // 2. Our own outgoing links: drop us from the targets' lists. Then
        // the records die: a CPU still inside this fragment may take one of
        // its exits until quiescence, and the dispatcher must not link it (a
        // later unlink would write into whatever reuses this space).
        for r in f.exits.iter_mut() {
            let p = &mut **r as *mut ExitRecord;
            if r.linked != u64::MAX {
                if let Some(t) = self.frags.get_mut(&r.linked) {
                    let mut link: *mut *mut ExitRecord = &mut t.incoming;
                    // SAFETY: the list holds live records of live fragments.
                    unsafe {
                        while !(*link).is_null() {
                            if *link == p {
                                *link = (*p).next_in;
                                break;
                            }
                            link = &mut (**link).next_in;
                        }
                    }
                }
                r.linked = u64::MAX;
            }
            r.next_in = core::ptr::null_mut();
            r.patch_at = 0;
        }
        // 3. Lookup entry (one shared table: one compare-and-swap) and pc map.
        if let Some(t) = &self.ibl {
            t.clear_if(start, f.hot);
        }
        self.index.retract(&f.meta);
        // 4. Space and records: deferred until quiescence. A fragment holding
        // return pads keeps its space and records for good: a stack may still
        // return to a pad, which jumps on through its (now unlinked) exit stub.
        self.hot_total = self.hot_total.saturating_sub(f.hot_len);
        self.pending.push(Pending {
            region: f.region,
            hot: f.hot,
            hot_len: f.hot_len,
            stub: f.stub_addr,
            stub_len: f.stub_len,
            exits: core::mem::take(&mut f.exits),
            meta: f.meta,
            reuse: !f.has_pads,
            epochs: self.epochs(),
        });
    }

    /// Return space of invalidated fragments to the allocator. Call only
    /// when every CPU has passed through the dispatcher (or is outside the
    /// code cache) since the invalidations (see [`Engine::reclaim_quiescent`]
    /// for the checked version).
    pub fn reclaim(&mut self) {
        self.reclaim_if(|_| true);
    }

    /// Reclaim what every CPU has provably left: each registered CPU is
    /// `current` (the caller, in the dispatcher), outside translated code, or
    /// has entered the dispatcher since the invalidation. Returns how many
    /// invalidated fragments stay pending.
    pub fn reclaim_quiescent(&mut self, current: *const Scratch) -> usize {
        let cpus: Vec<(*mut Scratch, u64, u64)> = self
            .cpus
            .iter()
            // SAFETY: registered blocks stay valid (attach_cpu contract);
            // other CPUs write these words concurrently: volatile reads.
            .map(|&c| unsafe { (c, read_volatile(&(*c).epoch), read_volatile(&(*c).outside)) })
            .collect();
        self.reclaim_if(|p| {
            cpus.iter().enumerate().all(|(i, &(c, epoch, outside))| {
                core::ptr::eq(c, current) || outside != 0 || p.epochs.get(i).is_none_or(|&e| e != epoch)
            })
        });
        self.pending.len()
    }

    fn reclaim_if(&mut self, quiescent: impl Fn(&Pending) -> bool) {
        let mut keep = Vec::new();
        for p in core::mem::take(&mut self.pending) {
            if !p.reuse || !quiescent(&p) {
                keep.push(p);
                continue;
            }
            if let Some(r) = self.regions.get_mut(p.region) {
                r.hot_free.push((p.hot, p.hot_len));
                if p.stub_len != 0 {
                    r.stub_free.push((p.stub, p.stub_len));
                }
            }
            // The dead records and the map are freed here: no CPU can reach
            // their stubs, no interrupted CPU's handler can be reading the map.
            drop(p.exits);
            drop(p.meta);
        }
        self.pending = keep;
    }

    /// Each registered CPU's current `epoch`.
    fn epochs(&self) -> Vec<u64> {
        // SAFETY: as in `reclaim_quiescent`.
        self.cpus.iter().map(|&c| unsafe { read_volatile(&(*c).epoch) }).collect()
    }

    /// Whether every registered CPU but `current` is outside translated code.
    fn alone(&self, current: *const Scratch) -> bool {
        // SAFETY: as in `reclaim_quiescent`.
        self.cpus.iter().all(|&c| core::ptr::eq(c, current) || unsafe { read_volatile(&(*c).outside) } != 0)
    }

    /// Invalidate every fragment (the concurrent-safe flush: space comes
    /// back through [`Engine::reclaim_quiescent`]).
    pub fn invalidate_all(&mut self) -> usize {
        self.invalidate(0, u64::MAX)
    }

    /// Drop everything (all fragments, links, lookup entries, space).
    /// Requires every CPU to be outside the code cache.
    pub fn flush(&mut self) {
        self.stats.flushes += 1;
        for f in self.frags.values() {
            self.index.retract(&f.meta);
        }
        for m in self.tramp_metas.iter() {
            self.index.retract(m);
        }
        self.tramp_metas.clear();
        self.frags.clear();
        self.pending.clear();
        self.pads.clear();
        self.env_pad = None;
        self.pad_entries.clear();
        for r in self.regions.iter_mut() {
            r.hot_used = 0;
            r.stub_used = 0;
            r.hot_free.clear();
            r.stub_free.clear();
        }
        if let Some(t) = &self.ibl {
            t.clear();
        }
        self.hot_total = 0;
        self.generation += 1;
    }

    /// The indirect entry of a return pad (cached returns): the target check for
    /// the pad's own address and a jump to it, in its region's stub area; made
    /// the first time an indirect jump targets the pad, kept until a flush.
    fn pad_entry(&mut self, pad: u64) -> Option<u64> {
        if let Some(&entry) = self.pad_entries.get(&pad) {
            return Some(entry);
        }
        let ri = self.regions.iter().position(|r| pad >= r.base && pad < r.base + r.hot_size)?;
        let emit = |at: u64| {
            let mut e = Emit::new(at);
            if self.cfg.ibt {
                e.raw(&ENDBR64);
            }
            e.target_check(&self.abi, pad);
            let rel = pad.wrapping_sub(e.pc() + 5) as i64;
            e.raw(&[0xE9]);
            e.raw(&(rel as i32).to_le_bytes());
            (!e.err && rel == rel as i32 as i64).then_some(e.buf)
        };
        let size = emit(pad)?.len().div_ceil(GRANULE as usize) as u64 * GRANULE;
        let r = &mut self.regions[ri];
        let at = Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, size)?;
        let code = emit(at).filter(|c| c.len().div_ceil(GRANULE as usize) as u64 * GRANULE == size)?;
        if !self.env.write_code(at, &code) {
            self.regions[ri].stub_free.push((at, size));
            return None;
        }
        self.pad_entries.insert(pad, at);
        Some(at)
    }

    /// Makes room when the cache is full: a reset, except with cached returns,
    /// where stacks may hold pads a reset would free (then nothing: the caller
    /// stops with `NoSpace`). The reset never frees code another CPU may be
    /// running: when every other CPU is outside translated code it flushes;
    /// otherwise it invalidates everything and reclaims what is quiescent
    /// (the rest comes back at later dispatches).
    fn make_room(&mut self) -> bool {
        if self.cfg.cached_returns {
            return false;
        }
        self.stats.resets += 1;
        if self.alone(self.current) {
            // A flush bumps the generation: the dispatcher then leaves the
            // (freed) exit record it holds alone.
            self.flush();
        } else {
            self.invalidate_all();
            // Not exempting the current CPU: the exit record it is being
            // dispatched for may belong to a fragment just invalidated.
            self.reclaim_quiescent(core::ptr::null());
        }
        true
    }

    /// The address a run's outermost return must go to with cached returns (the
    /// environment puts it where the sentinel would go): an exit stub whose
    /// record targets `stop_pc`, placed near `near` (the guest code). Made once
    /// per flush.
    pub fn env_return_pad(&mut self, near: u64) -> Result<u64, StopKind> {
        if let Some((stub, _)) = &self.env_pad {
            return Ok(*stub);
        }
        let ri = self.region_for(near).ok_or(StopKind::NoSpace)?;
        let rec = Box::new(ExitRecord::new(self.stop_pc, 0, 0));
        let (slot, bytes) = stubs_layout(&self.abi, 1);
        let size = bytes.div_ceil(GRANULE) * GRANULE;
        let r = &mut self.regions[ri];
        let stub = Region::alloc(&mut r.stub_free, &mut r.stub_used, r.base + r.hot_size, r.stub_size, size)
            .ok_or(StopKind::NoSpace)?;
        let mut code = exit_stub(&self.abi, stub, stub + slot, self.stop_pc).buf;
        code.resize(slot as usize, 0xCC);
        code.extend_from_slice(&(&*rec as *const ExitRecord as u64).to_le_bytes());
        if !self.env.write_code(stub, &code) {
            self.regions[ri].stub_free.push((stub, size));
            return Err(StopKind::NoSpace);
        }
        self.pads.insert(stub);
        self.env_pad = Some((stub, rec));
        Ok(stub)
    }
}

/// Rust side of the dispatcher entry.
///
/// # Safety
/// Called only by the asm entry routines with the per-CPU block whose
/// `engine` field points at the live engine and the frame they built.
pub unsafe extern "C" fn dbt_rust_dispatch(s: *mut Scratch, f: *mut Frame) -> u64 {
    // SAFETY: see function contract; the dispatcher runs on its own stack with
    // the guest context saved, and the engine is not otherwise borrowed while
    // translated code runs.
    let (s, f) = unsafe { (&mut *s, &mut *f) };
    // SAFETY: as above; `locked` serializes CPUs.
    unsafe { Engine::locked(s.engine as *mut Engine, |e| e.dispatch(s, f)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    const CF: u32 = RflagsBits::CF;
    const ZF: u32 = RflagsBits::ZF;
    const AF: u32 = RflagsBits::AF;

    #[test]
    fn defined_writes_kill_flags() {
        // add rax, rcx; jz: everything dead before the add, ZF live before jz.
        let l = flags_liveness(&decode(&[0x48, 0x01, 0xC8, 0x74, 0x00]));
        assert_eq!(l[0], 0);
        assert_eq!(l[1], ARITH);
    }

    #[test]
    fn undefined_flags_stay_live() {
        // imul rax, rcx leaves SF/ZF/AF/PF undefined: ZF read by jz stays live.
        let l = flags_liveness(&decode(&[0x48, 0x0F, 0xAF, 0xC1, 0x74, 0x00]));
        assert_ne!(l[0] & ZF, 0);
        assert_eq!(l[0] & CF, 0, "imul defines CF");
        // xor eax, eax leaves AF undefined: lahf reads it.
        let l = flags_liveness(&decode(&[0x31, 0xC0, 0x9F]));
        assert_eq!(l[0], AF);
    }

    #[test]
    fn shifts_that_may_not_shift_keep_flags_live() {
        // shl rax, cl; shl rax, 0; shl rax, 64 (masks to 0): all pass flags through.
        for bytes in [&[0x48, 0xD3, 0xE0][..], &[0x48, 0xC1, 0xE0, 0x00], &[0x48, 0xC1, 0xE0, 0x40]] {
            let l = flags_liveness(&decode(bytes));
            assert_eq!(l[0], ARITH, "{bytes:x?}");
        }
        // shl rax, 3 defines CF/SF/ZF/PF (OF and AF undefined): those die.
        let l = flags_liveness(&decode(&[0x48, 0xC1, 0xE0, 0x03]));
        assert_eq!(l[0], RflagsBits::OF | AF);
        // shl eax, 32 masks to 0 for a 32-bit operand.
        assert_eq!(flags_liveness(&decode(&[0xC1, 0xE0, 0x20]))[0], ARITH);
    }
}
