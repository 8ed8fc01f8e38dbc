use dbt::corpus::{cases, Case, BUF_LEN};
use dbt::host::{Harness, RunResult, CALLEE_SEED};
use dbt::{Config, NullClient, StopKind};

/// Runs corpus case `c` natively and translated on `h`, each with a zeroed buffer.
/// The translated run must reach the sentinel, leave the callee-saved registers as
/// it found them and have the native run's memory side effects; returns (native
/// result, translated result) for the caller to compare.
fn run_both(h: &mut Harness, c: &Case) -> (RunResult, RunResult) {
    let mut nb = vec![0u8; BUF_LEN];
    let mut tb = vec![0u8; BUF_LEN];
    let nat = h.run_native(c.addr(), &[nb.as_mut_ptr() as u64, c.test_n]);
    let tr = h.run(c.addr(), &[tb.as_mut_ptr() as u64, c.test_n]);
    assert_eq!(tr.stop, StopKind::Sentinel, "{}: stopped {:?} at {:#x}", c.name, tr.stop, tr.stop_pc);
    assert_eq!(nat.callee_saved, CALLEE_SEED, "{}: native callee-saved", c.name);
    assert_eq!(tr.callee_saved, CALLEE_SEED, "{}: callee-saved", c.name);
    assert!(tb == nb, "{}: memory side effects differ", c.name);
    (nat, tr)
}

#[test]
fn corpus_null_client_matches_native() {
    let mut h = Harness::new(Some(Box::new(NullClient)));
    for c in cases() {
        let (nat, tr) = run_both(&mut h, &c);
        assert_eq!(tr.rax, nat.rax, "{}: return value", c.name);
        eprintln!("{}: ok ({:#x})", c.name, tr.rax);
    }
    let s = h.engine.stats;
    eprintln!("{:?}", s);
    assert!(s.blocks > 100 && s.links > 0 && s.lookups > 0);
}

/// With `Config::ibt` every fragment entry that translated code reaches by an
/// indirect jump starts with `endbr64`, and the corpus still runs right.
#[test]
fn ibt_entries_start_with_endbr64() {
    let mut h = Harness::with_config(Some(Box::new(NullClient)), Config { ibt: true, ..Config::default() });
    for c in cases() {
        let (nat, tr) = run_both(&mut h, &c);
        assert_eq!(tr.rax, nat.rax, "{}", c.name);
    }
    let entries = h.engine.entries();
    assert!(entries.len() > 100);
    for (ind, body) in entries {
        for at in [ind, body] {
            // SAFETY: entries of live fragments in the harness's code cache.
            let b = unsafe { core::slice::from_raw_parts(at as *const u8, 4) };
            assert_eq!(b, [0xF3, 0x0F, 0x1E, 0xFA], "{at:#x}");
        }
    }
}

/// Cached (non-transparent) returns: the corpus gives the native results, except
/// what the mode is documented to break: the get-PC idiom (`call 1f; 1: pop`) reads
/// a code-cache return pad instead of its own address. setjmp/longjmp (a jump to a
/// pad read off the stack) and qsort's callbacks work. Two rounds: the second runs
/// on linked fragments and the same pads.
#[test]
fn cached_returns_run_the_corpus() {
    let mut h = Harness::with_config(Some(Box::new(NullClient)), Config { cached_returns: true, ..Config::default() });
    for round in 0..2 {
        for c in cases() {
            let (nat, tr) = run_both(&mut h, &c);
            if c.name == "c_getpc" {
                assert_eq!(nat.rax, 0);
                assert_ne!(tr.rax, 0, "the get-PC idiom sees the return pad, not its own address");
            } else {
                assert_eq!(tr.rax, nat.rax, "{}: return value (round {round})", c.name);
            }
        }
        assert!(h.engine.stats.pads > 50, "{:?}", h.engine.stats);
    }
}

/// `Config::count_lookups` counts inline-lookup hits in translated code (flags
/// untouched: results still match); without it they stay uncounted.
#[test]
fn lookup_hits_are_counted_on_request() {
    let dyn_case = cases().into_iter().find(|c| c.name == "dyn_dispatch").expect("corpus case");
    let mut h = Harness::with_config(Some(Box::new(NullClient)), Config { count_lookups: true, ..Config::default() });
    let (nat, tr) = run_both(&mut h, &dyn_case);
    assert_eq!(tr.rax, nat.rax);
    let (hits, misses) = (h.engine.lookup_hits(), h.engine.stats.misses);
    assert!(hits > 10 * misses && misses > 0, "hits {hits} misses {misses}");
    let mut h = Harness::new(Some(Box::new(NullClient)));
    run_both(&mut h, &dyn_case);
    assert_eq!(h.engine.lookup_hits(), 0);
}
