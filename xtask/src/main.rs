//! kdbt's task runner: the one-command VT-x test bench (Bochs, QEMU TCG), host tests and
//! benchmarks. `cargo xtask --help`.

mod deps;
mod emu;
#[cfg(test)]
mod glue_abi;
mod image;
mod kernel;
mod kernel_dbt_bench;
mod lane;
mod paging;
mod results;
mod toolchain;
mod util;
mod vmlinux;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use emu::Emulator;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;
use util::{note, step, tail_lines, workspace_root, Timer};

/// Cargo feature of the `dbt` crate that enables the host-side benchmark binary.
const DBT_BENCH_FEATURES: &str = "host";
/// Lines of serial.log / emulator log shown on failure.
const TAIL: usize = 40;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kdbt task runner: VT-x test bench, tests, benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct VmArgs {
    /// Scenario suite(s): experiments/vm/suites/<NAME>.sh; a comma list runs several in one boot.
    #[arg(long, default_value = "smoke")]
    suite: String,
    /// Guest kernel: small | debian-6.12 | debian-6.1 | linux-image-* package | vmlinuz path.
    #[arg(long, default_value = "small")]
    kernel: String,
    /// Kernel build/headers directory (required when --kernel is a path).
    #[arg(long)]
    kdir: Option<PathBuf>,
    /// Bochs CPU model (must have VT-x for the VMX paths).
    #[arg(long, default_value = "corei7_skylake_x")]
    cpu_model: String,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: u32,
    /// Guest memory in MB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=8192))]
    mem: u32,
    /// Emulator: bochs (VT-x) or qemu (TCG, no VMX).
    #[arg(long, value_enum, default_value = "bochs")]
    emulator: Emulator,
    /// Wall-clock timeout in seconds [default: depends on kernel, emulator and CPUs].
    #[arg(long)]
    timeout: Option<u64>,
    /// Make the guest report one deliberately failing check (also: KDBT_VM_INJECT_FAIL=1).
    #[arg(long)]
    inject_fail: bool,
    /// Extra kernel command-line words.
    #[arg(long, default_value = "")]
    append: String,
    /// Paging mode the suites load kdbt with (`kdbt load --paging`): passed as
    /// `kdbt.paging=` on the kernel command line; /init exports it as $KDBT_PAGING.
    #[arg(long, value_enum, default_value = "ept")]
    paging: Paging,
    /// A directory whose tree is copied into the guest's root file system (a third-party
    /// program and its shared libraries, for a suite of your own to run).
    #[arg(long)]
    extra_root: Option<PathBuf>,
    /// Also write the results table to this file (`cargo xtask test`'s second lane reads it).
    #[arg(long, hide = true)]
    table_out: Option<PathBuf>,
}

