//! Guest kernels: the cached `small` build from Debian's linux-source-6.12, stock Debian
//! images (downloaded with `apt-get download`, never installed into the host's /boot),
//! or a vmlinuz given by path. Each comes with the kernel build/headers directory the
//! module is built against.

use crate::deps;
use crate::util::{cache_root, fnv1a64, note, output, run, run_logged, step, workspace_root, Timer};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's kernel source tarball for the small kernel.
pub const SMALL_SOURCE: &str = "/usr/src/linux-source-6.12.tar.xz";
pub const SMALL_SOURCE_PKG: &str = "linux-source-6.12";
/// Bump when the small kernel's build steps change, so older cached builds are not used.
const SMALL_RECIPE: &str = "tinyconfig+fragment;bzImage+modules+modules_prepare;gcc";

/// A guest kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What the user asked for, for tables (`small`, `debian-6.12`, a package name, ...).
    pub label: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// The build or headers directory external modules are built against.
    pub kdir: PathBuf,
    /// `include/config/kernel.release` of `kdir`.
    pub release: String,
}

/// What `--kernel` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Small,
    /// `debian-6.12`, `debian-6.1`: the newest such image apt knows.
    DebianSeries(String),
    /// A Debian image package name (`linux-image-6.1.0-56-amd64`).
    Package(String),
    /// A vmlinuz file.
    Path(PathBuf),
}

pub fn parse_spec(s: &str) -> Result<Spec> {
    let s = s.trim();
    if s == "small" {
        return Ok(Spec::Small);
    }
    if let Some(series) = s.strip_prefix("debian-") {
        if series.split('.').count() == 2 && series.split('.').all(|p| p.parse::<u32>().is_ok()) {
            return Ok(Spec::DebianSeries(series.to_string()));
        }
        bail!("--kernel {s}: expected debian-<major>.<minor>, e.g. debian-6.12");
    }
    if s.starts_with("linux-image-") {
        if s.ends_with("-unsigned") || s.ends_with("-dbg") {
            bail!("--kernel {s}: give the signed image package (without -unsigned/-dbg)");
        }
        return Ok(Spec::Package(s.to_string()));
    }
    if s.contains('/') || Path::new(s).exists() {
        return Ok(Spec::Path(PathBuf::from(s)));
    }
    bail!("--kernel {s}: expected small, debian-<major>.<minor>, a linux-image-* package or a vmlinuz path")
}

/// Parses the numeric parts of a kernel version-ish string for ordering.
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse().unwrap_or(0)).collect()
}

/// Picks the newest plain `linux-image-<series>…-amd64` image package name from `names`.
/// 6.12 style: `linux-image-6.12.117+deb12-amd64`; 6.1 style: `linux-image-6.1.0-56-amd64`.
pub fn pick_series(series: &str, names: &[String]) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    names
        .iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with("-amd64"))
        .filter(|n| {
            let mid = &n[prefix.len()..n.len() - "-amd64".len()];
            // Only the plain flavour: digits, '.', '-', '+deb<N>'.
            mid.chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'd' || c == 'e' || c == 'b')
                && mid.starts_with(|c: char| c.is_ascii_digit())
        })
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .cloned()
}

pub fn resolve(spec: &Spec, label: &str, kdir: Option<&Path>) -> Result<Kernel> {
    match spec {
        Spec::Small => small(label),
        Spec::DebianSeries(series) => {
            let prefix = format!("linux-image-{series}.");
            let mut pkg = pick_series(series, &deps::apt_names(&prefix));
            if pkg.is_none() {
                deps::apt_update();
                pkg = pick_series(series, &deps::apt_names(&prefix));
            }
            let pkg = pkg.with_context(|| {
                format!("apt knows no linux-image-{series}.*-amd64 package (is this Debian 12 with bookworm-security/backports?)")
            })?;
            note(format!("{label} = {pkg}"));
            debian(&format!("{label} = {pkg}"), &pkg)
        }
        Spec::Package(pkg) => debian(label, pkg),
        Spec::Path(p) => {
            let kdir = kdir.with_context(|| {
                format!("--kernel {}: a vmlinuz path needs --kdir <kernel build or headers dir>", p.display())
            })?;
            if !p.is_file() {
                bail!("--kernel {}: no such file", p.display());
            }
            Ok(Kernel {
                label: label.to_string(),
                vmlinuz: p.canonicalize()?,
                kdir: kdir.canonicalize().with_context(|| format!("--kdir {}", kdir.display()))?,
                release: release_of(kdir)?,
            })
        }
    }
}

