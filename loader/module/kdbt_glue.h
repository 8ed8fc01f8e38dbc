/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The interface between kdbt's C glue and its Rust staticlib: the only place it is declared.
 * The Rust side mirrors it in rust/src/ffi.rs; `cargo test -p xtask` checks that both
 * list the same functions with the same number of parameters.
 *
 * Direction "glue -> rust": entry points the Rust staticlib exports (kdbt_rs_*).
 * Direction "rust -> glue": services the glue offers to Rust (kdbt_glue_*). They are
 * thin wrappers over kernel APIs, so the Rust side never depends on kernel structure
 * layouts or on macros/inline functions that differ between kernel versions.
 */
#ifndef KDBT_GLUE_H
#define KDBT_GLUE_H

#include <linux/types.h>

/* glue -> rust */
int kdbt_rs_init(void);
/* Devirtualizes every CPU if loaded: 0, or -EBUSY if a CPU could not be (the glue then
 * panics: freeing the module under a virtualized CPU would crash later, unexplained). */
int kdbt_rs_exit(void);
long kdbt_rs_ioctl(unsigned int cmd, unsigned long arg);
/* CPU hotplug (on the CPU concerned, hotplug lock held): 0 or -errno. */
int kdbt_rs_cpu_online(unsigned int cpu);
int kdbt_rs_cpu_offline(unsigned int cpu);
/* Reboot/halt/power-off: devirtualize everything. */
void kdbt_rs_shutdown(void);
/* Before a suspend or hibernation (process context, every CPU online): unloads kdbt if
 * loaded. 1 if it was loaded (reload it afterwards), 0 if not, -errno if a CPU could not be
 * devirtualized (the suspend is refused). */
int kdbt_rs_pm_suspend(void);
/* After the suspend or hibernation (or its failure): loads kdbt again; 0 or -errno (the
 * reason is logged, kdbt stays unloaded). */
int kdbt_rs_pm_resume(void);
/* Emergency (any context, NMI included, interrupts off): if kdbt virtualizes this CPU,
 * devirtualize it, nothing else (no lock, no allocation, nothing freed). */
void kdbt_rs_emergency_devirtualize(void);
/* Whether this CPU took a fatal VM exit (any context, NMI included). */
bool kdbt_rs_fatal_pending(void);
/* Text of this CPU's fatal VM exit, for the panic message; returns its length. */
size_t kdbt_rs_fatal_message(char *buf, size_t len);

/* rust -> glue: logging. level: 0 err, 1 warn, 2 info, 3 debug. */
void kdbt_glue_log(int level, const char *msg, size_t len);
/* Ends the kernel on a Rust panic (a bug in kdbt; never reached on bad input). */
void kdbt_glue_panic(const char *msg, size_t len);

/* memory: kmalloc(GFP_KERNEL), may sleep, in process context; GFP_ATOMIC with interrupts
 * off (the kernel DBT's dispatcher). */
void *kdbt_glue_alloc(size_t size);
void kdbt_glue_free(void *ptr);
/* 2^order zeroed, physically contiguous pages; may sleep. */
void *kdbt_glue_alloc_pages(unsigned int order);
void kdbt_glue_free_pages(void *ptr, unsigned int order);
/* Physical address of a vmalloc/module-space address (0 if unmapped). */
u64 kdbt_glue_vmalloc_to_phys(const void *ptr);
u64 kdbt_glue_virt_to_phys(const void *ptr);
void *kdbt_glue_phys_to_virt(u64 phys);

/* user memory: return the number of bytes NOT copied (0 on success). */
unsigned long kdbt_glue_copy_to_user(u64 to, const void *from, unsigned long n);
unsigned long kdbt_glue_copy_from_user(void *to, u64 from, unsigned long n);

/* CPUs */
unsigned int kdbt_glue_nr_cpu_ids(void);
unsigned int kdbt_glue_num_online_cpus(void);
bool kdbt_glue_cpu_online(unsigned int cpu);
unsigned int kdbt_glue_this_cpu(void);
/* Runs fn(arg) on `cpu` with interrupts off and waits; 0 or -errno (offline CPU). */
int kdbt_glue_run_on_cpu(unsigned int cpu, void (*fn)(void *), void *arg);
/* Holds/releases the CPU hotplug lock around a per-CPU loop. */
void kdbt_glue_cpus_read_lock(void);
void kdbt_glue_cpus_read_unlock(void);

