//! Host (Linux user-space) environment and run harness: mmap'd code memory
//! near the guest code, `%gs` pointed at a per-thread `Scratch` with
//! `arch_prctl`, native-vs-translated runs, and a ptrace single-step
//! instruction counter used as the exact reference for `inscount`.

use std::alloc::{alloc_zeroed, Layout};
use std::boxed::Box;
use std::vec::Vec;

use crate::asm;
use crate::client::{Client, InsCount};
use crate::engine::{Config, Engine, Env, StopKind};
use crate::scratch::{Frame, GuestCtx, PerCpuArea, Scratch, XSAVE_AREA};

/// Host environment: the code cache is a memfd mapped twice, read+execute
/// near the guest code (what translated code runs from) and read+write
/// elsewhere (the alias every code write goes through, as the kernel's cache
/// is written through its own alias), so a store the engine made to an
/// executable address directly would fault.
#[derive(Default)]
pub struct HostEnv {
    /// (executable base, writable alias base, size) of each cache mapping.
    maps: Vec<(u64, u64, u64)>,
    /// Retpoline / return thunks by address ([`Env::thunk`]).
    pub thunks: Vec<(u64, crate::Thunk)>,
    /// Lookup tables handed out ([`Env::alloc_table`]): (address, size).
    tables: Vec<(u64, usize)>,
    /// Place cache regions alternately ~1.3 GiB below and above the guest
    /// code, so that two regions are out of rel32 reach of each other (tests
    /// of far links between regions).
    pub spread: bool,
    /// Native regions ([`Env::native`]): `[lo, hi)` guest ranges.
    pub native: Vec<(u64, u64)>,
    /// Mappings of dispatcher entries (not cache regions: `spread` skips them).
    entry_maps: usize,
    /// Test hook: a pool of this many bytes ([`Env::memory_left`]): the
    /// arena's blocks in use from the first translation on are charged
    /// against it, as a small kernel pool would be.
    pub memory_budget: Option<usize>,
    /// Arena bytes in use at the first `memory_left` (the budget's zero).
    budget_base: core::cell::Cell<Option<usize>>,
    /// Test hook: the environment's [`Env::deliver`].
    pub deliver: Option<DeliverHook>,
    /// Test hook ([`Env::native_now`]): a `[lo, hi)` range that runs natively for now,
    /// shared so a test can change it while the engine owns the environment.
    pub native_now: std::sync::Arc<[core::sync::atomic::AtomicU64; 2]>,
    /// Test hook ([`Env::quiescent_entry`]): while set, dispatcher entries are not
    /// quiescent points, as in a kernel interrupt handler over translated code.
    pub nested: std::sync::Arc<core::sync::atomic::AtomicBool>,
    /// Fault sites ([`Env::fault_slot`]): native pcs given slots, each reported to
    /// `on_fault_slot` (native pc, slot) before the engine uses it, as a kernel
    /// environment registers the slot in its exception table.
    pub fault_sites: Vec<u64>,
    pub on_fault_slot: Option<fn(u64, u64)>,
    /// Test hook: called with the pc of each [`Env::read_code`] after the read, as a
    /// writer on another CPU may change the code right after the engine read it.
    pub after_read: Option<fn(u64)>,
    /// The slot page (address, bytes handed out).
    slot_page: Option<(u64, usize)>,
}

/// A test's [`Env::deliver`]: (stop, pc, context) to the pc to continue at.
pub type DeliverHook = fn(crate::StopKind, u64, &mut GuestCtx) -> Option<u64>;

/// `size` bytes (rounded to pages) of memory mapped with `prot`, from `fd`
/// (shared) or anonymous (private) when `fd` is -1, at an address within
/// ±1.5 GiB of `near`, or None.
fn map_near(near: u64, size: usize, prot: i32, fd: i32) -> Option<u64> {
    map_near_from(near, size, prot, fd, 1, [0, 1])
}

/// [`map_near`] starting `k0` 64 MiB steps away, trying the directions in
/// `dirs` order (0: below, 1: above).
fn map_near_from(near: u64, size: usize, prot: i32, fd: i32, k0: u64, dirs: [u64; 2]) -> Option<u64> {
    let size = (size + 0xfff) & !0xfff;
    let flags = if fd < 0 { libc::MAP_PRIVATE | libc::MAP_ANONYMOUS } else { libc::MAP_SHARED };
    // Try below and above `near` in 64 MiB steps.
    for k in k0..24u64 {
        for dir in dirs {
            let off = k * (64 << 20);
            let hint = if dir == 0 { near.checked_sub(off + size as u64) } else { near.checked_add(off) };
            let Some(hint) = hint else { continue };
            let hint = hint & !0xfff;
            if !(0x10000..=0x7fff_0000_0000).contains(&hint) {
                continue;
            }
            // SAFETY: MAP_FIXED_NOREPLACE never replaces existing mappings;
            // we only use the result if the kernel placed it at `hint`.
            let p =
                unsafe { libc::mmap(hint as *mut libc::c_void, size, prot, flags | libc::MAP_FIXED_NOREPLACE, fd, 0) };
            if p == libc::MAP_FAILED {
                continue;
            }
            if p as u64 != hint {
                // SAFETY: unmapping the mapping we just got.
                unsafe { libc::munmap(p, size) };
                continue;
            }
            return Some(p as u64);
        }
    }
    None
}

