// SPDX-License-Identifier: GPL-2.0-only
/*
 * kdbt kernel module: the glue services of the kernel DBT's environment (the code cache
 * and its writable alias, per-CPU blocks, kernel reads, retpoline thunks) and the table
 * of kernel functions its self-test runs from the code cache. Declared in kdbt_glue.h.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
#include <linux/percpu.h>
#include <linux/uaccess.h>
#include <linux/string.h>
#include <linux/bitmap.h>
#include <linux/timekeeping.h>
#include <linux/spinlock.h>
#include <linux/sched.h>
#include <linux/version.h>
#include <linux/sched.h>
#include <linux/rculist.h>
#include <linux/rcupdate.h>
#include <linux/workqueue.h>
#include <linux/cpu.h>
#include <linux/preempt.h>
#include <linux/irq_work.h>
#include <linux/mutex.h>
#include <linux/kdebug.h>
#include <linux/notifier.h>
#include <asm/unwind.h>
#include <asm/pgtable.h>
#if IS_ENABLED(CONFIG_CRC32)
#include <linux/crc32.h>
#endif
#if IS_ENABLED(CONFIG_CRYPTO_LIB_SHA256)
#include <crypto/sha2.h>
#endif
#include <asm/nospec-branch.h>

#include "kdbt_glue.h"

/* kdbt_cache.S */
extern const char kdbt_cache_start[];
extern const u64 kdbt_cache_bytes;

u64 kdbt_glue_cache_start(void)
{
	return (u64)(uintptr_t)kdbt_cache_start;
}

u64 kdbt_glue_cache_size(void)
{
	return kdbt_cache_bytes;
}

u64 kdbt_glue_cache_alias(void)
{
	unsigned long n = kdbt_cache_bytes >> PAGE_SHIFT, i;
	struct page **pages;
	void *alias;

	if (!PAGE_ALIGNED(kdbt_cache_start) || n == 0)
		return 0;
	pages = kvmalloc_array(n, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return 0;
	for (i = 0; i < n; i++) {
		pages[i] = vmalloc_to_page(kdbt_cache_start + (i << PAGE_SHIFT));
		if (!pages[i]) {
			kvfree(pages);
			return 0;
		}
	}
	alias = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	kvfree(pages);
	return (u64)(uintptr_t)alias;
}

void kdbt_glue_cache_unalias(u64 alias)
{
	if (alias)
		vunmap((void *)(uintptr_t)alias);
}

void *kdbt_glue_pool_alloc(size_t size)
{
	return vmalloc(size);
}

void kdbt_glue_pool_free(void *p)
{
	vfree(p);
}

static void kdbt_mod_text(struct module *m, u64 *base, u64 *size)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	*base = (u64)(uintptr_t)m->mem[MOD_TEXT].base;
	*size = m->mem[MOD_TEXT].size;
#else
	*base = (u64)(uintptr_t)m->core_layout.base;
	*size = m->core_layout.text_size;
#endif
}

void kdbt_glue_module_text(u64 *base, u64 *size)
{
	kdbt_mod_text(THIS_MODULE, base, size);
}

/*
 * The module list has no exported lookup (find_module is not exported): walk it from this
 * module's own entry, as the kernel does, under RCU. Its head (`modules`, in the kernel's
 * data) is the one entry whose container is not in module space (MODULES_VADDR..END;
 * is_vmalloc_or_module_addr is not exported on 6.1).
 */
void *kdbt_glue_module_get(const char *name, u64 *base, u64 *size)
{
	struct list_head *pos;
	struct module *found = NULL;

	rcu_read_lock();
	for (pos = rcu_dereference(list_next_rcu(&THIS_MODULE->list)); pos != &THIS_MODULE->list;
	     pos = rcu_dereference(list_next_rcu(pos))) {
		struct module *m = list_entry(pos, struct module, list);

		if ((unsigned long)m < MODULES_VADDR || (unsigned long)m >= MODULES_END)
			continue;
		if (m->state == MODULE_STATE_LIVE && strcmp(m->name, name) == 0 && try_module_get(m)) {
			found = m;
			break;
		}
	}
	rcu_read_unlock();
	if (found)
		kdbt_mod_text(found, base, size);
	return found;
}

