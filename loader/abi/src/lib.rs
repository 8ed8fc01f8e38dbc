//! The user <-> kernel ABI of `/dev/kdbt`, declared once.
//!
//! Both the kernel-side Rust (loader/module/rust) and the `kdbt` CLI use these definitions;
//! the C glue never interprets an ioctl argument: it forwards `(cmd, arg)` to Rust, so the
//! structures below are the only declaration of the ABI.
//!
//! Rules: every structure is `#[repr(C)]`, made only of fixed-width integers with explicit
//! padding, starts with its own size so either side can refuse a mismatch, and user
//! pointers travel as `u64`.
#![no_std]
#![forbid(unsafe_code)]

/// Bumped on every incompatible change of an ioctl structure or number.
pub const ABI_VERSION: u32 = 12;

/// Name of the misc device (under /dev).
pub const DEVICE_NAME: &str = "kdbt";
/// Path of the device node that devtmpfs/udev creates.
pub const DEVICE_PATH: &str = "/dev/kdbt";
/// Name of the kernel module.
pub const MODULE_NAME: &str = "kdbt";

/// ioctl "type" byte of kdbt.
pub const IOC_MAGIC: u8 = b'k';

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux `_IOC(dir, type, nr, size)` for x86-64.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | (((size as u32) & ((1 << IOC_SIZEBITS) - 1)) << IOC_SIZESHIFT)
}

/// `_IOR`: the kernel writes the structure.
pub const fn ior(nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, IOC_MAGIC, nr, size)
}

/// `_IOWR`: user passes the structure in, the kernel updates it.
pub const fn iowr(nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, IOC_MAGIC, nr, size)
}

/// Answer of [`IOC_VERSION`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionInfo {
    /// `size_of::<VersionInfo>()` as the kernel knows it.
    pub size: u32,
    /// [`ABI_VERSION`] of the module.
    pub abi_version: u32,
    /// CPUs online when asked.
    pub cpus_online: u32,
    /// `nr_cpu_ids`: CPU numbers range over `0..cpu_ids`.
    pub cpu_ids: u32,
    /// Module version string, NUL-padded (crate version of the kernel-side Rust).
    pub module_version: [u8; 32],
}

/// Argument of [`IOC_CAPS`]: the caller supplies a buffer for `capacity` entries of
/// `entry_size` bytes each (one `vmx::caps::RawCaps` per online CPU); the kernel fills
/// `count` entries and sets `count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapsQuery {
    /// `size_of::<CapsQuery>()`.
    pub size: u32,
    /// Size of one entry as the caller knows it; must equal the kernel's.
    pub entry_size: u32,
    /// User pointer to the entries buffer.
    pub buf: u64,
    /// Entries the buffer can hold.
    pub capacity: u32,
    /// Entries written (out).
    pub count: u32,
}

/// Argument of [`IOC_LOAD`] and [`IOC_UNLOAD`]: on failure the kernel writes the reason
/// (NUL-terminated text) into `message`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    /// `size_of::<Command>()`.
    pub size: u32,
    /// [`IOC_LOAD`]: [`LOAD_SHADOW_PAGING`] or 0 (EPT); other bits are refused. Other
    /// commands: 0.
    pub flags: u32,
    /// Why the command failed (out), NUL-padded.
    pub message: [u8; 480],
}

impl Default for Command {
    fn default() -> Self {
        Command { size: core::mem::size_of::<Command>() as u32, flags: 0, message: [0; 480] }
    }
}

/// [`Command::flags`] of [`IOC_LOAD`]: run the guest on shadow page tables instead of EPT.
pub const LOAD_SHADOW_PAGING: u32 = 1 << 0;

/// [`Command::flags`] of [`IOC_LOAD`], for tests only: with [`LOAD_SHADOW_PAGING`], the
/// shadow MMU ignores the guest's INVLPG of user addresses (the instruction completes, the
/// shadow keeps stale leaves), to show that the mapping stress check catches a missing
/// flush.
pub const LOAD_TEST_IGNORE_USER_INVLPG: u32 = 1 << 31;

