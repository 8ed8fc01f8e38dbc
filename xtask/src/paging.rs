//! `cargo xtask bench paging`: the figures of the `bench-paging` suite (RDTSC ticks per
//! operation natively, under EPT and under shadow paging, and the VM exits of each
//! benchmark by reason), the modeled time, the text table and the SVG chart of the ratios.
//!
//! Bochs' RDTSC counts executed instructions and charges next to nothing for a VM exit or
//! for a two-dimensional (guest x EPT) page walk, so the ticks alone understate what both
//! modes cost on hardware. The **modeled time** adds a published VM exit round-trip cost per
//! exit: `ticks + exits_per_op * exit_cycles`, one Bochs tick counted as one cycle. It leaves
//! the cost of 2-D page walks out (see [`TWO_D_WALK`]).

use crate::results::Check;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The benchmarks of the suite, in table order.
pub const BENCHES: [&str; 8] =
    ["getppid", "fork_exit", "exec", "page_fault", "mmap_munmap", "pipe_pingpong", "tlb_walk", "macro"];
/// The modes, in table order: kdbt unloaded, `kdbt load` (EPT), `kdbt load --paging shadow`.
pub const MODES: [&str; 3] = ["native", "ept", "shadow"];

/// Default cost of one VM exit round trip (exit, handler, VM entry), in cycles.
pub const EXIT_ROUND_TRIP_CYCLES: u64 = 2000;
/// Where [`EXIT_ROUND_TRIP_CYCLES`] comes from.
pub const EXIT_SOURCE: &str = "Landau, Ben-Yehuda, Gordon, \"SplitX: Split Guest/Hypervisor Execution on \
Multi-Core\", USENIX WIOV 2011, Table 1: direct cost (world switch out and back) of a VM exit \
~2,000 cycles on an Intel Xeon X5570 (Nehalem, 2.93 GHz), KVM on Linux 2.6.34, EPT and VPID on";
/// What the model leaves out.
pub const TWO_D_WALK: &str = "not modeled: a TLB miss under EPT walks the guest's 4 levels with every \
guest-physical reference (4 table pointers + the final address) translated through 4 EPT levels, up \
to 24 memory references instead of 4 (Intel SDM vol. 3C, EPT translation; VMware vSphere docs, \
Memory Virtualization: \"the TLB miss latency when using hardware assistance is significantly \
higher\"); Bochs charges nothing for it, so tlb_walk under EPT is optimistic here";

/// Status keys that are shadow-MMU counters, not VM exit reasons.
const SHADOW_KEYS: [&str; 11] = [
    "faults_resolved",
    "faults_reflected",
    "policy_faults",
    "cr3_switches",
    "invlpgs",
    "invpcids",
    "reclaims",
    "pool_resets",
    "root_evictions",
    "full_flushes",
    "shadow_pages_in_use",
];

/// One benchmark in one mode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    /// Ticks per operation of the fastest repetition, and of the slowest.
    pub ticks: u64,
    pub max: u64,
    /// Operations per repetition, and repetitions.
    pub ops: u64,
    pub reps: u64,
    /// VM exits during all repetitions (all CPUs), and by reason.
    pub exits: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Shadow-MMU counters during all repetitions (shadow mode only).
    pub shadow: BTreeMap<String, u64>,
}

impl Cell {
    /// VM exits per operation, averaged over every repetition.
    pub fn exits_per_op(&self) -> f64 {
        let n = self.ops * self.reps;
        if n == 0 {
            0.0
        } else {
            self.exits as f64 / n as f64
        }
    }

    /// Modeled cycles per operation: the fastest repetition's ticks plus the exits' cost.
    pub fn modeled(&self, exit_cycles: u64) -> f64 {
        self.ticks as f64 + self.exits_per_op() * exit_cycles as f64
    }
}

/// One figure `key=value` of a check, as a number.
fn num(figures: &str, key: &str) -> Result<u64> {
    let v = figures
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in `{figures}`"))?;
    v.parse().with_context(|| format!("{key}={v} is not a number"))
}