fn release_of(kdir: &Path) -> Result<String> {
    let f = kdir.join("include/config/kernel.release");
    Ok(std::fs::read_to_string(&f)
        .with_context(|| format!("{} is not a prepared kernel tree (no {})", kdir.display(), f.display()))?
        .trim()
        .to_string())
}

/// A Debian image package: downloaded and unpacked under the cache; headers installed.
fn debian(label: &str, pkg: &str) -> Result<Kernel> {
    let suffix = pkg.strip_prefix("linux-image-").with_context(|| format!("{pkg} is not a linux-image-* package"))?;
    let headers = format!("linux-headers-{suffix}");
    let debs = cache_root()?.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    // As for the small kernel: another xtask fetching the same package (its headers with
    // apt, the image into the cache) must not have its tree removed under it.
    let _lock = crate::util::lock_waiting(&debs.join(format!("{pkg}.lock")), &format!("fetching {pkg}"))?;
    if !deps::installed(&headers) && !deps::apt_knows(&headers) {
        deps::apt_update();
    }
    deps::ensure(&[headers.as_str()])?;
    let kdir = PathBuf::from(format!("/usr/src/{headers}"));
    if !kdir.join("Makefile").is_file() {
        bail!("{headers} is installed but {} has no Makefile", kdir.display());
    }

    let dir = debs.join(pkg);
    let root = dir.join("root");
    let find_vmlinuz = |root: &Path| -> Option<PathBuf> {
        let boot = root.join("boot");
        std::fs::read_dir(boot)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().map(|n| n.to_string_lossy().starts_with("vmlinuz-")).unwrap_or(false))
    };
    if find_vmlinuz(&root).is_none() {
        std::fs::create_dir_all(&dir)?;
        let have_deb = |dir: &Path| -> Option<PathBuf> {
            std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
                p.extension().map(|e| e == "deb").unwrap_or(false)
                    && p.file_name().map(|n| n.to_string_lossy().starts_with(pkg)).unwrap_or(false)
            })
        };
        if have_deb(&dir).is_none() {
            step(format!("downloading {pkg} (apt-get download, into {})", dir.display()));
            let dl = |_: ()| {
                Command::new("apt-get")
                    .args(["download", pkg])
                    .current_dir(&dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            if !dl(()) {
                deps::apt_update();
                if !dl(()) {
                    bail!("could not download Debian package {pkg} (apt-get download {pkg} failed)");
                }
            }
        }
        let deb =
            have_deb(&dir).with_context(|| format!("apt-get download left no {pkg}*.deb in {}", dir.display()))?;
        let tmp = dir.join("root.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&tmp, &root)?;
    }
    let vmlinuz = find_vmlinuz(&root).with_context(|| format!("{pkg} has no boot/vmlinuz-*"))?;
    Ok(Kernel { label: label.to_string(), vmlinuz, release: release_of(&kdir)?, kdir })
}

/// Options `small.config` demands as `=y`.
pub fn wanted_options(fragment: &str) -> Vec<String> {
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
        .map(str::to_string)
        .collect()
}

/// The small kernel: tinyconfig + experiments/vm/small.config, built once with gcc and
/// cached (tree + bzImage) under `<cache>/kernels/small-<hash>/`.
fn small(label: &str) -> Result<Kernel> {
    let frag_path = workspace_root().join("experiments/vm/small.config");
    let fragment =
        std::fs::read_to_string(&frag_path).with_context(|| format!("cannot read {}", frag_path.display()))?;
    // Whoever asks for the small kernel (a Bochs run, the vmlinux corpus, which comes
    // first in `cargo xtask test`) needs its source and build tools: on a fresh machine
    // nothing else has installed them yet.
    crate::deps::ensure(crate::deps::SMALL_KERNEL)?;
    let src_ver = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SMALL_SOURCE_PKG]))
        .context("linux-source-6.12 is not installed")?;
    let gcc = output(Command::new("gcc").arg("-dumpfullversion")).unwrap_or_default();
    let key =
        fnv1a64(&[SMALL_RECIPE.as_bytes(), fragment.as_bytes(), src_ver.trim().as_bytes(), gcc.trim().as_bytes()]);
    let kernels = cache_root()?.join("kernels");
    std::fs::create_dir_all(&kernels).with_context(|| format!("cannot create {}", kernels.display()))?;
    let dir = kernels.join(format!("small-{key:016x}"));
    // Held until the tree is complete (or known to be): another xtask building it now
    // would otherwise look like an incomplete earlier build and be removed under it.
    let _lock =
        crate::util::lock_waiting(&kernels.join(format!("small-{key:016x}.lock")), "building the small kernel")?;
    let tree = dir.join("linux");
    let marker = dir.join(".complete");
    let bz = tree.join("arch/x86/boot/bzImage");
    if marker.is_file() && bz.is_file() && tree.join("Module.symvers").is_file() {
        note(format!("small kernel: cached {}", dir.display()));
    } else {
        build_small(&dir, &tree, &fragment, &frag_path)?;
        std::fs::write(&marker, format!("source {}\ngcc {}\n", src_ver.trim(), gcc.trim()))?;
    }
    Ok(Kernel { label: label.to_string(), vmlinuz: bz, release: release_of(&tree)?, kdir: tree })
}

