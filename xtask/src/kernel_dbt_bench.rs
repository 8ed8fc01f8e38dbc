//! `cargo xtask bench kernel-dbt`: the figures of the `bench-kernel-dbt` suite (a read of
//! /proc/kdbt_testmod in RDTSC ticks, kdbt unloaded, loaded, and started with each
//! client), as a table and a bar chart of the ratios to the loaded, not started, run.
use std::fmt::Write as _;

use anyhow::{bail, Context, Result};

use crate::paging::xml_escape;
use crate::results::Check;

/// The suite's modes, in its order; ratios are to `loaded` (the hypervisor beneath, the
/// module native).
pub const MODES: [&str; 5] = ["unloaded", "loaded", "null", "inscount", "bbcov"];

/// One mode's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub mode: &'static str,
    pub ticks: u64,
    pub max: u64,
    /// Reads measured: ops x reps.
    pub reads: u64,
    /// Over the measured reads on cpu0 (started modes only): #VE, dispatcher entries,
    /// inscount's instructions; blocks translated and lookup misses (engine-wide).
    pub steered: Option<u64>,
    pub dispatches: Option<u64>,
    pub instructions: Option<u64>,
    pub blocks: Option<u64>,
    pub misses: Option<u64>,
    pub cached_blocks: Option<u64>,
    /// VM exits of the measured reads on every CPU (loaded modes), one `kdbt status` run's
    /// own exits subtracted.
    pub exits: Option<u64>,
}

fn get(figures: &str, key: &str) -> Option<u64> {
    figures.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The rows of a run's checks (every mode must have passed with its figures).
pub fn collect(checks: &[Check]) -> Result<Vec<Row>> {
    let snapshot = checks
        .iter()
        .find(|c| c.name == "kernel_dbt_snapshot" && c.pass)
        .and_then(|c| get(&c.figures, "exits"))
        .context("no passing kernel_dbt_snapshot with exits=")?;
    MODES
        .iter()
        .map(|&mode| {
            let name = format!("kernel_dbt_{mode}");
            let c = checks.iter().find(|c| c.name == name).with_context(|| format!("no check {name}"))?;
            if !c.pass {
                bail!("{name} failed: {}", c.figures);
            }
            let need = |k| get(&c.figures, k).with_context(|| format!("{name}: no {k}= in `{}`", c.figures));
            Ok(Row {
                mode,
                ticks: need("ticks")?,
                max: need("max")?,
                reads: need("ops")? * need("reps")?,
                steered: get(&c.figures, "steered"),
                dispatches: get(&c.figures, "dispatches"),
                instructions: get(&c.figures, "instructions"),
                blocks: get(&c.figures, "blocks"),
                misses: get(&c.figures, "misses"),
                cached_blocks: get(&c.figures, "cached_blocks"),
                exits: get(&c.figures, "exits").map(|e| e.saturating_sub(snapshot)),
            })
        })
        .collect()
}

fn per_read(v: Option<u64>, reads: u64) -> String {
    match v {
        Some(v) if reads > 0 => format!("{:.2}", v as f64 / reads as f64),
        _ => "-".into(),
    }
}

/// Ratio of a mode's fastest ticks to `loaded`'s.
pub fn ratio(rows: &[Row], r: &Row) -> Option<f64> {
    let base = rows.iter().find(|r| r.mode == "loaded")?.ticks;
    (base > 0).then(|| r.ticks as f64 / base as f64)
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:>22} {:>9} {:>9} {:>12} {:>12} {:>10} {:>9} {:>12}",
        "mode",
        "ticks/read [slowest]",
        "vs loaded",
        "#VE/read",
        "dispatch/rd",
        "insns/read",
        "new blocks",
        "blocks",
        "VM exits/rd"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>22} {:>9} {:>9} {:>12} {:>12} {:>10} {:>9} {:>12}",
            r.mode,
            format!("{} [{}]", r.ticks, r.max),
            ratio(rows, r).map_or("-".into(), |x| format!("{x:.2}x")),
            per_read(r.steered, r.reads),
            per_read(r.dispatches, r.reads),
            per_read(r.instructions, r.reads),
            r.blocks.map_or("-".into(), |b| b.to_string()),
            r.cached_blocks.map_or("-".into(), |b| b.to_string()),
            per_read(r.exits, r.reads),
        );
    }
    s
}