/// `bytes` of zeroed read+write memory in the low 2 GiB (`MAP_32BIT`), where
/// a sign-extended disp32 reaches it: the shared lookup table. The caller
/// owns the mapping.
pub fn low_table(bytes: usize) -> Option<u64> {
    // SAFETY: a fresh anonymous mapping.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as u64)
}

/// Read+write+execute memory near `near` for guest code that tests write and
/// then run (natively and translated); not a code cache.
pub fn rwx_near(near: u64, size: usize) -> Option<u64> {
    map_near(near, size, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC, -1)
}

impl HostEnv {
    /// [`Env::read_code`] itself: what is readable at `pc` (up to `buf.len()` bytes).
    fn read_code_now(&self, pc: u64, buf: &mut [u8]) -> usize {
        // Read up to the end of the page, and the next page only if it is
        // mapped (mincore-free check: process_vm_readv never faults).
        let iov_local = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
        let iov_remote = libc::iovec { iov_base: pc as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: process_vm_readv on our own pid copies what is readable
        // and reports failures instead of faulting.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &iov_local, 1, &iov_remote, 1, 0) };
        if n > 0 {
            return n as usize;
        }
        // Partial (crossing into an unmapped page): read up to the page end.
        let till_page = (0x1000 - (pc & 0xfff)) as usize;
        if till_page < buf.len() {
            let l = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: till_page };
            let r = libc::iovec { iov_base: pc as *mut libc::c_void, iov_len: till_page };
            // SAFETY: as above.
            let n = unsafe { libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0) };
            if n > 0 {
                return n as usize;
            }
        }
        0
    }

    pub fn new() -> HostEnv {
        HostEnv::default()
    }

    /// The writable alias of `[at, at + len)` in the cache, if it lies in one mapping.
    fn alias(&self, at: u64, len: u64) -> Option<u64> {
        self.maps.iter().find(|&&(x, _, sz)| at >= x && at + len <= x + sz).map(|&(x, w, _)| w + (at - x))
    }
}

impl Drop for HostEnv {
    fn drop(&mut self) {
        for &(t, sz) in self.tables.iter() {
            // SAFETY: our table mapping; its engine is being dropped.
            unsafe { libc::munmap(t as *mut libc::c_void, sz) };
        }
        // Harnesses live for a whole test; their caches are unmapped with them.
        for &(x, w, sz) in self.maps.iter() {
            // SAFETY: both mappings are ours and nothing runs from them any more
            // (the engine owning this environment is being dropped).
            unsafe {
                libc::munmap(x as *mut libc::c_void, sz as usize);
                libc::munmap(w as *mut libc::c_void, sz as usize);
            }
        }
    }
}