/// Parses the figures of a `paging_<bench>_<mode>` check.
pub fn parse_cell(figures: &str) -> Result<Cell> {
    let mut c = parse_counts(figures)?;
    (c.ticks, c.max, c.ops, c.reps) =
        (num(figures, "ticks")?, num(figures, "max")?, num(figures, "ops")?, num(figures, "reps")?);
    if c.ops == 0 || c.reps == 0 {
        bail!("ops={} reps={}: no operations measured", c.ops, c.reps);
    }
    Ok(c)
}

impl Cell {
    /// Takes away the exits and shadow-MMU events of `o` (the `kdbt status` run that the
    /// snapshots around a benchmark include), never below 0; `shadow_pages_in_use` is a
    /// level, not a count of events, and stays.
    pub fn subtract(&mut self, o: &Cell) {
        self.exits = self.exits.saturating_sub(o.exits);
        for (k, v) in &o.reasons {
            if let Some(n) = self.reasons.get_mut(k) {
                *n = n.saturating_sub(*v);
            }
        }
        self.reasons.retain(|_, n| *n != 0);
        for (k, v) in o.shadow.iter().filter(|(k, _)| *k != "shadow_pages_in_use") {
            if let Some(n) = self.shadow.get_mut(k) {
                *n = n.saturating_sub(*v);
            }
        }
    }
}

/// The counters of a check (exits, exits by reason, shadow-MMU counters); other figures
/// (ticks, max, ops, reps) are left at 0.
pub fn parse_counts(figures: &str) -> Result<Cell> {
    let mut c = Cell::default();
    for (k, v) in figures.split_whitespace().filter_map(|kv| kv.split_once('=')) {
        if ["ticks", "max", "ops", "reps"].contains(&k) {
            continue;
        }
        let n: u64 = v.parse().with_context(|| format!("{k}={v} is not a number"))?;
        if k == "exits" {
            c.exits = n;
        } else if SHADOW_KEYS.contains(&k) {
            c.shadow.insert(k.to_string(), n);
        } else if n != 0 {
            c.reasons.insert(k.to_string(), n);
        }
    }
    Ok(c)
}

/// One benchmark: its cells in [`MODES`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub bench: &'static str,
    pub cells: [Cell; 3],
}

fn find<'a>(checks: &'a [Check], name: &str) -> Result<&'a Check> {
    let c = checks.iter().find(|c| c.name == name).with_context(|| format!("check {name} missing"))?;
    if !c.pass {
        bail!("check {name} failed: {}", c.figures);
    }
    Ok(c)
}

/// The rows of a run, from its checks; every benchmark in every mode must have passed. The
/// exits of one `kdbt status` run (`paging_snapshot_<mode>`) are taken out of each loaded cell.
pub fn collect(checks: &[Check]) -> Result<Vec<Row>> {
    let mut snap: [Cell; 3] = Default::default();
    for (i, mode) in MODES.iter().enumerate().skip(1) {
        let name = format!("paging_snapshot_{mode}");
        snap[i] = parse_counts(&find(checks, &name)?.figures).with_context(|| format!("check {name}"))?;
    }
    let mut rows = Vec::new();
    for bench in BENCHES {
        let mut cells: [Cell; 3] = Default::default();
        for (i, mode) in MODES.iter().enumerate() {
            let name = format!("paging_{bench}_{mode}");
            cells[i] = parse_cell(&find(checks, &name)?.figures).with_context(|| format!("check {name}"))?;
            cells[i].subtract(&snap[i]);
        }
        rows.push(Row { bench, cells });
    }
    Ok(rows)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// The ratios of a row: ticks EPT/native, shadow/native; modeled EPT/native, shadow/native.
pub fn ratios(r: &Row, exit_cycles: u64) -> [f64; 4] {
    let [n, e, s] = &r.cells;
    let nat = n.modeled(exit_cycles);
    [
        ratio(e.ticks as f64, n.ticks as f64),
        ratio(s.ticks as f64, n.ticks as f64),
        ratio(e.modeled(exit_cycles), nat),
        ratio(s.modeled(exit_cycles), nat),
    ]
}

/// The main table: ticks (fastest [slowest]) per mode, ratios, exits per op and modeled ratios.
pub fn table(rows: &[Row], exit_cycles: u64) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<14} {:>23} {:>23} {:>23} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "benchmark", "native", "ept", "shadow", "ept/n", "shd/n", "exits/op", "exits/op", "mod", "mod", "mod"
    );
    let _ = writeln!(
        t,
        "{:<14} {:>23} {:>23} {:>23} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "",
        "ticks [slowest]",
        "ticks [slowest]",
        "ticks [slowest]",
        "ticks",
        "ticks",
        "ept",
        "shadow",
        "ept/n",
        "shd/n",
        "shd/ept"
    );
    for r in rows {
        let cell = |c: &Cell| format!("{} [{}]", c.ticks, c.max);
        let [a, b, c, d] = ratios(r, exit_cycles);
        let [_, e, s] = &r.cells;
        let _ = writeln!(
            t,
            "{:<14} {:>23} {:>23} {:>23} {:>6.3}x {:>6.3}x {:>9.3} {:>9.3} {:>6.3}x {:>6.3}x {:>6.3}x",
            r.bench,
            cell(&r.cells[0]),
            cell(e),
            cell(s),
            a,
            b,
            e.exits_per_op(),
            s.exits_per_op(),
            c,
            d,
            ratio(s.modeled(exit_cycles), e.modeled(exit_cycles))
        );
    }
    t
}

