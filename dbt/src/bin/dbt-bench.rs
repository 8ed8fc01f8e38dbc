//! DBT benchmark: native vs DBT (null client) vs DBT (inscount) vs DBT (null
//! client, cached returns) vs `valgrind --tool=none` vs `qemu-x86_64`, real
//! cycles (rdtsc) on this machine. The valgrind and qemu columns re-execute this binary in
//! `--native-only` mode under those tools.
//!
//! Method: each workload is first run once under each DBT configuration
//! (translation happens then and is not timed), then native and the DBT
//! runs are interleaved for `ROUNDS` rounds and each column keeps
//! its fastest run, so machine-wide drift (this is a VM with neighbours) hits
//! all columns alike. Under valgrind and qemu the fastest of `TOOL_ROUNDS`
//! runs is kept. Native and translated runs use the same guest stack (same
//! addresses, same alignment-dependent paths).
//!
//! Two DynamoRIO-style figures per workload come from one more, untimed run
//! under inscount with lookup hits counted, after a warm-up run: the inline
//! lookup **hit rate** (hits / (hits + misses) over returns and indirect
//! branches) and **dispatcher entries per million guest instructions**.
use dbt::corpus::{cases, Case, BUF_LEN};
use dbt::host::Harness;
use dbt::{Config, InsCount, NullClient, StopKind};
use std::collections::BTreeMap;
use std::process::Command;

const ROUNDS: usize = 5;
const TOOL_ROUNDS: usize = 2;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc is available on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn bench_cases() -> Vec<Case> {
    cases().into_iter().filter(|c| c.bench_n > 1).collect()
}

/// One timed run: natively when `translated` is false, else under the DBT.
/// Returns (cycles, result) or None if a translated run did not return to
/// the sentinel.
fn timed(h: &mut Harness, c: &Case, buf: &mut [u8], translated: bool) -> Option<(u64, u64)> {
    let args = [buf.as_mut_ptr() as u64, c.bench_n];
    let t = rdtsc();
    let r = if translated { h.run(c.addr(), &args) } else { h.run_native(c.addr(), &args) };
    let dt = rdtsc() - t;
    (r.stop == StopKind::Sentinel).then_some((dt, r.rax))
}

fn native_only() {
    let mut buf = vec![0u8; BUF_LEN];
    let mut h = Harness::new(None);
    for c in bench_cases() {
        let best = (0..TOOL_ROUNDS).filter_map(|_| timed(&mut h, &c, &mut buf, false)).min();
        if let Some((t, r)) = best {
            println!("RESULT {} {} {:x}", c.name, t, r);
        }
    }
}

fn under_tool(cmd: &str, args: &[&str]) -> Result<BTreeMap<String, u64>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push(exe.to_string_lossy().into_owned());
    all.push("--native-only".into());
    eprintln!("running the workloads under {cmd} ...");
    let out = match Command::new(cmd).args(&all).output() {
        Ok(o) => o,
        Err(_) => return Err(format!("n/a (install {})", if cmd == "valgrind" { "valgrind" } else { "qemu-user" })),
    };
    if !out.status.success() {
        return Err(format!("failed ({})", out.status));
    }
    let mut m = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let p: Vec<&str> = l.split_whitespace().collect();
        if p.len() >= 3 && p[0] == "RESULT" {
            if let Ok(t) = p[2].parse() {
                m.insert(p[1].to_string(), t);
            }
        }
    }
    Ok(m)
}

fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

/// The DBT configurations, in column order.
const DBT_COLUMNS: [&str; 3] = ["null", "inscount", "cached-returns null"];

/// Fastest cycles per column: native, then each of [`DBT_COLUMNS`] (None: a
/// translated run failed or returned another result than the native run).
struct Row {
    native: u64,
    dbt: [Option<u64>; 3],
}

fn measure(c: &Case, buf: &mut [u8], hn: &mut Harness, hs: &mut [Harness; 3]) -> Option<Row> {
    let (_, want) = timed(hn, c, buf, false)?;
    // Warm-up: translation happens here, untimed.
    let mut ok = [true; 3];
    for (k, h) in hs.iter_mut().enumerate() {
        if timed(h, c, buf, true).map(|(_, r)| r) != Some(want) {
            eprintln!("{}: DBT result differs from native ({})", c.name, DBT_COLUMNS[k]);
            ok[k] = false;
        }
    }
    let mut native = u64::MAX;
    let mut best = [u64::MAX; 3];
    for _ in 0..ROUNDS {
        native = native.min(timed(hn, c, buf, false)?.0);
        for (k, h) in hs.iter_mut().enumerate() {
            match timed(h, c, buf, true) {
                Some((t, r)) if r == want => best[k] = best[k].min(t),
                _ => ok[k] = false,
            }
        }
    }
    Some(Row { native, dbt: core::array::from_fn(|k| ok[k].then_some(best[k])) })
}