/// [`CpuStatus::paging`] values.
pub const PAGING_EPT: u32 = 0;
pub const PAGING_SHADOW: u32 = 1;

/// Shadow-MMU figures of one CPU (all 0 under EPT); see `shadow/README.md`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStatus {
    /// `#PF` exits fixed in the shadow tables, never seen by the guest.
    pub faults_resolved: u64,
    /// `#PF` exits reflected to the guest (its own tables fault).
    pub faults_reflected: u64,
    /// `#PF` exits denied by the page policy.
    pub policy_faults: u64,
    pub cr3_switches: u64,
    pub invlpgs: u64,
    pub invpcids: u64,
    /// The pool ran dry: every other hierarchy dropped.
    pub reclaims: u64,
    /// The pool ran dry with nothing else to drop: the current hierarchy emptied.
    pub pool_resets: u64,
    pub root_evictions: u64,
    pub full_flushes: u64,
    /// Shadow frames holding tables now, and the pool's size.
    pub pages_in_use: u64,
    pub pages_total: u64,
    /// Shadow hierarchies cached now.
    pub roots: u64,
}

/// Number of per-reason exit counters in [`CpuStatus`] (basic exit reasons 0..79; larger
/// reasons are counted in the last slot).
pub const EXIT_REASONS: usize = 80;

/// One CPU's hypervisor state, returned by [`IOC_STATUS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStatus {
    pub cpu: u32,
    /// 1 if the CPU runs in VMX non-root operation under kdbt.
    pub virtualized: u32,
    /// 1 if the CPU is online (an offline CPU is never virtualized).
    pub online: u32,
    /// [`PAGING_EPT`] or [`PAGING_SHADOW`].
    pub paging: u32,
    /// TSC cycles from VMXON to the first guest instruction.
    pub launch_cycles: u64,
    /// All VM exits since launch.
    pub exits_total: u64,
    /// VM exits by basic exit reason.
    pub exits: [u64; EXIT_REASONS],
    pub shadow: ShadowStatus,
}

impl Default for CpuStatus {
    fn default() -> Self {
        CpuStatus {
            cpu: 0,
            virtualized: 0,
            online: 0,
            paging: PAGING_EPT,
            launch_cycles: 0,
            exits_total: 0,
            exits: [0; EXIT_REASONS],
            shadow: ShadowStatus::default(),
        }
    }
}

/// Argument of [`IOC_STATUS`]: like [`CapsQuery`], with `loaded` (out) telling whether the
/// hypervisor is loaded; `count` entries of [`CpuStatus`], one per possible CPU id when loaded (none otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusQuery {
    pub size: u32,
    pub entry_size: u32,
    pub buf: u64,
    pub capacity: u32,
    pub count: u32,
    pub loaded: u32,
    pub _pad: u32,
}

