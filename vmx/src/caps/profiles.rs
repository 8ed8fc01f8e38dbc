//! Capability MSR sets of known CPU models, used by the tests: each with where its values
//! come from and what decoding them must give. To add a model (e.g. the values actually
//! read inside Bochs with `kdbt caps --json`), append a [`Profile`] to [`PROFILES`].
//! Bochs' model is here; real CPUs' values, each with the public source it is copied
//! from, are in [`real_cpus`].

pub mod real_cpus;

/// One CPU model's raw values and the decoded facts expected from them.
pub struct Profile {
    pub name: &'static str,
    /// Where the values come from.
    pub source: &'static str,
    pub vendor: &'static [u8; 12],
    pub cpuid1_ecx: u32,
    pub cr4: u64,
    /// `(MSR, value)`; an MSR not listed faults (#GP) when read.
    pub msrs: &'static [(u32, u64)],
    /// `(leaf, subleaf, [EAX, EBX, ECX, EDX])`: the CPUID leaves a Linux kernel on this CPU
    /// sees that [`crate::preflight::native_needs`] reads (0, 7.0, 0DH.1, 80000000H,
    /// 80000001H); a leaf not listed reads 0.
    pub cpuid: &'static [(u32, u32, [u32; 4])],
    /// The exact summary line expected (for CPU 0).
    pub summary: &'static str,
    /// Expected feature facts beyond the summary line.
    pub pages_1g: bool,
    pub ept_ad: bool,
    pub preemption_timer: bool,
    pub true_ctls: bool,
    pub revision_id: u32,
}

