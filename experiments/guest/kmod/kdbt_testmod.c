// SPDX-License-Identifier: GPL-2.0-only
/*
 * kdbt_testmod: a module for the kernel DBT's tests (`kdbt start --module kdbt_testmod`).
 *
 * Reading /proc/kdbt_testmod runs the module's code in the reader's context: loops and
 * branches, the kernel's sort() calling back into the module, string and formatting
 * calls out to the kernel; it prints the results, which must be the same natively and
 * translated. A pinned timer on every online CPU runs some of the code (no callbacks:
 * in Bochs each #VE costs milliseconds of wall time) in softirq context once a second and
 * counts the results that differ from the one computed natively at load ("mismatches",
 * printed too, must stay 0).
 *
 * /proc/kdbt_testmod_key reads "on" or "off" as a static key (jump label) in the module's
 * code says; writing 1 or 0 to it patches that code (text_poke), which the kernel DBT must
 * notice while started: the next read must follow the new bytes, not an old translation.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/sort.h>
#include <linux/timer.h>
#include <linux/string.h>
#include <linux/percpu.h>
#include <linux/cpumask.h>
#include <linux/atomic.h>
#include <linux/jiffies.h>
#include <linux/jump_label.h>
#include <linux/uaccess.h>
#include <linux/kthread.h>
#include <linux/sched/task.h>

#define TM_N 24

static noinline u64 tm_mix(u64 x, unsigned int rounds)
{
	unsigned int i;

	for (i = 0; i < rounds; i++) {
		x = x * 0x9e3779b97f4a7c15ULL + i;
		if (x & 1)
			x ^= x >> 29;
		else
			x = (x << 7) | (x >> 57);
		switch (x % 5) {
		case 0:
			x += 0x1234;
			break;
		case 1:
			x ^= 0xabcdef;
			break;
		case 3:
			x = ~x;
			break;
		default:
			x -= i;
		}
	}
	return x;
}

static int tm_cmp(const void *a, const void *b)
{
	u32 x = *(const u32 *)a, y = *(const u32 *)b;

	return x < y ? -1 : x > y;
}

static u64 tm_fnv(u64 h, const void *p, size_t n)
{
	const unsigned char *b = p;

	while (n--)
		h = (h ^ *b++) * 0x100000001b3ULL;
	return h;
}

static noinline u64 tm_work(unsigned int seed)
{
	u32 v[TM_N];
	char buf[96];
	unsigned int i;
	u32 r = seed * 2654435761U + 1;
	u64 h = 0xcbf29ce484222325ULL;
	int n;

	for (i = 0; i < TM_N; i++) {
		r = r * 1103515245U + 12345U;
		v[i] = r >> 3;
	}
	sort(v, TM_N, sizeof(v[0]), tm_cmp, NULL);
	h = tm_fnv(h, v, sizeof(v));
	h ^= tm_mix(h ^ seed, 50 + seed % 7);
	n = snprintf(buf, sizeof(buf), "kdbt %u %08x %s %llx", seed, v[TM_N / 2], "testmod", h);
	h = tm_fnv(h ^ (u64)n ^ strlen(buf), buf, n);
	return h;
}

static u64 tm_expected;
static atomic_t tm_mismatches = ATOMIC_INIT(0);
static atomic_t tm_ticks = ATOMIC_INIT(0);
static DEFINE_PER_CPU(struct timer_list, tm_timer);
static bool tm_stopping;

static void tm_tick(struct timer_list *t)
{
	if (tm_mix(7, 64) != tm_expected)
		atomic_inc(&tm_mismatches);
	atomic_inc(&tm_ticks);
	if (!READ_ONCE(tm_stopping))
		mod_timer(t, jiffies + HZ);
}

static int tm_show(struct seq_file *m, void *v)
{
	unsigned int i;

	for (i = 0; i < 8; i++)
		seq_printf(m, "work%u %016llx\n", i, tm_work(i + 1));
	seq_printf(m, "timer_mismatches %d\n", atomic_read(&tm_mismatches));
	return 0;
}

static DEFINE_STATIC_KEY_FALSE(tm_key);

static noinline const char *tm_keyed(void)
{
	if (static_branch_unlikely(&tm_key))
		return "on";
	return "off";
}

static int tm_key_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", tm_keyed());
	return 0;
}

static int tm_key_open(struct inode *inode, struct file *file)
{
	return single_open(file, tm_key_show, NULL);
}

static ssize_t tm_key_write(struct file *file, const char __user *buf, size_t n, loff_t *pos)
{
	char c;

	if (n == 0 || get_user(c, buf))
		return -EFAULT;
	if (c == '1')
		static_branch_enable(&tm_key);
	else if (c == '0')
		static_branch_disable(&tm_key);
	else
		return -EINVAL;
	return n;
}

static const struct proc_ops tm_key_ops = {
	.proc_open = tm_key_open,
	.proc_read = seq_read,
	.proc_write = tm_key_write,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

/* A deliberate WARN in the module's own code (writing to /proc/kdbt_testmod_warn): while
 * started its ud2 runs translated, and the kernel's report must still name the module's
 * functions and go on. Writing "oops" instead starts a kernel thread of the module that
 * reads an unmapped address: an oops that ends that thread, whose report must name the
 * module's functions too (while started the faulting load runs from the code cache); the
 * write waits for the thread's end. A thread holds nothing: an oops in the writer itself
 * would leave the proc entry in use, and rmmod would wait for it forever. */