/// Returns [`VersionInfo`].
pub const IOC_VERSION: u32 = ior(0x00, core::mem::size_of::<VersionInfo>());
/// Reads the VT-x capability MSRs on every online CPU; see [`CapsQuery`].
pub const IOC_CAPS: u32 = iowr(0x01, core::mem::size_of::<CapsQuery>());
/// Late-launches the hypervisor on every online CPU; see [`Command`].
pub const IOC_LOAD: u32 = iowr(0x02, core::mem::size_of::<Command>());
/// Devirtualizes every CPU; see [`Command`].
pub const IOC_UNLOAD: u32 = iowr(0x03, core::mem::size_of::<Command>());
/// Per-CPU hypervisor state; see [`StatusQuery`].
pub const IOC_STATUS: u32 = iowr(0x04, core::mem::size_of::<StatusQuery>());
/// Exercises per-4 KB EPT permission changes (with INVEPT on every CPU) on a scratch page;
/// the report (or the failure) comes back in [`Command::message`].
pub const IOC_EPT_CHECK: u32 = iowr(0x05, core::mem::size_of::<Command>());
/// Sends NMIs to every virtualized CPU and checks that the kernel received each, once
/// directly and once held back while its NMI handler ran; the report (per CPU: NMIs
/// received, NMI and NMI-window exits, NMIs injected) comes back in [`Command::message`].
pub const IOC_NMI_CHECK: u32 = iowr(0x06, core::mem::size_of::<Command>());
/// Takes every EPT right from a page kdbt owns and reads it: the kernel must panic with
/// kdbt's diagnostic of the fatal EPT violation. Returns only if that did not happen (the
/// reason in [`Command::message`]). For tests.
pub const IOC_EPT_VIOLATE: u32 = iowr(0x07, core::mem::size_of::<Command>());
/// [`IOC_EPT_VIOLATE`] flag: read the VMCS of the last virtualized CPU instead (hypervisor
/// memory, hidden from the guest): the panic must name it ("vmcs of cpuN").
pub const EPT_VIOLATE_HIDDEN: u32 = 1 << 0;

/// Shadow paging: makes a scratch page not writable (the policy hook) on every CPU in turn
/// and writes it through its direct-map alias on that CPU: each write must trap to kdbt
/// once (the check lifts the policy and the write completes). `Command::flags`
/// [`SHADOW_CHECK_TEST_SKIP_APPLY`] skips applying the policy to the shadow leaves already
/// written (the check must then fail). Report or failure in [`Command::message`].
pub const IOC_SHADOW_CHECK: u32 = iowr(0x08, core::mem::size_of::<Command>());
pub const SHADOW_CHECK_TEST_SKIP_APPLY: u32 = 1 << 0;

/// The kernel DBT's self-test (needs no hypervisor): kernel functions translated into the
/// module's code cache and run from there in the caller's context (and on every online
/// CPU, and in a loop with interrupts on), each result compared with a native call. The
/// report (or the first difference) comes back in [`Command::message`], details in the
/// kernel log.
pub const IOC_DBT_SELFTEST: u32 = iowr(0x10, core::mem::size_of::<Command>());
/// [`Command::flags`] of [`IOC_DBT_SELFTEST`], for tests only: call every function
/// natively where the test means to call its translation (the check that code ran from
/// the cache must then fail).
pub const DBT_SELFTEST_TEST_NATIVE: u32 = 1 << 0;
/// [`Command::flags`] of [`IOC_DBT_SELFTEST`], for tests only: the dispatcher allocates
/// with kmalloc instead of its pool (the check that no kmalloc ran with interrupts off
/// must then fail).
pub const DBT_SELFTEST_NO_POOL: u32 = 1 << 1;
/// [`Command::flags`] of [`IOC_DBT_SELFTEST`], for tests only: the EPT steering check's
/// target keeps its execute right (the check that it was caught by a #VE must then fail).
pub const DBT_SELFTEST_NO_STEER: u32 = 1 << 2;

/// Argument of [`IOC_DBT_START`]: run a module's code from the code cache (see the
/// CLI's `kdbt start`). On failure the reason comes back in `message`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbtStart {
    /// `size_of::<DbtStart>()`.
    pub size: u32,
    /// `DBT_START_*` test flags; other bits are refused.
    pub flags: u32,
    /// `DBT_CLIENT_*`.
    pub client: u32,
    pub _pad: u32,
    /// The module whose text runs translated (NUL-padded name, as in /proc/modules), or
    /// [`KERNEL_SCOPE`] for the kernel's own text (`kdbt start --kernel`).
    pub module: [u8; 64],
    /// With [`KERNEL_SCOPE`]: the kernel's text, `[_stext, _etext)`, and its entry text,
    /// `[__entry_text_start, __entry_text_end)` (a native region: under KPTI it runs on
    /// the user page tables, which do not map the code cache), as `/proc/kallsyms` gives
    /// them; 0 otherwise.
    pub kernel_text: [u64; 2],
    pub entry_text: [u64; 2],
    /// With [`KERNEL_SCOPE`]: the kernel's exception table, `[__start___ex_table,
    /// __stop___ex_table)` (in `/proc/kallsyms` with `CONFIG_KALLSYMS_ALL`), or 0: then a
    /// faulting access with a fixup in translated kernel code oopses.
    pub ex_table: [u64; 2],
    /// Why the command failed (out), NUL-padded.
    pub message: [u8; 480],
}