void kdbt_glue_module_put(void *module)
{
	if (module)
		module_put(module);
}

/*
 * Exception tables (struct exception_table_entry: insn, fixup and data, the first two
 * relative to their own fields), sorted by address since the module was loaded.
 */
u64 kdbt_glue_module_extable(void *module, u32 *count)
{
	struct module *m = module ? module : THIS_MODULE;

	*count = m->num_exentries;
	return (u64)(uintptr_t)m->extable;
}

u64 kdbt_glue_page_alias(u64 addr)
{
	unsigned int level;
	pte_t *pte = lookup_address(addr, &level);
	unsigned long pfn;
	struct page *page;
	void *alias;

	if (!pte || !pte_present(*pte))
		return 0;
	pfn = pte_pfn(*pte);
	if (level == PG_LEVEL_2M)
		pfn += (addr & ~PMD_MASK) >> PAGE_SHIFT;
	else if (level == PG_LEVEL_1G)
		pfn += (addr & ~PUD_MASK) >> PAGE_SHIFT;
	else if (level != PG_LEVEL_4K)
		return 0;
	if (!pfn_valid(pfn))
		return 0;
	page = pfn_to_page(pfn);
	alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	return (u64)(uintptr_t)alias;
}

static bool kdbt_preempt_full(void)
{
	return IS_ENABLED(CONFIG_PREEMPT_RT) || preempt_model_full();
}

static void kdbt_nop_work(struct work_struct *w)
{
}

static DEFINE_PER_CPU(struct work_struct, kdbt_sync_work);

/*
 * Where kernel code cannot be preempted (PREEMPT_NONE or VOLUNTARY, also the dynamic
 * modes of those), a task leaves the CPU only by calling schedule() and friends, which
 * translated code reaches through native calls (its resume point is then native): a
 * context switch on every CPU is enough, and a work item on each CPU forces one. With
 * full preemption a task may sleep preempted inside translated code: RCU Tasks waits for
 * every task's voluntary switch (slow, but only then).
 */
void kdbt_glue_sync_tasks(void)
{
	unsigned int cpu;

	if (kdbt_preempt_full()) {
		synchronize_rcu_tasks();
		return;
	}
	cpus_read_lock();
	for_each_online_cpu(cpu) {
		struct work_struct *w = per_cpu_ptr(&kdbt_sync_work, cpu);

		INIT_WORK(w, kdbt_nop_work);
		queue_work_on(cpu, system_wq, w);
	}
	for_each_online_cpu(cpu)
		flush_work(per_cpu_ptr(&kdbt_sync_work, cpu));
	cpus_read_unlock();
}

static void kdbt_wp_work_fn(struct work_struct *w)
{
	kdbt_rs_dbt_reprotect();
}
static DECLARE_WORK(kdbt_wp_work, kdbt_wp_work_fn);

static void kdbt_wp_irq_work_fn(struct irq_work *w)
{
	queue_work(system_wq, &kdbt_wp_work);
}
static DEFINE_IRQ_WORK(kdbt_wp_irq_work, kdbt_wp_irq_work_fn);

void kdbt_glue_wp_kick(void)
{
	irq_work_queue(&kdbt_wp_irq_work);
}

void kdbt_glue_wp_flush(void)
{
	irq_work_sync(&kdbt_wp_irq_work);
	flush_work(&kdbt_wp_work);
}

bool kdbt_glue_preempt_full(void)
{
	return kdbt_preempt_full();
}

bool kdbt_glue_in_task(void)
{
	return in_task();
}

static void kdbt_quiesce_work_fn(struct work_struct *w)
{
	kdbt_rs_dbt_quiesce_here();
}

static DEFINE_PER_CPU(struct work_struct, kdbt_quiesce_work);
static DEFINE_MUTEX(kdbt_quiesce_lock);

