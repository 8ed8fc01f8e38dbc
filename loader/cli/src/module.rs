//! Inserting and removing the kdbt kernel module (finit_module / delete_module).
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kdbt_abi::MODULE_NAME;

/// Whether the module is inserted.
pub fn is_inserted() -> bool {
    Path::new("/sys/module").join(MODULE_NAME).exists()
}

/// Where to find kdbt.ko when the user names none: `$KDBT_MODULE`, beside this binary,
/// then the kernel's module tree (`make modules_install` puts out-of-tree modules under
/// `updates/` or `extra/`).
pub fn default_path() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("KDBT_MODULE") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("kdbt.ko"));
        }
    }
    if let Ok(rel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        let base = PathBuf::from("/lib/modules").join(rel.trim());
        for sub in ["updates", "extra", "updates/dkms"] {
            candidates.push(base.join(sub).join("kdbt.ko"));
        }
    }
    candidates.push(PathBuf::from("/kdbt.ko"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Inserts the module at `path` with `params` ("name=value ..."), like insmod.
pub fn insert(path: &Path, params: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let params = CString::new(params).context("module parameters contain a NUL byte")?;
    // SAFETY: finit_module with a valid open file descriptor, a NUL-terminated parameter
    // string that outlives the call, and flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => bail!("the kdbt module is already inserted"),
            Some(libc::ENOEXEC) => {
                bail!("{}: invalid module format (built for another kernel? `dmesg` says why)", path.display())
            }
            Some(libc::EPERM) => bail!("inserting a module needs root (CAP_SYS_MODULE)"),
            _ => return Err(e).with_context(|| format!("cannot insert {}", path.display())),
        }
    }
    Ok(())
}

/// Removes the module, like rmmod.
pub fn remove() -> Result<()> {
    let name = CString::new(MODULE_NAME).expect("module name has no NUL");
    // SAFETY: delete_module with a NUL-terminated name and O_NONBLOCK.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("the kdbt module is in use (is /dev/kdbt open elsewhere?)");
        }
        return Err(e).context("cannot remove the kdbt module");
    }
    Ok(())
}
