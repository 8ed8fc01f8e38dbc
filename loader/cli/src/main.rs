//! `kdbt`: the command-line front end of the kdbt kernel module.
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use vmx::caps::{RawCaps, VmxCaps};

mod dbt;
mod device;
mod drcov;
mod kallsyms;
mod module;

use std::path::PathBuf;

use anyhow::{bail, Context};
use device::{CommandError, Device};

#[derive(Parser)]
#[command(name = "kdbt", version, about = "kdbt: VT-x late launch and kernel dynamic binary translation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `kdbt load --paging`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Paging {
    Ept,
    Shadow,
}

impl Paging {
    /// `--paging`, else `$KDBT_PAGING` (ept|shadow), else EPT.
    fn resolve(arg: Option<Paging>) -> Result<Paging> {
        if let Some(p) = arg {
            return Ok(p);
        }
        match std::env::var("KDBT_PAGING").as_deref() {
            Err(_) | Ok("") | Ok("ept") => Ok(Paging::Ept),
            Ok("shadow") => Ok(Paging::Shadow),
            Ok(other) => bail!("KDBT_PAGING={other}: expected ept or shadow"),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Show each online CPU's VT-x capabilities, as read from its MSRs by the module.
    Caps {
        /// One line per CPU of key=value pairs (for scripts).
        #[arg(long, conflicts_with = "json")]
        summary: bool,
        /// JSON: per CPU, the raw MSR values and the decoded summary.
        #[arg(long)]
        json: bool,
    },
    /// Launch the hypervisor beneath the running kernel on every CPU (inserts the module
    /// first if needed).
    Load {
        /// kdbt.ko to insert (default: $KDBT_MODULE, beside this binary, then
        /// /lib/modules/$(uname -r)/{updates,extra}).
        #[arg(long)]
        module: Option<PathBuf>,
        /// Module parameter NAME=VALUE, for a module this command inserts (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// How guest memory is virtualized: `ept` (identity-mapped EPT) or `shadow`
        /// (no EPT: shadow page tables built from the kernel's own) [default: $KDBT_PAGING,
        /// else ept].
        #[arg(long, value_enum)]
        paging: Option<Paging>,
        /// Test hook (shadow paging only): the shadow MMU ignores INVLPG of user
        /// addresses, leaving stale translations (shows the mapping stress check failing).
        #[arg(long, hide = true)]
        test_ignore_user_invlpg: bool,
    },
    /// Devirtualize every CPU, then remove the module.
    Unload {
        /// Leave the module inserted.
        #[arg(long)]
        keep_module: bool,
    },
    /// Per CPU: virtualized or not, launch time, VM exits by reason.
    Status {
        /// Machine-readable output.
        #[arg(long, conflicts_with = "summary")]
        json: bool,
        /// One line per CPU of key=value pairs (exit reasons as snake_case keys).
        #[arg(long)]
        summary: bool,
    },
    /// Check per-page EPT permission changes on a scratch page (none, R, RW, RX, X-only,
    /// RWX), each followed by INVEPT on every CPU.
    EptCheck {
        /// Instead, read a page without EPT rights: the kernel must panic with kdbt's
        /// diagnostic of the fatal EPT violation (for tests; this ends the machine).
        #[arg(long)]
        violate: bool,
        /// With --violate: read hypervisor memory instead (the VMCS of the last CPU, hidden
        /// from the guest): the panic must name it (for tests; this ends the machine).
        #[arg(long, requires = "violate")]
        hidden: bool,
    },
    /// Check NMI delivery on every CPU: an NMI sent to it and one held back while its NMI
    /// handler runs must both arrive (through kdbt's NMI exits and the NMI window).
    NmiCheck,
    /// Shadow paging: a page made not writable (the permission policy hook) must trap a
    /// write on every CPU, through a shadow leaf that was writable before.
    ShadowCheck {
        /// Test hook: do not apply the policy to existing shadow leaves (must fail).
        #[arg(long, hide = true)]
        test_skip_apply: bool,
    },
    /// Run kernel functions from the kernel DBT's code cache, in the kernel's own context,
    /// and compare them with native calls (needs the module, not VT-x); inserts the module
    /// if it is not.
    DbtSelftest {
        /// kdbt.ko to insert if it is not inserted yet (default: as for `load`).
        #[arg(long)]
        module: Option<PathBuf>,
        /// Test hook: call the functions natively where their translations were meant
        /// (the check that they ran from the code cache must fail).
        #[arg(long, hide = true)]
        test_native: bool,
        /// Test hook: the dispatcher allocates with kmalloc instead of its pool (the check
        /// that nothing called kmalloc with interrupts off must fail).
        #[arg(long, hide = true)]
        no_pool: bool,
        /// Test hook: the EPT steering check's target keeps its execute right (the check
        /// that a #VE caught it must fail).
        #[arg(long, hide = true)]
        no_steer: bool,
    },
    /// Run a loaded module's code from the kernel DBT's code cache on every CPU, steered
    /// there by EPT (needs `kdbt load` with EPT on a CPU with EPT-violation #VE).
    Start {
        /// The module to translate (its name in /proc/modules); it cannot be removed
        /// until `kdbt stop`.
        #[arg(long, required_unless_present = "kernel", conflicts_with = "kernel")]
        module: Option<String>,
        /// Experimental (README, "What works today"): translate the kernel's own text
        /// instead (its entry text and its thunks' pages stay native, modules run
        /// natively). Checked with a short workload on the small kernel and Debian 6.12.
        #[arg(long, hide = true)]
        kernel: bool,
        /// Instrumentation.
        #[arg(long, value_enum, default_value = "null")]
        client: dbt::ClientKind,
        /// Test hook: leave the module's text executable, so nothing steers its native
        /// entries into the cache (the checks that it ran translated must fail).
        #[arg(long, hide = true)]
        test_no_steer: bool,
        /// Test hook: writes to the module's text are let through without invalidating
        /// the written page's translations (the checks that a patch takes effect must
        /// fail).
        #[arg(long, hide = true)]
        test_no_invalidate: bool,
        /// Test hook: the module's fault sites (instructions with exception-table
        /// entries) are copied in line, without a slot kdbt's own table knows (a fault
        /// of one while translated oopses: the user-pointer checks must fail).
        #[arg(long, hide = true)]
        test_no_fault_slots: bool,
        /// Test hook (--kernel): the entry text's calls into the kernel's text are not
        /// redirected into the cache, so each is steered by a #VE (the check that a
        /// system-call loop is steered 0 times must fail).
        #[arg(long, hide = true)]
        test_no_redirect: bool,
        /// Test hook: a cache capacity limit of a fifth of the cache (1 MB for the
        /// kernel), below a workload's translations, so the cache is reset while other
        /// CPUs run translated code.
        #[arg(long, hide = true)]
        test_small_cache: bool,
        /// Test hook: an oops in translated code is reported with the code cache's
        /// registers, not the native ones (the check that the report names the native
        /// function must fail).
        #[arg(long, hide = true)]
        test_no_oops_map: bool,
    },
    /// Stop translating: every CPU runs the module natively again.
    Stop,
    /// The running translation: blocks, dispatches, links, per CPU the entries steered
    /// by EPT (#VE), dispatcher entries and (inscount) instructions.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Do not name the symbols in the native regions (skips reading /proc/kallsyms:
        /// for scripts that poll the figures; reading it through the translated kernel
        /// costs seconds of emulator time in Bochs).
        #[arg(long)]
        no_symbols: bool,
    },
    /// bbcov: the executed blocks with their hit counts, named through /proc/kallsyms,
    /// hottest first.
    Cov {
        /// Sum per function instead of listing blocks.
        #[arg(long)]
        functions: bool,
        /// Only the N hottest rows.
        #[arg(long, value_name = "N")]
        top: Option<usize>,
        /// Write the blocks to FILE in drcov format (module table from /proc/modules,
        /// offsets from each module's base) instead of listing them.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["functions", "top"])]
        drcov: Option<PathBuf>,
    },
    /// Show the versions of the CLI and of the loaded module.
    Version,
}

fn main() -> ExitCode {
    // A reader that closes the pipe early (`kdbt stats | grep -q …`, `| head`) ends kdbt
    // quietly, as it ends cat or ls, instead of a panic in println! on EPIPE (the Rust
    // runtime ignores SIGPIPE). Every change kdbt makes is done before it prints.
    // SAFETY: sets a signal disposition to the default before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kdbt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Caps { summary, json } => caps(summary, json),
        Cmd::Load { module, params, paging, test_ignore_user_invlpg } => {
            load(module, &params, Paging::resolve(paging)?, test_ignore_user_invlpg)
        }
        Cmd::Unload { keep_module } => unload(keep_module),
        Cmd::Status { json, summary } => status(json, summary),
        Cmd::EptCheck { violate: false, .. } => {
            println!("kdbt: EPT check passed: {}", Device::open()?.ept_check()?);
            Ok(())
        }
        Cmd::EptCheck { violate: true, hidden } => {
            let r = Device::open()?.ept_violate(if hidden { kdbt_abi::EPT_VIOLATE_HIDDEN } else { 0 });
            bail!("the kernel did not panic: {}", r.err().map_or(String::from("no error either"), |e| format!("{e:#}")))
        }
        Cmd::ShadowCheck { test_skip_apply } => {
            let flags = if test_skip_apply { kdbt_abi::SHADOW_CHECK_TEST_SKIP_APPLY } else { 0 };
            println!("kdbt: shadow policy check passed: {}", Device::open()?.shadow_check(flags)?);
            Ok(())
        }
        Cmd::DbtSelftest { module, test_native, no_pool, no_steer } => {
            if !module::is_inserted() {
                let path = match module {
                    Some(p) => p,
                    None => module::default_path().context(
                        "kdbt.ko not found ($KDBT_MODULE, beside this binary, /lib/modules/$(uname -r)); pass --module PATH",
                    )?,
                };
                module::insert(&path, "")?;
            }
            let mut flags = 0;
            if test_native {
                flags |= kdbt_abi::DBT_SELFTEST_TEST_NATIVE;
            }
            if no_pool {
                flags |= kdbt_abi::DBT_SELFTEST_NO_POOL;
            }
            if no_steer {
                flags |= kdbt_abi::DBT_SELFTEST_NO_STEER;
            }
            println!("kdbt: {}", Device::open()?.dbt_selftest(flags)?);
            Ok(())
        }
        Cmd::Start {
            module,
            kernel,
            client,
            test_no_steer,
            test_no_invalidate,
            test_no_fault_slots,
            test_no_redirect,
            test_small_cache,
            test_no_oops_map,
        } => {
            let tests = dbt::TestHooks {
                no_steer: test_no_steer,
                no_invalidate: test_no_invalidate,
                no_fault_slots: test_no_fault_slots,
                no_redirect: test_no_redirect,
                small_cache: test_small_cache,
                no_oops_map: test_no_oops_map,
            };
            match module {
                Some(m) if !kernel => dbt::start(&m, client, tests),
                _ => dbt::start_kernel(client, tests),
            }
        }
        Cmd::Stop => dbt::stop(),
        Cmd::Stats { json, no_symbols } => dbt::stats(json, !no_symbols),
        Cmd::Cov { functions, top, drcov } => dbt::cov(functions, top, drcov.as_deref()),
        Cmd::NmiCheck => {
            println!("kdbt: NMI check passed: {}", Device::open()?.nmi_check()?);
            Ok(())
        }
        Cmd::Version => {
            let v = device::Device::open()?.version()?;
            println!("kdbt CLI {} (ABI {})", env!("CARGO_PKG_VERSION"), kdbt_abi::ABI_VERSION);
            println!(
                "kdbt module {} (ABI {}), {} of {} CPUs online",
                kdbt_abi::fixed_str_read(&v.module_version),
                v.abi_version,
                v.cpus_online,
                v.cpu_ids
            );
            Ok(())
        }
    }
}

