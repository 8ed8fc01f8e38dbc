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

pub struct Lane {
    thread: JoinHandle<Vec<LaneRun>>,
}

/// Starts the lane's runs in order on a thread of their own.
pub fn start(jobs: Vec<LaneJob>) -> Result<Lane> {
    let exe = std::env::current_exe().context("cannot find xtask's own executable")?;
    let dir = workspace_root().join("target/vm/lane");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    step(format!("lane 2 (beside the runs below, logs in {}):", dir.display()));
    for j in &jobs {
        note(j.label.clone());
    }
    let thread = std::thread::Builder::new()
        .name("lane-2".into())
        .spawn(move || jobs.iter().enumerate().map(|(i, j)| run_one(&exe, &dir, i, j)).collect())
        .context("cannot start the second lane's thread")?;
    Ok(Lane { thread })
}

impl Lane {
    /// Waits for the lane's last run; a failed run's log tail is printed.
    pub fn finish(self) -> Vec<LaneRun> {
        step("waiting for lane 2");
        let runs = self.thread.join().unwrap_or_else(|_| {
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

fn run_one(exe: &Path, dir: &Path, i: usize, j: &LaneJob) -> LaneRun {
    let t = Timer::start();
    let name = format!("{:02}-{}", i + 1, crate::sanitize(&j.label));
    let log = dir.join(format!("{name}.log"));
    let table_file = dir.join(format!("{name}.table"));
    let _ = std::fs::remove_file(&table_file);
    let run = || -> Result<bool> {
        if crate::emu::interrupted() {
            anyhow::bail!("interrupted before it started");
        }
        let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let st = Command::new(exe)
            .current_dir(workspace_root())
            .arg("vm")
            .args(&j.args)
            .arg("--table-out")
            .arg(&table_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        Ok(st.success())
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