/// A bar chart of the ratios to `loaded`.
pub fn svg(rows: &[Row], title: &str) -> String {
    let vals: Vec<f64> = rows.iter().map(|r| ratio(rows, r).unwrap_or(0.0)).collect();
    let hi = vals.iter().cloned().fold(1.0f64, f64::max).ceil();
    let (left, top, plot_h, bar_w) = (60.0, 56.0, 300.0, 70.0);
    let width = left + bar_w * rows.len() as f64 + 40.0;
    let height = top + plot_h + 50.0;
    let y = |v: f64| top + plot_h * (1.0 - v / hi);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(s, r##"<text x="10" y="22" font-size="14">{}</text>"##, xml_escape(title));
    let _ = writeln!(s, r##"<text x="10" y="40" fill="#555">ticks per read / loaded (native module), Bochs</text>"##);
    for k in 0..=hi as u32 {
        let yy = y(k as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{k}x</text>"##,
            width - 20.0,
            if k == 1 { "#000" } else { "#ddd" },
            left - 6.0,
            yy + 4.0
        );
    }
    for (i, (r, v)) in rows.iter().zip(&vals).enumerate() {
        let x = left + bar_w * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4292c6"><title>{}: {v:.2}x</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y(*v),
            bar_w - 20.0,
            (y(0.0) - y(*v)).max(0.5),
            r.mode,
            x + (bar_w - 20.0) / 2.0,
            top + plot_h + 18.0,
            r.mode
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, figures: &str) -> Check {
        Check { name: name.into(), pass: true, figures: figures.into() }
    }

    fn run() -> Vec<Check> {
        vec![
            check("kernel_dbt_unloaded", "ticks=900 max=950 ops=40 reps=5"),
            check("kernel_dbt_snapshot", "exits=60"),
            check("kernel_dbt_loaded", "ticks=1000 max=1100 ops=40 reps=5 exits=60"),
            check("kernel_dbt_null", "ticks=2500 max=2600 ops=40 reps=5 exits=260 steered=2000 dispatches=0 blocks=0 links=0 misses=0 cached_blocks=90"),
            check("kernel_dbt_inscount", "ticks=3000 max=3100 ops=40 reps=5 exits=60 steered=2000 dispatches=4 blocks=2 links=0 misses=0 cached_blocks=91 instructions=400000"),
            check("kernel_dbt_bbcov", "ticks=3500 max=3600 ops=40 reps=5 exits=60 steered=2000 dispatches=0 blocks=0 links=0 misses=0 cached_blocks=90"),
        ]
    }

    #[test]
    fn rows_ratios_and_per_read_figures() {
        let rows = collect(&run()).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(ratio(&rows, &rows[2]), Some(2.5));
        assert_eq!(rows[3].instructions, Some(400000));
        let t = table(&rows);
        let null = t.lines().find(|l| l.starts_with("null")).unwrap();
        assert!(null.contains("2.50x") && null.contains(" 10.00 "), "{null}");
        // (260 - 60) exits over 200 reads; loaded: the snapshot's exits only.
        assert!(null.ends_with(" 1.00"), "{null}");
        assert_eq!(rows[1].exits, Some(0));
        assert_eq!(rows[0].exits, None);
        let ins = t.lines().find(|l| l.starts_with("inscount")).unwrap();
        assert!(ins.contains("2000.00") && ins.contains(" 0.02 "), "{ins}");
        assert!(svg(&rows, "t").contains("null: 2.50x"));
    }

    #[test]
    fn a_failed_or_missing_mode_is_an_error() {
        let mut c = run();
        let null = c.iter_mut().find(|c| c.name == "kernel_dbt_null").unwrap();
        null.pass = false;
        assert!(collect(&c).unwrap_err().to_string().contains("kernel_dbt_null failed"));
        let c: Vec<Check> = run().into_iter().filter(|c| c.name != "kernel_dbt_bbcov").collect();
        assert!(collect(&c).is_err());
        let c = vec![check("kernel_dbt_unloaded", "ticks=1")];
        assert!(collect(&c).is_err());
        let c: Vec<Check> = run().into_iter().filter(|c| c.name != "kernel_dbt_snapshot").collect();
        assert!(collect(&c).unwrap_err().to_string().contains("snapshot"));
    }
}
