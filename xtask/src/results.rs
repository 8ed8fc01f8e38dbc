//! The guest's result protocol (see experiments/vm/init.sh), read from the serial log:
//! `KDBT-BOOT`, `KDBT-PLAN n`, `KDBT-RESULT name PASS|FAIL [k=v ...]`, `KDBT-INFO text`,
//! `KDBT-EXPECT-PANIC name text`, `KDBT-DONE`. Console lines carry a `[   1.234567] `
//! timestamp prefix (and maybe CRs), which the parser skips.
//!
//! `KDBT-EXPECT-PANIC name text` announces that the suite is about to make the kernel
//! panic on purpose: the check `name` passes if the next kernel panic line contains
//! `text`, whose `*`s stand for anything (its pieces must appear in order), and fails if it
//! does not; that panic ends the run like `KDBT-DONE`.
//!
//! `KDBT-EXPECT-REBOOT name [after-panic]` announces that the suite is about to reset the
//! machine (a reboot, or a panic that reboots with `after-panic`): the check `name` passes
//! when a second boot starts (the kernel's `Linux version` banner again, after the
//! firmware ran), which ends the run like `KDBT-DONE`; if the machine hangs instead, the
//! check never reports. With `after-panic` a kernel panic line before that second boot is
//! part of the scenario, not a problem. The emulator resetting the machine counts as well
//! ([`Outcome::machine_reset`]): Bochs 2.7 logs the reset of a native triple fault, then
//! (with 2 CPUs, as measured here) never runs its BIOS again, so no second banner comes.
//!
//! `KDBT-EXPECTED-BEGIN` ... `KDBT-EXPECTED-END` bracket what a suite provokes on purpose
//! and checks itself (a WARN, an oops that kills one process): an `Oops:` line in between
//! is not a problem of the run; a kernel panic still is.

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    /// `key=value` figures (and any other words) after PASS/FAIL, as printed.
    pub figures: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub booted: bool,
    pub plan: Option<usize>,
    pub checks: Vec<Check>,
    pub infos: Vec<String>,
    pub done: bool,
    /// The first kernel panic / oops line seen, if any (an expected panic is not kept
    /// here: it becomes its check's result).
    pub panic: Option<String>,
    /// An announced panic: (check name, text its panic line must contain).
    pub expect_panic: Option<(String, String)>,
    /// An announced reboot: (check name, whether a panic comes first).
    pub expect_reboot: Option<(String, bool)>,
    /// Protocol lines that did not parse.
    pub garbled: Vec<String>,
}