void kdbt_glue_dbt_quiesce_cpus(void)
{
	static struct cpumask queued;
	unsigned int cpu;

	if (kdbt_preempt_full())
		return;
	mutex_lock(&kdbt_quiesce_lock);
	cpumask_copy(&queued, cpu_online_mask);
	for_each_cpu(cpu, &queued) {
		struct work_struct *w = per_cpu_ptr(&kdbt_quiesce_work, cpu);

		INIT_WORK(w, kdbt_quiesce_work_fn);
		queue_work_on(cpu, system_wq, w);
	}
	for_each_cpu(cpu, &queued)
		flush_work(per_cpu_ptr(&kdbt_quiesce_work, cpu));
	mutex_unlock(&kdbt_quiesce_lock);
}

static void kdbt_reclaim_tick_fn(struct work_struct *w);
static DECLARE_DELAYED_WORK(kdbt_reclaim_tick_work, kdbt_reclaim_tick_fn);

static void kdbt_reclaim_tick_fn(struct work_struct *w)
{
	unsigned int ms = kdbt_rs_dbt_reclaim_tick();

	if (ms)
		schedule_delayed_work(&kdbt_reclaim_tick_work, msecs_to_jiffies(ms));
}

void kdbt_glue_reclaim_tick(bool on)
{
	if (on)
		schedule_delayed_work(&kdbt_reclaim_tick_work, msecs_to_jiffies(1000));
	else
		cancel_delayed_work_sync(&kdbt_reclaim_tick_work);
}

/*
 * The native state of an oops in translated code, after the kernel's report: since the
 * kernel prints the registers and the trace before it calls the die notifiers, their RIP
 * is the code cache's (kdbt_cache_start+...); these lines give the native rip, registers
 * and the trace unwound from them.
 */
static void kdbt_oops_native_report(unsigned long cache_pc, struct pt_regs *n)
{
	struct unwind_state st;
	unsigned long a;
	int i = 0;

	pr_emerg("the oops above is in translated code, at code-cache address %px; the native state there:\n",
		 (void *)cache_pc);
	pr_emerg("RIP: %04x:%pS\n", (unsigned int)n->cs, (void *)n->ip);
	pr_emerg("RSP: %016lx EFLAGS: %08lx\n", n->sp, n->flags);
	pr_emerg("RAX: %016lx RBX: %016lx RCX: %016lx\n", n->ax, n->bx, n->cx);
	pr_emerg("RDX: %016lx RSI: %016lx RDI: %016lx\n", n->dx, n->si, n->di);
	pr_emerg("RBP: %016lx R08: %016lx R09: %016lx\n", n->bp, n->r8, n->r9);
	pr_emerg("R10: %016lx R11: %016lx R12: %016lx\n", n->r10, n->r11, n->r12);
	pr_emerg("R13: %016lx R14: %016lx R15: %016lx\n", n->r13, n->r14, n->r15);
	pr_emerg("native call trace:\n");
	for (unwind_start(&st, current, n, NULL); !unwind_done(&st) && i < 32; unwind_next_frame(&st), i++) {
		a = unwind_get_return_address(&st);
		if (!a)
			break;
		if (i == 0)
			pr_emerg(" %pS\n", (void *)a);
		else
			pr_emerg(" %pB\n", (void *)a);
	}
	pr_emerg("end of the native state\n");
}

/*
 * DIE_OOPS (interrupts off, before the oops ends the task or panics): if rip is in
 * translated code, report the native state and put it into the oops' registers, which
 * later readers (kdump's crash_kexec, debuggers) take.
 */
static int kdbt_die_cb(struct notifier_block *nb, unsigned long val, void *data)
{
	struct die_args *a = data;
	struct pt_regs *r = a ? a->regs : NULL;
	struct pt_regs n;
	u64 g[18];
	int m;

	if (val != DIE_OOPS || !r || user_mode(r))
		return NOTIFY_DONE;
	g[0] = r->ax; g[1] = r->cx; g[2] = r->dx; g[3] = r->bx;
	g[4] = r->sp; g[5] = r->bp; g[6] = r->si; g[7] = r->di;
	g[8] = r->r8; g[9] = r->r9; g[10] = r->r10; g[11] = r->r11;
	g[12] = r->r12; g[13] = r->r13; g[14] = r->r14; g[15] = r->r15;
	g[16] = r->ip; g[17] = r->flags;
	m = kdbt_rs_dbt_oops_regs(g);
	if (m < 0)
		return NOTIFY_DONE;
	if (m == 0) {
		pr_emerg("the oops above is at code-cache address %px, which no live translation covers\n",
			 (void *)r->ip);
		return NOTIFY_DONE;
	}
	n = *r;
	n.ax = g[0]; n.cx = g[1]; n.dx = g[2]; n.bx = g[3];
	n.sp = g[4]; n.bp = g[5]; n.si = g[6]; n.di = g[7];
	n.r8 = g[8]; n.r9 = g[9]; n.r10 = g[10]; n.r11 = g[11];
	n.r12 = g[12]; n.r13 = g[13]; n.r14 = g[14]; n.r15 = g[15];
	n.ip = g[16]; n.flags = g[17];
	kdbt_oops_native_report(r->ip, &n);
	*r = n;
	return NOTIFY_DONE;
}