fn build_small(dir: &Path, tree: &Path, fragment: &str, frag_path: &Path) -> Result<()> {
    let t = Timer::start();
    step(format!("building the small kernel from {SMALL_SOURCE} into {} (once; 5-7 min on 2 cores)", dir.display()));
    if dir.exists() {
        note("removing an incomplete earlier build");
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let log = dir.join("build.log");
    note(format!("log: {}", log.display()));
    note("unpacking the source");
    let unpack = dir.join("src.tmp");
    std::fs::create_dir_all(&unpack)?;
    run_logged(Command::new("tar").arg("-xf").arg(SMALL_SOURCE).arg("-C").arg(&unpack), &log)?;
    let top: Vec<PathBuf> = std::fs::read_dir(&unpack)?.flatten().map(|e| e.path()).collect();
    if top.len() != 1 {
        bail!("{SMALL_SOURCE} does not unpack to a single directory");
    }
    std::fs::rename(&top[0], tree)?;
    std::fs::remove_dir(&unpack)?;

    note("configuring: tinyconfig + small.config, olddefconfig");
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.current_dir(tree).args(args);
        c
    };
    run_logged(&mut make(&["tinyconfig"]), &log)?;
    run_logged(
        Command::new("scripts/kconfig/merge_config.sh").current_dir(tree).args(["-m", ".config"]).arg(frag_path),
        &log,
    )?;
    run_logged(&mut make(&["olddefconfig"]), &log)?;
    let config = std::fs::read_to_string(tree.join(".config"))?;
    let missing: Vec<String> =
        wanted_options(fragment).into_iter().filter(|o| !config.lines().any(|l| l.trim() == o)).collect();
    if !missing.is_empty() {
        bail!(
            "the small kernel config lost options small.config asks for (a dependency is \
             missing; see {}): {}",
            tree.join(".config").display(),
            missing.join(" ")
        );
    }
    let j = format!("-j{}", crate::util::nproc());
    note(format!("make {j} bzImage (the long part)"));
    run_logged(&mut make(&[&j, "bzImage"]), &log)?;
    // `modules` writes Module.symvers, which modpost needs for external modules.
    note("make modules (Module.symvers for external modules)");
    run_logged(&mut make(&[&j, "modules"]), &log)?;
    note("make modules_prepare");
    run_logged(&mut make(&[&j, "modules_prepare"]), &log)?;
    note(format!("small kernel built in {:.0} s", t.secs()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_newest_plain_612() {
        let n = names(&[
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-dbg",
            "linux-image-6.12.117+deb12-rt-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12-amd64",
        ]);
        assert_eq!(pick_series("6.12", &n).as_deref(), Some("linux-image-6.12.117+deb12-amd64"));
    }

    #[test]
    fn picks_newest_61_abi() {
        let n = names(&["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-cloud-amd64"]);
        assert_eq!(pick_series("6.1", &n).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(pick_series("5.10", &n), None);
    }

    #[test]
    fn specs() {
        assert_eq!(parse_spec("small").unwrap(), Spec::Small);
        assert_eq!(parse_spec("debian-6.12").unwrap(), Spec::DebianSeries("6.12".into()));
        assert_eq!(
            parse_spec("linux-image-6.1.0-56-amd64").unwrap(),
            Spec::Package("linux-image-6.1.0-56-amd64".into())
        );
        assert_eq!(parse_spec("./vmlinuz").unwrap(), Spec::Path("./vmlinuz".into()));
        assert!(parse_spec("debian-x").is_err());
        assert!(parse_spec("nonsense").is_err());
        assert!(parse_spec("linux-image-6.1.0-56-amd64-unsigned").is_err());
    }

    #[test]
    fn wanted_options_are_the_y_lines() {
        let w = wanted_options("# c\nCONFIG_A=y\nCONFIG_B=8\n CONFIG_C=y \n# CONFIG_D is not set\n");
        assert_eq!(w, vec!["CONFIG_A=y".to_string(), "CONFIG_C=y".to_string()]);
    }
}
