//! The kernel side of the EPT identity map: paging-structure frames from the page
//! allocator, MTRRs read from this CPU, and the map built once for all CPUs.
use alloc::string::String;

use ept::{Ept, EptCaps, FrameAllocator, Mtrrs};

use crate::ffi;

/// Frames for EPT paging structures: single zeroed pages from the kernel, accessed through
/// the direct map.
pub struct KernelFrames {
    pub frames: usize,
}

impl FrameAllocator for KernelFrames {
    fn alloc_zeroed(&mut self) -> Option<u64> {
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
        // SAFETY: `pa` came from alloc_zeroed, so its direct-map address is a page we own.
        unsafe { ffi::kdbt_glue_free_pages(ffi::kdbt_glue_phys_to_virt(pa), 0) };
        self.frames -= 1;
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

/// Builds the identity map for this machine.
pub fn build(caps: EptCaps) -> Result<Ept<KernelFrames>, String> {
    let mtrrs = read_mtrrs();
    let limit = map_limit(&caps);
    Ept::build_identity(limit, &mtrrs, caps, KernelFrames { frames: 0 })
        .map_err(|(e, _frames)| alloc::format!("cannot build the EPT identity map: {e}"))
}
