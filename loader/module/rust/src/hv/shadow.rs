//! Shadow paging on the kernel side (`kdbt load --paging shadow`): each CPU's shadow MMU,
//! its preallocated frame pool, and the guest-physical memory accessor root mode uses.
//!
//! Everything root mode touches is allocated here in process context before the CPU is
//! launched: the frames (order-4 chunks of zeroed pages), the list of their physical
//! addresses and the [`ShadowCpu`] block. Root mode never calls the kernel allocator.
//!
//! Guest-physical memory: without EPT the guest's physical addresses are the host's, and
//! root mode runs on page tables sharing the kernel half of the kernel's (see
//! `host_page_tables`), so it reaches any RAM page through the kernel's direct map at
//! `pa + (phys_to_virt(0) as u64)` — the offset the glue's `phys_to_virt` (`__va`) applies,
//! read once at load. Only the guest's paging structures are read this way; a structure
//! outside the direct map's RAM would fault root mode (a guest bug kdbt does not survive).
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use shadow::mmu::Stats;
use shadow::walk::AccessKind;
use shadow::{FramePool, GuestMem, Mmu, MmuError, PagePolicy, PagingCtx, PolicyLookup};

use crate::ffi;

/// Shadow frames per CPU (4 MiB). When they run out the MMU reclaims (drops other
/// hierarchies, then empties the current one): see `shadow/README.md`.
pub const FRAMES_PER_CPU: usize = 1024;
/// Frames are allocated in chunks of 2^CHUNK_ORDER pages.
const CHUNK_ORDER: u32 = 4;
const CHUNK_FRAMES: usize = 1 << CHUNK_ORDER;

/// The kernel's direct map: guest-physical (= host-physical) to a kernel address.
#[derive(Clone, Copy, Debug)]
pub struct DirectMap {
    offset: u64,
    /// First physical address above what may be read (2^MAXPHYADDR).
    limit: u64,
}

impl DirectMap {
    fn ptr(&self, gpa: u64) -> Option<*mut u64> {
        (gpa & 7 == 0 && gpa < self.limit).then(|| gpa.wrapping_add(self.offset) as *mut u64)
    }
}

impl GuestMem for DirectMap {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let p = self.ptr(gpa)?;
        // SAFETY: `p` is the direct-map address of an 8-aligned guest-physical address the
        // walker reached from the guest's CR3 (a paging structure, in RAM, mapped by the
        // direct map in the kernel half root mode shares).
        Some(unsafe { p.read_volatile() })
    }
    fn cmpxchg_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Option<u64> {
        let p = self.ptr(gpa)?;
        // SAFETY: as for `read_u64`; the entry is 8-aligned, so an AtomicU64 over it is
        // valid, and the CPU's and the guest's other accesses to it are atomic too.
        let a = unsafe { AtomicU64::from_ptr(p) };
        Some(match a.compare_exchange(expected, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(v) | Err(v) => v,
        })
    }
}

/// The page policy of shadow paging (shared by all CPUs): a few pages with restrictions,
/// each slot `page | VALID | ONCE? | policy bits`. Lock-free readers (root mode of every
/// CPU); writers are the serialized ioctl paths, and root mode clearing a `ONCE` slot.
pub struct PolicySlots {
    slots: [AtomicU64; POLICY_SLOTS],
    /// Violations the slots' owner resolved (the `ONCE` slots lifted).
    hits: AtomicU64,
}

const POLICY_SLOTS: usize = 8;
const SLOT_VALID: u64 = 1 << 2;
/// Lift the policy at the first violation (and let the access complete).
const SLOT_ONCE: u64 = 1 << 3;
const PAGE_MASK: u64 = 0x000f_ffff_ffff_f000;

pub static POLICY: PolicySlots =
    PolicySlots { slots: [const { AtomicU64::new(0) }; POLICY_SLOTS], hits: AtomicU64::new(0) };

impl PolicySlots {
    fn find(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.slots
            .iter()
            .map(|s| (s, s.load(Ordering::Acquire)))
            .find(|&(_, v)| v & SLOT_VALID != 0 && v & PAGE_MASK == gpa & PAGE_MASK)
    }

