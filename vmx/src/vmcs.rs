//! Programming the VMCS for a late launch, written against the [`Vmcs`] trait so that
//! the choice of every field and value is unit-tested on the host with a recording fake,
//! and every VMWRITE's failure is seen: the first one that fails stops the programming
//! with the field named ([`VmcsError`]), and the launcher rolls the CPU back.
//!
//! The kernel side collects the CPU's state as it is at the launch point into a
//! [`LaunchState`] (registers, descriptor tables, MSRs, kdbt's own host tables) and calls
//! [`program`] with a writer that executes VMWRITE.
use core::fmt;

use x86::vmx::vmcs::{control, guest, host, ro};

/// How a VMX instruction failed (SDM Vol. 3C, 31.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: no current VMCS.
    Invalid,
    /// VMfailValid with the VM-instruction error number.
    Valid(u32),
}

/// Which VMCS access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// What the tests' fake VMCSs share.
#[cfg(test)]
pub(crate) mod testing {
    extern crate std;
    use super::{Op, VmFail, VmcsError};

    /// Logs the access to `field` and fails it (VMfailValid, error 12) if it is the one
    /// `fail` names.
    pub(crate) fn fake_access(
        log: &core::cell::RefCell<std::vec::Vec<(Op, u32)>>,
        fail: Option<(Op, u32)>,
        op: Op,
        field: u32,
    ) -> Result<(), VmcsError> {
        log.borrow_mut().push((op, field));
        if fail == Some((op, field)) {
            return Err(VmcsError { op, field, fail: VmFail::Valid(12) });
        }
        Ok(())
    }
}

/// A failed VMREAD or VMWRITE, with its field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsError {
    pub op: Op,
    pub field: u32,
    pub fail: VmFail,
}

impl fmt::Display for VmcsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Read => "VMREAD",
            Op::Write => "VMWRITE",
        };
        write!(f, "{op} {} ({:#x}) failed: {}", field_name(self.field), self.field, self.fail)
    }
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmFail::Invalid => write!(f, "no current VMCS (VMfailInvalid)"),
            VmFail::Valid(e) => write!(f, "VM-instruction error {e} ({})", vm_instruction_error(e)),
        }
    }
}

/// Name of a VM-instruction error number (SDM Vol. 3C, 31.4, the ones kdbt can meet).
pub fn vm_instruction_error(e: u32) -> &'static str {
    match e {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control fields",
        8 => "VM entry with invalid host-state fields",
        9 => "VMPTRLD with invalid physical address",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "see SDM Vol. 3C, 31.4",
    }
}

/// Access to the current VMCS. Both operations report failure; nothing is read as 0.
pub trait Vmcs {
    fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError>;
    fn read(&self, field: u32) -> Result<u64, VmcsError>;
}

/// One segment register as the guest-state area wants it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub limit: u32,
    /// VMCS access-rights format ([`crate::segment::access_rights`]).
    pub access_rights: u32,
    pub base: u64,
}

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dtr {
    pub base: u64,
    pub limit: u16,
}

/// The controls of one CPU's VMCS ([`crate::policy::Controls::launch_controls`]): the
/// execution, exit and entry controls, the CR bits and the EPT pointer are the machine's,
/// the same on every CPU; the VPID and the MSR bitmap's address are this CPU's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlsIn {
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed0: u64,
    /// CR0 bits the guest may clear although fixed to 1 (unrestricted guest).
    pub cr0_unrestricted_free: u64,
    pub cr4_fixed0: u64,
    /// VPID of this CPU; None when VPID is off.
    pub vpid: Option<u16>,
    /// EPT pointer; None when EPT is off.
    pub eptp: Option<u64>,
    pub msr_bitmap_pa: u64,
    /// Shadow paging (no EPT): `#PF` exits (exception bitmap bit 14, PFEC mask/match
    /// 0/0) and the paging-relevant CR0/CR4 bits are host-owned, so every change of them
    /// exits and reaches the shadow MMU. The guest CR3 in the state is the shadow root.
    pub shadow: bool,
}

/// CR0 bits the shadow MMU must see change: WP (and PG, fixed to 1 anyway).
pub const CR0_SHADOW_OWNED: u64 = (1 << 16) | (1 << 31);
/// CR4 bits the shadow MMU must see change: PSE, PAE, PGE, PCIDE, SMEP, SMAP, LA57.
pub const CR4_SHADOW_OWNED: u64 = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 12);
/// Exception bitmap bit of `#PF`.
pub const EXC_PF: u64 = 1 << 14;

