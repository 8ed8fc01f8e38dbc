//! `kdbt start`, `stop`, `stats` and `cov`: the kernel DBT's translation of a module.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::device::{Device, KernelRanges};
use crate::kallsyms::Kallsyms;

/// `kdbt start --client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// No instrumentation.
    Null,
    /// Count executed instructions per CPU (`kdbt stats`).
    Inscount,
    /// Hit count of every executed block (`kdbt cov`).
    Bbcov,
}

impl ClientKind {
    fn abi(self) -> u32 {
        match self {
            ClientKind::Null => kdbt_abi::DBT_CLIENT_NULL,
            ClientKind::Inscount => kdbt_abi::DBT_CLIENT_INSCOUNT,
            ClientKind::Bbcov => kdbt_abi::DBT_CLIENT_BBCOV,
        }
    }

    fn name(abi: u32) -> &'static str {
        match abi {
            kdbt_abi::DBT_CLIENT_INSCOUNT => "inscount",
            kdbt_abi::DBT_CLIENT_BBCOV => "bbcov",
            _ => "null",
        }
    }
}

/// `kdbt start`'s hidden test hooks (each switches one mechanism off, so that the check
/// of that mechanism must fail).
#[derive(Clone, Copy, Debug, Default)]
pub struct TestHooks {
    pub no_steer: bool,
    pub no_invalidate: bool,
    pub no_fault_slots: bool,
    pub no_redirect: bool,
    pub small_cache: bool,
    pub no_oops_map: bool,
}

pub fn start(module: &str, client: ClientKind, tests: TestHooks) -> Result<()> {
    if module == kdbt_abi::KERNEL_SCOPE {
        return start_kernel(client, tests);
    }
    match Device::open()?.dbt_start(module, client.abi(), tests.flags(), None)? {
        Ok(()) => {
            println!("kdbt: started: {module}'s code runs from the code cache on every CPU (client {client:?})");
            Ok(())
        }
        Err(why) => bail!("cannot start: {why}"),
    }
}

/// The kernel's text and entry text from `/proc/kallsyms` text (read as root:
/// unprivileged readers see zeros). The names are looked up line by line: several
/// symbols share these addresses.
fn kernel_ranges(kallsyms: &str) -> Result<KernelRanges> {
    let find = |n: &str| {
        kallsyms
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (a, _, name) = (f.next()?, f.next()?, f.next()?);
                (name == n && f.next().is_none()).then(|| u64::from_str_radix(a, 16).ok()).flatten()
            })
            .filter(|&a| a != 0)
    };
    let get = |n: &str| find(n).with_context(|| format!("/proc/kallsyms has no address for {n} (run as root)"));
    let text = [get("_stext")?, get("_etext")?];
    let entry = [get("__entry_text_start")?, get("__entry_text_end")?];
    if text[0] >= text[1] || entry[0] < text[0] || entry[1] > text[1] || entry[0] > entry[1] {
        bail!("/proc/kallsyms: implausible kernel text {:#x?} and entry text {:#x?}", text, entry);
    }
    let ex_table = match (find("__start___ex_table"), find("__stop___ex_table")) {
        (Some(a), Some(b)) if a <= b => [a, b],
        _ => [0, 0],
    };
    Ok(KernelRanges { text, entry, ex_table })
}

