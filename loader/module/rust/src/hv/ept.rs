//! The kernel side of the EPT identity map: paging-structure frames from the page
//! allocator, MTRRs read from this CPU, and the map built once for all CPUs.
//!
//! Hidden hypervisor memory (issue 11): the map's paging structures, the map's own state
//! (this [`Ept`] value and its frame pool, in a page of their own), every CPU's per-CPU
//! block and the host page-table root get no EPT rights, so the guest can neither read
//! nor write them. Root mode does not run under EPT and reaches them through the kernel's
//! direct map. Consequently, once a CPU is virtualized, every read or change of the tables
//! goes through a hypercall ([`Call::EptSetPerms`], [`Call::EptQuery`],
//! [`Call::EptRemap`]) served here in root mode, and root mode takes the frames for splits
//! from a pool of spare frames hidden in advance (root mode never allocates).
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use ept::hide::{Hidden, Object};
use ept::{Ept, EptCaps, FrameAllocator, Mtrrs, Perms};
use vmx::hypercall::{self, Call};

use crate::ffi;

/// Spare frames kept for splits made in root mode (each 4 KB change needs at most two).
pub const POOL: usize = 64;

/// Frames for EPT paging structures: single zeroed pages from the kernel, accessed through
/// the direct map; in root mode, frames from the pool.
pub struct KernelFrames {
    pub frames: usize,
    pool: [u64; POOL],
    pool_len: usize,
    /// Root mode owns the map: take frames from the pool only.
    root_only: bool,
}

impl KernelFrames {
    pub fn new() -> Self {
        KernelFrames { frames: 0, pool: [0; POOL], pool_len: 0, root_only: false }
    }

    /// Fills the pool from the kernel (process context); the frames still need hiding.
    fn fill_pool(&mut self) -> Result<(), String> {
        while self.pool_len < POOL {
            // SAFETY: allocation of one zeroed page; process context.
            let p = unsafe { ffi::kdbt_glue_alloc_pages(0) };
            if p.is_null() {
                return Err(String::from("out of memory for the EPT spare frames"));
            }
            // SAFETY: translating a direct-map address we just allocated.
            self.pool[self.pool_len] = unsafe { ffi::kdbt_glue_virt_to_phys(p) };
            self.pool_len += 1;
        }
        Ok(())
    }

    /// Gives the pool's frames back to the kernel (process context, map unused).
    fn drain_pool(&mut self) {
        while self.pool_len > 0 {
            self.pool_len -= 1;
            // SAFETY: a pool frame is a page from kdbt_glue_alloc_pages(0) we still own.
            unsafe { ffi::kdbt_glue_free_pages(ffi::kdbt_glue_phys_to_virt(self.pool[self.pool_len]), 0) };
        }
    }

    pub fn pool(&self) -> &[u64] {
        &self.pool[..self.pool_len]
    }
}

impl FrameAllocator for KernelFrames {
    fn alloc_zeroed(&mut self) -> Option<u64> {
        if self.root_only {
            self.pool_len = self.pool_len.checked_sub(1)?;
            let pa = self.pool[self.pool_len];
            // SAFETY: a pool frame: ours, hidden from the guest, reached through the direct
            // map (root mode's page tables share the kernel half).
            unsafe { core::ptr::write_bytes(ffi::kdbt_glue_phys_to_virt(pa) as *mut u8, 0, 4096) };
            self.frames += 1;
            return Some(pa);
        }
        // SAFETY: allocation of one zeroed page; process context (load path).
        let p = unsafe { ffi::kdbt_glue_alloc_pages(0) };
        if p.is_null() {
            return None;
        }
        self.frames += 1;
        // SAFETY: translating a direct-map address we just allocated.
        Some(unsafe { ffi::kdbt_glue_virt_to_phys(p) })
    }

    fn free(&mut self, pa: u64) {
        self.frames -= 1;
        if self.root_only {
            // Root mode cannot free: the frame goes back to the pool (ept frees only the
            // frames it just took, on an error path, so there is room).
            if self.pool_len < POOL {
                self.pool[self.pool_len] = pa;
                self.pool_len += 1;
            }
            return;
        }
        // SAFETY: `pa` came from alloc_zeroed, so its direct-map address is a page we own.
        unsafe { ffi::kdbt_glue_free_pages(ffi::kdbt_glue_phys_to_virt(pa), 0) };
    }