/// kdbt's own state for root mode on this CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostIn {
    pub cr3: u64,
    pub cs: u16,
    pub ss: u16,
    pub tr: u16,
    pub tr_base: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub rsp: u64,
    pub rip: u64,
}

/// Everything [`program`] writes: the CPU at the launch point (which becomes the guest),
/// kdbt's host tables, the controls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchState {
    pub controls: ControlsIn,
    pub host: HostIn,
    /// CR0 and CR4 as they will be in VMX operation (fixed bits applied, CR4.VMXE set):
    /// both the guest's and root mode's.
    pub cr0: u64,
    pub cr4: u64,
    /// Guest segments in VMCS order: ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub segments: [Segment; 8],
    pub gdtr: Dtr,
    pub idtr: Dtr,
    pub cr3: u64,
    pub dr7: u64,
    pub rflags: u64,
    pub debugctl: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub efer: u64,
    pub pat: u64,
}

pub use crate::caps::CR4_VMXE;
/// Index of GS in [`LaunchState::segments`].
pub const SEG_GS: usize = 5;

const GUEST_SEGMENT_FIELDS: [(u32, u32, u32, u32); 8] = [
    (guest::ES_SELECTOR, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS, guest::ES_BASE),
    (guest::CS_SELECTOR, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS, guest::CS_BASE),
    (guest::SS_SELECTOR, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS, guest::SS_BASE),
    (guest::DS_SELECTOR, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS, guest::DS_BASE),
    (guest::FS_SELECTOR, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS, guest::FS_BASE),
    (guest::GS_SELECTOR, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS, guest::GS_BASE),
    (guest::LDTR_SELECTOR, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS, guest::LDTR_BASE),
    (guest::TR_SELECTOR, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS, guest::TR_BASE),
];

