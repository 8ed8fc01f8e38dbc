//! Several CPUs on one engine: three threads, each with its own per-CPU
//! block, run the corpus translated while a fourth invalidates the code they
//! run (ranges, and now and then everything) and reclaims what every CPU has
//! provably left (`Engine::reclaim_quiescent`). Results must equal the native
//! ones; more than a million indirect transfers go through the shared lookup
//! table; cache regions are spread out of rel32 reach of each other, so links
//! between them go through far trampolines.
//!
//! The other configurations (`link: false`, `inline_lookup: false`) run the
//! whole corpus single-threaded at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbt::corpus::{cases, BUF_LEN};
use dbt::host::{Harness, HostEnv};
use dbt::{Config, Engine, StopKind};

struct EnginePtr(*mut Engine);
// SAFETY: the engine is only used under its lock from the other thread.
unsafe impl Send for EnginePtr {}

const WORKERS: usize = 3;
const TRANSFERS: u64 = 1_000_000;
/// Invalidation rounds the run waits for (each invalidates a range or everything).
const MIN_ROUNDS: u64 = 300;

#[test]
fn three_cpus_run_while_another_invalidates() {
    let cfg = Config { count_lookups: true, region_span: 1 << 20, ..Config::default() };
    let mut env = HostEnv::new();
    env.spread = true;
    let mut h = Harness::with_env(None, cfg, env);
    let cs = cases();
    let natives: Arc<Vec<(u64, u64, u64)>> = Arc::new(
        cs.iter()
            .map(|c| {
                let mut b = vec![0u8; BUF_LEN];
                (c.addr(), c.test_n, h.run_native(c.addr(), &[b.as_mut_ptr() as u64, c.test_n]).rax)
            })
            .collect(),
    );
    let cpus: Vec<_> = (0..WORKERS).map(|_| h.add_cpu()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let hits: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(0)).collect());
    let runs = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (k, mut cpu) in cpus.into_iter().enumerate() {
        let (natives, stop, hits, runs) = (natives.clone(), stop.clone(), hits.clone(), runs.clone());
        workers.push(std::thread::spawn(move || {
            let mut b = vec![0u8; BUF_LEN];
            let mut i = k;
            while !stop.load(Relaxed) {
                let (f, n, want) = natives[i % natives.len()];
                b.fill(0);
                let r = cpu.run(f, &[b.as_mut_ptr() as u64, n]);
                assert_eq!((r.stop, r.rax), (StopKind::Sentinel, want), "cpu {k}: case {}", i % natives.len());
                hits[k].store(cpu.lookup_hits(), Relaxed);
                runs.fetch_add(1, Relaxed);
                i += 1;
            }
        }));
    }
    let e = EnginePtr(&mut *h.engine);
    // Invalidation rounds so far: the run lasts until the invalidator has had its share too
    // (on a fast, idle host the workers reach TRANSFERS within a second).
    let inval_rounds = Arc::new(AtomicU64::new(0));
    let inval = {
        let (natives, stop, inval_rounds, runs) = (natives.clone(), stop.clone(), inval_rounds.clone(), runs.clone());
        std::thread::spawn(move || {
            let e = e;
            let (mut rounds, mut pending_max) = (0u64, 0usize);
            let mut waited = Duration::ZERO;
            let mut runs_seen = 0;
            while !stop.load(Relaxed) {
                // Paced by the workers' progress, not only by the clock: on a loaded host
                // (CI, 2 cores) a ticket-lock convoy behind preempted threads would
                // otherwise let the invalidator flush everything faster than the workers
                // can finish a run, and the test would crawl.
                let r = runs.load(Relaxed);
                if r < runs_seen + WORKERS as u64 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                runs_seen = r;
                let tw = Instant::now();
                let (f, _, _) = natives[rounds as usize % natives.len()];
                // SAFETY: the engine outlives this thread (joined before the
                // harness drops); used only under its lock.
                let pending = unsafe {
                    Engine::locked(e.0, |e| {
                        if rounds % 64 == 63 {
                            e.invalidate_all();
                        } else {
                            e.invalidate(f, f + 512);
                        }
                        e.reclaim_quiescent(std::ptr::null())
                    })
                };
                waited += tw.elapsed();
                pending_max = pending_max.max(pending);
                rounds += 1;
                inval_rounds.store(rounds, Relaxed);
                std::thread::sleep(Duration::from_millis(8));
            }
            eprintln!("invalidator: {rounds} rounds, {:?} in the locked sections (waiting included)", waited);
            (rounds, pending_max)
        })
    };
    let t0 = Instant::now();
    let transfers = || hits.iter().map(|h| h.load(Relaxed)).sum::<u64>();
    while (transfers() < TRANSFERS || inval_rounds.load(Relaxed) < MIN_ROUNDS) && t0.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Relaxed);
    for w in workers {
        w.join().expect("a worker failed");
    }
    let (rounds, pending_max) = inval.join().expect("invalidator");
    // Everyone is outside now: everything pending can go.
    let left = h.engine.reclaim_quiescent(std::ptr::null());
    let s = h.engine.stats;
    eprintln!(
        "{} runs on {WORKERS} CPUs in {:.1} s: {} lookup hits + {} misses, {} invalidation rounds \
         ({} fragments invalidated, at most {pending_max} pending), {} links, {} unlinks, {} far trampolines, {} resets",
        runs.load(Relaxed),
        t0.elapsed().as_secs_f64(),
        transfers(),
        s.misses,
        rounds,
        s.invalidated_blocks,
        s.links,
        s.unlinks,
        s.trampolines,
        s.resets
    );
    assert!(transfers() + s.misses >= TRANSFERS, "only {} indirect transfers", transfers() + s.misses);
    assert!(s.invalidated_blocks > 1000 && rounds >= MIN_ROUNDS, "the invalidator hardly ran ({rounds} rounds)");
    assert!(s.trampolines > 0, "no link went through a far trampoline");
    assert_eq!(left, 0, "invalidated fragments still pending with every CPU outside");
}

#[test]
fn unlinked_and_table_free_configurations_run_the_corpus() {
    for cfg in [
        Config { link: false, ..Config::default() },
        Config { inline_lookup: false, ..Config::default() },
        Config { link: false, inline_lookup: false, ..Config::default() },
    ] {
        let mut h = Harness::with_config(None, cfg);
        for c in cases() {
            let mut nb = vec![0u8; BUF_LEN];
            let mut tb = vec![0u8; BUF_LEN];
            let n = h.run_native(c.addr(), &[nb.as_mut_ptr() as u64, c.test_n]);
            let t = h.run(c.addr(), &[tb.as_mut_ptr() as u64, c.test_n]);
            assert_eq!((t.stop, t.rax), (StopKind::Sentinel, n.rax), "{} with {cfg:?}", c.name);
            assert_eq!(nb, tb, "{}: buffer", c.name);
        }
        if !cfg.link {
            assert_eq!(h.engine.stats.links, 0);
        }
        if !cfg.inline_lookup {
            assert_eq!(h.engine.lookup_hits(), 0);
        }
    }
}
