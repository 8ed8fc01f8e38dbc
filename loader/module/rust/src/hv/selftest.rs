//! The checks the suites run through ioctls (`kdbt ept-check [--violate [--hidden]]`,
//! `nmi-check`, `shadow-check`).
use super::*;

/// Makes an EPT violation on purpose (`kdbt ept-check --violate`): a page kdbt owns loses
/// every EPT right and is read. The read exits, kdbt cannot handle it, and the kernel
/// panics with kdbt's diagnostic: on success this never returns. With `flags`
/// [`kdbt_abi::EPT_VIOLATE_HIDDEN`] (`--hidden`) the page read is instead the VMCS of the
/// last virtualized CPU, which kdbt hides from the guest: the panic must name it.
pub fn ept_violation_check(flags: u32) -> Result<String, String> {
    if flags & kdbt_abi::EPT_VIOLATE_HIDDEN != 0 {
        return hidden_touch_check();
    }
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    let r = set_page_perms(gpa, ::ept::Perms::NONE).map(|_| {
        kinfo!("reading {:#x} without EPT rights: expect a fatal VM exit and a panic", gpa);
        // SAFETY: our page (mapped; only its EPT rights are gone).
        unsafe { page.read_volatile() }
    });
    let restore = set_page_perms(gpa, ::ept::Perms::RWX);
    if restore.is_ok() {
        // SAFETY: our page, RWX again.
        unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    }
    r?;
    restore?;
    Err(alloc::format!("reading {gpa:#x} without EPT rights did not end in a fatal VM exit"))
}

/// Reads the VMCS of the last virtualized CPU from the guest (the kernel): with hidden
/// hypervisor memory this is a fatal EPT violation whose panic names "vmcs of cpuN".
pub(super) fn hidden_touch_check() -> Result<String, String> {
    let hp = hw::CpusReadGuard::lock();
    let (cpu, pc, reader) = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        if st.ept.is_none() {
            return Err(String::from(
                "kdbt runs with shadow paging: hypervisor memory is not hidden from the guest in this mode",
            ));
        }
        let last = st.cpus.iter().enumerate().rev().find_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.pc)));
        let (cpu, pc) = last.ok_or_else(|| String::from("no CPU is virtualized"))?;
        // Read on another CPU when there is one: Bochs keeps TLB entries across VM entries
        // and exits (no VPID tags), so on the owner the translations its own native launch
        // and root mode made of the block would still let the read through.
        let reader = (0..cpu).find(|&c| st.cpus[c as usize].is_some()).unwrap_or(cpu);
        (cpu, pc, reader)
    };
    // SAFETY: translating a direct-map address (no access).
    let vmcs = unsafe { ffi::kdbt_glue_virt_to_phys((pc as usize + percpu::PAGE) as *const _) };
    kinfo!("reading the VMCS of cpu{} ({:#x}) on cpu{} from the guest: expect a fatal EPT violation naming it", cpu, vmcs, reader);
    let addr = pc as usize + percpu::PAGE;
    let mut v = 0u64;
    // SAFETY: the block stays allocated (hotplug lock held, ioctls serialized); it is
    // mapped in the kernel's page tables; whether EPT lets the guest read it is the test.
    hw::run_on_cpu(reader, || v = unsafe { (addr as *const u64).read_volatile() })
        .map_err(|e| alloc::format!("cpu{reader}: cannot run on it (error {e})"))?;
    drop(hp);
    let here = reader;
    Err(alloc::format!(
        "read the VMCS of cpu{cpu} ({vmcs:#x}) on cpu{here} from the guest without a fault (first word {v:#x}): hypervisor memory is not hidden{} (EPT rights there now: {:?})",
        if ept::hiding() { "" } else { " (hide_hv=0)" },
        query_perms(vmcs)
    ))
}

/// INVEPT hypercalls each virtualized CPU has served, by CPU.
pub(super) fn inveptions() -> Vec<(u32, u64)> {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return Vec::new() };
    st.cpus
        .iter()
        .enumerate()
        .filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.shared().stats.snapshot().inveptions)))
        .collect()
}