/// [`DbtStart::module`] naming the kernel's own text.
pub const KERNEL_SCOPE: &str = "vmlinux";

impl Default for DbtStart {
    fn default() -> Self {
        DbtStart {
            size: core::mem::size_of::<DbtStart>() as u32,
            flags: 0,
            client: 0,
            _pad: 0,
            module: [0; 64],
            kernel_text: [0; 2],
            entry_text: [0; 2],
            ex_table: [0; 2],
            message: [0; 480],
        }
    }
}

/// [`DbtStart::client`]: no instrumentation.
pub const DBT_CLIENT_NULL: u32 = 0;
/// [`DbtStart::client`]: count executed instructions per CPU.
pub const DBT_CLIENT_INSCOUNT: u32 = 1;
/// [`DbtStart::client`]: hit count of every executed block (`kdbt cov`).
pub const DBT_CLIENT_BBCOV: u32 = 2;
/// [`DbtStart::flags`], for tests only: the module's text keeps its execute right in EPT,
/// so nothing steers native entries into the cache (the checks that its code ran
/// translated must then fail).
pub const DBT_START_TEST_NO_STEER: u32 = 1 << 0;
/// [`DbtStart::flags`], for tests only: writes to the module's text are still caught and
/// let through, but the translations of the written page are not invalidated (the checks
/// that a patch of the text, e.g. a static key, takes effect while started must then
/// fail).
pub const DBT_START_TEST_NO_INVALIDATE: u32 = 1 << 1;
/// [`DbtStart::flags`], for tests only: fault sites get no slot (copied in line as other
/// instructions: a fault of one while translated then finds no exception-table entry and
/// oopses, which the checks of user-pointer faults in the module must show).
pub const DBT_START_TEST_NO_FAULT_SLOTS: u32 = 1 << 2;
/// [`DbtStart::flags`], for tests only (kernel scope): the entry text runs as booted, its
/// calls into the kernel's text not redirected into the cache, so each one is steered by
/// a #VE (the check that a steady system-call loop is steered 0 times must then fail).
pub const DBT_START_TEST_NO_REDIRECT: u32 = 1 << 3;
/// [`DbtStart::flags`], for tests only: the cache's capacity limit is a few hundred KB
/// (kernel scope; a few KB for a module), far below the working set, so the engine
/// resets its cache again and again (each reset invalidates everything while other CPUs
/// run translated code, whose space comes back at their quiescent points).
pub const DBT_START_TEST_SMALL_CACHE: u32 = 1 << 4;
/// [`DbtStart::flags`], for tests only: an oops in translated code is reported with the
/// code cache's registers, not the native state (the check that an oops report names
/// the native function must then fail).
pub const DBT_START_TEST_NO_OOPS_MAP: u32 = 1 << 5;