/// Whether the `*`-separated pieces of `pattern` all occur in `line`, in order.
fn contains_in_order(line: &str, pattern: &str) -> bool {
    let mut rest = line;
    for piece in pattern.split('*').filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// The part of a console line from `KDBT-` on, if any.
fn protocol_part(line: &str) -> Option<&str> {
    line.find("KDBT-").map(|i| line[i..].trim_end())
}

pub fn parse(serial: &str) -> Outcome {
    let mut o = Outcome::default();
    let mut expected = false;
    for raw in serial.split('\n') {
        let line = raw.trim_end_matches(['\r', '\0']);
        if let Some((name, after_panic)) = &o.expect_reboot {
            if line.contains("Linux version ") {
                let figures = String::from(if *after_panic { "second_boot=1 after_panic=1" } else { "second_boot=1" });
                o.checks.push(Check { name: name.clone(), pass: true, figures });
                o.expect_reboot = None;
                o.done = true;
                // What follows is the second boot's own run: not this one's.
                break;
            }
            if *after_panic && line.contains("Kernel panic - not syncing") {
                continue;
            }
        }
        if o.panic.is_none()
            && (line.contains("Kernel panic - not syncing")
                || line.contains("Oops:") && !line.contains("KDBT-") && !expected)
        {
            match o.expect_panic.take() {
                Some((name, text)) if line.contains("Kernel panic - not syncing") => {
                    let pass = contains_in_order(line, &text);
                    let figures = if pass { String::new() } else { format!("panic=\"{}\"", line.trim()) };
                    o.checks.push(Check { name, pass, figures });
                    o.done = true;
                }
                _ => o.panic = Some(line.trim().to_string()),
            }
        }
        let Some(p) = protocol_part(line) else { continue };
        let mut words = p.split_whitespace();
        let tag = words.next().unwrap_or("");
        match tag {
            "KDBT-BOOT" => o.booted = true,
            "KDBT-EXPECTED-BEGIN" => expected = true,
            "KDBT-EXPECTED-END" => expected = false,
            "KDBT-DONE" => o.done = true,
            "KDBT-PLAN" => match words.next().and_then(|n| n.parse::<usize>().ok()) {
                // Several suites in one boot each announce their plan: they add up.
                Some(n) => o.plan = Some(o.plan.unwrap_or(0) + n),
                None => o.garbled.push(p.to_string()),
            },
            "KDBT-INFO" => o.infos.push(p["KDBT-INFO".len()..].trim().to_string()),
            "KDBT-EXPECT-PANIC" => {
                let rest = p["KDBT-EXPECT-PANIC".len()..].trim();
                match rest.split_once(' ') {
                    Some((name, text)) if !text.trim().is_empty() => {
                        o.expect_panic = Some((name.to_string(), text.trim().to_string()))
                    }
                    _ => o.garbled.push(p.to_string()),
                }
            }
            "KDBT-EXPECT-REBOOT" => match (words.next(), words.next(), words.next()) {
                (Some(name), None, None) => o.expect_reboot = Some((name.to_string(), false)),
                (Some(name), Some("after-panic"), None) => o.expect_reboot = Some((name.to_string(), true)),
                _ => o.garbled.push(p.to_string()),
            },
            "KDBT-RESULT" => {
                let name = words.next();
                let verdict = words.next();
                match (name, verdict) {
                    (Some(name), Some(v @ ("PASS" | "FAIL"))) => o.checks.push(Check {
                        name: name.to_string(),
                        pass: v == "PASS",
                        figures: words.collect::<Vec<_>>().join(" "),
                    }),
                    _ => o.garbled.push(p.to_string()),
                }
            }
            _ => {}
        }
    }
    o
}

impl Outcome {
    /// The emulator reset the machine `resets` times after power-on: an announced reboot's
    /// check passes.
    pub fn machine_reset(&mut self, resets: usize) {
        if resets == 0 {
            return;
        }
        if let Some((name, after_panic)) = self.expect_reboot.take() {
            let figures = format!("emulator_resets={resets}{}", if after_panic { " after_panic=1" } else { "" });
            self.checks.push(Check { name, pass: true, figures });
            self.done = true;
        }
    }

    /// Everything wrong with this run; empty means it passed.
    pub fn problems(&self, timed_out: bool) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(p) = &self.panic {
            v.push(format!("kernel panic/oops: {p}"));
        }
        if !self.booted {
            v.push("the guest never reached /init (no KDBT-BOOT)".to_string());
        }
        if timed_out && !self.done {
            v.push("timeout: KDBT-DONE never came".to_string());
        } else if !self.done {
            v.push("the guest stopped before KDBT-DONE".to_string());
        }
        for c in self.checks.iter().filter(|c| !c.pass) {
            v.push(format!("check {} FAILED {}", c.name, c.figures).trim_end().to_string());
        }
        match self.plan {
            None if self.booted => v.push("the suite printed no KDBT-PLAN".to_string()),
            Some(n) if self.checks.len() < n => {
                v.push(format!("{} of {} planned checks never reported", n - self.checks.len(), n))
            }
            _ => {}
        }
        if self.booted && self.checks.is_empty() {
            v.push("no check reported".to_string());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.checks {
            if !seen.insert(&c.name) {
                v.push(format!("check {} reported twice", c.name));
            }
        }
        for g in &self.garbled {
            v.push(format!("garbled protocol line: {g}"));
        }
        v
    }
}

/// One run's header for tables.
pub struct RunInfo {
    pub suite: String,
    pub kernel: String,
    pub emulator: String,
    pub cpus: u32,
    pub boot_secs: Option<f64>,
    pub wall_secs: f64,
    /// The whole run, builds included.
    pub total_secs: f64,
    pub dir: String,
}

pub fn table(info: &RunInfo, o: &Outcome, problems: &[String]) -> String {
    let mut s = String::new();
    let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
    let boot = info.boot_secs.map(|b| format!("{b:.1} s")).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "suite {} | kernel {} | {} | cpus {} | /init after {} | emulator wall {:.1} s | run {:.0} s | {}",
        info.suite, info.kernel, info.emulator, info.cpus, boot, info.wall_secs, info.total_secs, verdict
    );
    let w = o.checks.iter().map(|c| c.name.len()).max().unwrap_or(0).max(5);
    for c in &o.checks {
        let _ = writeln!(s, "  {}  {:<w$}  {}", if c.pass { "PASS" } else { "FAIL" }, c.name, c.figures);
    }
    if let Some(n) = o.plan {
        let _ = writeln!(s, "  ({} of {} planned checks reported)", o.checks.len(), n);
    }
    for p in problems {
        let _ = writeln!(s, "  !! {p}");
    }
    let _ = writeln!(s, "  logs: {}", info.dir);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
[    0.000000] Linux version 6.12.117\r
[    1.100000] KDBT-BOOT\r
[    1.200000] KDBT-INFO suite=smoke kernel=6.12.117\r
[    1.300000] KDBT-PLAN 2\r
[    1.400000] KDBT-RESULT cpus_online PASS online=2 expected=2\r
[    1.500000] KDBT-RESULT insmod PASS \r
[    1.600000] KDBT-DONE\r
";

    #[test]
    fn all_pass() {
        let o = parse(GOOD);
        assert!(o.booted && o.done);
        assert_eq!(o.plan, Some(2));
        assert_eq!(o.checks.len(), 2);
        assert_eq!(o.checks[0].figures, "online=2 expected=2");
        assert_eq!(o.checks[1].figures, "");
        assert_eq!(o.infos, vec!["suite=smoke kernel=6.12.117".to_string()]);
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
    }

    #[test]
    fn a_failing_check_fails_the_run() {
        let s = GOOD.replace("insmod PASS", "insmod FAIL rc=1");
        let o = parse(&s);
        let p = o.problems(false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("insmod FAILED rc=1"));
    }

    #[test]
    fn plans_of_several_suites_in_one_boot_add_up() {
        let two = GOOD.replace(
            "[    1.600000] KDBT-DONE\r\n",
            "[    1.610000] KDBT-PLAN 1\r\n[    1.620000] KDBT-RESULT load PASS \r\n[    1.630000] KDBT-DONE\r\n",
        );
        let o = parse(&two);
        assert_eq!(o.plan, Some(3));
        assert_eq!(o.checks.len(), 3);
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
        // The second suite's check missing: reported against the summed plan.
        let short: String = two.lines().filter(|l| !l.contains("load PASS")).map(|l| format!("{l}\n")).collect();
        assert_eq!(parse(&short).problems(false), vec!["1 of 3 planned checks never reported".to_string()]);
    }

    #[test]
    fn a_missing_check_fails_the_run() {
        let s: String = GOOD.lines().filter(|l| !l.contains("insmod")).map(|l| format!("{l}\n")).collect();
        let p = parse(&s).problems(false);
        assert_eq!(p, vec!["1 of 2 planned checks never reported".to_string()]);
    }

    #[test]
    fn timeout_without_done_fails() {
        let s: String = GOOD.lines().filter(|l| !l.contains("DONE")).map(|l| format!("{l}\n")).collect();
        let o = parse(&s);
        assert!(!o.done);
        let p = o.problems(true);
        assert_eq!(p, vec!["timeout: KDBT-DONE never came".to_string()]);
        assert_eq!(o.problems(false), vec!["the guest stopped before KDBT-DONE".to_string()]);
    }

    #[test]
    fn no_boot_and_panic() {
        let o = parse("[ 2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n");
        let p = o.problems(false);
        assert!(p.iter().any(|x| x.starts_with("kernel panic")));
        assert!(p.iter().any(|x| x.contains("never reached /init")));
        assert!(parse("").problems(true).iter().any(|x| x.contains("timeout")));
    }

    #[test]
    fn an_oops_is_a_problem_unless_bracketed_as_expected() {
        let run = |body: &str| {
            parse(&format!("[ 1.0] KDBT-BOOT\n[ 1.1] KDBT-PLAN 1\n{body}[ 1.5] KDBT-RESULT a PASS\n[ 1.6] KDBT-DONE\n"))
        };
        let bare = run("[ 1.2] Oops: 0000 [#1] SMP\n");
        assert!(bare.problems(false).iter().any(|x| x.starts_with("kernel panic/oops")));
        let bracketed = run("[ 1.2] KDBT-EXPECTED-BEGIN\n[ 1.3] Oops: 0000 [#1] SMP\n[ 1.4] KDBT-EXPECTED-END\n");
        assert_eq!(bracketed.panic, None);
        assert!(bracketed.problems(false).is_empty(), "{:?}", bracketed.problems(false));
        // After the bracket closes an oops counts again, and a panic always does.
        let after = run("[ 1.2] KDBT-EXPECTED-BEGIN\n[ 1.3] KDBT-EXPECTED-END\n[ 1.4] Oops: 0002 [#2] SMP\n");
        assert!(after.panic.as_deref().is_some_and(|p| p.contains("#2")));
        let panic = run("[ 1.2] KDBT-EXPECTED-BEGIN\n[ 1.3] Kernel panic - not syncing: Fatal exception\n");
        assert!(panic.panic.is_some());
    }

    const FATAL: &str = "\
[    1.100000] KDBT-BOOT\r
[    1.300000] KDBT-PLAN 1\r
[    1.400000] KDBT-EXPECT-PANIC ept_violation_panics EPT violation: gpa=\r
[    2.000000] Kernel panic - not syncing: kdbt: fatal VM exit on cpu0: EPT violation: gpa=0x1000 access=read\r
";

    #[test]
    fn an_announced_panic_is_the_check_and_ends_the_run() {
        let o = parse(FATAL);
        assert!(o.done && o.panic.is_none());
        assert_eq!(o.checks, vec![Check { name: "ept_violation_panics".into(), pass: true, figures: String::new() }]);
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
        // Pieces in order match; out of order they do not.
        let o = parse(&FATAL.replace("ept_violation_panics EPT violation: gpa=", "x cpu0:*gpa=0x1000*access=read"));
        assert!(o.checks[0].pass);
        let o = parse(&FATAL.replace("ept_violation_panics EPT violation: gpa=", "x access=read*gpa=0x1000"));
        assert!(!o.checks[0].pass);
        // Another panic than the announced one fails the check.
        let o = parse(&FATAL.replace("EPT violation: gpa=0x1000", "VFS: Unable to mount root fs"));
        assert!(!o.checks[0].pass && o.checks[0].figures.contains("VFS"));
        assert!(o.problems(false).iter().any(|x| x.contains("ept_violation_panics FAILED")));
        // No panic at all: the check never reports and the run did not finish.
        let o = parse(&FATAL.replace("Kernel panic - not syncing", "still running"));
        let p = o.problems(true);
        assert!(p.iter().any(|x| x.contains("1 of 1 planned checks never reported")), "{p:?}");
        assert!(p.iter().any(|x| x.contains("timeout")), "{p:?}");
        // An oops before the panic is a problem of its own, not the expected panic.
        let o = parse(&FATAL.replace("[    2.000000] Kernel", "[    1.9] Oops: 0000 [#1]\n[    2.000000] Kernel"));
        assert!(o.panic.as_deref().is_some_and(|p| p.contains("Oops")));
    }

    const REBOOT: &str = "\
[    0.000000] Linux version 6.12.117\r
[    1.100000] KDBT-BOOT\r
[    1.300000] KDBT-PLAN 2\r
[    1.400000] KDBT-RESULT load PASS \r
[    1.500000] KDBT-EXPECT-REBOOT reboot_resets\r
[    1.600000] reboot: Restarting system\r
[    0.000000] Linux version 6.12.117\r
[    1.100000] KDBT-BOOT\r
[    1.300000] KDBT-PLAN 2\r
";

    #[test]
    fn an_announced_reboot_is_the_check_and_ends_the_run() {
        let o = parse(REBOOT);
        assert!(o.done && o.panic.is_none());
        assert_eq!(o.plan, Some(2), "the second boot's lines are not counted");
        assert_eq!(o.checks[1], Check { name: "reboot_resets".into(), pass: true, figures: "second_boot=1".into() });
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
        // No second boot (the machine hung): the check never reports.
        let hung: String = REBOOT.lines().take(6).map(|l| format!("{l}\n")).collect();
        let p = parse(&hung).problems(true);
        assert!(p.iter().any(|x| x.contains("1 of 2 planned checks never reported")), "{p:?}");
        // A panic before the second boot: a problem, unless announced with after-panic.
        let panicking =
            REBOOT.replace("reboot: Restarting system", "Kernel panic - not syncing: sysrq triggered crash");
        assert!(parse(&panicking).problems(false).iter().any(|x| x.starts_with("kernel panic")));
        let o = parse(&panicking.replace("reboot_resets", "reboot_resets after-panic"));
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
        assert_eq!(o.checks[1].figures, "second_boot=1 after_panic=1");
        assert!(!parse(&REBOOT.replace("reboot_resets", "a b c")).garbled.is_empty());
        // The emulator's reset without a second banner passes it too; no reset, nothing.
        let mut o = parse(&hung);
        o.machine_reset(0);
        assert!(!o.done);
        o.machine_reset(1);
        assert!(o.done && o.checks[1].figures == "emulator_resets=1");
        assert!(o.problems(false).is_empty(), "{:?}", o.problems(false));
    }

    #[test]
    fn garbled_and_duplicate_lines_fail() {
        let s = GOOD.replace("KDBT-DONE", "KDBT-RESULT insmod PASS\n[ 2] KDBT-RESULT oops MAYBE\n[ 3] KDBT-DONE");
        let p = parse(&s).problems(false);
        assert!(p.iter().any(|x| x == "check insmod reported twice"), "{p:?}");
        assert!(p.iter().any(|x| x.contains("garbled")), "{p:?}");
    }

    #[test]
    fn table_shows_checks_and_problems() {
        let s = GOOD.replace("insmod PASS", "insmod FAIL rc=1");
        let o = parse(&s);
        let p = o.problems(false);
        let info = RunInfo {
            suite: "smoke".into(),
            kernel: "small".into(),
            emulator: "bochs".into(),
            cpus: 2,
            boot_secs: Some(3.0),
            wall_secs: 5.0,
            total_secs: 9.0,
            dir: "target/vm/x".into(),
        };
        let t = table(&info, &o, &p);
        assert!(t.contains("FAIL  insmod"));
        assert!(t.contains("PASS  cpus_online"));
        assert!(t.lines().next().unwrap().ends_with("FAIL"));
    }
}