/// VM exits by reason per mode (summed over the benchmarks), per benchmark per op, and the
/// shadow-MMU counters per benchmark.
pub fn exits_report(rows: &[Row]) -> String {
    let mut t = String::new();
    for (i, mode) in MODES.iter().enumerate().skip(1) {
        let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
        let mut all = 0;
        for r in rows {
            all += r.cells[i].exits;
            for (k, v) in &r.cells[i].reasons {
                *sum.entry(k).or_default() += v;
            }
        }
        let _ = writeln!(t, "VM exits under {mode} (all benchmarks, all CPUs): {all}");
        for (k, v) in &sum {
            let _ = writeln!(t, "  {v:>10}  {k}");
        }
    }
    let _ = writeln!(t, "\nVM exits per operation by reason");
    for r in rows {
        for (i, mode) in MODES.iter().enumerate().skip(1) {
            let c = &r.cells[i];
            let n = (c.ops * c.reps) as f64;
            let by: Vec<String> = c.reasons.iter().map(|(k, v)| format!("{k}={:.3}", *v as f64 / n)).collect();
            let _ = writeln!(t, "  {:<14} {:<6} {:>9.3}  {}", r.bench, mode, c.exits_per_op(), by.join(" "));
        }
    }
    let _ = writeln!(t, "\nShadow-MMU counters during each benchmark (all repetitions, all CPUs)");
    for r in rows {
        let s: Vec<String> = r.cells[2].shadow.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(t, "  {:<14} {}", r.bench, s.join(" "));
    }
    t
}

