//! Hypervisor memory hidden from the guest: the pages only VMX root mode may touch
//! (VMXON regions, VMCSs, MSR bitmaps, host IDT/GDT/TSS, host stacks, the EPT's own
//! paging structures, ...) get no rights in the guest's EPT view, and a guest access to
//! one of them is named in the EPT-violation diagnostic.
//!
//! Root mode does not run under EPT (it uses its own page tables, which share the
//! kernel's direct map), so hiding a page from the guest leaves it fully usable there.
use core::fmt;

use crate::table::{Ept, EptError, FrameAllocator, Perms};

/// Takes every right from each page in `extra` and from every paging-structure frame of
/// the map itself, to a fixed point: the 4 KiB split needed to hide one page allocates a
/// table, which is then hidden in turn (and so on, until a pass changes nothing).
/// Returns whether anything changed (the caller must INVEPT on every CPU using the map).
/// On error, the pages hidden so far stay hidden.
pub fn hide_self<A: FrameAllocator>(ept: &mut Ept<A>, extra: &[u64]) -> Result<bool, EptError> {
    let mut changed = false;
    for &pa in extra {
        changed |= ept.set_perms_4k(pa, Perms::NONE)?;
    }
    loop {
        let mut todo = None;
        ept.for_each_table(|t| {
            if todo.is_none() && ept.perms_of(t) != Some(Perms::NONE) {
                todo = Some(t);
            }
        });
        match todo {
            Some(t) => changed |= ept.set_perms_4k(t, Perms::NONE)?,
            None => return Ok(changed),
        }
    }
}

/// What a hidden page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Vmxon,
    Vmcs,
    MsrBitmap,
    HostIdt,
    /// Host GDT and TSS, and the CPU's root-mode state.
    HostGdtTss,
    IstStack,
    HostStack,
    /// A paging structure of the EPT identity map.
    EptTable,
    /// A spare frame kept for later EPT splits (root mode never allocates).
    EptSpare,
    /// The EPT map's own bookkeeping (root pointer, frame pool).
    EptState,
    /// Root mode's page-table root (HOST_CR3).
    HostPageTable,
}

impl Object {
    pub fn name(self) -> &'static str {
        match self {
            Object::Vmxon => "vmxon region",
            Object::Vmcs => "vmcs",
            Object::MsrBitmap => "msr bitmap",
            Object::HostIdt => "host idt",
            Object::HostGdtTss => "host gdt/tss and root state",
            Object::IstStack => "host ist stack",
            Object::HostStack => "host stack",
            Object::EptTable => "ept paging structure",
            Object::EptSpare => "ept spare frame",
            Object::EptState => "ept state",
            Object::HostPageTable => "host page-table root",
        }
    }
}

/// A hidden page found by [`find_in_blocks`] or named by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hidden {
    pub object: Object,
    /// The CPU it belongs to (per-CPU objects).
    pub cpu: Option<u32>,
}

impl fmt::Display for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hypervisor memory: {}", self.object.name())?;
        if let Some(cpu) = self.cpu {
            write!(f, " of cpu{cpu}")?;
        }
        Ok(())
    }
}

/// The per-CPU object holding `gpa`: `blocks[cpu]` is the physical base of that CPU's
/// block of `block_size` bytes (0: none), `layout(page)` names the block's 4 KiB page
/// number `page`.
pub fn find_in_blocks(
    blocks: impl IntoIterator<Item = u64>,
    block_size: u64,
    gpa: u64,
    layout: impl Fn(usize) -> Object,
) -> Option<Hidden> {
    blocks.into_iter().enumerate().find_map(|(cpu, base)| {
        (base != 0 && gpa >= base && gpa - base < block_size)
            .then(|| Hidden { object: layout(((gpa - base) / 4096) as usize), cpu: Some(cpu as u32) })
    })
}

#[cfg(test)]
mod tests;