    fn read_entry(&self, pa: u64, index: usize) -> u64 {
        // SAFETY: `pa` is one of our table frames (ept only passes those) and index < 512.
        unsafe { (ffi::kdbt_glue_phys_to_virt(pa) as *const u64).add(index & 511).read_volatile() }
    }

    fn write_entry(&mut self, pa: u64, index: usize, value: u64) {
        // SAFETY: as above; one aligned 64-bit store, so a CPU walking the table sees the
        // old or the new entry, never a mix.
        unsafe { (ffi::kdbt_glue_phys_to_virt(pa) as *mut u64).add(index & 511).write_volatile(value) }
    }
}

pub type Map = Ept<KernelFrames>;

const _: () = assert!(core::mem::size_of::<Map>() <= 4096);

/// The map, in a page of its own (hidden with the tables once a CPU runs on it).
pub struct MapPage(*mut Map);

impl MapPage {
    /// On failure the map is destroyed.
    fn new(map: Map) -> Result<Self, String> {
        // SAFETY: allocation of one zeroed page; process context.
        let p = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut Map;
        if p.is_null() {
            map.destroy();
            return Err(String::from("out of memory for the EPT state page"));
        }
        // SAFETY: a fresh page, large and aligned enough for a Map (asserted above).
        unsafe { p.write(map) };
        Ok(MapPage(p))
    }

    /// Direct access: only while no CPU runs on the map (load before the first launch,
    /// unload after the last devirtualize), when the page is not hidden from us in effect.
    pub fn direct(&mut self) -> &mut Map {
        // SAFETY: the page holds a Map from `new` until `destroy`; no CPU is in root mode
        // using it while no CPU is virtualized (callers' condition).
        unsafe { &mut *self.0 }
    }

    pub fn pa(&self) -> u64 {
        // SAFETY: translating our own direct-map page.
        unsafe { ffi::kdbt_glue_virt_to_phys(self.0 as *const _) }
    }

    /// Frees the tables, the pool and the page (no CPU uses the map any more).
    pub fn destroy(self) {
        ROOT_MAP.store(core::ptr::null_mut(), Ordering::Release);
        // SAFETY: the page holds a Map; nothing else refers to it now.
        let mut map = unsafe { self.0.read() };
        // Process context again: frames go back to the kernel, not to the pool.
        map.allocator_mut().root_only = false;
        let mut frames = map.destroy();
        frames.drain_pool();
        // SAFETY: the page came from kdbt_glue_alloc_pages(0).
        unsafe { ffi::kdbt_glue_free_pages(self.0.cast(), 0) };
    }
}

/// The map root mode serves hypercalls on (null: none), and its lock (root mode never
/// waits: a busy map answers ERR_BUSY).
static ROOT_MAP: AtomicPtr<Map> = AtomicPtr::new(core::ptr::null_mut());
static ROOT_LOCK: AtomicBool = AtomicBool::new(false);

/// Whether hiding is on for this load (`hide_hv` module parameter; off only for tests).
static HIDING: AtomicBool = AtomicBool::new(false);
/// Physical bases of the hidden per-CPU blocks, by CPU (0: none), for the diagnostic.
const MAX_NAMED_CPUS: usize = 64;
static BLOCKS: [AtomicU64; MAX_NAMED_CPUS] = [const { AtomicU64::new(0) }; MAX_NAMED_CPUS];
static HOST_PML4: AtomicU64 = AtomicU64::new(0);
static MAP_PAGE: AtomicU64 = AtomicU64::new(0);

pub fn hiding() -> bool {
    HIDING.load(Ordering::Relaxed)
}

/// Reads this CPU's MTRRs through the glue's fault-safe RDMSR (process context; MTRRs are
/// identical on all CPUs, as the architecture requires and Linux checks at boot).
pub fn read_mtrrs() -> Mtrrs {
    let phys_bits = core::arch::x86_64::__cpuid(0x8000_0008).eax as u8;
    Mtrrs::read(|msr| vmx::caps::VmxHw::rdmsr_safe(&crate::hw::KernelHw, msr), phys_bits)
}