impl Env for HostEnv {
    fn alloc_code(&mut self, near: u64, size: usize) -> Option<u64> {
        let size = (size + 0xfff) & !0xfff;
        // SAFETY: plain syscalls on a descriptor we own; it is closed once
        // both mappings exist (they keep the memory).
        unsafe {
            let fd = libc::memfd_create(c"kdbt-cache".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return None;
            }
            if libc::ftruncate(fd, size as libc::off_t) != 0 {
                libc::close(fd);
                return None;
            }
            let x = if self.spread {
                let d = ((self.maps.len() - self.entry_maps) % 2) as u64;
                map_near_from(near, size, libc::PROT_READ | libc::PROT_EXEC, fd, 20, [d, 1 - d])
            } else {
                map_near(near, size, libc::PROT_READ | libc::PROT_EXEC, fd)
            };
            let w =
                libc::mmap(core::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
            libc::close(fd);
            match (x, w) {
                (Some(x), w) if w != libc::MAP_FAILED => {
                    self.maps.push((x, w as u64, size as u64));
                    Some(x)
                }
                (x, w) => {
                    if let Some(x) = x {
                        libc::munmap(x as *mut libc::c_void, size);
                    }
                    if w != libc::MAP_FAILED {
                        libc::munmap(w, size);
                    }
                    None
                }
            }
        }
    }

    fn alloc_entries(&mut self, near: u64, size: usize) -> Option<u64> {
        let spread = core::mem::replace(&mut self.spread, false);
        let at = self.alloc_code(near, size);
        self.spread = spread;
        self.entry_maps += at.is_some() as usize;
        at
    }

    fn alloc_table(&mut self, bytes: usize) -> Option<u64> {
        let t = low_table(bytes)?;
        self.tables.push((t, bytes));
        Some(t)
    }

    fn native(&self, pc: u64) -> bool {
        self.native.iter().any(|&(lo, hi)| pc >= lo && pc < hi)
    }

    fn deliver(&mut self, kind: crate::StopKind, pc: u64, ctx: &mut GuestCtx) -> Option<u64> {
        self.deliver.and_then(|d| d(kind, pc, ctx))
    }

    fn native_now(&mut self, pc: u64) -> bool {
        use core::sync::atomic::Ordering::Relaxed;
        (self.native_now[0].load(Relaxed)..self.native_now[1].load(Relaxed)).contains(&pc)
    }

    fn quiescent_entry(&self, _ctx: &GuestCtx) -> bool {
        !self.nested.load(core::sync::atomic::Ordering::Relaxed)
    }

    fn fault_slot(&mut self, pc: u64, _bytes: &[u8]) -> Option<u64> {
        const PAGE: usize = 4096;
        if !self.fault_sites.contains(&pc) {
            return None;
        }
        if self.slot_page.is_none_or(|(_, used)| used + crate::FAULT_SLOT_BYTES > PAGE) {
            self.slot_page = Some((self.alloc_code(pc, PAGE)?, 0));
        }
        let (page, used) = self.slot_page.as_mut()?;
        let slot = *page + *used as u64;
        *used += crate::FAULT_SLOT_BYTES;
        if let Some(f) = self.on_fault_slot {
            f(pc, slot);
        }
        Some(slot)
    }

    fn memory_left(&self) -> usize {
        // The arena is reserved on the first dispatcher-mode allocation; an engine
        // driven outside the harness may ask before that.
        if !crate::host_alloc::arena() {
            return 0;
        }
        let arena = &crate::host_alloc::ARENA;
        let Some(budget) = self.memory_budget else {
            return arena.bump_left();
        };
        let in_use = arena.stats().in_use;
        let base = self.budget_base.get().unwrap_or(in_use);
        self.budget_base.set(Some(base));
        budget.saturating_sub(in_use.saturating_sub(base)).min(arena.bump_left())
    }

    fn thunk(&self, target: u64) -> Option<crate::Thunk> {
        self.thunks.iter().find(|t| t.0 == target).map(|t| t.1)
    }

    fn write_code(&mut self, at: u64, bytes: &[u8]) -> bool {
        let Some(w) = self.alias(at, bytes.len() as u64) else { return false };
        // SAFETY: `w` is the writable alias of cache memory this environment
        // mapped, with `bytes.len()` bytes inside the mapping.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), w as *mut u8, bytes.len()) };
        true
    }

    fn patch_rel32(&mut self, at: u64, rel: i32) -> bool {
        let Some(w) = self.alias(at, 4) else { return false };
        if !w.is_multiple_of(4) {
            return false;
        }
        // SAFETY: an aligned 4-byte field of our alias mapping; one aligned
        // 32-bit store is atomic, so a CPU executing the branch through the
        // executable mapping sees the old or the new displacement.
        unsafe {
            (*(w as *const core::sync::atomic::AtomicU32)).store(rel as u32, core::sync::atomic::Ordering::Release)
        };
        true
    }

    fn read_code(&self, pc: u64, buf: &mut [u8]) -> usize {
        let n = self.read_code_now(pc, buf);
        if let Some(f) = self.after_read {
            f(pc);
        }
        n
    }
}

/// Result of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub rax: u64,
    pub rdx: u64,
    /// Callee-saved registers after the run: rbx, rbp, r12, r13, r14, r15.
    pub callee_saved: [u64; 6],
    pub stop: StopKind,
    pub stop_pc: u64,
}

/// Values placed in callee-saved registers at entry; checked at exit.
pub const CALLEE_SEED: [u64; 6] = [
    0x1111_2222_3333_4444,
    0x5555_6666_7777_8888,
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_3210,
    0x0f0f_0f0f_f0f0_f0f0,
    0x7a7a_5b5b_3c3c_1d1d,
];

fn callee_of(c: &GuestCtx) -> [u64; 6] {
    [
        c.gpr[GuestCtx::RBX],
        c.gpr[GuestCtx::RBP],
        c.gpr[GuestCtx::R12],
        c.gpr[GuestCtx::R13],
        c.gpr[GuestCtx::R14],
        c.gpr[GuestCtx::R15],
    ]
}