static noinline int tm_warn(int n)
{
	WARN(1, "kdbt_testmod: deliberate warning %d\n", n);
	return n + 1;
}

static atomic_t tm_warns = ATOMIC_INIT(0);

/* 0: a page that is never mapped, seen through a variable the compiler cannot fold. */
static volatile unsigned long tm_nowhere;

static noinline u64 tm_oops(int n)
{
	return *(volatile u64 *)(tm_nowhere + 0x40 + 8 * (n & 7));
}

static int tm_oops_thread(void *arg)
{
	u64 v = tm_oops((int)(long)arg);

	/* Not a tail call: this function stays in the trace. */
	pr_info("kdbt_testmod: the oops thread read %llu\n", v);
	return 0;
}

/* Starts the oopsing thread and waits (up to 10 s) for its end. */
static int tm_oops_run(int k)
{
	struct task_struct *t = kthread_create(tm_oops_thread, (void *)(long)k, "kdbt_tm_oops");
	int i, dead;

	if (IS_ERR(t))
		return PTR_ERR(t);
	get_task_struct(t);
	wake_up_process(t);
	for (i = 0; i < 10 * HZ && !READ_ONCE(t->exit_state); i++)
		schedule_timeout_uninterruptible(1);
	dead = READ_ONCE(t->exit_state) != 0;
	put_task_struct(t);
	return dead ? 0 : -ETIMEDOUT;
}

static ssize_t tm_warn_write(struct file *file, const char __user *buf, size_t n, loff_t *pos)
{
	int k = atomic_inc_return(&tm_warns);
	char c = 0;

	if (n > 0 && copy_from_user(&c, buf, 1))
		return -EFAULT;
	if (c == 'o') {
		int e = tm_oops_run(k);

		return e ? e : (ssize_t)n;
	}

	if (tm_warn(k) != k + 1)
		return -EIO;
	return n;
}

static const struct proc_ops tm_warn_ops = {
	.proc_write = tm_warn_write,
};

/* User bytes read inline in the module (user_access_begin + unsafe_get_user: each access
 * has an entry in this module's exception table). A bad pointer faults in the module's
 * own code and its fixup returns -EFAULT; while started that access runs from kdbt's code
 * cache, where the fault must still find a fixup. Writes the bytes' sum to the log. */
static atomic64_t tm_usum = ATOMIC64_INIT(0);

static noinline ssize_t tm_uaccess_write(struct file *file, const char __user *buf, size_t n, loff_t *pos)
{
	u64 sum = 0;
	size_t i, len = min_t(size_t, n, 64);

	if (!user_access_begin(buf, len))
		return -EFAULT;
	for (i = 0; i < len; i++) {
		u8 c;

		unsafe_get_user(c, buf + i, efault);
		sum += c;
	}
	user_access_end();
	atomic64_add(sum, &tm_usum);
	return n;
efault:
	user_access_end();
	return -EFAULT;
}

static int tm_uaccess_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%lld\n", (long long)atomic64_read(&tm_usum));
	return 0;
}

static int tm_uaccess_open(struct inode *inode, struct file *file)
{
	return single_open(file, tm_uaccess_show, NULL);
}

static const struct proc_ops tm_uaccess_ops = {
	.proc_open = tm_uaccess_open,
	.proc_read = seq_read,
	.proc_write = tm_uaccess_write,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

static int __init tm_init(void)
{
	unsigned int cpu;

	tm_expected = tm_mix(7, 64);
	if (!proc_create_single("kdbt_testmod", 0444, NULL, tm_show))
		return -ENOMEM;
	if (!proc_create("kdbt_testmod_key", 0644, NULL, &tm_key_ops)) {
		remove_proc_entry("kdbt_testmod", NULL);
		return -ENOMEM;
	}
	if (!proc_create("kdbt_testmod_warn", 0200, NULL, &tm_warn_ops)) {
		remove_proc_entry("kdbt_testmod_key", NULL);
		remove_proc_entry("kdbt_testmod", NULL);
		return -ENOMEM;
	}
	if (!proc_create("kdbt_testmod_uaccess", 0644, NULL, &tm_uaccess_ops)) {
		remove_proc_entry("kdbt_testmod_warn", NULL);
		remove_proc_entry("kdbt_testmod_key", NULL);
		remove_proc_entry("kdbt_testmod", NULL);
		return -ENOMEM;
	}
	for_each_online_cpu(cpu) {
		struct timer_list *t = per_cpu_ptr(&tm_timer, cpu);

		timer_setup(t, tm_tick, TIMER_PINNED);
		t->expires = jiffies + HZ;
		add_timer_on(t, cpu);
	}
	return 0;
}

static void __exit tm_exit(void)
{
	unsigned int cpu;

	WRITE_ONCE(tm_stopping, true);
	for_each_possible_cpu(cpu) {
		struct timer_list *t = per_cpu_ptr(&tm_timer, cpu);

		if (t->function)
			del_timer_sync(t);
	}
	remove_proc_entry("kdbt_testmod_uaccess", NULL);
	remove_proc_entry("kdbt_testmod_warn", NULL);
	remove_proc_entry("kdbt_testmod_key", NULL);
	remove_proc_entry("kdbt_testmod", NULL);
	pr_info("kdbt_testmod: %d timer runs, %d mismatches\n", atomic_read(&tm_ticks), atomic_read(&tm_mismatches));
}

module_init(tm_init);
module_exit(tm_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kdbt: code for the kernel DBT's tests to translate");
