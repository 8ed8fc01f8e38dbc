//! The per-CPU area of the hypervisor: one naturally aligned 64 KB block (an order-4 page
//! allocation) holding everything root mode touches, allocated and zeroed in process
//! context before the CPU is launched.
//!
//! Because the block is 64 KB aligned and root mode always runs on the host stack or the
//! IST stack inside it, root-mode code finds its `PerCpu` as `rsp & !0xffff` — no %gs, no
//! kernel per-CPU data, so an NMI arriving at any point of a VM exit or of devirtualization
//! finds the right block.
//!
//! The block is hypervisor memory: under EPT it is hidden from the guest (no EPT rights,
//! see `ept::hide`) from before the launch until it is freed. What the kernel side reads
//! while the CPU is virtualized (the virtualized flag, launch time, exit counters) lives
//! apart, in a [`Shared`] page the guest may read.
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};

use vmx::exit::{ExitCounters, ExitCtx};

pub const PERCPU_ORDER: u32 = 4;
pub const PERCPU_SIZE: usize = 4096 << PERCPU_ORDER;
pub const PAGE: usize = 4096;

/// Host selectors, laid out as in Linux's GDT (`__KERNEL_CS`, `__KERNEL_DS`,
/// `GDT_ENTRY_TSS`), so the host IDT's gates (CS 0x10) stay valid when the devirtualize
/// path has loaded the kernel's GDT but not yet its IDT.
pub const GDT_CS: u16 = 0x10;
pub const GDT_SS: u16 = 0x18;
pub const GDT_TR: u16 = 0x40;

/// 64-bit TSS (SDM Vol. 3A, 8.7).
#[repr(C, packed(4))]
pub struct Tss {
    _r0: u32,
    pub rsp: [u64; 3],
    _r1: u64,
    pub ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    pub iopb: u16,
}

/// What the guest had when it executed the devirtualize hypercall, restored by the
/// devirtualize path; plus the writable alias of the guest GDT (see `devirt`).
#[repr(C)]
#[derive(Default)]
pub struct GuestTables {
    /// Writable (direct-map) alias of this CPU's GDT, for clearing the TSS busy bit.
    pub gdt_rw: u64,
}

/// The control page: host GDT and TSS, per-CPU hypervisor state and counters.
#[repr(C)]
pub struct Control {
    pub gdt: [u64; 10],
    pub tss: Tss,
    /// Set by the root-mode NMI handler; the NMI is re-injected at the next VM entry.
    pub nmi_pending: AtomicU8,
    /// NMI virtualization is on and this CPU's VMCS is current: the root-mode NMI handler
    /// may arm NMI-window exiting itself (so an NMI arriving just before VMRESUME is not
    /// left waiting). Cleared before the devirtualize path's VMCLEAR.
    pub nmi_vmcs_live: AtomicU8,
    /// Set while VMLAUNCH is in flight: an entry failure then unwinds to the launcher.
    /// Root mode clears it at the first exit (the guest may not write this block).
    pub launching: bool,
    pub cpu: u32,
    /// Physical address of this block (VMXON region and VMCS at offsets 0 and 4096).
    pub phys: u64,
    pub tables: GuestTables,
    /// The exit handler's live state (NMI pending, last reason): this CPU's root mode only.
    pub exits: ExitCtx,
    /// This CPU's guest-visible page (allocated with the block, freed with it).
    pub shared: *const Shared,
    /// Shadow paging: this CPU's `super::shadow::ShadowCpu` (null under EPT).
    pub shadow: *mut super::shadow::ShadowCpu,
    /// INVVPID types the shadow MMU's flushes may use (from the controls).
    pub flush: vmx::shadow_exit::FlushCaps,
}

/// What the kernel side reads of a CPU while it is virtualized, outside the hidden block.
/// Root mode writes it; a hostile guest could only falsify its own statistics here.
#[repr(C)]
pub struct Shared {
    /// This CPU is in VMX non-root operation under kdbt.
    pub virtualized: AtomicBool,
    /// TSC cycles the launch took (VMXON to first guest instruction).
    pub launch_cycles: AtomicU64,
    /// Set by the launcher, as a guest, once VMLAUNCH returned into it: until then a
    /// fatal first exit is the launch's (root mode returns to the launcher, which fails
    /// the load); afterwards it is a running guest's, however late it comes.
    pub left_launcher: AtomicBool,
    /// Exit statistics: written by this CPU's root mode, read by any CPU (`kdbt status`).
    pub stats: ExitCounters,
}

const _: () = assert!(core::mem::size_of::<Shared>() <= PAGE);

impl Control {
    pub fn shared(&self) -> &Shared {
        // SAFETY: `shared` is set before the block is used (alloc_percpu) and the page is
        // freed only together with the block.
        unsafe { &*self.shared }
    }
}

