//! `kdbt dbt-selftest`: kernel functions run from the code cache, in the kernel's own
//! context, compared with native runs of the same calls.
//!
//! For each function of the glue's test table (string, formatting with `%pS`, parsing,
//! a time read through the clocksource, a spin lock taken with interrupts saved, CRC32
//! and SHA-256 where built): translate its entry with the kernel ABI (no red zone,
//! `%gs`-relative per-CPU block at the `alloc_percpu` offset, dispatcher entries with
//! interrupts off), call the translation as the function (the glue's C calls it through a
//! function pointer), and compare its result with a native call. Every block the call
//! reaches is translated by the dispatcher on demand; returns leave through the lookup to
//! the glue's native return address, which the environment declares native. Then the
//! same on every online CPU (in IPI context, interrupts off), and a loop of translated
//! `snprintf` calls with interrupts on, so timer interrupts land in translated code and
//! in the dispatcher's entries. The inscount client counts what ran from the cache.
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use dbt::{Config, Engine, InsCount};

use super::env::{self, KernelEnv};
use super::percpu::Blocks;
use super::pool;
use super::steer;
use crate::{ffi, hw};

/// Translated `snprintf` calls with interrupts on.
const STRESS_CALLS: u32 = 2000;

struct Case {
    which: u32,
    name: &'static str,
    f: u64,
}

fn cases() -> impl Iterator<Item = Case> {
    (0u32..).map_while(|which| {
        // SAFETY: the glue returns a static 0-terminated name or NULL past the table.
        let p = unsafe { ffi::kdbt_glue_dbt_case_name(which) };
        if p.is_null() {
            return None;
        }
        let mut n = 0;
        // SAFETY: 0-terminated static string (scanned up to its terminator).
        while unsafe { *p.add(n) } != 0 {
            n += 1;
        }
        // SAFETY: `n` bytes of a static ASCII string.
        let name = core::str::from_utf8(unsafe { core::slice::from_raw_parts(p, n) }).unwrap_or("?");
        // SAFETY: plain getter, `which` is in the table.
        let f = unsafe { ffi::kdbt_glue_dbt_case_fn(which) };
        Some(Case { which, name, f })
    })
}

fn run_case(which: u32, entry: u64) -> u64 {
    // SAFETY: `entry` is 0 (native) or the code-cache translation of the case's kernel
    // function, which the glue calls with that function's signature.
    unsafe { ffi::kdbt_glue_dbt_case_run(which, entry) }
}

/// The translation of `f`, translated under the engine lock in dispatcher mode
/// (interrupts off, allocations from the pool), as the dispatcher itself runs.
fn translate(b: &Blocks, e: *mut Engine, f: u64) -> Result<u64, String> {
    let scope = b.pool_scope();
    // SAFETY: `e` is the live engine, used only through `locked` while CPUs run it.
    let r = unsafe { Engine::locked(e, |e| e.fragment_for(f)) };
    drop(scope);
    r.map_err(|k| format!("cannot translate {f:#x}: {k:?}"))
}

fn counted(b: &Blocks) -> u64 {
    // SAFETY: every block is live; a concurrent increment only makes the sum stale.
    b.iter().map(|s| InsCount::total(unsafe { &*s })).fold(0, u64::wrapping_add)
}

fn reset_counts(b: &Blocks) {
    for s in b.iter() {
        // SAFETY: nothing runs translated code while the self-test resets (its own calls
        // have returned; no other CPU has an entry).
        InsCount::reset(unsafe { &mut *s });
    }
}

/// One case: the translated result against native ones. The time case must lie between
/// two native reads; the others must be equal.
fn check(c: &Case, entry: u64) -> Result<(), String> {
    let before = run_case(c.which, 0);
    let got = run_case(c.which, entry);
    let after = run_case(c.which, 0);
    let ok = if c.name == "ktime_get" { before <= got && got <= after } else { got == before && got == after };
    if ok {
        Ok(())
    } else {
        Err(format!("{}: translated {got:#x}, native {before:#x} / {after:#x}", c.name))
    }
}

pub fn run(flags: u32) -> Result<String, String> {
    use kdbt_abi::{DBT_SELFTEST_NO_POOL, DBT_SELFTEST_NO_STEER, DBT_SELFTEST_TEST_NATIVE};
    if flags & !(DBT_SELFTEST_TEST_NATIVE | DBT_SELFTEST_NO_POOL | DBT_SELFTEST_NO_STEER) != 0 {
        return Err(format!("unknown self-test flags {flags:#x}"));
    }
    if !env::claim() {
        return Err("the kernel DBT's code cache is in use".into());
    }
    // The decoder's and encoder's lazily built tables outlive any engine: built here,
    // with kmalloc, not in the pool.
    dbt::warm_up();
    pool::set_enabled(flags & DBT_SELFTEST_NO_POOL == 0);
    let r = pool::Memory::take(pool::POOL_BYTES).map_err(String::from).and_then(|mem| {
        let r = run_claimed(flags & DBT_SELFTEST_TEST_NATIVE != 0, flags & DBT_SELFTEST_NO_STEER != 0);
        // The engine is gone: every pool block it had is back.
        let left = pool::stats().in_use;
        drop(mem);
        match r {
            Ok(_) if left != 0 => Err(format!("the engine left {left} bytes of the dispatcher's pool allocated")),
            r => r,
        }
    });
    pool::set_enabled(true);
    pool::drain_deferred();
    env::release();
    r
}

