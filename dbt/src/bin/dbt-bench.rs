//! DBT benchmark: native vs DBT (null client) vs DBT (inscount) vs
//! `valgrind --tool=none` vs `qemu-x86_64`, real cycles (rdtsc) on this
//! machine. The valgrind and qemu columns re-execute this binary in
//! `--native-only` mode under those tools.
use dbt::corpus::{cases, Case, BUF_LEN};
use dbt::host::Harness;
use dbt::{InsCount, NullClient, StopKind};
use std::collections::BTreeMap;
use std::process::Command;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc is available on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn bench_cases() -> Vec<Case> {
    cases().into_iter().filter(|c| c.bench_n > 1).collect()
}

/// Native run on the harness's guest stack: the same stack addresses as the
/// translated runs, so alignment-dependent paths (memcpy) are the same.
fn time_native(h: &mut Harness, c: &Case, buf: &mut [u8]) -> (u64, u64) {
    let t = rdtsc();
    let r = h.run_native(c.f as u64, &[buf.as_mut_ptr() as u64, c.bench_n]);
    (rdtsc() - t, r.rax)
}

fn native_only() {
    let mut buf = vec![0u8; BUF_LEN];
    let mut h = Harness::new(None);
    for c in bench_cases() {
        let (t, r) = time_native(&mut h, &c, &mut buf);
        println!("RESULT {} {} {:x}", c.name, t, r);
    }
}

fn under_tool(cmd: &str, args: &[&str]) -> Result<BTreeMap<String, u64>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push(exe.to_string_lossy().into_owned());
    all.push("--native-only".into());
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

fn main() {
    if std::env::args().any(|a| a == "--native-only") {
        native_only();
        return;
    }
    let cs = bench_cases();
    let mut buf = vec![0u8; BUF_LEN];
    let mut nat = Vec::new();
    let mut hn = Harness::new(None);
    for c in cs.iter() {
        // best of 3
        let mut best = u64::MAX;
        let mut rv = 0;
        for _ in 0..3 {
            let (t, r) = time_native(&mut hn, c, &mut buf);
            best = best.min(t);
            rv = r;
        }
        nat.push((best, rv));
    }
    let mut cols: Vec<Vec<Option<u64>>> = Vec::new();
    for inscount in [false, true] {
        let mut h =
            if inscount { Harness::new(Some(Box::new(InsCount))) } else { Harness::new(Some(Box::new(NullClient))) };
        let mut v = Vec::new();
        for (k, c) in cs.iter().enumerate() {
            // first run includes translation; report the best of 3 runs
            let mut best = u64::MAX;
            let mut ok = true;
            for _ in 0..3 {
                let t = rdtsc();
                let r = h.run(c.f as u64, &[buf.as_mut_ptr() as u64, c.bench_n]);
                let dt = rdtsc() - t;
                if r.stop != StopKind::Sentinel || r.rax != nat[k].1 {
                    eprintln!("{}: DBT result mismatch ({:?})", c.name, r.stop);
                    ok = false;
                }
                best = best.min(dt);
            }
            v.push(if ok { Some(best) } else { None });
        }
        eprintln!("{} stats: {:?}", if inscount { "inscount" } else { "null" }, h.engine.stats);
        cols.push(v);
    }
    let vg = under_tool("valgrind", &["--tool=none", "-q"]);
    let qe = under_tool("qemu-x86_64", &[]);
    println!(
        "{:<14} {:>14} {:>10} {:>10} {:>12} {:>12}",
        "workload", "native cyc", "dbt-null", "dbt-insc", "valgrind", "qemu-user"
    );
    let mut gm: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let fmt = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}x"));
    for (k, c) in cs.iter().enumerate() {
        let n = nat[k].0 as f64;
        let s0 = cols[0][k].map(|t| t as f64 / n);
        let s1 = cols[1][k].map(|t| t as f64 / n);
        let s2 = vg.as_ref().ok().and_then(|m| m.get(c.name)).map(|t| *t as f64 / n);
        let s3 = qe.as_ref().ok().and_then(|m| m.get(c.name)).map(|t| *t as f64 / n);
        for (i, s) in [s0, s1, s2, s3].iter().enumerate() {
            if let Some(s) = s {
                gm[i].push(*s);
            }
        }
        println!("{:<14} {:>14} {:>10} {:>10} {:>12} {:>12}", c.name, nat[k].0, fmt(s0), fmt(s1), fmt(s2), fmt(s3));
    }
    let g = |i: usize, r: &Result<BTreeMap<String, u64>, String>| match r {
        Err(e) => e.clone(),
        Ok(_) => format!("{:.2}x", geomean(&gm[i])),
    };
    println!(
        "{:<14} {:>14} {:>10} {:>10} {:>12} {:>12}",
        "geomean",
        "",
        format!("{:.2}x", geomean(&gm[0])),
        format!("{:.2}x", geomean(&gm[1])),
        g(2, &vg),
        g(3, &qe)
    );
}
