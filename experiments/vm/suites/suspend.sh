# Suite "suspend": suspend to RAM while kdbt is loaded. A CPU loses its VMX state in S3
# (Bochs' ACPI controller resets the machine and its BIOS jumps to the kernel's wakeup
# vector), so kdbt devirtualizes every CPU before the machine sleeps and virtualizes them
# again on resume. First the kernel's PM test mode (`core`: CPUs offline and back, the
# whole path but the sleep itself), then a real S3. Afterwards every CPU answers kdbt's
# CPUID signature, the workload is unchanged and `kdbt unload` works.
# Sourced by /init (plan/pass/fail/info/check, $NCPUS, $EXPECT_VMX).

export KDBT_MODULE=/lib/modules/kdbt.ko
plan 11
if [ "$EXPECT_VMX" != 1 ]; then
    for n in load s3_supported pm_test_core signature_after_pm_test suspend_mem \
        signature_after_s3 status_after_s3 workload_after_s3 unload signature_gone; do
        pass "$n" skipped_no_vtx=1
    done
    dmesg_clean suspend_dmesg_clean
    exit 0
fi

cpus_list() { seq 0 $((NCPUS - 1)); }
sig_all() {
    for c in $(cpus_list); do
        taskset -c "$c" cpuid-sig --expect "$1" >/tmp/sig.$c 2>&1 || { cat /tmp/sig.$c; return 1; }
    done
}
all_virtualized() {
    n=$(kdbt status --json | grep -c '"virtualized": true')
    echo "virtualized=$n of $NCPUS"
    [ "$n" = "$NCPUS" ]
}
dd if=/dev/urandom of=/tmp/data bs=64k count=4 2>/dev/null
work() { sha256sum /tmp/data && workload --n 20 --dir /tmp; }
work > /tmp/w.before

check load kdbt load
# S3 ("deep") must be offered, else this suite tests nothing.
s3() {
    echo "state: $(cat /sys/power/state) mem_sleep: $(cat /sys/power/mem_sleep 2>&1) pm_test: $(cat /sys/power/pm_test 2>&1)"
    grep -qw mem /sys/power/state && grep -qw deep /sys/power/mem_sleep && echo deep > /sys/power/mem_sleep
}
check s3_supported s3
# The PM test mode: no sleep, but the whole suspend and resume path runs.
echo 0 > /sys/module/suspend/parameters/pm_test_delay 2>/dev/null
pm_core() { echo core > /sys/power/pm_test && echo mem > /sys/power/state; rc=$?; echo none > /sys/power/pm_test; return $rc; }
check pm_test_core pm_core
check signature_after_pm_test sig_all kdbt
# A real suspend to RAM.
check suspend_mem sh -c 'echo mem > /sys/power/state'
check signature_after_s3 sig_all kdbt
check status_after_s3 all_virtualized
work > /tmp/w.after
check workload_after_s3 cmp /tmp/w.before /tmp/w.after
check unload kdbt unload
check signature_gone sig_all none
dmesg_clean suspend_dmesg_clean