fn caps(summary: bool, json: bool) -> Result<()> {
    let raws: Vec<RawCaps> = device::Device::open()?.caps()?;
    if json {
        let cpus: Vec<serde_json::Value> = raws.iter().map(caps_json).collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "cpus": cpus }))?);
        return Ok(());
    }
    for raw in &raws {
        let caps = VmxCaps::decode(raw);
        if summary {
            println!("{}", caps.summary());
        } else {
            print!("{caps}");
            println!();
        }
    }
    Ok(())
}

/// Raw MSR values (as hex strings, null when the read faulted) plus the decoded summary.
fn caps_json(raw: &RawCaps) -> serde_json::Value {
    let caps = VmxCaps::decode(raw);
    let mut msrs = serde_json::Map::new();
    for (name, msr, value) in raw.msrs() {
        msrs.insert(
            name.to_string(),
            serde_json::json!({
                "msr": format!("{msr:#x}"),
                "value": value.map(|v| format!("{v:#018x}")),
            }),
        );
    }
    let mut summary = serde_json::Map::new();
    for kv in caps.summary().to_string().split_whitespace() {
        if let Some((k, v)) = kv.split_once('=') {
            let v = v.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| v.into());
            summary.insert(k.to_string(), v);
        }
    }
    serde_json::json!({ "summary": summary, "msrs": msrs })
}

