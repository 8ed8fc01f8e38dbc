//! `/dev/kdbt`: open it and issue the ioctls of `kdbt_abi`.
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use kdbt_abi::{
    CapsQuery, Command, CpuStatus, StatusQuery, VersionInfo, DEVICE_PATH, IOC_CAPS, IOC_EPT_CHECK, IOC_EPT_VIOLATE,
    IOC_LOAD, IOC_NMI_CHECK, IOC_STATUS, IOC_UNLOAD, IOC_VERSION,
};
use vmx::caps::RawCaps;

pub struct Device {
    file: File,
}

impl Device {
    /// Opens `/dev/kdbt`, explaining the usual reasons it cannot be opened.
    pub fn open() -> Result<Self> {
        match OpenOptions::new().read(true).write(true).open(DEVICE_PATH) {
            Ok(file) => Ok(Device { file }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{DEVICE_PATH} does not exist: the kdbt module is not loaded \
                 (insmod kdbt.ko, or `kdbt load`)"
            ),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                bail!("cannot open {DEVICE_PATH}: permission denied (kdbt needs root)")
            }
            Err(e) => Err(e).with_context(|| format!("cannot open {DEVICE_PATH}")),
        }
    }

    /// Issues ioctl `cmd` with a pointer to `arg`.
    fn ioctl<T>(&self, cmd: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is a valid, exclusively borrowed #[repr(C)] structure whose size is
        // encoded in `cmd` (kdbt_abi computes cmd from size_of::<T>()); the kernel reads
        // and writes at most that many bytes through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as _, arg as *mut T) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn version(&self) -> Result<VersionInfo> {
        let mut v = VersionInfo::default();
        self.ioctl(IOC_VERSION, &mut v).context("KDBT_IOC_VERSION failed")?;
        if v.abi_version != kdbt_abi::ABI_VERSION {
            bail!(
                "the loaded kdbt module speaks ABI {} but this kdbt CLI speaks ABI {}: \
                 use the CLI built with the module",
                v.abi_version,
                kdbt_abi::ABI_VERSION
            );
        }
        Ok(v)
    }

    /// Issues an ioctl that fills a buffer with one entry per CPU, growing the buffer and
    /// retrying when more CPUs came online between sizing it and the call.
    fn list<Q: ListQuery, E: Default + Clone>(&self, cmd: u32, name: &str) -> Result<(Q, Vec<E>)> {
        let mut capacity = self.version()?.cpu_ids.max(1);
        loop {
            let mut buf = vec![E::default(); capacity as usize];
            let mut q = Q::new(size_of::<E>() as u32, buf.as_mut_ptr() as u64, capacity);
            match self.ioctl(cmd, &mut q) {
                Ok(()) => {
                    buf.truncate(q.count().min(capacity) as usize);
                    return Ok((q, buf));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && q.count() > capacity => {
                    capacity = q.count();
                }
                Err(e) => return Err(e).with_context(|| format!("{name} failed")),
            }
        }
    }

    /// Raw VT-x capability MSRs of every online CPU, in CPU order.
    pub fn caps(&self) -> Result<Vec<RawCaps>> {
        Ok(self.list::<CapsQuery, RawCaps>(IOC_CAPS, "KDBT_IOC_CAPS")?.1)
    }
}

/// The per-CPU list queries of `kdbt_abi` share this header.
trait ListQuery {
    fn new(entry_size: u32, buf: u64, capacity: u32) -> Self;
    fn count(&self) -> u32;
}

impl ListQuery for CapsQuery {
    fn new(entry_size: u32, buf: u64, capacity: u32) -> Self {
        CapsQuery { size: size_of::<Self>() as u32, entry_size, buf, capacity, count: 0 }
    }
    fn count(&self) -> u32 {
        self.count
    }
}

impl ListQuery for StatusQuery {
    fn new(entry_size: u32, buf: u64, capacity: u32) -> Self {
        StatusQuery { size: size_of::<Self>() as u32, entry_size, buf, capacity, ..Default::default() }
    }
    fn count(&self) -> u32 {
        self.count
    }
}

impl ListQuery for kdbt_abi::DbtStatsQuery {
    fn new(entry_size: u32, buf: u64, capacity: u32) -> Self {
        kdbt_abi::DbtStatsQuery { entry_size, buf, capacity, ..Default::default() }
    }
    fn count(&self) -> u32 {
        self.count
    }
}

/// Outcome of a load/unload ioctl that the caller may want to treat specially.
pub enum CommandError {
    /// Already loaded (load) / not loaded (unload).
    WrongState,
    /// The module refused or failed, with its reason.
    Failed(String),
}

