//! The dispatcher's memory: what one dispatch may allocate (the bound the
//! kernel's pool reserve rests on), and the refusal when the pool is low.
//! Alone in its test binary: the arena's peak measurement is process-wide.
use dbt::corpus::{cases, BUF_LEN};
use dbt::host::{Harness, HostEnv};
use dbt::host_alloc::{ARENA, MAX_DISPATCH_GROWTH};
use dbt::pcmap::RegionDir;
use dbt::pool::TRANSLATE_RESERVE;
use dbt::{Config, InsCount, StopKind};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// The arena and its measurements are process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Every corpus function translated from scratch, with the inscount client
/// (the most inserted code): no single dispatch grows the arena by more than
/// a quarter of [`TRANSLATE_RESERVE`], the headroom the kernel's pool keeps
/// before it lets a translation start.
#[test]
fn one_dispatch_stays_well_inside_the_reserve() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Harness::new(Some(Box::new(InsCount)));
    let mut buf = vec![0u8; BUF_LEN];
    MAX_DISPATCH_GROWTH.store(0, Ordering::Relaxed);
    for c in cases() {
        buf.fill(0);
        let r = h.run(c.addr(), &[buf.as_mut_ptr() as u64, c.test_n]);
        assert_eq!(r.stop, StopKind::Sentinel, "{}", c.name);
    }
    let grew = MAX_DISPATCH_GROWTH.load(Ordering::Relaxed);
    let st = ARENA.stats();
    eprintln!(
        "{} blocks, {} dispatches: most bump space one dispatch used {grew} B, largest request {} B, arena peak {} KB",
        h.engine.stats.blocks,
        h.engine.stats.dispatches,
        st.largest,
        st.peak >> 10
    );
    assert!(h.engine.stats.blocks > 1000, "too few blocks to measure");
    assert!(grew > 0, "the measurement saw no dispatcher allocation");
    assert!(grew <= TRANSLATE_RESERVE / 4, "one dispatch grew the arena by {grew} B (reserve {TRANSLATE_RESERVE} B)");
}

/// With a small pool, the dispatcher translates until the pool is down to
/// the reserve and then nothing more: the run stops with `NoMemory` at the
/// first untranslated block's native pc (not a crash, not a half-built
/// fragment, no failed allocation), and the next run stops at the same pc
/// having translated nothing new. Without the budget the same run completes
/// with more blocks, so the stop is the budget's doing.
#[test]
fn low_memory_refuses_the_translation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cases().into_iter().find(|c| c.name == "sha2").expect("sha2 case");
    let mut buf = vec![0u8; BUF_LEN];
    let mut full = Harness::new(Some(Box::new(InsCount)));
    let r = full.run(c.addr(), &[buf.as_mut_ptr() as u64, c.test_n]);
    assert_eq!(r.stop, StopKind::Sentinel);
    let all_blocks = full.engine.stats.blocks;
    drop(full);

    let region = Config::default().hot_size + Config::default().stub_size;
    let mut env = HostEnv::new();
    // The directories of the two regions this run uses, the reserve and
    // 64 KB: some of the blocks, not all.
    env.memory_budget = Some(2 * RegionDir::bytes_for(region) + TRANSLATE_RESERVE + (64 << 10));
    let failures = ARENA.stats().failures;
    let mut h = Harness::with_env(Some(Box::new(InsCount)), Config::default(), env);
    buf.fill(0);
    let r = h.run(c.addr(), &[buf.as_mut_ptr() as u64, c.test_n]);
    assert_eq!(r.stop, StopKind::NoMemory, "stop at {:#x}", r.stop_pc);
    assert_ne!(r.stop_pc, 0);
    let blocks = h.engine.stats.blocks;
    assert!(blocks >= 1 && blocks < all_blocks, "{blocks} blocks translated of {all_blocks}");
    let again = h.run(c.addr(), &[buf.as_mut_ptr() as u64, c.test_n]);
    assert_eq!((again.stop, again.stop_pc), (StopKind::NoMemory, r.stop_pc));
    assert_eq!(h.engine.stats.blocks, blocks, "nothing translated below the reserve");
    assert_eq!(ARENA.stats().failures, failures, "an allocation failed instead of a refusal");
    eprintln!("budget stop after {blocks} of {all_blocks} blocks at {:#x}", r.stop_pc);
}