    /// Gives the page at `gpa` `policy`; `once`: lifted at the first violation. Process
    /// context, serialized by the caller.
    pub fn set(&self, gpa: u64, policy: PagePolicy, once: bool) -> Result<(), alloc::string::String> {
        let v = (gpa & PAGE_MASK) | SLOT_VALID | if once { SLOT_ONCE } else { 0 } | policy.bits() as u64;
        let slot = match self.find(gpa) {
            Some((s, _)) => s,
            None => self
                .slots
                .iter()
                .find(|s| s.load(Ordering::Acquire) & SLOT_VALID == 0)
                .ok_or_else(|| alloc::string::String::from("no free policy slot"))?,
        };
        slot.store(v, Ordering::Release);
        Ok(())
    }

    /// Removes the page's policy (no shadow change needed: the next fault writes the wider
    /// leaf).
    pub fn clear(&self, gpa: u64) {
        if let Some((s, _)) = self.find(gpa) {
            s.store(0, Ordering::Release);
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Acquire)
    }
}

impl PolicyLookup for PolicySlots {
    fn policy(&self, gpa: u64) -> PagePolicy {
        self.find(gpa).map_or(PagePolicy::empty(), |(_, v)| PagePolicy::from_bits_truncate(v as u8 & 3))
    }
}

impl vmx::shadow_exit::PolicyOwner for PolicySlots {
    fn violation(&self, gpa: u64, _la: u64, _access: AccessKind) -> bool {
        match self.find(gpa) {
            Some((s, v)) if v & SLOT_ONCE != 0 => {
                if s.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    self.hits.fetch_add(1, Ordering::AcqRel);
                }
                true
            }
            // Lifted by another CPU meanwhile: the access runs again and now succeeds.
            None => true,
            Some(_) => false,
        }
    }
}

/// The preallocated frames of one CPU's MMU.
pub struct KernelFrames {
    /// Physical addresses; `frames[..next]` are handed out.
    frames: Vec<u64>,
    next: usize,
    map: DirectMap,
}

impl FramePool for KernelFrames {
    fn take_frame(&mut self) -> Option<u64> {
        let pa = *self.frames.get(self.next)?;
        self.next += 1;
        Some(pa)
    }
    fn return_frame(&mut self, pa: u64) {
        // Frames come back in any order: keep the handed-out prefix exact.
        if let Some(i) = self.frames[..self.next].iter().position(|&f| f == pa) {
            self.next -= 1;
            self.frames.swap(i, self.next);
        }
    }
    fn read_entry(&self, pa: u64, index: usize) -> u64 {
        // SAFETY: `pa` is one of our frames (allocated, zeroed, direct-mapped) and
        // index < 512 (the MMU's contract).
        unsafe { ((pa + self.map.offset) as *const u64).add(index & 511).read_volatile() }
    }
    fn write_entry(&mut self, pa: u64, index: usize, value: u64) {
        // SAFETY: as for `read_entry`; one aligned 64-bit store.
        unsafe { ((pa + self.map.offset) as *mut u64).add(index & 511).write_volatile(value) }
    }
}

/// Shadow counters published for `kdbt status` (any CPU reads them).
pub const COUNTERS: usize = 13;