/// Exercises per-page permission changes on a scratch page kdbt owns: every permission
/// kind the CPU supports (none, R, RW, RX, X-only, RWX), each checked by a software walk of
/// the shared tables and by one INVEPT per CPU; the page is read while readable. Returns a
/// one-line report.
pub fn ept_check() -> Result<String, String> {
    use ::ept::Perms;
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    // SAFETY: our page, mapped RWX by EPT until we change it.
    unsafe { page.write_volatile(0x6b64_6274) };
    let xo = STATE.lock().as_ref().is_some_and(|st| st.controls.ept.execute_only);
    let mut kinds = alloc::vec![Perms::NONE, Perms::R, Perms::RW, Perms::RX];
    if xo {
        kinds.push(Perms::X);
    }
    kinds.push(Perms::RWX);
    let before = inveptions();
    let mut report = String::new();
    let mut result = Ok(());
    for &p in &kinds {
        if let Err(e) = set_page_perms(gpa, p) {
            result = Err(alloc::format!("set {p} on {gpa:#x}: {e}"));
            break;
        }
        let now = query_perms(gpa);
        if now.as_ref() != Ok(&p) {
            result = Err(alloc::format!("{gpa:#x}: set {p}, the tables say {now:?}"));
            break;
        }
        if p.contains(Perms::R) {
            // SAFETY: our page, readable under the permissions just installed.
            let v = unsafe { page.read_volatile() };
            if v != 0x6b64_6274 {
                result = Err(alloc::format!("{gpa:#x} reads {v:#x} under {p}"));
                break;
            }
        }
        let _ = write!(report, "{p} ");
    }
    // A stale translation: the page readable only (INVEPT everywhere), read on one CPU so
    // its TLB holds the read-only translation, then made writable *without* INVEPT (the
    // window between a raise and the INVEPT IPIs) and written there. If the CPU uses its
    // stale translation, the write violates EPT; root mode finds the tables allow it,
    // INVEPTs and retries (before, any EPT violation was fatal).
    let mut stale = None;
    if result.is_ok() {
        stale = Some(stale_violation_check(gpa, page));
        if let Some(Err(e)) = &stale {
            result = Err(e.clone());
        }
    }
    // Whatever happened, give the page back its identity-map rights before freeing it.
    let restore = set_page_perms(gpa, Perms::RWX);
    let after = inveptions();
    // SAFETY: our page; RWX again (or the module is not loaded any more).
    unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    result?;
    restore?;
    let mut counts = String::new();
    for ((cpu, b), (_, a)) in before.iter().zip(after.iter()) {
        let _ = write!(counts, " cpu{cpu}_invept={}", a - b);
    }
    let stale = stale.and_then(|s| s.ok()).unwrap_or(0);
    Ok(alloc::format!("page={gpa:#x} perms=[{}]{counts} stale_violations_retried={stale}", report.trim_end()))
}

/// EPT-violation exits a virtualized CPU has taken.
fn ept_violation_exits(cpu: u32) -> u64 {
    let guard = STATE.lock();
    let Some(st) = guard.as_ref() else { return 0 };
    st.cpus
        .get(cpu as usize)
        .and_then(|c| c.as_ref())
        .map_or(0, |c| c.shared().stats.snapshot().counts[vmx::exit::reason::EPT_VIOLATION as usize])
}

