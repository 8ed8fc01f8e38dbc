//! The dispatcher's fast path (the target is already translated: find it,
//! link the exit, fill the lookup entry) never allocates. Alone in its test
//! binary: the allocation counter is process-wide.
use dbt::corpus::{cases, BUF_LEN};
use dbt::host::Harness;
use dbt::host_alloc::DISPATCHER_ALLOCS;
use dbt::{Config, NullClient};
use std::sync::atomic::Ordering;

/// Runs every corpus function until nothing new is translated, then once more while
/// counting dispatcher-mode allocations; returns (allocations, dispatches,
/// links) of the second pass.
fn second_pass(cfg: Config) -> (usize, u64, u64) {
    let mut h = Harness::with_config(Some(Box::new(NullClient)), cfg);
    let mut buf = vec![0u8; BUF_LEN];
    let run_all = |h: &mut Harness, buf: &mut Vec<u8>| {
        // dyn_dispatch, miniz_oxide and regex call malloc, whose paths (and so
        // the blocks they reach) differ from run to run: every other corpus
        // function runs the same blocks on every pass once translated.
        for c in cases().into_iter().filter(|c| !["dyn_dispatch", "miniz_oxide", "regex"].contains(&c.name)) {
            buf.fill(0);
            h.run(c.addr(), &[buf.as_mut_ptr() as u64, c.test_n]);
        }
    };
    // Warm up until a pass translates nothing new (some paths depend on the
    // buffer contents an earlier pass left).
    for _ in 0..5 {
        let b = h.engine.stats.blocks;
        run_all(&mut h, &mut buf);
        if h.engine.stats.blocks == b {
            break;
        }
    }
    let (d0, l0, b0) = (h.engine.stats.dispatches, h.engine.stats.links, h.engine.stats.blocks);
    let a0 = DISPATCHER_ALLOCS.load(Ordering::Relaxed);
    run_all(&mut h, &mut buf);
    let allocs = DISPATCHER_ALLOCS.load(Ordering::Relaxed) - a0;
    assert_eq!(h.engine.stats.blocks, b0, "the second pass translated new blocks: not a fast-path test");
    (allocs, h.engine.stats.dispatches - d0, h.engine.stats.links - l0)
}

#[test]
fn dispatcher_fast_path_does_not_allocate() {
    // Every direct and indirect transfer through the dispatcher.
    let (allocs, dispatches, _) = second_pass(Config { link: false, inline_lookup: false, ..Config::default() });
    assert!(dispatches > 5_000, "{dispatches} dispatches: the fast path was hardly exercised");
    assert_eq!(allocs, 0, "{allocs} allocations in {dispatches} fast-path dispatches");
    // Linked direct branches, indirect ones through the dispatcher (which
    // links nothing new once warm: linking's own bookkeeping is an intrusive
    // list, checked by the engine_ops tests).
    let (allocs, dispatches, _) = second_pass(Config { inline_lookup: false, ..Config::default() });
    assert!(dispatches > 1_000, "{dispatches} dispatches");
    assert_eq!(allocs, 0, "{allocs} allocations in {dispatches} dispatches");
    // Default configuration: the few dispatches left are lookup misses.
    let (allocs, dispatches, _) = second_pass(Config::default());
    assert!(dispatches > 0, "{dispatches} dispatches");
    assert_eq!(allocs, 0, "{allocs} allocations in {dispatches} dispatches");
}
