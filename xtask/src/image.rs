//! Guest artifacts: kdbt.ko for one kernel, the static kdbt CLI and guest tools, the
//! initramfs (busybox + /init + suite) and the isolinux boot ISO.

use crate::kernel::Kernel;
use crate::util::{note, run, run_logged, step, workspace_root, Timer};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const MUSL: &str = "x86_64-unknown-linux-musl";
pub const GUEST_PKG: &str = "kdbt-guest";
pub const CLI_PKG: &str = "kdbt-cli";

/// Whether a file in loader/module is a build product (not copied to the shadow dir).
fn is_build_product(name: &str) -> bool {
    name.starts_with('.')
        || [".o", ".ko", ".mod", ".mod.c", ".o_shipped", ".symvers", ".order", ".tmp", ".d"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Builds loader/module against `k.kdir` and copies kdbt.ko to `out`.
///
/// The build runs in a shadow copy of loader/module inside the run directory (sources
/// copied, subdirectories such as `rust/` symlinked), so `make clean`/`make` here never
/// collide with someone building in loader/module at the same time. The Rust staticlib
/// still goes to the workspace's `target/kmod/<release>` (cargo locks it).
pub fn build_module(k: &Kernel, run_dir: &Path, out: &Path, log: &Path) -> Result<()> {
    let t = Timer::start();
    let mdir = workspace_root().join("loader/module");
    if !mdir.join("Makefile").is_file() {
        bail!("{} has no Makefile: the kernel module is not there yet", mdir.display());
    }
    step(format!("building kdbt.ko for {} ({})", k.release, k.kdir.display()));
    note(format!("log: {}", log.display()));
    let shadow = run_dir.join("module");
    let _ = std::fs::remove_dir_all(&shadow);
    std::fs::create_dir_all(&shadow)?;
    for e in std::fs::read_dir(&mdir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type()?;
        if ft.is_dir() {
            std::os::unix::fs::symlink(e.path(), shadow.join(&name))?;
        } else if ft.is_file() && !is_build_product(&name) {
            std::fs::copy(e.path(), shadow.join(&name))?;
        }
    }
    let kdir = format!("KDIR={}", k.kdir.display());
    let rust_dir = format!("RUST_TARGET_DIR={}", workspace_root().join("target/kmod").join(&k.release).display());
    run_logged(Command::new("make").arg("-C").arg(&shadow).arg(&kdir).arg(&rust_dir), log)
        .context("building kdbt.ko failed")?;
    let ko = shadow.join("kdbt.ko");
    std::fs::copy(&ko, out).with_context(|| format!("no {} after make", ko.display()))?;
    build_testmod(k, run_dir, &testmod_path(out), log)?;
    note(format!("kdbt.ko and {TESTMOD}.ko built in {:.0} s", t.secs()));
    Ok(())
}

/// The module the kernel DBT's suites translate (experiments/guest/kmod).
pub const TESTMOD: &str = "kdbt_testmod";

/// Where [`build_module`] puts the test module: beside kdbt.ko.
pub fn testmod_path(ko: &Path) -> PathBuf {
    ko.with_file_name(format!("{TESTMOD}.ko"))
}

/// Builds experiments/guest/kmod (a plain C module) against `k.kdir` in a copy under
/// the run directory.
fn build_testmod(k: &Kernel, run_dir: &Path, out: &Path, log: &Path) -> Result<()> {
    let src = workspace_root().join("experiments/guest/kmod");
    let dir = run_dir.join("testmod");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for f in ["Kbuild", "kdbt_testmod.c"] {
        std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copy {}", src.join(f).display()))?;
    }
    run_logged(Command::new("make").arg("-C").arg(&k.kdir).arg(format!("M={}", dir.display())).arg("modules"), log)
        .with_context(|| format!("building {TESTMOD}.ko failed"))?;
    let ko = dir.join(format!("{TESTMOD}.ko"));
    std::fs::copy(&ko, out).with_context(|| format!("no {} after make", ko.display()))?;
    Ok(())
}

/// Builds the static guest binaries (kdbt CLI + every bin of kdbt-guest) and returns
/// their paths.
pub fn build_guest_bins(log: &Path) -> Result<Vec<PathBuf>> {
    step(format!("building static guest programs ({CLI_PKG}, {GUEST_PKG}) for {MUSL}"));
    let root = workspace_root();
    let out = Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "--target", MUSL, "--message-format=json-render-diagnostics"])
        .args(["-p", CLI_PKG, "-p", GUEST_PKG, "--bins"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    let _ = std::fs::write(log, &out.stdout);
    if !out.status.success() {
        bail!("cargo build of the guest programs failed (see above)");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let Some(exe) = v["executable"].as_str() {
            bins.push(PathBuf::from(exe));
        }
    }
    if !bins.iter().any(|b| b.file_name().map(|n| n == "kdbt").unwrap_or(false)) {
        bail!("cargo built no `kdbt` binary for {MUSL}");
    }
    note(format!(
        "guest programs: {}",
        bins.iter()
            .filter_map(|b| b.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    Ok(bins)
}

/// Everything /init needs to know.
pub struct InitrdSpec<'a> {
    pub suite: &'a str,
    pub ko: &'a Path,
    pub bins: &'a [PathBuf],
    /// Copied over the guest's root last (`cargo xtask vm --extra-root`).
    pub extra_root: Option<&'a Path>,
}

fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = PathBuf::from(p);
        if p.is_file() {
            // busybox-static is statically linked; a dynamic busybox would not run.
            let file = Command::new("file").arg("-L").arg(&p).output();
            if let Ok(o) = file {
                if String::from_utf8_lossy(&o.stdout).contains("dynamically linked") {
                    bail!("{} is dynamically linked: install busybox-static", p.display());
                }
            }
            return Ok(p);
        }
    }
    bail!("no busybox binary: install busybox-static")
}

/// (/init text, /suite.sh wrapper text, [(suite name, suite text)]).
pub type InitScripts = (String, String, Vec<(String, String)>);

/// The /init script (experiments/vm/init.sh) and the suite scripts, checked to exist.
pub fn init_script(suite: &str) -> Result<InitScripts> {
    let vm = workspace_root().join("experiments/vm");
    let init = std::fs::read_to_string(vm.join("init.sh")).context("cannot read experiments/vm/init.sh")?;
    // Several suites (`smoke,hypervisor`) run one after the other in one boot, each in its
    // own subshell; their plans add up.
    let mut bodies = Vec::new();
    let mut wrapper = String::from("# generated by cargo xtask: the suites of this boot\n");
    for name in suite.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let suite_path = vm.join("suites").join(format!("{name}.sh"));
        let body = std::fs::read_to_string(&suite_path).with_context(|| {
            let mut known: Vec<String> = std::fs::read_dir(vm.join("suites"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".sh").map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            known.sort();
            format!("no suite `{name}` ({}); known suites: {}", suite_path.display(), known.join(", "))
        })?;
        // Each suite's dmesg_clean looks only at what happened since that suite began.
        wrapper.push_str(&format!("( dmesg_mark; . /suites/{name}.sh )\n"));
        bodies.push((name.to_string(), body));
    }
    if bodies.is_empty() {
        bail!("no suite named in `{suite}`");
    }
    Ok((init, wrapper, bodies))
}

/// Checks /init and the suites with `sh -n` (busybox sh if present, as in the guest) so a
/// syntax error fails before any long step.
pub fn syntax_check(scripts: &InitScripts) -> Result<()> {
    let (init, wrapper, bodies) = scripts;
    let mut all = vec![("init.sh".to_string(), init.clone()), ("suite wrapper".to_string(), wrapper.clone())];
    all.extend(bodies.iter().map(|(n, b)| (format!("suites/{n}.sh"), b.clone())));
    let shell: Vec<&str> = if Path::new("/bin/busybox").is_file() { vec!["/bin/busybox", "sh"] } else { vec!["sh"] };
    for (name, text) in all {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kdbt-xtask-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("script.sh");
        std::fs::write(&f, &text)?;
        let out = Command::new(shell[0]).args(&shell[1..]).arg("-n").arg(&f).output();
        let _ = std::fs::remove_dir_all(&dir);
        let out = out.context("cannot run sh -n")?;
        if !out.status.success() {
            bail!("{name} has a shell syntax error: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Builds `initrd.gz` (newc cpio, gzip) in `run_dir`.
pub fn build_initramfs(spec: &InitrdSpec, run_dir: &Path) -> Result<PathBuf> {
    step("building the initramfs");
    let root = run_dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root", "lib/modules", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let bb = busybox()?;
    std::fs::copy(&bb, root.join("bin/busybox"))?;
    let applets = Command::new(&bb).arg("--list-full").output().context("busybox --list-full")?;
    for a in String::from_utf8_lossy(&applets.stdout).lines() {
        let a = a.trim();
        if a.is_empty() || a == "bin/busybox" || a.contains("..") {
            continue;
        }
        let link = root.join(a);
        if link.exists() {
            continue;
        }
        let depth = a.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(&target, &link)?;
    }
    for b in spec.bins {
        let name = b.file_name().context("binary without a name")?;
        let dst = root.join("usr/bin").join(name);
        let _ = std::fs::remove_file(&dst);
        std::fs::copy(b, &dst).with_context(|| format!("copy {}", b.display()))?;
        // Release builds carry debug info; the guest does not need it, and a smaller
        // initramfs unpacks faster in Bochs.
        run(Command::new("strip").arg("--strip-debug").arg(&dst))?;
    }
    std::fs::copy(spec.ko, root.join("lib/modules/kdbt.ko"))?;
    let tm = testmod_path(spec.ko);
    std::fs::copy(&tm, root.join(format!("lib/modules/{TESTMOD}.ko")))
        .with_context(|| format!("copy {}", tm.display()))?;
    let (init_text, suite_text, bodies) = init_script(spec.suite)?;
    let init = root.join("init");
    std::fs::write(&init, init_text)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join("suite.sh"), suite_text)?;
    std::fs::create_dir_all(root.join("suites"))?;
    for (name, body) in &bodies {
        std::fs::write(root.join("suites").join(format!("{name}.sh")), body)?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    if let Some(extra) = spec.extra_root {
        if !extra.is_dir() {
            bail!("--extra-root {}: not a directory", extra.display());
        }
        note(format!("copying {} into the guest's root", extra.display()));
        run(Command::new("cp").arg("-a").arg(extra.join(".")).arg(&root))
            .with_context(|| format!("copying {} into the initramfs", extra.display()))?;
    }

    let out = run_dir.join("initrd.gz");
    let cmd = format!(
        "cd '{}' && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet | gzip -6 > '{}'",
        root.display(),
        out.display()
    );
    run(Command::new("sh").arg("-c").arg(cmd)).context("building the initramfs cpio")?;
    let sz = std::fs::metadata(&out)?.len();
    note(format!("{} ({} KiB)", out.display(), sz / 1024));
    Ok(out)
}

/// Builds `boot.iso` (isolinux) in `run_dir`.
pub fn build_iso(vmlinuz: &Path, initrd: &Path, cmdline: &str, run_dir: &Path) -> Result<PathBuf> {
    step("building the boot ISO");
    let iso_root = run_dir.join("iso");
    let _ = std::fs::remove_dir_all(&iso_root);
    std::fs::create_dir_all(iso_root.join("isolinux"))?;
    std::fs::create_dir_all(iso_root.join("boot"))?;
    let find = |cands: &[&str]| cands.iter().map(PathBuf::from).find(|p| p.is_file());
    let isolinux = find(&["/usr/lib/ISOLINUX/isolinux.bin", "/usr/lib/syslinux/isolinux.bin"])
        .context("no isolinux.bin: install isolinux")?;
    let ldlinux = find(&["/usr/lib/syslinux/modules/bios/ldlinux.c32", "/usr/lib/syslinux/ldlinux.c32"])
        .context("no ldlinux.c32: install syslinux-common")?;
    std::fs::copy(&isolinux, iso_root.join("isolinux/isolinux.bin"))?;
    std::fs::copy(&ldlinux, iso_root.join("isolinux/ldlinux.c32"))?;
    std::fs::copy(vmlinuz, iso_root.join("boot/vmlinuz"))
        .with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    std::fs::copy(initrd, iso_root.join("boot/initrd.gz"))?;
    std::fs::write(
        iso_root.join("isolinux/isolinux.cfg"),
        format!(
            "DEFAULT kdbt\nPROMPT 0\nTIMEOUT 0\nLABEL kdbt\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.gz\n  APPEND {cmdline}\n"
        ),
    )?;
    let iso = run_dir.join("boot.iso");
    let log = run_dir.join("xorriso.log");
    let _ = std::fs::remove_file(&log);
    run_logged(
        Command::new("xorriso")
            .args(["-as", "mkisofs", "-o"])
            .arg(&iso)
            .args([
                "-b",
                "isolinux/isolinux.bin",
                "-c",
                "isolinux/boot.cat",
                "-no-emul-boot",
                "-boot-load-size",
                "4",
                "-boot-info-table",
                "-R",
                "-J",
            ])
            .arg(&iso_root),
        &log,
    )
    .context("xorriso failed")?;
    let _ = std::fs::remove_dir_all(&iso_root);
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_products_are_not_copied() {
        for f in [
            "kdbt.o",
            "kdbt.ko",
            "kdbt.mod",
            "kdbt.mod.c",
            "kdbt_rust.o_shipped",
            ".kdbt.o.cmd",
            "Module.symvers",
            "modules.order",
        ] {
            assert!(is_build_product(f), "{f}");
        }
        for f in ["Makefile", "Kbuild", "kdbt_glue.c", "kdbt_glue.h"] {
            assert!(!is_build_product(f), "{f}");
        }
    }

    #[test]
    fn repo_scripts_parse_and_unknown_suites_are_named() {
        let s = init_script("smoke").unwrap();
        assert!(s.1.contains("/suites/smoke.sh"));
        syntax_check(&s).unwrap();
        let all = init_script("smoke,hypervisor,demo").unwrap();
        assert_eq!(all.2.len(), 3);
        syntax_check(&all).unwrap();
        let e = format!("{:#}", init_script("nope").unwrap_err());
        assert!(e.contains("no suite `nope`") && e.contains("smoke"), "{e}");
        let bad = (s.0.clone(), s.1.clone(), vec![("bad".to_string(), "if then fi (".to_string())]);
        assert!(syntax_check(&bad).is_err());
    }
}