/* Writable (direct-map) alias of `cpu`'s GDT (the GDT the CPU uses is mapped read-only). */
u64 kdbt_glue_gdt_rw(unsigned int cpu);
/* The `fake_missing` module parameter: features to pretend are missing (testing). */
const char *kdbt_glue_param_fake_missing(void);
/* The `fail_launch_cpu` module parameter: the CPU whose launch fails on purpose after VMXON
 * (testing the rollback), or -1. */
int kdbt_glue_param_fail_launch_cpu(void);
/* The `hide_hv` module parameter: 1 (default) hides hypervisor memory from the guest's
 * EPT view; 0 (testing only) leaves it mapped. */
int kdbt_glue_param_hide_hv(void);
/* The `fail_vmwrite_cpu` and `fail_vmwrite_field` module parameters: on that CPU the
 * launch issues the VMWRITE of that VMCS field encoding with a reserved encoding bit set,
 * so the CPU fails it (testing the checked VMCS programming); -1 and 0: none. */
int kdbt_glue_param_fail_vmwrite_cpu(void);
unsigned int kdbt_glue_param_fail_vmwrite_field(void);
/* Sends an NMI to the current CPU (one that arrived while kdbt was devirtualizing it). */
void kdbt_glue_self_nmi(void);
/* NMI check: sends an NMI to `cpu`, whose handler (kdbt's, armed for the check) counts it
 * and sends itself a second one, held back until its IRET. Waits up to a second; returns
 * how many NMIs `cpu` received (2 when delivery works), or -errno. May sleep. */
int kdbt_glue_nmi_test(unsigned int cpu);

/* The kernel's emergency virtualization-disable callback: register kdbt's (on) or remove
 * it (off); idempotent, process context (removal waits for an RCU grace period). No-op
 * where the kernel does not export it. */
void kdbt_glue_emergency_arm(bool on);
/* Whether this kernel exports that callback (else only the panic notifier covers panics,
 * on the panicking CPU only). */
bool kdbt_glue_has_emergency_callback(void);

/* MSRs: 0 and *val on success, nonzero if the read faulted (#GP). */
int kdbt_glue_rdmsr_safe(u32 msr, u64 *val);

/* ---- the kernel DBT's environment (kdbt_dbt.c, kdbt_cache.S) ---- */
/* The code cache: an executable, read-only section of this module (in module space, so
 * within +-2 GB of kernel and module text). Its bounds. */
u64 kdbt_glue_cache_start(void);
u64 kdbt_glue_cache_size(void);
/* A writable alias (vmap of the section's pages) of the code cache, or 0; undone by
 * kdbt_glue_cache_unalias. Process context. */
u64 kdbt_glue_cache_alias(void);
void kdbt_glue_cache_unalias(u64 alias);
/* The dispatcher's memory pool: `size` bytes of vmalloc memory, or NULL (process
 * context); freed by kdbt_glue_pool_free. */
void *kdbt_glue_pool_alloc(size_t size);
void kdbt_glue_pool_free(void *p);
/* This module's core text (the native region the kernel DBT never translates). */
void kdbt_glue_module_text(u64 *base, u64 *size);
/* Kernel memory read that cannot fault (copy_from_kernel_nofault): bytes read from `src`
 * (stops at the first unreadable page). */
size_t kdbt_glue_read_kernel(void *dst, u64 src, size_t n);
/* The DBT's static per-CPU area: its per-CPU pointer (what `%gs`-relative code adds to
 * the per-CPU base) and, in *size, its size. */
u64 kdbt_glue_percpu_block(size_t *size);
/* One CPU's copy of a per-CPU pointer. */
u64 kdbt_glue_per_cpu_ptr(u64 pcp, unsigned int cpu);
/* Interrupts off on this CPU (returns the flags to restore) / restored. */
unsigned long kdbt_glue_irq_save(void);
void kdbt_glue_irq_restore(unsigned long flags);
/* Whether the kernel is built with CET indirect branch tracking (every indirect-branch
 * target starts with endbr64). */
