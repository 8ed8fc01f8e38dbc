//! The DBT engine's environment in the kernel ([`dbt::Env`]): the code cache (the
//! module's own executable section, written through a `vmap` alias), kernel reads that
//! cannot fault, the shared lookup table in the module's `.bss` (module space: a
//! sign-extended disp32 reaches it), the kernel's retpoline and return thunks, and the
//! native regions (this module's text: the code that calls into the cache and gets its
//! results back).
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use dbt::{Env, GuestCtx, StopKind, Thunk};

use super::faults::{FaultSites, FAULT_PAGES};
use crate::ffi;

/// The lookup table (`dbt::ibl::IBL_BYTES`), one per system.
#[repr(C, align(4096))]
struct Table([u64; dbt::ibl::IBL_ENTRIES]);

static mut TABLE: Table = Table([0; dbt::ibl::IBL_ENTRIES]);
/// The lookup table's address (what translated code and the #VE stub index).
pub fn table_addr() -> u64 {
    core::ptr::addr_of!(TABLE) as u64
}

/// Whether an engine holds [`TABLE`] (or the code cache).
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Claims the code cache and the lookup table for one environment (false: another
/// engine has them).
pub fn claim() -> bool {
    IN_USE.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Set while a session stops: every target is native (the dispatcher drains).
static DRAINING: AtomicBool = AtomicBool::new(false);

pub fn set_draining(on: bool) {
    DRAINING.store(on, Ordering::Release);
}

/// A writable alias whose environment was dropped with interrupts off (an engine that
/// failed to build in dispatcher mode): vunmap may sleep, so [`release`] undoes it.
static PENDING_UNALIAS: AtomicU64 = AtomicU64::new(0);

/// Releases what [`claim`] took (once nothing can run from the cache any more; process
/// context).
pub fn release() {
    let w = PENDING_UNALIAS.swap(0, Ordering::AcqRel);
    if w != 0 {
        // SAFETY: an alias from `KernelEnv::new` whose environment is gone.
        unsafe { ffi::kdbt_glue_cache_unalias(w) };
    }
    IN_USE.store(false, Ordering::Release);
}

/// Pages at the end of the code cache that the engine never gets: the EPT-steering
/// check's native target and its #VE entry stub ([`super::steer`]).
pub const STEER_PAGES: u64 = 2;

/// How far a code-cache address may be from what it must reach with a rel32.
const REACH: u64 = (1 << 31) - (16 << 20);

pub struct KernelEnv {
    /// Executable address and size of the code cache; its writable alias.
    x: u64,
    size: u64,
    w: u64,
    used: u64,
    module_text: (u64, u64),
    thunks: Vec<(u64, Thunk)>,
    table_given: bool,
    /// The only code translated, if set (`kdbt start --module`, `--kernel`): everything
    /// else is native.
    scope: Option<(u64, u64)>,
    /// Native regions inside the scope (the kernel's entry text, the pages of its
    /// thunks): they keep their execute right and are never translated.
    native_in_scope: Vec<(u64, u64)>,
    /// The scope is the kernel's own text, which is always mapped: read directly (the
    /// dispatcher must not call kernel code, which is not executable while started).
    direct_read: bool,
    /// `%gs` windows met so far and their copies (native pc, copy): see
    /// [`KernelEnv::gs_window_copy`].
    gs_copies: Vec<(u64, u64)>,
    /// The lookup routine (a lookup frame in, rcx = the native target:
    /// `dbt::ve::ve_lookup`), where copies continue; 0: none (they jump to the native pc).
    lookup: u64,
    /// The kernel's #UD and #BP handlers (IDT gates 6 and 3), for [`Env::deliver`].
    handlers: Option<Handlers>,
    /// The session's fault sites (null: none).
    faults: *mut FaultSites,
    /// Kernel code is preemptible (full preemption or RT), asked once here: no dispatch
    /// is then a quiescent point ([`Env::quiescent_entry`]).
    preempt_full: bool,
}

/// Where the kernel's IDT sends #UD and #BP, and the selectors its frames carry.
#[derive(Clone, Copy)]
pub struct Handlers {
    pub invalid_op: u64,
    pub breakpoint: u64,
    pub cs: u16,
}

impl KernelEnv {
    /// The environment over the module's code cache (claimed by the caller with
    /// [`claim`]). Err: the alias could not be made.
    pub fn new() -> Result<KernelEnv, &'static str> {
        // SAFETY: plain getters of the glue.
        let (x, size) = unsafe { (ffi::kdbt_glue_cache_start(), ffi::kdbt_glue_cache_size()) };
        // SAFETY: process context (vmap may sleep); undone in Drop.
        let w = unsafe { ffi::kdbt_glue_cache_alias() };
        if w == 0 {
            return Err("cannot map a writable alias of the code cache (vmap)");
        }
        let (mut base, mut len) = (0u64, 0u64);
        // SAFETY: two valid out-pointers.
        unsafe { ffi::kdbt_glue_module_text(&mut base, &mut len) };
        let mut thunks = Vec::new();
        for n in 0..16 {
            // SAFETY: plain getter; the glue range-checks.
            let t = unsafe { ffi::kdbt_glue_indirect_thunk(n as u32) };
            if t != 0 {
                thunks.push((t, Thunk::Indirect(dbt::templates::reg64(n))));
            }
        }
        // SAFETY: plain getter.
        let rt = unsafe { ffi::kdbt_glue_return_thunk() };
        if rt != 0 {
            thunks.push((rt, Thunk::Return));
        }
        Ok(KernelEnv {
            x,
            size,
            w,
            used: 0,
            module_text: (base, base + len),
            thunks,
            table_given: false,
            scope: None,
            native_in_scope: Vec::new(),
            direct_read: false,
            gs_copies: Vec::new(),
            lookup: 0,
            handlers: None,
            faults: core::ptr::null_mut(),
            // SAFETY: process context (under PREEMPT_DYNAMIC a call into the kernel).
            preempt_full: unsafe { ffi::kdbt_glue_preempt_full() },
        })
    }

    /// Translates only `lo..hi` (a module's text); everything else runs natively.
    pub fn set_scope(&mut self, lo: u64, hi: u64) {
        self.scope = Some((lo, hi));
    }

    /// Translates the kernel's text `lo..hi` but for `native` (page-aligned ranges that
    /// keep their execute right); its bytes are read directly.
    pub fn set_kernel_scope(&mut self, lo: u64, hi: u64, native: Vec<(u64, u64)>) {
        self.scope = Some((lo, hi));
        self.native_in_scope = native;
        self.direct_read = true;
    }

    /// The retpoline and return thunks this environment maps to templates (their
    /// addresses: the kernel's text pages holding them must stay executable, since
    /// kdbt's own code and the entry text call them natively).
    pub fn thunk_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.thunks.iter().map(|t| t.0)
    }

    /// Exceptions in the scope's translated code are delivered to these handlers
    /// ([`Env::deliver`]).
    pub fn set_handlers(&mut self, h: Handlers) {
        self.handlers = Some(h);
    }

    /// Copies of `%gs` windows continue through the lookup routine at `at` (written
    /// before anything runs translated).
    pub fn set_lookup(&mut self, at: u64) {
        self.lookup = at;
    }

    pub fn cache(&self) -> (u64, u64) {
        (self.x, self.size)
    }

    /// The [`STEER_PAGES`] pages kept from the engine, the cache's last: (executable
    /// address, writable alias) of the first; the others follow at 4 KB steps.
    pub fn steer_pages(&self) -> (u64, u64) {
        let off = self.size.saturating_sub(STEER_PAGES * 4096);
        (self.x + off, self.w + off)
    }

    /// The fault-site slot area ([`super::faults`]): the [`FAULT_PAGES`] pages before the
    /// steering pages (`KDBT_FAULT_OFF` in kdbt_cache.S).
    pub fn fault_area(&self) -> u64 {
        self.x + self.engine_size()
    }

    /// Fault sites get slots from `f` ([`Env::fault_slot`]); it must outlive the engine.
    pub fn set_faults(&mut self, f: *mut FaultSites) {
        self.faults = f;
    }

    /// Bytes of the cache the engine may have.
    fn engine_size(&self) -> u64 {
        self.size.saturating_sub((STEER_PAGES + FAULT_PAGES) * 4096)
    }

    pub fn thunks(&self) -> usize {
        self.thunks.len()
    }

    /// The writable alias of `[at, at + len)`: inside what the engine was given, or
    /// inside the fault-slot area.
    fn alias(&self, at: u64, len: u64) -> Option<u64> {
        let end = at.checked_add(len)?;
        let slots = self.fault_area();
        let ok = (at >= self.x && end <= self.x + self.used) || (at >= slots && end <= slots + FAULT_PAGES * 4096);
        ok.then(|| self.w + (at - self.x))
    }
}

