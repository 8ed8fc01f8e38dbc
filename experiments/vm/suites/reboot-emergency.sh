# Suite "reboot-emergency": an emergency restart while kdbt is loaded (SysRq 'b': no reboot
# notifier runs, as after a panic) still brings the machine back to the firmware. Only the
# kernel's emergency virtualization-disable callback (kdbt's, while loaded) takes the CPUs
# out of VMX operation there; the kernel reboots by a triple fault (see reboot.sh).
# Sourced by /init (plan/pass/fail/info/check/expect_reboot).

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 3
if [ "$EXPECT_VMX" != 1 ]; then
    for n in load triple_fault_reboot emergency_restart_resets; do pass "$n" skipped_no_vtx=1; done
    exit 0
fi
check load kdbt load
check triple_fault_reboot sh -c 'echo triple > /sys/kernel/reboot/type && grep -qx triple /sys/kernel/reboot/type'
expect_reboot emergency_restart_resets
echo b > /proc/sysrq-trigger
sleep 60
fail emergency_restart_resets kernel_lived_on=1