/// `kdbt start --kernel` (experimental: see the README's limitations).
pub fn start_kernel(client: ClientKind, tests: TestHooks) -> Result<()> {
    eprintln!(
        "kdbt: warning: --kernel is experimental (see the README): the entry code itself runs natively, \
         modules too, and an interrupt or a fault in translated code (except at an exception-table site, BUG, WARN or int3) \
         shows the kernel a code-cache pc"
    );
    let text = std::fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    let k = kernel_ranges(&text)?;
    if k.ex_table == [0, 0] {
        eprintln!("kdbt: warning: /proc/kallsyms has no __start___ex_table (CONFIG_KALLSYMS_ALL): a faulting access with a fixup in translated kernel code will oops");
    }
    match Device::open()?.dbt_start(kdbt_abi::KERNEL_SCOPE, client.abi(), tests.flags(), Some(k))? {
        Ok(()) => {
            println!(
                "kdbt: started: the kernel's text ({:#x}+{:#x}) runs from the code cache on every CPU, entry text native{} (client {client:?})",
                k.text[0],
                k.text[1] - k.text[0],
                if tests.no_redirect { ", its calls into the text steered by #VE" } else { ", its calls into the text redirected" }
            );
            Ok(())
        }
        Err(why) => bail!("cannot start: {why}"),
    }
}

impl TestHooks {
    fn flags(self) -> u32 {
        let mut flags = 0;
        for (on, bit) in [
            (self.no_steer, kdbt_abi::DBT_START_TEST_NO_STEER),
            (self.no_invalidate, kdbt_abi::DBT_START_TEST_NO_INVALIDATE),
            (self.no_fault_slots, kdbt_abi::DBT_START_TEST_NO_FAULT_SLOTS),
            (self.no_redirect, kdbt_abi::DBT_START_TEST_NO_REDIRECT),
            (self.small_cache, kdbt_abi::DBT_START_TEST_SMALL_CACHE),
            (self.no_oops_map, kdbt_abi::DBT_START_TEST_NO_OOPS_MAP),
        ] {
            if on {
                flags |= bit;
            }
        }
        flags
    }
}

pub fn stop() -> Result<()> {
    println!("kdbt: {}", Device::open()?.dbt_stop()?);
    Ok(())
}

