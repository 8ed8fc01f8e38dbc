//! `/dev/kdbt`: open it and issue the ioctls of `kdbt_abi`.
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use kdbt_abi::{CapsQuery, VersionInfo, DEVICE_PATH, IOC_CAPS, IOC_VERSION};
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

    /// Raw VT-x capability MSRs of every online CPU, in CPU order.
    pub fn caps(&self) -> Result<Vec<RawCaps>> {
        let mut capacity = self.version()?.cpu_ids.max(1);
        loop {
            let mut buf = vec![RawCaps::default(); capacity as usize];
            let mut q = CapsQuery {
                size: size_of::<CapsQuery>() as u32,
                entry_size: size_of::<RawCaps>() as u32,
                buf: buf.as_mut_ptr() as u64,
                capacity,
                count: 0,
            };
            match self.ioctl(IOC_CAPS, &mut q) {
                Ok(()) => {
                    buf.truncate(q.count.min(capacity) as usize);
                    return Ok(buf);
                }
                // More CPUs came online between the two calls: grow and retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && q.count > capacity => {
                    capacity = q.count;
                }
                Err(e) => return Err(e).context("KDBT_IOC_CAPS failed"),
            }
        }
    }
}