/// Guest-physical space to map: everything the CPU can address when 1 GB pages keep the
/// tables small; otherwise at most 512 GB (2 MB pages: 512 page-directory pages).
pub fn map_limit(caps: &EptCaps) -> u64 {
    let bits = (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff).clamp(32, 48);
    let all = 1u64 << bits;
    if caps.pages_1g {
        all
    } else {
        all.min(512 << 30)
    }
}

/// Builds the identity map for this machine, in its own page, with its spare frames.
pub fn build(caps: EptCaps) -> Result<MapPage, String> {
    let mtrrs = read_mtrrs();
    let limit = map_limit(&caps);
    let map = Ept::build_identity(limit, &mtrrs, caps, KernelFrames::new())
        .map_err(|(e, _frames)| alloc::format!("cannot build the EPT identity map: {e}"))?;
    let mut page = MapPage::new(map)?;
    if let Err(e) = page.direct().allocator_mut().fill_pool() {
        page.destroy();
        return Err(e);
    }
    // SAFETY: reads a module parameter.
    HIDING.store(unsafe { ffi::kdbt_glue_param_hide_hv() } != 0, Ordering::Relaxed);
    Ok(page)
}

/// Before the first launch (no CPU on the map): hides the map's tables, its state page,
/// its spare frames, the host page-table root and `block` (the first CPU's), to a fixed
/// point, then hands the map to root mode.
pub fn hide_initial(page: &mut MapPage, host_pml4_pa: u64, cpu: u32, block: u64, block_len: u64) -> Result<(), String> {
    let pa = page.pa();
    let map = page.direct();
    if hiding() {
        let mut extra: Vec<u64> = map.allocator().pool().to_vec();
        extra.extend([pa, host_pml4_pa]);
        extra.extend((0..block_len / 4096).map(|i| block + i * 4096));
        ::ept::hide::hide_self(map, &extra).map_err(|e| alloc::format!("cannot hide hypervisor memory: {e}"))?;
        HOST_PML4.store(host_pml4_pa, Ordering::Relaxed);
        MAP_PAGE.store(pa, Ordering::Relaxed);
        name_block(cpu, block);
    }
    map.allocator_mut().root_only = true;
    ROOT_MAP.store(page.0, Ordering::Release);
    Ok(())
}

/// Records (or, with 0, forgets) `cpu`'s hidden block for the diagnostic.
pub fn name_block(cpu: u32, block: u64) {
    if let Some(slot) = BLOCKS.get(cpu as usize) {
        slot.store(block, Ordering::Relaxed);
    }
}

/// Forgets every name (unload).
pub fn forget_names() {
    for b in &BLOCKS {
        b.store(0, Ordering::Relaxed);
    }
    HOST_PML4.store(0, Ordering::Relaxed);
    MAP_PAGE.store(0, Ordering::Relaxed);
}

/// Runs `f` on the root-mode map, unless another CPU's root mode holds it.
fn with_root_map<R>(f: impl FnOnce(&mut Map) -> R) -> Option<R> {
    let p = ROOT_MAP.load(Ordering::Acquire);
    if p.is_null() || ROOT_LOCK.swap(true, Ordering::Acquire) {
        return None;
    }
    // SAFETY: the map lives until `destroy`, which runs after every CPU left VMX
    // operation; ROOT_LOCK gives us exclusive access among root modes, and the kernel side
    // touches it directly only while no CPU is virtualized.
    let r = f(unsafe { &mut *p });
    ROOT_LOCK.store(false, Ordering::Release);
    Some(r)
}

/// Whether one of `pages` (page-aligned) is hypervisor memory the map knows of: one of its
/// paging structures or spare frames, or, as recorded while hiding is on, a per-CPU block,
/// the host page-table root or the map's state page. Root mode may call it (no kernel
/// call, no allocation); one walk of the tables for all of `pages`.
pub fn hypervisor_memory(m: &Map, pages: &[u64]) -> bool {
    let recorded = |pa: &AtomicU64, page: u64| {
        let pa = pa.load(Ordering::Relaxed);
        pa != 0 && pa == page
    };
    let named = pages.iter().any(|&page| {
        m.allocator().pool().contains(&page)
            || recorded(&HOST_PML4, page)
            || recorded(&MAP_PAGE, page)
            || ::ept::hide::find_in_blocks(
                BLOCKS.iter().map(|b| b.load(Ordering::Relaxed)),
                super::percpu::PERCPU_SIZE as u64,
                page,
                super::percpu::page_object,
            )
            .is_some()
    });
    let mut table = false;
    if !named {
        m.for_each_table(|t| table |= pages.contains(&t));
    }
    named || table
}