bool kdbt_glue_kernel_ibt(void);
/* The kernel's retpoline thunk for register number `reg` (x86 encoding order 0..15), or
 * 0 where the kernel has none; the return thunk likewise. */
u64 kdbt_glue_indirect_thunk(unsigned int reg);
u64 kdbt_glue_return_thunk(void);
u64 kdbt_glue_kernel_function(void);
u64 kdbt_glue_kernel_text_to_phys(u64 va);
/* Self-test of the kernel DBT: the kernel function number `which` (0..) of the test
 * table, called at code-cache address `entry` (its translation) or natively (entry 0),
 * on the caller's stack; its result. `kdbt_glue_dbt_case_name` names it, 0-terminated,
 * or returns NULL past the end of the table. */
u64 kdbt_glue_dbt_case_run(unsigned int which, u64 entry);
const char *kdbt_glue_dbt_case_name(unsigned int which);
/* The native kernel address case `which` calls (what the DBT translates). */
u64 kdbt_glue_dbt_case_fn(unsigned int which);
/* The loaded module called `name` (0-terminated), live, with a reference taken (so it
 * cannot be unloaded until kdbt_glue_module_put), and in *base and *size its core text; NULL
 * if there is none (or it is this module). Process context. */
void *kdbt_glue_module_get(const char *name, u64 *base, u64 *size);
void kdbt_glue_module_put(void *module);
/* The exception table of `module` (one from kdbt_glue_module_get; NULL: this module's own):
 * its first entry (12 bytes each: relative insn and fixup, then the type and data word),
 * and in *count how many. Sorted by address since the module's load. */
u64 kdbt_glue_module_extable(void *module, u32 *count);
/* A writable alias (vmap) of the page holding kernel address `addr` (e.g. the IDT, which
 * the kernel maps read-only), or 0; undone by kdbt_glue_cache_unalias. Process context. */
u64 kdbt_glue_page_alias(u64 addr);
/* Waits until no task can still be inside code it was running before: a context switch on
 * every CPU where kernel code is not preemptible, RCU Tasks under full preemption.
 * Process context; takes the CPU hotplug lock. */
void kdbt_glue_sync_tasks(void);
/* The re-protection of written text (kernel_dbt/wprotect.rs): kick queues its work item
 * through an irq_work (any context, also the #VE handler's); flush waits until neither is
 * queued or running (process context). The work calls kdbt_rs_dbt_reprotect. */
void kdbt_glue_wp_kick(void);
void kdbt_glue_wp_flush(void);
void kdbt_rs_dbt_reprotect(void);
/* Whether kernel code is preemptible (full preemption or RT; with PREEMPT_DYNAMIC a call
 * into the kernel: process context only, never from the dispatcher). */
bool kdbt_glue_preempt_full(void);
/* Task context: no hard interrupt, NMI or softirq handler runs on this CPU (inline reads
 * of the preemption count only, so the dispatcher may call it). */
bool kdbt_glue_in_task(void);
/* A quiescent point on every online CPU: a work item on each (task context, between other
 * tasks, where kernel code is not preemptible: nothing translated is below it), which
 * calls kdbt_rs_dbt_quiesce_here; waits for them. Nothing under full preemption. Process
 * context; takes no lock (a CPU going offline meanwhile runs its item elsewhere). */
void kdbt_glue_dbt_quiesce_cpus(void);
void kdbt_rs_dbt_quiesce_here(void);
/* The reclaim tick: a delayed work that calls kdbt_rs_dbt_reclaim_tick and runs again
 * after as many milliseconds as it returns (0: no more); on starts it (first in 1 s), off
 * cancels it and waits for one running (process context). */
void kdbt_glue_reclaim_tick(bool on);
unsigned int kdbt_rs_dbt_reclaim_tick(void);
/* A die notifier while started: on an oops in kernel mode it gives the registers (rax,
 * rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15, rip, rflags) to kdbt_rs_dbt_oops_regs, and
 * if that rewrote them (1: rip was in translated code) prints the native state and its
 * call trace after the kernel's report (which the kernel prints before the notifiers
 * run) and puts it into the oops' pt_regs. Process context (off waits for a notifier
 * running elsewhere). */
void kdbt_glue_oops_notifier(bool on);
int kdbt_rs_dbt_oops_regs(u64 *regs);

#endif