pub fn stats(json: bool, symbols: bool) -> Result<()> {
    let (q, cpus) = Device::open()?.dbt_stats()?;
    let module = kdbt_abi::fixed_str_read(&q.module).to_string();
    if json {
        let per_cpu: Vec<_> = cpus
            .iter()
            .map(|c| {
                serde_json::json!({
                    "cpu": c.cpu, "online": c.online != 0, "steered": c.steered,
                    "dispatches": c.dispatches, "instructions": c.insns,
                    "last_exit_reason": c.last_exit_reason, "last_exit_pc": c.last_exit_pc,
                })
            })
            .collect();
        let v = serde_json::json!({
            "active": q.active != 0,
            "module": module,
            "client": ClientKind::name(q.client),
            "text_base": q.text_base, "text_size": q.text_size,
            "blocks": q.blocks, "guest_instructions": q.guest_insns, "dispatches": q.dispatches,
            "links": q.links, "misses": q.misses, "invalidations": q.invalidations,
            "code_bytes": q.code_bytes, "cache_bytes": q.cache_bytes,
            "pool_peak": q.pool_peak, "pool_size": q.pool_size,
            "write_faults": q.write_faults, "reprotects": q.reprotects, "writable_pages": q.writable_pages,
            "fault_table": q.fault_table, "fault_slots": q.fault_slots, "fault_slots_again": q.fault_slots_again,
            "fault_unplaced": q.fault_unplaced,
            "entry_sites": q.entry_sites, "entry_targets": q.entry_targets, "entry_reverted": q.entry_reverted,
            "invalidated_blocks": q.invalidated_blocks, "pending_blocks": q.pending_blocks, "resets": q.resets,
            "quiesce_passes": q.quiesce_passes,
            "native_regions": native_shown(&q), "native_region_count": q.native_count,
            "cpus": per_cpu,
        });
        println!("{v}");
        return Ok(());
    }
    if q.active == 0 {
        println!("kdbt: not started");
        return Ok(());
    }
    println!(
        "kdbt: {module} (text {:#x}, {} KB) runs from the code cache, client {}",
        q.text_base,
        q.text_size >> 10,
        ClientKind::name(q.client)
    );
    println!(
        "  blocks {} ({} instructions, {} KB of {} KB of cache), dispatches {}, links {}, lookup misses {}, \
         invalidations {}, dispatcher pool peak {} KB of {} KB",
        q.blocks,
        q.guest_insns,
        q.code_bytes >> 10,
        q.cache_bytes >> 10,
        q.dispatches,
        q.links,
        q.misses,
        q.invalidations,
        q.pool_peak >> 10,
        q.pool_size >> 10
    );
    println!(
        "  text writes caught {} (translations invalidated), pages re-protected {}, writable now {}",
        q.write_faults, q.reprotects, q.writable_pages
    );
    println!(
        "  blocks invalidated {}, of which {} wait for a quiescent point of every CPU before their space is reused; \
         cache resets {}; quiescence passes {}",
        q.invalidated_blocks, q.pending_blocks, q.resets, q.quiesce_passes
    );
    println!(
        "  exception-table entries {}: fault sites translated into slots {}, copied in line (no slot) {}; \
         retranslations given their slot again {}",
        q.fault_table, q.fault_slots, q.fault_unplaced, q.fault_slots_again
    );
    if module == kdbt_abi::KERNEL_SCOPE {
        let text =
            if symbols { kallsyms_text().map(Symbols::Text).unwrap_or(Symbols::Unreadable) } else { Symbols::Skipped };
        print!("{}", native_regions(&q, &text));
        if q.entry_sites > 0 {
            println!(
                "  entry text: {} direct calls/jumps into the text enter the cache through {} trampolines (no #VE); pages mapped back by writes {}",
                q.entry_sites, q.entry_targets, q.entry_reverted
            );
        } else {
            println!("  entry text: as booted, every call from it into the text is steered by #VE");
        }
    } else {
        println!("  native regions: everything outside {module}'s text (this stage translates one module)");
    }
    for c in cpus.iter().filter(|c| c.online != 0 || c.steered != 0 || c.dispatches != 0) {
        print!("  cpu{}: steered {} (#VE), dispatches {}", c.cpu, c.steered, c.dispatches);
        if q.client == kdbt_abi::DBT_CLIENT_INSCOUNT {
            print!(", instructions {}", c.insns);
        }
        if c.last_exit_reason != 0 {
            print!("; last left the cache at {:#x} ({})", c.last_exit_pc, stop_name(c.last_exit_reason));
        }
        println!();
    }
    Ok(())
}

/// `dbt::StopKind` by number.
/// The text of `/proc/kallsyms`, if readable.
fn kallsyms_text() -> Option<String> {
    std::fs::read_to_string("/proc/kallsyms").ok()
}

/// The regions reported, at most [`kdbt_abi::DBT_NATIVE_REGIONS`].
fn native_shown(q: &kdbt_abi::DbtStatsQuery) -> &[[u64; 2]] {
    &q.native[..(q.native_count as usize).min(kdbt_abi::DBT_NATIVE_REGIONS)]
}

/// Where `kdbt stats` names the native regions' symbols from.
enum Symbols {
    /// The text of /proc/kallsyms.
    Text(String),
    /// /proc/kallsyms could not be read.
    Unreadable,
    /// Not read (`--no-symbols`).
    Skipped,
}