/// Argument of [`IOC_DBT_STATS`]: the running translation's figures, and per CPU (like
/// [`CapsQuery`]: a buffer of `capacity` [`DbtCpuStats`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbtStatsQuery {
    pub size: u32,
    pub entry_size: u32,
    pub buf: u64,
    pub capacity: u32,
    pub count: u32,
    /// 1 while started.
    pub active: u32,
    /// `DBT_CLIENT_*`.
    pub client: u32,
    /// The translated module (NUL-padded) and its text.
    pub module: [u8; 64],
    pub text_base: u64,
    pub text_size: u64,
    /// Engine figures (`dbt::Stats`).
    pub blocks: u64,
    pub guest_insns: u64,
    pub dispatches: u64,
    pub links: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub code_bytes: u64,
    pub cache_bytes: u64,
    /// The dispatcher's pool: peak and size in bytes.
    pub pool_peak: u64,
    pub pool_size: u64,
    /// Writes to the translated text caught by EPT (#VE) and let through after the
    /// written page's translations were invalidated.
    pub write_faults: u64,
    /// Written pages made read-only (and not executable) again afterwards.
    pub reprotects: u64,
    /// Text pages writable (and running natively) now, until their re-protection.
    pub writable_pages: u64,
    /// Fault sites: entries of the module's exception table; those translated into a
    /// slot kdbt's own table knows; those copied in line because no slot was left.
    pub fault_table: u64,
    pub fault_slots: u64,
    pub fault_unplaced: u64,
    /// Kernel scope: direct calls and jumps of the entry text into the kernel's text that
    /// enter the cache through trampolines, their distinct targets, and entry pages mapped
    /// back to the kernel's own by a write.
    pub entry_sites: u64,
    pub entry_targets: u64,
    pub entry_reverted: u64,
    /// Blocks invalidated (by writes, resets) and, of those, how many still wait for every
    /// CPU's quiescent point before their space is reused.
    pub invalidated_blocks: u64,
    pub pending_blocks: u64,
    /// Capacity resets of the cache.
    pub resets: u64,
    /// Quiescence passes the reclaim tick ran (a work item on every CPU, while
    /// invalidated blocks waited).
    pub quiesce_passes: u64,
    /// Translations of a fault site that got the slot it was given before (same bytes).
    pub fault_slots_again: u64,
    /// Kernel scope: the native regions, address ranges whose pages keep their execute
    /// right (the entry text's pages, the pages of the thunks), `[start, end)`: how many
    /// there are, and the first [`DBT_NATIVE_REGIONS`].
    pub native_count: u64,
    pub native: [[u64; 2]; DBT_NATIVE_REGIONS],
}

/// Native regions [`DbtStatsQuery`] carries.
pub const DBT_NATIVE_REGIONS: usize = 8;

impl Default for DbtStatsQuery {
    fn default() -> Self {
        DbtStatsQuery {
            size: core::mem::size_of::<DbtStatsQuery>() as u32,
            entry_size: 0,
            buf: 0,
            capacity: 0,
            count: 0,
            active: 0,
            client: 0,
            module: [0; 64],
            text_base: 0,
            text_size: 0,
            blocks: 0,
            guest_insns: 0,
            dispatches: 0,
            links: 0,
            misses: 0,
            invalidations: 0,
            code_bytes: 0,
            cache_bytes: 0,
            pool_peak: 0,
            pool_size: 0,
            write_faults: 0,
            reprotects: 0,
            writable_pages: 0,
            fault_table: 0,
            fault_slots: 0,
            fault_unplaced: 0,
            entry_sites: 0,
            entry_targets: 0,
            entry_reverted: 0,
            invalidated_blocks: 0,
            pending_blocks: 0,
            resets: 0,
            quiesce_passes: 0,
            fault_slots_again: 0,
            native_count: 0,
            native: [[0; 2]; DBT_NATIVE_REGIONS],
        }
    }
}

/// One CPU's figures in [`IOC_DBT_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbtCpuStats {
    pub cpu: u32,
    pub online: u32,
    /// Native entries caught by EPT and steered into the cache (#VE).
    pub steered: u64,
    /// Dispatcher entries.
    pub dispatches: u64,
    /// Instructions executed from the cache (inscount; 0 with other clients).
    pub insns: u64,
    /// The last time this CPU left the cache: why (`dbt::StopKind` as a number: 8 is a
    /// native target) and where.
    pub last_exit_reason: u64,
    pub last_exit_pc: u64,
}

/// Argument of [`IOC_DBT_COV`] (bbcov): `capacity` [`DbtCovEntry`] in `buf`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbtCovQuery {
    pub size: u32,
    pub entry_size: u32,
    pub buf: u64,
    pub capacity: u32,
    pub count: u32,
}