impl Drop for KernelEnv {
    fn drop(&mut self) {
        if super::pool::irqs_off() {
            PENDING_UNALIAS.store(self.w, Ordering::Release);
            return;
        }
        // SAFETY: the alias made in `new`; the engine that wrote through it is gone.
        unsafe { ffi::kdbt_glue_cache_unalias(self.w) };
    }
}

fn within(a: u64, b: u64) -> bool {
    a.abs_diff(b) < REACH
}

impl Env for KernelEnv {
    fn alloc_code(&mut self, near: u64, size: usize) -> Option<u64> {
        let at = self.x + self.used.next_multiple_of(64);
        let end = at.checked_add(size as u64)?;
        if end > self.x + self.engine_size() || !within(at, near) || !within(end, near) {
            return None;
        }
        self.used = end - self.x;
        Some(at)
    }

    fn read_code(&self, pc: u64, buf: &mut [u8]) -> usize {
        if let (true, Some((lo, hi))) = (self.direct_read, self.scope) {
            if !(lo..hi).contains(&pc) {
                return 0;
            }
            let n = buf.len().min((hi - pc) as usize);
            // SAFETY: `pc..pc+n` lies inside the kernel's text, mapped for the kernel's
            // life (the session checked the range against the kernel's own addresses).
            unsafe { core::ptr::copy_nonoverlapping(pc as *const u8, buf.as_mut_ptr(), n) };
            return n;
        }
        // SAFETY: `buf` is valid for its length; the glue reads with
        // copy_from_kernel_nofault (an unmapped `pc` reads short, never faults).
        unsafe { ffi::kdbt_glue_read_kernel(buf.as_mut_ptr().cast(), pc, buf.len()) }
    }

