//! Load and unload: preflight of every CPU, the controls, the shared tables (EPT map,
//! host PML4), per-CPU blocks, the launch and devirtualize of one CPU, rollback.
use super::*;

/// Parses the `fake_missing` module parameter: comma-separated [`Features`] names, any
/// case (e.g. `ept,vpid`).
pub(super) fn parse_mask(fake: &str) -> Result<Features, String> {
    let mut mask = Features::empty();
    for name in fake.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let upper: String = name.chars().map(|c| c.to_ascii_uppercase()).collect();
        match Features::from_name(&upper) {
            Some(f) => mask |= f,
            None => return Err(alloc::format!("fake_missing: unknown feature '{name}'")),
        }
    }
    Ok(mask)
}

/// Free a per-CPU block (and its shadow MMU's pool, and its shared page). The block must
/// be visible to the guest again, or no CPU run on the EPT map any more.
pub(super) fn free_percpu(pc: *mut PerCpu) {
    // SAFETY: the block is ours and its CPU is not virtualized.
    let (sh, shared) = unsafe { ((*pc).ctl.shadow, (*pc).ctl.shared) };
    shadow::free(sh);
    if !shared.is_null() {
        // SAFETY: the shared page came from kdbt_glue_alloc_pages(0); its CPU is not
        // virtualized, so root mode no longer writes it.
        unsafe { ffi::kdbt_glue_free_pages(shared as *mut _, 0) };
    }
    // SAFETY: `pc` came from kdbt_glue_alloc_pages(PERCPU_ORDER) and is no longer in use
    // (its CPU is not virtualized).
    unsafe { ffi::kdbt_glue_free_pages(pc.cast(), PERCPU_ORDER) }
}

pub(super) fn block_pages(pc: *mut PerCpu) -> Vec<u64> {
    // SAFETY: translating our own direct-map block (no access).
    let base = unsafe { ffi::kdbt_glue_virt_to_phys(pc as *const _) };
    (0..percpu::PERCPU_SIZE as u64 / 4096).map(|i| base + i * 4096).collect()
}

/// Hides `cpu`'s block from the guest before its launch (EPT mode); the first block of a
/// load also hands the map to root mode, hiding its tables with it.
pub(super) fn hide_block(st: &mut State, cpu: u32, pc: *mut PerCpu) -> Result<(), String> {
    let Some(page) = st.ept.as_mut() else { return Ok(()) };
    let pages = block_pages(pc);
    if !st.handed {
        let pml4_pa = st.controls.host_cr3;
        ept::hide_initial(page, pml4_pa, cpu, pages[0], percpu::PERCPU_SIZE as u64)?;
        st.handed = true;
        return Ok(());
    }
    if ept::hiding() {
        map_set(st, &pages, ::ept::Perms::NONE).map_err(|e| alloc::format!("cpu{cpu}: cannot hide its per-CPU block: {e}"))?;
        ept::name_block(cpu, pages[0]);
    }
    Ok(())
}

/// Frees `cpu`'s block once its CPU is not virtualized: while other CPUs still run on the
/// EPT map the block is first made guest-accessible again (RWX, as in the identity map),
/// since the kernel will reuse the pages. If that fails the block is kept (leaked, logged).
pub(super) fn release_block(st: &mut State, cpu: u32, pc: *mut PerCpu) -> Result<(), String> {
    ept::name_block(cpu, 0);
    if st.ept.is_some() && ept::hiding() && root_cpu(st).is_some() {
        if let Err(e) = map_set(st, &block_pages(pc), ::ept::Perms::RWX) {
            kwarn!("cpu{}: per-CPU block kept (not freed): cannot make it visible again: {}", cpu, e);
            return Err(alloc::format!("cpu{cpu}: cannot unhide its per-CPU block: {e}"));
        }
    }
    free_percpu(pc);
    Ok(())
}