fn seed_ctx(args: &[u64]) -> GuestCtx {
    let mut c = GuestCtx::default();
    let regs = [GuestCtx::RDI, GuestCtx::RSI, GuestCtx::RDX, GuestCtx::RCX, GuestCtx::R8, GuestCtx::R9];
    for (k, a) in args.iter().take(6).enumerate() {
        c.gpr[regs[k]] = *a;
    }
    c.gpr[GuestCtx::RBX] = CALLEE_SEED[0];
    c.gpr[GuestCtx::RBP] = CALLEE_SEED[1];
    c.gpr[GuestCtx::R12] = CALLEE_SEED[2];
    c.gpr[GuestCtx::R13] = CALLEE_SEED[3];
    c.gpr[GuestCtx::R14] = CALLEE_SEED[4];
    c.gpr[GuestCtx::R15] = CALLEE_SEED[5];
    c.rflags = 0x202;
    c
}

/// Run `f(args...)` natively on the caller's stack (through the same entry
/// convention). To compare with a translated run instruction for instruction,
/// use [`Harness::run_native`], which runs on the harness's guest stack.
pub fn run_native(f: u64, args: &[u64]) -> RunResult {
    run_native_on(f, args, 0)
}

fn run_native_on(f: u64, args: &[u64], stack_top: u64) -> RunResult {
    let mut c = seed_ctx(args);
    c.gpr[GuestCtx::RSP] = stack_top;
    // SAFETY: `f` is a function with the C ABI taking up to six integer
    // arguments; dbt_native_call preserves the host's callee-saved state.
    unsafe { asm::dbt_native_call(&mut c, f) };
    RunResult {
        rax: c.gpr[GuestCtx::RAX],
        rdx: c.gpr[GuestCtx::RDX],
        callee_saved: callee_of(&c),
        stop: StopKind::Sentinel,
        stop_pc: 0,
    }
}

/// Owns an engine, a per-thread `Scratch` (installed as the thread's `%gs`
/// base), the dispatcher stack and a guest stack.
pub struct Harness {
    pub engine: Box<Engine>,
    scratch: *mut Scratch,
    _dstack: Vec<u8>,
    gstack: Vec<u8>,
}

const ARCH_SET_GS: i32 = 0x1001;