/// `kdbt stats`' lines on the kernel scope's native regions: each range, its size and the
/// text symbols in it (from /proc/kallsyms' text, when it has addresses).
fn native_regions(q: &kdbt_abi::DbtStatsQuery, symbols: &Symbols) -> String {
    use std::fmt::Write as _;
    const NAMES: usize = 6;
    let ks = match symbols {
        Symbols::Text(t) => Some(Kallsyms::parse(t)).filter(|k| !k.is_empty()),
        _ => None,
    };
    let shown = native_shown(q);
    let bytes: u64 = shown.iter().map(|r| r[1].saturating_sub(r[0])).sum();
    let mut s = format!(
        "  native regions (their pages keep their execute right; every module runs natively too): {}, {} KB\n",
        q.native_count,
        bytes >> 10
    );
    for r in shown {
        let _ = write!(s, "    {:#x}..{:#x} ({} KB)", r[0], r[1], r[1].saturating_sub(r[0]) >> 10);
        match &ks {
            Some(ks) => {
                let names = ks.names_in(r[0], r[1]);
                let _ = write!(s, " from {}: {}", ks.name(r[0]), names[..names.len().min(NAMES)].join(", "));
                if names.len() > NAMES {
                    let _ = write!(s, ", ...");
                }
                let _ = write!(s, " ({} symbol{})", names.len(), if names.len() == 1 { "" } else { "s" });
            }
            None if matches!(symbols, Symbols::Skipped) => s.push_str(": symbols not read (--no-symbols)"),
            None => s.push_str(": no symbols (/proc/kallsyms shows no addresses: run as root)"),
        }
        s.push('\n');
    }
    if q.native_count as usize > shown.len() {
        let _ = writeln!(s, "    and {} more", q.native_count as usize - shown.len());
    }
    s
}

fn stop_name(k: u64) -> &'static str {
    match k {
        1 => "sentinel",
        2 => "undecodable",
        3 => "breakpoint",
        4 => "ud",
        5 => "unsupported instruction",
        6 => "no cache space",
        7 => "privileged",
        8 => "native target",
        9 => "no dispatcher memory",
        _ => "?",
    }
}

/// `kdbt cov`: executed blocks, hottest first, or per function; or (`drcov`) a drcov file.
pub fn cov(functions: bool, top: Option<usize>, drcov: Option<&Path>) -> Result<()> {
    let hits = Device::open()?.dbt_cov()?;
    let text = std::fs::read_to_string("/proc/kallsyms").context("cannot read /proc/kallsyms")?;
    let ks = Kallsyms::parse(&text);
    if ks.is_empty() {
        let what = if drcov.is_some() { "no block can be placed in a module" } else { "blocks are listed by address" };
        eprintln!("kdbt: /proc/kallsyms shows no addresses (kdbt needs root): {what}");
    }
    if let Some(path) = drcov {
        let mods = std::fs::read_to_string("/proc/modules").context("cannot read /proc/modules")?;
        let mods = crate::drcov::parse_proc_modules(&mods);
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        let w = crate::drcov::write(&mut f, &ks, &mods, &hits)
            .and_then(|w| std::io::Write::flush(&mut f).map(|()| w))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("kdbt cov: wrote {} blocks in {} modules to {} (drcov 2)", w.blocks, w.modules, path.display());
        if w.outside != 0 {
            eprintln!("kdbt: {} blocks lie outside the kernel's text and every module: left out", w.outside);
        }
        return Ok(());
    }
    let rows = cov_rows(&ks, &hits, functions);
    let n = top.unwrap_or(rows.len());
    println!(
        "# kdbt cov: {} blocks executed; {}",
        hits.len(),
        if functions { "hits per function" } else { "hits address symbol" }
    );
    for (name, h, pc) in rows.into_iter().take(n) {
        if functions {
            println!("{h:>12} {name}");
        } else {
            println!("{h:>12} {pc:#018x} {name}");
        }
    }
    Ok(())
}