/// An SVG bar chart of the four ratios of every row on a log2 scale around 1.0 (bars grow
/// up for a slowdown, down for a speedup).
pub fn svg(rows: &[Row], exit_cycles: u64, title: &str) -> String {
    const SERIES: [(&str, &str); 4] = [
        ("EPT / native, Bochs ticks", "#6baed6"),
        ("shadow / native, Bochs ticks", "#fd8d3c"),
        ("EPT / native, modeled", "#08519c"),
        ("shadow / native, modeled", "#a63603"),
    ];
    let data: Vec<[f64; 4]> = rows.iter().map(|r| ratios(r, exit_cycles)).collect();
    let logs = data.iter().flatten().filter(|v| v.is_finite() && **v > 0.0).map(|v| v.log2());
    let (lo, hi) = logs.fold((0.0f64, 1.0f64), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let (lo, hi) = (lo.floor().max(-4.0), hi.ceil().min(12.0));
    let (left, top, plot_h, group_w, bar_w) = (70.0, 60.0, 360.0, 96.0, 18.0);
    let width = left + group_w * rows.len() as f64 + 30.0;
    let height = top + plot_h + 150.0;
    let y = |l: f64| top + plot_h * (hi - l.clamp(lo, hi)) / (hi - lo);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(s, r##"<text x="{left}" y="24" font-size="15">{}</text>"##, xml_escape(title));
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="42" fill="#555">ratio to native, log2 scale; modeled = ticks + exits/op x {exit_cycles} cycles</text>"##
    );
    let mut l = lo;
    while l <= hi {
        let yy = y(l);
        let stroke = if l == 0.0 { "#000" } else { "#ddd" };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{stroke}"/>"##,
            width - 20.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}x</text>"##,
            left - 6.0,
            yy + 4.0,
            fmt_pow2(l)
        );
        l += 1.0;
    }
    for (g, (r, vals)) in rows.iter().zip(&data).enumerate() {
        let x0 = left + group_w * g as f64 + (group_w - bar_w * 4.0) / 2.0;
        for (i, v) in vals.iter().enumerate() {
            if !v.is_finite() || *v <= 0.0 {
                continue;
            }
            let (y1, y0) = (y(v.log2()), y(0.0));
            let (ytop, h) = if y1 < y0 { (y1, y0 - y1) } else { (y0, y1 - y0) };
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{ytop:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {} {v:.3}x</title></rect>"##,
                x0 + bar_w * i as f64,
                bar_w - 2.0,
                h.max(0.5),
                SERIES[i].1,
                r.bench,
                SERIES[i].0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            left + group_w * g as f64 + group_w / 2.0,
            top + plot_h + 18.0,
            xml_escape(r.bench)
        );
    }
    for (i, (name, color)) in SERIES.iter().enumerate() {
        let yy = top + plot_h + 40.0 + 20.0 * i as f64;
        let _ = writeln!(s, r##"<rect x="{left}" y="{:.1}" width="14" height="14" fill="{color}"/>"##, yy - 11.0);
        let _ = writeln!(s, r##"<text x="{:.1}" y="{yy:.1}">{name}</text>"##, left + 20.0);
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_pow2(l: f64) -> String {
    let v = 2f64.powf(l);
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, figures: &str) -> Check {
        Check { name: name.into(), pass: true, figures: figures.into() }
    }

    #[test]
    fn parses_native_and_loaded_cells() {
        let n = parse_cell("ticks=340 max=378 ops=10000 reps=5").unwrap();
        assert_eq!((n.ticks, n.max, n.ops, n.reps, n.exits), (340, 378, 10000, 5, 0));
        assert!(n.reasons.is_empty() && n.shadow.is_empty());
        let s = parse_cell(
            "ticks=900 max=950 ops=100 reps=5 exits=1500 exception_or_nmi=1000 cr_access=500 cpuid=0 \
             faults_resolved=990 cr3_switches=500 shadow_pages_in_use=42",
        )
        .unwrap();
        assert_eq!(s.exits, 1500);
        assert_eq!(s.reasons.len(), 2, "zero reasons are dropped: {:?}", s.reasons);
        assert_eq!(s.reasons["cr_access"], 500);
        assert_eq!(s.shadow["faults_resolved"], 990);
        assert_eq!(s.shadow["shadow_pages_in_use"], 42);
        assert!(!s.reasons.contains_key("cr3_switches"));
    }

    #[test]
    fn bad_figures_are_errors() {
        assert!(parse_cell("max=1 ops=1 reps=1").is_err(), "ticks missing");
        assert!(parse_cell("ticks=x max=1 ops=1 reps=1").is_err());
        assert!(parse_cell("ticks=1 max=1 ops=0 reps=1").is_err());
        assert!(parse_cell("ticks=1 max=1 ops=1 reps=1 exits=-3").is_err(), "negative delta");
    }

    #[test]
    fn modeled_time_adds_exit_cost_per_op() {
        let c = parse_cell("ticks=1000 max=1100 ops=100 reps=5 exits=1000").unwrap();
        assert_eq!(c.exits_per_op(), 2.0);
        assert_eq!(c.modeled(2000), 5000.0);
        assert_eq!(c.modeled(0), 1000.0);
        let n = parse_cell("ticks=1000 max=1000 ops=1 reps=1").unwrap();
        assert_eq!(n.modeled(2000), 1000.0, "native has no exits");
    }

    fn run_checks() -> Vec<Check> {
        let mut v = vec![
            check("paging_snapshot_ept", "exits=0 cpuid=0"),
            check("paging_snapshot_shadow", "exits=0 cr_access=0"),
        ];
        for b in BENCHES {
            v.push(check(&format!("paging_{b}_native"), "ticks=100 max=110 ops=10 reps=5"));
            v.push(check(&format!("paging_{b}_ept"), "ticks=110 max=120 ops=10 reps=5 exits=0"));
            v.push(check(
                &format!("paging_{b}_shadow"),
                "ticks=120 max=130 ops=10 reps=5 exits=50 cr_access=50 cr3_switches=50",
            ));
        }
        v
    }

    #[test]
    fn collects_rows_and_ratios() {
        let rows = collect(&run_checks()).unwrap();
        assert_eq!(rows.len(), BENCHES.len());
        let [te, ts, me, ms] = ratios(&rows[0], 1000);
        assert!((te - 1.1).abs() < 1e-9 && (ts - 1.2).abs() < 1e-9);
        assert!((me - 1.1).abs() < 1e-9);
        // shadow: 120 + 50/(10*5) * 1000 = 1120 modeled, over 100 native.
        assert!((ms - 11.2).abs() < 1e-9, "{ms}");
        let t = table(&rows, 1000);
        assert!(t.contains("getppid") && t.contains("100 [110]") && t.contains("11.200x"), "{t}");
        let e = exits_report(&rows);
        assert!(e.contains("VM exits under shadow (all benchmarks, all CPUs): 400"), "{e}");
        assert!(e.contains("cr_access=1.000") && e.contains("cr3_switches=50"), "{e}");
    }

    #[test]
    fn the_status_run_is_subtracted() {
        let mut v = run_checks();
        v[1].figures = "exits=10 cr_access=8 exception_nmi=2 cr3_switches=4 shadow_pages_in_use=7".into();
        for c in v.iter_mut().filter(|c| c.name == "paging_getppid_shadow") {
            c.figures = "ticks=1 max=1 ops=1 reps=1 exits=12 cr_access=12 cr3_switches=9 shadow_pages_in_use=30".into();
        }
        let rows = collect(&v).unwrap();
        let s = &rows[0].cells[2];
        assert_eq!(s.exits, 2);
        assert_eq!(s.reasons.get("cr_access"), Some(&4));
        assert!(!s.reasons.contains_key("exception_nmi"), "never below 0, zero dropped");
        assert_eq!(s.shadow["cr3_switches"], 5);
        assert_eq!(s.shadow["shadow_pages_in_use"], 30, "a level, not subtracted");
        assert_eq!(rows[1].cells[2].exits, 40, "50 - 10");
        // Native cells are not touched.
        assert_eq!(rows[0].cells[0].exits, 0);
    }

    #[test]
    fn missing_or_failed_checks_are_errors() {
        let mut v = run_checks();
        v.retain(|c| c.name != "paging_macro_shadow");
        assert!(collect(&v).unwrap_err().to_string().contains("paging_macro_shadow"));
        let mut v = run_checks();
        v[2].pass = false;
        assert!(collect(&v).unwrap_err().to_string().contains("failed"));
        let mut v = run_checks();
        v.remove(0);
        assert!(collect(&v).unwrap_err().to_string().contains("paging_snapshot_ept"));
    }

    #[test]
    fn svg_has_a_bar_per_ratio_and_is_well_formed() {
        let rows = collect(&run_checks()).unwrap();
        let s = svg(&rows, 1000, "t <&> \"q\"");
        assert!(s.starts_with("<svg ") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<title>").count(), 4 * BENCHES.len());
        assert!(s.contains("t &lt;&amp;&gt; &quot;q&quot;"));
        // 1x is the black baseline; 16x (log2 11.2 rounds up to 4) is the top grid line.
        assert!(s.contains(">1x</text>") && s.contains(">16x</text>"), "{s}");
        assert_eq!(s.matches("<rect").count(), 1 + 4 * BENCHES.len() + 4);
        // Every element opened is closed (a cheap well-formedness check).
        assert_eq!(s.matches("<text").count(), s.matches("</text>").count());
        assert_eq!(s.matches("<rect x").count(), s.matches("</rect>").count() + 4);
    }

    #[test]
    fn svg_draws_speedups_below_the_baseline() {
        let mut v = run_checks();
        for c in v.iter_mut().filter(|c| c.name.ends_with("_ept")) {
            c.figures = "ticks=50 max=60 ops=10 reps=5 exits=0".into();
        }
        let s = svg(&collect(&v).unwrap(), 0, "x");
        assert!(s.contains(">0.5x</text>"), "{s}");
    }
}