std::thread_local! {
    /// The `%gs` base this thread last installed.
    static GS_BASE: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

impl Harness {
    pub fn new(client: Option<Box<dyn Client>>) -> Harness {
        Self::with_config(client, Config::default())
    }

    pub fn with_config(client: Option<Box<dyn Client>>, cfg: Config) -> Harness {
        Self::with_env(client, cfg, HostEnv::new())
    }

    /// A harness whose engine uses `env` (e.g. with thunks declared).
    pub fn with_env(client: Option<Box<dyn Client>>, cfg: Config, env: HostEnv) -> Harness {
        crate::host_alloc::with_dbt_alloc(|| Self::with_config_inner(client, cfg, env))
    }

    fn with_config_inner(client: Option<Box<dyn Client>>, mut cfg: Config, env: HostEnv) -> Harness {
        // Threads, unlike CPUs with interrupts off, get preempted holding the lock, or
        // waiting in line for it (a ticket lock): sleeping, not yielding, gives the CPU to
        // that thread on a host busy with other work.
        cfg.relax = || std::thread::sleep(std::time::Duration::from_micros(20));
        let gstack = std::vec![0u8; 16 << 20];
        let mut engine = Box::new(Engine::new(Box::new(env), client, cfg).expect("host engine"));
        engine.stop_pc = asm::dbt_sentinel as *const () as u64;
        let (scratch, dstack) = new_cpu(&mut engine);
        Harness { engine, scratch, _dstack: dstack, gstack }
    }

    fn install_gs(&self) {
        install_gs_base(self.scratch);
    }

    pub fn scratch(&mut self) -> &mut Scratch {
        // SAFETY: owned by the harness, not used by translated code while we
        // hold &mut self outside of `run`.
        unsafe { &mut *self.scratch }
    }

    /// Top of the guest stack: 16-byte aligned, with 16 bytes above it
    /// inside the stack (`dbt_native_call` keeps the host rsp at the top).
    /// Translated and native runs both enter the function with
    /// `rsp = top - 8`.
    fn stack_top(&self) -> u64 {
        (self.gstack.as_ptr() as u64 + self.gstack.len() as u64 - 16) & !15
    }

    /// Run `f(args...)` natively on the same guest stack, at the same
    /// addresses, as [`Harness::run`]: the reference run for comparisons.
    pub fn run_native(&mut self, f: u64, args: &[u64]) -> RunResult {
        run_native_on(f, args, self.stack_top())
    }

    /// The native states of `f(args...)` on this harness's guest stack, one
    /// per instruction (see [`ptrace_steps`]), into `out` (its capacity is
    /// reserved by the caller: nothing is allocated while the child runs).
    /// The last state is the one after the return, with the pc a
    /// translated run returns to (the sentinel). False if the child did not
    /// return or `out` filled up.
    pub fn ptrace_trace(&mut self, f: u64, args: &[u64], out: &mut Vec<NativeStep>) -> bool {
        let cap = out.capacity();
        let (ret, sentinel) = (asm::dbt_native_ret as *const () as u64, self.engine.stop_pc);
        let ok = ptrace_steps(f, args, self.stack_top(), true, &mut |r| {
            if out.len() < cap {
                out.push((
                    if r.rip == ret { sentinel } else { r.rip },
                    gprs_of(r),
                    r.eflags & crate::pcmap::ARITH_FLAGS,
                ));
            }
        });
        ok && out.len() < cap
    }

    /// A handle for nested translated runs from a signal handler.
    pub fn nested(&mut self, stack: &mut [u8]) -> NestedRunner {
        let top = (stack.as_ptr() as u64 + stack.len() as u64 - 16) & !15;
        NestedRunner { engine: &mut *self.engine, scratch: self.scratch, stack_top: top }
    }

    /// Install this harness's per-CPU block as the thread's `%gs` base (runs
    /// do it themselves; a handler running nested code needs it first).
    pub fn install(&self) {
        self.install_gs();
    }

    /// Count the instructions `f(args...)` executes natively on this
    /// harness's guest stack (see [`ptrace_count`]).
    pub fn ptrace_count(&mut self, f: u64, args: &[u64]) -> Option<u64> {
        ptrace_count(f, args, self.stack_top())
    }

    /// Run `f(args...)` under the DBT from its entry until it returns to the
    /// sentinel (or stops).
    pub fn run(&mut self, f: u64, args: &[u64]) -> RunResult {
        self.install_gs();
        let top = self.stack_top();
        // SAFETY: our engine and block; one thread runs this harness.
        unsafe { enter(&mut *self.engine, self.scratch, top, f, args) }
    }

    /// Another CPU of this harness's engine, for running translated code on
    /// another thread. Register every CPU before any of them runs.
    pub fn add_cpu(&mut self) -> HostCpu {
        let (scratch, dstack) = new_cpu(&mut self.engine);
        HostCpu { engine: &mut *self.engine, scratch, _dstack: dstack, gstack: std::vec![0u8; 1 << 20] }
    }

    /// bbcov results (valid with the `BbCov` client).
    pub fn bbcov_hits(&mut self) -> Vec<(u64, u64)> {
        self.bbcov_blocks().iter().map(|b| (b.start, b.hits)).collect()
    }

    /// bbcov's blocks with their native lengths (valid with the `BbCov` client).
    pub fn bbcov_blocks(&mut self) -> Vec<crate::client::CovBlock> {
        let Some(c) = self.engine.client_mut() else {
            return Vec::new();
        };
        let p = c as *mut dyn Client as *mut crate::client::BbCov;
        // SAFETY: callers only use this with a harness built with BbCov.
        unsafe { (*p).blocks() }
    }

    /// Instructions counted by inscount (valid with the `InsCount` client).
    pub fn inscount(&mut self) -> u64 {
        InsCount::total(self.scratch())
    }

    /// Restarts the inscount count (valid with the `InsCount` client).
    pub fn reset_inscount(&mut self) {
        InsCount::reset(self.scratch())
    }
}

/// A per-CPU area and dispatcher stack registered with `engine` (the area
/// is never freed: the engine keeps its address).
fn new_cpu(engine: &mut Engine) -> (*mut Scratch, Vec<u8>) {
    let layout = Layout::new::<PerCpuArea>();
    // SAFETY: non-zero-sized layout; all-zero bytes are a valid area (plain
    // integers and arrays).
    let area = unsafe { alloc_zeroed(layout) } as *mut PerCpuArea;
    assert!(!area.is_null(), "out of memory for the per-CPU block");
    // SAFETY: the block is the area's first field.
    let scratch = unsafe { core::ptr::addr_of_mut!((*area).scratch) };
    let dstack = std::vec![0u8; 1 << 20];
    let top = dstack.as_ptr() as u64 + dstack.len() as u64;
    // SAFETY: the block is leaked, the dispatcher stack lives as long as the
    // harness or CPU handle that owns the engine's use of it.
    unsafe { engine.attach_cpu(scratch, top) };
    // SAFETY: `scratch` is valid; xsave needs OSXSAVE (checked) and the area
    // is 64-byte aligned inside the block.
    unsafe {
        (*scratch).save_xstate = xsave_mask();
        (*scratch).rust_dispatch = host_dispatch as *const () as u64;
        (*scratch).counters_ptr = core::ptr::addr_of_mut!((*area).counters) as u64;
    }
    (scratch, dstack)
}

/// Install `scratch` as this thread's `%gs` base (once per thread and block:
/// the syscall is not free, and a signal pending meanwhile would always be
/// delivered at its return).
fn install_gs_base(scratch: *mut Scratch) {
    // The block sits at gs:[HOST_GS_BASE] (Config::gs_base of host engines).
    let base = (scratch as u64).wrapping_sub(asm::HOST_GS_BASE as u64);
    if GS_BASE.with(|g| g.get()) == base {
        return;
    }
    // SAFETY: sets this thread's user %gs base; nothing else in a Rust
    // program on x86-64 Linux uses %gs (TLS is %fs).
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base) };
    assert_eq!(r, 0, "arch_prctl(ARCH_SET_GS) failed");
    GS_BASE.with(|g| g.set(base));
}