/// (name, hits, pc) rows, most hits first (per block, or summed per function).
pub fn cov_rows(ks: &Kallsyms, hits: &[kdbt_abi::DbtCovEntry], functions: bool) -> Vec<(String, u64, u64)> {
    let mut rows: Vec<(String, u64, u64)> = if functions {
        let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for e in hits {
            let r = per.entry(ks.function(e.pc)).or_insert((0, e.pc));
            r.0 += e.hits;
            r.1 = r.1.min(e.pc);
        }
        per.into_iter().map(|(n, (h, pc))| (n, h, pc)).collect()
    } else {
        hits.iter().map(|e| (ks.name(e.pc), e.hits, e.pc)).collect()
    };
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kallsyms::tests::KALLSYMS;

    #[test]
    fn cov_rows_sum_per_function_hottest_first() {
        let ks = Kallsyms::parse(KALLSYMS);
        let e = |pc, hits| kdbt_abi::DbtCovEntry { pc, hits, len: 4, reserved: 0 };
        let hits = [e(0xffffffffc0000000, 5), e(0xffffffffc0000020, 7), e(0xffffffffc0000100, 30)];
        let per = cov_rows(&ks, &hits, true);
        assert_eq!(per[0], ("kdbt_testmod_cmp [kdbt_testmod]".to_string(), 30, 0xffffffffc0000100));
        assert_eq!(per[1], ("kdbt_testmod_work [kdbt_testmod]".to_string(), 12, 0xffffffffc0000000));
        let blocks = cov_rows(&ks, &hits, false);
        assert_eq!(blocks.iter().map(|r| r.1).collect::<Vec<_>>(), [30, 7, 5]);
        assert_eq!(blocks[1].0, "kdbt_testmod_work+0x20 [kdbt_testmod]");
    }

    #[test]
    fn native_regions_name_their_symbols_and_sizes() {
        let mut native = [[0; 2]; kdbt_abi::DBT_NATIVE_REGIONS];
        native[0] = [0xffffffff81000000, 0xffffffff81002000];
        native[1] = [0xffffffff81001000, 0xffffffff81001800];
        let mut q = kdbt_abi::DbtStatsQuery { native_count: 2, native, ..Default::default() };
        let s = native_regions(&q, &Symbols::Text(KALLSYMS.to_string()));
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3, "{s}");
        assert!(lines[0].ends_with(": 2, 10 KB"), "{s}");
        assert_eq!(
            lines[1],
            "    0xffffffff81000000..0xffffffff81002000 (8 KB) from _stext+0x0: _stext, do_one (2 symbols)"
        );
        assert_eq!(lines[2], "    0xffffffff81001000..0xffffffff81001800 (2 KB) from do_one+0x0: do_one (1 symbol)");
        // Without readable addresses the ranges are still listed; more than the ABI carries
        // are counted.
        q.native_count = 10;
        let s = native_regions(&q, &Symbols::Text("0000000000000000 T _stext\n".to_string()));
        assert!(s.contains("(8 KB): no symbols (/proc/kallsyms shows no addresses: run as root)"), "{s}");
        assert!(s.ends_with("    and 2 more\n"), "{s}");
        // --no-symbols: the ranges and sizes without reading /proc/kallsyms.
        let s = native_regions(&q, &Symbols::Skipped);
        assert!(s.contains("(8 KB): symbols not read (--no-symbols)"), "{s}");
    }
}

#[cfg(test)]
mod kernel_range_tests {
    use super::kernel_ranges;

    #[test]
    fn finds_names_sharing_an_address() {
        let k = "ffffffff81000000 T _text\nffffffff81000000 T _stext\nffffffff81000000 T __entry_text_start\n\
                 ffffffff81200000 T __entry_text_end\nffffffff82000000 T _etext\nffffffffc0000000 t _etext [m]\n";
        let r = kernel_ranges(k).unwrap();
        assert_eq!(r.text, [0xffffffff81000000, 0xffffffff82000000]);
        assert_eq!(r.entry, [0xffffffff81000000, 0xffffffff81200000]);
        assert_eq!(r.ex_table, [0, 0]);
        let with = format!("{k}ffffffff82100000 R __start___ex_table\nffffffff82100c00 R __stop___ex_table\n");
        assert_eq!(kernel_ranges(&with).unwrap().ex_table, [0xffffffff82100000, 0xffffffff82100c00]);
        assert!(kernel_ranges(&k.replace("ffffffff82000000", "ffffffff80000000")).is_err());
        assert!(kernel_ranges("0000000000000000 T _stext\n").is_err());
    }
}