/// Writes every VMCS field a launch needs: controls, host state (kdbt's own GDT/TSS/IDT/
/// stack), guest state (the CPU as it is now). A fresh VMCS's fields are undefined, so
/// every field an enabled control consults is written. Stops at the first failed VMWRITE.
pub fn program(w: &mut impl Vmcs, s: &LaunchState) -> Result<(), VmcsError> {
    let c = &s.controls;
    // --- controls
    w.write(control::PINBASED_EXEC_CONTROLS, c.pin as u64)?;
    w.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, c.proc as u64)?;
    w.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, c.proc2 as u64)?;
    w.write(control::VMEXIT_CONTROLS, c.exit as u64)?;
    w.write(control::VMENTRY_CONTROLS, c.entry as u64)?;
    w.write(control::EXCEPTION_BITMAP, if c.shadow { EXC_PF } else { 0 })?;
    w.write(control::PAGE_FAULT_ERR_CODE_MASK, 0)?;
    w.write(control::PAGE_FAULT_ERR_CODE_MATCH, 0)?;
    w.write(control::CR3_TARGET_COUNT, 0)?;
    w.write(control::VMEXIT_MSR_STORE_COUNT, 0)?;
    w.write(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
    w.write(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
    w.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0)?;
    w.write(control::MSR_BITMAPS_ADDR_FULL, c.msr_bitmap_pa)?;
    // CR0: the fixed bits are host-owned, so the guest can't clear them behind our back;
    // CR4: VMXE is host-owned and reads as 0 (Linux's own CR4 shadow never has it).
    // Shadow paging also owns the paging-relevant bits (the guest reads its own values:
    // the read shadows hold the real ones).
    let (cr0_own, cr4_own) = if c.shadow { (CR0_SHADOW_OWNED, CR4_SHADOW_OWNED) } else { (0, 0) };
    let cr0_mask = (c.cr0_fixed0 & !c.cr0_unrestricted_free) | cr0_own;
    w.write(control::CR0_GUEST_HOST_MASK, cr0_mask)?;
    w.write(control::CR0_READ_SHADOW, s.cr0 & cr0_mask)?;
    let cr4_mask = c.cr4_fixed0 | CR4_VMXE | cr4_own;
    w.write(control::CR4_GUEST_HOST_MASK, cr4_mask)?;
    w.write(control::CR4_READ_SHADOW, (s.cr4 & !CR4_VMXE) & cr4_mask)?;
    if let Some(vpid) = c.vpid {
        w.write(control::VPID, vpid as u64)?;
    }
    if let Some(eptp) = c.eptp {
        w.write(control::EPTP_FULL, eptp)?;
    }
    // XSAVES/XRSTORS of any XSS component must not exit.
    if c.proc2 & control::SecondaryControls::ENABLE_XSAVES_XRSTORS.bits() != 0 {
        w.write(control::XSS_EXITING_BITMAP_FULL, 0)?;
    }

    // --- host state
    let h = &s.host;
    w.write(host::CR0, s.cr0)?;
    w.write(host::CR3, h.cr3)?;
    w.write(host::CR4, s.cr4)?;
    w.write(host::CS_SELECTOR, h.cs as u64)?;
    w.write(host::SS_SELECTOR, h.ss as u64)?;
    w.write(host::DS_SELECTOR, 0)?;
    w.write(host::ES_SELECTOR, 0)?;
    w.write(host::FS_SELECTOR, 0)?;
    w.write(host::GS_SELECTOR, 0)?;
    w.write(host::TR_SELECTOR, h.tr as u64)?;
    w.write(host::FS_BASE, 0)?;
    // Root mode keeps this CPU's kernel GS base (its per-CPU area): the Rust code returns
    // through the kernel's return thunk, which with call-depth tracking
    // (`retbleed=stuff`) updates a per-CPU counter through %gs. With a GS base of 0 that
    // access would hit address ~0 and fault in root mode. Root mode itself never uses %gs.
    w.write(host::GS_BASE, s.segments[SEG_GS].base)?;
    w.write(host::TR_BASE, h.tr_base)?;
    w.write(host::GDTR_BASE, h.gdtr_base)?;
    w.write(host::IDTR_BASE, h.idtr_base)?;
    w.write(host::IA32_SYSENTER_CS, 0)?;
    w.write(host::IA32_SYSENTER_ESP, 0)?;
    w.write(host::IA32_SYSENTER_EIP, 0)?;
    w.write(host::IA32_EFER_FULL, s.efer)?;
    w.write(host::IA32_PAT_FULL, s.pat)?;
    w.write(host::RSP, h.rsp)?;
    w.write(host::RIP, h.rip)?;

    // --- guest state: this CPU, now
    for (seg, &(fsel, flim, far, fbase)) in s.segments.iter().zip(GUEST_SEGMENT_FIELDS.iter()) {
        w.write(fsel, seg.selector as u64)?;
        w.write(flim, seg.limit as u64)?;
        w.write(far, seg.access_rights as u64)?;
        w.write(fbase, seg.base)?;
    }
    w.write(guest::GDTR_BASE, s.gdtr.base)?;
    w.write(guest::GDTR_LIMIT, s.gdtr.limit as u64)?;
    w.write(guest::IDTR_BASE, s.idtr.base)?;
    w.write(guest::IDTR_LIMIT, s.idtr.limit as u64)?;
    w.write(guest::CR0, s.cr0)?;
    w.write(guest::CR3, s.cr3)?;
    w.write(guest::CR4, s.cr4)?;
    w.write(guest::DR7, s.dr7)?;
    w.write(guest::RFLAGS, s.rflags)?;
    w.write(guest::IA32_DEBUGCTL_FULL, s.debugctl)?;
    w.write(guest::IA32_SYSENTER_CS, s.sysenter_cs)?;
    w.write(guest::IA32_SYSENTER_ESP, s.sysenter_esp)?;
    w.write(guest::IA32_SYSENTER_EIP, s.sysenter_eip)?;
    w.write(guest::IA32_EFER_FULL, s.efer)?;
    w.write(guest::IA32_PAT_FULL, s.pat)?;
    w.write(guest::LINK_PTR_FULL, u64::MAX)?;
    w.write(guest::ACTIVITY_STATE, 0)?;
    w.write(guest::INTERRUPTIBILITY_STATE, 0)?;
    w.write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    Ok(())
}

/// The guest's state as the VM exit saved it in the VMCS: everything leaving VMX
/// operation loads back into the CPU so that the guest continues natively (the kernel
/// side's `devirtualize`). Read in full, with every VMREAD checked, before anything
/// changes: a field that cannot be read stops it with the field named, while the CPU
/// is still in VMX operation with its VMCS current, instead of loading a 0 into CR3, the
/// IDT or the GS base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevirtState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    /// The VMCS's guest CR3 (under shadow paging the shadow root: the caller takes the
    /// guest's own from its MMU).
    pub cr3: u64,
    /// Guest CR4 with VMXE clear, as it must be once VMX operation is off.
    pub cr4: u64,
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    pub tr: u16,
    pub ldtr: u16,
    pub fs_base: u64,
    pub gs_base: u64,
    pub gdtr: Dtr,
    pub idtr: Dtr,
    pub debugctl: u64,
    /// IA32_SYSENTER_CS, _ESP, _EIP.
    pub sysenter: [u64; 3],
    pub pat: u64,
    pub efer: u64,
    pub dr7: u64,
}