/// Run `f(args...)` translated on the CPU whose block is `scratch` (already
/// this thread's `%gs` base), on the guest stack whose top is `top`, from
/// its entry until it returns to the sentinel (or stops). The engine is used
/// under its lock.
///
/// # Safety
/// `engine` and `scratch` are live and registered with each other; no other
/// thread uses `scratch`.
unsafe fn enter(engine: *mut Engine, scratch: *mut Scratch, top: u64, f: u64, args: &[u64]) -> RunResult {
    let mut c = seed_ctx(args);
    let rsp = top - 8;
    let stop = |k| RunResult { rax: 0, rdx: 0, callee_saved: [0; 6], stop: k, stop_pc: f };
    // The outermost return: the sentinel (transparent returns go through the
    // dispatcher, which recognizes it), or with cached returns, whose `ret` runs
    // natively, a return pad that leads to the dispatcher.
    // This CPU counts as inside translated code from before it gets its
    // entry: were it still "outside" between leaving the lock with an entry
    // and jumping there, another CPU could invalidate and reclaim that code
    // in between.
    // SAFETY: the caller's contract: this thread owns the block; other CPUs
    // read the word for quiescence.
    unsafe { core::ptr::write_volatile(&mut (*scratch).outside, 0) };
    // SAFETY: the caller's contract.
    let first = unsafe {
        Engine::locked(engine, |e| {
            crate::host_alloc::with_dbt_alloc(|| {
                let sentinel = if e.cfg.cached_returns { e.env_return_pad(f)? } else { e.stop_pc };
                Ok((sentinel, e.fragment_for(f)?))
            })
        })
    };
    let (sentinel, entry) = match first {
        Ok(v) => v,
        Err(k) => {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&mut (*scratch).outside, 1) };
            return stop(k);
        }
    };
    // SAFETY: rsp is inside the caller's guest stack.
    unsafe { *(rsp as *mut u64) = sentinel };
    c.gpr[GuestCtx::RSP] = rsp;
    c.rip = f;
    // SAFETY: the caller's contract: this thread owns the block.
    let s = unsafe { &mut *scratch };
    s.ctx = c;
    s.tgt = entry;
    s.exit_reason = 0;
    // SAFETY: %gs points at the block, whose context and target were just
    // set; dbt_enter returns when the dispatcher gives control back.
    unsafe { asm::dbt_enter(s) };
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut s.outside, 1) };
    let c = s.ctx;
    RunResult {
        rax: c.gpr[GuestCtx::RAX],
        rdx: c.gpr[GuestCtx::RDX],
        callee_saved: callee_of(&c),
        stop: StopKind::from_u64(s.exit_reason).unwrap_or(StopKind::Unsupported),
        stop_pc: s.exit_pc,
    }
}

/// Another CPU of a harness's engine ([`Harness::add_cpu`]): its own
/// per-CPU area, dispatcher stack and guest stack. Move it to a thread and
/// run there; the harness must outlive it.
pub struct HostCpu {
    engine: *mut Engine,
    scratch: *mut Scratch,
    _dstack: Vec<u8>,
    gstack: Vec<u8>,
}

// SAFETY: the handle is used by one thread at a time; the engine it points
// to is only used under the engine's lock.
unsafe impl Send for HostCpu {}

impl HostCpu {
    /// Run `f(args...)` translated on this CPU (the calling thread).
    pub fn run(&mut self, f: u64, args: &[u64]) -> RunResult {
        install_gs_base(self.scratch);
        let top = (self.gstack.as_ptr() as u64 + self.gstack.len() as u64 - 16) & !15;
        // SAFETY: our block, registered with the harness's live engine.
        unsafe { enter(self.engine, self.scratch, top, f, args) }
    }

