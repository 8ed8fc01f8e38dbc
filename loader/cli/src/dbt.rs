//! `kdbt start`, `stop`, `stats` and `cov`: the kernel DBT's translation of a module.
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::device::Device;

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

pub fn start(module: &str, client: ClientKind, test_no_steer: bool, test_no_invalidate: bool) -> Result<()> {
    let mut flags = 0;
    if test_no_steer {
        flags |= kdbt_abi::DBT_START_TEST_NO_STEER;
    }
    if test_no_invalidate {
        flags |= kdbt_abi::DBT_START_TEST_NO_INVALIDATE;
    }
    match Device::open()?.dbt_start(module, client.abi(), flags)? {
        Ok(()) => {
            println!("kdbt: started: {module}'s code runs from the code cache on every CPU (client {client:?})");
            Ok(())
        }
        Err(why) => bail!("cannot start: {why}"),
    }
}

pub fn stop() -> Result<()> {
    println!("kdbt: {}", Device::open()?.dbt_stop()?);
    Ok(())
}

pub fn stats(json: bool) -> Result<()> {
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
    println!("  native regions: everything outside {module}'s text (this stage translates one module)");
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

/// Symbols of `/proc/kallsyms`: address -> (name, module).
pub struct Kallsyms {
    syms: BTreeMap<u64, (String, Option<String>)>,
}

impl Kallsyms {
    /// Parses kallsyms text ("address type name [module]"); text symbols only.
    pub fn parse(text: &str) -> Kallsyms {
        let mut syms = BTreeMap::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(a), Some(t), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            if !matches!(t, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(a, 16) else { continue };
            if addr == 0 {
                continue;
            }
            let module = f.next().map(|m| m.trim_matches(|c| c == '[' || c == ']').to_string());
            syms.entry(addr).or_insert((name.to_string(), module));
        }
        Kallsyms { syms }
    }

    /// Whether the addresses are real (kallsyms shows zeros to a reader without
    /// CAP_SYSLOG, or under kptr_restrict).
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// `name+0xoff [module]` of the symbol at or below `pc`.
    pub fn name(&self, pc: u64) -> String {
        match self.syms.range(..=pc).next_back() {
            Some((a, (n, Some(m)))) => format!("{n}+{:#x} [{m}]", pc - a),
            Some((a, (n, None))) => format!("{n}+{:#x}", pc - a),
            None => format!("{pc:#x}"),
        }
    }

    /// The function (with its module) holding `pc`.
    pub fn function(&self, pc: u64) -> String {
        match self.syms.range(..=pc).next_back() {
            Some((_, (n, Some(m)))) => format!("{n} [{m}]"),
            Some((_, (n, None))) => n.clone(),
            None => format!("{pc:#x}"),
        }
    }
}

/// `kdbt cov`: executed blocks, hottest first, or per function.
pub fn cov(functions: bool, top: Option<usize>) -> Result<()> {
    let hits = Device::open()?.dbt_cov()?;
    let text = std::fs::read_to_string("/proc/kallsyms").context("cannot read /proc/kallsyms")?;
    let ks = Kallsyms::parse(&text);
    if ks.is_empty() {
        eprintln!("kdbt: /proc/kallsyms shows no addresses (kdbt needs root): blocks are listed by address");
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

    const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t do_one
ffffffff81002000 D some_data
ffffffffc0000000 t kdbt_testmod_work\t[kdbt_testmod]
ffffffffc0000100 T kdbt_testmod_cmp\t[kdbt_testmod]
0000000000000000 T hidden
";

    #[test]
    fn kallsyms_names_kernel_and_module_text() {
        let ks = Kallsyms::parse(KALLSYMS);
        assert_eq!(ks.name(0xffffffff81001010), "do_one+0x10");
        assert_eq!(ks.name(0xffffffffc0000104), "kdbt_testmod_cmp+0x4 [kdbt_testmod]");
        assert_eq!(ks.function(0xffffffffc0000010), "kdbt_testmod_work [kdbt_testmod]");
        // Data symbols are not functions: an address past do_one stays in do_one.
        assert_eq!(ks.name(0xffffffff81002004), "do_one+0x1004");
        assert_eq!(ks.name(0x1000), "0x1000");
        assert!(Kallsyms::parse("0000000000000000 T x\n").is_empty());
    }

    #[test]
    fn cov_rows_sum_per_function_hottest_first() {
        let ks = Kallsyms::parse(KALLSYMS);
        let e = |pc, hits| kdbt_abi::DbtCovEntry { pc, hits };
        let hits = [e(0xffffffffc0000000, 5), e(0xffffffffc0000020, 7), e(0xffffffffc0000100, 30)];
        let per = cov_rows(&ks, &hits, true);
        assert_eq!(per[0], ("kdbt_testmod_cmp [kdbt_testmod]".to_string(), 30, 0xffffffffc0000100));
        assert_eq!(per[1], ("kdbt_testmod_work [kdbt_testmod]".to_string(), 12, 0xffffffffc0000000));
        let blocks = cov_rows(&ks, &hits, false);
        assert_eq!(blocks.iter().map(|r| r.1).collect::<Vec<_>>(), [30, 7, 5]);
        assert_eq!(blocks[1].0, "kdbt_testmod_work+0x20 [kdbt_testmod]");
    }
}