impl Device {
    fn command(&self, cmd: u32, flags: u32) -> Result<std::result::Result<(), CommandError>> {
        let mut c = Command { flags, ..Command::default() };
        match self.ioctl(cmd, &mut c) {
            Ok(()) => Ok(Ok(())),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EALREADY) | Some(libc::ENOENT)) => {
                Ok(Err(CommandError::WrongState))
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                Ok(Err(CommandError::Failed(kdbt_abi::fixed_str_read(&c.message).to_string())))
            }
            Err(e) => Err(e).context("ioctl on /dev/kdbt failed"),
        }
    }

    /// Launches the hypervisor on every online CPU (`flags`: `kdbt_abi::LOAD_*`).
    pub fn load(&self, flags: u32) -> Result<std::result::Result<(), CommandError>> {
        self.command(IOC_LOAD, flags)
    }

    /// Devirtualizes every CPU.
    pub fn unload(&self) -> Result<std::result::Result<(), CommandError>> {
        self.command(IOC_UNLOAD, 0)
    }

    /// Runs the module's EPT permission check; its report.
    pub fn ept_check(&self) -> Result<String> {
        self.check(IOC_EPT_CHECK, "EPT check", "KDBT_IOC_EPT_CHECK")
    }

    /// Makes a fatal EPT violation on purpose: returns only if the kernel did not panic
    /// (`flags`: `kdbt_abi::EPT_VIOLATE_*`).
    pub fn ept_violate(&self, flags: u32) -> Result<String> {
        self.check_flags(IOC_EPT_VIOLATE, "EPT violation check", "KDBT_IOC_EPT_VIOLATE", flags)
    }

    /// Runs the module's NMI delivery check; its report.
    pub fn nmi_check(&self) -> Result<String> {
        self.check(IOC_NMI_CHECK, "NMI check", "KDBT_IOC_NMI_CHECK")
    }

    /// Runs the module's shadow-paging policy check (`flags`: `kdbt_abi::SHADOW_CHECK_*`).
    pub fn shadow_check(&self, flags: u32) -> Result<String> {
        self.check_flags(kdbt_abi::IOC_SHADOW_CHECK, "shadow policy check", "KDBT_IOC_SHADOW_CHECK", flags)
    }

    /// Runs the kernel DBT's self-test (no hypervisor needed); its report.
    pub fn dbt_selftest(&self, flags: u32) -> Result<String> {
        self.check_flags(kdbt_abi::IOC_DBT_SELFTEST, "DBT self-test", "KDBT_IOC_DBT_SELFTEST", flags)
    }

    fn check(&self, ioc: u32, what: &str, ioc_name: &str) -> Result<String> {
        self.check_flags(ioc, what, ioc_name, 0)
    }

    fn check_flags(&self, ioc: u32, what: &str, ioc_name: &str, flags: u32) -> Result<String> {
        let mut c = Command { flags, ..Command::default() };
        let r = self.ioctl(ioc, &mut c);
        let text = kdbt_abi::fixed_str_read(&c.message).to_string();
        match r {
            Ok(()) => Ok(text),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => bail!("kdbt is not loaded"),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => bail!("{what} failed: {text}"),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                bail!("{what}: the inserted module does not know it (older kdbt.ko?)")
            }
            Err(e) => Err(e).with_context(|| format!("{ioc_name} failed")),
        }
    }

    /// `kdbt start`: Err(reason) if the module refused.
    /// `kernel`: the kernel's text, entry text and exception table (with
    /// [`kdbt_abi::KERNEL_SCOPE`]).
    pub fn dbt_start(
        &self,
        module: &str,
        client: u32,
        flags: u32,
        kernel: Option<KernelRanges>,
    ) -> Result<std::result::Result<(), String>> {
        let mut c = kdbt_abi::DbtStart { client, flags, ..Default::default() };
        if let Some(k) = kernel {
            (c.kernel_text, c.entry_text, c.ex_table) = (k.text, k.entry, k.ex_table);
        }
        if module.len() >= c.module.len() {
            bail!("module name {module:?} is longer than {} bytes", c.module.len() - 1);
        }
        c.module[..module.len()].copy_from_slice(module.as_bytes());
        match self.ioctl(kdbt_abi::IOC_DBT_START, &mut c) {
            Ok(()) => Ok(Ok(())),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Err(kdbt_abi::fixed_str_read(&c.message).to_string())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                bail!("the inserted module does not know `start` (older kdbt.ko?)")
            }
            Err(e) => Err(e).context("KDBT_IOC_DBT_START failed"),
        }
    }

    /// `kdbt stop`: its report.
    pub fn dbt_stop(&self) -> Result<String> {
        self.check(kdbt_abi::IOC_DBT_STOP, "stop", "KDBT_IOC_DBT_STOP")
    }

    /// The running translation's figures and its per-CPU ones.
    pub fn dbt_stats(&self) -> Result<(kdbt_abi::DbtStatsQuery, Vec<kdbt_abi::DbtCpuStats>)> {
        self.list::<kdbt_abi::DbtStatsQuery, kdbt_abi::DbtCpuStats>(kdbt_abi::IOC_DBT_STATS, "KDBT_IOC_DBT_STATS")
    }

    /// bbcov's executed blocks (pc, hits).
    pub fn dbt_cov(&self) -> Result<Vec<kdbt_abi::DbtCovEntry>> {
        let mut capacity = 4096u32;
        loop {
            let mut buf = vec![kdbt_abi::DbtCovEntry::default(); capacity as usize];
            let mut q = kdbt_abi::DbtCovQuery {
                size: size_of::<kdbt_abi::DbtCovQuery>() as u32,
                entry_size: size_of::<kdbt_abi::DbtCovEntry>() as u32,
                buf: buf.as_mut_ptr() as u64,
                capacity,
                count: 0,
            };
            match self.ioctl(kdbt_abi::IOC_DBT_COV, &mut q) {
                Ok(()) => {
                    buf.truncate(q.count.min(capacity) as usize);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && q.count > capacity => capacity = q.count + 1024,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    bail!("no coverage: not started, or started without --client bbcov")
                }
                Err(e) => return Err(e).context("KDBT_IOC_DBT_COV failed"),
            }
        }
    }

    /// Whether the hypervisor is loaded, and each virtualized CPU's state.
    pub fn status(&self) -> Result<(bool, Vec<CpuStatus>)> {
        let (q, cpus) = self.list::<StatusQuery, CpuStatus>(IOC_STATUS, "KDBT_IOC_STATUS")?;
        Ok((q.loaded != 0, cpus))
    }
}

/// What `kdbt start --kernel` tells the module about the kernel (from /proc/kallsyms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRanges {
    pub text: [u64; 2],
    pub entry: [u64; 2],
    /// 0s: not in /proc/kallsyms.
    pub ex_table: [u64; 2],
}