    /// Inline-lookup hits of this CPU (`Config::count_lookups`).
    pub fn lookup_hits(&self) -> u64 {
        // SAFETY: our block; read after our own runs.
        unsafe { (*self.scratch).lookup_hits }
    }
}

/// Host dispatcher: the engine's dispatcher with arena allocation (see
/// `host_alloc`).
unsafe extern "C" fn host_dispatch(s: *mut Scratch, f: *mut Frame) -> u64 {
    // SAFETY: same contract as dbt_rust_dispatch (called by the asm entry).
    crate::host_alloc::with_dbt_alloc(|| {
        use crate::host_alloc::{ARENA, MAX_DISPATCH_GROWTH};
        use core::sync::atomic::Ordering;
        let dirs = crate::pcmap::REGION_DIR_BYTES.load(Ordering::Relaxed);
        let bump = ARENA.bump_used();
        // SAFETY: the caller's contract.
        let r = unsafe { crate::engine::dbt_rust_dispatch(s, f) };
        // What the bump pointer passed (blocks and their alignment padding: what
        // `Pool::bump_left`, the engine's measure of memory left, loses). A dispatch that
        // made a region (its directory is checked against the memory left on its own,
        // `Engine::region_for`) is not measured.
        let grew = if crate::pcmap::REGION_DIR_BYTES.load(Ordering::Relaxed) == dirs {
            ARENA.bump_used().saturating_sub(bump)
        } else {
            0
        };
        MAX_DISPATCH_GROWTH.fetch_max(grew, Ordering::Relaxed);
        r
    })
}

/// The xsave requested-feature bitmap for the dispatcher's save area: every
/// component the OS enabled (XCR0) but AMX (tile config and data, 8 KB that
/// neither Rust code nor glibc touches without asking the kernel first), each
/// checked to end within the area; 0 without OSXSAVE.
fn xsave_mask() -> u64 {
    use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return 0;
    }
    // SAFETY: OSXSAVE is set, so XGETBV(0) is allowed.
    let xcr0 = unsafe { _xgetbv(0) };
    let mask = xcr0 & !((1 << 17) | (1 << 18));
    for i in 2..63 {
        if mask & (1 << i) != 0 {
            let c = __cpuid_count(0xd, i);
            let end = c.ebx as usize + c.eax as usize;
            assert!(end <= XSAVE_AREA, "xsave component {i} ends at {end}, beyond the {XSAVE_AREA}-byte area");
        }
    }
    mask
}

/// Single-step `f(args...)` natively in a forked child with ptrace, calling
/// `on_step` with the registers before every instruction from `f`'s entry
/// to its return (a `rep` string instruction stops once per iteration). The
/// child runs `f` on the stack whose top is `stack_top` (0: its own stack);
/// being a fork, it has the parent's memory, heap state and code at the same
/// addresses. `on_step` must not allocate (the tracer's heap must stay as
/// the child's was, for a translated run that follows). False if the child
/// did not reach the return. With `with_return`, `on_step` also sees the
/// state right after `f` returned (at `dbt_native_ret`).
fn ptrace_steps(
    f: u64,
    args: &[u64],
    stack_top: u64,
    with_return: bool,
    on_step: &mut dyn FnMut(&libc::user_regs_struct),
) -> bool {
    let ret_addr = asm::dbt_native_ret as *const () as u64;
    // SAFETY: fork in the caller's process; the child only calls the
    // function and _exit (no return into the test harness).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return false;
    }
    if pid == 0 {
        // SAFETY: child side: PTRACE_TRACEME, stop, run, exit.
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            let mut c = seed_ctx(args);
            c.gpr[GuestCtx::RSP] = stack_top;
            asm::dbt_native_call(&mut c, f);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut started = false;
    loop {
        // SAFETY: ptrace on our stopped, traced child.
        let mut regs: libc::user_regs_struct = unsafe { core::mem::zeroed() };
        unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs as *mut _ as *mut libc::c_void) };
        started |= regs.rip == f;
        if started {
            if regs.rip == ret_addr {
                if with_return {
                    on_step(&regs);
                }
                break;
            }
            on_step(&regs);
        }
        // SAFETY: as above.
        unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, pid, 0, 0) };
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return false;
        }
    }
    // SAFETY: kill and reap our child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
    true
}

