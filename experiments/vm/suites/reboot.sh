# Suite "reboot": `reboot -f` while kdbt is loaded brings the machine back to the firmware
# (the bench sees a second boot). The kernel reboots by a triple fault here, its last
# resort when the other methods fail: a virtualized CPU's triple fault is a VM exit (kdbt
# halts that CPU), so the machine resets only if every CPU left VMX operation first
# (kdbt's reboot notifier). The reboot ends the boot, so this suite runs alone. The bench
# passes reboot_resets on a second boot or when Bochs logs the machine reset.
# Sourced by /init (plan/pass/fail/info/check/expect_reboot).

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 3
if [ "$EXPECT_VMX" != 1 ]; then
    for n in load triple_fault_reboot reboot_resets; do pass "$n" skipped_no_vtx=1; done
    exit 0
fi
check load kdbt load
check triple_fault_reboot sh -c 'echo triple > /sys/kernel/reboot/type && grep -qx triple /sys/kernel/reboot/type'
expect_reboot reboot_resets
reboot -f
sleep 60
# Only reached if the kernel lived on.
fail reboot_resets kernel_lived_on=1