static struct notifier_block kdbt_die_nb = { .notifier_call = kdbt_die_cb };

void kdbt_glue_oops_notifier(bool on)
{
	if (on)
		register_die_notifier(&kdbt_die_nb);
	else
		unregister_die_notifier(&kdbt_die_nb);
}

size_t kdbt_glue_read_kernel(void *dst, u64 src, size_t n)
{
	size_t done = 0;

	while (done < n) {
		size_t chunk = min_t(size_t, n - done, PAGE_SIZE - offset_in_page(src + done));

		if (copy_from_kernel_nofault((char *)dst + done, (const void *)(uintptr_t)(src + done), chunk))
			break;
		done += chunk;
	}
	return done;
}

/*
 * The DBT's per-CPU area (the engine's block and the client counters, 4 KB). Static, so
 * that it lies in the first per-CPU chunk's module reserve, whose offsets from the %gs
 * base are small; an alloc_percpu area may come from a later chunk in the vmalloc area,
 * out of a disp32's reach (seen on Debian 6.1).
 */
struct kdbt_pcpu_area {
	u8 bytes[4096];
} __aligned(64);
static DEFINE_PER_CPU_ALIGNED(struct kdbt_pcpu_area, kdbt_pcpu_area);

u64 kdbt_glue_percpu_block(size_t *size)
{
	*size = sizeof(struct kdbt_pcpu_area);
	return (u64)(uintptr_t)&kdbt_pcpu_area;
}

u64 kdbt_glue_per_cpu_ptr(u64 pcp, unsigned int cpu)
{
	if (cpu >= nr_cpu_ids)
		return 0;
	return (u64)(uintptr_t)per_cpu_ptr((void __percpu *)(uintptr_t)pcp, cpu);
}

unsigned long kdbt_glue_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}

void kdbt_glue_irq_restore(unsigned long flags)
{
	local_irq_restore(flags);
}

bool kdbt_glue_kernel_ibt(void)
{
	return IS_ENABLED(CONFIG_X86_KERNEL_IBT);
}

#if defined(CONFIG_MITIGATION_RETPOLINE) || defined(CONFIG_RETPOLINE)
/* The thunks the kernel exports (<asm/nospec-branch.h>), by register number; rsp has none. */
u64 kdbt_glue_indirect_thunk(unsigned int reg)
{
	static const void *thunks[16] = {
		__x86_indirect_thunk_rax, __x86_indirect_thunk_rcx, __x86_indirect_thunk_rdx,
		__x86_indirect_thunk_rbx, NULL, __x86_indirect_thunk_rbp,
		__x86_indirect_thunk_rsi, __x86_indirect_thunk_rdi, __x86_indirect_thunk_r8,
		__x86_indirect_thunk_r9, __x86_indirect_thunk_r10, __x86_indirect_thunk_r11,
		__x86_indirect_thunk_r12, __x86_indirect_thunk_r13, __x86_indirect_thunk_r14,
		__x86_indirect_thunk_r15,
	};

	return reg < 16 ? (u64)(uintptr_t)thunks[reg] : 0;
}
#else
u64 kdbt_glue_indirect_thunk(unsigned int reg)
{
	return 0;
}
#endif

/* An exported function of the kernel's text: `kdbt start --kernel` checks the text range
 * user space read from /proc/kallsyms against it. */
