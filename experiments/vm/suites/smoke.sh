# Suite "smoke": every CPU online, kdbt.ko loads, `kdbt caps` reports VMX + EPT with
# execute-only pages on each CPU (or, without VT-x, says so plainly), the kernel DBT's
# self-test (kernel functions run from the code cache, no VT-x needed), rmmod, clean dmesg.

plan 9

out=$(cpuinfo-check --expect-cpus "$NCPUS" --expect-vmx "$EXPECT_VMX" 2>&1); rc=$?
info "$out"
online=$(echo "$out" | sed -n 's/^online=\([0-9]*\).*/\1/p')
if [ $rc -eq 0 ]; then pass cpus_online online="$online" expected="$NCPUS"; else fail cpus_online rc=$rc online="$online" expected="$NCPUS"; fi

check insmod insmod /lib/modules/kdbt.ko
[ -e /dev/kdbt ] && info "/dev/kdbt present" || info "/dev/kdbt missing"

caps=$(kdbt caps 2>&1); rc=$?
info "$caps"
if [ "$EXPECT_VMX" = 1 ]; then
    summary=$(kdbt caps --summary 2>&1); src=$?
    info "$summary"
    lines=$(echo "$summary" | grep -c '^cpu=')
    good=$(echo "$summary" | grep '^cpu=' | grep ' vmx=1' | grep ' ept=1' | grep -c ' ept_xo=1')
    if [ $rc -eq 0 ] && [ $src -eq 0 ] && [ "$lines" = "$NCPUS" ] && [ "$good" = "$NCPUS" ]; then
        pass caps_vmx_ept_xo cpus="$lines" vmx_ept_xo="$good"
    else
        fail caps_vmx_ept_xo rc=$rc summary_rc=$src cpus="$lines" vmx_ept_xo="$good" expected="$NCPUS"
    fi
    # Figures for the table: which optional features each CPU reports.
    first=$(echo "$summary" | grep '^cpu=0 ' | head -1)
    if [ -n "$first" ]; then pass caps_cpu0 $(echo "$first" | cut -d' ' -f2-); else fail caps_cpu0 missing=1; fi
else
    if [ $rc -eq 0 ] && echo "$caps" | grep -qi 'no VT-x'; then
        pass caps_no_vtx rc=$rc
    else
        fail caps_no_vtx rc=$rc
    fi
    # The module stays loaded and usable: caps again answers the same way.
    again=$(kdbt caps 2>&1); rc2=$?
    if [ $rc2 -eq 0 ] && [ "$again" = "$caps" ]; then pass caps_repeatable; else fail caps_repeatable rc=$rc2; fi
fi

# Kernel functions translated into kdbt's code cache and run from there, in the kernel's
# own context, against native calls (on every CPU, and in a loop with interrupts on).
out=$(kdbt dbt-selftest 2>&1); rc=$?
info "$out"
if [ $rc -eq 0 ] && echo "$out" | grep -q 'dbt-selftest passed'; then
    pass dbt_selftest functions=$(echo "$out" | sed -n 's/.*passed: \([0-9]*\) kernel functions.*/\1/p') \
        blocks=$(echo "$out" | sed -n 's/.*; \([0-9]*\) blocks.*/\1/p') \
        dispatches=$(echo "$out" | sed -n 's/.* \([0-9]*\) dispatches.*/\1/p') \
        insns=$(echo "$out" | sed -n 's/.* \([0-9]*\) instructions counted.*/\1/p') \
        pool_allocs=$(echo "$out" | sed -n 's/.*dispatcher pool: \([0-9]*\) allocations.*/\1/p') \
        pool_peak_kb=$(echo "$out" | sed -n 's/.* peak \([0-9]*\) KB of.*/\1/p')
else
    fail dbt_selftest rc=$rc
fi
# The same with the translations replaced by native calls: the check that code ran from
# the cache must catch it.
caught dbt_selftest_catches_native 'no instruction counted from the code cache' kdbt dbt-selftest --test-native

# The same with the dispatcher's pool switched off (its allocations go to kmalloc with
# interrupts off): the check that nothing called kmalloc with interrupts off must catch it.
caught dbt_selftest_catches_kmalloc 'kmalloc calls with interrupts off during translated runs' kdbt dbt-selftest --no-pool

check rmmod rmmod kdbt
dmesg_clean dmesg_clean
