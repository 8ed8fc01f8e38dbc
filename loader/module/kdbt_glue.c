// SPDX-License-Identifier: GPL-2.0-only
/*
 * kdbt kernel module: the thin C glue. All logic lives in the Rust staticlib
 * (rust/, linked in as kdbt_rust.o); this file only binds it to kernel APIs:
 * module init/exit, the /dev/kdbt misc device, per-CPU calls, memory, MSRs, printk.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/vmalloc.h>
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
#include <linux/cpuhotplug.h>
#include <linux/reboot.h>
#include <linux/suspend.h>
#include <linux/panic_notifier.h>
#include <linux/moduleparam.h>
#include <asm/msr.h>
#include <asm/io.h>
#include <asm/desc.h>
#include <asm/apic.h>
#include <asm/irq_vectors.h>
#include <asm/nmi.h>
#include <asm/reboot.h>
#include <linux/jiffies.h>

#include <linux/objtool.h>

#include "kdbt_glue.h"

/*
 * Root-mode entry code of the Rust side (VM-exit stub, host IDT stubs): it switches
 * stacks and ends in VMRESUME/IRETQ, so objtool must not validate it (as for the
 * kernel's own entry code). Objtool sees the Rust object only when it runs on the linked
 * module (Kbuild's "delay-objtool": IBT or Clang LTO kernels); otherwise it checks
 * objects one by one and never sees these symbols defined.
 */
#if defined(CONFIG_X86_KERNEL_IBT) || defined(CONFIG_LTO_CLANG)
extern void kdbt_vmexit_entry(void);
extern void kdbt_idt_stubs(void);
STACK_FRAME_NON_STANDARD(kdbt_vmexit_entry);
STACK_FRAME_NON_STANDARD(kdbt_idt_stubs);
#endif

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
	/* The kernel DBT's dispatcher allocates with interrupts off. */
	return kmalloc(size, irqs_disabled() ? GFP_ATOMIC : GFP_KERNEL);
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

u64 kdbt_glue_vmalloc_to_phys(const void *ptr)
{
	struct page *p = vmalloc_to_page(ptr);

	return p ? page_to_phys(p) + offset_in_page(ptr) : 0;
}

u64 kdbt_glue_virt_to_phys(const void *ptr)
{
	return virt_to_phys((void *)ptr);
}

void *kdbt_glue_phys_to_virt(u64 phys)
{
	return phys_to_virt(phys);
}

u64 kdbt_glue_gdt_rw(unsigned int cpu)
{
	return (u64)(uintptr_t)get_cpu_gdt_rw(cpu);
}

static char *fake_missing = "";
module_param(fake_missing, charp, 0444);
MODULE_PARM_DESC(fake_missing,
		 "testing: comma-separated VT-x features to pretend are missing: names of vmx::preflight::Features, any case (e.g. vmx,ept,vpid,msr_bitmaps,efer_switch,secondary_controls)");

const char *kdbt_glue_param_fake_missing(void)
{
	return fake_missing;
}

static int fail_launch_cpu = -1;
module_param(fail_launch_cpu, int, 0444);
MODULE_PARM_DESC(fail_launch_cpu,
		 "testing: the CPU whose launch fails on purpose after VMXON, so that the load rolls back (-1: none)");

int kdbt_glue_param_fail_launch_cpu(void)
{
	return fail_launch_cpu;
}

static int hide_hv = 1;
module_param(hide_hv, int, 0444);
MODULE_PARM_DESC(hide_hv,
		 "1 (default): hypervisor memory (VMXON regions, VMCSs, MSR bitmaps, host IDT/GDT/TSS/stacks, EPT tables) has no rights in the guest's EPT view; 0: testing only, leave it mapped");

int kdbt_glue_param_hide_hv(void)
{
	return hide_hv;
}

static int fail_vmwrite_cpu = -1;
module_param(fail_vmwrite_cpu, int, 0444);
MODULE_PARM_DESC(fail_vmwrite_cpu,
		 "testing: the CPU whose launch has one VMWRITE fail (the field fail_vmwrite_field), so that the load fails naming it and rolls back (-1: none)");

static unsigned int fail_vmwrite_field = 0x6802;
module_param(fail_vmwrite_field, uint, 0444);
MODULE_PARM_DESC(fail_vmwrite_field,
		 "testing: VMCS field encoding whose VMWRITE fails on fail_vmwrite_cpu (default 0x6802, GUEST_CR3)");

int kdbt_glue_param_fail_vmwrite_cpu(void)
{
	return fail_vmwrite_cpu;
}

unsigned int kdbt_glue_param_fail_vmwrite_field(void)
{
	return fail_vmwrite_field;
}

void kdbt_glue_self_nmi(void)
{
	/* The path the kernel's own NMI backtraces use (works with xAPIC and x2APIC). */
	apic->send_IPI_mask(cpumask_of(smp_processor_id()), NMI_VECTOR);
}