/// One CPU's shadow paging: the MMU (built on that CPU at launch from its CR3), or the pool
/// before that; the memory accessor; the counters others read.
pub struct ShadowCpu {
    pool: Option<KernelFrames>,
    pub mmu: Option<Mmu<KernelFrames>>,
    pub mem: DirectMap,
    chunks: Vec<usize>,
    published: [AtomicU64; COUNTERS],
    pub maxphyaddr: u8,
    pub pages_1g: bool,
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

impl ShadowCpu {
    /// Allocates the pool (process context).
    pub fn alloc() -> Result<*mut ShadowCpu, alloc::string::String> {
        // SAFETY: phys_to_virt(0) only computes the direct-map base (`__va(0)`).
        let offset = unsafe { ffi::kdbt_glue_phys_to_virt(0) } as u64;
        let maxphyaddr = (cpuid(0x8000_0008)[0] & 0xff) as u8;
        let pages_1g = cpuid(0x8000_0001)[3] & (1 << 26) != 0;
        let map = DirectMap { offset, limit: 1u64 << maxphyaddr.clamp(32, 52) };
        let mut sc = alloc::boxed::Box::new(ShadowCpu {
            pool: None,
            mmu: None,
            mem: map,
            chunks: Vec::new(),
            published: [const { AtomicU64::new(0) }; COUNTERS],
            maxphyaddr,
            pages_1g,
        });
        let mut frames = Vec::new();
        let n = FRAMES_PER_CPU / CHUNK_FRAMES;
        if frames.try_reserve_exact(FRAMES_PER_CPU).is_err() || sc.chunks.try_reserve_exact(n).is_err() {
            return Err(alloc::string::String::from("out of memory for the shadow frame list"));
        }
        for _ in 0..n {
            // SAFETY: zeroed, naturally aligned pages; process context.
            let p = unsafe { ffi::kdbt_glue_alloc_pages(CHUNK_ORDER) };
            if p.is_null() {
                free_chunks(&sc.chunks);
                return Err(alloc::format!("out of memory for {FRAMES_PER_CPU} shadow frames"));
            }
            sc.chunks.push(p as usize);
            // SAFETY: our own direct-map allocation.
            let pa = unsafe { ffi::kdbt_glue_virt_to_phys(p as *const _) };
            frames.extend((0..CHUNK_FRAMES as u64).map(|i| pa + i * 4096));
        }
        sc.pool = Some(KernelFrames { frames, next: 0, map });
        Ok(alloc::boxed::Box::into_raw(sc))
    }

    /// Builds the MMU for this CPU's current paging state (on the CPU being launched,
    /// interrupts off: takes frames from the pool only). Returns the shadow CR3.
    pub fn start(&mut self, cr0: u64, cr4: u64, efer: u64, cr3: u64) -> Result<u64, MmuError> {
        let ctx =
            PagingCtx::from_regs(cr0, cr4, efer, self.maxphyaddr, self.pages_1g).map_err(MmuError::Unsupported)?;
        let pool = self.pool.take().ok_or(MmuError::OutOfFrames)?;
        match Mmu::new(pool, FRAMES_PER_CPU, ctx, cr3) {
            Ok(m) => {
                let s = m.shadow_cr3();
                self.mmu = Some(m);
                self.publish();
                Ok(s)
            }
            Err((e, pool)) => {
                self.pool = Some(pool);
                Err(e)
            }
        }
    }

    /// The guest's own CR3 (for devirtualize), if the MMU runs.
    pub fn guest_cr3(&self) -> Option<u64> {
        self.mmu.as_ref().map(|m| m.guest_cr3())
    }

    /// Copies the MMU's counters where `kdbt status` reads them (root mode, this CPU).
    pub fn publish(&self) {
        let Some(m) = self.mmu.as_ref() else { return };
        for (slot, v) in self.published.iter().zip(stats_array(&m.stats())) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// The published counters (any CPU).
    pub fn snapshot(&self) -> [u64; COUNTERS] {
        core::array::from_fn(|i| self.published[i].load(Ordering::Relaxed))
    }
}

/// Counters in the order of `kdbt_abi::ShadowStatus`.
fn stats_array(s: &Stats) -> [u64; COUNTERS] {
    let c = &s.counters;
    [
        c.faults_resolved,
        c.faults_reflected,
        c.policy_faults,
        c.cr3_switches,
        c.invlpgs,
        c.invpcids,
        c.reclaims,
        c.pool_resets,
        c.root_evictions,
        c.full_flushes,
        s.pages_in_use as u64,
        s.pages_total as u64,
        s.roots as u64,
    ]
}

fn free_chunks(chunks: &[usize]) {
    for &c in chunks {
        // SAFETY: allocated by `alloc` with CHUNK_ORDER and no longer used by any CPU.
        unsafe { ffi::kdbt_glue_free_pages(c as *mut _, CHUNK_ORDER) };
    }
}

/// Frees a block from [`ShadowCpu::alloc`] once its CPU no longer runs on the shadow
/// tables (process context).
pub fn free(p: *mut ShadowCpu) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from Box::into_raw in `alloc` and its CPU is not virtualized.
    let sc = unsafe { alloc::boxed::Box::from_raw(p) };
    free_chunks(&sc.chunks);
}