/// Bochs 2.7 (tag REL_2_7_FINAL of github.com/bochs-emu/Bochs; Debian 12 ships
/// 2.7+dfsg-4+deb12u1), CPU model `corei7_skylake_x`, built with `--enable-vmx=2`,
/// x86-64 and MONITOR/MWAIT support. Derivation, from the 2.7 sources:
///
/// * Model (cpu/cpudb/intel/corei7_skylake-x.cc): `get_vmx_extensions_bitmask()` =
///   TPR_SHADOW, VIRTUAL_NMI, APIC_VIRTUALIZATION, WBINVD_VMEXIT, VPID, EPT,
///   UNRESTRICTED_GUEST, SAVE_DEBUGCTL_DISABLE, PERF_GLOBAL_CTRL, PAT, EFER,
///   DESCRIPTOR_TABLE_EXIT, X2APIC_VIRTUALIZATION, PREEMPTION_TIMER, PAUSE_LOOP_EXITING,
///   EPTP_SWITCHING, EPT_ACCESS_DIRTY, VINTR_DELIVERY, VMCS_SHADOWING, EPT_EXCEPTION,
///   SW_INTERRUPT_INJECTION_ILEN_0, PML, TSC_SCALING. In 2.7 MONITOR_TRAP_FLAG, posted
///   interrupts and MBE are commented out ("not implemented yet"); Bochs master enables
///   them, which is where the often-quoted EPT/VPID value 0x00000F0106734141 (bit 22) comes from.
///   ISA extensions include 1G_PAGES, RDTSCP, INVPCID, RDRAND, RDSEED, XSAVES, PCID,
///   FSGSBASE, SMEP, SMAP, MONITOR_MWAIT; not SMX, CET, PKU, PKS, UMIP.
/// * CPUID.1:ECX (model's leaf 1): SSE3, PCLMULQDQ, DTES64, MONITOR, DS-CPL, VMX, EST, TM2,
///   SSSE3, FMA, CX16, xTPR, PDCM, PCID, SSE4.1, SSE4.2, X2APIC, MOVBE, POPCNT,
///   TSC-deadline, AES, XSAVE, AVX, F16C, RDRAND = 0x77fbf3bf, plus OSXSAVE (bit 27) once
///   Linux sets CR4.OSXSAVE: 0x7ffbf3bf.
/// * IA32_FEATURE_CONTROL: 0 at reset (cpu/init.cc); Bochs' BIOS does not write it. Linux
///   then locks it, setting bit 2 only if built with CONFIG_KVM_INTEL. Listed here as
///   Linux-with-KVM_INTEL leaves it: 0x5.
/// * IA32_VMX_BASIC (cpu/vmx.h VMX_MSR_VMX_BASIC): low = VMCS revision
///   BX_VMX_VMCS_REVISION_ID 0x2b (the model uses the default VMCS map); high =
///   VMX_VMCS_AREA_SIZE 4096 | (no long mode=0)<<16 | WB(6)<<18 | 1<<22 (INS/OUTS) |
///   1<<23 (true ctls, VMX>=2) | CET(0)<<24 = 0x00d81000 -> 0x00d81000_0000002b.
/// * PINBASED (0x481) low 0x16; high = supported (ext-int 0, NMI 3, virtual NMI 5,
///   preemption timer 6 = 0x69) | 0x16 = 0x7f. TRUE_PINBASED (0x48d): identical.
/// * PROCBASED (0x482) low 0x0401e172; supported = 2,3,7,9,11,12,23,24,25,28,30 (always)
///   | 10,29 (MONITOR/MWAIT) | 21,19,20 (TPR shadow, long mode) | 22 (virtual NMI) |
///   15,16 (EPT) | 31 (secondary) = 0xf3f99e8c; high = that | low = 0xf7f9fffe.
///   TRUE_PROCBASED (0x48e): low 0x04006172, same high.
/// * PROCBASED2 (0x48b) low 0; high = bits 0-14 (APIC virt, EPT, desc-table, RDTSCP,
///   x2APIC virt, VPID, WBINVD, UG, APIC-register virt + virtual-interrupt delivery, PLE,
///   RDRAND, INVPCID, VMFUNC (vmfunc bits != 0), VMCS shadowing) | 16 (RDSEED) | 17 (PML)
///   | 18 (#VE) | 20 (XSAVES) | 25 (TSC scaling) = 0x02177fff.
/// * EXIT (0x483) low 0x00036dff; supported = 15, 2, 9 (long mode), 12 (perf global),
///   18,19 (PAT), 20,21 (EFER), 22 (preemption timer) = 0x7c9204; high = 0x7fffff.
///   TRUE_EXIT (0x48f): low 0x00036dfb.
/// * ENTRY (0x484) low 0x000011ff; supported = 2, 10, 11, 9 (long mode), 13, 14, 15 =
///   0xee04; high = 0xffff. TRUE_ENTRY (0x490): low 0x000011fb.
/// * MISC (0x485): rate 0 | 1<<5 (store LMA) | 7<<6 (HLT, shutdown, wait-SIPI) | 4<<16
///   (VMX_CR3_TARGET_MAX_CNT) | 1<<29 (VMCS shadowing) | 1<<30 (ILEN 0) = 0x600401e0.
/// * CR0_FIXED0/1 = 0x80000021 / 0xffffffff; CR4_FIXED0 = 0x2000; CR4_FIXED1 =
///   cr4_suppmask (cpu/crregs.cc get_cr4_allow_mask): VME..OSXMMEXCPT (bits 0-10), VMXE 13,
///   FSGSBASE 16, PCIDE 17, OSXSAVE 18, SMEP 20, SMAP 21 = 0x003727ff.
/// * VMCS_ENUM (0x48a) = VMX_HIGHEST_VMCS_ENCODING 0x34 (not shifted: bits 9:1 read 0x1a).
/// * EPT_VPID_CAP (0x48c, cpu/vmcs.cc init_ept_vpid_capabilities): 0x06114141 | 1<<17 (1G
///   pages) | 1<<21 (A/D) | 0xf01<<32 (VPID) = 0x00000f01_06334141.
/// * VMFUNC (0x491): EPTP switching = 0x1.
/// * PROCBASED_CTLS3 (0x492): unknown to 2.7. With the default `cpu: ignore_bad_msrs=1`
///   (cpu/msr.cc handle_unknown_rdmsr, config.cc default 1) RDMSR of an unknown MSR returns
///   0 without #GP, so it is listed as 0. (With ignore_bad_msrs=0 it faults; the decoding
///   is the same, since "activate tertiary controls", primary bit 17, may not be set.)
///
/// Build assumptions checked against Debian's `/usr/bin/bochs-bin` (2.7, "Built from SVN
/// snapshot on August 1, 2021"): it has the `BX_CPU_C::MONITOR`/`MWAIT` symbols
/// (MONITOR/MWAIT compiled in) and the model's "compile with --enable-vmx=2" warning string
/// is absent (VMX level 2).
pub const BOCHS_27_SKYLAKE_X: Profile = Profile {
    name: "Bochs 2.7 corei7_skylake_x (derived from source)",
    source: "bochs-emu/Bochs REL_2_7_FINAL cpu/vmx.h, cpu/vmcs.cc, cpu/cpudb/intel/corei7_skylake-x.cc",
    vendor: b"GenuineIntel",
    cpuid1_ecx: 0x7ffb_f3bf,
    cr4: 0x0036_06f0,
    msrs: &[
        (0x3a, 0x5),
        (0x480, 0x00d8_1000_0000_002b),
        (0x481, 0x0000_007f_0000_0016),
        (0x482, 0xf7f9_fffe_0401_e172),
        (0x483, 0x007f_ffff_0003_6dff),
        (0x484, 0x0000_ffff_0000_11ff),
        (0x485, 0x6004_01e0),
        (0x486, 0x8000_0021),
        (0x487, 0xffff_ffff),
        (0x488, 0x2000),
        (0x489, 0x0037_27ff),
        (0x48a, 0x34),
        (0x48b, 0x0217_7fff_0000_0000),
        (0x48c, 0x0000_0f01_0633_4141),
        (0x48d, 0x0000_007f_0000_0016),
        (0x48e, 0xf7f9_fffe_0400_6172),
        (0x48f, 0x007f_ffff_0003_6dfb),
        (0x490, 0x0000_ffff_0000_11fb),
        (0x491, 0x1),
        (0x492, 0x0),
    ],
    // Only the bits native_needs reads, from the model's ISA extensions above: RDTSCP
    // (80000001H:EDX[27]), INVPCID (7:EBX[10]), XSAVES (0DH.1:EAX[3]); all else 0.
    cpuid: &[
        (0, 0, [0xd, 0, 0, 0]),
        (7, 0, [0, 1 << 10, 0, 0]),
        (0xd, 1, [1 << 3, 0, 0, 0]),
        (0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        (0x8000_0001, 0, [0, 0, 0, 1 << 27]),
    ],
    summary: "cpu=0 vmx=1 ept=1 ept_xo=1 vpid=1 ug=1 mtf=0 vmfunc_eptp=1 ve=1 fc_locked=1 fc_outside_smx=1",
    pages_1g: true,
    ept_ad: true,
    preemption_timer: true,
    true_ctls: true,
    revision_id: 0x2b,
};

impl Profile {
    /// CPUID as [`Profile::cpuid`] lists it (0 for a leaf not listed).
    pub fn cpuid_leaf(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid.iter().find(|&&(l, s, _)| l == leaf && s == subleaf).map_or([0; 4], |&(_, _, v)| v)
    }
}

/// All profiles the tests check: Bochs' model first (tests that need one profile use it),
/// then the real CPUs.
pub const PROFILES: &[Profile] =
    &[BOCHS_27_SKYLAKE_X, real_cpus::CORE_I7_6700K, real_cpus::CORE_I7_5600U, real_cpus::CORE_I7_3960X];