    fn write_code(&mut self, at: u64, bytes: &[u8]) -> bool {
        let Some(w) = self.alias(at, bytes.len() as u64) else { return false };
        // SAFETY: `w..w+len` is inside the writable alias of handed-out cache memory.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), w as *mut u8, bytes.len()) };
        true
    }

    fn patch_rel32(&mut self, at: u64, rel: i32) -> bool {
        let Some(w) = self.alias(at, 4) else { return false };
        if !w.is_multiple_of(4) {
            return false;
        }
        // SAFETY: an aligned 4-byte field of the alias: one atomic 32-bit store, so a CPU
        // executing the branch through the executable mapping sees the old or new target.
        unsafe { (*(w as *const AtomicU32)).store(rel as u32, Ordering::Release) };
        true
    }

    fn thunk(&self, target: u64) -> Option<Thunk> {
        self.thunks.iter().find(|t| t.0 == target).map(|t| t.1)
    }

    fn alloc_table(&mut self, bytes: usize) -> Option<u64> {
        if self.table_given || bytes > core::mem::size_of::<Table>() {
            return None;
        }
        self.table_given = true;
        // Only the address is taken; [`claim`] makes this environment the table's only
        // user.
        Some(core::ptr::addr_of_mut!(TABLE) as u64)
    }