impl VmArgs {
    /// The `cargo xtask vm` arguments that give this run (`table_out` aside).
    fn cli_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--suite".into(),
            self.suite.clone(),
            "--kernel".into(),
            self.kernel.clone(),
            "--cpu-model".into(),
            self.cpu_model.clone(),
            "--cpus".into(),
            self.cpus.to_string(),
            "--mem".into(),
            self.mem.to_string(),
            "--emulator".into(),
            self.emulator.name().into(),
            "--paging".into(),
            self.paging.name().into(),
        ];
        if let Some(k) = &self.kdir {
            v.extend(["--kdir".into(), k.display().to_string()]);
        }
        if let Some(t) = self.timeout {
            v.extend(["--timeout".into(), t.to_string()]);
        }
        if self.inject_fail {
            v.push("--inject-fail".into());
        }
        if !self.append.is_empty() {
            // `=`: the value may start with a dash.
            v.push(format!("--append={}", self.append));
        }
        if let Some(r) = &self.extra_root {
            v.extend(["--extra-root".into(), r.display().to_string()]);
        }
        v
    }

    /// How `cargo xtask test` names the run in its summary.
    fn label(&self) -> String {
        format!("{} {} {} {}cpu {}", self.suite, self.kernel, self.emulator.name(), self.cpus, self.paging.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Paging {
    Ept,
    Shadow,
}

impl Paging {
    fn name(self) -> &'static str {
        match self {
            Paging::Ept => "ept",
            Paging::Shadow => "shadow",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot one guest and run a scenario suite.
    Vm(VmArgs),
    /// Host unit tests + the smoke, hypervisor and dbt suites in Bochs (small with
    /// dbt-kernel too, debian-6.12) and
    /// QEMU TCG (small, debian-6.12, debian-6.1), one boot per kernel and emulator, the
    /// fatal and fatal-hidden suites, the suspend suite and the three reboot suites, each in a boot of its own
    /// (Bochs, small), and the hypervisor and shadow-hook suites on shadow paging (Bochs,
    /// small).
    Test {
        /// Skip `cargo test --workspace`.
        #[arg(long)]
        no_unit: bool,
        /// Also run smoke and hypervisor on Debian 6.1 in Bochs (about 11 minutes).
        #[arg(long)]
        with_61: bool,
        /// Everything: `--with-61`, and the hypervisor suite on shadow paging on Debian 6.12
        /// in Bochs (KPTI: two CR3 writes per syscall; about 15 minutes more).
        #[arg(long)]
        full: bool,
        /// Make every guest report one deliberately failing check.
        #[arg(long)]
        inject_fail: bool,
        /// Wall-clock limit for `cargo test --workspace`, in seconds.
        #[arg(long, default_value_t = 1200)]
        unit_timeout: u64,
        /// Every emulator run one after another (by default, on two or more cores, the
        /// Debian 6.12 Bochs runs go on beside the others).
        #[arg(long)]
        one_lane: bool,
    },
    /// Translate every function of a real kernel offline with the DBT engine
    /// (its vmlinux and System.map; for Debian images the vmlinux is extracted
    /// from the vmlinuz): no panic, every emitted instruction decodes, counts
    /// by kernel instruction class.
    VmlinuxCorpus {
        /// small | debian-6.12 | debian-6.1 | linux-image-* package.
        #[arg(long, default_value = "small")]
        kernel: String,
    },
    /// Boot the bench and show `kdbt caps`.
    Demo {
        #[arg(long, default_value = "small")]
        kernel: String,
        #[arg(long, value_enum, default_value = "bochs")]
        emulator: Emulator,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
    /// Benchmarks: `dbt` on this machine; `hypervisor` in a Bochs guest (RDTSC ticks per
    /// operation with kdbt unloaded and loaded, and the VM exits of the loaded run);
    /// `paging` in a Bochs guest (native, EPT and shadow paging in one boot: ticks, ratios,
    /// VM exits by reason, a modeled time with a cost per VM exit, and an SVG chart);
    /// `kernel-dbt` in a Bochs guest (a read of the test module's /proc file, kdbt
    /// unloaded, loaded, and started with each client: ticks, ratios, #VE and dispatches
    /// per read, a table and an SVG chart).
    Bench {
        #[arg(value_enum)]
        what: BenchKind,
        /// Guest kernel for `hypervisor` and `paging`.
        #[arg(long, default_value = "debian-6.12")]
        kernel: String,
        /// Guest CPUs for `hypervisor` and `paging`.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Cost of one VM exit round trip in cycles, for the modeled time of `paging`
        /// (default: the figure cited in the output).
        #[arg(long, default_value_t = paging::EXIT_ROUND_TRIP_CYCLES)]
        exit_cycles: u64,
        /// `paging` only: no emulator; read the suite's output from this file (written by
        /// `experiments/vm/host-suite.sh bench-paging` on a machine with VT-x), and write the
        /// table and chart beside it.
        #[arg(long)]
        from_log: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchKind {
    Dbt,
    Hypervisor,
    Paging,
    KernelDbt,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    emu::install_interrupt_handler();
    match real_main(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<bool> {
    // Every command builds for the kernel or the guest targets.
    toolchain::ensure()?;
    match cli.cmd {
        Cmd::Vm(a) => {
            let mut ctx = Ctx::default();
            let r = vm_run(&mut ctx, &a, false)?;
            println!("\n{}", r.table);
            if let Some(p) = &a.table_out {
                std::fs::write(p, &r.table).with_context(|| format!("cannot write {}", p.display()))?;
            }
            Ok(r.passed)
        }
        Cmd::Test { no_unit, with_61, full, inject_fail, unit_timeout, one_lane } => {
            test(no_unit, with_61 || full, full, inject_fail, Duration::from_secs(unit_timeout), one_lane)
        }
        Cmd::Demo { kernel, emulator, cpus } => {
            let a = VmArgs {
                suite: "demo".into(),
                kernel,
                kdir: None,
                cpu_model: "corei7_skylake_x".into(),
                cpus,
                mem: 512,
                emulator,
                timeout: None,
                inject_fail: false,
                append: String::new(),
                paging: Paging::Ept,
                extra_root: None,
                table_out: None,
            };
            let mut ctx = Ctx::default();
            let r = vm_run(&mut ctx, &a, true)?;
            println!("\n{}", r.table);
            Ok(r.passed)
        }
        Cmd::Bench { what: BenchKind::Dbt, .. } => {
            // The table's valgrind and qemu-user columns; without them it still prints the rest.
            if let Err(e) = deps::ensure(deps::DBT_BENCH) {
                note(format!("{e:#}: those columns will say n/a"));
            }
            step(format!("cargo run --release -p dbt --features {DBT_BENCH_FEATURES} --bin dbt-bench"));
            let st = Command::new(cargo())
                .current_dir(workspace_root())
                .args(["run", "--release", "-p", "dbt", "--features", DBT_BENCH_FEATURES, "--bin", "dbt-bench"])
                .status()
                .context("cannot run cargo")?;
            Ok(st.success())
        }
        Cmd::Bench { what: BenchKind::Hypervisor, kernel, cpus, .. } => bench_hypervisor(kernel, cpus),
        Cmd::Bench { what: BenchKind::Paging, kernel, cpus, exit_cycles, from_log } => match from_log {
            Some(log) => bench_paging_from_log(&log, exit_cycles),
            None => bench_paging(kernel, cpus, exit_cycles),
        },
        Cmd::Bench { what: BenchKind::KernelDbt, kernel, cpus, .. } => bench_kernel_dbt(kernel, cpus),
        Cmd::VmlinuxCorpus { kernel } => vmlinux::corpus(&kernel),
    }
}

/// `cargo xtask bench kernel-dbt`: the bench-kernel-dbt suite in one Bochs boot, its table,
/// and the table, an SVG chart and the raw checks written to
/// experiments/results/bench-kernel-dbt/.
fn bench_kernel_dbt(kernel: String, cpus: u32) -> Result<bool> {
    let Some((a, r)) = bench_run("bench-kernel-dbt", kernel, cpus, None)? else { return Ok(false) };
    let rows = kernel_dbt_bench::collect(&r.checks)?;
    let title = format!("kdbt bench kernel-dbt: {} guest, {} CPUs, Bochs {}", a.kernel, a.cpus, a.cpu_model);
    let table = kernel_dbt_bench::table(&rows);
    let text = format!(
        "{title}\na read of /proc/kdbt_testmod on cpu0 (the test module's code, 8 calls of its hash loop, and the\n\
         kernel's seq_printf), RDTSC ticks per read: fastest of {} repetitions, the slowest in brackets;\n\
         per-read figures are cpu0's over the measured reads, after one warm-up read translated the module;\n\
         VM exits are every CPU's over the same reads (one `kdbt status` run's own subtracted).\n\
         (in Bochs RDTSC advances with executed instructions: ticks are instruction counts, and a #VE's\n \
         delivery costs ~0 in that clock; only the stub's and dispatcher's instructions are counted)\n\n{table}",
        r.checks.iter().find_map(|c| figure(c, "reps")).unwrap_or("?")
    );
    println!("\n{text}");
    let dir = workspace_root().join("experiments/results/bench-kernel-dbt");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("write {}", p.display()))
    };
    write("table.txt", &text)?;
    write("ratios.svg", &kernel_dbt_bench::svg(&rows, &title))?;
    write("checks.txt", &raw_checks(&r.checks, "kernel_dbt_"))?;
    println!("written: {}/{{table.txt,ratios.svg,checks.txt}}", dir.display());
    Ok(true)
}

/// The checks whose names start with `prefix`, one `name PASS|FAIL figures` line each (a
/// benchmark's raw results, kept beside its table).
fn raw_checks(checks: &[results::Check], prefix: &str) -> String {
    checks
        .iter()
        .filter(|c| c.name.starts_with(prefix))
        .map(|c| format!("{} {} {}\n", c.name, if c.pass { "PASS" } else { "FAIL" }, c.figures))
        .collect()
}

/// `key=value` figure of a check.
fn figure<'a>(c: &'a results::Check, key: &str) -> Option<&'a str> {
    c.figures.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// A benchmark suite's boot (Bochs, the suite's own kernel and CPUs): its report, or
/// None after printing the table of a failed run.
fn bench_run(suite: &str, kernel: String, cpus: u32, timeout: Option<u64>) -> Result<Option<(VmArgs, RunReport)>> {
    let a = VmArgs {
        suite: suite.into(),
        kernel,
        kdir: None,
        cpu_model: "corei7_skylake_x".into(),
        cpus,
        mem: 512,
        emulator: Emulator::Bochs,
        timeout,
        inject_fail: false,
        append: String::new(),
        paging: Paging::Ept,
        extra_root: None,
        table_out: None,
    };
    let r = vm_run(&mut Ctx::default(), &a, false)?;
    if !r.passed {
        println!("\n{}", r.table);
        return Ok(None);
    }
    Ok(Some((a, r)))
}

fn bench_hypervisor(kernel: String, cpus: u32) -> Result<bool> {
    let Some((a, r)) = bench_run("bench-hypervisor", kernel, cpus, None)? else { return Ok(false) };
    println!(
        "\nkdbt hypervisor microbenchmarks ({} guest, {} CPUs, Bochs {}): RDTSC ticks per operation",
        a.kernel, a.cpus, a.cpu_model
    );
    println!("(in Bochs RDTSC advances with executed instructions: ratios are instruction-cost ratios;");
    println!(" fastest of 5 repetitions, the slowest in brackets; ratio = loaded / unloaded fastest)\n");
    println!("{:<12} {:>22} {:>22} {:>8}", "benchmark", "unloaded", "kdbt loaded", "ratio");
    for c in r.checks.iter().filter(|c| c.name.starts_with("bench_") && c.name != "bench_exits") {
        let (u, l) = (figure(c, "unloaded"), figure(c, "loaded"));
        let ratio = match (u.and_then(|v| v.parse::<f64>().ok()), l.and_then(|v| v.parse::<f64>().ok())) {
            (Some(u), Some(l)) if u > 0.0 => format!("{:.3}x", l / u),
            _ => "n/a".into(),
        };
        let cell = |min: Option<&str>, max: Option<&str>| format!("{} [{}]", min.unwrap_or("?"), max.unwrap_or("?"));
        println!(
            "{:<12} {:>22} {:>22} {:>8}",
            &c.name["bench_".len()..],
            cell(u, figure(c, "unloaded_max")),
            cell(l, figure(c, "loaded_max")),
            ratio
        );
    }
    if let Some(e) = r.checks.iter().find(|c| c.name == "bench_exits") {
        let mut exits: Vec<(&str, &str)> = e
            .figures
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k != "exits" && *k != "steady_getppid_exits")
            .collect();
        exits.sort();
        println!("\nVM exits during the loaded run (all CPUs): {} in all", figure(e, "exits").unwrap_or("?"));
        for (k, v) in exits {
            println!("  {v:>10}  {k}");
        }
        println!(
            "VM exits during a steady getppid loop after it: {}",
            figure(e, "steady_getppid_exits").unwrap_or("?")
        );
    }
    Ok(true)
}

/// `cargo xtask bench paging`: the bench-paging suite in one Bochs boot (native, then
/// `kdbt load` with EPT, then `kdbt load --paging shadow`), its table, and the table and an
/// SVG chart of the ratios written to experiments/results/bench-paging/.
fn bench_paging(kernel: String, cpus: u32, exit_cycles: u64) -> Result<bool> {
    // Three passes of the benchmarks, one of them on shadow paging (every CR3 write and
    // most page faults exit, and Bochs emulates each exit): longer than a suite run.
    let Some((a, r)) = bench_run("bench-paging", kernel, cpus, Some(2400))? else { return Ok(false) };
    let title = format!("kdbt bench paging: {} guest, {} CPUs, Bochs {}", a.kernel, a.cpus, a.cpu_model);
    let dir = workspace_root().join("experiments/results/bench-paging");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let bochs_note = "(in Bochs RDTSC advances with executed instructions: ticks are instruction counts, and the\n \
         transition of a VM exit or a 2-D page walk costs ~0; the exit handler's own instructions are counted)";
    paging_report(&r.checks, &title, bochs_note, exit_cycles, &dir.join("table.txt"), &dir.join("ratios.svg"))?;
    std::fs::write(dir.join("checks.txt"), raw_checks(&r.checks, "paging_"))
        .with_context(|| format!("write {}", dir.join("checks.txt").display()))?;
    Ok(true)
}

/// `cargo xtask bench paging --from-log FILE`: the table and chart of a bench-paging run made
/// on a machine with VT-x (experiments/vm/host-suite.sh), where ticks are real TSC cycles.
fn bench_paging_from_log(log: &Path, exit_cycles: u64) -> Result<bool> {
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let o = results::parse(&text);
    let failed: Vec<String> =
        o.checks.iter().filter(|c| !c.pass).map(|c| format!("{} {}", c.name, c.figures)).collect();
    if !failed.is_empty() {
        bail!("{} failed checks in {}:\n  {}", failed.len(), log.display(), failed.join("\n  "));
    }
    let stem = log.file_stem().and_then(|s| s.to_str()).unwrap_or("bench-paging");
    let parent = log.parent().unwrap_or(Path::new("."));
    let title = format!("kdbt bench paging: {}", log.display());
    let note = "(TSC cycles measured on real hardware: exits and 2-D walks are already in the ticks;\n \
         give --exit-cycles 0 so the modeled columns equal the measured ones)";
    paging_report(
        &o.checks,
        &title,
        note,
        exit_cycles,
        &parent.join(format!("{stem}-table.txt")),
        &parent.join(format!("{stem}-ratios.svg")),
    )?;
    Ok(true)
}

/// Prints the bench-paging table, exits and citations, and writes the table and the chart.
fn paging_report(
    checks: &[results::Check],
    title: &str,
    clock_note: &str,
    exit_cycles: u64,
    txt: &Path,
    svg: &Path,
) -> Result<()> {
    let rows = paging::collect(checks)?;
    let mut out = String::new();
    out.push_str(&format!("{title}: RDTSC ticks per operation\n{clock_note}\n"));
    out.push_str(
        "(fastest of 5 repetitions, the slowest in brackets; ratios use the fastest; exits/op = VM exits\n \
         on all CPUs during all repetitions / operations)\n",
    );
    out.push_str(&format!(
        "modeled = ticks + exits/op x {exit_cycles} cycles per VM exit round trip (one tick counted as one cycle)\n"
    ));
    if exit_cycles == paging::EXIT_ROUND_TRIP_CYCLES {
        out.push_str(&format!("  source: {}\n", paging::EXIT_SOURCE));
    } else {
        out.push_str("  (--exit-cycles given: not the cited default)\n");
    }
    out.push_str(&format!("  2-D page walks: {}\n\n", paging::TWO_D_WALK));
    out.push_str(&paging::table(&rows, exit_cycles));
    out.push('\n');
    out.push_str(&paging::exits_report(&rows));
    print!("\n{out}");
    std::fs::write(txt, &out).with_context(|| format!("write {}", txt.display()))?;
    std::fs::write(svg, paging::svg(&rows, exit_cycles, title)).with_context(|| format!("write {}", svg.display()))?;
    println!("\ntable: {}\nchart: {}", txt.display(), svg.display());
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// State shared by the runs of one xtask invocation.
#[derive(Default)]
struct Ctx {
    guest_bins: Option<Vec<PathBuf>>,
}

struct RunReport {
    table: String,
    passed: bool,
    checks: Vec<results::Check>,
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn default_timeout(spec: &kernel::Spec, emulator: Emulator, cpus: u32) -> u64 {
    let per_cpu = match (emulator, spec) {
        (Emulator::Qemu, kernel::Spec::Small) => 60,
        (Emulator::Qemu, _) => 120,
        // smoke + hypervisor on the small kernel: ~300 s of emulator time with 2 CPUs
        // (400 s with the build; 420 s was too tight for a slower CI host).
        (Emulator::Bochs, kernel::Spec::Small) => 300,
        // A stock Debian kernel boots in 40-90 s with one CPU, several times that with two,
        // and slower still when the host is busy; smoke + hypervisor on Debian 6.12 with 2
        // CPUs: ~1000 s of emulator time.
        (Emulator::Bochs, _) => 800,
    };
    per_cpu * u64::from(cpus.max(1)) + 60
}

/// The exact kernel command line of a run.
fn cmdline(emulator: Emulator, cpus: u32, suite: &str, inject_fail: bool, append: &str, paging: Paging) -> String {
    let mut s = format!(
        "console=ttyS0,115200 printk.devkmsg=on panic=-1 kdbt.expect_vmx={} kdbt.cpus={cpus} kdbt.suite={suite} kdbt.paging={}",
        u8::from(emulator.has_vmx()),
        paging.name()
    );
    if inject_fail {
        s.push_str(" kdbt.inject_fail=1");
    }
    if !append.trim().is_empty() {
        s.push(' ');
        s.push_str(append.trim());
    }
    s
}

fn inject_from_env() -> bool {
    std::env::var("KDBT_VM_INJECT_FAIL").map(|v| !v.is_empty() && v != "0").unwrap_or(false)
}

fn vm_run(ctx: &mut Ctx, a: &VmArgs, show_info: bool) -> Result<RunReport> {
    let total = Timer::start();
    let spec = kernel::parse_spec(&a.kernel)?;
    // Validate the suites before any long step.
    image::syntax_check(&image::init_script(&a.suite)?)?;

    let mut pkgs: Vec<&str> = deps::BASE.to_vec();
    pkgs.extend(match a.emulator {
        Emulator::Bochs => deps::BOCHS,
        Emulator::Qemu => deps::QEMU,
    });
    if spec == kernel::Spec::Small {
        pkgs.extend(deps::SMALL_KERNEL);
    }
    deps::ensure(&pkgs)?;

    let run_name = format!(
        "{}-{}-{}-{}cpu{}",
        sanitize(&a.suite),
        sanitize(a.kernel.rsplit('/').next().unwrap_or(&a.kernel)),
        a.emulator.name(),
        a.cpus,
        if a.paging == Paging::Shadow { "-shadow" } else { "" }
    );
    // Another xtask may be running the same configuration: each run holds a lock on its
    // directory, and a busy one is not shared (name-2, name-3, ...).
    let (dir, _lock) = util::locked_dir(&workspace_root().join("target/vm"), &run_name)?;
    step(format!("run {run_name} (logs in {})", dir.display()));

    let k = kernel::resolve(&spec, &a.kernel, a.kdir.as_deref())?;
    note(format!("kernel {} ({}), built against {}", k.release, k.vmlinuz.display(), k.kdir.display()));

    let bins = match &ctx.guest_bins {
        Some(b) => b.clone(),
        None => {
            let b = image::build_guest_bins(&dir.join("guest-build.json"))?;
            ctx.guest_bins = Some(b.clone());
            b
        }
    };
    let ko = dir.join("kdbt.ko");
    let _ = std::fs::remove_file(&ko);
    let mlog = dir.join("module-build.log");
    let _ = std::fs::remove_file(&mlog);
    image::build_module(&k, &dir, &ko, &mlog)?;

    let inject = a.inject_fail || inject_from_env();
    let initrd = image::build_initramfs(
        &image::InitrdSpec { suite: &a.suite, ko: &ko, bins: &bins, extra_root: a.extra_root.as_deref() },
        &dir,
    )?;
    let cmd = cmdline(a.emulator, a.cpus, &a.suite, inject, &a.append, a.paging);
    note(format!("cmdline: {cmd}"));
    let iso = image::build_iso(&k.vmlinuz, &initrd, &cmd, &dir)?;
    let timeout = a.timeout.unwrap_or_else(|| default_timeout(&spec, a.emulator, a.cpus));
    let b = emu::boot(&emu::Machine {
        emulator: a.emulator,
        cpu_model: &a.cpu_model,
        cpus: a.cpus,
        mem_mb: a.mem,
        timeout: Duration::from_secs(timeout),
        iso: &iso,
        dir: &dir,
    })?;
    let mut o = results::parse(&b.serial);
    o.machine_reset(b.resets);
    let mut problems = o.problems(b.timed_out);
    if let Some(e) = &b.exited_early {
        problems.push(e.clone());
    }
    let info = results::RunInfo {
        suite: if a.paging == Paging::Shadow { format!("{} (shadow paging)", a.suite) } else { a.suite.clone() },
        kernel: format!("{} ({})", k.label, k.release),
        emulator: if a.emulator == Emulator::Bochs { format!("bochs {}", a.cpu_model) } else { "qemu tcg".into() },
        cpus: a.cpus,
        boot_secs: b.boot_secs,
        wall_secs: b.wall_secs,
        total_secs: total.secs(),
        dir: dir.display().to_string(),
    };
    let table = results::table(&info, &o, &problems);
    let passed = problems.is_empty();
    if show_info || !passed {
        // On failure only the last INFO lines: the checks and log tails follow.
        let skip = if show_info { 0 } else { o.infos.len().saturating_sub(TAIL) };
        println!(
            "\n--- guest output (KDBT-INFO{}) ---",
            if skip > 0 { format!(", last {TAIL} of {}", o.infos.len()) } else { String::new() }
        );
        for i in &o.infos[skip..] {
            println!("  {i}");
        }
    }
    if !passed {
        print_tails(&dir, a.emulator);
    }
    note(format!("run {run_name} took {:.0} s in all", total.secs()));
    Ok(RunReport { table, passed, checks: o.checks })
}

fn print_tails(dir: &Path, emulator: Emulator) {
    // Bochs' own terminal: where it says why it aborted (glibc, ALSA, its panics).
    let term: &[(&str, usize)] = match emulator {
        Emulator::Bochs => &[("bochs.term", 10)],
        Emulator::Qemu => &[],
    };
    for &(name, n) in [("serial.log", TAIL), (emulator.log_name(), TAIL)].iter().chain(term) {
        let p = dir.join(name);
        println!("\n--- last {n} lines of {} ---", p.display());
        match tail_lines(&p, n) {
            Ok(t) => println!("{}", util::strip_terminal_codes(&t)),
            Err(e) => println!("({e:#})"),
        }
    }
}

fn test(
    no_unit: bool,
    with_61: bool,
    full: bool,
    inject_fail: bool,
    unit_timeout: Duration,
    one_lane: bool,
) -> Result<bool> {
    let t = Timer::start();
    let mut summary: Vec<(String, bool)> = Vec::new();
    let mut tables = Vec::new();
    // The vmlinux corpus (and xtask's own unit test of it) decompresses kernel images.
    deps::ensure(deps::VMLINUZ)?;
    // The three suites in one boot per kernel: Debian kernels take minutes to boot in Bochs.
    let base = VmArgs {
        suite: "smoke,hypervisor,dbt".into(),
        kernel: "small".into(),
        kdir: None,
        cpu_model: "corei7_skylake_x".into(),
        cpus: 2,
        mem: 512,
        emulator: Emulator::Bochs,
        timeout: None,
        inject_fail,
        append: String::new(),
        paging: Paging::Ept,
        extra_root: None,
        table_out: None,
    };
    let mut runs = vec![
        // The small kernel's boot also runs the kernel-scope DBT checks (~5 minutes
        // more: 794 s in all; Debian 6.12's would add more than 10, so by hand there).
        VmArgs { suite: "smoke,hypervisor,dbt,dbt-kernel".into(), timeout: Some(1500), ..base.clone() },
        // A fatal exit panics the guest, which ends its boot: a boot of its own (1 CPU).
        VmArgs { suite: "fatal".into(), cpus: 1, ..base.clone() },
        // Hidden hypervisor memory: the guest reads cpu1's VMCS and must panic naming it.
        VmArgs { suite: "fatal-hidden".into(), ..base.clone() },
        // Shadow paging (issue 9): the hypervisor suite on shadow page tables, then the
        // mapping-stress and policy checks failing on purpose under their test hooks
        // (~5.5 minutes; the timeout allows for a busy host).
        VmArgs { suite: "hypervisor,shadow-hook".into(), paging: Paging::Shadow, timeout: Some(900), ..base.clone() },
        // Suspend to RAM while loaded (the small kernel has CONFIG_SUSPEND), and three ways
        // of resetting the machine while loaded, each ending its boot.
        VmArgs { suite: "suspend".into(), ..base.clone() },
        VmArgs { suite: "reboot".into(), ..base.clone() },
        VmArgs { suite: "reboot-emergency".into(), ..base.clone() },
        VmArgs { suite: "reboot-panic".into(), ..base.clone() },
        // ~1,500 s alone, 1,825 s in lane 2 beside the unit tests' compiles and the small
        // kernel's boot (2026-12-08); the default (1,660 s) timed out on a slower CI host.
        VmArgs { kernel: "debian-6.12".into(), timeout: Some(3000), ..base.clone() },
        // Call-depth tracking (`retbleed=stuff`, Debian 6.12 has it): the kernel's return
        // thunk, which root mode's returns go through, touches %gs; with a host GS base of
        // 0 the first VM exit reset the machine. One CPU keeps the boot short (~2 min).
        VmArgs {
            suite: "demo".into(),
            kernel: "debian-6.12".into(),
            cpus: 1,
            append: "retbleed=stuff".into(),
            paging: Paging::Ept,
            ..base.clone()
        },
        VmArgs { emulator: Emulator::Qemu, ..base.clone() },
        VmArgs { emulator: Emulator::Qemu, kernel: "debian-6.12".into(), ..base.clone() },
        // The 6.1 series: kdbt.ko built against its headers, and the no-VT-x paths (a
        // minute); `--with-61` adds the Bochs run (about 11 minutes).
        VmArgs { emulator: Emulator::Qemu, kernel: "debian-6.1".into(), ..base.clone() },
    ];
    if with_61 {
        runs.push(VmArgs { kernel: "debian-6.1".into(), ..base.clone() });
    }
    if full {
        runs.push(VmArgs {
            suite: "hypervisor".into(),
            kernel: "debian-6.12".into(),
            paging: Paging::Shadow,
            timeout: Some(2400),
            ..base.clone()
        });
    }
    // Lane 2: the Debian 6.12 Bochs runs (the longest, ~27 minutes together) go on beside
    // the rest, each Bochs on a core of its own (`--one-lane`: one after another).
    let lane = if !one_lane && util::nproc() >= 2 {
        let (two, one): (Vec<VmArgs>, Vec<VmArgs>) =
            runs.into_iter().partition(|a| a.emulator == Emulator::Bochs && a.kernel == "debian-6.12");
        // Both lanes would otherwise install packages or fetch the same kernel at once.
        let prefetch = || -> Result<lane::Lane> {
            let mut pkgs: Vec<&str> = deps::BASE.to_vec();
            pkgs.extend(deps::BOCHS.iter().chain(deps::QEMU).chain(deps::SMALL_KERNEL));
            deps::ensure(&pkgs)?;
            let mut kernels: Vec<&str> = two.iter().map(|a| a.kernel.as_str()).collect();
            kernels.sort_unstable();
            kernels.dedup();
            for k in kernels {
                kernel::resolve(&kernel::parse_spec(k)?, k, None)?;
            }
            lane::start(two.iter().map(|a| lane::LaneJob { label: a.label(), args: a.cli_args() }).collect())
        };
        match prefetch() {
            Ok(l) => {
                runs = one;
                Some(l)
            }
            Err(e) => {
                // Each run then reports its own error, as in one lane.
                note(format!("lane 2 not started ({e:#}): its runs go one after another with the rest"));
                runs = one.into_iter().chain(two).collect();
                None
            }
        }
    } else {
        None
    };
    if !no_unit {
        step(format!("host unit tests: cargo test --workspace (limit {} s)", unit_timeout.as_secs()));
        let ut = Timer::start();
        let mut cmd = Command::new(cargo());
        cmd.current_dir(workspace_root()).args(["test", "--workspace"]);
        let label = "cargo test --workspace".to_string();
        match emu::run_with_timeout(&mut cmd, unit_timeout)? {
            Some(st) => {
                note(format!("unit tests: {st} after {:.0} s", ut.secs()));
                tables.push(format!("{label}: {} ({:.0} s)\n", if st.success() { "PASS" } else { "FAIL" }, ut.secs()));
                summary.push((label, st.success()));
            }
            None => {
                tables.push(format!("{label}: FAIL (timed out after {} s; killed)\n", unit_timeout.as_secs()));
                summary.push((label, false));
            }
        }
        if emu::interrupted() {
            bail!("interrupted");
        }
    }
    // Real kernels as the DBT's corpus (offline, seconds): the small kernel
    // (Debian's 6.12 source), whose build tree has vmlinux and System.map, and
    // Debian's stock 6.12 and 6.1 (no symbols: function starts from their code,
    // endbr64s on 6.12, calls of __fentry__ on 6.1, which has no IBT).
    for k in ["small", "debian-6.12", "debian-6.1"] {
        let label = format!("vmlinux-corpus {k}");
        let ok = vmlinux::corpus(k).unwrap_or_else(|e| {
            eprintln!("error in {label}: {e:#}");
            false
        });
        tables.push(format!("{label}: {}\n", if ok { "PASS" } else { "FAIL" }));
        summary.push((label, ok));
    }
    let mut ctx = Ctx::default();
    for a in &runs {
        let label = a.label();
        if emu::interrupted() {
            bail!("interrupted");
        }
        match vm_run(&mut ctx, a, false) {
            Ok(r) => {
                tables.push(r.table);
                summary.push((label, r.passed));
            }
            Err(e) => {
                eprintln!("error in {label}: {e:#}");
                tables.push(format!("{label}: ERROR {e:#}\n"));
                summary.push((label, false));
            }
        }
    }
    if let Some(l) = lane {
        for r in l.finish() {
            tables.push(r.table);
            summary.push((r.label, r.passed));
        }
    }
    println!("\n===== summary =====");
    for tb in &tables {
        println!("{tb}");
    }
    let ok = summary.iter().all(|(_, p)| *p);
    for (l, p) in &summary {
        println!("{}  {l}", if *p { "PASS" } else { "FAIL" });
    }
    println!("{} in {:.0} s", if ok { "ALL PASSED" } else { "FAILED" }, t.secs());
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_tells_the_guest_what_to_expect() {
        let c = cmdline(Emulator::Bochs, 2, "smoke", false, "", Paging::Ept);
        assert!(c.contains("console=ttyS0,115200") && c.contains("printk.devkmsg=on"));
        assert!(c.contains("kdbt.expect_vmx=1") && c.contains("kdbt.cpus=2"));
        assert!(!c.contains("inject"));
        let q = cmdline(Emulator::Qemu, 1, "smoke", true, "x=1", Paging::Shadow);
        assert!(q.contains("kdbt.expect_vmx=0") && q.contains("kdbt.inject_fail=1"));
        assert!(c.contains("kdbt.paging=ept") && q.contains("kdbt.paging=shadow"));
    }

    #[test]
    fn a_lane_run_is_the_run_it_stands_for() {
        // Every field off its default, an --append value that starts with a dash.
        let a = VmArgs {
            suite: "smoke,dbt".into(),
            kernel: "debian-6.12".into(),
            kdir: Some(PathBuf::from("/k dir")),
            cpu_model: "corei3_cnl".into(),
            cpus: 1,
            mem: 1024,
            emulator: Emulator::Qemu,
            timeout: Some(2400),
            inject_fail: true,
            append: "-x retbleed=stuff".into(),
            paging: Paging::Shadow,
            extra_root: Some(PathBuf::from("/r")),
            table_out: None,
        };
        let argv = ["xtask".to_string(), "vm".to_string()].into_iter().chain(a.cli_args());
        let Cmd::Vm(b) = Cli::try_parse_from(argv).unwrap().cmd else { panic!("not vm") };
        assert_eq!(b.cli_args(), a.cli_args());
        assert_eq!(
            (b.suite.as_str(), b.kernel.as_str(), b.cpu_model.as_str()),
            ("smoke,dbt", "debian-6.12", "corei3_cnl")
        );
        assert_eq!((b.cpus, b.mem, b.timeout, b.inject_fail), (1, 1024, Some(2400), true));
        assert_eq!((b.emulator, b.paging, b.append.as_str()), (Emulator::Qemu, Paging::Shadow, "-x retbleed=stuff"));
        assert_eq!((b.kdir, b.extra_root), (Some(PathBuf::from("/k dir")), Some(PathBuf::from("/r"))));
        assert_eq!(a.label(), "smoke,dbt debian-6.12 qemu 1cpu shadow");
        // The defaults come back as defaults.
        let argv = ["xtask".to_string(), "vm".to_string()];
        let Cmd::Vm(d) = Cli::try_parse_from(argv).unwrap().cmd else { panic!("not vm") };
        let Cmd::Vm(e) =
            Cli::try_parse_from(["xtask".to_string(), "vm".to_string()].into_iter().chain(d.cli_args())).unwrap().cmd
        else {
            panic!("not vm")
        };
        assert_eq!((e.timeout, e.kdir, e.append.as_str(), e.inject_fail), (None, None, "", false));
    }

    #[test]
    fn test_full_implies_the_61_run() {
        let c = Cli::try_parse_from(["xtask", "test", "--full"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Test { full: true, with_61: false, .. }));
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from([
            "xtask",
            "vm",
            "--suite",
            "smoke",
            "--kernel",
            "linux-image-6.1.0-56-amd64",
            "--cpus",
            "1",
            "--emulator",
            "qemu",
            "--timeout",
            "30",
            "--mem",
            "1024",
            "--cpu-model",
            "corei3_cnl",
        ])
        .unwrap();
        let Cmd::Vm(a) = c.cmd else { panic!("not vm") };
        assert_eq!((a.cpus, a.mem, a.timeout), (1, 1024, Some(30)));
        assert_eq!(a.emulator, Emulator::Qemu);
        assert!(Cli::try_parse_from(["xtask", "vm", "--cpus", "0"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "vm", "--emulator", "kvm"]).is_err());
    }
}
