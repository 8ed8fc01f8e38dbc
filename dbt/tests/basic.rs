use dbt::corpus::{cases, BUF_LEN};
use dbt::host::{Harness, CALLEE_SEED};
use dbt::{NullClient, StopKind};

#[test]
fn corpus_null_client_matches_native() {
    let mut h = Harness::new(Some(Box::new(NullClient)));
    for c in cases() {
        let mut nb = vec![0u8; BUF_LEN];
        let mut tb = vec![0u8; BUF_LEN];
        let nat = h.run_native(c.addr(), &[nb.as_mut_ptr() as u64, c.test_n]);
        let tr = h.run(c.addr(), &[tb.as_mut_ptr() as u64, c.test_n]);
        assert_eq!(tr.stop, StopKind::Sentinel, "{}: stopped {:?} at {:#x}", c.name, tr.stop, tr.stop_pc);
        assert_eq!(tr.rax, nat.rax, "{}: return value", c.name);
        assert_eq!(tr.callee_saved, CALLEE_SEED, "{}: callee-saved", c.name);
        assert_eq!(nat.callee_saved, CALLEE_SEED, "{}: native callee-saved", c.name);
        assert!(tb == nb, "{}: memory side effects differ", c.name);
        eprintln!("{}: ok ({:#x})", c.name, tr.rax);
    }
    let s = h.engine.stats;
    eprintln!("{:?}", s);
    assert!(s.blocks > 100 && s.links > 0 && s.lookups > 0);
}