/* ---- NMI handler: fatal VM exits, and the NMI check ---- */

static atomic_t kdbt_nmi_armed = ATOMIC_INIT(0);
static DEFINE_PER_CPU(atomic_t, kdbt_nmi_seen);

/*
 * Registered for the module's lifetime. After a VM exit kdbt cannot handle, the
 * hypervisor sends this CPU an NMI: panic here with its diagnostic, from the context that
 * took the exit (any CPL). Otherwise it claims NMIs only while a check is armed.
 */
static int kdbt_nmi_handler(unsigned int type, struct pt_regs *regs)
{
	if (kdbt_rs_fatal_pending()) {
		char msg[480];
		size_t n = kdbt_rs_fatal_message(msg, sizeof(msg) - 1);

		msg[n] = 0;
		nmi_panic(regs, msg);
		return NMI_HANDLED;
	}
	if (!atomic_read(&kdbt_nmi_armed))
		return NMI_DONE;
	/* The first one sends a second NMI, which arrives while NMIs are blocked (this
	 * handler runs): it must be delivered after the IRET, as without kdbt. */
	if (atomic_inc_return(this_cpu_ptr(&kdbt_nmi_seen)) == 1)
		apic->send_IPI_mask(cpumask_of(smp_processor_id()), NMI_VECTOR);
	return NMI_HANDLED;
}

int kdbt_glue_nmi_test(unsigned int cpu)
{
	atomic_t *seen;
	unsigned long deadline;
	int n;

	if (cpu >= nr_cpu_ids || !cpu_online(cpu))
		return -EINVAL;
	seen = per_cpu_ptr(&kdbt_nmi_seen, cpu);
	atomic_set(seen, 0);
	atomic_set(&kdbt_nmi_armed, 1);
	apic->send_IPI_mask(cpumask_of(cpu), NMI_VECTOR);
	deadline = jiffies + HZ;
	while (atomic_read(seen) < 2 && time_before(jiffies, deadline))
		cond_resched();
	n = atomic_read(seen);
	atomic_set(&kdbt_nmi_armed, 0);
	return n;
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

/* ---- CPU hotplug and reboot ---- */

static int kdbt_hp_state = -1;

static int kdbt_cpu_online(unsigned int cpu)
{
	return kdbt_rs_cpu_online(cpu);
}

static int kdbt_cpu_offline(unsigned int cpu)
{
	return kdbt_rs_cpu_offline(cpu);
}

static int test_no_reset_hooks;
module_param(test_no_reset_hooks, int, 0444);
MODULE_PARM_DESC(test_no_reset_hooks,
		 "testing: 1 makes the reboot notifier, the emergency callback and the panic notifier do nothing, so that the reboot suites show the machine not coming back without them (default 0)");

static int kdbt_reboot(struct notifier_block *nb, unsigned long action, void *data)
{
	if (!test_no_reset_hooks)
		kdbt_rs_shutdown();
	return NOTIFY_DONE;
}

static struct notifier_block kdbt_reboot_nb = {
	.notifier_call = kdbt_reboot,
};

/* ---- suspend and hibernation ---- */

/* Whether the PM notifier unloaded kdbt for a suspend and loads it again afterwards. */
static bool kdbt_pm_reload;

/*
 * Runs in the task that suspends, before tasks are frozen and again after they are
 * thawed, every CPU online: kdbt devirtualizes every CPU before the machine sleeps (a CPU
 * loses its VMX state in S3 and wakes up natively) and virtualizes them again afterwards.
 * The ioctl mutex keeps a concurrent `kdbt load`/`unload` out.
 */
static int kdbt_pm_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	int ret;

	switch (action) {
	case PM_SUSPEND_PREPARE:
	case PM_HIBERNATION_PREPARE:
	case PM_RESTORE_PREPARE:
		mutex_lock(&kdbt_ioctl_lock);
		ret = kdbt_rs_pm_suspend();
		mutex_unlock(&kdbt_ioctl_lock);
		if (ret < 0) {
			pr_err("refusing to suspend: a CPU could not be devirtualized (error %d)\n", ret);
			return notifier_from_errno(ret);
		}
		kdbt_pm_reload = ret > 0;
		return NOTIFY_OK;
	case PM_POST_SUSPEND:
	case PM_POST_HIBERNATION:
	case PM_POST_RESTORE:
		if (kdbt_pm_reload) {
			kdbt_pm_reload = false;
			mutex_lock(&kdbt_ioctl_lock);
			kdbt_rs_pm_resume();
			mutex_unlock(&kdbt_ioctl_lock);
		}
		return NOTIFY_OK;
	}
	return NOTIFY_DONE;
}