pub(super) fn alloc_percpu(cpu: u32) -> Result<*mut PerCpu, String> {
    // SAFETY: allocation of zeroed, naturally aligned pages; process context.
    let p = unsafe { ffi::kdbt_glue_alloc_pages(PERCPU_ORDER) } as *mut PerCpu;
    if p.is_null() {
        return Err(String::from("out of memory for the per-CPU area"));
    }
    // SAFETY: one zeroed page, large enough for `Shared` (asserted in percpu), whose
    // all-zero bytes are a valid `Shared` (atomics).
    let shared = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *const percpu::Shared;
    if shared.is_null() {
        // SAFETY: `p` came from kdbt_glue_alloc_pages(PERCPU_ORDER) and is unused.
        unsafe { ffi::kdbt_glue_free_pages(p.cast(), PERCPU_ORDER) };
        return Err(String::from("out of memory for the per-CPU shared page"));
    }
    // SAFETY: `p` is a fresh, zeroed, exclusively owned 64 KB block; all-zero is a valid
    // PerCpu (integers, atomics, arrays, a None option is not all-zero so we write it).
    let pcr = unsafe { &mut *p };
    pcr.ctl.cpu = cpu;
    pcr.ctl.exits = vmx::exit::ExitCtx::new(cpu, vmx::hypercall::STATE_VIRTUALIZED);
    pcr.ctl.shared = shared;
    pcr.ctl.shadow = core::ptr::null_mut();
    // SAFETY: the glue translates a direct-map address.
    pcr.ctl.phys = unsafe { ffi::kdbt_glue_virt_to_phys(p as *const _) };
    pcr.init_tables(&entry::idt_stubs());
    Ok(p)
}

/// Builds the host PML4: the kernel half of the current page tables (shared by every
/// process and never freed), nothing in the user half. Process context.
pub(super) fn host_page_tables() -> Result<(*mut u64, u64), String> {
    // SAFETY: allocation of one zeroed page.
    let p = unsafe { ffi::kdbt_glue_alloc_pages(0) } as *mut u64;
    if p.is_null() {
        return Err(String::from("out of memory for the host page tables"));
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    // SAFETY: the glue returns the direct-map address of the current PML4's frame.
    let cur = unsafe { ffi::kdbt_glue_phys_to_virt(cr3 & 0x000f_ffff_ffff_f000) } as *const u64;
    for i in 256..512 {
        // SAFETY: both pages are 512 u64 entries; the kernel half is stable.
        unsafe { p.add(i).write(cur.add(i).read_volatile()) };
    }
    // SAFETY: translating our own direct-map page.
    let pa = unsafe { ffi::kdbt_glue_virt_to_phys(p as *const _) };
    Ok((p, pa))
}

pub(super) fn fake_missing() -> String {
    // SAFETY: the glue returns a NUL-terminated module parameter string (or null).
    let p = unsafe { ffi::kdbt_glue_param_fake_missing() };
    let mut s = String::new();
    if !p.is_null() {
        // SAFETY: NUL-terminated, alive while the module is loaded.
        let c = unsafe { core::ffi::CStr::from_ptr(p.cast()) };
        s.push_str(c.to_str().unwrap_or(""));
    }
    s
}

/// Preflight of one CPU from its raw capabilities (read on that CPU, including its CR4)
/// and the features its instructions need passed through (`native`, from its CPUID): its
/// controls, or every reason it can't be launched. Process context (allocates).
pub(super) fn preflight_cpu(raw: &RawCaps, native: Features, mask: Features, shadow: bool) -> Result<Controls, String> {
    let caps = VmxCaps::decode(raw);
    let req = Request { required: required(shadow) | native, mask };
    match preflight(&caps, raw.cr4, &req) {
        Ok(cleared) => choose_controls(&caps, cleared.available, shadow).map_err(|e| alloc::format!("{e}")),
        Err(refusals) => {
            let mut s = String::new();
            for (i, r) in refusals.iter().enumerate() {
                let _ = write!(s, "{}{r}", if i > 0 { "; " } else { "" });
            }
            Err(s)
        }
    }
}

/// Launches `cpu` (process context; the CPU must be online). On failure the block is freed.
pub(super) fn launch_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let pc = alloc_percpu(cpu)?;
    if st.controls.shadow {
        match shadow::ShadowCpu::alloc() {
            // SAFETY: the block is exclusively ours until the CPU is launched.
            Ok(sc) => unsafe { (*pc).ctl.shadow = sc },
            Err(e) => {
                free_percpu(pc);
                return Err(alloc::format!("cpu{cpu}: {e}"));
            }
        }
    }
    // Writable alias of this CPU's GDT, for devirtualize.
    // SAFETY: the glue returns per_cpu(gdt_page, cpu), a direct-map address.
    unsafe { (*pc).ctl.tables.gdt_rw = ffi::kdbt_glue_gdt_rw(cpu) };
    let controls = st.controls;
    {
        use vmx::hypercall::{STATE_EPT, STATE_VIRTUALIZED, STATE_VPID};
        let state = STATE_VIRTUALIZED
            | if controls.eptp != 0 { STATE_EPT } else { 0 }
            | if controls.vpid != 0 { STATE_VPID } else { 0 };
        // SAFETY: the block is exclusively ours until the CPU is launched.
        unsafe {
            (*pc).ctl.exits.state = state;
            (*pc).ctl.exits.vnmi = controls.vnmi;
            (*pc).ctl.flush = controls.flush;
        }
    }
    // SAFETY: the block is exclusively ours and not hidden yet.
    let shared = unsafe { (*pc).ctl.shared };
    // From here until it is freed the block is root mode's only (EPT: no guest rights).
    if let Err(e) = hide_block(st, cpu, pc) {
        let _ = release_block(st, cpu, pc);
        return Err(e);
    }
    let mut result: Result<(), launch::LaunchError> = Ok(());
    let pc_addr = pc as usize;
    // SAFETY: reads a module parameter.
    let fail = unsafe { ffi::kdbt_glue_param_fail_launch_cpu() } == cpu as i32;
    // SAFETY: reads module parameters.
    let corrupt = (unsafe { ffi::kdbt_glue_param_fail_vmwrite_cpu() } == cpu as i32)
        // SAFETY: as above.
        .then(|| unsafe { ffi::kdbt_glue_param_fail_vmwrite_field() });
    let rc = hw::run_on_cpu(cpu, || {
        // SAFETY: the block is exclusively ours until the CPU is launched.
        result = launch::launch(unsafe { &mut *(pc_addr as *mut PerCpu) }, &controls, fail, corrupt);
    });
    let err = match (rc, result) {
        (Ok(()), Ok(())) => None,
        (Err(e), _) => Some(alloc::format!("cpu{cpu}: cannot run on it (error {e})")),
        (_, Err(e)) => Some(alloc::format!("cpu{cpu}: {e}")),
    };
    if let Some(e) = err {
        let _ = release_block(st, cpu, pc);
        return Err(e);
    }
    let idx = cpu as usize;
    if st.cpus.len() <= idx {
        st.cpus.resize_with(idx + 1, || None);
    }
    st.cpus[idx] = Some(Cpu { pc, shared });
    Ok(())
}