fn load(module: Option<PathBuf>, params: &[String], paging: Paging, ignore_user_invlpg: bool) -> Result<()> {
    let mut flags = if paging == Paging::Shadow { kdbt_abi::LOAD_SHADOW_PAGING } else { 0 };
    if ignore_user_invlpg {
        flags |= kdbt_abi::LOAD_TEST_IGNORE_USER_INVLPG;
    }
    let inserted_here = if module::is_inserted() {
        if !params.is_empty() {
            bail!("the kdbt module is already inserted; --param only applies when `kdbt load` inserts it (run `kdbt unload` first)");
        }
        false
    } else {
        let path = match module {
            Some(p) => p,
            None => module::default_path().context(
                "kdbt.ko not found ($KDBT_MODULE, beside this binary, /lib/modules/$(uname -r)); pass --module PATH",
            )?,
        };
        module::insert(&path, &params.join(" "))?;
        true
    };
    let err = match Device::open().and_then(|d| d.load(flags)) {
        Ok(Ok(())) => {
            let (_, cpus) = Device::open()?.status()?;
            let n = cpus.iter().filter(|c| c.virtualized != 0).count();
            println!("kdbt: loaded: {n} CPUs virtualized ({} paging)", paging_name(paging == Paging::Shadow));
            return Ok(());
        }
        Ok(Err(CommandError::WrongState)) => anyhow::anyhow!("kdbt is already loaded (see `kdbt status`)"),
        Ok(Err(CommandError::Failed(msg))) => anyhow::anyhow!("load refused: {msg}"),
        Err(e) => e,
    };
    // Leave the machine as we found it.
    if inserted_here {
        let _ = module::remove();
    }
    Err(err)
}