/// `test_native`: call the native functions where the translations were meant (a test
/// hook: the check that instructions ran from the cache must fail). `no_steer`: the EPT
/// steering check's target keeps its execute right (a test hook: that check must fail).
fn run_claimed(test_native: bool, no_steer: bool) -> Result<String, String> {
    let kenv = KernelEnv::new()?;
    let steer_pages = kenv.steer_pages();
    let (cache, cache_size, thunks) = (kenv.cache().0, kenv.cache().1, kenv.thunks());
    let blocks = Blocks::new()?;
    let gs = blocks.gs_offset().ok_or("per-CPU offset out of reach")?;
    let cfg = Config {
        kernel: true,
        // SAFETY: plain getter.
        ibt: unsafe { ffi::kdbt_glue_kernel_ibt() },
        gs_base: gs,
        hot_size: 512 << 10,
        stub_size: 256 << 10,
        max_hot_bytes: 512 << 10,
        ..Config::default()
    };
    // The engine's own memory comes from the pool, as everything the dispatcher adds.
    let scope = blocks.pool_scope();
    let e = Engine::new(Box::new(kenv), Some(Box::new(InsCount)), cfg).map(Box::new);
    drop(scope);
    let mut e = e?;
    blocks.attach(&mut e);
    let kmallocs_before = pool::atomic_kmallocs();
    let ep: *mut Engine = &mut *e;
    kinfo!(
        "dbt-selftest: code cache {cache:#x} ({} KB), per-CPU blocks at %gs:{gs:#x}, {thunks} thunks, IBT {}",
        cache_size >> 10,
        cfg.ibt
    );
    let mut names = String::new();
    let mut n = 0;
    let mut insns_total = 0u64;
    let mut snprintf_entry = None;
    for c in cases() {
        let entry = if test_native { 0 } else { translate(&blocks, ep, c.f)? };
        reset_counts(&blocks);
        let got = run_case(c.which, entry);
        let insns = counted(&blocks);
        if insns == 0 {
            return Err(format!("{}: no instruction counted from the code cache", c.name));
        }
        check(&c, entry)?;
        kinfo!(
            "dbt-selftest: {} at {:#x} -> cache {entry:#x}: {got:#x}, {insns} instructions from the cache",
            c.name,
            c.f
        );
        insns_total += insns;
        if c.name == "snprintf" {
            snprintf_entry = Some((c.which, entry));
        }
        if !names.is_empty() {
            names.push(',');
        }
        names.push_str(c.name);
        n += 1;
    }
    // Every online CPU, its own block, interrupts off (IPI context).
    let mut cpus = 0;
    {
        let _hotplug = hw::CpusReadGuard::lock();
        for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
            let mut res: Result<(), String> = Ok(());
            let ep2 = ep as usize;
            let b = &blocks;
            hw::run_on_cpu(cpu, || {
                for c in cases() {
                    let entry = translate(b, ep2 as *mut Engine, c.f).and_then(|en| check(&c, en));
                    if let Err(m) = entry {
                        res = Err(m);
                        return;
                    }
                }
            })
            .map_err(|en| format!("cpu{cpu}: cannot run there (errno {en})"))?;
            res.map_err(|m| format!("cpu{cpu}: {m}"))?;
            cpus += 1;
        }
    }
    // Interrupts on: timer interrupts arrive at any instruction of translated code.
    let (which, entry) = snprintf_entry.ok_or("no snprintf case")?;
    let want = run_case(which, 0);
    let mut bad = 0;
    for _ in 0..STRESS_CALLS {
        if run_case(which, entry) != want {
            bad += 1;
        }
    }
    if bad != 0 {
        return Err(format!("snprintf from the cache differed in {bad} of {STRESS_CALLS} calls"));
    }
    // EPT steering (kdbt loaded with EPT and #VE): native code that lost its execute
    // right is caught by a #VE and runs from the cache.
    let steering = match crate::hv::ve_unavailable() {
        Err(why) => format!("EPT steering: not tested ({why})"),
        Ok(()) => {
            let s = steer::check(steer_pages, &blocks, no_steer, || counted(&blocks))?;
            format!(
                "EPT steering: {} #VE, a native call of a page without execute right ran from the cache \
                 ({} instructions)",
                s.ves, s.insns
            )
        }
    };
    kinfo!("dbt-selftest: {steering}");
    let kmallocs = pool::atomic_kmallocs() - kmallocs_before;
    if kmallocs != 0 {
        return Err(format!(
            "{kmallocs} kmalloc calls with interrupts off during translated runs (the dispatcher must \
             allocate from its pool only)"
        ));
    }
    // SAFETY: the engine is live; nothing runs translated code now.
    let st = unsafe { Engine::locked(ep, |e| e.stats) };
    let ps = pool::stats();
    // The details for the kernel log; the report (what the CLI prints) must fit the
    // ioctl's message.
    kinfo!(
        "dbt-selftest: functions {names}; gs offset {gs:#x}; pool largest {} B, {} deferred frees",
        ps.largest,
        pool::deferred_frees()
    );
    let report = format!(
        "dbt-selftest passed: {n} kernel functions ran from the code cache with native results, \
         on {cpus} CPUs and {STRESS_CALLS} calls with interrupts on; {} blocks, {} dispatches, {} links, \
         {insns_total} instructions counted; dispatcher pool: {} allocations, peak {} KB of {} KB, \
         0 kmallocs with interrupts off; {steering}",
        st.blocks,
        st.dispatches,
        st.links,
        ps.allocs,
        ps.peak >> 10,
        ps.size >> 10,
    );
    kinfo!("{report}");
    drop(e);
    drop(blocks);
    Ok(report)
}
