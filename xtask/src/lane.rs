//! A second lane for `cargo xtask test`: emulator runs that go on beside the first lane's.
//!
//! Bochs emulates every guest CPU on one host thread, so on a machine with two cores a
//! second Bochs run costs the first almost nothing (Debian 6.12's boot took 1,521 s beside
//! a small-kernel run and 1,524 s alone). The lane runs its runs one after another, each as
//! an `xtask vm` child whose output goes to a log file of its own (two runs' progress lines
//! would interleave); the parent waits for it at the end and reports its runs with its own.
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::util::{note, step, tail_lines, workspace_root, Timer};

/// Lines of a failed lane run's log printed at the end.
const FAILED_TAIL: usize = 120;

/// One run for the lane: its label and its `xtask vm` arguments (without `--table-out`).
pub struct LaneJob {
    pub label: String,
    pub args: Vec<String>,
}

/// What a lane run gave.
pub struct LaneRun {
    pub label: String,
    pub passed: bool,
    /// Its results table, or what went wrong before it had one.
    pub table: String,
    pub log: PathBuf,
}

/// The lane's thread and what stops it. Dropped without [`Lane::finish`] (the parent
/// leaves early: an error, Ctrl-C, SIGTERM), it stops the running child (SIGTERM: the child
/// stops its emulator) and starts no more.
pub struct Lane {
    thread: Option<JoinHandle<Vec<LaneRun>>>,
    /// The running child's pid, 0 between runs (for the message).
    child: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    /// The lock on the lane's directory (another `cargo xtask test` gets `lane-2`, ...).
    _lock: std::fs::File,
}

/// Starts the lane's runs in order on a thread of their own.
pub fn start(jobs: Vec<LaneJob>) -> Result<Lane> {
    let exe = std::env::current_exe().context("cannot find xtask's own executable")?;
    let (dir, lock) = crate::util::locked_dir(&workspace_root().join("target/vm"), "lane")?;
    step(format!("lane 2 (beside the runs below, logs in {}):", dir.display()));
    for j in &jobs {
        note(j.label.clone());
    }
    let child = Arc::new(AtomicI32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (c, st) = (child.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("lane-2".into())
        .spawn(move || jobs.iter().enumerate().map(|(i, j)| run_one(&exe, &dir, i, j, &c, &st)).collect())
        .context("cannot start the second lane's thread")?;
    Ok(Lane { thread: Some(thread), child, stop, _lock: lock })
}

impl Lane {
    /// Waits for the lane's last run; a failed run's log tail is printed.
    pub fn finish(mut self) -> Vec<LaneRun> {
        step("waiting for lane 2");
        let runs = self.thread.take().map(|t| t.join()).unwrap_or(Err(Box::new(()))).unwrap_or_else(|_| {
            vec![LaneRun {
                label: "lane 2".into(),
                passed: false,
                table: "lane 2: ERROR its thread panicked\n".into(),
                log: PathBuf::new(),
            }]
        });
        for r in runs.iter().filter(|r| !r.passed) {
            println!("\n--- lane 2: {} failed; last {FAILED_TAIL} lines of {} ---", r.label, r.log.display());
            match tail_lines(&r.log, FAILED_TAIL) {
                Ok(t) => println!("{}", crate::util::strip_terminal_codes(&t)),
                Err(e) => println!("({e:#})"),
            }
        }
        runs
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        let pid = self.child.load(Ordering::SeqCst);
        if pid > 0 {
            note(format!("stopping lane 2's run (pid {pid})"));
        }
        // The thread signals its child and waits for it.
        let _ = t.join();
    }
}

fn run_one(exe: &Path, dir: &Path, i: usize, j: &LaneJob, child: &AtomicI32, stop: &AtomicBool) -> LaneRun {
    let t = Timer::start();
    let name = format!("{:02}-{}", i + 1, crate::sanitize(&j.label));
    let log = dir.join(format!("{name}.log"));
    let table_file = dir.join(format!("{name}.table"));
    // Nothing of an earlier run may pass for this one's.
    let _ = std::fs::remove_file(&table_file);
    let _ = std::fs::remove_file(&log);
    let run = || -> Result<bool> {
        if crate::emu::interrupted() || stop.load(Ordering::SeqCst) {
            anyhow::bail!("stopped before it started");
        }
        let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut c = Command::new(exe)
            .current_dir(workspace_root())
            .arg("vm")
            .args(&j.args)
            .arg("--table-out")
            .arg(&table_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        child.store(c.id() as i32, Ordering::SeqCst);
        // Waits; asked to stop (the parent left early), SIGTERM the child (it stops its
        // emulator) and go on waiting: the child is not reaped before try_wait says so,
        // so the signal cannot reach another process.
        let mut signalled = false;
        let st = loop {
            match c.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if !signalled && (stop.load(Ordering::SeqCst) || crate::emu::interrupted()) {
                // SAFETY: a signal to our own child, not yet reaped (try_wait said so).
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                signalled = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        child.store(0, Ordering::SeqCst);
        Ok(st.with_context(|| format!("waiting for {}", exe.display()))?.success())
    };
    let (passed, table) = match run() {
        Ok(ok) => match std::fs::read_to_string(&table_file) {
            Ok(tb) => (ok, tb),
            Err(_) => (false, format!("{}: ERROR no results table (see {})\n", j.label, log.display())),
        },
        Err(e) => (false, format!("{}: ERROR {e:#}\n", j.label)),
    };
    eprintln!(
        "==> lane 2: {} {} in {:.0} s (log: {})",
        j.label,
        if passed { "passed" } else { "FAILED" },
        t.secs(),
        log.display()
    );
    LaneRun { label: j.label.clone(), passed, table, log }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary stands in for xtask (current_exe): it writes no table, so the run
    /// must count as failed, with the reason; a lane dropped unfinished must not hang.
    #[test]
    fn a_run_without_a_table_fails_and_a_dropped_lane_stops() {
        let job = |l: &str| LaneJob { label: l.into(), args: vec!["--exact".into(), "no_such_test".into()] };
        let runs = start(vec![job("first"), job("second")]).unwrap().finish();
        assert_eq!(runs.len(), 2);
        for r in &runs {
            assert!(!r.passed, "{}", r.table);
            assert!(r.table.contains("ERROR no results table"), "{}", r.table);
        }
        let t = Timer::start();
        drop(start(vec![job("dropped")]).unwrap());
        assert!(t.secs() < 30.0);
    }
}