u64 kdbt_glue_kernel_function(void)
{
	return (u64)(uintptr_t)schedule;
}

/* The physical address of a page of the kernel's image (its text), __pa_symbol's. */
u64 kdbt_glue_kernel_text_to_phys(u64 va)
{
	if (va < __START_KERNEL_map)
		return 0;
	return __pa_symbol(va);
}

u64 kdbt_glue_return_thunk(void)
{
#if defined(CONFIG_MITIGATION_RETHUNK) || defined(CONFIG_RETHUNK)
	return (u64)(uintptr_t)__x86_return_thunk;
#else
	return 0;
#endif
}

/* ---- the self-test's kernel functions ---- */

/* FNV-1a over a buffer: the digest of a case's output (computed natively, after the
 * call, the same way for both runs). */
static u64 kdbt_fnv(u64 h, const void *p, size_t n)
{
	const unsigned char *b = p;

	while (n--)
		h = (h ^ *b++) * 0x100000001b3ULL;
	return h;
}

#define FNV0 0xcbf29ce484222325ULL

static const char kdbt_text[] =
	"kdbt runs the kernel from a code cache: every block is copied, instrumented and linked;"
	" the dispatcher runs in the kernel's own context, with interrupts off.";

typedef u64 (*kdbt_case_fn)(u64 entry);

/*
 * The kernel's own definitions, by symbol name: <linux/string.h> may make strlen and
 * memcmp fortified inline functions (CONFIG_FORTIFY_SOURCE) whose address would be a copy
 * in this module, and ktime_get_ns is an inline wrapper.
 */
extern size_t kdbt_k_strlen(const char *) __asm__("strlen");
extern int kdbt_k_memcmp(const void *, const void *, size_t) __asm__("memcmp");
extern int kdbt_k_snprintf(char *, size_t, const char *, ...) __asm__("snprintf");
extern int kdbt_k_kstrtoull(const char *, unsigned int, unsigned long long *) __asm__("kstrtoull");
extern int kdbt_k_bitmap_parselist(const char *, unsigned long *, int) __asm__("bitmap_parselist");
extern s64 kdbt_k_ktime_get(void) __asm__("ktime_get");
extern unsigned long kdbt_k_spin_lock_irqsave(raw_spinlock_t *) __asm__("_raw_spin_lock_irqsave");
#if IS_ENABLED(CONFIG_CRC32)
extern u32 kdbt_k_crc32_le(u32, unsigned char const *, size_t) __asm__("crc32_le");
#endif
#if IS_ENABLED(CONFIG_CRYPTO_LIB_SHA256)
extern void kdbt_k_sha256(const u8 *, unsigned int, u8 *) __asm__("sha256");
#endif

static u64 case_strlen(u64 entry)
{
	size_t (*f)(const char *) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_strlen;

	return f(kdbt_text);
}

static u64 case_memcmp(u64 entry)
{
	int (*f)(const void *, const void *, size_t) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_memcmp;
	static char a[300], b[300];
	int r1, r2;

	memset(a, 'k', sizeof(a));
	memset(b, 'k', sizeof(b));
	b[211] = 'l';
	r1 = f(a, b, sizeof(a));
	r2 = f(a, b, 200);
	return ((u64)(r1 < 0 ? 1 : r1 > 0 ? 2 : 0) << 4) | (r2 < 0 ? 1 : r2 > 0 ? 2 : 0);
}

static u64 case_snprintf(u64 entry)
{
	int (*f)(char *, size_t, const char *, ...) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_snprintf;
	char buf[192];
	int n;

	memset(buf, 0, sizeof(buf));
	n = f(buf, sizeof(buf), "%d|%x|%-8s|%llu|%08lx|%pS|%*d|%c%%", -12345, 0xdbdbU, "kdbt",
	      18446744073709551615ULL, 0xabcUL, (void *)schedule, 6, 42, 'z');
	return kdbt_fnv(FNV0 ^ (u64)n, buf, sizeof(buf));
}