    fn native(&self, pc: u64) -> bool {
        if let Some((lo, hi)) = self.scope {
            return DRAINING.load(Ordering::Acquire)
                || !(lo..hi).contains(&pc)
                || self.native_in_scope.iter().any(|r| (r.0..r.1).contains(&pc));
        }
        // The cache is a section of the module's text; code there that the engine did
        // not place (the steering check's target) is translated like any kernel code.
        pc >= self.module_text.0 && pc < self.module_text.1 && !(pc >= self.x && pc < self.x + self.size)
    }

    fn memory_left(&self) -> usize {
        super::pool::POOL.bump_left()
    }

    /// The module's instructions with exception-table entries run from slots kdbt's own
    /// table knows ([`super::faults`]).
    /// A page of the text being written runs natively until re-protected
    /// ([`super::wprotect::native_now`]).
    /// Interrupts on and task context (no hard interrupt, NMI or softirq handler), kernel
    /// code not preemptible: nothing translated is interrupted beneath this dispatch on
    /// this CPU. Interrupts off covers the windows of an interrupt's entry and exit before
    /// and after the handler's count is raised (the gate cleared IF; `iret` sets it), where
    /// the interrupted code may be translated. Exceptions that the dispatcher delivers
    /// itself (`deliver`) leave a native pc in their frame; a user access that faults is
    /// in a fault slot, which depends on no fragment.
    fn quiescent_entry(&self, ctx: &dbt::scratch::GuestCtx) -> bool {
        // SAFETY: inline reads of this CPU's preemption count (no kernel code), any context.
        !self.preempt_full && ctx.rflags & (1 << 9) != 0 && unsafe { ffi::kdbt_glue_in_task() }
    }

    fn native_now(&mut self, pc: u64) -> bool {
        self.scope.is_some_and(|(lo, hi)| (lo..hi).contains(&pc)) && super::wprotect::native_now(pc)
    }

    fn fault_slot(&mut self, pc: u64, bytes: &[u8]) -> Option<u64> {
        if self.faults.is_null() || !self.scope.is_some_and(|(lo, hi)| (lo..hi).contains(&pc)) {
            return None;
        }
        // SAFETY: the session's fault sites outlive the engine (`set_faults`), and the
        // engine calls this under its lock only.
        unsafe { (*self.faults).slot(pc, bytes) }
    }

    /// `ud2` (BUG/WARN), undecodable bytes and `int3` (kprobes, `text_poke_bp`) in the
    /// module's text cannot run at their native address (not executable while started:
    /// they would come straight back here), so the exception is delivered as the CPU
    /// would deliver it there: an interrupt frame (ss, rsp, rflags, cs, rip) pushed on
    /// the 16-byte aligned stack, IF/TF/NT/RF clear, on to the kernel's handler (native
    /// kernel text). Its tables know the native pc (bug table, kprobes), WARN's
    /// `regs->ip += 2` returns past the `ud2`, and that return comes back in by #VE.
    fn deliver(&mut self, kind: StopKind, pc: u64, ctx: &mut GuestCtx) -> Option<u64> {
        let (lo, hi) = self.scope?;
        let h = self.handlers?;
        if !(lo..hi).contains(&pc) || DRAINING.load(Ordering::Acquire) {
            return None;
        }
        let (to, rip) = match kind {
            StopKind::Privileged => return self.iret_in_kernel(pc, ctx, h.cs).or_else(|| self.gs_window_copy(pc)),
            StopKind::Undefined | StopKind::Invalid => (h.invalid_op, pc),
            StopKind::Breakpoint => {
                let mut b = [0u8; 1];
                // int3 is a trap (rip after it); int1/into are left as they are.
                if self.read_code(pc, &mut b) != 1 || b[0] != 0xCC {
                    return None;
                }
                (h.breakpoint, pc + 1)
            }
            _ => return None,
        };
        if to == 0 {
            return None;
        }
        let ss: u16;
        // SAFETY: reads SS (the dispatcher runs on the interrupted context's SS).
        unsafe { core::arch::asm!("mov {0:x}, ss", out(reg) ss, options(nomem, nostack, preserves_flags)) };
        let rsp = ctx.gpr[GuestCtx::RSP];
        let top = (rsp & !15) - 40;
        let frame = [rip, h.cs as u64, ctx.rflags, rsp, ss as u64];
        // SAFETY: the interrupted kernel stack below its rsp, where the CPU would push
        // this frame (kernel code keeps nothing below rsp: no red zone).
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), top as *mut u64, 5) };
        ctx.gpr[GuestCtx::RSP] = top;
        ctx.rflags &= !(1 << 9 | 1 << 8 | 1 << 14 | 1 << 16);
        Some(to)
    }
}

