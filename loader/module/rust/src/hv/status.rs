//! What `kdbt status` and the panic path read: per-CPU state and counters, the fatal
//! VM-exit record.
use super::*;

/// Per-CPU status for `kdbt status`.
/// One CPU's state for [`status`]: (virtualized, launch cycles, exit counters) of a CPU
/// kdbt holds.
pub type HeldCpu = (bool, u64, vmx::exit::ExitStats, Option<[u64; shadow::COUNTERS]>);

/// Per-CPU status for `kdbt status`: `f(cpu, online, held)` for every possible CPU id when
/// loaded (`held` is None for a CPU kdbt does not hold: offline, or its launch failed).
/// Returns whether the hypervisor is loaded.
pub fn status(mut f: impl FnMut(u32, bool, Option<HeldCpu>)) -> bool {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return false };
    for cpu in 0..hw::cpu_ids() {
        let online = hw::cpu_online(cpu);
        match st.cpus.get(cpu as usize).and_then(|c| c.as_ref()) {
            Some(c) => {
                // That CPU's root mode writes these fields concurrently; all of them are
                // atomics. The per-CPU block itself is hidden under EPT: only its
                // guest-visible shared page is read here (and the shadow block under
                // shadow paging, which hides nothing from the guest).
                let shared = c.shared();
                let sh = if st.controls.shadow {
                    // SAFETY: the block stays allocated while in `cpus`, readable without
                    // EPT; the shadow block lives as long as it; its published counters
                    // are atomics.
                    unsafe { (*c.pc).ctl.shadow.as_ref() }.map(|s| s.snapshot())
                } else {
                    None
                };
                let (virt, cycles, stats) = (
                    shared.virtualized.load(Ordering::Acquire),
                    shared.launch_cycles.load(Ordering::Relaxed),
                    shared.stats.snapshot(),
                );
                f(cpu, online, Some((virt, cycles, stats, sh)));
            }
            None => f(cpu, online, None),
        }
    }
    true
}

/// Whether the current CPU took a fatal VM exit (its guest-side NMI handler then panics
/// with [`fatal_message`]). Any context, NMI included.
pub fn fatal_pending() -> bool {
    // SAFETY: reads the current CPU number.
    fatal::for_cpu(unsafe { ffi::kdbt_glue_this_cpu() }).is_some()
}

/// Describes the fatal VM exit recorded on the current CPU, with what root mode found at
/// the exit (the page's mapping then, and which hypervisor object it is, if one). Called
/// in NMI context: reads nothing but the record (the EPT tables are hidden from here).
pub fn fatal_message(out: &mut impl Write) {
    // SAFETY: reads the current CPU number.
    let cpu = unsafe { ffi::kdbt_glue_this_cpu() };
    let Some(r) = fatal::for_cpu(cpu) else {
        let _ = write!(out, "kdbt: cpu{cpu}: no fatal VM exit recorded");
        return;
    };
    let _ = write!(out, "kdbt: {}", fatal::Describe { cpu, kind: r.kind, diag: r.diag, now: r.now, hidden: r.hidden });
}