/// See [`ept_check`]: returns how many stale EPT violations root mode retried on this CPU
/// (0 if the CPU re-walked the tables itself).
fn stale_violation_check(gpa: u64, page: *mut u64) -> Result<u64, String> {
    use ::ept::Perms;
    set_page_perms(gpa, Perms::R)?;
    let cpu = hw::this_cpu();
    let before = ept_violation_exits(cpu);
    // SAFETY: irq save/restore pair: the read, the raise and the write stay on this CPU.
    let flags = unsafe { ffi::kdbt_glue_irq_save() };
    let cpu_now = hw::this_cpu();
    // SAFETY: our page, readable.
    let v = unsafe { page.read_volatile() };
    let r = hypercall(vmx::hypercall::Call::EptSetPerms, gpa | Perms::RW.bits() as u64);
    if r & (1 << 63) == 0 {
        // SAFETY: our page; EPT now allows the write (this CPU may not know yet).
        unsafe { page.write_volatile(v ^ 1) };
    }
    // SAFETY: restores what irq_save returned.
    unsafe { ffi::kdbt_glue_irq_restore(flags) };
    if r & (1 << 63) != 0 {
        return Err(alloc::format!("EptSetPerms RW on {gpa:#x} returned {r:#x}"));
    }
    // SAFETY: our page.
    let w = unsafe { page.read_volatile() };
    if w != v ^ 1 {
        return Err(alloc::format!("{gpa:#x}: the write after the raise reads back {w:#x}, not {:#x}", v ^ 1));
    }
    // SAFETY: our page; put the pattern back for the caller.
    unsafe { page.write_volatile(v) };
    Ok(if cpu_now == cpu { ept_violation_exits(cpu) - before } else { 0 })
}

/// NMI counters of a virtualized CPU: (NMI exits, NMI-window exits, NMIs injected).
pub(super) fn nmi_counters(shared: *const percpu::Shared) -> (u64, u64, u64) {
    use vmx::exit::reason;
    // SAFETY: the shared page stays allocated while its CPU is in `cpus` (the caller holds
    // the hotplug lock, and ioctls are serialized); the counters are atomics its CPU's
    // root mode updates concurrently; the page is guest-visible.
    let ctx = unsafe { (*shared).stats.snapshot() };
    (ctx.counts[reason::EXCEPTION_NMI as usize], ctx.counts[reason::NMI_WINDOW as usize], ctx.nmis_injected)
}

/// Checks NMI delivery on every virtualized CPU: an NMI sent to it, and a second one its
/// handler sends itself while NMIs are blocked, must both reach the kernel. With NMI
/// virtualization each must also have exited (NMI exits), been injected, and the second
/// waited for the NMI window. Returns a one-line report.
pub fn nmi_check() -> Result<String, String> {
    let _hp = hw::CpusReadGuard::lock();
    let (cpus, vnmi): (Vec<(u32, *const percpu::Shared)>, bool) = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        let cpus =
            st.cpus.iter().enumerate().filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.shared))).collect();
        (cpus, st.controls.vnmi)
    };
    let mut report = alloc::format!("nmi_virtualization={}", vnmi as u8);
    let mut failures = String::new();
    for (cpu, pc) in cpus {
        let (e0, w0, i0) = nmi_counters(pc);
        // SAFETY: process context; the glue waits for the NMIs with a timeout.
        let got = unsafe { ffi::kdbt_glue_nmi_test(cpu) };
        let (e1, w1, i1) = nmi_counters(pc);
        let (exits, windows, injected) = (e1 - e0, w1 - w0, i1 - i0);
        let _ = write!(report, " cpu{cpu}: nmis={got} exits={exits} window_exits={windows} injected={injected};");
        if got != 2 {
            let _ = write!(failures, "cpu{cpu} received {got} of 2 NMIs; ");
        } else if vnmi && (exits < 2 || windows < 1 || injected < 2) {
            let _ = write!(failures, "cpu{cpu}: NMIs arrived but not through kdbt ({exits} exits, {windows} NMI windows, {injected} injected); ");
        }
    }
    let report = String::from(report.trim_end_matches(';'));
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(alloc::format!("{}({report})", failures))
    }
}