/// Devirtualizes `cpu` through the hypercall, then frees its block.
pub(super) fn devirt_cpu(st: &mut State, cpu: u32) -> Result<(), String> {
    let Some(c) = st.cpus.get_mut(cpu as usize).and_then(|c| c.take()) else {
        return Ok(());
    };
    if !c.shared().virtualized.load(Ordering::Acquire) {
        // Devirtualized already, behind kdbt's back (the emergency callback of a reboot or
        // panic that did not end the kernel): a VMCALL now would be #UD.
        kwarn!("cpu{}: found devirtualized already (emergency path)", cpu);
        return release_block(st, cpu, c.pc);
    }
    let mut rax = 0u64;
    let pc_addr = c.pc as usize;
    let rc = hw::run_on_cpu(cpu, || {
        rax = hypercall(vmx::hypercall::Call::Devirtualize, 0);
        // An NMI that hit root mode during the devirtualize path (before the kernel's IDT
        // was back) was only recorded: deliver it now, natively.
        // SAFETY: our block, still allocated; only this CPU writes the flag.
        let pending = unsafe { &(*(pc_addr as *const PerCpu)).ctl.nmi_pending };
        if rax == vmx::hypercall::OK && pending.swap(0, Ordering::Relaxed) != 0 {
            // SAFETY: native again, kernel context with interrupts off on this CPU.
            unsafe { ffi::kdbt_glue_self_nmi() };
        }
    });
    let still = c.shared().virtualized.load(Ordering::Acquire);
    if rc.is_err() || rax != vmx::hypercall::OK || still {
        // Keep the block: freeing memory a virtualized CPU uses would be fatal.
        st.cpus[cpu as usize] = Some(c);
        return Err(alloc::format!("cpu{cpu}: devirtualize failed (rc {rc:?}, rax {rax:#x})"));
    }
    release_block(st, cpu, c.pc)
}