fn unload(keep_module: bool) -> Result<()> {
    if !module::is_inserted() {
        bail!("kdbt is not loaded (the module is not inserted)");
    }
    // The device must be closed before the module can be removed below.
    let result = Device::open()?.unload()?;
    match result {
        Ok(()) => println!("kdbt: all CPUs devirtualized"),
        Err(CommandError::WrongState) => {
            // Nothing to devirtualize: say so, but still leave no idle module behind.
            if keep_module {
                bail!("kdbt is not loaded (no CPU is virtualized)");
            }
            module::remove()?;
            bail!("kdbt was not loaded (no CPU was virtualized); removed the idle module");
        }
        Err(CommandError::Failed(msg)) => bail!("unload failed: {msg}"),
    }
    if !keep_module {
        module::remove()?;
        println!("kdbt: module removed");
    }
    Ok(())
}

/// `CR access` -> `cr_access`, `GDTR/IDTR access` -> `gdtr_idtr_access`.
fn reason_key(r: u32) -> String {
    vmx::exit::reason_name(r)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect::<String>()
        .split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

fn paging_name(shadow: bool) -> &'static str {
    if shadow {
        "shadow"
    } else {
        "ept"
    }
}

/// The shadow-MMU figures as (key, value) pairs, in `kdbt_abi::ShadowStatus` order.
fn shadow_figures(s: &kdbt_abi::ShadowStatus) -> [(&'static str, u64); 13] {
    [
        ("faults_resolved", s.faults_resolved),
        ("faults_reflected", s.faults_reflected),
        ("policy_faults", s.policy_faults),
        ("cr3_switches", s.cr3_switches),
        ("invlpgs", s.invlpgs),
        ("invpcids", s.invpcids),
        ("reclaims", s.reclaims),
        ("pool_resets", s.pool_resets),
        ("root_evictions", s.root_evictions),
        ("full_flushes", s.full_flushes),
        ("shadow_pages_in_use", s.pages_in_use),
        ("shadow_pages_total", s.pages_total),
        ("shadow_roots", s.roots),
    ]
}

fn status(json: bool, summary: bool) -> Result<()> {
    if !module::is_inserted() {
        if summary {
            return Ok(());
        }
        if json {
            println!("{}", serde_json::json!({ "module": false, "loaded": false, "cpus": [] }));
        } else {
            println!("kdbt: module not inserted");
        }
        return Ok(());
    }
    let (loaded, cpus) = Device::open()?.status()?;
    if json {
        let cpus: Vec<_> = cpus
            .iter()
            .map(|c| {
                let exits: serde_json::Map<String, serde_json::Value> = c
                    .exits
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n != 0)
                    .map(|(r, n)| (vmx::exit::reason_name(r as u32).to_string(), (*n).into()))
                    .collect();
                let shadow = c.paging == kdbt_abi::PAGING_SHADOW;
                let mut v = serde_json::json!({
                    "cpu": c.cpu,
                    "online": c.online != 0,
                    "virtualized": c.virtualized != 0,
                    "paging": paging_name(shadow),
                    "launch_cycles": c.launch_cycles,
                    "exits_total": c.exits_total,
                    "exits": exits,
                });
                if shadow {
                    let m: serde_json::Map<String, serde_json::Value> =
                        shadow_figures(&c.shadow).iter().map(|(k, n)| (k.to_string(), (*n).into())).collect();
                    v["shadow"] = m.into();
                }
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "module": true, "loaded": loaded, "cpus": cpus }))?
        );
        return Ok(());
    }
    if summary {
        for c in &cpus {
            let shadow = c.paging == kdbt_abi::PAGING_SHADOW;
            let mut line = format!(
                "cpu={} virtualized={} online={} paging={} launch_cycles={} exits={}",
                c.cpu,
                c.virtualized,
                c.online,
                paging_name(shadow),
                c.launch_cycles,
                c.exits_total
            );
            for (r, n) in c.exits.iter().enumerate().filter(|(_, n)| **n != 0) {
                line.push_str(&format!(" {}={n}", reason_key(r as u32)));
            }
            if shadow {
                for (k, n) in shadow_figures(&c.shadow) {
                    line.push_str(&format!(" {k}={n}"));
                }
            }
            println!("{line}");
        }
        return Ok(());
    }
    if !loaded {
        println!("kdbt: module inserted, hypervisor not loaded");
        return Ok(());
    }
    let held = cpus.iter().filter(|c| c.virtualized != 0).count();
    let online = cpus.iter().filter(|c| c.online != 0).count();
    println!("kdbt: loaded: {held} of {online} online CPUs virtualized");
    for c in &cpus {
        match (c.virtualized != 0, c.online != 0) {
            (true, _) => println!(
                "cpu{}: virtualized, {} paging (launch {} cycles), {} VM exits",
                c.cpu,
                paging_name(c.paging == kdbt_abi::PAGING_SHADOW),
                c.launch_cycles,
                c.exits_total
            ),
            (false, false) => {
                println!("cpu{}: not virtualized (offline; virtualized when it comes online)", c.cpu);
                continue;
            }
            (false, true) => {
                println!("cpu{}: NOT virtualized although online (its launch failed: see dmesg)", c.cpu);
                continue;
            }
        }
        for (r, n) in c.exits.iter().enumerate().filter(|(_, n)| **n != 0) {
            println!("    {:>10}  {}", n, vmx::exit::reason_name(r as u32));
        }
        if c.paging == kdbt_abi::PAGING_SHADOW {
            let figs: Vec<String> = shadow_figures(&c.shadow).iter().map(|(k, n)| format!("{k}={n}")).collect();
            println!("    shadow MMU: {}", figs.join(" "));
        }
    }
    Ok(())
}
