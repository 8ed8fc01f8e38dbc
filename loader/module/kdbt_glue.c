// SPDX-License-Identifier: GPL-2.0-only
/*
 * kdbt kernel module: the thin C glue. All logic lives in the Rust staticlib
 * (rust/, linked in as kdbt_rust.o); this file only binds it to kernel APIs:
 * module init/exit, the /dev/kdbt misc device, per-CPU calls, memory, MSRs, printk.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/smp.h>
#include <linux/cpu.h>
#include <linux/cpumask.h>
#include <linux/uaccess.h>
#include <asm/msr.h>
#include <asm/io.h>

#include "kdbt_glue.h"

/* ---- rust -> glue services ---- */

void kdbt_glue_log(int level, const char *msg, size_t len)
{
	int n = len > INT_MAX ? INT_MAX : (int)len;

	switch (level) {
	case 0: pr_err("%.*s\n", n, msg); break;
	case 1: pr_warn("%.*s\n", n, msg); break;
	case 2: pr_info("%.*s\n", n, msg); break;
	default: pr_debug("%.*s\n", n, msg); break;
	}
}

void kdbt_glue_panic(const char *msg, size_t len)
{
	int n = len > INT_MAX ? INT_MAX : (int)len;

	panic("kdbt: Rust panic: %.*s\n", n, msg);
}

void *kdbt_glue_alloc(size_t size)
{
	return kmalloc(size, GFP_KERNEL);
}

void kdbt_glue_free(void *ptr)
{
	kfree(ptr);
}

void *kdbt_glue_alloc_pages(unsigned int order)
{
	return (void *)__get_free_pages(GFP_KERNEL | __GFP_ZERO, order);
}

void kdbt_glue_free_pages(void *ptr, unsigned int order)
{
	free_pages((unsigned long)ptr, order);
}

u64 kdbt_glue_virt_to_phys(const void *ptr)
{
	return virt_to_phys((void *)ptr);
}

unsigned long kdbt_glue_copy_to_user(u64 to, const void *from, unsigned long n)
{
	return copy_to_user((void __user *)(uintptr_t)to, from, n);
}

unsigned long kdbt_glue_copy_from_user(void *to, u64 from, unsigned long n)
{
	return copy_from_user(to, (const void __user *)(uintptr_t)from, n);
}

unsigned int kdbt_glue_nr_cpu_ids(void)
{
	return nr_cpu_ids;
}

unsigned int kdbt_glue_num_online_cpus(void)
{
	return num_online_cpus();
}

bool kdbt_glue_cpu_online(unsigned int cpu)
{
	return cpu < nr_cpu_ids && cpu_online(cpu);
}

unsigned int kdbt_glue_this_cpu(void)
{
	return raw_smp_processor_id();
}

int kdbt_glue_run_on_cpu(unsigned int cpu, void (*fn)(void *), void *arg)
{
	if (cpu >= nr_cpu_ids)
		return -EINVAL;
	return smp_call_function_single(cpu, fn, arg, 1);
}

void kdbt_glue_cpus_read_lock(void)
{
	cpus_read_lock();
}

void kdbt_glue_cpus_read_unlock(void)
{
	cpus_read_unlock();
}

int kdbt_glue_rdmsr_safe(u32 msr, u64 *val)
{
	return rdmsrl_safe(msr, val);
}

/* ---- /dev/kdbt ---- */

/* One ioctl at a time: the Rust side keeps global state and may sleep. */
static DEFINE_MUTEX(kdbt_ioctl_lock);

static long kdbt_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	long ret;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	mutex_lock(&kdbt_ioctl_lock);
	ret = kdbt_rs_ioctl(cmd, arg);
	mutex_unlock(&kdbt_ioctl_lock);
	return ret;
}

static const struct file_operations kdbt_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = kdbt_ioctl,
	.compat_ioctl = kdbt_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice kdbt_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kdbt",
	.fops = &kdbt_fops,
	.mode = 0600,
};

static int __init kdbt_init(void)
{
	int ret = kdbt_rs_init();

	if (ret)
		return ret;
	ret = misc_register(&kdbt_misc);
	if (ret) {
		pr_err("cannot register /dev/kdbt: %d\n", ret);
		kdbt_rs_exit();
		return ret;
	}
	return 0;
}

static void __exit kdbt_exit(void)
{
	misc_deregister(&kdbt_misc);
	kdbt_rs_exit();
}

module_init(kdbt_init);
module_exit(kdbt_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("kdbt developers");
MODULE_DESCRIPTION("kdbt: VT-x late launch and kernel dynamic binary translation");