/// One executed block: its native address, how often it ran, and its native bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbtCovEntry {
    pub pc: u64,
    pub hits: u64,
    /// Length of the block's native instructions in bytes.
    pub len: u32,
    pub reserved: u32,
}

/// Starts translating a module's code (needs kdbt loaded with EPT and #VE); see
/// [`DbtStart`].
pub const IOC_DBT_START: u32 = iowr(0x11, core::mem::size_of::<DbtStart>());
/// Stops it: every CPU back to native code, the cache released once nothing can be in
/// it; see [`Command`].
pub const IOC_DBT_STOP: u32 = iowr(0x12, core::mem::size_of::<Command>());
/// The running translation's figures; see [`DbtStatsQuery`].
pub const IOC_DBT_STATS: u32 = iowr(0x13, core::mem::size_of::<DbtStatsQuery>());
/// bbcov's executed blocks; see [`DbtCovQuery`].
pub const IOC_DBT_COV: u32 = iowr(0x14, core::mem::size_of::<DbtCovQuery>());

/// Error numbers the module returns (negated, Linux style); the CLI maps them to messages.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const ENOTTY: i32 = 25;
    pub const EOPNOTSUPP: i32 = 95;
    pub const EALREADY: i32 = 114;
}

/// Copies `s` into a NUL-padded fixed buffer (truncating), for `VersionInfo::module_version`.
pub const fn fixed_str<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < b.len() && i + 1 < N {
        out[i] = b[i];
        i += 1;
    }
    out
}

/// Reads a NUL-padded fixed buffer back as text (up to the first NUL, lossy on bad UTF-8).
pub fn fixed_str_read(buf: &[u8]) -> &str {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    match core::str::from_utf8(&buf[..end]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_encoding() {
        // _IOR('k', 0, 48-byte struct) = 0x8030_6b00 (dir=2, size=48, type='k', nr=0).
        assert_eq!(core::mem::size_of::<VersionInfo>(), 48);
        assert_eq!(IOC_VERSION, 0x8030_6b00);
        // _IOWR('k', 1, 24-byte struct) = 0xc018_6b01.
        assert_eq!(core::mem::size_of::<CapsQuery>(), 24);
        assert_eq!(IOC_CAPS, 0xc018_6b01);
        assert_eq!(core::mem::size_of::<Command>(), 488);
        assert_eq!(core::mem::size_of::<ShadowStatus>(), 13 * 8);
        assert_eq!(core::mem::size_of::<CpuStatus>(), 32 + 8 * EXIT_REASONS + 13 * 8);
        assert_eq!(core::mem::size_of::<StatusQuery>(), 32);
        assert_eq!(IOC_LOAD, 0xc000_6b02 | (488 << 16));
        assert_ne!(IOC_LOAD, IOC_UNLOAD);
        assert_eq!(core::mem::size_of::<DbtStart>(), 16 + 64 + 48 + 480);
        assert_eq!(core::mem::size_of::<DbtStatsQuery>(), 32 + 64 + 27 * 8 + DBT_NATIVE_REGIONS * 16);
        assert_eq!(core::mem::size_of::<DbtCpuStats>(), 48);
        assert_eq!(core::mem::size_of::<DbtCovQuery>(), 24);
        assert_eq!(core::mem::size_of::<DbtCovEntry>(), 24);
    }

    #[test]
    fn fixed_strings_round_trip_and_truncate() {
        let b: [u8; 8] = fixed_str("0.1.0");
        assert_eq!(fixed_str_read(&b), "0.1.0");
        let t: [u8; 4] = fixed_str("abcdef");
        assert_eq!(fixed_str_read(&t), "abc");
        assert_eq!(fixed_str_read(&[0xff, b'a', 0]), "");
        assert_eq!(fixed_str_read(&[b'o', b'k', 0xff]), "ok");
    }
}