/// (lookup hit rate in %, dispatcher entries per million guest
/// instructions) of one steady-state run (after a warm-up run).
fn profile(h: &mut Harness, c: &Case, buf: &mut [u8]) -> Option<(f64, f64)> {
    timed(h, c, buf, true)?;
    let (s0, h0) = (h.engine.stats, h.engine.lookup_hits());
    h.reset_inscount();
    timed(h, c, buf, true)?;
    let (s1, h1) = (h.engine.stats, h.engine.lookup_hits());
    let insns = h.inscount().max(1) as f64;
    let hits = (h1 - h0) as f64;
    let misses = (s1.misses - s0.misses) as f64;
    let rate = if hits + misses > 0.0 { 100.0 * hits / (hits + misses) } else { f64::NAN };
    Some((rate, (s1.dispatches - s0.dispatches) as f64 * 1e6 / insns))
}

fn main() {
    if std::env::args().any(|a| a == "--native-only") {
        native_only();
        return;
    }
    let cs = bench_cases();
    let mut buf = vec![0u8; BUF_LEN];
    let mut hn = Harness::new(None);
    let cached = Config { cached_returns: true, ..Config::default() };
    let mut hs = [
        Harness::new(Some(Box::new(NullClient))),
        Harness::new(Some(Box::new(InsCount))),
        Harness::with_config(Some(Box::new(NullClient)), cached),
    ];
    let mut rows = Vec::new();
    let mut probe = Harness::with_config(Some(Box::new(InsCount)), Config { count_lookups: true, ..Config::default() });
    let mut profiles = Vec::new();
    for c in cs.iter() {
        eprintln!("{}: {} interleaved rounds", c.name, ROUNDS);
        rows.push(measure(c, &mut buf, &mut hn, &mut hs));
        profiles.push(profile(&mut probe, c, &mut buf));
    }
    for (name, h) in DBT_COLUMNS.iter().zip(hs.iter()) {
        eprintln!("{name} stats: {:?}", h.engine.stats);
    }
    let vg = under_tool("valgrind", &["--tool=none", "-q"]);
    let qe = under_tool("qemu-x86_64", &[]);
    println!(
        "{:<14} {:>14} {:>10} {:>10} {:>12} {:>12} {:>12} {:>8} {:>10}",
        "workload",
        "native cyc",
        "dbt-null",
        "dbt-insc",
        "dbt-cachedret",
        "valgrind",
        "qemu-user",
        "hit%",
        "disp/Minsn"
    );
    let mut gm: Vec<Vec<f64>> = vec![Vec::new(); 5];
    let fmt = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}x"));
    for ((c, row), prof) in cs.iter().zip(rows.iter()).zip(profiles.iter()) {
        let Some(row) = row else {
            println!("{:<14} native run failed", c.name);
            continue;
        };
        let n = row.native as f64;
        let [s0, s1, s4] = row.dbt.map(|t| t.map(|t| t as f64 / n));
        let s2 = vg.as_ref().ok().and_then(|m| m.get(c.name)).map(|t| *t as f64 / n);
        let s3 = qe.as_ref().ok().and_then(|m| m.get(c.name)).map(|t| *t as f64 / n);
        for (i, s) in [s0, s1, s2, s3, s4].iter().enumerate() {
            if let Some(s) = s {
                gm[i].push(*s);
            }
        }
        let (hit, disp) = prof.map_or(("n/a".to_string(), "n/a".to_string()), |(h, d)| {
            (if h.is_nan() { "-".to_string() } else { format!("{h:.2}") }, format!("{d:.1}"))
        });
        println!(
            "{:<14} {:>14} {:>10} {:>10} {:>12} {:>12} {:>12} {:>8} {:>10}",
            c.name,
            row.native,
            fmt(s0),
            fmt(s1),
            fmt(s4),
            fmt(s2),
            fmt(s3),
            hit,
            disp
        );
    }
    let g = |i: usize, r: &Result<BTreeMap<String, u64>, String>| match r {
        Err(e) => e.clone(),
        Ok(_) => format!("{:.2}x", geomean(&gm[i])),
    };
    println!(
        "{:<14} {:>14} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "geomean",
        "",
        format!("{:.2}x", geomean(&gm[0])),
        format!("{:.2}x", geomean(&gm[1])),
        format!("{:.2}x", geomean(&gm[4])),
        g(2, &vg),
        g(3, &qe)
    );
    println!(
        "(cycles: fastest of {ROUNDS} interleaved native/DBT rounds after an untimed translating run; \
         valgrind and qemu: fastest of {TOOL_ROUNDS}; hit% and disp/Minsn: one steady-state inscount run, \
         '-' where the workload makes no indirect transfer)"
    );
}
