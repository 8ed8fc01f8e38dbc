# Suite "reboot-panic": a kernel panic while kdbt is loaded (SysRq 'c'; the bench boots
# with panic=-1: reboot at once) brings the machine back to the firmware. The panic stops
# the other CPUs (the kernel's emergency callback devirtualizes each), kdbt's panic
# notifier devirtualizes the panicking CPU, and the emergency restart triple-faults (see
# reboot.sh). Sourced by /init (plan/pass/fail/info/check/expect_reboot).

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 3
if [ "$EXPECT_VMX" != 1 ]; then
    for n in load triple_fault_reboot panic_reboot_resets; do pass "$n" skipped_no_vtx=1; done
    exit 0
fi
check load kdbt load
check triple_fault_reboot sh -c 'echo triple > /sys/kernel/reboot/type && grep -qx triple /sys/kernel/reboot/type'
expect_reboot panic_reboot_resets after-panic
echo c > /proc/sysrq-trigger
sleep 60
fail panic_reboot_resets kernel_lived_on=1
