//! Debian packages the bench needs: checked with dpkg-query, installed with apt-get when
//! missing, and whatever could not be had is named plainly.

use crate::util::{note, step};
use anyhow::{bail, Result};
use std::process::{Command, Stdio};

/// Always needed: initramfs and ISO tooling, and gcc/make/binutils for kdbt.ko.
pub const BASE: &[&str] =
    &["busybox-static", "cpio", "gzip", "xorriso", "isolinux", "syslinux-common", "build-essential"];
/// Decompressors for the payload of a Debian vmlinuz (`cargo xtask vmlinux-corpus`, and its unit test).
pub const VMLINUZ: &[&str] = &["xz-utils", "zstd"];
/// Bochs with VT-x emulation and its ROMs and text display.
pub const BOCHS: &[&str] = &["bochs", "bochsbios", "vgabios", "bochs-term"];
/// QEMU for TCG runs.
pub const QEMU: &[&str] = &["qemu-system-x86"];
/// The DBT benchmark's comparison columns: `valgrind --tool=none` and `qemu-x86_64`.
pub const DBT_BENCH: &[&str] = &["valgrind", "qemu-user"];
/// The small kernel: Debian's source and what `make bzImage` needs.
pub const SMALL_KERNEL: &[&str] =
    &["linux-source-6.12", "build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "lz4", "xz-utils"];

/// True if dpkg says `pkg` is installed.
pub fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// An apt-get command, through `sudo -n` when not root.
fn apt_get() -> Command {
    if is_root() {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        c
    }
}

fn apt_install(pkgs: &[String]) -> bool {
    let mut c = apt_get();
    c.args(["install", "-y", "--no-install-recommends"]).args(pkgs);
    c.status().map(|s| s.success()).unwrap_or(false)
}

/// Runs `apt-get update` (used only after a lookup or install failed).
pub fn apt_update() -> bool {
    step("apt-get update");
    let mut c = apt_get();
    c.arg("update");
    c.status().map(|s| s.success()).unwrap_or(false)
}

/// Makes sure every package in `pkgs` is installed; installs the missing ones (one
/// `apt-get update` retry), and fails naming exactly what could not be installed.
pub fn ensure(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<String> = pkgs.iter().filter(|p| !installed(p)).map(|p| p.to_string()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(format!("installing missing Debian packages: {}", missing.join(" ")));
    if !apt_install(&missing) {
        apt_update();
        // Install one by one so one unavailable package does not block the others.
        for p in &missing {
            if !installed(p) && !apt_install(std::slice::from_ref(p)) {
                note(format!("apt-get could not install {p}"));
            }
        }
    }
    let still: Vec<&String> = missing.iter().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        let names: Vec<&str> = still.iter().map(|s| s.as_str()).collect();
        bail!(
            "could not install these Debian packages: {} (install them by hand: \
             sudo apt-get install {})",
            names.join(", "),
            names.join(" ")
        );
    }
    Ok(())
}

/// Names of packages apt knows that start with `prefix` (local apt cache query).
pub fn apt_names(prefix: &str) -> Vec<String> {
    Command::new("apt-cache")
        .args(["pkgnames", prefix])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
        })
        .unwrap_or_default()
}

/// True if apt has a candidate version for `pkg`.
pub fn apt_knows(pkg: &str) -> bool {
    Command::new("apt-cache")
        .args(["policy", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines().any(|l| l.trim_start().starts_with("Candidate:") && !l.contains("(none)"))
        })
        .unwrap_or(false)
}