static u64 case_kstrtoull(u64 entry)
{
	int (*f)(const char *, unsigned int, unsigned long long *) =
		entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_kstrtoull;
	unsigned long long v1 = 0, v2 = 0, v3 = 0;
	int r1, r2, r3;

	r1 = f("18446744073709551615", 10, &v1);
	r2 = f("0x7fffDEADbeef", 0, &v2);
	r3 = f("18446744073709551616", 10, &v3); /* overflow: -ERANGE */
	return kdbt_fnv(kdbt_fnv(FNV0, &v1, 8) ^ (u64)(r1 + 7 * r2 + 49 * r3), &v2, 8) ^ v3;
}

static u64 case_bitmap_parselist(u64 entry)
{
	int (*f)(const char *, unsigned long *, int) =
		entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_bitmap_parselist;
	DECLARE_BITMAP(bits, 128);
	int r;

	bitmap_zero(bits, 128);
	r = f("0-3,8,16-31:2/4,64,100-127", bits, 128);
	return kdbt_fnv(FNV0 ^ (u64)r, bits, sizeof(bits));
}

static u64 case_ktime(u64 entry)
{
	s64 (*f)(void) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_ktime_get;

	return (u64)f();
}

static DEFINE_SPINLOCK(kdbt_case_lock);

static u64 case_spin_lock_irqsave(u64 entry)
{
	unsigned long (*f)(raw_spinlock_t *) =
		entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_spin_lock_irqsave;
	unsigned long flags = f(&kdbt_case_lock.rlock);
	bool off = irqs_disabled();

	_raw_spin_unlock_irqrestore(&kdbt_case_lock.rlock, flags);
	/* The flags it saved (IF set: the caller runs with interrupts on) and that it left
	 * interrupts off. */
	return ((flags >> 9) & 1) | ((u64)off << 1);
}

#if IS_ENABLED(CONFIG_CRC32)
static u64 case_crc32(u64 entry)
{
	u32 (*f)(u32, unsigned char const *, size_t) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_crc32_le;

	return f(~0U, (const unsigned char *)kdbt_text, sizeof(kdbt_text) - 1);
}
#endif

#if IS_ENABLED(CONFIG_CRYPTO_LIB_SHA256)
static u64 case_sha256(u64 entry)
{
	void (*f)(const u8 *, unsigned int, u8 *) = entry ? (void *)(uintptr_t)entry : (void *)kdbt_k_sha256;
	u8 out[SHA256_DIGEST_SIZE];

	f((const u8 *)kdbt_text, sizeof(kdbt_text) - 1, out);
	return kdbt_fnv(FNV0, out, sizeof(out));
}
#endif

static const struct {
	const char *name;
	kdbt_case_fn run;
	const void *fn;
} kdbt_cases[] = {
	{ "strlen", case_strlen, kdbt_k_strlen },
	{ "memcmp", case_memcmp, kdbt_k_memcmp },
	{ "snprintf", case_snprintf, kdbt_k_snprintf },
	{ "kstrtoull", case_kstrtoull, kdbt_k_kstrtoull },
	{ "bitmap_parselist", case_bitmap_parselist, kdbt_k_bitmap_parselist },
	/* Its result is a time: the self-test checks it lies between two native reads. */
	{ "ktime_get", case_ktime, kdbt_k_ktime_get },
	{ "_raw_spin_lock_irqsave", case_spin_lock_irqsave, kdbt_k_spin_lock_irqsave },
#if IS_ENABLED(CONFIG_CRC32)
	{ "crc32_le", case_crc32, kdbt_k_crc32_le },
#endif
#if IS_ENABLED(CONFIG_CRYPTO_LIB_SHA256)
	{ "sha256", case_sha256, kdbt_k_sha256 },
#endif
};

u64 kdbt_glue_dbt_case_run(unsigned int which, u64 entry)
{
	if (which >= ARRAY_SIZE(kdbt_cases))
		return 0;
	return kdbt_cases[which].run(entry);
}

const char *kdbt_glue_dbt_case_name(unsigned int which)
{
	return which < ARRAY_SIZE(kdbt_cases) ? kdbt_cases[which].name : NULL;
}

u64 kdbt_glue_dbt_case_fn(unsigned int which)
{
	return which < ARRAY_SIZE(kdbt_cases) ? (u64)(uintptr_t)kdbt_cases[which].fn : 0;
}