static struct notifier_block kdbt_pm_nb = {
	.notifier_call = kdbt_pm_notify,
};

/* ---- emergencies: reboot without notifiers, panic, crash kernel ---- */

#ifdef KDBT_HAVE_EMERGENCY_VIRT_CB
/*
 * The kernel calls this on every CPU it stops in an emergency (emergency restart, the
 * NMI shootdown before a crash kernel, the stop IPI/NMI of a panic), interrupts off,
 * maybe in NMI context: VMX must be off before a reset or the next kernel (VMX blocks
 * INIT). Registered only while kdbt is loaded, the kernel keeps a single one (KVM's).
 */
static void kdbt_emergency_virt_off(void)
{
	if (!test_no_reset_hooks)
		kdbt_rs_emergency_devirtualize();
}

static bool kdbt_emergency_armed;

void kdbt_glue_emergency_arm(bool on)
{
	if (on && !kdbt_emergency_armed)
		cpu_emergency_register_virt_callback(kdbt_emergency_virt_off);
	else if (!on && kdbt_emergency_armed)
		cpu_emergency_unregister_virt_callback(kdbt_emergency_virt_off);
	kdbt_emergency_armed = on;
}

bool kdbt_glue_has_emergency_callback(void)
{
	return true;
}
#else
void kdbt_glue_emergency_arm(bool on)
{
}

bool kdbt_glue_has_emergency_callback(void)
{
	return false;
}
#endif

/*
 * A panic: the panicking CPU leaves VMX operation (with the kernel's emergency callback
 * the other CPUs do so when the panic stops them; without it they stay virtualized).
 */
static int kdbt_panic_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	if (!test_no_reset_hooks)
		kdbt_rs_emergency_devirtualize();
	return NOTIFY_DONE;
}

static struct notifier_block kdbt_panic_nb = {
	.notifier_call = kdbt_panic_notify,
	/* Last: other panic notifiers (kmsg dumpers...) still run under kdbt. */
	.priority = INT_MIN,
};

static int __init kdbt_init(void)
{
	int ret = kdbt_rs_init();

	if (ret)
		return ret;
	/* Registered for the module's lifetime; the callbacks do nothing unless loaded. */
	ret = cpuhp_setup_state_nocalls(CPUHP_AP_ONLINE_DYN, "kdbt:online",
					kdbt_cpu_online, kdbt_cpu_offline);
	if (ret < 0) {
		pr_err("cannot register CPU hotplug callbacks: %d\n", ret);
		goto out_rs;
	}
	kdbt_hp_state = ret;
	ret = register_nmi_handler(NMI_LOCAL, kdbt_nmi_handler, 0, "kdbt");
	if (ret)
		goto out_hp;
	ret = register_reboot_notifier(&kdbt_reboot_nb);
	if (ret)
		goto out_nmi;
	ret = register_pm_notifier(&kdbt_pm_nb);
	if (ret)
		goto out_reboot;
	atomic_notifier_chain_register(&panic_notifier_list, &kdbt_panic_nb);
	ret = misc_register(&kdbt_misc);
	if (ret) {
		pr_err("cannot register /dev/kdbt: %d\n", ret);
		goto out_pm;
	}
	return 0;

out_pm:
	atomic_notifier_chain_unregister(&panic_notifier_list, &kdbt_panic_nb);
	unregister_pm_notifier(&kdbt_pm_nb);
out_reboot:
	unregister_reboot_notifier(&kdbt_reboot_nb);
out_nmi:
	unregister_nmi_handler(NMI_LOCAL, "kdbt");
out_hp:
	cpuhp_remove_state_nocalls(kdbt_hp_state);
out_rs:
	kdbt_rs_exit(); /* nothing is loaded yet: cannot fail */
	return ret;
}

static void __exit kdbt_exit(void)
{
	misc_deregister(&kdbt_misc);
	unregister_pm_notifier(&kdbt_pm_nb);
	unregister_reboot_notifier(&kdbt_reboot_nb);
	/*
	 * Devirtualize while the hotplug callbacks are still registered: a CPU going offline
	 * meanwhile is devirtualized by them, and once unloaded they do nothing.
	 */
	if (kdbt_rs_exit())
		panic("kdbt: module exit: a CPU is still in VMX operation and could not be devirtualized; freeing kdbt now would crash it later\n");
	atomic_notifier_chain_unregister(&panic_notifier_list, &kdbt_panic_nb);
	cpuhp_remove_state_nocalls(kdbt_hp_state);
	unregister_nmi_handler(NMI_LOCAL, "kdbt");
	kdbt_glue_wp_flush(); /* nothing can queue it any more (the DBT is stopped) */
}

module_init(kdbt_init);
module_exit(kdbt_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("kdbt developers");
MODULE_DESCRIPTION("kdbt: VT-x late launch and kernel dynamic binary translation");