impl KernelEnv {
    /// A `%gs` window at `pc` ([`dbt::kclass::gs_window`]: `swapgs; rdgsbase rax;
    /// swapgs` in the kernel's `__rdgsbase_inactive`) cannot be translated (no inserted
    /// instruction may run on the user's `%gs`) and cannot run at its native address (not
    /// executable while started): it runs from a copy in the code cache, made once per
    /// window, that ends in the lookup of the native pc after it (on the kernel's `%gs`
    /// again: a table hit when that pc is translated; without a lookup routine, a jump
    /// to the native pc, which comes back in by #VE). The copy is outside the engine's
    /// regions, so no reset reuses it while a CPU may be inside.
    fn gs_window_copy(&mut self, pc: u64) -> Option<u64> {
        if let Some(&(_, at)) = self.gs_copies.iter().find(|c| c.0 == pc) {
            return Some(at);
        }
        let mut b = [0u8; 80];
        let n = self.read_code(pc, &mut b[..59]);
        let len = dbt::kclass::gs_window(&b[..n], pc)?;
        self.gs_copies.try_reserve(1).ok()?;
        let tail = if self.lookup != 0 { dbt::entry_calls::TRAMPOLINE_BYTES } else { 5 };
        let at = self.alloc_code(pc, len + tail)?;
        let next = pc + len as u64;
        if self.lookup != 0 {
            let t = dbt::entry_calls::trampoline(at + len as u64, next, self.lookup)?;
            b[len..len + tail].copy_from_slice(&t);
        } else {
            let rel = i32::try_from(next.wrapping_sub(at + len as u64 + 5) as i64).ok()?;
            b[len] = 0xE9;
            b[len + 1..len + 5].copy_from_slice(&rel.to_le_bytes());
        }
        if !self.write_code(at, &b[..len + tail]) {
            return None;
        }
        self.gs_copies.push((pc, at));
        Some(at)
    }

    /// `iretq` to kernel code in the scope's text (`sync_core`'s `iret_to_self`: the
    /// kernel's entry text, which holds the others, is native): it cannot run at its
    /// native address (not executable while started), so the dispatcher does what it
    /// does: rip, cs, rflags, rsp, ss popped from the guest's stack, on at rip (which
    /// is then translated). The emulation does not serialize as `iretq` does (a known
    /// gap, in the README). None (the stop stays a stop) for any other privileged
    /// instruction, or a frame that leaves the kernel's code segment.
    fn iret_in_kernel(&self, pc: u64, ctx: &mut GuestCtx, cs: u16) -> Option<u64> {
        let mut b = [0u8; 2];
        if self.read_code(pc, &mut b) != 2 || b != [0x48, 0xCF] {
            return None;
        }
        let rsp = ctx.gpr[GuestCtx::RSP];
        let mut f = [0u64; 5];
        // SAFETY: the guest's kernel stack at its rsp, where the iretq would pop its
        // frame (an `iretq` in kernel text with a short stack would fault natively too;
        // copy_from_kernel_nofault is kernel code, not callable here).
        unsafe { core::ptr::copy_nonoverlapping(rsp as *const u64, f.as_mut_ptr(), 5) };
        if f[1] as u16 != cs {
            return None;
        }
        ctx.rflags = f[2];
        ctx.gpr[GuestCtx::RSP] = f[3];
        Some(f[0])
    }
}
