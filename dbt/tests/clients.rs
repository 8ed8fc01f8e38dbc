//! Client tools checked against exact references.
use dbt::client::{MEMTRACE_BASE_SLOT, MEMTRACE_COUNT_SLOT};
use dbt::host::Harness;
use dbt::{BbCov, InsCount, MemTrace, StopKind};

#[inline(never)]
extern "C" fn three_blocks(buf: *mut u8, n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..n {
        if i % 3 == 0 {
            acc += i;
        } else {
            acc ^= i << 2;
        }
        // SAFETY: test buffer of >= 64 bytes.
        unsafe { core::ptr::write_volatile(buf.add((i % 8) as usize * 8) as *mut u64, acc) };
    }
    acc
}

#[test]
fn bbcov_counts_block_hits() {
    let mut h = Harness::new(Some(Box::new(BbCov::new())));
    let mut b = vec![0u8; 64];
    let r = h.run(three_blocks as *const () as u64, &[b.as_mut_ptr() as u64, 30]);
    assert_eq!(r.stop, StopKind::Sentinel);
    assert_eq!(r.rax, h.run_native(three_blocks as *const () as u64, &[b.as_mut_ptr() as u64, 30]).rax);
    // Hits of the entry block: exactly one; some block ran 30 times (the
    // loop body) and one 10 times (the i % 3 == 0 arm).
    let hits = h.bbcov_hits();
    let entry = hits.iter().find(|(pc, _)| *pc == three_blocks as *const () as u64).expect("entry block");
    assert_eq!(entry.1, 1);
    assert!(hits.iter().any(|(_, n)| *n == 10), "{hits:x?}");
    assert!(hits.iter().any(|(_, n)| *n >= 30), "{hits:x?}");
    // Block lengths (what drcov files record): the entry block runs to its first branch.
    let entry = three_blocks as *const () as u64;
    // SAFETY: reading this test binary's own code.
    let code = unsafe { core::slice::from_raw_parts(entry as *const u8, 256) };
    let mut d = iced_x86::Decoder::with_ip(64, code, entry, iced_x86::DecoderOptions::NONE);
    let first_branch = core::iter::from_fn(|| Some(d.decode()))
        .find(|i| i.flow_control() != iced_x86::FlowControl::Next)
        .expect("a branch in three_blocks");
    let blocks = h.bbcov_blocks();
    assert_eq!(blocks.len(), hits.len());
    let b0 = blocks.iter().find(|b| b.start == entry).unwrap();
    assert_eq!(b0.len as u64, first_branch.next_ip() - entry, "{blocks:x?}");
    assert!(blocks.iter().all(|b| b.len > 0 && b.len < 256), "{blocks:x?}");
}

#[test]
fn memtrace_records_every_store() {
    let mut h = Harness::new(Some(Box::new(MemTrace::new(16))));
    let ring = vec![[0u64; 2]; 1 << 16];
    h.scratch().client[MEMTRACE_BASE_SLOT] = ring.as_ptr() as u64;
    h.scratch().client[MEMTRACE_COUNT_SLOT] = 0;
    let mut b = vec![0u8; 64];
    let base = b.as_mut_ptr() as u64;
    let r = h.run(three_blocks as *const () as u64, &[base, 30]);
    assert_eq!(r.stop, StopKind::Sentinel, "bad code {}", h.engine.trace_bad.get());
    let total = h.scratch().client[MEMTRACE_COUNT_SLOT] as usize;
    assert!(total < ring.len());
    let writes: Vec<u64> = ring[..total]
        .iter()
        .filter(|e| e[1] >> 16 == 1 && e[0] >= base && e[0] < base + 64)
        .map(|e| {
            assert_eq!(e[1] & 0xffff, 8, "8-byte stores");
            e[0] - base
        })
        .collect();
    let expect: Vec<u64> = (0..30u64).map(|i| (i % 8) * 8).collect();
    assert_eq!(writes, expect);
    // The return address read by `ret` is recorded too (a read of 8 bytes).
    assert!(ring[..total].iter().any(|e| e[1] == 8));
}

/// A loop block in which some flag is live before every instruction
/// (`adc` reads CF, `loop` is followed by code that reads it): the inscount
/// update cannot go where flags are dead, so it takes the flags-free form;
/// the carry chain and the count must both come out exact.
#[test]
fn inscount_where_flags_are_always_live() {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.xor(eax, eax).unwrap();
    a.mov(ecx, 40).unwrap();
    a.mov(rdx, 0x7fff_ffff_ffff_fff0u64).unwrap();
    a.stc().unwrap();
    a.set_label(&mut top).unwrap();
    a.adc(rax, rdx).unwrap();
    a.loop_(top).unwrap();
    a.adc(rax, 0).unwrap();
    a.ret().unwrap();
    let near = inscount_where_flags_are_always_live as *const () as u64;
    let p = dbt::host::rwx_near(near, 4096).expect("code memory");
    let code = a.assemble(p).unwrap();
    // SAFETY: our fresh RWX page.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len()) };
    let mut h = Harness::new(Some(Box::new(InsCount)));
    let r = h.run(p, &[]);
    assert_eq!(r.stop, StopKind::Sentinel);
    assert_eq!(r.rax, h.run_native(p, &[]).rax);
    assert_eq!(Some(h.inscount()), h.ptrace_count(p, &[]));
}