/// Shadow paging's permission hook on every CPU (`kdbt shadow-check`): a scratch page is
/// written on a CPU (so that CPU holds a writable shadow leaf for it), made not writable
/// (policy lifted at the first violation), the policy applied to every CPU's shadow
/// leaves (hypercall), then written again on that CPU through the same direct-map alias:
/// the write must trap to kdbt exactly once and complete. Each CPU in turn. `flags`
/// [`kdbt_abi::SHADOW_CHECK_TEST_SKIP_APPLY`]: do not apply (the writable leaf stays and the
/// check must fail). Returns a one-line report.
pub fn shadow_policy_check(flags: u32) -> Result<String, String> {
    use ::shadow::PagePolicy;
    let skip_apply = flags & kdbt_abi::SHADOW_CHECK_TEST_SKIP_APPLY != 0;
    let _hp = hw::CpusReadGuard::lock();
    let cpus: Vec<(u32, *mut PerCpu)> = {
        let guard = STATE.lock();
        let Some(st) = guard.as_ref() else { return Err(String::from("kdbt is not loaded")) };
        if !st.controls.shadow {
            return Err(String::from("kdbt runs with EPT: the shadow policy hook needs `kdbt load --paging shadow`"));
        }
        st.cpus.iter().enumerate().filter_map(|(cpu, c)| c.as_ref().map(|c| (cpu as u32, c.pc))).collect()
    };
    // SAFETY: one zeroed page; process context.
    let page = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if page.is_null() {
        return Err(String::from("out of memory"));
    }
    // SAFETY: our page.
    let gpa = unsafe { ffi::kdbt_glue_virt_to_phys(page as *const _) };
    let addr = page as usize;
    // SAFETY: the blocks stay allocated while their CPUs are in `cpus` (hotplug lock held);
    // the published counters are atomics.
    let policy_faults = |pc: *mut PerCpu| unsafe { (*pc).ctl.shadow.as_ref() }.map_or(0, |s| s.snapshot()[2]);
    let mut report = alloc::format!("page={gpa:#x}");
    let mut result = Ok(());
    for &(cpu, pc) in &cpus {
        let r = (|| -> Result<(), String> {
            // SAFETY: our page, written on `cpu` (its shadow now maps it writable).
            hw::run_on_cpu(cpu, || unsafe { (addr as *mut u64).write_volatile(0x100 + cpu as u64) })
                .map_err(|e| alloc::format!("cpu{cpu}: cannot run on it (error {e})"))?;
            let (h0, f0) = (shadow::POLICY.hits(), policy_faults(pc));
            shadow::POLICY.set(gpa, PagePolicy::NOT_WRITABLE, true)?;
            if !skip_apply {
                for &(other, _) in &cpus {
                    let mut rax = 0;
                    hw::run_on_cpu(other, || rax = hypercall(vmx::hypercall::Call::ShadowApplyPolicy, gpa))
                        .map_err(|e| alloc::format!("cpu{other}: cannot run on it (error {e})"))?;
                    if rax != vmx::hypercall::OK {
                        return Err(alloc::format!("cpu{other}: apply-policy hypercall returned {rax:#x}"));
                    }
                }
            }
            let mut before = 0;
            // SAFETY: our page; the write traps to kdbt, which lifts the policy, and then
            // completes.
            hw::run_on_cpu(cpu, || unsafe {
                before = (addr as *const u64).read_volatile();
                (addr as *mut u64).write_volatile(0x200 + cpu as u64);
            })
            .map_err(|e| alloc::format!("cpu{cpu}: cannot run on it (error {e})"))?;
            // SAFETY: our page.
            let after = unsafe { (addr as *const u64).read_volatile() };
            let (hits, faults) = (shadow::POLICY.hits() - h0, policy_faults(pc) - f0);
            shadow::POLICY.clear(gpa);
            let _ = write!(report, " cpu{cpu}_policy_faults={faults}");
            if before != 0x100 + cpu as u64 || after != 0x200 + cpu as u64 {
                return Err(alloc::format!("cpu{cpu}: page read {before:#x} then {after:#x}"));
            }
            if hits != 1 || faults != 1 {
                return Err(alloc::format!(
                    "cpu{cpu}: the write to the not-writable page did not trap once ({hits} lifts, {faults} policy faults)"
                ));
            }
            Ok(())
        })();
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    shadow::POLICY.clear(gpa);
    // SAFETY: our page; it has no policy any more.
    unsafe { ffi::kdbt_glue_free_pages(page.cast(), 0) };
    match result {
        Ok(()) => Ok(report),
        Err(e) => Err(alloc::format!("{e} ({report})")),
    }
}
