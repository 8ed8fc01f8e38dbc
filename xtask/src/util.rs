//! Small helpers: paths, the cache root, running commands with context, progress output.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}

/// The one place that decides where downloaded and built artifacts are cached:
/// `$KDBT_CACHE`, else `~/.cache/kdbt`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KDBT_CACHE") {
        if !p.is_empty() {
            return Ok(PathBuf::from(p));
        }
    }
    let home = std::env::var_os("HOME").context("neither KDBT_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("kdbt"))
}

/// Prints a progress line (stderr, so summaries on stdout stay clean).
pub fn step(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

/// Prints a progress sub-line.
pub fn note(msg: impl AsRef<str>) {
    eprintln!("    {}", msg.as_ref());
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, inheriting stdout/stderr; errors if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let d = describe(cmd);
    let st = cmd.status().with_context(|| format!("cannot start `{d}`"))?;
    if !st.success() {
        bail!("`{d}` failed ({st})");
    }
    Ok(())
}

/// Runs `cmd` with its output sent to `log` (appended); prints a heartbeat with the log's
/// last line every 30 s; on failure the error quotes the log's tail.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let d = describe(cmd);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let f2 = f.try_clone()?;
    let t = Timer::start();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2))
        .spawn()
        .with_context(|| format!("cannot start `{d}`"))?;
    let mut next_beat = 30.0;
    let st = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        if t.secs() >= next_beat {
            next_beat += 30.0;
            let last = tail_lines(log, 1).unwrap_or_default();
            note(format!("... {:.0} s: {}", t.secs(), last.trim()));
        }
    };
    if !st.success() {
        let tail = tail_lines(log, 30).unwrap_or_default();
        bail!("`{d}` failed ({st}); last lines of {}:\n{tail}", log.display());
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; errors on non-zero exit (quoting stderr).
pub fn output(cmd: &mut Command) -> Result<String> {
    let d = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{d}`"))?;
    if !out.status.success() {
        bail!("`{d}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Last `n` lines of a (possibly binary, possibly missing) text file.
pub fn tail_lines(path: &Path, n: usize) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    Ok(lines[start..].iter().map(|l| l.trim_end_matches('\r')).collect::<Vec<_>>().join("\n"))
}

/// `text` without terminal control sequences (CSI `ESC [ ... final`, charset `ESC ( x`, other `ESC x`)
/// and control characters other than newline and tab: Bochs' terminal capture as plain text.
pub fn strip_terminal_codes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\u{1b}' => match it.next() {
                Some('[') => {
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for d in it.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
                // Character-set designation: ESC ( B and the like take one more byte.
                Some('(' | ')' | '*' | '+') => {
                    it.next();
                }
                Some(_) | None => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// 64-bit FNV-1a: a stable, dependency-free hash for cache keys.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(b"\0".iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Creates and locks (flock, exclusive, non-blocking) `<parent>/<name>`, or the first of
/// `<name>-2`, `<name>-3`, ... that no other process holds. The lock lasts as long as
/// the returned file is open.
pub fn locked_dir(parent: &Path, name: &str) -> Result<(PathBuf, std::fs::File)> {
    for i in 1..=16 {
        let dir = if i == 1 { parent.join(name) } else { parent.join(format!("{name}-{i}")) };
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(f) = try_lock(&dir.join(".lock"))? {
            return Ok((dir, f));
        }
    }
    bail!("all run directories {}/{name}[-N] are busy", parent.display())
}

/// The lock file at `path`, created if need be.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// An exclusive lock on `path` (created if need be) if nobody holds it, else None.
pub fn try_lock(path: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let f = lock_file(path)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e).with_context(|| format!("cannot lock {}", path.display()))
    }
}

/// An exclusive lock on `path`, waiting (and saying so) while another xtask holds it:
/// for work in a shared cache that two xtask commands must not do at once (one would
/// take the other's half-built tree for an incomplete earlier build and remove it).
pub fn lock_waiting(path: &Path, what: &str) -> Result<std::fs::File> {
    let mut said = false;
    loop {
        if let Some(f) = try_lock(path)? {
            return Ok(f);
        }
        if !said {
            note(format!("waiting for another xtask, which is {what} (lock {})", path.display()));
            said = true;
        }
        // Polled, so that Ctrl-C and SIGTERM still end the wait (a blocking flock would be
        // restarted after the signal handler).
        if crate::emu::interrupted() {
            bail!("interrupted while waiting for {}", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A stopwatch that reports seconds.
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Self {
        Timer(Instant::now())
    }
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Number of host CPUs for `make -j`.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_not_taken_twice_and_is_free_once_dropped() {
        let dir = std::env::temp_dir().join(format!("kdbt-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k.lock");
        let held = try_lock(&p).unwrap().expect("a free lock");
        // Another open file description (as another xtask would have) cannot take it.
        assert!(try_lock(&p).unwrap().is_none());
        drop(held);
        let again = lock_waiting(&p, "testing").unwrap();
        assert!(try_lock(&p).unwrap().is_none());
        drop(again);
        assert!(try_lock(&p).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn terminal_codes_are_stripped() {
        let raw = "\u{1b}[?25l\u{1b}[1;1Hscreen\r\n*** buffer overflow detected ***: terminated\u{1b}(B\n";
        assert_eq!(strip_terminal_codes(raw), "screen\n*** buffer overflow detected ***: terminated\n");
    }

    #[test]
    fn busy_run_dirs_are_not_shared() {
        let parent = std::env::temp_dir().join(format!("kdbt-lock-test-{}", std::process::id()));
        let (a, _la) = locked_dir(&parent, "run").unwrap();
        let (b, lb) = locked_dir(&parent, "run").unwrap();
        assert_eq!(a, parent.join("run"));
        assert_eq!(b, parent.join("run-2"));
        drop(lb);
        let (c, _lc) = locked_dir(&parent, "run").unwrap();
        assert_eq!(c, parent.join("run-2"));
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        assert_eq!(fnv1a64(&[b"a"]), fnv1a64(&[b"a"]));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }
}