/// What page `page` (0..16) of a block holds, for the diagnostic of a guest access.
pub fn page_object(page: usize) -> ::ept::hide::Object {
    use ::ept::hide::Object;
    match page {
        0 => Object::Vmxon,
        1 => Object::Vmcs,
        2 => Object::MsrBitmap,
        3 => Object::HostIdt,
        4 => Object::HostGdtTss,
        5 | 6 => Object::IstStack,
        _ => Object::HostStack,
    }
}

const _: () = assert!(core::mem::offset_of!(PerCpu, idt) == 3 * PAGE);
const _: () = assert!(core::mem::offset_of!(PerCpu, ctl) == 4 * PAGE);
const _: () = assert!(core::mem::offset_of!(PerCpu, ist_stack) == 5 * PAGE);
const _: () = assert!(core::mem::offset_of!(PerCpu, host_stack) == 7 * PAGE);

/// The whole block. Field offsets are fixed by the layout below; the assembly only
/// relies on the block's alignment and size.
#[repr(C, align(4096))]
pub struct PerCpu {
    pub vmxon: [u8; PAGE],
    pub vmcs: [u8; PAGE],
    pub msr_bitmap: [u8; PAGE],
    /// Host IDT: 256 16-byte gates.
    pub idt: [[u64; 2]; 256],
    pub ctl: Control,
    _pad: [u8; PAGE - core::mem::size_of::<Control>()],
    /// IST stack for #DF, #MC (host IDT) — fatal paths only.
    pub ist_stack: [u8; 2 * PAGE],
    /// Host stack for VM exits; its top [`IRET_RESERVE`] bytes hold the iret frame of the
    /// devirtualize path.
    pub host_stack: [u8; PERCPU_SIZE - 7 * PAGE],
}

/// Bytes kept free at the top of the host stack for the devirtualize iret frame
/// (RIP, CS, RFLAGS, RSP, SS).
pub const IRET_RESERVE: usize = 5 * 8;

const _: () = assert!(core::mem::size_of::<Control>() <= PAGE);
const _: () = assert!(core::mem::size_of::<PerCpu>() == PERCPU_SIZE);
const _: () = assert!(core::mem::size_of::<Tss>() == 104);
const _: () = assert!(core::mem::offset_of!(PerCpu, vmcs) == PAGE);

impl PerCpu {
    /// The top of the host stack, minus the iret reserve: the VMCS host RSP.
    pub fn host_rsp(&self) -> u64 {
        let top = self.host_stack.as_ptr() as u64 + self.host_stack.len() as u64;
        top - IRET_RESERVE as u64
    }

    pub fn iret_frame(&mut self) -> &mut [u64; 5] {
        let len = self.host_stack.len();
        let tail = &mut self.host_stack[len - IRET_RESERVE..];
        // SAFETY: `tail` is 40 bytes inside this block, 8-aligned (the block is page
        // aligned and the stack length is a multiple of 8), and borrowed mutably.
        unsafe { &mut *(tail.as_mut_ptr() as *mut [u64; 5]) }
    }

    pub fn phys_of(&self, field: *const u8) -> u64 {
        self.ctl.phys + (field as u64 - self as *const _ as u64)
    }

    /// Builds the host GDT, TSS and the part of the IDT that does not depend on stub
    /// addresses. `stubs[v]` is the entry point of vector `v`.
    pub fn init_tables(&mut self, stubs: &[u64; 256]) {
        let ist_top = self.ist_stack.as_ptr() as u64 + self.ist_stack.len() as u64;
        self.ctl.tss.ist = [0; 7];
        self.ctl.tss.ist[0] = ist_top;
        self.ctl.tss.iopb = core::mem::size_of::<Tss>() as u16;
        let tss = &self.ctl.tss as *const Tss as u64;
        self.ctl.gdt = [0; 10];
        self.ctl.gdt[GDT_CS as usize / 8] = 0x00af_9b00_0000_ffff; // 64-bit code, DPL 0
        self.ctl.gdt[GDT_SS as usize / 8] = 0x00cf_9300_0000_ffff; // data, DPL 0
                                                                   // 64-bit TSS, busy (VM exits load TR as busy), limit 103.
        let tr = GDT_TR as usize / 8;
        self.ctl.gdt[tr] = 103 | ((tss & 0xff_ffff) << 16) | (0xb << 40) | (1 << 47) | (((tss >> 24) & 0xff) << 56);
        self.ctl.gdt[tr + 1] = tss >> 32;
        for (v, gate) in self.idt.iter_mut().enumerate() {
            let off = stubs[v];
            // #DF and #MC run on the IST stack; everything else (incl. NMI) on the
            // current stack, which in root mode is always the host stack.
            let ist = if v == 8 || v == 18 { 1u64 } else { 0 };
            gate[0] =
                (off & 0xffff) | ((GDT_CS as u64) << 16) | (ist << 32) | (0x8e << 40) | (((off >> 16) & 0xffff) << 48);
            gate[1] = off >> 32;
        }
    }
}

/// The `PerCpu` whose host or IST stack `rsp` lies in.
pub fn from_rsp(rsp: u64) -> *mut PerCpu {
    (rsp & !(PERCPU_SIZE as u64 - 1)) as *mut PerCpu
}