/// Count the instructions `f(args...)` executes natively (see
/// [`ptrace_steps`]; a `rep`-prefixed string instruction counts once,
/// however many iterations it runs).
fn ptrace_count(f: u64, args: &[u64], stack_top: u64) -> Option<u64> {
    let mut count = 0u64;
    let mut prev_rip = 0u64;
    let mut prev_rep = false;
    // Whether the instruction at an address is a rep-prefixed string
    // instruction, decoded once per address (reading the code is a syscall).
    // A direct-mapped cache on the stack: the tracer must not touch the heap
    // while the child runs.
    let mut rep_string = [(u64::MAX, false); 4096];
    let ok = ptrace_steps(f, args, stack_top, false, &mut |regs| {
        let rip = regs.rip;
        if !(rip == prev_rip && prev_rep) {
            count += 1;
        }
        let slot = &mut rep_string[(rip as usize ^ (rip as usize >> 12)) % 4096];
        if slot.0 != rip {
            // The child is a fork of us: its code is at the same addresses.
            let mut buf = [0u8; 15];
            let n = HostEnv::default().read_code(rip, &mut buf);
            let i = iced_x86::Decoder::with_ip(64, &buf[..n], rip, iced_x86::DecoderOptions::NONE).decode();
            *slot =
                (rip, (i.has_rep_prefix() || i.has_repe_prefix() || i.has_repne_prefix()) && i.is_string_instruction());
        }
        prev_rep = slot.1;
        prev_rip = rip;
    });
    ok.then_some(count)
}

/// One native state: rip, the GPRs in [`GuestCtx`] order and the arithmetic
/// flags ([`crate::pcmap::ARITH_FLAGS`] of rflags).
pub type NativeStep = (u64, [u64; 16], u64);

/// The GPRs of a ptrace register set in [`GuestCtx`] order.
pub fn gprs_of(r: &libc::user_regs_struct) -> [u64; 16] {
    [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
}

/// The GPRs of a signal context in [`GuestCtx`] order.
pub fn gprs_of_mcontext(m: &libc::mcontext_t) -> [u64; 16] {
    let g = |i: i32| m.gregs[i as usize] as u64;
    [
        g(libc::REG_RAX),
        g(libc::REG_RCX),
        g(libc::REG_RDX),
        g(libc::REG_RBX),
        g(libc::REG_RSP),
        g(libc::REG_RBP),
        g(libc::REG_RSI),
        g(libc::REG_RDI),
        g(libc::REG_R8),
        g(libc::REG_R9),
        g(libc::REG_R10),
        g(libc::REG_R11),
        g(libc::REG_R12),
        g(libc::REG_R13),
        g(libc::REG_R14),
        g(libc::REG_R15),
    ]
}

/// A handle for running translated code from a signal handler on the
/// thread whose run it interrupted (the host's stand-in for an interrupt
/// handler that itself runs from the code cache): same engine, same per-CPU
/// block, its own guest stack. Only valid while its harness lives.
#[derive(Clone, Copy)]
pub struct NestedRunner {
    engine: *mut Engine,
    scratch: *mut Scratch,
    stack_top: u64,
}

// SAFETY: plain pointers handed to a signal handler of the same thread.
unsafe impl Send for NestedRunner {}
unsafe impl Sync for NestedRunner {}

impl NestedRunner {
    /// Run `f(args...)` translated and return its rax (None if it stopped
    /// elsewhere than at the sentinel). The interrupted run's per-CPU state
    /// (resume target, host rsp, context, exit fields) is saved and restored
    /// around it.
    ///
    /// # Safety
    /// Called on the harness's thread, from a signal handler that
    /// interrupted translated code (not the dispatcher or the harness), with
    /// the harness alive.
    pub unsafe fn run(&self, f: u64, args: &[u64]) -> Option<u64> {
        // SAFETY: the caller's contract: the block and engine are live and
        // the interrupted code holds no reference to them.
        let (s, e) = unsafe { (&mut *self.scratch, &mut *self.engine) };
        let saved = (s.tgt, s.host_rsp, s.ctx, s.exit_reason, s.exit_pc);
        let mut c = seed_ctx(args);
        let rsp = self.stack_top - 8;
        // SAFETY: our own stack.
        unsafe { *(rsp as *mut u64) = e.stop_pc };
        c.gpr[GuestCtx::RSP] = rsp;
        c.rip = f;
        // SAFETY: the engine is live; its lock is free (we interrupted
        // translated code, not the dispatcher).
        let entry = unsafe { Engine::locked(e, |e| crate::host_alloc::with_dbt_alloc(|| e.fragment_for(f))) }.ok()?;
        s.ctx = c;
        s.tgt = entry;
        s.exit_reason = 0;
        // SAFETY: %gs points at this block (the interrupted run installed it).
        unsafe { asm::dbt_enter(s) };
        let r = (s.exit_reason == StopKind::Sentinel as u64).then_some(s.ctx.gpr[GuestCtx::RAX]);
        (s.tgt, s.host_rsp, s.ctx, s.exit_reason, s.exit_pc) = saved;
        r
    }
}