/// Launch on every online CPU; all or nothing. `flags`: `kdbt_abi::LOAD_*`.
pub fn load(flags: u32) -> Result<(), String> {
    if flags & !(kdbt_abi::LOAD_SHADOW_PAGING | kdbt_abi::LOAD_TEST_IGNORE_USER_INVLPG) != 0 {
        return Err(alloc::format!("unknown load flags {flags:#x} (CLI and module versions differ?)"));
    }
    let shadow = flags & kdbt_abi::LOAD_SHADOW_PAGING != 0;
    let ignore_user_invlpg = flags & kdbt_abi::LOAD_TEST_IGNORE_USER_INVLPG != 0;
    if ignore_user_invlpg && !shadow {
        return Err(String::from("the ignore-user-INVLPG test hook needs shadow paging"));
    }
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    if guard.is_some() {
        return Err(String::from("kdbt is already loaded"));
    }
    let mask = parse_mask(&fake_missing())?;
    // Preflight on every CPU before touching anything.
    let mut chosen: Option<Controls> = None;
    let mut errors = String::new();
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        // Only the reads run on the CPU (IPI context: no allocation, no sleeping).
        let mut raw = RawCaps::default();
        let mut native = Features::empty();
        let read = || {
            raw = RawCaps::read(&hw::KernelHw, cpu);
            native = vmx::preflight::native_needs(|l, s| {
                let r = core::arch::x86_64::__cpuid_count(l, s);
                [r.eax, r.ebx, r.ecx, r.edx]
            });
        };
        let r = match hw::run_on_cpu(cpu, read) {
            Ok(()) => preflight_cpu(&raw, native, mask, shadow),
            Err(e) => Err(alloc::format!("cannot run on it (error {e})")),
        };
        match r {
            Ok(c) if chosen.is_none_or(|x| x == c) => chosen = Some(c),
            Ok(_) => {
                let _ = write!(errors, "cpu{cpu}: VT-x capabilities differ from cpu0's; ");
            }
            Err(e) => {
                let _ = write!(errors, "cpu{cpu}: {e}; ");
            }
        }
    }
    if !errors.is_empty() {
        let msg = String::from(errors.trim_end_matches("; "));
        kwarn!("load refused: {}", msg);
        return Err(msg);
    }
    let Some(mut controls) = chosen else { return Err(String::from("no CPU online")) };
    controls.flush.ignore_user_invlpg = ignore_user_invlpg;
    if ignore_user_invlpg {
        kwarn!("test hook: the shadow MMU ignores INVLPG of user addresses");
    }
    let map = if shadow {
        kinfo!("shadow paging: {} shadow frames per CPU, no EPT", shadow::FRAMES_PER_CPU);
        None
    } else {
        let mut page = ept::build(controls.ept)?;
        let map = page.direct();
        controls.enable_ept(map.eptp(false));
        let stats = map.stats();
        kinfo!(
            "EPT identity map of {} GB: {} tables, {} x 1G + {} x 2M + {} x 4K pages; hypervisor memory {}",
            map.limit() >> 30,
            stats.tables,
            stats.pages_1g,
            stats.pages_2m,
            stats.pages_4k,
            if ept::hiding() { "hidden from the guest" } else { "NOT hidden (hide_hv=0)" }
        );
        Some(page)
    };
    let (pml4, pml4_pa) = match host_page_tables() {
        Ok(v) => v,
        Err(e) => {
            if let Some(map) = map {
                map.destroy();
            }
            return Err(e);
        }
    };
    controls.host_cr3 = pml4_pa;
    let mut st = State { controls, ept: map, handed: false, host_pml4: pml4, cpus: Vec::new() };
    for cpu in (0..hw::cpu_ids()).filter(|&c| hw::cpu_online(c)) {
        if let Err(e) = launch_cpu(&mut st, cpu) {
            // Roll back: nothing half-done survives.
            let mut rollback = String::new();
            for done in 0..st.cpus.len() as u32 {
                if let Err(e2) = devirt_cpu(&mut st, done) {
                    let _ = write!(rollback, "; rollback: {e2}");
                }
            }
            if rollback.is_empty() {
                free_host_tables(&mut st);
            } else {
                // A CPU is still virtualized and uses the EPT and host page tables: keep
                // them (and the state, so that `kdbt unload` can retry).
                *guard = Some(st);
            }
            kwarn!("load failed: {}{}", e, rollback);
            return Err(alloc::format!("{e}{rollback}"));
        }
    }
    kinfo!("virtualized {} CPUs", st.cpus.iter().flatten().count());
    *guard = Some(st);
    Ok(())
}

/// Frees what all CPUs shared (host page tables, EPT) once none is virtualized.
pub(super) fn free_host_tables(st: &mut State) {
    // SAFETY: the page came from kdbt_glue_alloc_pages(0) and no CPU uses it any more.
    unsafe { ffi::kdbt_glue_free_pages(st.host_pml4.cast(), 0) };
    if let Some(map) = st.ept.take() {
        map.destroy();
    }
    ept::forget_names();
}

/// Devirtualize every CPU and free everything.
pub fn unload() -> Result<(), String> {
    let _hp = hw::CpusReadGuard::lock();
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else {
        return Err(String::from("kdbt is not loaded"));
    };
    let mut errors = String::new();
    for cpu in 0..st.cpus.len() as u32 {
        if let Err(e) = devirt_cpu(st, cpu) {
            let _ = write!(errors, "{e}; ");
        }
    }
    if !errors.is_empty() {
        kwarn!("unload incomplete: {}", errors);
        return Err(errors);
    }
    free_host_tables(st);
    *guard = None;
    kinfo!("devirtualized all CPUs");
    Ok(())
}