impl DevirtState {
    /// Reads the state from the current VMCS; the first VMREAD that fails ends it.
    pub fn read(v: &impl Vmcs) -> Result<Self, VmcsError> {
        let sel = |f| v.read(f).map(|x| x as u16);
        Ok(DevirtState {
            rip: v.read(guest::RIP)?,
            rsp: v.read(guest::RSP)?,
            rflags: v.read(guest::RFLAGS)?,
            cr0: v.read(guest::CR0)?,
            cr3: v.read(guest::CR3)?,
            cr4: v.read(guest::CR4)? & !CR4_VMXE,
            cs: sel(guest::CS_SELECTOR)?,
            ss: sel(guest::SS_SELECTOR)?,
            ds: sel(guest::DS_SELECTOR)?,
            es: sel(guest::ES_SELECTOR)?,
            fs: sel(guest::FS_SELECTOR)?,
            gs: sel(guest::GS_SELECTOR)?,
            tr: sel(guest::TR_SELECTOR)?,
            ldtr: sel(guest::LDTR_SELECTOR)?,
            fs_base: v.read(guest::FS_BASE)?,
            gs_base: v.read(guest::GS_BASE)?,
            gdtr: Dtr { base: v.read(guest::GDTR_BASE)?, limit: v.read(guest::GDTR_LIMIT)? as u16 },
            idtr: Dtr { base: v.read(guest::IDTR_BASE)?, limit: v.read(guest::IDTR_LIMIT)? as u16 },
            debugctl: v.read(guest::IA32_DEBUGCTL_FULL)?,
            sysenter: [
                v.read(guest::IA32_SYSENTER_CS)?,
                v.read(guest::IA32_SYSENTER_ESP)?,
                v.read(guest::IA32_SYSENTER_EIP)?,
            ],
            pat: v.read(guest::IA32_PAT_FULL)?,
            efer: v.read(guest::IA32_EFER_FULL)?,
            dr7: v.read(guest::DR7)?,
        })
    }
}