/// The answer of [`Call::EptSetPerms`] and [`Call::EptRemap`]: the previous permissions
/// `old` and whether the tables changed, or the error.
fn change_result(old: Perms, r: Result<bool, ::ept::EptError>) -> u64 {
    match r {
        Ok(changed) => old.bits() as u64 | if changed { hypercall::EPT_CHANGED } else { 0 },
        Err(::ept::EptError::OutOfMemory) => hypercall::ERR_OUT_OF_FRAMES,
        Err(_) => hypercall::ERR_BAD_ARGUMENT,
    }
}

/// Root mode: serves [`Call::EptSetPerms`], [`Call::EptQuery`] and [`Call::EptRemap`]
/// (`rbx`, `rcx`: the guest's registers). [`Call::EptRemap`] is refused
/// (`ERR_BAD_ARGUMENT`) when either page is hypervisor memory ([`hypervisor_memory`]): a
/// hidden page keeps its identity mapping without rights, and no other guest page may map
/// one.
pub fn root_call(call: Call, rbx: u64, rcx: u64) -> u64 {
    let gpa = rbx & !0xfff;
    let perms = Perms::from_bits_truncate((rbx & 7) as u8);
    let busy = || if ROOT_MAP.load(Ordering::Acquire).is_null() { hypercall::ERR_UNSUPPORTED } else { hypercall::ERR_BUSY };
    match call {
        Call::EptQuery => with_root_map(|m| m.perms_of(gpa).map_or(hypercall::ERR_BAD_ARGUMENT, |p| p.bits() as u64))
            .unwrap_or_else(busy),
        Call::EptSetPerms => with_root_map(|m| {
            let Some(old) = m.perms_of(gpa) else { return hypercall::ERR_BAD_ARGUMENT };
            change_result(old, m.set_perms_4k(gpa, perms))
        })
        .unwrap_or_else(busy),
        Call::EptRemap => with_root_map(|m| {
            let Some(old) = m.perms_of(gpa) else { return hypercall::ERR_BAD_ARGUMENT };
            // A misaligned RCX is refused by remap_4k; its page is checked here.
            if hypervisor_memory(m, &[gpa, rcx & !0xfff]) {
                return hypercall::ERR_BAD_ARGUMENT;
            }
            change_result(old, m.remap_4k(gpa, rcx, perms))
        })
        .unwrap_or_else(busy),
        _ => hypercall::ERR_UNSUPPORTED,
    }
}

/// Root mode, at a fatal EPT violation: the page's mapping now (unless the map is busy)
/// and, if it is hypervisor memory, which object.
pub fn root_describe(gpa: u64) -> (::ept::diag::Now, Option<Hidden>) {
    use ::ept::diag::Now;
    let page = gpa & !0xfff;
    let named = ::ept::hide::find_in_blocks(
        BLOCKS.iter().map(|b| b.load(Ordering::Relaxed)),
        super::percpu::PERCPU_SIZE as u64,
        gpa,
        super::percpu::page_object,
    )
    .or_else(|| {
        let obj = |o| Some(Hidden { object: o, cpu: None });
        if page != 0 && page == HOST_PML4.load(Ordering::Relaxed) {
            obj(Object::HostPageTable)
        } else if page != 0 && page == MAP_PAGE.load(Ordering::Relaxed) {
            obj(Object::EptState)
        } else {
            None
        }
    });
    let walked = with_root_map(|m| {
        let now = match m.translate(gpa) {
            Some(t) => Now::Mapped(t),
            None => Now::Unmapped,
        };
        let table = if named.is_none() && hiding() {
            if m.is_table(page) {
                Some(Hidden { object: Object::EptTable, cpu: None })
            } else if m.allocator().pool().contains(&page) {
                Some(Hidden { object: Object::EptSpare, cpu: None })
            } else {
                None
            }
        } else {
            None
        };
        (now, table)
    });
    match walked {
        Some((now, table)) => (now, named.or(table)),
        None => (Now::Unknown, named),
    }
}
