//! `cargo xtask vmlinux-corpus`: a real kernel as the DBT's corpus. Finds the
//! kernel's `vmlinux` (the small kernel's build tree; for a Debian image, the
//! ELF decompressed out of its vmlinuz) and `System.map`, then runs
//! `dbt-vmlinux` on them (see dbt/src/bin/dbt-vmlinux.rs).

use crate::kernel::{self, Spec};
use crate::util::{note, step, workspace_root, Timer};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Compressed-payload formats of a bzImage we can undo: (magic, command).
const PAYLOADS: &[(&[u8], &str)] = &[(&[0xFD, b'7', b'z', b'X', b'Z', 0], "xz"), (&[0x28, 0xB5, 0x2F, 0xFD], "zstd")];

/// The ELF kernel inside a bzImage: the first compressed stream (xz or zstd)
/// that decompresses to an ELF file (what the kernel's scripts/extract-vmlinux does).
pub fn extract(vmlinuz: &[u8]) -> Result<Vec<u8>> {
    for (magic, tool) in PAYLOADS {
        for off in (0..vmlinuz.len().saturating_sub(magic.len())).filter(|&o| vmlinuz[o..].starts_with(magic)) {
            let Ok(mut child) = Command::new(tool)
                .arg("-dc")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                break; // tool not installed
            };
            let mut stdin = child.stdin.take().context("no stdin")?;
            let data = vmlinuz[off..].to_vec();
            let feeder = std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
            // Trailing bytes after the stream make the tool exit non-zero: judge by the output.
            let out = child.wait_with_output()?;
            let _ = feeder.join();
            if out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    bail!("no xz or zstd stream in the image decompresses to an ELF kernel (are xz-utils / zstd installed?)")
}

/// (vmlinux, System.map or None when the kernel ships no symbols) of `--kernel`.
fn locate(spec_s: &str) -> Result<(PathBuf, Option<PathBuf>)> {
    let spec = kernel::parse_spec(spec_s)?;
    let k = kernel::resolve(&spec, spec_s, None)?;
    crate::deps::ensure(crate::deps::VMLINUZ)?;
    if spec == Spec::Small {
        return Ok((k.kdir.join("vmlinux"), Some(k.kdir.join("System.map"))));
    }
    let boot = k.vmlinuz.parent().context("vmlinuz has no directory")?;
    let ver = k.vmlinuz.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("vmlinuz-")).unwrap_or("");
    let map = boot.join(format!("System.map-{ver}"));
    // Debian's images ship a one-line placeholder System.map and a stripped
    // kernel (the symbols are only in the large -dbg package): then the
    // function starts come from the kernel's own endbr64s (dbt-vmlinux
    // --no-symbols; Debian builds with IBT).
    let m = std::fs::read_to_string(&map).unwrap_or_default();
    let map = if m.lines().count() < 100 {
        note(format!(
            "{} holds no symbols ({:?}): finding function starts from the code instead (endbr64, calls of __fentry__, call targets)",
            map.display(),
            m.lines().next().unwrap_or("")
        ));
        None
    } else {
        Some(map)
    };
    let out = boot.join(format!("vmlinux-{ver}"));
    if !out.is_file() {
        step(format!("extracting vmlinux from {}", k.vmlinuz.display()));
        let elf = extract(&std::fs::read(&k.vmlinuz)?)?;
        std::fs::write(&out, elf)?;
    }
    Ok((out, map))
}

/// Translates every function of the kernel; true if the translator neither
/// panicked nor emitted undecodable code.
pub fn corpus(spec_s: &str) -> Result<bool> {
    let t = Timer::start();
    let (vmlinux, map) = locate(spec_s)?;
    step(format!("translating every function of {} offline ({spec_s})", vmlinux.display()));
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["run", "--release", "-q", "-p", "dbt", "--features", "host", "--bin", "dbt-vmlinux", "--"])
        .arg(&vmlinux)
        .arg(map.as_ref().map_or("--no-symbols".into(), |m| m.as_os_str().to_owned()))
        .status()
        .context("cannot run cargo")?;
    note(format!("vmlinux corpus ({spec_s}): {} in {:.0} s", if st.success() { "PASS" } else { "FAIL" }, t.secs()));
    Ok(st.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_an_xz_payload_after_junk() {
        let elf = b"\x7fELF\x02\x01\x01 a tiny pretend kernel".to_vec();
        let mut xz = Command::new("xz").args(["-c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        xz.stdin.take().unwrap().write_all(&elf).unwrap();
        let packed = xz.wait_with_output().unwrap().stdout;
        let mut image = b"MZ setup code, then the payload: ".to_vec();
        image.extend_from_slice(&packed);
        image.extend_from_slice(b"trailing bytes");
        assert_eq!(extract(&image).unwrap(), elf);
        assert!(extract(b"no payload here").is_err());
    }
}