/// SDM name of a VMCS field encoding (the fields kdbt writes or reads), `"field"` else.
pub fn field_name(field: u32) -> &'static str {
    match field {
        control::VPID => "VPID",
        control::MSR_BITMAPS_ADDR_FULL => "MSR_BITMAPS",
        control::EPTP_FULL => "EPT_POINTER",
        control::XSS_EXITING_BITMAP_FULL => "XSS_EXITING_BITMAP",
        control::PINBASED_EXEC_CONTROLS => "PIN_BASED_VM_EXEC_CONTROL",
        control::PRIMARY_PROCBASED_EXEC_CONTROLS => "CPU_BASED_VM_EXEC_CONTROL",
        control::SECONDARY_PROCBASED_EXEC_CONTROLS => "SECONDARY_VM_EXEC_CONTROL",
        control::EXCEPTION_BITMAP => "EXCEPTION_BITMAP",
        control::PAGE_FAULT_ERR_CODE_MASK => "PAGE_FAULT_ERROR_CODE_MASK",
        control::PAGE_FAULT_ERR_CODE_MATCH => "PAGE_FAULT_ERROR_CODE_MATCH",
        control::CR3_TARGET_COUNT => "CR3_TARGET_COUNT",
        control::VMEXIT_CONTROLS => "VM_EXIT_CONTROLS",
        control::VMEXIT_MSR_STORE_COUNT => "VM_EXIT_MSR_STORE_COUNT",
        control::VMEXIT_MSR_LOAD_COUNT => "VM_EXIT_MSR_LOAD_COUNT",
        control::VMENTRY_CONTROLS => "VM_ENTRY_CONTROLS",
        control::VMENTRY_MSR_LOAD_COUNT => "VM_ENTRY_MSR_LOAD_COUNT",
        control::VMENTRY_INTERRUPTION_INFO_FIELD => "VM_ENTRY_INTR_INFO",
        control::VMENTRY_EXCEPTION_ERR_CODE => "VM_ENTRY_EXCEPTION_ERROR_CODE",
        control::VMENTRY_INSTRUCTION_LEN => "VM_ENTRY_INSTRUCTION_LEN",
        control::CR0_GUEST_HOST_MASK => "CR0_GUEST_HOST_MASK",
        control::CR4_GUEST_HOST_MASK => "CR4_GUEST_HOST_MASK",
        control::CR0_READ_SHADOW => "CR0_READ_SHADOW",
        control::CR4_READ_SHADOW => "CR4_READ_SHADOW",
        guest::ES_SELECTOR => "GUEST_ES_SELECTOR",
        guest::CS_SELECTOR => "GUEST_CS_SELECTOR",
        guest::SS_SELECTOR => "GUEST_SS_SELECTOR",
        guest::DS_SELECTOR => "GUEST_DS_SELECTOR",
        guest::FS_SELECTOR => "GUEST_FS_SELECTOR",
        guest::GS_SELECTOR => "GUEST_GS_SELECTOR",
        guest::LDTR_SELECTOR => "GUEST_LDTR_SELECTOR",
        guest::TR_SELECTOR => "GUEST_TR_SELECTOR",
        guest::LINK_PTR_FULL => "VMCS_LINK_POINTER",
        guest::IA32_DEBUGCTL_FULL => "GUEST_IA32_DEBUGCTL",
        guest::IA32_PAT_FULL => "GUEST_IA32_PAT",
        guest::IA32_EFER_FULL => "GUEST_IA32_EFER",
        guest::ES_LIMIT => "GUEST_ES_LIMIT",
        guest::CS_LIMIT => "GUEST_CS_LIMIT",
        guest::SS_LIMIT => "GUEST_SS_LIMIT",
        guest::DS_LIMIT => "GUEST_DS_LIMIT",
        guest::FS_LIMIT => "GUEST_FS_LIMIT",
        guest::GS_LIMIT => "GUEST_GS_LIMIT",
        guest::LDTR_LIMIT => "GUEST_LDTR_LIMIT",
        guest::TR_LIMIT => "GUEST_TR_LIMIT",
        guest::GDTR_LIMIT => "GUEST_GDTR_LIMIT",
        guest::IDTR_LIMIT => "GUEST_IDTR_LIMIT",
        guest::ES_ACCESS_RIGHTS => "GUEST_ES_AR_BYTES",
        guest::CS_ACCESS_RIGHTS => "GUEST_CS_AR_BYTES",
        guest::SS_ACCESS_RIGHTS => "GUEST_SS_AR_BYTES",
        guest::DS_ACCESS_RIGHTS => "GUEST_DS_AR_BYTES",
        guest::FS_ACCESS_RIGHTS => "GUEST_FS_AR_BYTES",
        guest::GS_ACCESS_RIGHTS => "GUEST_GS_AR_BYTES",
        guest::LDTR_ACCESS_RIGHTS => "GUEST_LDTR_AR_BYTES",
        guest::TR_ACCESS_RIGHTS => "GUEST_TR_AR_BYTES",
        guest::INTERRUPTIBILITY_STATE => "GUEST_INTERRUPTIBILITY_INFO",
        guest::ACTIVITY_STATE => "GUEST_ACTIVITY_STATE",
        guest::IA32_SYSENTER_CS => "GUEST_SYSENTER_CS",
        guest::CR0 => "GUEST_CR0",
        guest::CR3 => "GUEST_CR3",
        guest::CR4 => "GUEST_CR4",
        guest::ES_BASE => "GUEST_ES_BASE",
        guest::CS_BASE => "GUEST_CS_BASE",
        guest::SS_BASE => "GUEST_SS_BASE",
        guest::DS_BASE => "GUEST_DS_BASE",
        guest::FS_BASE => "GUEST_FS_BASE",
        guest::GS_BASE => "GUEST_GS_BASE",
        guest::LDTR_BASE => "GUEST_LDTR_BASE",
        guest::TR_BASE => "GUEST_TR_BASE",
        guest::GDTR_BASE => "GUEST_GDTR_BASE",
        guest::IDTR_BASE => "GUEST_IDTR_BASE",
        guest::DR7 => "GUEST_DR7",
        guest::RSP => "GUEST_RSP",
        guest::RIP => "GUEST_RIP",
        guest::RFLAGS => "GUEST_RFLAGS",
        guest::PENDING_DBG_EXCEPTIONS => "GUEST_PENDING_DBG_EXCEPTIONS",
        guest::IA32_SYSENTER_ESP => "GUEST_SYSENTER_ESP",
        guest::IA32_SYSENTER_EIP => "GUEST_SYSENTER_EIP",
        host::ES_SELECTOR => "HOST_ES_SELECTOR",
        host::CS_SELECTOR => "HOST_CS_SELECTOR",
        host::SS_SELECTOR => "HOST_SS_SELECTOR",
        host::DS_SELECTOR => "HOST_DS_SELECTOR",
        host::FS_SELECTOR => "HOST_FS_SELECTOR",
        host::GS_SELECTOR => "HOST_GS_SELECTOR",
        host::TR_SELECTOR => "HOST_TR_SELECTOR",
        host::IA32_PAT_FULL => "HOST_IA32_PAT",
        host::IA32_EFER_FULL => "HOST_IA32_EFER",
        host::IA32_SYSENTER_CS => "HOST_IA32_SYSENTER_CS",
        host::CR0 => "HOST_CR0",
        host::CR3 => "HOST_CR3",
        host::CR4 => "HOST_CR4",
        host::FS_BASE => "HOST_FS_BASE",
        host::GS_BASE => "HOST_GS_BASE",
        host::TR_BASE => "HOST_TR_BASE",
        host::GDTR_BASE => "HOST_GDTR_BASE",
        host::IDTR_BASE => "HOST_IDTR_BASE",
        host::IA32_SYSENTER_ESP => "HOST_IA32_SYSENTER_ESP",
        host::IA32_SYSENTER_EIP => "HOST_IA32_SYSENTER_EIP",
        host::RSP => "HOST_RSP",
        host::RIP => "HOST_RIP",
        ro::VM_INSTRUCTION_ERROR => "VM_INSTRUCTION_ERROR",
        ro::EXIT_REASON => "VM_EXIT_REASON",
        ro::EXIT_QUALIFICATION => "EXIT_QUALIFICATION",
        ro::VMEXIT_INSTRUCTION_LEN => "VM_EXIT_INSTRUCTION_LEN",
        ro::VMEXIT_INTERRUPTION_INFO => "VM_EXIT_INTR_INFO",
        ro::VMEXIT_INTERRUPTION_ERR_CODE => "VM_EXIT_INTR_ERROR_CODE",
        ro::IDT_VECTORING_INFO => "IDT_VECTORING_INFO_FIELD",
        ro::IDT_VECTORING_ERR_CODE => "IDT_VECTORING_ERROR_CODE",
        ro::VMEXIT_INSTRUCTION_INFO => "VMX_INSTRUCTION_INFO",
        ro::GUEST_LINEAR_ADDR => "GUEST_LINEAR_ADDRESS",
        ro::GUEST_PHYSICAL_ADDR_FULL => "GUEST_PHYSICAL_ADDRESS",
        control::VIRT_EXCEPTION_INFO_ADDR_FULL => "VE_INFORMATION_ADDRESS",
        control::EPTP_INDEX => "EPTP_INDEX",
        _ => "field",
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::cell::RefCell;
    use std::collections::BTreeMap;
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    /// Records every VMWRITE in order; fails the write of `fail_on` like hardware
    /// (VMfailValid, error 12), and every write after it would be a bug.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u32, u64)>,
        fail_on: Option<u32>,
        failed: bool,
    }

    impl Vmcs for Recorder {
        fn write(&mut self, field: u32, value: u64) -> Result<(), VmcsError> {
            assert!(!self.failed, "VMWRITE {field:#x} after a failed one");
            if self.fail_on == Some(field) {
                self.failed = true;
                return Err(VmcsError { op: Op::Write, field, fail: VmFail::Valid(12) });
            }
            self.writes.push((field, value));
            Ok(())
        }
        fn read(&self, field: u32) -> Result<u64, VmcsError> {
            self.writes.iter().rev().find(|(f, _)| *f == field).map(|&(_, v)| v).ok_or(VmcsError {
                op: Op::Read,
                field,
                fail: VmFail::Valid(12),
            })
        }
    }

    /// A CPU in Linux's 64-bit kernel state, as the launch point sees it.
    fn state() -> LaunchState {
        let data = Segment { selector: 0x18, limit: 0xffff_ffff, access_rights: 0xc093, base: 0 };
        let null = Segment { selector: 0, limit: 0, access_rights: crate::segment::AR_UNUSABLE, base: 0 };
        LaunchState {
            controls: ControlsIn {
                pin: 0x3f,
                proc: 0x9604_e172,
                proc2: 0x10_108a,
                exit: 0x3f_efff,
                entry: 0xd3ff,
                cr0_fixed0: 0x8000_0021,
                cr0_unrestricted_free: 0,
                cr4_fixed0: 0x2000,
                vpid: Some(2),
                eptp: Some(0x1234_501e),
                msr_bitmap_pa: 0x7a0_3000,
                shadow: false,
            },
            host: HostIn {
                cr3: 0x7b0_0000,
                cs: 0x10,
                ss: 0x18,
                tr: 0x40,
                tr_base: 0xffff_8880_07a0_1000,
                gdtr_base: 0xffff_8880_07a0_2000,
                idtr_base: 0xffff_8880_07a0_4000,
                rsp: 0xffff_8880_07a0_fff0,
                rip: 0xffff_ffff_c000_1000,
            },
            cr0: 0x8005_0033,
            cr4: 0x3706f0 | CR4_VMXE,
            segments: [
                null,
                Segment { selector: 0x10, limit: 0xffff_ffff, access_rights: 0xa09b, base: 0 },
                data,
                null,
                null,
                Segment { base: 0xffff_8880_7fc0_0000, ..null },
                null,
                Segment { selector: 0x40, limit: 0x4087, access_rights: 0x8b, base: 0xffff_fe00_0000_3000 },
            ],
            gdtr: Dtr { base: 0xffff_fe00_0000_1000, limit: 0x7f },
            idtr: Dtr { base: 0xffff_fe00_0000_0000, limit: 0xfff },
            cr3: 0x1_2345_6000,
            dr7: 0x400,
            rflags: 0x46,
            debugctl: 0,
            sysenter_cs: 0x10,
            sysenter_esp: 0xffff_fe00_0000_5000,
            sysenter_eip: 0xffff_ffff_8100_2000,
            efer: 0xd01,
            pat: 0x0407_0406_0007_0406,
        }
    }

    #[test]
    fn every_field_written_once_with_its_value() {
        let s = state();
        let mut r = Recorder::default();
        program(&mut r, &s).unwrap();
        let mut seen = BTreeMap::new();
        for &(f, v) in &r.writes {
            assert!(seen.insert(f, v).is_none(), "{} written twice", field_name(f));
            assert_ne!(field_name(f), "field", "{f:#x} has no name");
        }
        assert_eq!(seen[&guest::CR3], 0x1_2345_6000);
        assert_eq!(seen[&guest::GS_BASE], 0xffff_8880_7fc0_0000);
        assert_eq!(seen[&guest::TR_BASE], 0xffff_fe00_0000_3000);
        assert_eq!(seen[&guest::LINK_PTR_FULL], u64::MAX);
        assert_eq!(seen[&control::VPID], 2);
        assert_eq!(seen[&control::EPTP_FULL], 0x1234_501e);
        // CR4.VMXE is host-owned and the guest reads it as clear.
        assert_eq!(seen[&control::CR4_GUEST_HOST_MASK] & CR4_VMXE, CR4_VMXE);
        assert_eq!(seen[&control::CR4_READ_SHADOW] & CR4_VMXE, 0);
        assert_eq!(seen[&host::CR4], s.cr4);
        // XSAVES is on in these controls: its exiting bitmap must be written (0).
        assert_eq!(seen[&control::XSS_EXITING_BITMAP_FULL], 0);
        assert!(r.writes.len() > 80, "{} writes", r.writes.len());
        // Without VPID, EPT and XSAVES those fields stay unwritten.
        let mut s2 = s;
        s2.controls.vpid = None;
        s2.controls.eptp = None;
        s2.controls.proc2 = 0;
        let mut r2 = Recorder::default();
        program(&mut r2, &s2).unwrap();
        for f in [control::VPID, control::EPTP_FULL, control::XSS_EXITING_BITMAP_FULL] {
            assert!(r2.writes.iter().all(|w| w.0 != f), "{}", field_name(f));
        }
    }

    #[test]
    fn shadow_mode_intercepts_pf_and_paging_bits() {
        let mut s = state();
        let mut r = Recorder::default();
        program(&mut r, &s).unwrap();
        assert_eq!(r.read(control::EXCEPTION_BITMAP).unwrap(), 0);
        assert_eq!(r.read(control::CR4_GUEST_HOST_MASK).unwrap() & CR4_SHADOW_OWNED, 0);
        s.controls.shadow = true;
        s.controls.eptp = None;
        let mut r = Recorder::default();
        program(&mut r, &s).unwrap();
        assert_eq!(r.read(control::EXCEPTION_BITMAP).unwrap(), EXC_PF);
        assert_eq!(r.read(control::PAGE_FAULT_ERR_CODE_MASK).unwrap(), 0);
        assert_eq!(r.read(control::PAGE_FAULT_ERR_CODE_MATCH).unwrap(), 0);
        let m4 = r.read(control::CR4_GUEST_HOST_MASK).unwrap();
        assert_eq!(m4 & CR4_SHADOW_OWNED, CR4_SHADOW_OWNED);
        // The guest reads its own paging bits (PGE, SMEP, SMAP set in `state`).
        assert_eq!(r.read(control::CR4_READ_SHADOW).unwrap(), s.cr4 & m4 & !CR4_VMXE);
        let m0 = r.read(control::CR0_GUEST_HOST_MASK).unwrap();
        assert_eq!(m0 & CR0_SHADOW_OWNED, CR0_SHADOW_OWNED);
        assert_eq!(r.read(control::CR0_READ_SHADOW).unwrap() & (1 << 16), 1 << 16);
        assert!(r.writes.iter().all(|w| w.0 != control::EPTP_FULL));
    }

    #[test]
    fn a_failed_vmwrite_stops_programming_and_names_the_field() {
        let s = state();
        let mut all = Recorder::default();
        program(&mut all, &s).unwrap();
        // Whichever field fails, programming stops right there and names it.
        for (i, &(field, _)) in all.writes.iter().enumerate() {
            let mut r = Recorder { fail_on: Some(field), ..Default::default() };
            let e = program(&mut r, &s).unwrap_err();
            assert_eq!((e.op, e.field, e.fail), (Op::Write, field, VmFail::Valid(12)));
            assert_eq!(r.writes.len(), i, "writes before {}", field_name(field));
        }
        let mut r = Recorder { fail_on: Some(guest::CR3), ..Default::default() };
        let e = program(&mut r, &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VMWRITE GUEST_CR3 (0x6802) failed: VM-instruction error 12 \
             (VMREAD/VMWRITE from/to unsupported VMCS component)"
        );
        let e = VmcsError { op: Op::Read, field: ro::VM_INSTRUCTION_ERROR, fail: VmFail::Invalid };
        assert_eq!(e.to_string(), "VMREAD VM_INSTRUCTION_ERROR (0x4400) failed: no current VMCS (VMfailInvalid)");
    }

    /// Logs every VMREAD it passes on to a recorder.
    struct Logging<'a>(&'a Recorder, RefCell<Vec<u32>>);

    impl Vmcs for Logging<'_> {
        fn write(&mut self, field: u32, _: u64) -> Result<(), VmcsError> {
            panic!("VMWRITE {} while reading", field_name(field))
        }
        fn read(&self, field: u32) -> Result<u64, VmcsError> {
            self.1.borrow_mut().push(field);
            self.0.read(field)
        }
    }

    #[test]
    fn devirtualize_state_is_read_in_full_or_fails_naming_the_field() {
        // The VMCS of the guest of `state()` at a VMCALL exit: as programmed, with the RSP
        // and RIP the launch writes itself.
        let s = state();
        let mut r = Recorder::default();
        program(&mut r, &s).unwrap();
        r.write(guest::RSP, 0xffff_c900_0001_3e80).unwrap();
        r.write(guest::RIP, 0xffff_ffff_c000_2003).unwrap();
        let log = Logging(&r, RefCell::new(Vec::new()));
        let d = DevirtState::read(&log).unwrap();
        assert_eq!((d.rip, d.rsp, d.rflags), (0xffff_ffff_c000_2003, 0xffff_c900_0001_3e80, s.rflags));
        assert_eq!((d.cr0, d.cr3), (s.cr0, s.cr3));
        // Native again, CR4.VMXE must be clear.
        assert_eq!(d.cr4, s.cr4 & !CR4_VMXE);
        assert_ne!(s.cr4 & CR4_VMXE, 0);
        let sels = [d.es, d.cs, d.ss, d.ds, d.fs, d.gs, d.ldtr, d.tr];
        assert_eq!(sels, core::array::from_fn(|i| s.segments[i].selector));
        assert_eq!((d.fs_base, d.gs_base), (s.segments[4].base, s.segments[SEG_GS].base));
        assert_eq!((d.gdtr, d.idtr), (s.gdtr, s.idtr));
        assert_eq!(d.sysenter, [s.sysenter_cs, s.sysenter_esp, s.sysenter_eip]);
        assert_eq!((d.debugctl, d.pat, d.efer, d.dr7), (s.debugctl, s.pat, s.efer, s.dr7));
        // Each field it reads, unreadable in turn: the whole read fails, naming it, and
        // nothing of the state comes out as 0.
        let fields = log.1.take();
        assert_eq!(fields.len(), 27, "{fields:x?}");
        for &field in &fields {
            let broken =
                Recorder { writes: r.writes.iter().filter(|w| w.0 != field).copied().collect(), ..Default::default() };
            assert_ne!(field_name(field), "field", "{field:#x} has no name");
            assert_eq!(
                DevirtState::read(&broken),
                Err(VmcsError { op: Op::Read, field, fail: VmFail::Valid(12) }),
                "{}",
                field_name(field)
            );
        }
    }

    #[test]
    fn root_mode_runs_with_the_cpus_kernel_gs_base() {
        // The kernel's return thunk with call-depth tracking (retbleed=stuff) touches
        // %gs:<per-CPU counter> in root mode too: HOST_GS_BASE must be this CPU's
        // per-CPU base (the kernel GS base at the launch point), never 0.
        let s = state();
        let mut r = Recorder::default();
        program(&mut r, &s).unwrap();
        assert_eq!(r.read(host::GS_BASE).unwrap(), 0xffff_8880_7fc0_0000);
        assert_eq!(r.read(host::FS_BASE).unwrap(), 0);
    }
}
